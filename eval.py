"""Everything that runs, records and scores: the shared run flags and multi-run `main`, device and precision (and
--compile), run folders, snapshots and resume, the text-side methods' training step (eager, or replayed from a CUDA
graph with --cuda-graph), results and the papers' tables, the feature store, accuracy and H.

    python eval.py runs/            # every results.json below runs/ as the papers' tables

A method script builds its parser with `parser(...)`, adds its own flags, and hands `main` its `configure` (the
run's method name and presets) and `run` (one dataset, one seed). Text features are computed once per class list
and image features once per test set (never per batch); frozen image features can be kept on disk in a feature
store keyed by everything they depend on. Under `torchrun --nproc_per_node N script.py ...` the same `main` spreads
the runs over the N processes and encodes the test sets with all of them (see `spread`).
"""
import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data


# ---------------------------------------------------------------------------------------------------------------
# Shared flags and the multi-run main.

def positive_int(text):
    """argparse type: an integer >= 1."""
    return _checked(int, text, lambda v: v >= 1, "an integer >= 1")


def natural(text):
    """argparse type: an integer >= 0."""
    return _checked(int, text, lambda v: v >= 0, "an integer >= 0")


def positive(text):
    """argparse type: a finite number > 0."""
    return _checked(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative(text):
    """argparse type: a finite number >= 0."""
    return _checked(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def finite(text):
    """argparse type: a finite number."""
    return _checked(float, text, math.isfinite, "a finite number")


def fraction(text):
    """argparse type: a number in [0, 1)."""
    return _checked(float, text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _checked(kind, text, ok, expected):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def parser(description, *, epochs, batch_size, lr, recipe, frozen_image_encoder=True):
    """An argparse parser with every shared flag; the method script adds its own flags after it.

    epochs, batch_size, lr: the method's training recipe (`recipe` names its source, for --help). They default to
    None in the parser so that `configure` can tell a flag the user gave from one it may fill from a preset.
    frozen_image_encoder=False (DA-VPT) leaves out --store and --cache-views, which keep frozen image features.
    """
    p = argparse.ArgumentParser(description=description)
    data.add_arguments(p)
    group = p.add_argument_group("run (shared by every method)")
    group.add_argument("--seed", type=int, nargs="+", default=[1],
                       help="seed(s) of the few-shot sample and the training (papers: 1 2 3); one run per dataset and seed")
    group.add_argument("--backbone", default="auto",
                       help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
    group.add_argument("--epochs", type=natural, default=None, help=f"training epochs ({recipe}: {epochs})")
    group.add_argument("--batch-size", type=positive_int, default=None, help=f"training batch size ({recipe}: {batch_size})")
    group.add_argument("--lr", type=positive, default=None, help=f"learning rate ({recipe}: {lr})")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
    group.add_argument("--workers", type=natural, default=None, help="data-loading processes (default: min(4, cores))")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast dtype of the frozen encoders on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--out", default=None,
                       help="run folder of a single run; for several, their parent (default runs/<method>/<setting>/"
                            "<dataset>/shots<k>_seed<s>[_what differs from the defaults])")
    group.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint saved in --out, no training")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
    group.add_argument("--force", action="store_true", help="redo runs that already have results.json")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the frozen encoders' transformer blocks (slow to start; pays off on a GPU)")
    if frozen_image_encoder:
        group.add_argument("--cuda-graph", action="store_true",
                           help="CUDA: capture each training step (image encoder, text forward and backward, SGD) in one "
                                "CUDA graph and replay it: the eager step's kernels and arguments, so its logits and updates")
        group.add_argument("--store", default="auto",
                           help="feature store for frozen image features (auto = <root>/.cache/features; none = off)")
        group.add_argument("--cache-views", type=natural, default=0,
                           help="K > 0: encode K augmented views of each training image once and train on features")
    p.set_defaults(recipe={"epochs": epochs, "batch_size": batch_size, "lr": lr})
    return p


def fill(args, preset):
    """Flags the user left unset (None) take the preset's value."""
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


# Flags that cannot change a run's numbers: they never name a run folder nor stop the reuse of a finished run.
NEUTRAL = {"device", "workers", "store", "out", "force", "resume", "eval_only", "download", "cache_dir", "chunk",
           "compile", "cuda_graph", "variant"}  # (variant is derived from the others; compile changes rounding only)
IN_PATH = {"method", "setting", "dataset", "shots", "seed"}  # runs/<method>/<setting>/<dataset>/shots<k>_seed<s>
# --root is left out of folder names (every real run sets it); a finished run under another --root is still not reused.
UNNAMED = NEUTRAL | IN_PATH | {"root"}


def resolve(parser, configure, args, dataset, seed):
    """One run's flags: the method's presets (configure), then the recipe, then the backbone 'auto' resolved."""
    one = argparse.Namespace(**vars(args) | {"dataset": dataset, "seed": seed})
    try:
        configure(one)
    except ValueError as e:
        parser.error(str(e))
    fill(one, one.recipe)
    del one.recipe
    if one.backbone == "auto":
        one.backbone = data.default_backbone(dataset)
    return one


def variant(parser, configure, args, one):
    """What a run changes from its method's defaults, e.g. "lr0.01_n-ctx16" ("" for none).

    A flag counts when the user gave it and its value differs from what the same command without it resolves to;
    flags that name the method (capt's --condition, davpt's --head) are in <method> already, presets are no change.
    """
    defaults = parser.parse_args([])
    given = [k for k, v in vars(args).items() if k not in UNNAMED and v != getattr(defaults, k, v)]
    reset = lambda keys: argparse.Namespace(**vars(args) | {k: getattr(defaults, k) for k in keys})  # noqa: E731
    tuning = [k for k in given if resolve(parser, configure, reset([k]), one.dataset, one.seed).method == one.method]
    reference = resolve(parser, configure, reset(tuning), one.dataset, one.seed)
    changed = [k for k in sorted(tuning) if getattr(one, k) != getattr(reference, k)]
    return "_".join(k.replace("_", "-") + _short(getattr(one, k)) for k in changed)


def _short(value):
    """A flag value as part of a folder name: lists joined by '+', a file by its name (and a hash of its path)."""
    if isinstance(value, str) and Path(value).expanduser().is_file():
        value = f"{Path(value).name}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    text = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")
    return text if len(text) <= 40 else f"{text[:24]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def plan(parser, configure, argv=None):
    """(the parsed flags, one resolved Namespace per (dataset, seed) run) of a command line, each with its folder.

    configure(args) sets args.method and fills the flags the user left unset from the method's presets (it raises
    ValueError for a combination that makes no sense); what is still unset then takes the parser's recipe.
    """
    args = parser.parse_args(argv)
    datasets = args.dataset or (["imagenet"] if args.setting == "crossdataset" else ["world"])
    unknown = [d for d in datasets + (args.targets if args.setting == "crossdataset" else [])
               if d not in data.DATASETS and d != "folder"]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(data.DATASETS)} or 'folder'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu (or auto)")
    if getattr(args, "cuda_graph", False) and not device_and_autocast(args.device, "fp32")[0].startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA device (--device cuda)")
    if args.backbone != "auto" and args.backbone not in clip.available_models() and \
            not Path(args.backbone).expanduser().is_file():
        parser.error(f"--backbone {args.backbone!r} is neither a file nor one of {clip.available_models()}")
    jobs = [resolve(parser, configure, args, d, s) for d in datasets for s in args.seed]
    for one in jobs:
        one.variant = variant(parser, configure, args, one)
        name = f"shots{one.shots}_seed{one.seed}" + (f"_{one.variant}" if one.variant else "")
        one.out = args.out if args.out and len(jobs) == 1 else str(
            Path(args.out or f"runs/{one.method}") / one.setting / one.dataset / name)
    return args, jobs


def main(parser, configure, run, argv=None):
    """Every (dataset, seed) asked for, one after the other, each in its own folder; finished runs with the same
    arguments are reused; the setting's table at the end. run(args) trains and scores one run, returns its results.
    Bad input (data.InputError) ends the command with one `error:` line and exit status 2.

    Under torchrun with several processes the runs are spread over the ranks instead (see `spread`): each rank
    does its share, and rank 0 prints the table once every rank has finished."""
    ranks = torchrun_ranks()
    try:
        args, jobs = plan(parser, configure, argv)  # bad input found while planning (e.g. the shipped CLIP) is one line too
        if ranks:
            results = spread(run, jobs, *ranks)
        else:
            results = []
            for one in jobs:
                finished = reusable(one)
                results.append(finished if finished is not None else run_one(run, one))
    except data.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    runs_dir = Path(args.out) if args.out else Path("runs") / jobs[0].method / args.setting
    if len(jobs) > 1 and (not ranks or ranks[0] == 0):
        results_found = read_results(runs_dir)
        if collect(results_found, args.setting):
            print(f"\n{TABLES[args.setting](results_found)}")
    return results[0] if len(jobs) == 1 else results


def differences(recorded, args):
    """{flag: (recorded, now)} for the flags that can change a run's numbers."""
    now = vars(args)
    return {k: (recorded[k], now[k]) for k in sorted(set(recorded) & set(now) - NEUTRAL) if recorded[k] != now[k]}


def reusable(args):
    """The results of a finished run with the same arguments in args.out, or None if it must run. A finished run or
    a snapshot (--resume) with other arguments in that folder is an error, never silently reused or overwritten.
    --resume continues the unfinished runs only: a finished one is reused (a command killed half-way, run again with
    --resume, redoes nothing that was finished)."""
    folder = Path(args.out)
    recorded = read_json(folder / "args.json") if (folder / "args.json").exists() else None
    diffs = _listed(differences(recorded, args)) if recorded is not None else ""
    if diffs and args.resume and (folder / "train_state.pt").exists():
        raise data.InputError(f"--resume: the snapshot in {folder} was trained with other arguments ({diffs}); rerun "
                              f"with its arguments, or --force")
    if diffs and args.eval_only:
        raise data.InputError(f"--eval-only: {folder} was trained with other arguments ({diffs}); evaluate it with its "
                              f"arguments (its args.json), or choose --out")
    if args.force or args.eval_only or not (folder / "results.json").exists():
        return None
    done = read_json(folder / "results.json")
    if diffs:
        raise data.InputError(f"{folder} holds a finished run with other arguments ({diffs}); --force redoes it "
                              f"there, or choose --out")
    print(f"{folder} is finished with these arguments (results.json); reusing it (--force redoes it)")
    return done


def _listed(diffs):
    """'lr 0.0035 there, 0.1 now, ...' for the error messages."""
    return ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diffs.items())


