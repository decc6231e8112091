"""Benchmark nanoprompt's hot paths on the current device, with random weights at real sizes (like nanoGPT's bench.py).

What it measures (a table per section, plus device, dtype and versions):
  1. text encoder forward+backward over C class prompts, full 77 tokens vs truncated to the longest prompt,
     with the max difference of the features (the truncation is exact, so this is rounding only);
  2. image-encoder evaluation throughput (images/s) with each attention path (plain math vs torch SDPA);
  3. peak memory, and on CUDA the achieved TFLOP/s and its fraction of the device's dense bf16 peak;
  4. one training step of each method script's model (CoOp at 77 tokens and truncated, the four CaPT conditions,
     DeCaPT, SemPT) over C classes at batch 4 (their default), and DA-VPT's step against plain VPT-deep;
  5. the feature store: a first evaluation of a test set (encode + write) against a second one (read).

    python bench.py                # ViT-B/16 (and ViT-L/14 on a GPU), C in {10, 100, 1000}
    python bench.py --quick        # CPU-sized: ViT-B/16, C in {10, 100}, under 2 minutes on 2 cores (108 s)
    python bench.py --quick --sections methods --classes 100   # one section only

Random weights give the same timings as OpenAI's (the arithmetic does not depend on the values).
"""
import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import torch
import torch.nn.functional as F

import capt
import clip
import coop
import data
import davpt
import eval as evaluation
import sempt
from clip.model import CLIP, set_sdpa

# OpenAI's sizes: embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text width/heads/layers
SIZES = {
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0}  # dense, no sparsity

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="CPU-sized run: ViT-B/16 only, C in {10, 100}, fewer repeats")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--classes", type=int, nargs="+", default=None, help="class counts C (default 10 100 1000)")
parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 5, --quick 1)")
parser.add_argument("--sections", default="text,image,methods,store", help="comma-separated: text, image, methods, store")


def timeit(fn, repeats, device):
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # max RSS of the process, in MiB (Linux: KiB)


def device_peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def class_names(C):
    """C class names of varied length (1-4 words)."""
    words = ["red", "striped", "small", "mountain", "bike", "tabby", "cat", "sea", "plane", "oak"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 4)) for i in range(C)]


def class_prompts(C):
    """C prompts 'a photo of a <name>.', tokenized to (C, 77)."""
    return clip.tokenize([f"a photo of a {n}." for n in class_names(C)])


def text_flops(model, T, C):
    """Matmul FLOPs of the text transformer's forward for C prompts of T tokens (x3 for forward+backward)."""
    D, L = model.transformer.width, model.transformer.layers
    per_layer = 2 * C * T * (12 * D * D) + 2 * 2 * C * T * T * D  # qkv/out/mlp matmuls + attention scores/values
    return L * per_layer


def bench_text(model, C, autocast, device, repeats):
    tokens = class_prompts(C).to(device)
    eot = tokens.argmax(-1)
    # The prompt embeddings require grad, as a learned context would: the backward pass runs through every layer.
    emb = model.token_embedding(tokens).detach().requires_grad_(True)  # (C, 77, D)
    row = {}
    for name, T in [("77 tokens", tokens.shape[1]), ("truncated", int(eot.max()) + 1)]:
        def step():
            with autocast():
                feats = model.encode_token_embeddings(emb[:, :T], eot)
            feats.float().pow(2).sum().backward()
            return feats
        row[name] = (timeit(step, repeats, device), T)
    with torch.no_grad(), autocast():
        full = model.encode_text(tokens, truncate=False).float()
        trunc = model.encode_text(tokens, truncate=True).float()
    return row, (full - trunc).abs().max().item()


def bench_image(model, autocast, device, repeats, batch):
    images = torch.randn(batch, 3, model.visual.input_resolution, model.visual.input_resolution, device=device)
    out = {}
    for path, enabled in [("math", False), ("sdpa", True)]:
        set_sdpa(model, enabled)
        with torch.no_grad():
            def run():
                with autocast():
                    return model.encode_image(images)
            out[path] = batch / timeit(run, repeats, device)
    return out


