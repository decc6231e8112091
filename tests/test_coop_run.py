"""coop.py: prompt construction against CLIP's own text path, frozen CLIP, and a whole run through main().

Run: python -m pytest tests/test_coop_run.py
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip
import coop
import eval as evaluation
from conftest import NAMES
import files
import experiment

ROOT = Path(__file__).resolve().parents[1]


def test_initial_prompts_equal_clips_own_text_features(tiny):
    """With context "a photo of a", the learned-prompt path must give exactly CLIP's features of the full text."""
    model, _ = clip.load(str(tiny / "clip.pt"))
    learner = coop.PromptLearner(model, NAMES, ctx_init="a photo of a")
    ours = coop.text_features(model, learner, lambda: torch.autocast("cpu", enabled=False))
    reference = F.normalize(model.encode_text(clip.tokenize([f"a photo of a {c}." for c in NAMES]), truncate=False), dim=-1)
    assert (ours - reference).abs().max() < 1e-5


def test_one_step_changes_only_the_context(tiny):
    model, _ = clip.load(str(tiny / "clip.pt"))
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = coop.PromptLearner(model, NAMES, ctx_init="", n_ctx=4)
    ctx0 = learner.ctx.detach().clone()
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    feats = F.normalize(model.encode_image(images), dim=-1)
    logits = 100 * feats @ coop.text_features(model, learner, lambda: torch.autocast("cpu", enabled=False)).t()
    F.cross_entropy(logits, labels).backward()
    opt.step()
    assert not torch.equal(learner.ctx, ctx0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_schedule_matches_dassl():
    lrs = [experiment.lr_at_epoch(e, 0.0035, 10, 1e-5) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.0035)
    assert lrs[-1] == pytest.approx(0.0035 * 0.5 * (1 + np.cos(np.pi * 8 / 10)))  # ~0.095 lr0 in the last epoch


@pytest.mark.parametrize("script", ["coop.py", "capt.py", "sempt.py", "davpt.py", "eval.py", "bench.py",
                                    "world.py", "descriptions/describe.py"])
def test_help(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout


def test_main_trains_then_eval_only_reproduces(tiny, tmp_path):
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "2", "--batch-size", "4", "--lr", "0.5", "--device", "cpu", "--workers", "0",
            "--out", str(tmp_path / "run")]
    trained = coop.main(argv)
    for f in ("args.json", "results.json", "train_files.json", "checkpoint.pt"):
        assert (tmp_path / "run" / f).exists()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state["trainable"]) == {"ctx"}  # trainable tensors only, never the frozen CLIP
    again = coop.main(argv + ["--eval-only"])
    assert (again["base_acc"], again["new_acc"]) == (trained["base_acc"], trained["new_acc"])
    assert trained["base_classnames"] == sorted(NAMES)[:3] and trained["new_classnames"] == sorted(NAMES)[3:]


def test_zero_shot_uses_each_datasets_own_template(tiny, tmp_path, monkeypatch):
    """coop.py --epochs 0 (the papers' zero-shot row) scores DTD with "{} texture.", not the learned prompt's init."""
    import data
    import eval as evaluation
    split = {"train": [[f"{c}/{i}.png", y, c] for y, c in enumerate(["banded", "dotted"]) for i in range(2)], "val": [],
             "test": [[f"{c}/t{i}.png", y, c] for y, c in enumerate(["banded", "dotted"]) for i in range(3)]}
    from conftest import write_images
    write_images([tmp_path / "dtd/images" / p for s in split.values() for p, _, _ in s])
    (tmp_path / "dtd/split_zhou_DescribableTextures.json").write_text(__import__("json").dumps(split))
    seen = []
    real = evaluation.accuracy
    monkeypatch.setattr(evaluation, "accuracy", lambda logits, labels: seen.append(logits) or real(logits, labels))
    coop.main(["--dataset", "dtd", "--root", str(tmp_path), "--backbone", str(tiny / "clip.pt"), "--epochs", "0",
               "--setting", "fewshot", "--shots", "1", "--device", "cpu", "--workers", "0", "--store", "none",
               "--out", str(tmp_path / "run")])
    model, _ = clip.load(str(tiny / "clip.pt"))
    weights = F.normalize(model.encode_text(clip.tokenize(["banded texture.", "dotted texture."])), dim=-1)
    test = data.prepare("dtd", tmp_path, shots=1, seed=1, setting="fewshot").tests["all"]
    images = torch.stack([test.transform(32)(__import__("PIL.Image").Image.open(p).convert("RGB")) for p, _, _ in test.items])
    assert torch.allclose(seen[0], F.normalize(model.encode_image(images), dim=-1) @ weights.t(), atol=1e-5)
