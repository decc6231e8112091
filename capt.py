"""CaPT: class-adaptive prompt tuning, the condition study, and DeCaPT.

Paper: "A Closer Look at Conditional Prompt Tuning for Vision-Language Models", Zhang, Wu, Gao, Song, Sebe, Shen;
arXiv 2506.23856 (IJCV 2026). Official code: Koorye/CaPT (its paper body is not public; the code is the source).
Idea: a conditional prompt helps because of WHAT it is conditioned on. Conditioning CoOp's context on the image
(CoCoOp) helps less than conditioning it on one fixed random vector; conditioning on Textual Class Information (TCI,
the frozen CLIP feature of "a photo of a {class}.") is what fixes the base-new trade-off. A small meta-net maps
SCALE * TCI_c to an offset added to every context token of class c's prompt; new classes get their offsets from
their own names. The loss is a "margin-ITM" cross-entropy whose margins follow the TCI similarities.

    python capt.py                                  # CoOp + CaPT on the built-in world (CPU, seconds)
    python capt.py --condition noise                # the condition study: none | image (CoCoOp) | noise | text
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

Margin-ITM (the official sign): z'_j = z_j - s*m_j, m_j = eps/(C-1) * S[y, j] for j != y and m_y = -sum of the others:
the TARGET logit is RAISED (a similarity-weighted label smoothing, not a CosFace margin). --epsilon 0 is plain CE.
The study's "image" row is CoCoOp as the paper ran it (CaPT's base_trainers/cocoop.py, CoCoOp/vit_b16_ep10_ctx_batch1),
so `--condition image` is exactly that: Linear(E, E/16) - ReLU - Linear(E/16, D) with PyTorch's init, no dropout, no
scale, on the normalised image feature; plain CE; batch 1, lr 0.002. KgCoOp's target uses KgCoOp's own templates (DTD:
"a photo of a {}, a type of texture."), the TCI the dataset's CoOp template.

Deviations from the official code:
- fp32 master weights (context, meta-net, CAT head), bf16 autocast for the frozen CLIP on CUDA (the code: fp16 SGD).
- One frozen CLIP serves prompts, TCI and KgCoOp's target (the KgCoOp/DeCaPT trainers load two more copies); the TCI
  is computed once per class list in memory (the code's pickle cache ignores template and backbone).
- The noise condition's vector is drawn once from the seed and saved in the checkpoint (the official ablation
  redraws it at test time); the none/noise/text conditions keep the margin-ITM loss, as the code does.
- The margin-ITM scales its margins by the model's logit scale; the official MarginLoss hard-codes 100: the same for
  OpenAI's CLIPs (exp(logit_scale) = 100), not for the built-in world's CLIP (26.6), where 100 would over-smooth.
- The meta-net maps the joint-embedding width E to the token width D (both 512 for ViT-B/16; the code uses
  text_projection's width for both); CaPT's weights U(+-1/sqrt(out_features)) as the code's custom Linear.
- DeCaPT fuses ITM and CAT logits on base classes, as DePT's and CaPT's code; DePT's paper fuses probabilities
  (--fusion probs).
- Text prompts run only up to the longest prompt (exact); the image condition runs its B x C prompts in chunks
  with activation checkpointing, so memory stays bounded.

Dimension legend: B batch, C classes, M context tokens, T text tokens, D text width, E joint embedding, h hidden.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import clip
import data
import eval as evaluation
import experiment
import harness

parser = experiment.parser("CaPT / DeCaPT: class-adaptive prompt tuning", epochs=10, batch_size=4, lr=0.0035,
                           recipe="CaPT")
experiment.add_frozen_feature_flags(parser)
# method (unset: the released config of the chosen variant, PRESETS below)
parser.add_argument("--condition", default="text", choices=["none", "image", "noise", "text"],
                    help="the meta-net's input: none = CoOp, image = CoCoOp, noise = one fixed random vector, text = CaPT")
parser.add_argument("--base", default="coop", choices=["coop", "kgcoop"], help="the unconditional method CaPT plugs into")
parser.add_argument("--decapt", action="store_true", help="DeCaPT: KgCoOp + CaPT + DePT's CAT head")
parser.add_argument("--scale", type=experiment.finite, default=None, help="SCALE on the condition (CoOp 0.5, KgCoOp 1.0, DeCaPT 0.9)")
parser.add_argument("--hidden", type=experiment.positive_int, default=None, help="meta-net hidden width (32; DeCaPT 64; CoCoOp E // 16: 32 on ViT-B, 48 on ViT-L/14, 4 on the world)")
parser.add_argument("--dropout", type=experiment.fraction, default=None, help="meta-net dropout (0.1; KgCoOp+CaPT 0.0)")
parser.add_argument("--epsilon", type=experiment.non_negative, default=None, help="margin-ITM smoothing (CoOp 0.0031, KgCoOp 0.001, DeCaPT 0.0008)")
parser.add_argument("--kg-weight", type=experiment.non_negative, default=1.5, help="KgCoOp consistency weight W (CaPT's configs: 1.5)")
parser.add_argument("--cat-weight", type=experiment.fraction, default=0.7, help="DePT's lambda: weight of the CAT head (0.7)")
parser.add_argument("--fusion", default="logits", choices=["logits", "probs"],
                    help="DeCaPT's base-class fusion: logits (DePT's and CaPT's code) or probs (DePT's paper)")
parser.add_argument("--cat-lr-mult", type=experiment.positive, default=18.0, help="learning-rate multiplier of the CAT head (DeCaPT: 18)")
parser.add_argument("--chunk", type=experiment.positive_int, default=64, help="image condition: prompts per text-encoder call")
parser.neutral.add("chunk")  # memory, not numbers
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from; one vector per token (official: per word)")
parser.add_argument("--n-ctx", type=experiment.positive_int, default=4, help="context length when --ctx-init is ''")
parser.add_argument("--warmup-lr", type=experiment.non_negative, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=experiment.fraction, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=experiment.non_negative, default=5e-4, help="SGD weight decay (Dassl default)")

# The released configs (configs.py and configs/trainers/*/*.yaml of Koorye/CaPT), per variant.
PRESETS = {
    "coop": dict(scale=0.5, hidden=32, dropout=0.1, epsilon=0.0031),  # UCPCoOp
    "kgcoop": dict(scale=1.0, hidden=32, dropout=0.0, epsilon=0.001),  # UCPKgCoOp
    "decapt": dict(scale=0.9, hidden=64, dropout=0.1, epsilon=0.0008),  # UCPKgCoOpDePT
    "cocoop": dict(scale=1.0, dropout=0.0, epsilon=0.0, batch_size=1, lr=0.002),  # CoCoOp, ctx_batch1; hidden E // 16
}
KGCOOP_TEMPLATES = {"dtd": "a photo of a {}, a type of texture."}  # KgCoOp's own (base_trainers/kgcoop.py); else CoOp's


@dataclass
class CaPTConfig:
    """What the model and the loss take, resolved from the flags once (see `configure`)."""
    condition: str = "text"
    base: str = "coop"
    decapt: bool = False
    scale: float = 0.5
    hidden: int = None  # None: E // 16, CoCoOp's vis_dim // 16 (its preset leaves --hidden unset)
    dropout: float = 0.1
    epsilon: float = 0.0031
    kg_weight: float = 1.5
    cat_weight: float = 0.7
    fusion: str = "logits"
    chunk: int = 64
    ctx_init: str = "a photo of a"
    n_ctx: int = 4

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# Copied from coop.py: PromptLearner
class PromptLearner(nn.Module):
    """Builds the C prompts [SOS] ctx_1 .. ctx_M name_1 .. name_n . [EOS] as token embeddings (C, T, D)."""

    def __init__(self, model, classnames, ctx_init="a photo of a", n_ctx=4):
        super().__init__()
        if ctx_init:
            n_ctx = len(clip.tokenize(ctx_init)[0].nonzero()) - 2  # tokens between SOS and EOS
            with torch.no_grad():
                init = model.token_embedding(clip.tokenize(ctx_init).to(model.positional_embedding.device))
            ctx = init[0, 1:1 + n_ctx].float()  # (M, D)
        else:
            ctx = torch.randn(n_ctx, model.token_embedding.embedding_dim) * 0.02  # (M, D), CoOp's N(0, 0.02^2)
        self.ctx = nn.Parameter(ctx)  # (M, D); fp32 whatever the encoder's dtype
        self.n_ctx = n_ctx
        self.set_classnames(model, classnames)

    def set_classnames(self, model, classnames):
        """Token embeddings of everything around the context, for this class list (rebuilt, never saved)."""
        placeholder = " ".join(["X"] * self.n_ctx)
        tokens = clip.tokenize([f"{placeholder} {c}." for c in classnames]).to(self.ctx.device)  # (C, 77)
        self.eot_idx = tokens.argmax(dim=-1)  # (C,)
        T = int(self.eot_idx.max()) + 1  # exact truncation: nothing after the last EOS is ever attended to
        with torch.no_grad():
            embedding = model.token_embedding(tokens[:, :T]).float()  # (C, T, D)
        self.register_buffer("prefix", embedding[:, :1], persistent=False)  # (C, 1, D)  [SOS]
        self.register_buffer("suffix", embedding[:, 1 + self.n_ctx:], persistent=False)  # (C, T-1-M, D)

    def forward(self):
        ctx = self.ctx.expand(self.prefix.shape[0], -1, -1)  # (C, M, D)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, T, D)


class MetaNet(nn.Module):
    """The condition (..., E) -> one offset (..., D) added to every context token: down, activation, dropout, up.

    CaPT's: leaky ReLU, weights U(+-1/sqrt(out_features)) as the code's custom Linear. CoCoOp's (cocoop=True): ReLU
    and PyTorch's default Linear init."""

    def __init__(self, E, D, hidden, dropout, cocoop=False):
        super().__init__()
        self.down, self.up, self.dropout = nn.Linear(E, hidden), nn.Linear(hidden, D), nn.Dropout(dropout)
        self.activation = nn.ReLU() if cocoop else nn.LeakyReLU()
        for layer in () if cocoop else (self.down, self.up):
            bound = 1 / math.sqrt(layer.out_features)
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.uniform_(layer.bias, -bound, bound)

    def forward(self, x):
        return self.up(self.dropout(self.activation(self.down(x))))


