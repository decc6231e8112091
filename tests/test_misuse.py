"""A new user's mistakes, and two commands at once: each ends in one `error:` line (exit 2) before any work, or does
what the user meant (a '~' in a quoted path, '/x/' for '/x'); nothing already written is lost.

Run: python -m pytest tests/test_misuse.py
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import capt
import coop
import davpt
import eval as evaluation
import experiment
import files
import sempt
from conftest import NAMES, write_images
from test_inputs import argv, exits_2 as error_of  # the tiny one-epoch CoOp run, the exit-2 check
from harness import lock, runs

ROOT = Path(__file__).resolve().parents[1]


def plan(module, args):
    return runs.plan(module.parser, module.configure, module.__file__, args)[1][0]


# Two processes, one run folder ------------------------------------------------------------------------------------

def test_a_folder_in_use_by_a_live_process_is_refused_with_its_holder(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / lock.LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                    "since": "2026-12-07 10:00:00", "command": "coop.py --epochs 3"}))
        err = error_of(coop.main, argv(tiny, out), capsys)
        assert f"in use by process {sleeper.pid}" in err and "coop.py --epochs 3" in err
        assert sorted(p.name for p in out.iterdir()) == [lock.LOCK]  # nothing of the holder's touched
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process is gone: the lock is stale, taken over, and removed at the end
    result = coop.main(argv(tiny, out))
    assert result["H"] >= 0 and not (out / lock.LOCK).exists()


def test_two_commands_started_together_never_mix_their_files(tiny, tmp_path):
    """--epochs 3 and --epochs 1 on one --out, started together: one runs, the other is refused (or, if the first
    has finished by then, refused as a finished run with other arguments); what the folder holds is one run's."""
    out = tmp_path / "run"
    cmd = lambda epochs: [sys.executable, str(ROOT / "coop.py"), *argv(tiny, out)[:-4], "--epochs", str(epochs),  # noqa: E731
                          "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd(e), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in (3, 1)]
    done = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in done)
    assert codes == [0, 2], done
    refused = next(err for rc, err in done if rc == 2)
    assert "in use by process" in refused or "other arguments" in refused, refused
    recorded, results = (json.loads((out / f).read_text()) for f in ("args.json", "results.json"))
    assert results["args"]["epochs"] == recorded["epochs"] == len(results["history"])  # one run's epochs, rows


