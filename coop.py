"""CoOp: learn the context words of CLIP's prompt, keep CLIP frozen.

Paper: "Learning to Prompt for Vision-Language Models", Zhou, Yang, Loy, Liu; IJCV 2022, arXiv 2109.01134.
Idea: replace the hand-written "a photo of a" in "a photo of a {class}." by M learnable word vectors shared by all
classes, and train only them with cross-entropy over CLIP's image-text cosine logits. At test time the learned
prompt is filled with any class names: trained on base classes, evaluated on base and on unseen new classes.

    python coop.py                                            # the built-in offline world, CPU, a few minutes
    python coop.py --dataset eurosat --root ~/data            # a real benchmark with OpenAI's ViT-B/16
    python coop.py --dataset eurosat dtd --root ~/data --seed 1 2 3   # 6 runs one after the other, then the table
    python coop.py --setting crossdataset --root ~/data       # ImageNet -> the 10 other datasets and the 4 variants
    python coop.py --dataset eurosat --root ~/data --resume   # continue an interrupted run from its last epoch

Defaults are the CoOp re-run of the CaPT paper (ViT-B/16, context "a photo of a", 16 shots, 10 epochs, batch 4,
SGD lr 0.0035, one warm-up epoch at 1e-5, then per-epoch cosine). CoOp's own base-to-new recipe is
`--batch-size 32 --lr 0.002 --epochs 200` (`vit_b16_ctxv1`).

Deviations from the official code (KaiyangZhou/CoOp): the context is an fp32 parameter (the official default
creates it in fp16 and updates it with SGD); the text encoder runs only up to the longest prompt (exact);
text and test-image features are computed once per evaluation rather than per test batch.

Dimension legend: B batch, K classes, M context tokens, T text tokens (<= 77), D text width, E joint embedding.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import eval as evaluation

parser = argparse.ArgumentParser(description="CoOp: learned prompt context for CLIP")
# shared by every method script
parser.add_argument("--dataset", nargs="+", default=None,
                    help="dataset name(s) (see data.DATASETS), or 'folder'; default world (imagenet for crossdataset)")
parser.add_argument("--root", default="data", help="folder holding the datasets (CoOp's layout)")
parser.add_argument("--shots", type=int, default=16, help="training images per class (papers: 16)")
parser.add_argument("--seed", type=int, nargs="+", default=[1],
                    help="seed(s) of the few-shot sample and the training (papers: 1 2 3); one run per dataset and seed")
parser.add_argument("--backbone", default="auto",
                    help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
parser.add_argument("--epochs", type=int, default=10, help="training epochs (CaPT's CoOp re-run: 10)")
parser.add_argument("--batch-size", type=int, default=4, help="training batch size (CaPT's CoOp re-run: 4)")
parser.add_argument("--lr", type=float, default=0.0035, help="SGD learning rate (CaPT's CoOp re-run: 0.0035)")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--out", default=None,
                    help="run folder of a single run; for several, their parent (default runs/coop/<setting>/<dataset>/shots<k>_seed<s>)")
parser.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint saved in --out, no training")
parser.add_argument("--download", action="store_true", help="fetch the dataset with torchvision if it is missing")
parser.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(4, cores))")
parser.add_argument("--store", default="auto",
                    help="feature store for frozen image features (auto = <root>/.cache/features; none = off)")
parser.add_argument("--setting", default="base2new", choices=["base2new", "fewshot", "crossdataset"],
                    help="base2new: train base, test base and new; fewshot: all classes; crossdataset: train on the "
                         "source, test on --targets")
parser.add_argument("--targets", nargs="+", default=data.CROSS_TARGETS,
                    help="crossdataset: datasets evaluated with their own class names and templates")
parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
parser.add_argument("--force", action="store_true", help="redo runs that already have results.json")
parser.add_argument("--cache-views", type=int, default=0,
                    help="K > 0: encode K augmented views of each training image once and train on features")
# method
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from ('' = random init)")
parser.add_argument("--n-ctx", type=int, default=4, help="context length when --ctx-init is '' (CoOp paper: 16)")
parser.add_argument("--csc", action="store_true", help="class-specific context (one context per class; base only)")
parser.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default)")


class PromptLearner(nn.Module):
    """Builds the K prompts [SOS] ctx_1 .. ctx_M name_1 .. name_n . [EOS] as token embeddings (K, T, D)."""

    def __init__(self, model, classnames, ctx_init="a photo of a", n_ctx=4, csc=False):
        super().__init__()
        D = model.token_embedding.embedding_dim
        if ctx_init:
            n_ctx = len(clip.tokenize(ctx_init)[0].nonzero()) - 2  # tokens between SOS and EOS
            with torch.no_grad():
                init = model.token_embedding(clip.tokenize(ctx_init).to(model.positional_embedding.device))
            ctx = init[0, 1:1 + n_ctx].float()  # (M, D)
            if csc:
                ctx = ctx.expand(len(classnames), -1, -1).clone()  # (K, M, D)
        else:
            ctx = torch.randn(len(classnames), n_ctx, D) if csc else torch.randn(n_ctx, D)
            ctx = ctx * 0.02  # N(0, 0.02^2), CoOp's random init
        self.ctx = nn.Parameter(ctx)  # (M, D) or (K, M, D); fp32 whatever the encoder's dtype
        self.n_ctx = n_ctx
        self.set_classnames(model, classnames)

    def set_classnames(self, model, classnames):
        """Token embeddings of everything around the context, for this class list (rebuilt, never saved)."""
        placeholder = " ".join(["X"] * self.n_ctx)
        tokens = clip.tokenize([f"{placeholder} {c}." for c in classnames]).to(self.ctx.device)  # (K, 77)
        self.eot_idx = tokens.argmax(dim=-1)  # (K,)
        T = int(self.eot_idx.max()) + 1  # exact truncation: nothing after the last EOS is ever attended to
        with torch.no_grad():
            embedding = model.token_embedding(tokens[:, :T]).float()  # (K, T, D)
        self.register_buffer("prefix", embedding[:, :1], persistent=False)  # (K, 1, D)  [SOS]
        self.register_buffer("suffix", embedding[:, 1 + self.n_ctx:], persistent=False)  # (K, T-1-M, D)

    def forward(self):
        K = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(K, -1, -1)  # (K, M, D)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (K, T, D)


def text_features(model, prompt_learner, autocast):
    """(K, E) normalised features of the learned prompts."""
    with autocast():
        features = model.encode_token_embeddings(prompt_learner(), prompt_learner.eot_idx)
    return F.normalize(features.float(), dim=-1)


def resolve_device(device, precision):
    """(device, autocast factory): bf16 autocast for the frozen encoders on CUDA by default, fp32 on CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled = dtype != torch.float32
    return device, lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