def read_json(path):
    """A JSON file written by this project; a corrupt one is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data.InputError(f"{path} is not valid JSON ({e}); delete it (or rerun with --force)") from None


def show(args):
    """The arguments that matter, in a few lines (args.json keeps them all)."""
    device, _ = device_and_autocast(args.device, args.precision)
    shots = "all images" if args.shots == "all" else f"{args.shots} shots"
    print(f"{args.method} | {args.dataset} {args.setting}, {shots}, seed {args.seed} | backbone {args.backbone}\n"
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr} | {device}, precision {args.precision}"
          + (f" | changed: {args.variant}" if args.variant else "") + f"\n-> {args.out}")


def run_one(run, args):
    """One run: record the arguments, run, save results.json and print its summary line."""
    start = time.time()
    show(args)
    if not args.eval_only:
        save_json(Path(args.out) / "args.json", vars(args))
    results = {"method": args.method, "variant": args.variant, "setting": args.setting, "dataset": args.dataset,
               "seed": args.seed, "shots": args.shots, "backbone": args.backbone} | run(args)
    results["wall_time"] = time.time() - start
    if torchrun_ranks():  # which process did the run (torchrun)
        results |= dict(zip(("rank", "world_size"), torchrun_ranks()[:2]))
    save_json(Path(args.out) / "results.json", results)
    summary = {"base": results.get("base_acc"), "new": results.get("new_acc"), "H": results.get("H")} \
        if args.setting == "base2new" else {args.dataset: results["acc"]} | results["targets"]
    print("  ".join(f"{k} {v:.2f}" for k, v in summary.items() if v is not None) + f"  ({args.out})")
    return results


def results(split, accs, **extra):
    """The accuracies of a run named as the setting's tables read them (H when base and new exist), plus extra."""
    if "base" in accs and "new" in accs:
        out = {"base_acc": accs["base"], "new_acc": accs["new"], "base_classnames": split.tests["base"].classnames,
               "new_classnames": split.tests["new"].classnames}
        if out["base_acc"] is not None and out["new_acc"] is not None:
            out["H"] = harmonic_mean(out["base_acc"], out["new_acc"])
    else:
        out = {"acc": accs["all"], "targets": {k: v for k, v in accs.items() if k != "all"}}
    return out | extra


