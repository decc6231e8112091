"""What a method script calls around its method: the shared flags, the start of a run, its training batches, Dassl's
learning-rate schedule, the epoch meter, checkpoints, snapshots and resume.

A method script builds its parser with `parser(...)` (and `add_frozen_feature_flags` when its image encoder stays
frozen), adds its own flags, and hands `harness.main` its `configure` and `run`. The rules of run folders, reuse,
torchrun and CUDA graphs live in harness/, which a method reader can skip.
"""
import argparse
import math
from pathlib import Path

import torch

import clip
import data
import eval as evaluation
import files
import world


# ---------------------------------------------------------------------------------------------------------------
# The shared flags.

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

def seed(text):
    """argparse type: a seed in [0, 2**32) (Python's random treats -5 as 5; numpy takes no larger one)."""
    return _checked(int, text, lambda v: 0 <= v < 2**32, "a seed in [0, 4294967295]")

path = files.path  # argparse type of a path flag: '~' expanded, made absolute and normal
progress = files.progress  # a bar on a terminal only: a log file gets one line per epoch

def _checked(kind, text, ok, expected):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


class HelpWithDefaults(argparse.HelpFormatter):
    """--help shows every flag's default (a flag whose default is None says in its help what fills it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            text += " (default: " + shown.replace("%", "%%") + ")"
        return text


def parser(description, *, epochs, batch_size, lr, recipe):
    """An argparse parser with every shared flag; the method script adds its own flags after it.

    epochs, batch_size, lr: the method's training recipe (`recipe` names its source, for --help). They default to
    None in the parser so that `configure` can tell a flag the user gave from one it may fill from a preset.
    `parser.neutral` names the flags that cannot change a run's numbers (never in a folder name, never a reason to
    redo a run); a method adds its own (e.g. a chunk size) with `parser.neutral.add(name)`.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
    data.add_arguments(p)
    group = p.add_argument_group("run (shared by every method)")
    group.add_argument("--seed", type=seed, nargs="+", default=[1],
                       help="seed(s) of the few-shot sample and the training (papers: 1 2 3); one run per dataset and seed")
    group.add_argument("--backbone", default="auto", type=files.path_or("auto", *clip.available_models()),
                       help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
    group.add_argument("--epochs", type=natural, default=None, help=f"training epochs ({recipe}: {epochs})")
    group.add_argument("--batch-size", type=positive_int, default=None, help=f"training batch size ({recipe}: {batch_size})")
    group.add_argument("--lr", type=positive, default=None, help=f"learning rate ({recipe}: {lr})")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
    group.add_argument("--workers", type=natural, default=None, help="data-loading processes (default: min(4, cores))")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast dtype of the frozen encoders on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--out", default=None, type=files.path,
                       help="run folder of a single run; for several, their parent (default: runs/<method>/<setting>/"
                            "<dataset>/shots<k>_seed<s>[_what differs from the defaults] in the current directory)")
    group.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint saved in --out, no training")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
    group.add_argument("--force", action="store_true", help="redo runs that already have results.json")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the frozen encoders' transformer blocks (slow to start; pays off on a GPU)")
    p.set_defaults(recipe={"epochs": epochs, "batch_size": batch_size, "lr": lr})
    p.neutral = {"device", "workers", "out", "force", "resume", "eval_only", "download", "compile"}
    return p


def add_frozen_feature_flags(p):
    """The flags of methods whose image encoder stays frozen: its features can be stored, cached per view, and the
    whole training step captured in a CUDA graph."""
    group = p.add_argument_group("frozen image encoder")
    group.add_argument("--cuda-graph", action="store_true",
                       help="CUDA: capture each training step (image encoder, text forward and backward, SGD) in one "
                            "CUDA graph and replay it: the eager step's kernels and arguments, so its logits and updates")
    group.add_argument("--store", default="auto", type=files.path_or("auto", "none"),
                       help="feature store for frozen features (auto = <root>/.cache/features; none = off)")
    group.add_argument("--cache-views", type=natural, default=0,
                       help="K > 0: encode K augmented views of each training image once and train on features")
    p.neutral |= {"cuda_graph", "store"}
    return p


def fill(args, preset):
    """Flags the user left unset (None) take the preset's value."""
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


