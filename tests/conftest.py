"""Shared fixtures: one way to build a tiny random CLIP (named sizes), a checkpoint of it, and a 5-class folder dataset.

`make_clip(**changes)` is the only place a test builds a CLIP; `tiny` is a session folder with clip.pt (that CLIP,
as an OpenAI-layout state dict) and ds/{train,test}/<class>/ (3 and 2 noise images per class).
"""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.model import CLIP

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple heart"]
# A tiny OpenAI-architecture CLIP: 32x32 images in 16x16 patches, 64-wide towers, 1 layer each, 32-d joint space.
SIZES = dict(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
             context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)


def make_clip(seed=0, **changes):
    """A random CLIP of SIZES with `changes` applied (e.g. vision_layers=3, vision_patch_size=8), in eval mode."""
    torch.manual_seed(seed)
    return CLIP(**(SIZES | changes)).eval()


def write_images(paths, seed=0, size=36):
    """Random RGB noise PNG/JPEG files at `paths` (folders created)."""
    rng = np.random.default_rng(seed)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """root/clip.pt: make_clip()'s weights; root/ds/{train,test}/<class>/: 3 and 2 noise images per class."""
    root = tmp_path_factory.mktemp("tiny")
    torch.save(make_clip().state_dict(), root / "clip.pt")
    write_images([root / "ds" / split / c / f"{i}.png" for split, n in [("train", 3), ("test", 2)] for c in NAMES
                  for i in range(n)])
    return root


def _written_in_checkout():
    """Files in the checkout that git does not track: untracked ones and everything below runs/ (ignored)."""
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True).stdout.split()
    return set(listed) | {str(p.relative_to(ROOT)) for p in (ROOT / "runs").rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write into tmp folders only: a test that leaves a file in the checkout (a run folder under runs/, say)
    fails the session here."""
    before = _written_in_checkout()
    yield
    new = sorted(_written_in_checkout() - before)
    assert not new, f"tests wrote into the checkout: {new[:10]}"
