"""Training history in results.json (per-epoch loss, train accuracy, lr) and the plots of `eval.py runs --plot`.

Run: python -m pytest tests/test_plots.py
"""
import json
import re
import sys

import pytest

import coop
import eval as evaluation
import experiment


def test_history_holds_the_printed_epochs_and_survives_a_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["--epochs", "2", "--shots", "1", "--setting", "fewshot", "--out", str(out), "--device", "cpu", "--workers", "0"]
    results = coop.main(argv)
    printed = re.findall(r"epoch (\d)/2  loss ([\d.]+)  train acc ([\d.]+)", capsys.readouterr().out)
    rows = results["history"]
    assert [r["epoch"] for r in rows] == [1, 2] and len(printed) == 2
    assert all(f"{r['loss']:.4f}" == p[1] and f"{r['train_acc']:.1f}" == p[2] for r, p in zip(rows, printed))
    assert rows[0]["lr"] == 1e-5 and rows[1]["lr"] == pytest.approx(0.0035)  # Dassl's warmup, then cosine
    # A kill after epoch 1 that left a row of epoch 2 (history.json is written before train_state.pt): resume redoes
    # epoch 2 and replaces that row with the same numbers as the uninterrupted run.
    real = experiment.snapshot

    def killed_after_epoch_1(out, module, optimizer, epoch, meter=None, **extra):
        real(out, module, optimizer, epoch, meter=meter, **extra)
        if epoch == 0:
            raise RuntimeError("killed")
    cut = tmp_path / "cut"
    monkeypatch.setattr(experiment, "snapshot", killed_after_epoch_1)
    with pytest.raises(RuntimeError, match="killed"):
        coop.main(argv[:-5] + [str(cut), *argv[-4:]])
    monkeypatch.setattr(experiment, "snapshot", real)
    stale = json.loads((cut / "history.json").read_text()) + [{"epoch": 2, "loss": 99.0, "train_acc": 0, "lr": 1}]
    (cut / "history.json").write_text(json.dumps(stale))
    resumed = coop.main(argv[:-5] + [str(cut), *argv[-4:], "--resume"])
    assert resumed["history"] == rows
    fresh = coop.main(argv[:-5] + [str(cut), *argv[-4:], "--force", "--epochs", "0"])  # a fresh run: no old rows
    assert "history" not in fresh


def fake_results():
    """2 methods x shots 1/4/16 x 2 seeds (few-shot) and the same methods' base-to-new runs, as read_results gives."""
    rows = []
    for m, gain in [("coop", 0), ("capt", 3)]:
        for shots, acc in [(1, 60), (4, 70), (16, 80)]:
            for seed in (1, 2):
                rows.append({"method": m, "variant": "", "setting": "fewshot", "dataset": "world", "shots": shots,
                             "seed": seed, "acc": acc + gain + seed, "targets": {}})
        for seed in (1, 2):
            b, n = 80 + gain + seed, 60 + gain
            rows.append({"method": m, "variant": "", "setting": "base2new", "dataset": "world", "shots": 16,
                         "seed": seed, "base_acc": b, "new_acc": n, "H": 2 * b * n / (b + n), "targets": {}})
    return rows


def test_plots_are_written_as_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    paths = evaluation.plot_runs(fake_results(), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["base2new_world.png", "fewshot_world.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        evaluation.plot_runs(fake_results(), tmp_path / "plots")
    assert not (tmp_path / "plots").exists()