# ---------------------------------------------------------------------------------------------------------------
# Device, the frozen CLIP, checkpoints and snapshots.

def device_and_autocast(device, precision):
    """(device, autocast factory): bf16 autocast for the frozen encoders on CUDA by default, fp32 on CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled = dtype != torch.float32
    return device, lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


def start_run(args, split):
    """Seed the run, write train_files.json, load CLIP frozen on the run's device: (model, device, autocast)."""
    if not args.eval_only:
        save_json(Path(args.out) / "train_files.json", [it.path for it in split.train])
    torch.manual_seed(args.seed)
    device, autocast = device_and_autocast(args.device, args.precision)
    # Denormal floats are ~100x slower on CPUs (DA-VPT's Adam state reached them on the world: 1 s per step instead
    # of 10 ms); flushing them to zero changes no number measurably.
    torch.set_flush_denormal(True)
    try:
        model, _ = clip.load(args.backbone, device=device)
    except (RuntimeError, KeyError, ValueError) as e:  # clip.load's own messages: no network, bad file, not a ViT
        raise data.InputError(f"--backbone {args.backbone}: {e}") from e
    model.requires_grad_(False)  # CLIP stays frozen; a method unfreezes what it trains
    return (compile_encoders(model) if args.compile else model), device, autocast


def compile_encoders(model, backend="inductor"):
    """--compile: torch.compile the forward of every transformer block of both encoders, in place. Blocks of one
    width share one compiled graph; text blocks run the math attention (the rule in clip/model.py), which inductor
    fuses. DA-VPT runs the blocks' parts itself, so only its frozen calls (k-means features) are compiled."""
    for block in model.modules():
        if isinstance(block, clip.model.ResidualAttentionBlock):
            block.compile(backend=backend)
    return model


def show_trainable(module):
    """Print the names and the number of the trainable parameters (the headline number of prompt tuning)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    print(f"trainable: {[n for n, _ in named]}, {sum(p.numel() for _, p in named):,} parameters")
    return sum(p.numel() for _, p in named)


def trainable_state(module):
    """The tensors a run learns or draws: its trainable parameters and persistent buffers, never frozen weights."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k not in frozen}


def load_trainable(module, state, source="the checkpoint"):
    """Load what trainable_state saved; a mismatch (other flags, another method) is an error naming the keys."""
    expected, got = set(trainable_state(module)), set(state)
    if expected != got:
        raise data.InputError(f"{source} does not match this model (missing {sorted(expected - got)}, unexpected "
                         f"{sorted(got - expected)}); run with the flags it was trained with")
    module.load_state_dict(state, strict=False)


