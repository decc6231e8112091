"""One run's folder: its flags resolved, its name, the code that made it, whether a finished run can be reused, and
what it records (args.json, results.json).

A run is reused only when its folder holds results.json made with the same arguments (those that can change a
number) by the same code: the sha256 of the method script and of every project module its imports reach. Anything
else in the folder is an error that says what differs and what to do, never silently reused or overwritten.
"""
import argparse
import ast
import hashlib
import os
import re
import time
from pathlib import Path

import experiment
import files
from harness.lock import in_use

IN_PATH = {"method", "setting", "dataset", "shots", "seed"}  # runs/<method>/<setting>/<dataset>/shots<k>_seed<s>
# --root is left out of folder names (every real run sets it); a finished run under another --root is still not reused.
# variant is derived from the other flags; code is compared on its own (see `reusable`). The split files' sha256
# (split_sha256, target_split_sha256) are compared as arguments: a run on other split files is not reused.
DERIVED = {"variant", "code"}


def resolve(parser, configure, args, dataset, seed, script):
    """One run's flags: the method's name (the script's file name unless configure says otherwise) and presets
    (configure), then the recipe, then the backbone 'auto' resolved."""
    one = argparse.Namespace(**vars(args) | {"dataset": dataset, "seed": seed, "method": Path(script).stem})
    try:
        configure(one)
    except ValueError as e:
        parser.error(str(e))
    experiment.fill(one, one.recipe)
    del one.recipe
    if one.backbone == "auto":
        one.backbone = experiment.default_backbone(dataset)
    return one


def variant(parser, configure, args, one, script):
    """What a run changes from its method's defaults, e.g. "lr0.01_n-ctx16" ("" for none).

    A flag counts when the user gave it and its value differs from what the same command without it resolves to;
    flags that name the method (capt's --condition, davpt's --head) are in <method> already, presets are no change.
    """
    unnamed = parser.neutral | IN_PATH | DERIVED | {"root"}
    defaults = parser.parse_args([])
    given = [k for k, v in vars(args).items() if k not in unnamed and v != getattr(defaults, k, v)]
    reset = lambda keys: argparse.Namespace(**vars(args) | {k: getattr(defaults, k) for k in keys})  # noqa: E731
    again = lambda keys: resolve(parser, configure, reset(keys), one.dataset, one.seed, script)  # noqa: E731
    tuning = [k for k in given if again([k]).method == one.method]
    reference = again(tuning)
    changed = [k for k in sorted(tuning) if getattr(one, k) != getattr(reference, k)]
    return "_".join(k.replace("_", "-") + "=" + _short(getattr(one, k)) for k in changed)


def _short(value):
    """A flag value as part of a folder name: lists joined by '+', a file by its name (and a hash of its path)."""
    if isinstance(value, str) and Path(value).expanduser().is_file():
        value = f"{Path(value).name}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    text = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")
    return text if len(text) <= 40 else f"{text[:24]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------------------------
# The code that makes a run.

def code_of(script):
    """{file: sha256} of the script and of every project module its imports reach (import statements, followed
    through the modules they name): a copied or edited method file, or an edited shared module, is other code.
    Files inside the project are named relative to it. Editing a comment counts as a change: the rule stays simple."""
    found, todo = {}, [Path(script).resolve()]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        source = path.read_bytes()
        found[path] = hashlib.sha256(source).hexdigest()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                targets = [(0, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = [node.module] if node.module else []
                targets = [(node.level, ".".join(base + [a.name])) for a in node.names] + [(node.level, m) for m in base]
            else:
                continue
            for level, name in targets:
                todo += _module_files(name, path.parents[level - 1] if level else None, Path(script).resolve().parent)
    name = lambda p: str(p.relative_to(files.HERE)) if p.is_relative_to(files.HERE) else str(p)  # noqa: E731
    return {name(p): h for p, h in sorted(found.items())}


def _module_files(dotted, package, script_dir):
    """The project's files that `import dotted` runs: each package's __init__.py on the way and the module itself
    (relative imports from `package`; absolute ones from the script's folder or the project). Others: none."""
    out = []
    for root in [package] if package else [script_dir, files.HERE]:
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            stem = root.joinpath(*parts[:i])
            out += [f for f in (stem.with_suffix(".py"), stem / "__init__.py") if f.is_file()]
        if out:
            return out
    return out


def changed_code(recorded, now):
    """'coop.py, data.py' (the files whose code differs), '' when the code is the same."""
    if recorded is None:
        return "its code was not recorded (a run of an older nanoprompt)"
    return ", ".join(sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f)))


# ---------------------------------------------------------------------------------------------------------------
# Reuse, refusal and records.

def differences(recorded, args, neutral):
    """{flag: (recorded, now)} for the flags that can change a run's numbers."""
    now = vars(args)
    keys = set(recorded) & set(now) - neutral - DERIVED
    return {k: (recorded[k], now[k]) for k in sorted(keys) if recorded[k] != now[k]}


