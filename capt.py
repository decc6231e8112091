"""CaPT: class-adaptive prompt tuning, the condition study, and DeCaPT.

Paper: "A Closer Look at Conditional Prompt Tuning for Vision-Language Models", Zhang, Wu, Gao, Song, Sebe, Shen;
arXiv 2506.23856 (IJCV 2026). Official code: Koorye/CaPT (its paper body is not public; the code is the source).
Idea: a conditional prompt helps because of WHAT it is conditioned on. Conditioning CoOp's context on the image
(CoCoOp) helps less than conditioning it on one fixed random vector; conditioning on Textual Class Information (TCI,
the frozen CLIP feature of "a photo of a {class}.") is what fixes the base-new trade-off. A small meta-net maps
SCALE * TCI_c to an offset added to every context token of class c's prompt; new classes get their offsets from
their own names. The loss is a "margin-ITM" cross-entropy whose margins follow the TCI similarities.

    python capt.py                                  # CoOp + CaPT on the built-in world (CPU, seconds)
    python capt.py --condition image                # the condition study: none | image (CoCoOp) | noise | text
    python capt.py --base kgcoop                    # KgCoOp + CaPT
    python capt.py --decapt                         # DeCaPT = KgCoOp + CaPT + DePT's CAT head
    python capt.py --dataset eurosat --root ~/data  # a real benchmark with OpenAI's ViT-B/16

Paper numbers (11-dataset base-to-new averages, ViT-B/16, 16 shots, 3 seeds; Base / New / H):
    CoOp (CaPT's re-run) 80.82 / 69.68 / 74.84     CoOp + CaPT 81.32 / 73.92 / 77.44
    KgCoOp 81.08 / 73.28 / 76.98                    KgCoOp + CaPT 81.50 / 74.47 / 77.83
    DePT 83.64 / 74.58 / 78.85                      DeCaPT 83.99 / 75.70 / 79.63
  Condition study (the meta-net's input): none (CoOp) 80.82 / 69.68 / 74.84; image (CoCoOp) 80.47 / 71.69 / 75.83;
    fixed random noise 80.89 / 72.04 / 76.20; mean image feature 80.46 / 72.74 / 76.41; per-class mean image feature
    81.03 / 73.93 / 77.32; text (TCI) 81.36 / 72.92 / 76.91.

The margin-ITM loss keeps the official code's sign: z'_j = z_j - s*m_j with m_j = eps/(C-1) * S[y, j] for j != y and
m_y = -sum of the others, so the TARGET logit is RAISED (a similarity-weighted label smoothing, the opposite of a
CosFace margin). --epsilon 0 gives plain cross-entropy.

Deviations from the official code:
- fp32 master weights (context, meta-net, CAT head) with bf16 autocast for the frozen CLIP on CUDA; the official
  code trains fp16 parameters with SGD and no master copy.
- One frozen CLIP serves the prompts, the TCI and KgCoOp's hand-crafted features (the official KgCoOp/DeCaPT
  trainers load a second and a third copy).
- TCI is computed once per class list in memory (the official pickle cache ignores template and backbone).
- The noise condition's vector is drawn once from the seed and saved in the checkpoint (the official ablation
  redraws it at test time); the condition study keeps the margin-ITM loss for every condition, as the code does.
- The meta-net maps the joint-embedding width E to the token width D (both 512 for ViT-B/16, where the code uses
  text_projection's width for both); weights initialised U(+-1/sqrt(out_features)) as the code's custom Linear.
- DeCaPT fuses ITM and CAT logits on base classes, as DePT's and CaPT's code do; DePT's paper writes the fusion
  on probabilities (--fusion probs).
- Text prompts run only up to the longest prompt (exact); the image condition runs its B x K prompts in chunks
  with activation checkpointing, so memory stays bounded.

Dimension legend: B batch, K classes, M context tokens, T text tokens, D text width, E joint embedding, h hidden.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import clip
import data
import eval as evaluation

parser = argparse.ArgumentParser(description="CaPT / DeCaPT: class-adaptive prompt tuning")
# shared by every method script
parser.add_argument("--dataset", nargs="+", default=None,
                    help="dataset name(s) (see data.DATASETS), or 'folder'; default world (imagenet for crossdataset)")
parser.add_argument("--root", default="data", help="folder holding the datasets (CoOp's layout)")
parser.add_argument("--shots", type=int, default=16, help="training images per class (papers: 16)")
parser.add_argument("--seed", type=int, nargs="+", default=[1],
                    help="seed(s) of the few-shot sample and the training (papers: 1 2 3); one run per dataset and seed")
parser.add_argument("--backbone", default="auto",
                    help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
parser.add_argument("--epochs", type=int, default=10, help="training epochs (CaPT: 10)")
parser.add_argument("--batch-size", type=int, default=4, help="training batch size (CaPT: 4)")
parser.add_argument("--lr", type=float, default=0.0035, help="SGD learning rate of prompt and meta-net (CaPT: 0.0035)")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--out", default=None,
                    help="run folder of a single run; for several, their parent (default runs/<method>/<setting>/<dataset>/shots<k>_seed<s>, method e.g. coop+text, decapt)")
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
# method (None = the released config of the chosen setting, CaPT configs / A.8 of the notes)
parser.add_argument("--condition", default="text", choices=["none", "image", "noise", "text"],
                    help="the meta-net's input: none = CoOp, image = CoCoOp, noise = one fixed random vector, text = CaPT")
parser.add_argument("--base", default="coop", choices=["coop", "kgcoop"], help="the unconditional method CaPT plugs into")
parser.add_argument("--decapt", action="store_true", help="DeCaPT: KgCoOp + CaPT + DePT's CAT head")
parser.add_argument("--scale", type=float, default=None, help="SCALE on the condition (CoOp 0.5, KgCoOp 1.0, DeCaPT 0.9)")
parser.add_argument("--hidden", type=int, default=None, help="meta-net hidden width (32; DeCaPT 64)")
parser.add_argument("--dropout", type=float, default=None, help="meta-net dropout (0.1; KgCoOp+CaPT 0.0)")
parser.add_argument("--epsilon", type=float, default=None, help="margin-ITM smoothing (CoOp 0.0031, KgCoOp 0.001, DeCaPT 0.0008)")
parser.add_argument("--kg-weight", type=float, default=1.5, help="KgCoOp consistency weight W (CaPT's configs: 1.5)")
parser.add_argument("--cat-weight", type=float, default=0.7, help="DePT's lambda: weight of the CAT head (0.7)")
parser.add_argument("--fusion", default="logits", choices=["logits", "probs"],
                    help="DeCaPT's base-class fusion: logits (DePT's and CaPT's code) or probs (DePT's paper)")
parser.add_argument("--cat-lr-mult", type=float, default=18.0, help="learning-rate multiplier of the CAT head (DeCaPT: 18)")
parser.add_argument("--chunk", type=int, default=64, help="image condition: prompts per text-encoder call")
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from")
parser.add_argument("--n-ctx", type=int, default=4, help="context length when --ctx-init is ''")
parser.add_argument("--csc", action="store_true", help=argparse.SUPPRESS)  # PromptLearner's option; not used by CaPT
parser.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default)")

# released configs: (scale, hidden, dropout, epsilon)
SETTINGS = {"coop": (0.5, 32, 0.1, 0.0031), "kgcoop": (1.0, 32, 0.0, 0.001), "decapt": (0.9, 64, 0.1, 0.0008)}


# Copied from coop.py: PromptLearner
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
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)


# Copied from coop.py: resolve_device
def resolve_device(device, precision):
    """(device, autocast factory): bf16 autocast for the frozen encoders on CUDA by default, fp32 on CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled = dtype != torch.float32
    return device, lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