# ---------------------------------------------------------------------------------------------------------------
# The start of a run and its training batches.

def device_and_autocast(device, precision):
    """(device, autocast factory): bf16 autocast for the frozen encoders on CUDA by default, fp32 on CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled = dtype != torch.float32
    return device, lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


def split_record(args):
    """{split_sha256: the dataset's split files' sha256, target_split_sha256 (cross-dataset): each target's}."""
    record = {"split_sha256": data.split_sha256(args.dataset, args.root)}
    if args.setting == "crossdataset":
        record["target_split_sha256"] = {t: data.split_sha256(t, args.root) for t in args.targets}
    return record


def start(args, split):
    """The start of a run: write train_files.json (and args.json again where the split files were first rendered
    or downloaded by this run: their sha256 now), seed torch; returns the run's (device, autocast factory)."""
    if not args.eval_only:
        if not args.resume:  # a fresh run starts a fresh history (even one with no epoch to write)
            (Path(args.out) / "history.json").unlink(missing_ok=True)
        files.save_json(Path(args.out) / "train_files.json", [it.path for it in split.train])
        made = split_record(args)
        if made != {k: getattr(args, k, None) for k in made}:
            vars(args).update(made)
            files.save_json(Path(args.out) / "args.json", vars(args))
    torch.manual_seed(args.seed)
    # Denormal floats are ~100x slower on CPUs (DA-VPT's Adam state reached them on the world: 1 s per step instead
    # of 10 ms); flushing them to zero changes no number measurably.
    torch.set_flush_denormal(True)
    return device_and_autocast(args.device, args.precision)


def check_prompts(split, context=""):
    """Every prompt the run will build fits CLIP's 77 tokens: "<context> <class>." (the learned context's length,
    e.g. "X X X X") and each test set's own template, for the class names of training and of every test set.
    Checked before training, so that a long class name (a --dataset folder's folder name) ends nothing half-way."""
    for test in [split, *split.tests.values()]:
        for name in test.classnames:
            for text in (f"{context} {name}.".strip(), test.template.format(name)):
                n = int((clip.tokenize(text, context_length=1000)[0] > 0).sum())  # <start> ... <end>
                if n > 77:
                    raise files.InputError(f"class {name!r}: the prompt {text!r} is {n} tokens long, CLIP reads 77 at "
                                           f"most; shorten the class name (a --dataset folder's folder name)")


def default_backbone(dataset):
    """The backbone a script uses when --backbone is 'auto': the world's shipped tiny CLIP for the world, else
    OpenAI's ViT-B/16 (the papers' backbone)."""
    return str(world.shipped_clip()) if dataset == "world" else "ViT-B/16"


def training_batches(model, items, transform, batch_size, *, seed, device, autocast, views=0, store=None, dataset="",
                     num_workers=None):
    """epoch -> iterator over (inputs, labels (B,)) of the few-shot training set, for text-side methods: inputs are
    images (B, 3, R, R) on the device, which the method's training step encodes (so that a CUDA graph can hold the
    image encoder too), or raw image features (B, E) read from stored views.

    Every epoch draws its order and augmentations from a seed of its own (seed, epoch), the same for any number of
    workers: an interrupted run resumed at epoch e replays exactly what an uninterrupted one does.

    views = 0: online, the papers' way: every step augments and encodes its images.
    views = K (--cache-views K): K augmented views of every image are encoded once (and stored); each epoch visits
    every image once, through one of its K views drawn at random. This matches online augmentation in distribution
    (a view is a draw of the same random transform), not bit for bit, and it reuses views when epochs > K.
    """
    g = torch.Generator().manual_seed(seed)
    if not views:
        images = data.loader(items, transform, batch_size, train=True, num_workers=num_workers, seed=seed)

        def online(epoch):
            torch.manual_seed(seed * 1000 + epoch)  # any other randomness of this epoch (dropout)
            images.generator.manual_seed(seed * 1000 + epoch)  # its order
            images.dataset.seed = seed * 1000 + epoch  # its augmentations
            for x, labels in images:
                yield x.to(device), labels.to(device)  # (B, 3, R, R), (B,)
        return online
    cached = []
    for v in range(views):  # view v of every image: the train transform under a seed of its own
        cached.append(evaluation.stored_image_features(
            model, items, transform, dataset=dataset, part=f"train view {v}/{views} seed {seed}", store=store,
            device=device, autocast=autocast, seed=seed * 1000 + 999 - v, num_workers=num_workers)[0])
    feats = torch.stack(cached).to(device)  # (views, N, E)
    labels = torch.tensor([it.label for it in items], device=device)  # (N,)
    N = len(items)

    def from_views(epoch):
        torch.manual_seed(seed * 1000 + epoch)  # any other randomness of this epoch (dropout)
        g.manual_seed(seed * 1000 + epoch)
        order = torch.randperm(N, generator=g)
        drop = N > batch_size and N % batch_size  # as the image loader: never drop the only batch
        order = order[: N - (N % batch_size)] if drop else order
        for idx in order.split(batch_size):
            view = torch.randint(views, (len(idx),), generator=g)
            yield feats[view.to(device), idx.to(device)], labels[idx.to(device)]  # (B, E) one view each, (B,)
    return from_views


# ---------------------------------------------------------------------------------------------------------------
# The training loop's helpers: Dassl's schedule and the epoch meter.

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
        """The epoch's line; its numbers stay in `self.row` (history.json, see snapshot). A non-finite loss stops
        the run (no results.json is written for it)."""
        loss = float(self.loss) / max(1, self.seen)
        if not math.isfinite(loss):
            raise files.InputError(f"the training loss became {loss} in epoch {epoch + 1}: the run diverged; "
                                  f"lower --lr (the learning rate was {lr:.3g} in that epoch)")
        self.row = {"epoch": epoch + 1, "loss": loss, "train_acc": 100 * int(self.correct) / max(1, self.seen), "lr": lr}
        return f"loss {loss:.4f}  train acc {self.row['train_acc']:.1f}  lr {lr:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, snapshots and resume: only what a run trains, never the frozen weights.

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
        raise files.InputError(f"{source} does not match this model (missing {sorted(expected - got)}, unexpected "
                         f"{sorted(got - expected)}); run with the flags it was trained with")
    module.load_state_dict(state, strict=False)

def save_checkpoint(out, module, split, **extra):
    """checkpoint.pt: the module's trainable state, the training class names and extra, written atomically."""
    checkpoint = {"trainable": trainable_state(module), "classnames": split.classnames} | extra
    files.atomic_write(Path(out) / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))