def writable(path, flag):
    """Raise InputError unless `path` is a folder that exists or can be made (no file in its way), and writable."""
    path = Path(path)
    above = next(p for p in [path, *path.parents] if p.exists())
    if not above.is_dir():
        raise files.InputError(f"{flag} {path}: {above} is a file, not a folder; choose another {flag}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise files.InputError(f"{flag} {path}: {above} cannot be written by this user; choose another {flag}")


WHERE = {"dataset", "root", "setting", "targets", "val", "split_sha256", "target_split_sha256"}  # where it is scored


def scored_elsewhere(one, neutral):
    """--eval-only of a trained run (--out RUN) on other test sets: another --dataset (a --dataset folder too),
    --setting, --targets or --root. The run's own arguments (its args.json) with only where it is scored changed,
    and its results go to a file of their own beside the run's (results_<setting>_<dataset>[_<root hash>].json),
    which the tables leave out. None when `one` is a plain --eval-only (or no --eval-only)."""
    folder = Path(one.out)
    if not one.eval_only or not (folder / "args.json").exists():
        return None
    recorded = files.read_json(folder / "args.json")
    where = {k: getattr(one, k) for k in WHERE if hasattr(one, k)}
    if all(recorded.get(k) == v for k, v in where.items()):
        return None
    taken = _listed(differences(recorded, one, neutral | WHERE))
    if taken:
        print(f"note: {folder} is scored with its own arguments, not the command line's ({taken})")
    merged = argparse.Namespace(**recorded | {k: getattr(one, k) for k in neutral if hasattr(one, k)} | where)
    merged.code = one.code
    merged.trained = {k: recorded[k] for k in ("dataset", "setting", "shots", "root")}  # where it was trained
    merged.shots = 1  # nothing is trained: one image per class keeps the new split's class list, cheaply
    tag = f"{merged.setting}_{merged.dataset}" + (
        f"_{hashlib.sha256(merged.root.encode()).hexdigest()[:8]}" if merged.root != recorded["root"] else "")
    merged.results_file = f"results_{tag}.json"
    return merged


def reusable(args, neutral):
    """The results of a finished run with the same arguments and code in args.out, or None if it must run. A
    finished run or a snapshot (--resume) with other arguments or other code in that folder is an error. --resume
    continues the unfinished runs only: a finished one is reused (a command killed half-way, run again with
    --resume, redoes nothing that was finished). --eval-only scores a checkpoint with today's code (results.json
    records which)."""
    folder = Path(args.out)
    in_use(folder)
    if getattr(args, "trained", None):  # scored elsewhere (see scored_elsewhere): scored again every time
        return None
    recorded = files.read_json(folder / "args.json") if (folder / "args.json").exists() else None
    diffs = _listed(differences(recorded, args, neutral)) if recorded is not None else ""
    code = changed_code(recorded.get("code"), args.code) if recorded is not None else ""
    if args.resume and (folder / "train_state.pt").exists() and (diffs or code):
        why = f"other arguments ({diffs})" if diffs else f"other code ({code} changed since)"
        raise files.InputError(f"--resume: the snapshot in {folder} was trained with {why}; rerun with its arguments "
                               f"and code, or --force to start it again")
    if diffs and args.eval_only:
        raise files.InputError(f"--eval-only: {folder} was trained with other arguments ({diffs}); evaluate it with "
                               f"its arguments (its args.json), or choose --out")
    if args.force or args.eval_only or not (folder / "results.json").exists():
        return None
    done = files.read_json(folder / "results.json")
    if "args" in done:  # the arguments the results were made with (args.json may be a later run's that died)
        recorded = done["args"]
        diffs = _listed(differences(recorded, args, neutral))
        code = changed_code(recorded.get("code"), args.code)
    if diffs:
        raise files.InputError(f"{folder} holds a finished run with other arguments ({diffs}); --force redoes it "
                               f"there, or choose --out")
    if code:
        raise files.InputError(f"{folder} holds a finished run made by other code ({code} changed since); --force "
                               f"redoes it there with this code, or choose --out")
    print(f"{folder} is finished with these arguments and this code (results.json); reusing it (--force redoes it)")
    return done


def _listed(diffs):
    """'lr 0.0035 there, 0.1 now, ...' for the error messages."""
    return ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diffs.items())


def show(args):
    """The arguments that matter, in a few lines (args.json keeps them all)."""
    device, _ = experiment.device_and_autocast(args.device, args.precision)
    shots = "all images" if args.shots == "all" else f"{args.shots} shots"
    print(f"{args.method} | {args.dataset} {args.setting}, {shots}, seed {args.seed} | backbone {args.backbone}\n"
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr} | {device}, precision {args.precision}"
          + (f" | changed: {args.variant}" if args.variant else "") + f"\n-> {args.out}")


def run_one(run, args, ranks=None):
    """One run, in a folder this process has claimed (lock.claimed): record the arguments and code, run, save
    results.json and print its summary line. ranks: (rank, world size) of the torchrun process that does it."""
    start = time.time()
    show(args)
    if not args.eval_only:
        files.save_json(Path(args.out) / "args.json", vars(args))
    trained = getattr(args, "trained", None)  # scored elsewhere: where the checkpoint was trained
    results = {"method": args.method, "variant": args.variant, "setting": args.setting, "dataset": args.dataset,
               "seed": args.seed, "shots": trained["shots"] if trained else args.shots, "backbone": args.backbone} \
        | ({"trained": trained} if trained else {}) | run(args)
    results["wall_time"] = time.time() - start
    results["code"] = args.code
    if (Path(args.out) / "history.json").exists():  # the epochs' loss, train acc, lr (experiment.snapshot)
        results["history"] = files.read_json(Path(args.out) / "history.json")
    results["args"] = vars(args)  # what made these numbers: a run is reused only when they are its arguments
    results |= experiment.split_record(args)  # the split files the run read
    if ranks:  # which process did the run (torchrun)
        results |= dict(zip(("rank", "world_size"), ranks))
    files.save_json(Path(args.out) / getattr(args, "results_file", "results.json"), results)
    summary = {"base": results.get("base_acc"), "new": results.get("new_acc"), "H": results.get("H")} \
        if args.setting == "base2new" else {args.dataset: results["acc"]} | results["targets"]
    where = Path(args.out) / args.results_file if getattr(args, "trained", None) else args.out
    print("  ".join(f"{k} {v:.2f}" for k, v in summary.items() if v is not None) + f"  ({where})")
    return results
