"""world.py: deterministic renders, the dataset files in CoOp's split format, and a pretraining that learns.

The full pretraining (minutes) never runs here: 100 small steps on a small set show the loss falling.
Run: python -m pytest tests/test_world.py
"""
import json
from pathlib import Path

import numpy as np
import torch

import clip
import data
import world

ROOT = Path(__file__).resolve().parents[1]


def attrs(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(k, size=n) for k in (8, 8, 3, 2)]


def test_rendering_is_deterministic_per_seed():
    a = world.render(*attrs(16, 0), np.random.default_rng(5))
    b = world.render(*attrs(16, 0), np.random.default_rng(5))
    c = world.render(*attrs(16, 0), np.random.default_rng(6))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_colour_and_shape_are_visible():
    """The object's pixels carry its colour: the brightest-channel pattern of a red vs a blue object differs."""
    rng = np.random.default_rng(0)
    red = world.render(np.zeros(8, int), np.zeros(8, int), np.zeros(8, int), np.ones(8, int), rng, noise=0)
    blue = world.render(np.full(8, 2), np.zeros(8, int), np.zeros(8, int), np.ones(8, int), rng, noise=0)
    assert red[..., 0].mean() > red[..., 2].mean() and blue[..., 2].mean() > blue[..., 0].mean()
    circle = world.render(np.zeros(1, int), np.zeros(1, int), np.zeros(1, int), np.ones(1, int), rng, noise=0)
    bar = world.render(np.zeros(1, int), np.full(1, 7), np.zeros(1, int), np.ones(1, int), rng, noise=0)
    assert (circle[..., 0] > 150).sum() > 1.5 * (bar[..., 0] > 150).sum()  # a filled disc covers more than a bar


def test_dataset_files_in_coop_format(tmp_path):
    folder = world.prepare_dataset(tmp_path, train_per_class=3, test_per_class=2)
    split = json.loads((folder / "split_world.json").read_text())
    assert len(split["train"]) == 3 * len(world.CLASSNAMES) and len(split["test"]) == 2 * len(world.CLASSNAMES)
    path, label, name = split["train"][0]
    assert (folder / "images" / path).exists() and world.CLASSNAMES[label] == name
    s = data.prepare("world", tmp_path, shots=2, seed=1)  # plugs into data.py like any other dataset
    assert s.classnames == world.CLASSNAMES[:16] and s.tests["new"].classnames == world.CLASSNAMES[16:]
    assert {n.split()[1] for n in s.classnames}.isdisjoint({n.split()[1] for n in s.tests["new"].classnames})


def test_pretraining_loss_falls_and_checkpoint_loads(tmp_path):
    rng = np.random.default_rng(0)
    c, s, p, z = attrs(1024, 1)
    images = torch.from_numpy(world.render(c, s, p, z, rng))
    tokens = clip.tokenize([world.caption(*a, rng) for a in zip(c, s, p, z)])
    model, losses = world.pretrain(images, tokens, steps=100, seed=0, batch=64, lr=2e-3)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # chance is log(64) = 4.16
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded, preprocess = clip.load(str(tmp_path / "w.pt"))
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in loaded.state_dict()
    x = world.to_input(images[:4])
    assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)


def readme_row(label):
    """(base, new, H) of the README's world table row that starts with `label`."""
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith(label):
            return tuple(float(c) for c in cells[1:4])
    raise AssertionError(f"no README row {label!r}")


def test_the_shipped_world_teaches_coops_trade_off_with_the_readmes_numbers(tmp_path):
    """With the shipped CLIP, CoOp (3 seeds) gains on base and loses on new classes against zero-shot CLIP, and both
    rows are the README's numbers within half a point (they do not depend on the machine any more)."""
    import coop
    common = ["--root", str(tmp_path), "--seed", "1", "2", "3", "--device", "cpu", "--workers", "0"]
    means = {}
    for label, extra in [("zero-shot CLIP", ["--epochs", "0"]), ("CoOp (", [])]:
        runs = coop.main(common + ["--out", str(tmp_path / label[:4]), *extra])
        means[label] = tuple(np.mean([r[k] for r in runs]) for k in ("base_acc", "new_acc"))
        assert np.allclose(means[label], readme_row(label)[:2], atol=0.5), (label, means[label], readme_row(label))
    (zs_base, zs_new), (coop_base, coop_new) = means["zero-shot CLIP"], means["CoOp ("]
    assert coop_base > zs_base + 1 and coop_new < zs_new - 2