class FiLM(nn.Module):
    """DePT's channel adjustment: a learned per-channel scale (init 1) and shift (init 0)."""

    def __init__(self, E):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(E)), nn.Parameter(torch.zeros(E))

    def forward(self, x):
        return x * self.scale + self.shift


class CaPT(nn.Module):
    """CoOp's context + a meta-net offset from the chosen condition (+ DePT's CAT head for DeCaPT)."""

    def __init__(self, model, classnames, template, cfg, seed=1):
        super().__init__()
        E, D = model.text_projection.shape[1], model.token_embedding.embedding_dim
        self.cfg, self.template = cfg, template
        self.prompt_learner = PromptLearner(model, classnames, cfg.ctx_init, cfg.n_ctx)
        cocoop = cfg.condition == "image"
        hidden = cfg.hidden if cfg.hidden is not None else E // 16
        self.meta = MetaNet(E, D, hidden, cfg.dropout, cocoop=cocoop) if cfg.condition != "none" else None
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("noise", torch.randn(1, E, generator=g))  # (1, E) the fixed vector; saved with the run
        if cfg.decapt:  # DePT's CAT head: FiLM on each modality + one linear classifier over the base classes
            self.film_text, self.film_image = FiLM(E), FiLM(E)
            self.classifier = nn.Linear(E, len(classnames))

    @torch.no_grad()
    def set_classnames(self, model, classnames, autocast, template=None, kg_template=None):
        """Rebuild the prompts' fixed tokens, the TCI and (KgCoOp) the hand-crafted target for a class list (once per
        list, never per batch). A cross-dataset target's TCI uses that dataset's template."""
        self.prompt_learner.set_classnames(model, classnames)

        def encode(template):  # (C, E) unnormalised features of CLIP's hand-crafted prompts
            tokens = clip.tokenize([template.format(c) for c in classnames]).to(self.noise.device)
            with autocast():
                return model.encode_text(tokens).float()
        self.tci = encode(template or self.template)  # (C, E)
        tci = F.normalize(self.tci, dim=-1)
        self.tci_similarity = tci @ tci.t()  # (C, C), the margin-ITM's S
        self.kg_target = encode(kg_template) if kg_template else self.tci  # (C, E), KgCoOp's consistency target

    def offsets(self, image_features=None):
        """(C, D), (1, D) or (B, D) offsets for the context tokens; None for the unconditioned CoOp."""
        if self.cfg.condition == "none":
            return None
        condition = {"text": self.tci, "noise": self.noise}.get(self.cfg.condition)
        if self.cfg.condition == "image":
            condition = F.normalize(image_features, dim=-1)  # (B, E), CoCoOp's input
        return self.meta(self.cfg.scale * condition)

    def prompts(self, offsets):
        """Token embeddings (C, T, D), or (B, C, T, D) for per-image offsets, with the offsets on the context."""
        prompts = self.prompt_learner()  # (C, T, D)
        if offsets is None:
            return prompts
        M, T = self.prompt_learner.n_ctx, prompts.shape[1]
        on_context = torch.zeros(T, 1, device=prompts.device)  # (T, 1): 1 at positions 1..M
        on_context[1:1 + M] = 1
        if self.cfg.condition == "image":
            return prompts + offsets[:, None, None, :] * on_context  # (B, C, T, D)
        return prompts + offsets[:, None, :] * on_context  # (C, T, D)