def store(args):
    """The feature-store folder of --store (None when off)."""
    if args.store == "none":
        return None
    return Path(args.root) / ".cache" / "features" if args.store == "auto" else Path(args.store)


def lr_at_epoch(epoch, lr, epochs, warmup_lr):
    """Dassl's schedule: epoch 0 at warmup_lr, then cosine over the epochs, stepped once per epoch."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def train(model, prompt_learner, split, args, device, autocast):
    """SGD over the context only; one line per epoch; a resumable snapshot at every epoch end."""
    resolution = model.visual.input_resolution
    train_transform = data.transform(resolution, train=True, crop_scale=split.crop_scale)
    batches = evaluation.training_batches(model, split.train, train_transform, args.batch_size, device, autocast,
                                          args.seed, args.cache_views, store(args), args.dataset, args.workers)
    params = [p for p in prompt_learner.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start = resume(prompt_learner, optimizer, args)
    logit_scale = model.logit_scale.exp().float()
    for epoch in range(start, args.epochs):
        lr = lr_at_epoch(epoch, args.lr, args.epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss, correct, seen = 0.0, 0, 0
        for features, labels in tqdm(batches(epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            image_features = F.normalize(features, dim=-1)  # (B, E)
            logits = logit_scale * image_features @ text_features(model, prompt_learner, autocast).t()  # (B, K)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / seen:.4f}  train acc {100 * correct / seen:.1f}  "
              f"lr {lr:.2e}")
        snapshot(prompt_learner, optimizer, epoch, args)


def resume(module, optimizer, args):
    """With --resume: load the last epoch-end snapshot of args.out into module and optimizer; the epoch to start at."""
    path = Path(args.out) / "train_state.pt"
    if not (args.resume and path.exists()):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming {args.out} after epoch {state['epoch']}")
    return state["epoch"]


def snapshot(module, optimizer, epoch, args):
    """The trainable tensors and the optimizer after `epoch`, written atomically (a kill never leaves half a file)."""
    state = {"trainable": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
    evaluation.atomic_write(Path(args.out) / "train_state.pt", lambda tmp: torch.save(state, tmp))


@torch.no_grad()
def evaluate(model, prompt_learner, items, classnames, key, args, device, autocast):
    """Accuracy of the learned prompts on one test set: text features once, image features once (or from the store).

    key: (dataset, split) naming the test set in the feature store."""
    prompt_learner.set_classnames(model, classnames)
    weights = text_features(model, prompt_learner, autocast)  # (K, E)
    transform = data.transform(model.visual.input_resolution, train=False)
    features, labels = evaluation.stored_image_features(model, items, transform, *key, store(args), device,
                                                        autocast)  # (N, E) raw, (N,)
    return evaluation.accuracy(F.normalize(features.to(device), dim=-1) @ weights.t(), labels.to(device))


def method_name(args):
    """The name of this run's method in results.json, tables and the default run folder."""
    return "zero-shot" if args.epochs == 0 else "coop"  # no training: CLIP with the initial prompt "a photo of a {}."