def load_checkpoint(out, module):
    """Load the checkpoint of the run folder `out` into module; returns the checkpoint (class names, extra)."""
    path = Path(out) / "checkpoint.pt"
    checkpoint = files.read_torch(path, "train the run first (without --eval-only), or point --out at a trained run")
    load_trainable(module, checkpoint["trainable"], source=str(path))
    return checkpoint

def snapshot(out, module, optimizer, epoch, meter=None, **extra):
    """The trainable state and the optimizer after `epoch`, written atomically (a kill never leaves half a file).
    meter: its epoch's row (Meter.summary) joins history.json, the rows of this epoch and later ones dropped first:
    epoch 0 starts it anew, and a resumed run replays the epochs it redoes. Written first: a kill between the two
    files leaves a row of an epoch that the resumed run redoes and replaces."""
    if meter is not None:
        rows = files.read_json(Path(out) / "history.json") if epoch and (Path(out) / "history.json").exists() else []
        files.save_json(Path(out) / "history.json", [r for r in rows if r["epoch"] <= epoch] + [meter.row])
    state = {"trainable": trainable_state(module), "optimizer": optimizer.state_dict(), "epoch": epoch + 1} | extra
    files.atomic_write(Path(out) / "train_state.pt", lambda tmp: torch.save(state, tmp))

def resume(out, module, optimizer):
    """Load the last epoch-end snapshot of the run folder `out` into module and optimizer.

    Returns (the epoch to start at, the snapshot's extra entries); (0, {}) when there is none."""
    path = Path(out) / "train_state.pt"
    if not path.exists():
        return 0, {}
    state = files.read_torch(path, "delete it to start the run from the beginning")
    load_trainable(module, state.pop("trainable"), source=str(path))
    optimizer.load_state_dict(state.pop("optimizer"))
    print(f"resuming {out} after epoch {state['epoch']}")
    return state.pop("epoch"), state