def encode_prompts(model, prompts, eot_idx, autocast, chunk):
    """Raw text features of prompts (C, T, D) -> (C, E), or (B, C, T, D) -> (B, C, E) in chunks of `chunk` prompts.

    With gradients on, each chunk is checkpointed (recomputed in backward), so memory holds one chunk's activations.
    """
    def run(x, eot):
        with autocast():
            return model.encode_token_embeddings(x, eot).float()

    if prompts.dim() == 3:
        return run(prompts, eot_idx)
    B, C, T, D = prompts.shape
    flat, eot = prompts.reshape(B * C, T, D), eot_idx.repeat(B)  # (B*C, T, D), (B*C,)
    out = [checkpoint(run, flat[i:i + chunk], eot[i:i + chunk], use_reentrant=False) if torch.is_grad_enabled()
           else run(flat[i:i + chunk], eot[i:i + chunk]) for i in range(0, B * C, chunk)]
    return torch.cat(out).view(B, C, -1)  # (B, C, E)


def itm_logits(image_features, text_features, logit_scale):
    """CLIP's cosine logits (B, C) for shared (C, E) or per-image (B, C, E) text features."""
    f, g = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    if g.dim() == 2:
        return logit_scale * f @ g.t()  # (B, C)
    return logit_scale * torch.einsum("be,bce->bc", f, g)  # (B, C)


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


