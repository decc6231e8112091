"""The papers' other settings (few-shot, cross-dataset, domain generalisation), resume, and multi-run commands.

Run: python -m pytest tests/test_settings.py
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
from conftest import make_clip

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def write_images(paths, seed=0):
    rng = np.random.default_rng(seed)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(p)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """CoOp's layouts of ImageNet (3 classes), ImageNet-A (2 of them, folders by WordNet id) and DTD (2 classes)."""
    root = tmp_path_factory.mktemp("bench")
    classnames = "".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES))
    write_images([root / "imagenet/images" / s / w / f"{i}.jpg" for s in ("train", "val") for w in WNIDS for i in range(3)])
    (root / "imagenet/classnames.txt").write_text(classnames)
    write_images([root / "imagenet-adversarial/imagenet-a" / w / f"{i}.jpg" for w in (WNIDS[2], WNIDS[0]) for i in range(2)], 1)
    (root / "imagenet-adversarial/classnames.txt").write_text(classnames)
    split = {"train": [[f"c{y}/{i}.jpg", y, n] for y, n in enumerate(["banded", "dotted"]) for i in range(3)],
             "val": [], "test": [[f"c{y}/t{i}.jpg", y, n] for y, n in enumerate(["banded", "dotted"]) for i in range(2)]}
    write_images([root / "dtd/images" / p for s in split.values() for p, _, _ in s], 2)
    (root / "dtd/split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def test_imagenet_a_and_r_map_to_imagenet_labels(layouts):
    assert data.imagenet_labels("imagenet_a", layouts) == [0, 2]  # folders sorted: n01440764 -> 0, n01484850 -> 2
    ds = data.load_dataset("imagenet_a", layouts)
    assert ds.classnames == ["tench", "great white shark"]


def common(tiny, out):
    return ["--backbone", str(tiny / "clip.pt"), "--shots", "2", "--epochs", "2", "--lr", "0.05", "--device", "cpu",
            "--workers", "0", "--out", str(out)]


@pytest.mark.parametrize("script", ["coop", "capt", "sempt", "davpt"])
def test_crossdataset_and_domain_generalisation_end_to_end(tiny, layouts, tmp_path, script):
    module = __import__(script)
    extra = {"sempt": ["--descriptions", str(tmp_path / "desc.json")], "davpt": ["--head", "text"]}.get(script, [])
    if script == "sempt":  # one description file for source and targets: imagenet names, dtd names
        names = NAMES + ["banded", "dotted"]
        (tmp_path / "desc.json").write_text(json.dumps({c: {"look": [f"{c}, which is a thing."]} for c in names}))
    r = module.main(["--setting", "crossdataset", "--dataset", "imagenet", "--root", str(layouts), "--targets", "dtd",
                     "imagenet_a", *common(tiny, tmp_path / "run"), *extra])
    assert r["setting"] == "crossdataset" and set(r["targets"]) == {"dtd", "imagenet_a"} and 0 <= r["acc"] <= 100
    table = evaluation.crossdataset_table(evaluation.read_results(tmp_path))
    assert "| dtd |" in table and "| imagenet_a |" in table and f"| {r['method']} ({r['variant']}) | imagenet" in table


@pytest.mark.parametrize("script", ["coop", "capt", "sempt", "davpt"])
def test_fewshot_setting_trains_and_tests_on_all_classes(tiny, tmp_path, script):
    module = __import__(script)
    extra = ["--descriptions", str(tiny / "desc.json")] if script == "sempt" else []
    if script == "sempt":
        (tiny / "desc.json").write_text(json.dumps({c: ["a thing."] for c in sorted(p.name for p in (tiny / "ds/train").iterdir())}))
    runs = module.main(["--setting", "fewshot", "--dataset", "folder", "--root", str(tiny / "ds"), "--seed", "1", "2",
                        *common(tiny, tmp_path / "runs"), *extra])
    assert len(runs) == 2 and all(r["setting"] == "fewshot" and 0 <= r["acc"] <= 100 for r in runs)
    assert "| folder 2-shot |" in evaluation.fewshot_table(evaluation.read_results(tmp_path / "runs"))


def test_finished_runs_are_skipped_and_redone_with_force(tiny, tmp_path, capsys):
    import coop
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--seed", "1", "2", *common(tiny, tmp_path / "runs")]
    first = coop.main(argv)
    done = tmp_path / f"runs/base2new/folder/shots2_seed1_{first[0]['variant']}/results.json"
    stamp = done.stat().st_mtime_ns
    again = coop.main(argv)
    assert "reusing it" in capsys.readouterr().out and done.stat().st_mtime_ns == stamp
    assert [r["base_acc"] for r in again] == [r["base_acc"] for r in first]
    coop.main(argv + ["--force"])
    assert done.stat().st_mtime_ns != stamp


def test_kill_and_resume_ends_exactly_as_an_uninterrupted_run(tmp_path):
    """A run killed in the middle of training, then resumed, ends with the same trainable tensors and results."""
    rng = np.random.default_rng(0)
    for c in ["red circle", "blue square", "green star", "white moon"]:
        for i in range(40):
            p = tmp_path / "ds" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(p)
    torch.save(make_clip(vision_layers=2, transformer_layers=2).state_dict(), tmp_path / "clip.pt")
    argv = ["capt.py", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--backbone", str(tmp_path / "clip.pt"),
            "--shots", "30", "--epochs", "6", "--batch-size", "2", "--device", "cpu", "--workers", "0"]
    subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "whole")], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, *argv, "--out", str(tmp_path / "cut")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "cut" / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:  # wait for the first epoch's snapshot, then kill mid-epoch
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= cut_at < 6 and not (tmp_path / "cut" / "results.json").exists()
    subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "cut"), "--resume"], cwd=ROOT, check=True,
                   capture_output=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["trainable"]
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["trainable"]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    assert (a["base_acc"], a["new_acc"]) == (b["base_acc"], b["new_acc"])


def test_each_capt_variant_has_its_own_default_run_folder(tiny, tmp_path, monkeypatch):
    """CaPT, DeCaPT and the conditions never skip each other's runs: the default folder is named after the method."""
    import capt
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "1", "--device", "cpu", "--workers", "0"]
    for extra, method in [([], "capt"), (["--decapt"], "decapt"), (["--condition", "noise"], "capt-noise")]:
        r = capt.main(argv + extra)
        assert r["method"] == method and "condition" not in r["variant"] and "decapt" not in r["variant"]
        assert (tmp_path / "runs" / method / "base2new" / "folder" / f"shots2_seed1_{r['variant']}" / "results.json").exists()


def test_val_on_imagenet_is_refused_because_its_val_folder_is_the_test_set(layouts):
    assert data.prepare("imagenet", layouts, shots=1, seed=1).tests["base"].items  # the val folder is scored as test
    with pytest.raises(data.InputError, match="--val: imagenet has no validation split"):
        data.prepare("imagenet", layouts, shots=1, seed=1, val=True)
