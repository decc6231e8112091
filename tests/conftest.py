"""Shared fixtures: a random tiny CLIP checkpoint and a 5-class folder dataset, built once per test session."""
import numpy as np
import pytest
import torch
from PIL import Image

from clip.model import CLIP

NAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple heart"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """root/clip.pt: a random CLIP (32 px, width 64); root/ds/{train,test}/<class>/: 3 and 2 noise images per class."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    torch.save(CLIP(32, 32, 1, 64, 16, 77, 49408, 64, 1, 1).state_dict(), root / "clip.pt")
    rng = np.random.default_rng(0)
    for split, n in [("train", 3), ("test", 2)]:
        for c in NAMES:
            (root / "ds" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "ds" / split / c / f"{i}.png")
    return root