def kgcoop_loss(text_features, target):
    """KgCoOp: 1 - mean cosine between the learned prompts' features and CLIP's hand-crafted ones (same CLIP)."""
    return 1 - F.cosine_similarity(text_features, target.expand_as(text_features), dim=-1).mean()


def step_loss(capt, model, f, labels, autocast):
    """(loss, ITM logits) of one batch of raw image features f (B, E): margin-ITM (+ KgCoOp) (+ DeCaPT's CAT head)."""
    cfg, logit_scale = capt.cfg, model.logit_scale.exp().float()
    g = encode_prompts(model, capt.prompts(capt.offsets(f)), capt.prompt_learner.eot_idx, autocast=autocast,
                       chunk=cfg.chunk)
    logits = itm_logits(f, g, logit_scale)  # (B, C)
    loss = margin_itm_loss(logits, labels, capt.tci_similarity, epsilon=cfg.epsilon, logit_scale=logit_scale)
    if cfg.decapt:  # both modalities through the one classifier: [FiLM_t(g_y) ; FiLM_i(f)] with labels [y ; y]
        cat_in = torch.cat([capt.film_text(g[labels]), capt.film_image(f)])  # (2B, E)
        cat_loss = F.cross_entropy(capt.classifier(cat_in), torch.cat([labels, labels]))
        loss = (1 - cfg.cat_weight) * loss + cfg.cat_weight * cat_loss
    if cfg.base == "kgcoop":
        loss = loss + cfg.kg_weight * kgcoop_loss(g, capt.kg_target)
    return loss, logits