# Copied from coop.py: store
def store(args):
    """The feature-store folder of --store (None when off)."""
    if args.store == "none":
        return None
    return Path(args.root) / ".cache" / "features" if args.store == "auto" else Path(args.store)


# Copied from coop.py: lr_at_epoch
def lr_at_epoch(epoch, lr, epochs, warmup_lr):
    """Dassl's schedule: epoch 0 at warmup_lr, then cosine over the epochs, stepped once per epoch."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


class MetaNet(nn.Module):
    """The condition (..., E) -> one offset (..., D) added to every context token: down, leaky ReLU, dropout, up."""

    def __init__(self, E, D, hidden, dropout):
        super().__init__()
        self.down, self.up, self.dropout = nn.Linear(E, hidden), nn.Linear(hidden, D), nn.Dropout(dropout)
        for layer in (self.down, self.up):  # the official custom Linear: U(+-1/sqrt(out_features)), no zero init
            bound = 1 / math.sqrt(layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.uniform_(layer.bias, -bound, bound)

    def forward(self, x):
        return self.up(self.dropout(F.leaky_relu(self.down(x))))


class FiLM(nn.Module):
    """DePT's channel adjustment: a learned per-channel scale (init 1) and shift (init 0)."""

    def __init__(self, E):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(E)), nn.Parameter(torch.zeros(E))

    def forward(self, x):
        return x * self.scale + self.shift