def test_results_are_reused_only_for_the_arguments_that_made_them(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    coop.main(argv(tiny, out))
    recorded = json.loads((out / "args.json").read_text())
    files.save_json(out / "args.json", recorded | {"epochs": 3})  # a second command's args.json, its run died
    err = error_of(coop.main, argv(tiny, out)[:-4] + ["--epochs", "3", "--out", str(out)], capsys)
    assert "other arguments" in err and "epochs 1 there, 3 now" in err


# Paths --------------------------------------------------------------------------------------------------------

def test_a_tilde_in_every_path_flag_means_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    one = plan(coop, ["--root=~/data", "--out=~/o", "--store", "~/s", "--epochs", "1"])
    assert (one.root, one.out, evaluation.store_dir(one)) == (str(tmp_path / "data"), str(tmp_path / "o"),
                                                              tmp_path / "s")
    assert plan(sempt, ["--descriptions=~/d.json"]).descriptions == str(tmp_path / "d.json")


def test_the_same_folder_written_two_ways_is_one_run(tmp_path):
    (tmp_path / "x").mkdir()
    roots = {plan(coop, ["--root", r]).root for r in (f"{tmp_path}/x/", f"{tmp_path}/x", f"{tmp_path}/x/../x")}
    assert roots == {str(tmp_path / "x")}


def test_run_folders_are_absolute_and_name_flag_and_value_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one = plan(coop, ["--lr", "0.01", "--n-ctx", "8", "--ctx-init", ""])
    assert one.out == str(tmp_path / "runs/coop/base2new/world/shots16_seed1_ctx-init=_lr=0.01_n-ctx=8")


@pytest.mark.parametrize("where", ["below a file", "a file", "store below a file"])
def test_an_out_or_store_that_cannot_be_a_folder_is_refused_before_anything_runs(tiny, tmp_path, capsys, where):
    blocker = tmp_path / "f"
    blocker.write_text("mine")
    flags = {"below a file": ["--out", str(blocker / "run")], "a file": ["--out", str(blocker)],
             "store below a file": ["--out", str(tmp_path / "run"), "--store", str(blocker / "s")]}[where]
    err = error_of(coop.main, argv(tiny, "unused")[:-2] + flags, capsys)
    assert "error: --" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_root_that_is_a_file_is_called_a_file(tiny, tmp_path, capsys):
    (tmp_path / "images.zip").write_text("zip")
    err = error_of(coop.main, argv(tiny, tmp_path / "run")[:2] + ["--root", str(tmp_path / "images.zip")]
                   + argv(tiny, tmp_path / "run")[4:], capsys)
    assert "images.zip is a file, not a folder" in err and "not found" not in err


# Values ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-5", "99999999999999999999", "1.5"])
def test_seeds_outside_0_to_2_32_are_refused(seed, capsys):
    err = error_of(coop.main, ["--seed", seed], capsys)
    assert "--seed" in err and "a seed in [0, 4294967295]" in err


def test_fp16_training_is_refused_fp16_scoring_is_not(capsys):
    err = error_of(coop.main, ["--precision", "fp16"], capsys)
    assert "loss scaling" in err and "bf16" in err
    assert plan(coop, ["--precision", "fp16", "--eval-only"]).precision == "fp16"


# Data ----------------------------------------------------------------------------------------------------------

def _folder(root, classes, per_class=3):
    write_images([root / c / f"{i}.png" for c in classes for i in range(per_class)])
    return root


def test_hidden_folders_are_named_when_skipped(tiny, tmp_path, capsys):
    root = _folder(tmp_path / "ds", NAMES[:2] + [".hidden"])
    result = coop.main(argv(tiny, tmp_path / "run")[:2] + ["--root", str(root)] + argv(tiny, "x")[4:-2]
                       + ["--out", str(tmp_path / "run"), "--shots", "1"])
    assert "skipping folders whose names start with '.' (not classes): ['.hidden']" in capsys.readouterr().out
    assert result["base_acc"] >= 0


def test_one_class_in_base_to_new_is_refused_before_training(tiny, tmp_path, capsys):
    root = _folder(tmp_path / "ds", NAMES[:1])
    err = error_of(coop.main, argv(tiny, tmp_path / "run")[:2] + ["--root", str(root)] + argv(tiny, "x")[4:-2]
                   + ["--out", str(tmp_path / "run"), "--shots", "1"], capsys)
    assert "1 class" in err and "--setting fewshot" in err
    assert "epoch 1/1" not in capsys.readouterr().out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [coop, capt, sempt])
def test_a_class_name_too_long_for_77_tokens_is_named_before_training(module, tiny, tmp_path, capsys):
    long = " ".join(["x"] * 80)  # 80 tokens in 159 characters (a folder name holds 255)
    root = _folder(tmp_path / "ds", [NAMES[0], long])
    extra = ["--descriptions", str(tmp_path / "d.json")] if module is sempt else []
    if module is sempt:  # descriptions of both classes, so that the prompt check is what stops it
        files.save_json(tmp_path / "d.json", {c: ["a thing."] for c in (NAMES[0], long)})
    err = error_of(module.main, ["--dataset", "folder", "--root", str(root), "--backbone", str(tiny / "clip.pt"),
                                 "--shots", "1", "--epochs", "1", "--device", "cpu", "--workers", "0",
                                 "--setting", "fewshot", "--out", str(tmp_path / "run"), *extra], capsys)
    assert "class 'x x x" in err and "is 87 tokens long, CLIP reads 77 at most" in err and "truncate" not in err


def test_davpts_text_head_checks_its_prompts_too(tiny, tmp_path, capsys):
    root = _folder(tmp_path / "ds", [NAMES[0], " ".join(["x"] * 80)])
    err = error_of(davpt.main, ["--dataset", "folder", "--root", str(root), "--backbone", str(tiny / "clip.pt"),
                                "--shots", "1", "--epochs", "1", "--device", "cpu", "--workers", "0", "--head", "text",
                                "--setting", "fewshot", "--num-guided", "1", "--out", str(tmp_path / "run")], capsys)
    assert "tokens long, CLIP reads 77 at most" in err


# The command line ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", [coop, capt, sempt, davpt])
def test_help_shows_every_default(module):
    text = module.parser.format_help().split("options:", 1)[1]  # the flags' help, after the usage
    for action in module.parser._actions:
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            flag = action.option_strings[-1]
            block = text.split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
            assert "(default:" in " ".join(block.split()), f"{module.__name__} {flag}"
    assert "in the current directory" in " ".join(text.split())


