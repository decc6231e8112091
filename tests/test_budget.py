"""The repo's structural promises: a line budget for every module, a method-agnostic clip/, no method importing
another, and shared code that knows no method.

Budgets are the sizes the layout reached (a little slack): a module that outgrows its budget is taking on work
that belongs elsewhere. Run: python -m pytest tests/test_budget.py
"""
import re
from pathlib import Path

import pytest

import experiment

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["coop.py", "capt.py", "sempt.py", "davpt.py", "lpclip.py"]
# davpt.py also carries the table of DA-VPT's 21 released configs, capt.py the released CoCoOp that its condition
# study compares with; data.py CoOp's split sizes and what --download checks before it places a split file.
BUDGET = {
    "coop.py": 190, "capt.py": 430, "sempt.py": 375, "davpt.py": 520, "lpclip.py": 130,  # methods
    "files.py": 85, "papers.py": 95, "world.py": 255, "data.py": 665, "eval.py": 520, "experiment.py": 330,  # shared
    "harness/__init__.py": 15, "harness/runs.py": 100, "harness/folders.py": 240, "harness/lock.py": 80, "harness/torchrun.py": 220,
    "harness/speed.py": 95,  # plumbing a method reader skips
    "bench.py": 545, "descriptions/describe.py": 230,  # tools
}
SHARED = ["files.py", "world.py", "data.py", "eval.py", "experiment.py", *(f"harness/{p.name}" for p in
                                                                          sorted((ROOT / "harness").glob("*.py")))]


def lines(path):
    return len(path.read_text().splitlines())


def test_clip_package_stays_small():
    total = sum(lines(p) for p in (ROOT / "clip").glob("*.py"))
    # 500 for the ViT CLIP; the ResNet image encoders (resnet.py, CoOp's RN50/RN101 tables) add 100
    assert total <= 610, f"clip/ has {total} lines; its budget is 610 (a package you read in one sitting)"


def test_every_module_has_a_budget():
    modules = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *ROOT.glob("harness/*.py"),
                                                  *ROOT.glob("descriptions/*.py")]}
    assert modules == set(BUDGET), f"without a budget: {sorted(modules - set(BUDGET))}; gone: {sorted(set(BUDGET) - modules)}"


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_module_budget(name):
    path = ROOT / name
    assert lines(path) <= BUDGET[name], f"{name} has {lines(path)} lines; its budget is {BUDGET[name]}"


def test_clip_is_method_agnostic():
    for path in (ROOT / "clip").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\.cuda\(\)|\.half\(\)", text), f"{path.name}: device/precision belong to the caller"
        assert not re.search(r"MultiheadAttention\(|multi_head_attention_forward\(", text), f"{path.name}: attention is hand-written"
        for method in ("coop", "capt", "sempt", "davpt", "cocoop", "kgcoop"):
            assert not re.search(rf"\b{method}\b", text, re.IGNORECASE), f"{path.name} mentions {method}"


def method_flags():
    """The dest names of the flags only a method script adds (its own; the shared parser's are left out)."""
    shared = {a.dest for a in experiment.add_frozen_feature_flags(
        experiment.parser("", epochs=1, batch_size=1, lr=1, recipe="")).__dict__["_actions"]}
    own = set()
    for method in METHODS:
        own |= {f.replace("-", "_") for f in re.findall(r'add_argument\("--([\w-]+)"', (ROOT / method).read_text())}
    return own - shared, shared


@pytest.mark.parametrize("name", SHARED)
def test_shared_code_reads_no_method_flag(name):
    """Shared code never reads a method's own flag off the arguments (args.chunk, getattr(one, "head")): what is
    special about a method is declared in its own file (its flags, parser.neutral) or passed by it."""
    own, _ = method_flags()
    text = (ROOT / name).read_text()
    read = set(re.findall(r"\b(?:args|one|jobs\[i\])\.(\w+)", text))
    read |= set(re.findall(r'getattr\(\w+, "(\w+)"', text))
    assert not read & own, f"{name} reads method flags {sorted(read & own)}"


def test_the_shared_neutral_flags_are_shared_flags():
    """The flags that cannot change a number, as the shared parser declares them, are its own flags only."""
    _, shared = method_flags()
    p = experiment.add_frozen_feature_flags(experiment.parser("", epochs=1, batch_size=1, lr=1, recipe=""))
    assert p.neutral <= shared, sorted(p.neutral - shared)


@pytest.mark.parametrize("name", METHODS)
def test_methods_do_not_import_each_other(name):
    path = ROOT / name
    others = [m[:-3] for m in METHODS if m != name]
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(?:from|import)\s+(\w+)", line)
        assert not (m and m.group(1) in others), f"{name} imports {m.group(1)}: copy the code instead"