class CaPT(nn.Module):
    """CoOp's context + a meta-net offset from the chosen condition (+ DePT's CAT head for DeCaPT)."""

    def __init__(self, model, classnames, template, args):
        super().__init__()
        E, D = model.text_projection.shape[1], model.token_embedding.embedding_dim
        self.condition, self.scale, self.template = args.condition, args.scale, template
        self.prompt_learner = PromptLearner(model, classnames, args.ctx_init, args.n_ctx)
        self.meta = MetaNet(E, D, args.hidden, args.dropout) if args.condition != "none" else None
        g = torch.Generator().manual_seed(args.seed)
        self.register_buffer("noise", torch.randn(1, E, generator=g))  # (1, E) the fixed vector; saved with the run
        if args.decapt:  # DePT's CAT head: FiLM on each modality + one linear classifier over the base classes
            self.film_text, self.film_image = FiLM(E), FiLM(E)
            self.classifier = nn.Linear(E, len(classnames))
        self.decapt = args.decapt

    @torch.no_grad()
    def set_classnames(self, model, classnames, autocast, template=None):
        """Rebuild the prompts' fixed tokens and the TCI for a class list (once per list, never per batch)."""
        self.prompt_learner.set_classnames(model, classnames)
        template = template or self.template  # a cross-dataset target's TCI uses that dataset's template
        tokens = clip.tokenize([template.format(c) for c in classnames]).to(self.noise.device)
        with autocast():
            self.tci = model.encode_text(tokens).float()  # (K, E) unnormalised TCI = CLIP's hand-crafted features
        tci = F.normalize(self.tci, dim=-1)
        self.tci_similarity = tci @ tci.t()  # (K, K), the margin-ITM's S

    def offsets(self, image_features=None):
        """(K, D), (1, D) or (B, D) offsets for the context tokens; None for the unconditioned CoOp."""
        if self.condition == "none":
            return None
        condition = {"text": self.tci, "noise": self.noise}.get(self.condition)
        if self.condition == "image":
            condition = F.normalize(image_features, dim=-1)  # (B, E), CoCoOp's input
        return self.meta(self.scale * condition)

    def prompts(self, offsets):
        """Token embeddings (K, T, D), or (B, K, T, D) for per-image offsets, with the offsets on the context."""
        prompts = self.prompt_learner()  # (K, T, D)
        if offsets is None:
            return prompts
        M, T = self.prompt_learner.n_ctx, prompts.shape[1]
        on_context = torch.zeros(T, 1, device=prompts.device)  # (T, 1): 1 at positions 1..M
        on_context[1:1 + M] = 1
        if self.condition == "image":
            return prompts + offsets[:, None, None, :] * on_context  # (B, K, T, D)
        return prompts + offsets[:, None, :] * on_context  # (K, T, D)


def encode_prompts(model, prompts, eot_idx, autocast, chunk):
    """Raw text features of prompts (K, T, D) -> (K, E), or (B, K, T, D) -> (B, K, E) in chunks of `chunk` prompts.

    With gradients on, each chunk is checkpointed (recomputed in backward), so memory holds one chunk's activations.
    """
    def run(x, eot):
        with autocast():
            return model.encode_token_embeddings(x, eot).float()

    if prompts.dim() == 3:
        return run(prompts, eot_idx)
    B, K, T, D = prompts.shape
    flat, eot = prompts.reshape(B * K, T, D), eot_idx.repeat(B)  # (B*K, T, D), (B*K,)
    out = [checkpoint(run, flat[i:i + chunk], eot[i:i + chunk], use_reentrant=False) if torch.is_grad_enabled()
           else run(flat[i:i + chunk], eot[i:i + chunk]) for i in range(0, B * K, chunk)]
    return torch.cat(out).view(B, K, -1)  # (B, K, E)


def itm_logits(image_features, text_features, logit_scale):
    """CLIP's cosine logits (B, K) for shared (K, E) or per-image (B, K, E) text features."""
    f, g = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if g.dim() == 2:
        return logit_scale * f @ g.t()  # (B, K)
    return logit_scale * torch.einsum("be,bke->bk", f, g)  # (B, K)