def bench_methods(model, C, autocast, device, repeats, batch=4):
    """Seconds per training step (forward + backward, frozen CLIP) of each method's trainable part on C classes."""
    names, tokens = class_names(C), class_prompts(C)
    R, E = model.visual.input_resolution, model.text_projection.shape[1]
    images, labels = torch.randn(batch, 3, R, R, device=device), torch.arange(batch, device=device) % C
    scale = model.logit_scale.exp().float()
    out, extra = {}, {}

    def encode():  # every step encodes its images, as online training does
        with torch.no_grad(), autocast():
            return model.encode_image(images).float()  # (B, E)

    def capt_module(argv):  # configured as `python capt.py *argv` would be
        _, (args,) = evaluation.plan(capt.parser, capt.configure, argv)
        module = capt.CaPT(model, names, "a photo of a {}.", capt.CaPTConfig.from_args(args)).to(device)
        module.set_classnames(model, names, autocast)
        return module

    # CaPT's image condition first, so that the peak-memory reading is its own: B x C prompts, chunked.
    if device == "cuda" or C * batch <= 400:
        module = capt_module(["--condition", "image"])
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb(device)
        step = lambda: capt.step_loss(module, model, encode(), labels, autocast)[0].backward()  # noqa: E731
        out["capt image (CoCoOp)"] = timeit(step, repeats, device)
        extra["image condition peak memory"] = f"+{peak_memory_mb(device) - before:.0f} MiB over the model " \
                                               f"(chunk {module.cfg.chunk})"

    learner = coop.PromptLearner(model, names).to(device)
    full = coop.PromptLearner(model, names).to(device)  # the same prompts run over all 77 positions
    with torch.no_grad():
        full.suffix = model.token_embedding(tokens.to(device))[:, 1 + full.n_ctx:].float()  # (C, 77-1-M, D)

    def coop_logits(pl):
        with torch.no_grad(), autocast():
            f = F.normalize(model.encode_image(images).float(), dim=-1)  # (B, E)
        return scale * f @ coop.text_features(model, pl, autocast).t()  # (B, C)
    out["coop (77 tokens)"] = timeit(lambda: F.cross_entropy(coop_logits(full), labels).backward(), repeats, device)
    out["coop"] = timeit(lambda: F.cross_entropy(coop_logits(learner), labels).backward(), repeats, device)
    cached = encode()  # --cache-views: the step reads stored features instead of running the image encoder
    out["coop (cached views)"] = timeit(lambda: F.cross_entropy(
        scale * F.normalize(cached, dim=-1) @ coop.text_features(model, learner, autocast).t(), labels).backward(),
        repeats, device)
    with torch.no_grad():
        extra["coop logits, 77 vs truncated, max |diff|"] = f"{(coop_logits(full) - coop_logits(learner)).abs().max():.1e}"
    for label, argv in [("capt none", ["--condition", "none"]), ("capt noise", ["--condition", "noise"]),
                        ("capt text (CaPT)", ["--condition", "text"]), ("decapt", ["--decapt"])]:
        module = capt_module(argv)
        out[label] = timeit(lambda: capt.step_loss(module, model, encode(), labels, autocast)[0].backward(),
                            repeats, device)
    _, (args,) = evaluation.plan(sempt.parser, sempt.configure, [])
    semantic = sempt.SemPT(model, names, sempt.SemPTConfig.from_args(args)).to(device)
    attributes = {c: F.normalize(torch.randn(5, E, device=device), dim=-1) for c in names}  # K = 5 attributes
    semantic.set_classnames(model, names, attributes, "a photo of a {}.")
    out["sempt"] = timeit(lambda: sempt.step_loss(semantic, model, encode(), labels, autocast)[0].backward(),
                          repeats, device)
    return out, extra


