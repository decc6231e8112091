"""No stale or silently wrong results: run folders follow the arguments, bad values are refused at parse time, cheap
checks come before expensive ones, bad data is named before training, files land where they should, and the
teaching world is the one the README was measured with.

Run: python -m pytest tests/test_inputs.py
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import capt
import clip
import coop
import data
import davpt
import eval as evaluation
import sempt
import world
from conftest import write_images
import harness
import files
from harness import runs

ROOT = Path(__file__).resolve().parents[1]


def argv(tiny, out, *extra):
    """A one-epoch CoOp run on the tiny fixture into `out`."""
    return ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "1", "--device", "cpu", "--workers", "0", "--out", str(out), *extra]


def exits_2(main, args, capsys):
    """Run main(args), expect the one-line user error (exit status 2); returns what it printed to stderr."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


# 1. Run folders follow the arguments -----------------------------------------------------------------------------

def test_another_learning_rate_gets_its_own_folder_and_table_row(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = argv(tiny, "unused")[:-2]  # default run folders under ./runs
    first = coop.main(common)
    second = coop.main(common + ["--lr", "0.01"])
    assert second["variant"] == first["variant"] + "_lr=0.01" and second["wall_time"] != first["wall_time"]
    folders = sorted(p.parent.name for p in tmp_path.glob("runs/coop/base2new/folder/*/results.json"))
    assert len(folders) == 2 and folders[1].endswith("_lr=0.01")
    table = evaluation.base2new_table(evaluation.read_results(tmp_path / "runs"))
    assert len(re.findall(r"^\| coop \(.*\| folder 2-shot \|", table, re.M)) == 2  # two rows, not one mean


def test_values_equal_to_the_defaults_or_presets_change_nothing():
    name = lambda module, args: runs.plan(module.parser, module.configure, module.__file__, args)[1][0]  # noqa: E731
    plain, same, other = (name(capt, a) for a in (["--decapt"], ["--decapt", "--scale", "0.9", "--lr", "0.0035"],
                                                  ["--decapt", "--scale", "0.5"]))
    assert plain.out == same.out and plain.variant == "" and other.variant == "scale=0.5"
    linear, text = name(davpt, []), name(davpt, ["--head", "text"])  # the head names the method: two folders
    assert (linear.method, text.method) == ("davpt", "davpt-texthead") and linear.variant == text.variant == ""
    assert linear.out != text.out


def test_a_finished_run_with_other_arguments_is_never_reused(tiny, tmp_path, capsys):
    coop.main(argv(tiny, tmp_path / "run"))
    err = exits_2(coop.main, argv(tiny, tmp_path / "run", "--lr", "0.01"), capsys)
    assert "holds a finished run with other arguments (lr 0.0035 there, 0.01 now)" in err


def test_eval_only_with_other_arguments_refuses_and_keeps_the_results(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    coop.main(argv(tiny, out))
    before = (out / "results.json").read_bytes()
    err = exits_2(coop.main, argv(tiny, out, "--eval-only", "--ctx-init", "a"), capsys)
    assert "--eval-only" in err and "ctx_init 'a photo of a' there, 'a' now" in err
    assert (out / "results.json").read_bytes() == before
    coop.main(argv(tiny, out, "--eval-only"))  # with its own arguments it evaluates (and rewrites results.json)


def test_a_changed_shipped_clip_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(world, "SHIPPED_SHA256", "0" * 64)  # as if world_clip.pt had been changed
    err = exits_2(coop.main, ["--root", str(tmp_path), "--out", str(tmp_path / "run")], capsys)
    assert err.startswith("error:") and "world_clip.pt is missing or changed" in err and "Traceback" not in err


def test_resume_with_other_arguments_refuses(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    coop.main(argv(tiny, out, "--epochs", "2"))
    (out / "results.json").unlink()  # as if killed after the last snapshot
    err = exits_2(coop.main, argv(tiny, out, "--epochs", "3", "--lr", "0.1", "--resume"), capsys)
    assert "--resume" in err and "epochs 2 there, 3 now" in err and "lr 0.0035 there, 0.1 now" in err


# 2. Invalid values are refused at parse time, a diverging run writes no results ---------------------------------

@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--epochs", "-1"),
                                        ("--shots", "0"), ("--shots", "-3"), ("--batch-size", "0"),
                                        ("--workers", "-1"), ("--cache-views", "-2"), ("--n-ctx", "0")])
def test_invalid_values_exit_2_at_parse_time(flag, value, capsys):
    err = exits_2(coop.parser.parse_args, [flag, value], capsys)
    assert f"argument {flag}: expected" in err


@pytest.mark.parametrize("module,flag,value", [(capt, "--dropout", "1.5"), (capt, "--epsilon", "-0.1"),
                                               (sempt, "--tau", "0"), (davpt, "--num-guided", "-1"),
                                               (davpt, "--sigma", "nan")])
def test_method_flags_are_checked_too(module, flag, value, capsys):
    assert f"argument {flag}: expected" in exits_2(module.parser.parse_args, [flag, value], capsys)


def test_a_diverging_run_stops_with_an_error_and_writes_no_results(tiny, tmp_path, capsys):
    err = exits_2(coop.main, argv(tiny, tmp_path / "run", "--epochs", "3", "--lr", "1e30"), capsys)
    assert "diverged" in err and "lower --lr" in err and not (tmp_path / "run" / "results.json").exists()


# 3. Cheap checks before expensive ones ----------------------------------------------------------------------------

def test_a_missing_dataset_is_reported_before_any_model_is_loaded_and_leaves_no_run_folder(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(clip, "load", lambda *a, **k: pytest.fail("the model was loaded before the data was checked"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/coop").mkdir(parents=True)  # a folder that was there before stays
    err = exits_2(coop.main, ["--dataset", "dtd", "--root", str(tmp_path), "--device", "cpu"], capsys)
    assert err.startswith("error:") and "dtd" in err and "--download" in err
    assert [p.name for p in (tmp_path / "runs").rglob("*")] == ["coop"]
    assert "unknown dataset" in exits_2(coop.main, ["--dataset", "nosuch"], capsys)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_suggests_cpu(capsys):
    assert "use --device cpu" in exits_2(coop.main, ["--device", "cuda"], capsys)


# 4. Bad data: named before training, never silently changed -------------------------------------------------------

def test_corrupt_test_images_are_named_before_training(tiny, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny / "ds", tmp_path / "ds")
    (tmp_path / "ds/test/blue square/0.png").write_bytes(b"garbage")
    (tmp_path / "ds/test/red circle/1.png").write_bytes(b"")
    monkeypatch.setattr(coop, "train", lambda *a, **k: pytest.fail("training started before the images were checked"))
    args = argv(tiny, tmp_path / "run")
    args[args.index("--root") + 1] = str(tmp_path / "ds")
    err = exits_2(coop.main, args, capsys)
    assert "2 of the run's" in err and "blue square/0.png" in err and "red circle/1.png" in err


def test_a_16_bit_png_keeps_its_content(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    got = np.asarray(data.to_rgb(Image.open(tmp_path / "deep.png")))  # (64, 64, 3)
    assert np.abs(got[..., 0].astype(int) - np.round(ramp / 257)).max() <= 1  # scaled to 8 bits, not clipped to 255
    assert (got[..., 0] == got[..., 2]).all() and (got == 255).mean() < 0.01


def test_a_class_folder_without_images_is_refused(tmp_path):
    write_images([tmp_path / "ds" / c / f"{i}.png" for c in ("cat", "dog") for i in range(3)])
    (tmp_path / "ds" / "fish").mkdir()
    with pytest.raises(data.InputError, match=r"without images: \['fish'\]"):
        data.load_dataset("folder", tmp_path / "ds")


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    write_images([tmp_path / "big.png"], size=36)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 36 x 36 = 1296 pixels > 2 x 100: PIL refuses it on open
    with pytest.raises(data.InputError, match=r"big.png \(DecompressionBombError"):
        data.check_images([data.Item(str(tmp_path / "big.png"), 0, "x")])


def test_truncated_checkpoint_and_snapshot_are_named(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    coop.main(argv(tiny, out, "--epochs", "2"))
    for name, extra in [("checkpoint.pt", ["--epochs", "2", "--eval-only"]), ("train_state.pt", ["--epochs", "2", "--resume"])]:
        path = out / name
        path.write_bytes(path.read_bytes()[:100])
        (out / "results.json").unlink(missing_ok=True)
        err = exits_2(coop.main, argv(tiny, out, *extra), capsys)
        assert f"{path} is unreadable" in err and "\n" not in err.split("error:", 1)[1].strip()  # one line


def test_malformed_descriptions_are_named(tmp_path):
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(data.InputError, match="d.json is not valid JSON"):
        sempt.load_descriptions(tmp_path / "d.json", ["a"])


def test_tables_keep_shot_counts_apart_and_rows_without_a_groups_targets(tmp_path):
    """Base-to-new: a 4-shot run is not averaged into the 16-shot row. Cross-dataset: a source tested only on an
    ImageNet variant shows "–" as its cross-dataset average (no division by zero)."""
    for shots, base in [(16, 80.0), (4, 60.0)]:
        files.save_json(tmp_path / f"b{shots}/results.json", {"method": "coop", "dataset": "dtd", "seed": 1,
                                                                   "shots": shots, "base_acc": base, "new_acc": 50.0})
    for method, targets in [("coop", {"dtd": 40.0}), ("capt", {"imagenetv2": 60.0})]:
        files.save_json(tmp_path / f"x{method}/results.json", {
            "method": method, "setting": "crossdataset", "dataset": "imagenet", "seed": 1, "shots": 16, "acc": 70.0,
            "targets": targets})
    results = evaluation.read_results(tmp_path)
    table = evaluation.base2new_table(results)
    assert "| coop | dtd | 80.00 | 50.00 |" in table and "| coop | dtd 4-shot | 60.00 | 50.00 |" in table
    cross = evaluation.crossdataset_table(results)
    assert "| capt | imagenet 70.00 (1) | – | – |" in cross and "| coop | imagenet 70.00 (1) | 40.00 | 40.00 |" in cross


def test_tables_skip_a_corrupt_results_file_with_a_warning(tmp_path, capsys):
    files.save_json(tmp_path / "a/results.json", {"method": "coop", "dataset": "dtd", "seed": 1, "shots": 16,
                                                       "base_acc": 80.0, "new_acc": 60.0})
    (tmp_path / "b").mkdir()
    (tmp_path / "b/results.json").write_text("{")
    assert "| coop | dtd | 80.00 | 60.00 |" in evaluation.base2new_table(evaluation.read_results(tmp_path))
    assert f"skipping {tmp_path / 'b/results.json'}" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tiny, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "coop.py"), "--dataset", "dtd", "--root", str(tmp_path),
                          "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr

    def buggy(args):
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        harness.main(coop.parser, coop.configure, buggy, argv(tiny, tmp_path / "run"))


# 5. Where things are written --------------------------------------------------------------------------------------

def test_written_files_keep_the_users_umask(tiny, tmp_path):
    """A process started with umask 077 writes 0600 files (mkstemp's own mode would be 0600 under any umask, so the
    default 022 is checked in this process: 0644)."""
    coop.main(argv(tiny, tmp_path / "run"))
    repo = str(Path(__file__).resolve().parents[1])
    private = argv(tiny, tmp_path / "private")
    script = f"import os, sys; os.umask(0o077); sys.path.insert(0, {repo!r}); import coop; coop.main({private!r})"
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    for name in ("args.json", "results.json", "checkpoint.pt", "train_state.pt"):
        assert (tmp_path / "private" / name).stat().st_mode & 0o777 == 0o600, name
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~os.umask(os.umask(0o022)), name


def test_the_world_is_cached_beside_the_code_and_a_killed_render_is_cleaned_up(tmp_path):
    assert coop.parser.parse_args([]).root == str(ROOT / "data") == str(data.ROOT)
    stale = tmp_path / "world" / "images.tmp-999999999"  # no such process: a render that was killed
    stale.mkdir(parents=True)
    world.prepare_dataset(tmp_path, train_per_class=1, test_per_class=1)
    assert not stale.exists() and (tmp_path / "world" / "split_world.json").exists()


# 6. The first run ----------------------------------------------------------------------------------------------

def test_a_run_starts_with_a_few_lines_not_a_json_dump(tiny, tmp_path, capsys):
    coop.main(argv(tiny, tmp_path / "run"))
    head = capsys.readouterr().out.split("trainable:")[0]
    assert "{" not in head and len(head.strip().splitlines()) <= 4 and "lr 0.0035" in head


def test_the_shipped_world_clip_is_pinned_and_checked(tmp_path, monkeypatch):
    assert clip.clip.sha256(world.SHIPPED) == world.SHIPPED_SHA256
    model, _ = clip.load(str(world.SHIPPED))
    assert sum(p.numel() for p in model.parameters()) == 3_388_993  # the tiny CLIP world.py pretrains
    changed = tmp_path / "world_clip.pt"
    content = bytearray(world.SHIPPED.read_bytes())
    content[len(content) // 2] ^= 0xFF  # one byte of the weights flipped
    changed.write_bytes(bytes(content))
    monkeypatch.setattr(world, "SHIPPED", changed)
    with pytest.raises(data.InputError, match="git checkout"):
        world.shipped_clip()