def train(capt, model, split, args, *, device, autocast):
    """SGD over context, meta-net (and CAT head at lr x cat-lr-mult); one line per epoch; a snapshot at each end."""
    transform = split.train_transform(model.visual.input_resolution)
    batches = experiment.training_batches(model, split.train, transform, args.batch_size, seed=args.seed,
                                          device=device, autocast=autocast, views=args.cache_views,
                                          store=evaluation.store_dir(args), dataset=args.dataset,
                                          num_workers=args.workers)
    head = [p for n, p in capt.named_parameters() if n.startswith(("film_", "classifier"))]
    rest = [p for n, p in capt.named_parameters() if not n.startswith(("film_", "classifier"))]
    groups = [{"params": rest, "base_lr": args.lr}]
    if head:
        groups.append({"params": head, "base_lr": args.lr * args.cat_lr_mult})
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def step(inputs, labels):
        """One training step: the frozen image encoder (no gradients), the loss, backward, SGD."""
        if inputs.dim() == 4:  # images (B, 3, R, R); --cache-views hands stored features (B, E) instead
            with torch.no_grad(), autocast():
                inputs = model.encode_image(inputs).float()  # (B, E)
        loss, logits = step_loss(capt, model, inputs, labels, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    if args.cuda_graph:
        step = harness.cuda_graph(step, optimizer)  # the same step, captured once per learning rate and replayed
    start, _ = experiment.resume(args.out, capt, optimizer) if args.resume else (0, {})
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:  # the warm-up epoch sets every group to warmup_lr
            group["lr"] = experiment.lr_at_epoch(epoch, group["base_lr"], args.epochs, args.warmup_lr)
        capt.train()
        meter = experiment.Meter()
        for inputs, labels in experiment.progress(batches(epoch), f"epoch {epoch + 1}/{args.epochs}"):
            loss, logits = step(inputs, labels)
            meter.add(loss, logits, labels)
        print(f"epoch {epoch + 1}/{args.epochs}  {meter.summary(epoch, optimizer.param_groups[0]['lr'])}")
        experiment.snapshot(args.out, capt, optimizer, epoch, meter=meter)


@torch.no_grad()
def predict(capt, model, f, rows, autocast):
    """(N, C) logits from raw image features f (N, E).

    rows: None = ITM only; else DeCaPT's fusion (1-lambda)*ITM + lambda*CAT with the CAT head's outputs `rows`
    (slice(None) for the trained classes, the ImageNet labels of ImageNet-A/-R's 200 classes, ...)."""
    cfg, logit_scale, eot = capt.cfg, model.logit_scale.exp().float(), capt.prompt_learner.eot_idx
    if cfg.condition == "image":  # per-image prompts: B x C of them, so about 64 chunks' worth of images at a time
        per = max(1, cfg.chunk * 64 // len(eot))  # ImageNet (C = 1000): 4 images = 4,000 prompts per batch
        logits = []
        for fb in f.split(per):
            prompts = capt.prompts(capt.offsets(fb))  # (b, C, T, D)
            g = encode_prompts(model, prompts, eot, autocast=autocast, chunk=cfg.chunk)  # (b, C, E)
            logits.append(itm_logits(fb, g, logit_scale))
        logits = torch.cat(logits)  # (N, C)
    else:
        g = encode_prompts(model, capt.prompts(capt.offsets()), eot, autocast=autocast, chunk=cfg.chunk)  # (C, E)
        logits = itm_logits(f, g, logit_scale)  # (N, C)
    if rows is None:
        return logits
    cat_logits = capt.classifier(capt.film_image(f))[:, rows]  # (N, C) the CAT head, trained classes only
    if cfg.fusion == "probs":  # DePT's paper: fuse probabilities
        return (1 - cfg.cat_weight) * logits.softmax(-1) + cfg.cat_weight * cat_logits.softmax(-1)
    return (1 - cfg.cat_weight) * logits + cfg.cat_weight * cat_logits  # DePT's code: fuse logits


@torch.no_grad()
def evaluate(capt, model, test, args, *, device, autocast):
    """Accuracy on one test set: text features once per class list (per image batch for the image condition).

    DeCaPT fuses its CAT head only on classes it was trained on: base / all of the source, and ImageNet's variants
    through their ImageNet labels; new classes and other datasets get the ITM head only."""
    capt.eval()
    capt.set_classnames(model, test.classnames, autocast, test.template)
    f, labels = evaluation.stored_test_features(model, test, args, device=device,
                                                autocast=autocast)  # (N, E) raw: the CAT head reads them
    rows = slice(None) if test.name in ("base", "all") else test.imagenet_rows
    return evaluation.accuracy(predict(capt, model, f, rows if capt.cfg.decapt else None, autocast=autocast), labels)


def configure(args):
    """DeCaPT implies KgCoOp + text; the image condition is CoCoOp; unset flags take the variant's released config.
    The run's name: capt, capt-none, capt-noise, kgcoop+capt ... (from this file's name), cocoop or decapt."""
    if args.decapt and args.condition != "text":
        raise ValueError("--decapt is KgCoOp + CaPT with the text condition; drop --condition")
    if args.condition == "image" and args.base != "coop":
        raise ValueError("--condition image is CoCoOp, released on CoOp's context only; drop --base kgcoop")
    if args.decapt:
        args.base = "kgcoop"
    if args.cuda_graph and args.condition == "image":
        raise ValueError("--cuda-graph: the image condition's checkpointed chunks are not captured; drop --cuda-graph")
    experiment.fill(args, PRESETS["decapt" if args.decapt else "cocoop" if args.condition == "image" else args.base])
    own = args.method  # this file's name (capt; a copy's own), for the variants that are CaPT's
    name = {"text": own, "none": f"{own}-none", "noise": f"{own}-noise", "image": "cocoop"}[args.condition]
    args.method = "decapt" if args.decapt else name if args.base == "coop" else f"kgcoop+{name}"


def run(args):
    """One run (one dataset, one seed): train prompt and meta-net (and CAT head), then score every test set."""
    split = data.prepare_for(args)
    experiment.check_prompts(split, args.ctx_init or " ".join(["X"] * args.n_ctx))  # CLIP reads 77 tokens: checked now
    device, autocast = experiment.start(args, split)  # seeded; autocast: bf16 for the frozen CLIP on CUDA, fp32 on CPU
    model, _ = clip.load(args.backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen: only the context, meta-net (and CAT head) train
    if args.compile:
        model = harness.compile_encoders(model)
    capt = CaPT(model, split.classnames, split.template, CaPTConfig.from_args(args), seed=args.seed).to(device)
    capt.set_classnames(model, split.classnames, autocast, kg_template=KGCOOP_TEMPLATES.get(split.dataset))
    experiment.show_trainable(capt)
    if args.eval_only:
        experiment.load_checkpoint(args.out, capt)
    else:
        train(capt, model, split, args, device=device, autocast=autocast)
        experiment.save_checkpoint(args.out, capt, split)
    accs = {name: evaluate(capt, model, test, args, device=device, autocast=autocast)
            for name, test in split.tests.items()}
    return evaluation.results(split, accs)


def main(argv=None):
    return harness.main(parser, configure, run, argv)


if __name__ == "__main__":
    main()