def margin_itm_loss(logits, labels, similarity, epsilon, logit_scale):
    """CE over z' = z - s*m with m_j = eps/(C-1) * S[y, j] for j != y and m_y = -sum_{j != y} m_j (raises the target)."""
    C = logits.shape[1]
    if epsilon == 0 or C < 2:
        return F.cross_entropy(logits, labels)
    with torch.no_grad():
        m = epsilon / (C - 1) * similarity[labels]  # (B, C)
        m.scatter_(1, labels[:, None], 0.0)
        m.scatter_(1, labels[:, None], -m.sum(dim=1, keepdim=True))
    return F.cross_entropy(logits - logit_scale * m, labels)


def kgcoop_loss(text_features, tci):
    """KgCoOp: 1 - mean cosine between the learned prompts' features and CLIP's hand-crafted ones (same CLIP)."""
    return 1 - F.cosine_similarity(text_features, tci.expand_as(text_features), dim=-1).mean()


def step_loss(capt, model, f, labels, args, autocast, logit_scale):
    """(loss, ITM logits) of one batch of raw image features f (B, E): margin-ITM (+ KgCoOp) (+ DeCaPT's CAT head)."""
    g = encode_prompts(model, capt.prompts(capt.offsets(f)), capt.prompt_learner.eot_idx, autocast, args.chunk)
    logits = itm_logits(f, g, logit_scale)  # (B, K)
    loss = margin_itm_loss(logits, labels, capt.tci_similarity, args.epsilon, logit_scale)
    if args.decapt:  # both modalities through the one classifier: [FiLM_t(g_y) ; FiLM_i(f)] with labels [y ; y]
        cat_in = torch.cat([capt.film_text(g[labels]), capt.film_image(f)])  # (2B, E)
        cat_loss = F.cross_entropy(capt.classifier(cat_in), torch.cat([labels, labels]))
        loss = (1 - args.cat_weight) * loss + args.cat_weight * cat_loss
    if args.base == "kgcoop":
        loss = loss + args.kg_weight * kgcoop_loss(g, capt.tci)
    return loss, logits


