"""torchrun spreads a command's runs over its processes: each run is done once, by the rank it was given; the table
equals a single process's; after a rank is killed the same command again does only the missing runs; a rank with
bad input names the runs it did not finish while the others finish theirs; test features encoded in shards by two
ranks equal a single process's, bit for bit.

Run: python -m pytest tests/test_torchrun.py   (launches `python -m torch.distributed.run --nproc_per_node 2`
on the CPU, gloo; about 40 s on 2 cores)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import coop
import eval as evaluation
from harness import torchrun as spreading
from harness import runs

ROOT = Path(__file__).resolve().parents[1]
WORLD_CLIP = str(ROOT / "world_clip.pt")


def command(tmp, out="spread", store="store", *extra):
    """Four world runs (seeds 1-4, 2 short epochs) rendered fresh under tmp/data."""
    return ["--seed", "1", "2", "3", "4", "--root", str(tmp / "data"), "--out", str(tmp / out), "--store",
            str(tmp / store), "--device", "cpu", "--workers", "0", "--epochs", "2", "--shots", "4", *extra]


def torchrun(argv):
    """`torchrun --standalone --nproc_per_node 2 coop.py argv` (a free port: other launches may run beside it)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "coop.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(parent, rank):
    """The pid of torchrun's worker process whose RANK is `rank` (read from /proc: Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def finished(out):
    """{run folder name: results.json} of every finished run below out."""
    return {p.parent.name: json.loads(p.read_text()) for p in Path(out).rglob("results.json")}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_spreads_the_runs_and_after_a_kill_the_same_command_does_only_the_missing_ones(tmp_path):
    argv = command(tmp_path, "spread", "store", "--resume")  # a killed run continues from its last epoch's snapshot
    jobs = runs.plan(coop.parser, coop.configure, coop.__file__, argv)[1]
    names = [Path(one.out).name for one in jobs]
    given = dict(zip(names, spreading.assign([spreading.expected_cost(one) for one in jobs], 2)))
    assert sorted(given.values()) == [0, 0, 1, 1]  # equal costs: two runs each

    # 1. Two ranks; rank 1 is killed as soon as its first run is finished (torchrun then stops rank 0).
    first = torchrun(argv)
    deadline = time.time() + 180
    while not any(r.get("rank") == 1 for r in finished(tmp_path / "spread").values()):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.02)
    os.kill(rank_pid(first.pid, 1), signal.SIGKILL)
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode != 0
    before = finished(tmp_path / "spread")
    assert 1 <= len(before) < 4 and all(r["rank"] == given[n] and r["world_size"] == 2 for n, r in before.items())
    for n in names:  # what rank 0 had left when torchrun stopped it, it names
        if n not in before and given[n] == 0:
            assert "rank 0 did not finish" in err1 and n in err1.split("rank 0 did not finish")[1]
    assert "test features, shard 2/2" in out1  # the test sets were encoded by both ranks
    assert not list((tmp_path / "data" / "world").glob("images.tmp-*"))  # the world was rendered once, whole
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (tmp_path / "spread").rglob("results.json")}

    # 2. The same command again: only the missing runs, spread over both ranks by the same rule.
    missing = [one for one in jobs if Path(one.out).name not in before]
    given_again = dict(zip([Path(one.out).name for one in missing],
                           spreading.assign([spreading.expected_cost(one) for one in missing], 2)))
    second = torchrun(argv)
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, err2[-3000:]
    after = finished(tmp_path / "spread")
    assert sorted(after) == sorted(names)
    assert all(p.stat().st_mtime_ns == stamps[p.parent.name] for p in (tmp_path / "spread").rglob("results.json")
               if p.parent.name in stamps)  # finished runs were not touched
    assert all(after[n]["rank"] == r for n, r in given_again.items())
    assert all((out1 + out2).count(f"{n})") == 1 for n in names)  # one summary line per run over both commands

    # 3. The table, printed once by rank 0, equals a single process's on the same seeds (without --resume).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun gives each rank: a second thread only slows a busy 2-core machine down
    try:
        single = coop.main(command(tmp_path, "single", "single-store"))
    finally:
        torch.set_num_threads(threads)
    spread = [after[Path(one.out).name] for one in jobs]
    assert [(r["base_acc"], r["new_acc"]) for r in spread] == [(r["base_acc"], r["new_acc"]) for r in single]
    assert out2.count("| Method |") == 1 and evaluation.base2new_table(evaluation.read_results(tmp_path / "single")) in out2

    # 4. The test features two ranks encoded in shards (first command) equal the single process's, bit for bit.
    sharded, alone = (sorted((tmp_path / s).glob("*.pt")) for s in ("store", "single-store"))
    assert len(sharded) == 2 and [p.name for p in sharded] == [p.name for p in alone]  # base and new: same keys
    for a, b in zip(sharded, alone):
        a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["labels"], b["labels"])


def test_a_rank_with_bad_input_names_its_unfinished_run_and_the_other_rank_finishes(tmp_path):
    argv = ["--dataset", "world", "dtd", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
            "--backbone", WORLD_CLIP, "--device", "cpu", "--workers", "0", "--epochs", "0"]  # no dtd under --root
    jobs = runs.plan(coop.parser, coop.configure, coop.__file__, argv)[1]
    assert spreading.assign([spreading.expected_cost(one) for one in jobs], 2) == [1, 0]  # dtd costs more
    proc = torchrun(argv)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: rank 0:" in err and "dtd" in err and f"rank 0 did not finish: {jobs[1].out}" in err
    assert f"1 of 2 runs are not finished ({jobs[1].out})" in err
    assert finished(tmp_path / "runs")[Path(jobs[0].out).name]["rank"] == 1  # the world run was done all the same


def test_runs_are_assigned_by_expected_cost_not_by_count():
    jobs = runs.plan(coop.parser, coop.configure, coop.__file__, ["--dataset", "imagenet", "eurosat", "dtd", "--seed", "1", "2"])[1]
    costs = [spreading.expected_cost(one) for one in jobs]  # imagenet 1, 2, eurosat 1, 2, dtd 1, 2
    assert costs[0] == costs[1] > 10 * max(costs[2:])  # 500 base classes x 16 shots x 10 epochs + 50,000 test images
    assert spreading.assign(costs, 3) == [0, 1, 2, 2, 2, 2]  # the two ImageNet runs alone weigh more than the rest
    assert spreading.assign([1, 1, 1, 1], 2) == [0, 1, 0, 1]
    zero_shot = runs.plan(coop.parser, coop.configure, coop.__file__, ["--dataset", "dtd", "--epochs", "0"])[1][0]
    assert spreading.expected_cost(zero_shot) == 1692  # nothing trained: its test images


def test_resume_continues_only_unfinished_runs(tiny, tmp_path, capsys):
    """--resume (the same command again after a kill) reuses a finished run instead of evaluating it again."""
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "1", "--device", "cpu", "--workers", "0", "--seed", "1", "2", "--out", str(tmp_path)]
    first = coop.main(argv)
    done = [Path(r) for r in sorted(map(str, tmp_path.rglob("results.json")))]
    stamps = [p.stat().st_mtime_ns for p in done]
    done[1].unlink()  # seed 2 was killed before it finished
    again = coop.main(argv + ["--resume"])
    assert "reusing it" in capsys.readouterr().out and done[0].stat().st_mtime_ns == stamps[0] and done[1].exists()
    assert again[0] == first[0] and again[1]["base_acc"] == first[1]["base_acc"]