def test_help_of_n_ctx_shows_4_beside_the_papers_16():
    assert "(CoOp paper: 16) (default: 4)" in " ".join(coop.parser.format_help().split())


def test_progress_bars_only_on_a_terminal_and_never_under_tqdm_disable(monkeypatch):
    assert files.progress(range(3), "x").disable  # pytest's stderr is no terminal: no bar in a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not files.progress(range(3), "x").disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert files.progress(range(3000), "checking images", disable=False).disable  # data.check_images's bar


def test_ctrl_c_says_that_resume_continues(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "coop.py"), *argv(tiny, out)[:-4], "--epochs", "200", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("epoch 2/200"):
            break
    p.send_signal(signal.SIGINT)
    p.stdout.read()
    rc, err = p.wait(timeout=60), p.stderr.read()
    assert rc == 130 and "Traceback" not in err and "--resume continues it" in err and str(out) in err
    assert (out / "train_state.pt").exists() and not (out / lock.LOCK).exists()
    result = coop.main(argv(tiny, out)[:-4] + ["--epochs", "200", "--out", str(out), "--resume"])
    assert result["H"] >= 0


def test_the_run_folder_is_printed_absolute(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    coop.main(argv(tiny, "unused")[:-2])
    printed = capsys.readouterr().out
    assert f"-> {tmp_path}/runs/coop/base2new/folder/" in printed and f"({tmp_path}/runs/coop/" in printed


def test_experiment_check_prompts_counts_like_clip():
    """The count the error gives is CLIP's: <start> + BPE tokens + <end> (a name of 75 'a's is 77 tokens with
    "a." style prompts: 'a' x 75 is 75 tokens, '.' one, plus 2)."""
    class Split:  # noqa: D401  (the two fields check_prompts reads)
        classnames, template, tests = [" ".join(["a"] * 74)], "{}.", {}
    experiment.check_prompts(Split())  # 74 + '.' + 2 = 77: fits
    Split.classnames = [" ".join(["a"] * 75)]
    with pytest.raises(files.InputError, match="is 78 tokens long"):
        experiment.check_prompts(Split())


# A trained run scored on other test sets (issue 24) ---------------------------------------------------------------

def test_eval_only_scores_a_trained_run_on_another_dataset_into_a_file_of_its_own(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    trained = coop.main(argv(tiny, run, "--lr", "0.01"))
    other = _folder(tmp_path / "other", ["orange moon", "white cross", "cyan ring"], per_class=4)
    before = (run / "results.json").read_text()
    scored = coop.main(["--eval-only", "--out", str(run), "--dataset", "folder", "--root", str(other),
                        "--setting", "fewshot", "--device", "cpu", "--workers", "0"])
    printed = capsys.readouterr().out
    assert "scored with its own arguments" in printed and "lr 0.01 there, 0.0035 now" in printed
    written = sorted(p.name for p in run.glob("results_*.json"))
    assert len(written) == 1 and written[0].startswith("results_fewshot_folder_")
    saved = json.loads((run / written[0]).read_text())
    assert saved["acc"] == scored["acc"] and saved["trained"]["root"] == str(tiny / "ds") and saved["shots"] == 2
    assert saved["args"]["lr"] == 0.01 and (run / "results.json").read_text() == before  # the run's own results stay
    test = evaluation.read_results(tmp_path)  # the tables read the run's results.json only
    assert [r["acc"] if "acc" in r else r["H"] for r in test] == [trained["H"]]
    again = coop.main(["--eval-only", "--out", str(run), "--device", "cpu", "--workers", "0", "--lr", "0.01",
                       *argv(tiny, run)[:-4]])  # the plain --eval-only still scores where it was trained
    assert again["H"] == trained["H"]


def test_davpts_linear_head_is_not_scored_on_other_classes(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    davpt.main(["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
                "--epochs", "1", "--device", "cpu", "--workers", "0", "--setting", "fewshot", "--num-guided", "2",
                "--out", str(run)])
    other = _folder(tmp_path / "other", ["orange moon", "white cross"], per_class=3)
    err = error_of(davpt.main, ["--eval-only", "--out", str(run), "--dataset", "folder", "--root", str(other),
                                "--setting", "fewshot", "--device", "cpu"], capsys)
    assert "only the classes it was trained on" in err and (run / "results.json").exists()