def bench_davpt(model, autocast, device, repeats, batch):
    """DA-VPT's training step (prompted forward + Proxy-Anchor losses) against plain VPT-deep (same prompts, CE only)."""
    net = davpt.DAVPT(model, 16, davpt.DAVPTConfig(num_guided=10, num_other=10)).to(device)
    R = model.visual.input_resolution
    images, y = torch.randn(batch, 3, R, R, device=device), torch.arange(batch, device=device) % 16
    mapping = torch.arange(16, device=device) % net.M_g

    def step(metric):
        with autocast():
            feats, ml = net(images, mapping[y] if metric else None)
        loss = F.cross_entropy(net.logits(feats), y)
        if metric:
            loss = loss + sum(t + c for t, c in ml)
        loss.backward()
    return timeit(lambda: step(False), repeats, device), timeit(lambda: step(True), repeats, device)


def bench_store(model, autocast, device, n_images):
    """Seconds of a first evaluation through the feature store (hash the weights, encode, write) and of a second (read)."""
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        items = []
        for i in range(n_images):  # JPEG files of ImageNet-like size, decoded and resized as in a real evaluation
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
            items.append(data.Item(str(path), i % 10, f"class {i % 10}"))
        transform = data.transform(model.visual.input_resolution, train=False)
        times = []
        for _ in range(2):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            evaluation.stored_image_features(model, items, transform, dataset="bench", part="test",
                                             store=Path(tmp) / "store", device=device, autocast=autocast)
            times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    args = parser.parse_args(argv)
    device = args.device
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = lambda: torch.autocast(device, dtype=dtype, enabled=precision != "fp32")  # noqa: E731
    classes = args.classes or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = args.repeats or (1 if args.quick else 5)
    backbones = ["ViT-B/16"] if args.quick or device == "cpu" else ["ViT-B/16", "ViT-L/14"]
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}), "
          f"precision {precision}, torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}")
    peak = device_peak_tflops(device)
    sections = args.sections.split(",")
    for name in backbones:
        torch.manual_seed(0)
        model = CLIP(*SIZES[name]).to(device).eval().requires_grad_(False)
        print(f"\n## {name} (random weights)\n")
        if "methods" in sections:
            print("one training step of each method (batch 4), ms; in brackets: relative to CoOp (truncated)\n")
            for C in classes:
                steps, extra = bench_methods(model, C, autocast, device, repeats)
                print(f"C = {C}: " + ", ".join(f"{k} {1e3 * v:.0f} ({v / steps['coop']:.2f}x)" for k, v in steps.items()))
                print("    " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
            batch = 8 if device == "cpu" else 32
            vpt, da = bench_davpt(model, autocast, device, repeats, batch)
            print(f"DA-VPT step, batch {batch}: VPT-deep {1e3 * vpt:.0f} ms, DA-VPT {1e3 * da:.0f} ms ({da / vpt:.2f}x)\n")
        if "text" in sections:
            print("| C | 77 tokens (ms) | truncated (ms) | T | speed-up | max |diff| | TFLOP/s (truncated) |")
            print("|---|---|---|---|---|---|---|")
        for C in classes if "text" in sections else []:
            row, diff = bench_text(model, C, autocast, device, repeats)
            (t_full, _), (t_trunc, T) = row["77 tokens"], row["truncated"]
            tflops = 3 * text_flops(model, T, C) / t_trunc / 1e12
            util = f" ({100 * tflops / peak:.0f}% of peak)" if peak else ""
            print(f"| {C} | {1e3 * t_full:.1f} | {1e3 * t_trunc:.1f} | {T} | {t_full / t_trunc:.2f}x | {diff:.1e} "
                  f"| {tflops:.2f}{util} |")
        if "store" in sections:
            n = 64 if device == "cpu" else 2048
            first, second = bench_store(model, autocast, device, n)
            print(f"\nfeature store, {n} test images: first evaluation {first:.2f} s, second {second:.3f} s "
                  f"({first / second:.0f}x faster)")
        if "image" in sections:
            batch = 8 if device == "cpu" else 256
            ips = bench_image(model, autocast, device, repeats, batch)
            print(f"\nimage encoder, batch {batch}: math {ips['math']:.1f} images/s, sdpa {ips['sdpa']:.1f} images/s")
        print(f"peak memory: {peak_memory_mb(device):.0f} MiB")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