def run(args):
    """One run: one dataset, one seed, one setting. Writes args.json, checkpoint.pt and results.json in args.out."""
    torch.manual_seed(args.seed)
    device, autocast = resolve_device(args.device, args.precision)
    backbone = data.default_backbone(args.dataset, args.root) if args.backbone == "auto" else args.backbone
    print(json.dumps(vars(args) | {"backbone": backbone, "device": device}, indent=2))
    start = time.time()

    model, _ = clip.load(backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen: only the context is learned
    split = data.prepare(args.dataset, args.root, args.shots, args.seed, args.setting, args.download, args.targets)
    prompt_learner = PromptLearner(model, split.train_classnames, args.ctx_init, args.n_ctx, args.csc).to(device)
    n_params = sum(p.numel() for p in prompt_learner.parameters())
    print(f"trainable: {[n for n, _ in prompt_learner.named_parameters()]}, {n_params:,} parameters")

    checkpoint = Path(args.out) / "checkpoint.pt"
    if args.eval_only:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        prompt_learner.ctx.data.copy_(state["ctx"])
    else:
        evaluation.save_json(Path(args.out) / "args.json", vars(args) | {"backbone": backbone})
        evaluation.save_json(Path(args.out) / "train_files.json", split.train_files)
        train(model, prompt_learner, split, args, device, autocast)
        state = {"ctx": prompt_learner.ctx.detach().cpu(), "args": vars(args), "classnames": split.train_classnames}
        evaluation.atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint

    results = {"method": method_name(args), "setting": args.setting, "dataset": args.dataset, "seed": args.seed,
               "shots": args.shots, "backbone": backbone}
    accs = {}
    for name, (items, classnames) in split.tests.items():
        if args.csc and classnames != split.train_classnames:  # class-specific contexts exist only for trained classes
            accs[name] = float("nan")
            continue
        key = (args.dataset, name) if name in ("base", "new", "all") else (name, "test")
        accs[name] = evaluate(model, prompt_learner, items, classnames, key, args, device, autocast)
    return finish(results, accs, split, args, start)


def finish(results, accs, split, args, start):
    """Name the accuracies as the setting's tables read them, save results.json and print the summary line."""
    if args.setting == "base2new":
        results |= {"base_acc": accs["base"], "new_acc": accs["new"], "base_classnames": split.tests["base"][1],
                    "new_classnames": split.tests["new"][1]}
    else:
        results |= {"acc": accs.pop("all"), "targets": accs}
    results["wall_time"] = time.time() - start
    results = evaluation.save_results(args.out, results)
    summary = {"base": results.get("base_acc"), "new": results.get("new_acc"), "H": results.get("H")} \
        if args.setting == "base2new" else {args.dataset: results["acc"]} | accs
    print("  ".join(f"{k} {v:.2f}" for k, v in summary.items() if v is not None) + f"  ({args.out})")
    return results


def main(argv=None):
    """Every (dataset, seed) asked for, one after the other, each in its own folder; finished runs are skipped."""
    args = parser.parse_args(argv)
    datasets = args.dataset or (["imagenet"] if args.setting == "crossdataset" else ["world"])
    jobs = [(d, s) for d in datasets for s in args.seed]
    results = []
    for dataset, seed in jobs:
        one = argparse.Namespace(**(vars(args) | {"dataset": dataset, "seed": seed}))
        folder = Path(args.out or f"runs/{method_name(args)}") / (
            "" if args.out and len(jobs) == 1 else f"{args.setting}/{dataset}/shots{args.shots}_seed{seed}")
        one.out = str(folder)
        if (folder / "results.json").exists() and not (args.force or args.eval_only or args.resume):
            print(f"{folder} is finished (results.json); skipping it (--force redoes it)")
            results.append(json.loads((folder / "results.json").read_text()))
            continue
        results.append(run(one))
    runs_dir = Path(args.out or f"runs/{method_name(args)}") / ("" if args.out else args.setting)
    if len(jobs) > 1 and evaluation.collect(runs_dir, args.setting):
        print(f"\n{evaluation.TABLES[args.setting](runs_dir)}")
    return results[0] if len(jobs) == 1 else results


if __name__ == "__main__":
    main()