def save_checkpoint(out, module, split, **extra):
    """checkpoint.pt: the module's trainable state, the training class names and extra, written atomically."""
    checkpoint = {"trainable": trainable_state(module), "classnames": split.classnames} | extra
    atomic_write(Path(out) / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(out, module):
    """Load the checkpoint of the run folder `out` into module; returns the checkpoint (class names, extra)."""
    path = Path(out) / "checkpoint.pt"
    checkpoint = read_torch(path, "train the run first (without --eval-only), or point --out at a trained run")
    load_trainable(module, checkpoint["trainable"], source=str(path))
    return checkpoint


def read_torch(path, what_to_do):
    """torch.load with weights_only=True (never runs code from the file); a missing or unreadable file is an
    InputError that names it and says what to do."""
    if not Path(path).exists():
        raise data.InputError(f"{path} does not exist; {what_to_do}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbled, or a pickle that is not plain tensors and containers
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise data.InputError(f"{path} is unreadable ({type(e).__name__}: {reason}); {what_to_do}") from None


def snapshot(out, module, optimizer, epoch, **extra):
    """The trainable state and the optimizer after `epoch`, written atomically (a kill never leaves half a file)."""
    state = {"trainable": trainable_state(module), "optimizer": optimizer.state_dict(), "epoch": epoch + 1} | extra
    atomic_write(Path(out) / "train_state.pt", lambda tmp: torch.save(state, tmp))


def resume(out, module, optimizer):
    """Load the last epoch-end snapshot of the run folder `out` into module and optimizer.

    Returns (the epoch to start at, the snapshot's extra entries); (0, {}) when there is none."""
    path = Path(out) / "train_state.pt"
    if not path.exists():
        return 0, {}
    state = read_torch(path, "delete it to start the run from the beginning")
    load_trainable(module, state.pop("trainable"), source=str(path))
    optimizer.load_state_dict(state.pop("optimizer"))
    print(f"resuming {out} after epoch {state['epoch']}")
    return state.pop("epoch"), state


def lr_at_epoch(epoch, lr, epochs, warmup_lr):
    """Dassl's schedule (CoOp, CoCoOp, CaPT): epoch 0 at warmup_lr, then cosine over the epochs, stepped per epoch."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


class Meter:
    """Loss and training accuracy of one epoch, kept on the device (no sync per step) and read once at its end."""

    def __init__(self):
        self.loss, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss, logits, labels):
        """Count one batch (kept on the device: no synchronisation per step)."""
        self.loss = self.loss + loss.detach() * len(labels)
        self.correct = self.correct + (logits.argmax(-1) == labels).sum()
        self.seen += len(labels)

    def summary(self, epoch, lr):
        """The epoch's line; a non-finite loss stops the run (no results.json is written for it)."""
        loss = float(self.loss) / max(1, self.seen)
        if not math.isfinite(loss):
            raise data.InputError(f"the training loss became {loss} in epoch {epoch + 1}: the run diverged; "
                                  f"lower --lr (the learning rate was {lr:.3g} in that epoch)")
        return f"loss {loss:.4f}  train acc {100 * int(self.correct) / max(1, self.seen):.1f}  lr {lr:.2e}"


def training_step(step_loss, module, model, optimizer, *, autocast, cuda_graph=False):
    """step(inputs, labels) -> (loss, logits): one SGD step of a text-side method. inputs are images (B, 3, R, R),
    which the frozen image encoder encodes first, or stored features (B, E) (--cache-views); step_loss(module,
    model, features, labels, autocast) is the method's loss. cuda_graph: the same function, captured (GraphedStep)."""
    def step(inputs, labels):
        if inputs.dim() == 4:  # images: the frozen image encoder, no gradient
            with torch.no_grad(), autocast():
                inputs = model.encode_image(inputs).float()  # (B, E)
        loss, logits = step_loss(module, model, inputs, labels, autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    return GraphedStep(step, optimizer) if cuda_graph else step


class GraphedStep:
    """A training step (forward, backward and optimizer step of one batch) captured in one CUDA graph and replayed:
    one launch instead of hundreds of small kernels (the step at C = 100 classes is launch-bound).

    Exact by construction: a replay runs the kernels the eager step launches, with the same arguments, so it gives the
    same logits and updates (tests/test_speed.py: on a CPU, the captured function against the eager step bit for bit;
    on CUDA, real replays against eager steps). What a graph cannot do, and what this class does about it:
    - Python values are frozen at capture. The learning rate is one of them (SGD's foreach kernels take it as a host
      scalar; a tensor lr is read back to the host), so the step is captured again whenever a group's lr differs from
      the captured one: once per epoch under Dassl's schedule (a per-step schedule would recapture every step).
    - Lazy state: the first `warmup` steps of each batch shape run eagerly, on a side stream as CUDA asks before a
      capture (and --compile compiles there, never inside a capture). They are real training steps and create SGD's
      momentum buffers, which the graph then updates in place. A batch of another shape is captured anew.
    - Fixed addresses: each batch is copied into static inputs; the loss and logits returned are the graph's own
      tensors, overwritten by the next step (read them before, as the Meter does).
    - The module must not change between steps (a new class list, train/eval): nothing in a training loop does.
    - Randomness (CaPT's dropout) draws from the CUDA generator's graph-safe state: each replay advances its offset
      as the eager step would.
    Without CUDA (the tests) there is no graph: the same function runs on the static inputs.
    """

    def __init__(self, step, optimizer, warmup=3):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.calls, self.key, self.graph, self.static, self.out, self.captures = {}, None, None, None, None, 0

    def __call__(self, inputs, labels):
        shapes = (inputs.shape, labels.shape)
        self.calls[shapes] = self.calls.get(shapes, 0) + 1
        if self.calls[shapes] <= self.warmup:
            return self.eager(inputs, labels)
        key = (shapes, [group["lr"] for group in self.optimizer.param_groups])
        if key != self.key:
            self.capture(inputs, labels)
            self.key = key
        else:
            self.static[0].copy_(inputs)
            self.static[1].copy_(labels)
        if self.graph is None:  # no CUDA: the captured function itself
            return self.step(*self.static)
        self.graph.replay()
        return self.out

    def eager(self, inputs, labels):
        """One uncaptured step (on CUDA on a side stream, as capture requires of the warm-up steps)."""
        if not inputs.is_cuda:
            return self.step(inputs, labels)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(inputs, labels)
        torch.cuda.synchronize()  # the outputs were made on the side stream; nothing may reuse their memory early
        return out

    def capture(self, inputs, labels):
        """Record the step on static copies of inputs and labels (on the CPU: just keep the copies)."""
        self.graph, self.out = None, None  # free the previous capture's memory first
        self.static = (inputs.clone(), labels.clone())
        self.captures += 1
        if inputs.is_cuda:
            self.optimizer.zero_grad(set_to_none=True)  # backward then allocates the gradients from the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels without running them; replay runs them
                self.out = self.step(*self.static)


# ---------------------------------------------------------------------------------------------------------------
# Scoring and features.

def harmonic_mean(base, new):
    """H = 2BN / (B + N), the papers' base-to-new summary (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def accuracy(logits, labels):
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def zeroshot_weights(model, classnames, template, device):
    """(C, E) normalised text features of the hand-crafted prompts, computed once per class list."""
    tokens = clip.tokenize([template.format(c) for c in classnames]).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


EVAL_BATCH = 100  # images per batch when test features are computed (sharded ones too: whole batches)


@torch.no_grad()
def image_features(model, loader, device, autocast, desc="features"):
    """(N, E) raw frozen image features and (N,) labels of a loader, computed once."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False):
        with autocast():
            f = model.encode_image(images.to(device))
        feats.append(f.float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def store_dir(args):
    """The feature-store folder of --store (None when off)."""
    if args.store == "none":
        return None
    return Path(args.root) / ".cache" / "features" if args.store == "auto" else Path(args.store)


def stored_test_features(model, test, args, device, autocast):
    """(N, E) raw frozen image features (on the device) and (N,) labels of a TestSet, through the feature store."""
    transform = test.transform(model.visual.input_resolution)
    f, labels = stored_image_features(model, test.items, transform, dataset=test.dataset, part=test.part,
                                      store=store_dir(args), device=device, autocast=autocast,
                                      num_workers=args.workers)
    return f.to(device), labels.to(device)


def model_fingerprint(model, part="visual"):
    """sha256 over the image encoder's weights (part "visual") or over the rest, the text side (part "text"): the
    backbone part of a store key. Computed once per loaded model and kept on it (hashing the weights can cost as much
    as encoding a test set on a GPU): the encoders are frozen, so their weights cannot change. A part with a
    trainable tensor (DA-VPT's tuned biases) is hashed afresh on every call."""
    keep = (lambda name: name.startswith("visual.")) if part == "visual" else (lambda name: not name.startswith("visual."))
    frozen = not any(p.requires_grad for name, p in model.named_parameters() if keep(name))
    known = model.__dict__.setdefault("fingerprints", {})  # {part: sha256}
    if frozen and part in known:
        return known[part]
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if keep(name):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    if frozen:
        known[part] = h.hexdigest()
    return h.hexdigest()


def precision_of(autocast):
    """The dtype the encoders compute in under an autocast factory: part of a feature-store key (bf16 features are
    not fp32 ones)."""
    context = autocast()
    return str(context.fast_dtype).removeprefix("torch.") if context._enabled else "fp32"


def store_key(fingerprint, dataset, part, transform, files, precision="fp32"):
    """One hash over everything the features depend on: change any part and the stored file no longer matches."""
    parts = {"backbone": fingerprint, "dataset": dataset, "split": part, "transform": repr(transform),
             "files": [str(f) for f in files], "precision": precision}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


UMASK = os.umask(0o022)  # read the process's umask (setting it is the only way) ...
os.umask(UMASK)  # ... and put it back at once


def atomic_write(path, write):
    """write(tmp_path) into a temporary file beside `path`, then rename: readers never see a half-written file.
    The file gets the permissions a plain open() would give it (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_image_features(store, key, compute):
    """(features, labels) from `store/<key>.pt`, or compute() and store them. A corrupt file is rebuilt."""
    path = Path(store) / f"{key}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry["key"] == key and entry["features"].shape[0] == entry["labels"].shape[0]:
                return entry["features"], entry["labels"]
            print(f"feature store: {path} does not match its key; recomputing it")
        except Exception as e:  # truncated or garbled: rebuild rather than fail on a cache
            print(f"feature store: {path} is unreadable ({type(e).__name__}); recomputing it")
    features, labels = compute()
    atomic_write(path, lambda tmp: torch.save({"key": key, "features": features, "labels": labels}, tmp))
    return features, labels


def feature_key(model, items, transform, *, dataset, part, autocast):
    """The feature-store key of `items` encoded by model's image encoder under autocast (see store_key)."""
    return store_key(model_fingerprint(model), dataset, part, transform, [it.path for it in items],
                     precision=precision_of(autocast))


def stored_image_features(model, items, transform, *, dataset, part, store, device, autocast, seed=None,
                          num_workers=None):
    """(N, E) raw frozen image features and (N,) labels of `items`, through the feature store when `store` is a folder.
    seed: of a random transform (data.ImageList); num_workers: --workers.

    The key covers the image encoder's weights, dataset, part, transform and file list: every text-side method and
    seed that evaluates the same test set with the same backbone reads the same file.
    """
    def compute():
        loader = data.loader(items, transform, EVAL_BATCH, train=False, seed=seed, num_workers=num_workers)
        return image_features(model, loader, device, autocast, desc=f"{dataset} {part}")
    if not store:
        return compute()
    return cached_image_features(store, feature_key(model, items, transform, dataset=dataset, part=part,
                                                    autocast=autocast), compute)


# ---------------------------------------------------------------------------------------------------------------
# Many GPUs and many machines: torchrun spreads the runs over its processes (ranks).
#
# Every rank plans the same runs from the same command line. Rank 0 finds the finished ones and prepares the inputs,
# all ranks encode the test sets together into the feature store, then each rank does its share of the other runs
# on its own device and rank 0 prints the table. What the ranks exchange is small or lives on the CPU (run lists,
# results, CPU feature shards), so one gloo process group serves CPUs and GPUs alike: NCCL would need the data on
# the GPU, and its watchdog would end a rank that waits hours for the slowest one.

WAIT = timedelta(days=7)  # longest wait for the other ranks (the slowest rank's share of the runs); a rank that
# dies is noticed at once all the same: torchrun stops every rank when one exits with an error or is killed


def torchrun_ranks():
    """(rank, world size, local rank) of a process that torchrun started among several; None otherwise."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) < 2 or "RANK" not in env or "LOCAL_RANK" not in env:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def expected_cost(one):
    """A run's cost from its flags alone (published dataset sizes, nothing is read): the images its training
    encodes (epochs x training classes x shots) plus the test images it scores. The text side (C prompts per step
    for prompt learners) is left out: it grows with the classes too, so the big runs stay big."""
    classes, train, test = data.dataset_size(one.dataset, one.root)
    trained = math.ceil(classes / 2) if one.setting == "base2new" else classes
    shots = train / classes if one.shots == "all" else one.shots
    targets = one.targets if one.setting == "crossdataset" else []
    epochs = 0 if one.eval_only else one.epochs
    return epochs * trained * shots + test + sum(data.dataset_size(t, one.root)[2] for t in targets)


def assign(costs, world):
    """The rank of each run: greedy longest-processing-time, the costliest run first, each to the rank with the
    least cost so far (ties: the lower rank). Deterministic, so every rank computes the same assignment."""
    load, owner = [0.0] * world, [None] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def spread(run, jobs, rank, world, local_rank):
    """This rank's share of the runs under torchrun; returns every run's results, as `main` does without torchrun.

    1. Rank 0 checks which runs are finished (`reusable`; a conflict ends every rank with its error) and prepares
       the inputs of the others (`prepare_inputs`), then the first rank of every other machine does the same for
       its own disks: several ranks never render or download the same files at once.
    2. All ranks encode every test set the runs will score into the feature store (`shard_features`).
    3. The unfinished runs are assigned by expected cost (`assign`); each rank does its own on cuda:LOCAL_RANK (or
       the CPU), then every rank learns every result. A run with bad input stops its rank, which prints the runs it
       did not finish and waits for the others; a rank that dies makes torchrun stop them all, each printing what
       it did not finish. The same command again does only the runs without results.json (--resume: from their
       snapshots), spread over every rank.
    """
    if jobs[0].device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise data.InputError(f"torchrun started local rank {local_rank}, but this machine has "
                                  f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        for one in jobs:
            one.device = f"cuda:{local_rank}"
    dist.init_process_group("gloo", timeout=WAIT)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # torchrun's stop: unwind, report
    try:
        return _spread(run, jobs, rank, world, local_rank)
    finally:
        dist.destroy_process_group()


def _spread(run, jobs, rank, world, local_rank):
    """`spread`'s steps 1-3, inside the process group."""
    first = {}  # a run folder asked for twice is run once
    for i, one in enumerate(jobs):
        first.setdefault(one.out, i)
    unique = [i for i, one in enumerate(jobs) if first[one.out] == i]
    verdict = [None]
    if rank == 0:
        try:
            finished = {i: r for i in unique if (r := reusable(jobs[i])) is not None}
            verdict = [(finished, None)]
            prepare_inputs([jobs[i] for i in unique if i not in finished])
        except data.InputError as e:
            verdict = [({}, str(e))]
    dist.broadcast_object_list(verdict, src=0)  # the others wait for rank 0's verdict
    finished, error = verdict[0]
    if error:
        if rank == 0:
            raise data.InputError(error)
        sys.exit(2)  # rank 0 prints the error
    pending = [i for i in unique if i not in finished]
    if local_rank == 0 and rank != 0:
        prepare_inputs([jobs[i] for i in pending])  # this machine's disks (nothing to do where they are shared)
    dist.barrier()
    shard_features([jobs[i] for i in pending], rank, world, local_rank)

    owner = assign([expected_cost(jobs[i]) for i in pending], world)
    mine = [i for i, r in zip(pending, owner) if r == rank]
    print(f"rank {rank} of {world}: {len(mine)} of the {len(pending)} runs to do", flush=True)
    done = {}
    try:
        for i in mine:
            done[i] = run_one(run, jobs[i])
    except data.InputError as e:  # bad input: this rank stops, the others finish their runs
        print(f"error: rank {rank}: {e}", file=sys.stderr)
    except BaseException:  # stopped by torchrun (another rank died), interrupted, or a bug
        _not_finished(rank, [jobs[i].out for i in mine if i not in done])
        raise
    left = [jobs[i].out for i in mine if i not in done]
    _not_finished(rank, left)
    gathered = _gather((done, left))  # waits for every rank to finish its share
    done = finished | {i: r for d, _ in gathered for i, r in d.items()}
    left = [out for _, outs in gathered for out in outs]
    if left:
        if rank == 0:
            raise data.InputError(f"{len(left)} of {len(jobs)} runs are not finished ({', '.join(left)}); "
                                  f"rerun the same command (after fixing the error above) to do only these")
        sys.exit(2)  # rank 0 prints the error
    return [done[first[one.out]] for one in jobs]


def _not_finished(rank, outs):
    if outs:
        print(f"rank {rank} did not finish: {', '.join(outs)} (the same command again does them)",
              file=sys.stderr, flush=True)


def _gather(value):
    """[the value of rank 0, of rank 1, ...] on every rank (a collective: every rank calls it)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _per_dataset(jobs):
    """The first run of each dataset (one command: the same flags for all its runs but dataset and seed)."""
    firsts = {}
    for one in jobs:
        firsts.setdefault(one.dataset, one)
    return list(firsts.values())


def prepare_inputs(jobs):
    """Write once what the runs read but nobody has written yet: each dataset's files (the world rendered,
    --download fetched, the images checked: data.prepare_for), then OpenAI's weights for the datasets that are there
    (clip.load downloads them). An error is left to the runs that meet it: they report it."""
    backbones = set()
    for one in _per_dataset(jobs):
        try:
            data.prepare_for(one)
            backbones.add(one.backbone)
        except data.InputError:
            pass
    for backbone in sorted(backbones & set(clip.available_models())):
        try:
            clip.load(backbone)
        except RuntimeError:
            pass


def shard_features(jobs, rank, world, local_rank):
    """Encode every test set the runs will score with all ranks at once into the feature store, where the runs then
    find it: ImageNet's 50,000 test images take 1/world of the time. For the methods with a frozen image encoder and
    a store (DA-VPT's test features depend on its trained prompts). Collective: every rank calls it with the same
    jobs, and every decision is taken on what all ranks see, so that they all take the same branches."""
    models = {}
    for one in _per_dataset(j for j in jobs if getattr(j, "store", "none") != "none"):
        device, autocast = device_and_autocast(one.device, one.precision)
        try:
            split = data.prepare_for(one)
            if one.backbone not in models:
                model = clip.load(one.backbone, device=device)[0]
                models[one.backbone] = model.requires_grad_(False)  # frozen: its fingerprint is computed once
        except (data.InputError, RuntimeError, KeyError, ValueError):  # left to the runs, which report it
            split = None
        if not all(_gather(split is not None)):
            continue
        model = models[one.backbone]
        for test in split.tests.values():
            transform = test.transform(model.visual.input_resolution)
            key = feature_key(model, test.items, transform, dataset=test.dataset, part=test.part, autocast=autocast)
            if not test.items or all(_gather((store_dir(one) / f"{key}.pt").exists())):
                continue
            features, labels = sharded_image_features(model, test.items, transform, rank=rank, world=world,
                                                      device=device, autocast=autocast, num_workers=one.workers)
            if local_rank == 0:  # one writer per machine (the store may be on each machine's own disk)
                cached_image_features(store_dir(one), key, lambda: (features, labels))
    dist.barrier()  # the runs start once every feature is written


def sharded_image_features(model, items, transform, *, rank, world, device, autocast, num_workers=None):
    """(N, E) frozen image features and (N,) labels of items, encoded by all ranks together: rank r encodes a
    contiguous run of whole batches of EVAL_BATCH images and every rank gathers the shards, in order. Each batch is
    the batch a single process encodes, so the features are a single process's (bitwise on the CPU).
    Collective: every rank calls it with the same items."""
    batches = math.ceil(len(items) / EVAL_BATCH)
    lo, hi = (min(len(items), EVAL_BATCH * (batches * r // world)) for r in (rank, rank + 1))
    shard = None
    if hi > lo:
        loader = data.loader(items[lo:hi], transform, EVAL_BATCH, train=False, num_workers=num_workers)
        shard = image_features(model, loader, device, autocast, desc=f"test features, shard {rank + 1}/{world}")
    shards = [s for s in _gather(shard) if s is not None]  # [((n_r, E), (n_r,))] in rank order
    return torch.cat([f for f, _ in shards]), torch.cat([y for _, y in shards])  # (N, E), (N,)


# ---------------------------------------------------------------------------------------------------------------
# Results and tables.

def save_json(path, obj):
    """obj as indented JSON at path, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def average(rows):
    """Papers' average over datasets: mean base, mean new, then H of the means (not the mean of the H's)."""
    base = sum(r["base_acc"] for r in rows) / len(rows)
    new = sum(r["new_acc"] for r in rows) / len(rows)
    return base, new, harmonic_mean(base, new)


def read_results(runs_dir):
    """Every results.json below runs_dir, read once; an unreadable one is named and skipped."""
    results = []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        try:
            results.append(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            print(f"warning: skipping {path}: not valid JSON ({e})", file=sys.stderr)
    return results


def collect(results, setting="base2new"):
    """{method (variant): {dataset: [results of each seed]}} of one setting. Runs with other shots than the papers'
    16 are rows of their own ("dtd 4-shot"); the few-shot table names every shot count."""
    table = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("setting", "base2new") != setting:
            continue
        if setting == "base2new" and (r.get("base_acc") is None or r.get("new_acc") is None):
            continue
        shots = f"{r['dataset']} {r['shots']}-shot"
        key = shots if setting == "fewshot" or r["shots"] != 16 else r["dataset"]
        label = r.get("method", "?") + (f" ({r['variant']})" if r.get("variant") else "")
        table[label][key].append(r)
    return table


def base2new_table(results):
    """Markdown: per method, one row per dataset (mean over its seeds) and the papers' Average over datasets (mean
    base, mean new, H of the means) when there are several. results: read_results(runs_dir)."""
    table = collect(results)
    lines = ["| Method | Dataset | Base | New | H | Runs |", "|---|---|---|---|---|---|"]
    for m in sorted(table):
        rows = []
        for d in sorted(table[m]):
            b, n, h = average(table[m][d])  # over seeds: the same rule as over datasets
            rows.append({"base_acc": b, "new_acc": n})
            seeds = len(table[m][d])
            lines.append(f"| {m} | {d} | {b:.2f} | {n:.2f} | {h:.2f} | {seeds} seed{'s' * (seeds > 1)} |")
        if len(rows) > 1:
            b, n, h = average(rows)
            lines.append(f"| {m} | **Average** | {b:.2f} | {n:.2f} | {h:.2f} | {len(rows)} datasets |")
    return "\n".join(lines)


def mean(values):
    """The arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def fewshot_table(results):
    """Markdown: one row per dataset and shot count, accuracy on all classes per method (seed count in brackets)."""
    table = collect(results, "fewshot")
    methods = sorted(table)
    shots = lambda k: float("inf") if k.split()[1] == "all-shot" else int(k.split()[1].split("-")[0])  # noqa: E731
    rows = sorted({d for m in methods for d in table[m]}, key=lambda k: (k.split()[0], shots(k)))
    lines = ["| Dataset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for row in rows:
        cells = [f"{mean([r['acc'] for r in table[m][row]]):.2f} ({len(table[m][row])})" if table[m].get(row) else "–"
                 for m in methods]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Each cell: the mean accuracy over seeds (the number of seeds in brackets)."])


def crossdataset_table(results):
    """Markdown, as the papers: one row per method (and source), one column per target, plus the average.

    Cross-dataset targets and the ImageNet variants (domain generalisation) are averaged separately."""
    table = collect(results, "crossdataset")
    variants = data.IMAGENET_VARIANTS
    lines = []
    for title, keep in [("cross-dataset", lambda t: t not in variants), ("domain generalisation", lambda t: t in variants)]:
        targets = [t for t in data.CROSS_TARGETS + sorted({t for m in table for d in table[m] for r in table[m][d]
                                                            for t in r["targets"]} - set(data.CROSS_TARGETS))
                   if keep(t) and any(t in r["targets"] for m in table for d in table[m] for r in table[m][d])]
        if not targets:
            continue
        lines += [f"{title}:", "", "| Method | Source | " + " | ".join(targets) + " | Average |",
                  "|---|---|" + "---|" * (len(targets) + 1)]
        for m in sorted(table):
            for source, runs in sorted(table[m].items()):
                accs = [mean([r["targets"][t] for r in runs if t in r["targets"]]) if any(t in r["targets"] for r in runs)
                        else None for t in targets]
                known = [a for a in accs if a is not None]
                cells = [f"{a:.2f}" if a is not None else "–" for a in accs]
                src = f"{source} {mean([r['acc'] for r in runs]):.2f} ({len(runs)})"
                average = f"{mean(known):.2f}" if known else "–"  # a row may have none of this group's targets
                lines.append(f"| {m} | {src} | " + " | ".join(cells) + f" | {average} |")
        lines.append("")
    return "\n".join(lines + ["Source: its accuracy, the mean over seeds (the number of seeds in brackets); targets: "
                               "the same seeds' mean."])


TABLES = {"base2new": base2new_table, "fewshot": fewshot_table, "crossdataset": crossdataset_table}


def tables(argv=None):
    """`python eval.py RUNS_DIR`: every setting's table of the results.json files below RUNS_DIR."""
    parser = argparse.ArgumentParser(description="Aggregate results.json files into the papers' tables.")
    parser.add_argument("runs_dir", help="folder searched recursively for results.json")
    args = parser.parse_args(argv)
    results = read_results(args.runs_dir)
    for setting, render in TABLES.items():
        if collect(results, setting):
            print(f"## {setting}\n\n{render(results)}\n")
    if not results:
        sys.exit(f"no results.json found under {args.runs_dir}")


if __name__ == "__main__":
    tables()
