"""A result belongs to the code that made it: a copied method file is a method of its own, and an edited one never
reuses the runs its old code made (harness/folders.py records the sha256 of the script and of every project module
its imports reach).

Each test runs method scripts as a user does (`python mycoop.py ...` in a folder of their own, runs/ under it) on
the tiny folder dataset. Run: python -m pytest tests/test_forks.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSS = "return F.cross_entropy(logits, labels), logits"
CHANGED = "return F.cross_entropy(logits, labels, label_smoothing=0.5), logits"


def run(script, tiny, cwd, *extra):
    """`python script` on the tiny dataset in cwd (runs go to cwd/runs), the project on the import path."""
    argv = [sys.executable, str(script), "--dataset", "folder", "--root", str(tiny / "ds"), "--backbone",
            str(tiny / "clip.pt"), "--shots", "2", "--epochs", "2", "--batch-size", "2", "--lr", "0.5", "--device",
            "cpu", "--workers", "0", "--store", "none", *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def results(cwd, method):
    (path,) = (cwd / "runs" / method).rglob("results.json")
    return json.loads(path.read_text())


def test_a_copied_method_with_another_loss_trains_and_reports_its_own_numbers(tiny, tmp_path):
    source = (ROOT / "coop.py").read_text()
    assert source.count(LOSS) == 1
    (tmp_path / "mycoop.py").write_text(source.replace(LOSS, CHANGED))
    original = run(ROOT / "coop.py", tiny, tmp_path)
    copy = run(tmp_path / "mycoop.py", tiny, tmp_path)
    assert original.returncode == 0 and copy.returncode == 0, original.stderr + copy.stderr
    assert "epoch 2/2" in copy.stdout and "reusing" not in copy.stdout  # it trained
    mine, theirs = results(tmp_path, "mycoop"), results(tmp_path, "coop")
    assert mine["method"] == "mycoop" and theirs["method"] == "coop"
    assert "mycoop.py" in "".join(mine["code"]) and mine["code"] != theirs["code"]
    loss = lambda out: [line.split("loss ")[1].split()[0] for line in out.splitlines() if line.startswith("epoch")]  # noqa: E731
    assert loss(copy.stdout) != loss(original.stdout)  # its own loss made its own training


def test_an_edited_method_does_not_reuse_the_run_its_old_code_made(tiny, tmp_path):
    script = tmp_path / "coop.py"
    script.write_text((ROOT / "coop.py").read_text())
    first = run(script, tiny, tmp_path)
    assert first.returncode == 0, first.stderr
    again = run(script, tiny, tmp_path)
    assert "reusing it" in again.stdout  # same code, same arguments: reused

    script.write_text(script.read_text().replace(LOSS, CHANGED))  # the user edits the loss
    edited = run(script, tiny, tmp_path)
    assert edited.returncode == 2 and "reusing" not in edited.stdout
    assert edited.stderr.startswith("error:") and "made by other code" in edited.stderr and "coop.py" in edited.stderr
    assert "--force" in edited.stderr and "--out" in edited.stderr  # what to do
    before = results(tmp_path, "coop")
    forced = run(script, tiny, tmp_path, "--force")
    assert forced.returncode == 0 and "epoch 2/2" in forced.stdout
    after = results(tmp_path, "coop")
    assert after["code"] != before["code"]


@pytest.mark.parametrize("module", ["data.py", "clip/model.py"])
def test_an_edited_shared_module_counts_as_other_code(tmp_path, module):
    """code_of follows the imports: a change in a module the script reaches changes the record."""
    from harness.folders import code_of
    (tmp_path / "m.py").write_text("import data\nimport clip\n")
    recorded = code_of(tmp_path / "m.py")
    assert module in recorded and "eval.py" not in recorded  # what it imports, not every file of the project
    assert "world.py" in recorded and "files.py" in recorded  # and what those import in turn
