"""The built-in offline world: rendered shapes, captions, and a tiny CLIP pretrained on them by nanoprompt itself.

A teaching world, not a benchmark. Pretrained CLIP weights and benchmark images need a network; this world lets
every script run, and visibly learn, on a laptop CPU with no download.

Objects have attributes shared across categories: colour (8), shape (8), pattern (solid / striped / dotted),
size, rotation and position, on a dark noisy background, 32x32 pixels. A class is a colour-shape pair named in plain
words ("red circle"). Pretraining sees captions such as "a small striped red circle" for 48 of the 64 pairs (16 are
held out entirely). The downstream dataset has 32 classes: base classes pair the first 4 colours with the first 4
shapes, new classes the other colours with the other shapes, so what prompt tuning learns on base classes need not
carry over to new ones; and its images are shifted away from pretraining by strong pixel noise, so zero-shot
accuracy is clearly above chance but clearly below the ceiling, and there is room for prompt tuning.

    python world.py              # render the images (2 s, once) and report the shipped CLIP's zero-shot accuracy
    python world.py --pretrain   # pretrain the tiny CLIP yourself (~3.5 min on 2 CPU cores) and report the same

The pretrained tiny CLIP ships with the repository (world_clip.pt, 7 MB, sha256 pinned below, read by clip.load), so
every script starts in seconds and gives the README's numbers on any machine: pretraining on another CPU gives a
slightly different CLIP (floating-point order), and prompt-tuning numbers moved by up to 3 points between machines.
world_clip.pt is `python world.py --pretrain` (seed 0) with its token embedding stored in fp16 (3.2M of its 3.4M
weights; the rest fp32). Images and pretraining renders are cached in data/world/ beside the code.
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clip
import files
from clip.model import CLIP

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 220, 50),
           "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (235, 235, 235), "cyan": (40, 210, 220)}
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "moon", "bar"]
PATTERNS = ["solid", "striped", "dotted"]
COLOUR_NAMES = list(COLOURS)
# Downstream classes: base = first 4 colours x first 4 shapes, new = last 4 colours x last 4 shapes (label order).
CLASSNAMES = [f"{c} {s}" for c in COLOUR_NAMES[:4] for s in SHAPES[:4]] + \
             [f"{c} {s}" for c in COLOUR_NAMES[4:] for s in SHAPES[4:]]
TEMPLATE = "a photo of a {}."
ATTRIBUTES = {"colour": COLOUR_NAMES, "shape": SHAPES, "pattern": PATTERNS, "size": ["small", "large"]}
HELD_OUT = {(c, s) for c in range(8) for s in range(8) if (c + s) % 4 == 0}  # 16 pairs never seen in pretraining
RES = 32
# Tiny CLIP: ViT patch 8, width 64, 2 layers; text width 64, 2 layers; joint embedding 64.
ARCH = dict(embed_dim=64, image_resolution=RES, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
PRETRAIN = dict(images=50_000, steps=2_800, batch=256, lr=2e-3, weight_decay=0.1)
NOISE = 40.0  # pixel-noise std of the downstream images: the domain shift
HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "world_clip.pt"
SHIPPED_SHA256 = "531915eaa25835c79674ade9d674d662389764516a92865d9fbe206f65890a2a"


def render(colour, shape, pattern, size, rng, noise=8.0):
    """uint8 images (N, 32, 32, 3) of one object each; all arguments are (N,) integer arrays."""
    n = len(colour)
    y, x = np.mgrid[0:RES, 0:RES].astype(np.float32) / RES - 0.5  # (32, 32) each, in [-0.5, 0.5)
    cx, cy = rng.uniform(-0.12, 0.12, (2, n, 1, 1))
    theta = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    radius = np.where(size[:, None, None] == 1, 0.36, 0.22) * rng.uniform(0.9, 1.1, (n, 1, 1))
    u, v = x - cx, y - cy
    u, v = u * np.cos(theta) + v * np.sin(theta), -u * np.sin(theta) + v * np.cos(theta)  # rotated frame
    r, a = np.hypot(u, v) / radius, np.arctan2(v, u)  # distance in radii, angle
    au, av = np.abs(u) / radius, np.abs(v) / radius
    polygon = lambda k: r * np.cos(np.mod(a, 2 * np.pi / k) - np.pi / k) < np.cos(np.pi / k)  # regular k-gon
    masks = [r < 1, polygon(4), polygon(3), r < 0.55 + 0.45 * np.cos(5 * a), (r < 1) & (r > 0.55),
             (np.minimum(au, av) < 0.3) & (np.maximum(au, av) < 1), (r < 1) & (np.hypot(u / radius - 0.5, v / radius) > 0.75),
             (au < 1.1) & (av < 0.35)]
    mask = np.choose(shape[:, None, None], masks)  # (N, 32, 32)
    stripes = (np.sin(u * 60) > 0)
    dots = (np.sin(u * 55) > 0.3) & (np.sin(v * 55) > 0.3)
    mask = mask & np.choose(pattern[:, None, None], [np.ones_like(stripes), stripes, ~dots])
    palette = np.array(list(COLOURS.values()), dtype=np.float32)[colour]  # (N, 3)
    background = rng.uniform(0, 50, (n, 1, 1, 3))
    images = np.where(mask[..., None], palette[:, None, None, :], background)  # (N, 32, 32, 3)
    images = images + rng.normal(0, noise, images.shape)
    return images.clip(0, 255).astype(np.uint8)


def caption(colour, shape, pattern, size, rng):
    """A pretraining caption with words dropped at random, e.g. 'a small striped red circle' or 'red circle'."""
    words = [["small", "large"][size], PATTERNS[pattern], COLOUR_NAMES[colour], SHAPES[shape]]
    keep = [w for i, w in enumerate(words) if i >= 2 or rng.random() < 0.5]  # colour and shape are always named
    start = ["a photo of a", "a", "a picture of a", "an image of a"][rng.integers(4)]
    return f"{start} {' '.join(keep)}."


def pretraining_set(folder, seed):
    """(images uint8 (N, 32, 32, 3), token ids (N, 77)) of the pretraining renders, rendered once and cached."""
    path = folder / f"pretrain_seed{seed}.pt"
    if path.exists():
        entry = torch.load(path, weights_only=True)
        return entry["images"], entry["tokens"]
    rng = np.random.default_rng(seed)
    pairs = np.array([(c, s) for c in range(8) for s in range(8) if (c, s) not in HELD_OUT])
    n = PRETRAIN["images"]
    colour, shape = pairs[rng.integers(len(pairs), size=n)].T
    pattern, size = rng.integers(3, size=n), rng.integers(2, size=n)
    images = np.concatenate([render(colour[i:i + 5000], shape[i:i + 5000], pattern[i:i + 5000], size[i:i + 5000], rng)
                             for i in range(0, n, 5000)])
    tokens = clip.tokenize([caption(c, s, p, z, rng) for c, s, p, z in zip(colour, shape, pattern, size)])
    images = torch.from_numpy(images)
    files.atomic_write(path, lambda tmp: torch.save({"images": images, "tokens": tokens}, tmp))
    return images, tokens


def to_input(images_uint8):
    """uint8 (N, 32, 32, 3) -> normalised float (N, 3, 32, 32), as clip's preprocessing would give."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32)
    mean, std = torch.tensor(clip.clip.MEAN).view(1, 3, 1, 1), torch.tensor(clip.clip.STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain(images, tokens, steps, seed, batch=PRETRAIN["batch"], lr=PRETRAIN["lr"]):
    """CLIP's contrastive objective: match each image with its own caption among the batch, both ways."""
    torch.manual_seed(seed)
    model = CLIP(**ARCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=PRETRAIN["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in files.progress(range(steps), "pretraining the world's CLIP"):
        idx = torch.randint(len(images), (batch,), generator=g)
        img = F.normalize(model.encode_image(to_input(images[idx])), dim=-1)  # (b, E)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)  # (b, E)
        logits = model.logit_scale.exp() * img @ txt.t()  # (b, b)
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
    return model, losses


def shipped_clip():
    """Path of the shipped pretrained tiny CLIP, after checking it is the file this code was measured with."""
    if not SHIPPED.exists() or clip.clip.sha256(SHIPPED) != SHIPPED_SHA256:
        raise files.InputError(f"{SHIPPED} is missing or changed (sha256 differs from the pinned one); restore it with "
                              f"`git checkout -- world_clip.pt`, or pass --backbone with a CLIP of your own")
    return SHIPPED


def pretrain_clip(root, seed=0):
    """Pretrain the world's tiny CLIP from scratch (renders cached in root/world); returns its checkpoint's path."""
    folder = Path(root).expanduser() / "world"
    path = folder / f"clip_world_seed{seed}.pt"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    images, tokens = pretraining_set(folder, seed)
    model, losses = pretrain(images, tokens, PRETRAIN["steps"], seed)
    files.atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    print(f"pretrained in {time.time() - start:.0f} s: loss {np.mean(losses[:50]):.3f} -> {np.mean(losses[-50:]):.3f}; "
          f"saved {path} (use it with --backbone {path})")
    return path


def prepare_dataset(root=files.ROOT, seed=0, train_per_class=24, test_per_class=40):
    """Folder of the downstream dataset (images + split_world.json in CoOp's split format), rendered on first use."""
    folder = Path(root).expanduser() / "world"
    if (folder / "split_world.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("images.tmp-*"):  # left by a render that was killed: remove it if its process is gone
        if not _alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    rng = np.random.default_rng(1000 + seed)
    tmp = folder / f"images.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSNAMES):
        colour_name, shape_name = name.split()
        n = train_per_class + test_per_class
        colour = np.full(n, COLOUR_NAMES.index(colour_name))
        shape = np.full(n, SHAPES.index(shape_name))
        images = render(colour, shape, rng.integers(3, size=n), rng.integers(2, size=n), rng, noise=NOISE)
        (tmp / name.replace(" ", "_")).mkdir()
        for i, image in enumerate(images):
            rel = f"{name.replace(' ', '_')}/{i:03d}.png"
            Image.fromarray(image).save(tmp / rel)
            split["train" if i < train_per_class else "test"].append([rel, label, name])
    shutil.rmtree(folder / "images", ignore_errors=True)
    os.replace(tmp, folder / "images")
    files.save_json(folder / "split_world.json", split)  # written last: marks the folder complete
    return folder


def _alive(pid):
    """Whether process pid still runs (a stale images.tmp-PID folder is one whose writer is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@torch.no_grad()
def zero_shot(model, images_uint8, labels, classnames):
    text = F.normalize(model.encode_text(clip.tokenize([TEMPLATE.format(c) for c in classnames])), dim=-1)
    img = F.normalize(model.encode_image(to_input(images_uint8)), dim=-1)
    return 100 * ((img @ text.t()).argmax(-1) == labels).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare the built-in world's images and report the zero-shot "
                                                 "accuracy of its tiny CLIP (the shipped one, or one you pretrain).")
    parser.add_argument("--root", default=str(files.ROOT), help="folder under which world/ is prepared (default: data/ "
                                                          "beside the code)")
    parser.add_argument("--pretrain", action="store_true", help="pretrain the tiny CLIP from scratch (~3.5 min on 2 "
                                                                "CPU cores) instead of using the shipped world_clip.pt")
    args = parser.parse_args(argv)
    start = time.time()
    path = pretrain_clip(args.root) if args.pretrain else shipped_clip()
    folder = prepare_dataset(args.root)
    print(f"prepared in {time.time() - start:.0f} s: {path}, {folder}")
    model, _ = clip.load(str(path), device="cpu")
    print(f"tiny CLIP: {sum(p.numel() for p in model.parameters()):,} parameters")
    split = json.loads((folder / "split_world.json").read_text())
    images = torch.from_numpy(np.stack([np.array(Image.open(folder / "images" / p)) for p, _, _ in split["test"]]))
    labels = torch.tensor([y for _, y, _ in split["test"]])
    half = len(CLASSNAMES) // 2
    print(f"zero-shot, shifted test set: all {zero_shot(model, images, labels, CLASSNAMES):.1f}% "
          f"(chance {100 / len(CLASSNAMES):.1f}%)")
    base, new = labels < half, labels >= half
    print(f"  base {zero_shot(model, images[base], labels[base], CLASSNAMES[:half]):.1f}%  "
          f"new {zero_shot(model, images[new], labels[new] - half, CLASSNAMES[half:]):.1f}%  (chance {100 / half:.1f}%)")
    rng = np.random.default_rng(7)
    c, s = np.array([[COLOUR_NAMES.index(n.split()[0]), SHAPES.index(n.split()[1])] for n in CLASSNAMES]).repeat(20, 0).T
    clean = torch.from_numpy(render(c, s, rng.integers(3, size=len(c)), rng.integers(2, size=len(c)), rng))
    print(f"zero-shot, clean renders (no shift): {zero_shot(model, clean, torch.arange(len(CLASSNAMES)).repeat_interleave(20), CLASSNAMES):.1f}%")


if __name__ == "__main__":
    main()