def train(capt, model, split, args, device, autocast):
    """SGD over context, meta-net (and CAT head at lr x cat-lr-mult); one line per epoch; a snapshot at each end."""
    resolution = model.visual.input_resolution
    train_transform = data.transform(resolution, train=True, crop_scale=split.crop_scale)
    batches = evaluation.training_batches(model, split.train, train_transform, args.batch_size, device, autocast,
                                          args.seed, args.cache_views, store(args), args.dataset, args.workers)
    head = [p for n, p in capt.named_parameters() if n.startswith(("film_", "classifier"))]
    rest = [p for n, p in capt.named_parameters() if not n.startswith(("film_", "classifier"))]
    groups = [{"params": rest, "base_lr": args.lr}] + ([{"params": head, "base_lr": args.lr * args.cat_lr_mult}] if head else [])
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start = resume(capt, optimizer, args)
    logit_scale = model.logit_scale.exp().float()
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:  # the warm-up epoch sets every group to warmup_lr
            group["lr"] = lr_at_epoch(epoch, group["base_lr"], args.epochs, args.warmup_lr)
        capt.train()
        total_loss, correct, seen = 0.0, 0, 0
        for features, labels in tqdm(batches(epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            loss, logits = step_loss(capt, model, features, labels, args, autocast, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(-1) == labels).sum().item()
            seen += len(labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / seen:.4f}  train acc {100 * correct / seen:.1f}  "
              f"lr {optimizer.param_groups[0]['lr']:.2e}")
        snapshot(capt, optimizer, epoch, args)


@torch.no_grad()
def predict(capt, model, f, rows, args, autocast):
    """(N, K) logits from raw image features f (N, E).

    rows: None = ITM only; else DeCaPT's fusion (1-lambda)*ITM + lambda*CAT with the CAT head's outputs `rows`
    (slice(None) for the trained classes, the ImageNet labels of ImageNet-A/-R's 200 classes, ...)."""
    logit_scale = model.logit_scale.exp().float()
    eot = capt.prompt_learner.eot_idx
    if capt.condition == "image":  # per-image prompts: B x K of them, so about 64 chunks' worth of images at a time
        per = max(1, args.chunk * 64 // len(eot))  # ImageNet (K = 1000): 4 images = 4,000 prompts per batch
        logits = torch.cat([itm_logits(fb, encode_prompts(model, capt.prompts(capt.offsets(fb)), eot, autocast, args.chunk),
                                       logit_scale) for fb in f.split(per)])  # (N, K)
    else:
        logits = itm_logits(f, encode_prompts(model, capt.prompts(capt.offsets()), eot, autocast, args.chunk), logit_scale)
    if rows is None:
        return logits
    cat_logits = capt.classifier(capt.film_image(f))[:, rows]  # (N, K) the CAT head, trained classes only
    if args.fusion == "probs":  # DePT's paper: fuse probabilities
        return (1 - args.cat_weight) * logits.softmax(-1) + args.cat_weight * cat_logits.softmax(-1)
    return (1 - args.cat_weight) * logits + args.cat_weight * cat_logits  # DePT's code: fuse logits


@torch.no_grad()
def evaluate(capt, model, items, classnames, key, template, rows, args, device, autocast):
    """Accuracy on one test set: text features once per class list (per image batch for the image condition).

    key: (dataset, split) naming the test set in the feature store; rows: see predict."""
    capt.eval()
    capt.set_classnames(model, classnames, autocast, template)
    transform = data.transform(model.visual.input_resolution, train=False)
    f, labels = evaluation.stored_image_features(model, items, transform, *key, store(args), device,
                                                 autocast)  # (N, E) raw: the CAT head reads unnormalised features
    return evaluation.accuracy(predict(capt, model, f.to(device), rows, args, autocast), labels.to(device))


def method_name(args):
    """The name of this run's method in results.json, tables and the default run folder."""
    return "decapt" if args.decapt else f"{args.base}+{args.condition}"  # coop+text = CaPT


def run(args):
    """One run: one dataset, one seed, one setting. Writes args.json, checkpoint.pt and results.json in args.out."""
    if args.decapt:
        if args.condition != "text":
            raise SystemExit("--decapt is KgCoOp + CaPT with the text condition; drop --condition")
        args.base = "kgcoop"
    for name, value in zip(("scale", "hidden", "dropout", "epsilon"), SETTINGS["decapt" if args.decapt else args.base]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.manual_seed(args.seed)
    device, autocast = resolve_device(args.device, args.precision)
    backbone = data.default_backbone(args.dataset, args.root) if args.backbone == "auto" else args.backbone
    print(json.dumps(vars(args) | {"backbone": backbone, "device": device}, indent=2))
    start = time.time()

    model, _ = clip.load(backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen
    split = data.prepare(args.dataset, args.root, args.shots, args.seed, args.setting, args.download, args.targets)
    capt = CaPT(model, split.train_classnames, split.template, args).to(device)
    capt.set_classnames(model, split.train_classnames, autocast)
    n_params = sum(p.numel() for p in capt.parameters())
    print(f"trainable: {[n for n, _ in capt.named_parameters()]}, {n_params:,} parameters")

    checkpoint_path = Path(args.out) / "checkpoint.pt"
    if args.eval_only:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        capt.load_state_dict(state["state_dict"])
    else:
        evaluation.save_json(Path(args.out) / "args.json", vars(args) | {"backbone": backbone})
        evaluation.save_json(Path(args.out) / "train_files.json", split.train_files)
        train(capt, model, split, args, device, autocast)
        state = {"state_dict": {k: v.detach().cpu() for k, v in capt.state_dict().items()}, "args": vars(args),
                 "classnames": split.train_classnames}
        evaluation.atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint

    results = {"method": method_name(args), "setting": args.setting, "dataset": args.dataset, "seed": args.seed,
               "shots": args.shots, "backbone": backbone}
    accs = {}
    for name, (items, classnames) in split.tests.items():
        # DeCaPT fuses the CAT head only on classes it was trained on: base / all / the source, and ImageNet's variants
        # through their ImageNet labels; new classes and other datasets get the ITM head only.
        rows = slice(None) if name in ("base", "all") else split.imagenet_rows.get(name)
        key = (args.dataset, name) if name in ("base", "new", "all") else (name, "test")
        accs[name] = evaluate(capt, model, items, classnames, key, split.templates[name], rows if args.decapt else None,
                              args, device, autocast)
    return finish(results, accs, split, args, start)


# Copied from coop.py: resume
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


# Copied from coop.py: snapshot
def snapshot(module, optimizer, epoch, args):
    """The trainable tensors and the optimizer after `epoch`, written atomically (a kill never leaves half a file)."""
    state = {"trainable": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1}
    evaluation.atomic_write(Path(args.out) / "train_state.pt", lambda tmp: torch.save(state, tmp))


# Copied from coop.py: finish
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


# Copied from coop.py: main
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
