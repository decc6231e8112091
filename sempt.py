"""SemPT: semantic prompt tuning with shared, LLM-written attribute descriptions.

Paper: "SemPT: Semantic Prompt Tuning for Vision-Language Models", Shi, Ou, Chen; arXiv 2508.10645 (2025).
Idea: class labels alone carry nothing to unseen classes; attributes SHARED by all classes of a dataset do. An LLM
is asked in two steps (1: the K visual attributes shared by the dataset's classes; 2: J sentences per attribute for
each class). At training, the image weighs the K attribute embeddings of each class (visually guided weighting) and
the weighted sum enhances the learned label embedding; the image is aligned with both the label and the
attribute-enhanced embeddings. At test, seen classes use the label head and unseen classes the attribute head.

    python sempt.py                                             # the built-in offline world (CPU, seconds)
    python sempt.py --dataset eurosat --root ~/data             # a real benchmark with OpenAI's ViT-B/16

The descriptions are data, shipped for the world and CoOp's 11 datasets (ImageNet's file also serves its four
variants): describe.py's two v1 prompts answered by hand, class by class, by Claude (each file's "llm" says so),
5 attributes x 3 sentences per class (ImageNet: 2). descriptions/describe.py writes one for any other dataset
with any OpenAI-compatible endpoint (the two prompts, the client, validation and cache live there):
    OPENAI_API_KEY=... python descriptions/describe.py --dataset dtd --root ~/data --llm-model gpt-4o

What is SemPT's and what is reconstructed. The paper's body and code are not public; its abstract states: the
two-step prompting for shared attributes and attribute-level descriptions, visually guided weighting of the
attribute embeddings, joint alignment with label and attribute-enhanced embeddings, and the seen -> label /
unseen -> attribute choice at inference. Reconstructed here (closest published code: TAP, MMRL, KgCoOp/TCP):
- the two prompts' wording (describe.py's prompt version v1), K = 5 attributes, J = 3 sentences;
- learnable part = CoOp's context only (4 tokens from "a photo of a"); attribute embeddings = the frozen text
  encoder's features of the J sentences, averaged and normalised;
- weights w = softmax over the K attributes of cos(image, attribute) / tau (tau = 0.01); enhanced embedding
  normalize(t + beta * sum_k w_k a_k) (beta = 1); loss CE(label) + lambda * CE(attribute) (lambda = 1), and an
  optional KgCoOp term toward CLIP's hand-crafted features (off: --kg-weight 0);
- the training recipe, unknown for SemPT, is coop.py's (10 epochs, batch 4, SGD 0.0035), so that a comparison
  with CoOp changes the method only;
- seen classes evaluated in another domain (ImageNet variants): label head by default, --dg-head attr for MMRL's rule.
No SemPT results are public: there are no paper numbers to reproduce.

Description files (descriptions/<dataset>.json; ImageNet's variants read imagenet.json):
    {"dataset", "llm", "prompt_version", "attributes": [K], "descriptions": {class: {attribute: [J sentences]}}}
TAP's {class: {attribute: [...]}}, and CuPL's or DCLIP's {class: [...]} (one attribute) files are read as well.

Dimension legend: B batch, C classes, K attributes, J sentences, M context tokens, T text tokens, D text width,
E joint embedding.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip
import data
import eval as evaluation
import experiment
import harness

parser = experiment.parser("SemPT: prompt tuning with shared attribute descriptions", epochs=10, batch_size=4,
                           lr=0.0035, recipe="SemPT's recipe is not public: coop.py's")
experiment.add_frozen_feature_flags(parser)  # --store also keeps the attribute embeddings
# method (reconstructed defaults, see the docstring)
parser.add_argument("--descriptions", default=None, type=experiment.path,
                    help="one description file for every dataset of the run, cross-dataset targets included "
                         "(default descriptions/<dataset>.json)")
parser.add_argument("--tau", type=experiment.positive, default=0.01, help="temperature of the visually guided weighting (0.01)")
parser.add_argument("--beta", type=experiment.non_negative, default=1.0, help="weight of the attribute summary in the enhanced embedding (1)")
parser.add_argument("--attr-weight", type=experiment.non_negative, default=1.0, help="lambda: weight of the attribute-head loss (1)")
parser.add_argument("--kg-weight", type=experiment.non_negative, default=0.0, help="optional KgCoOp term toward CLIP's hand-crafted prompts (0 = off)")
parser.add_argument("--dg-head", default="label", choices=["label", "attr"],
                    help="head for seen classes evaluated in another domain (ImageNet variants); MMRL uses attr")
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from ('' = random init); one vector per token (official: per word)")
parser.add_argument("--n-ctx", type=experiment.positive_int, default=4, help="context length when --ctx-init is ''")
parser.add_argument("--warmup-lr", type=experiment.non_negative, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=experiment.fraction, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=experiment.non_negative, default=5e-4, help="SGD weight decay (Dassl default)")


@dataclass
class SemPTConfig:
    """What the model and the loss take, resolved from the flags once."""
    tau: float = 0.01
    beta: float = 1.0
    attr_weight: float = 1.0
    kg_weight: float = 0.0
    ctx_init: str = "a photo of a"
    n_ctx: int = 4

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# ---------------------------------------------------------------------------------------------------------------
# The attribute embeddings: descriptions -> frozen text features.

def default_descriptions(dataset):
    """descriptions/<dataset>.json beside this file; ImageNet's variants share imagenet.json."""
    name = "imagenet" if dataset in data.IMAGENET_VARIANTS else dataset
    return Path(__file__).parent / "descriptions" / f"{name}.json"


def load_descriptions(path, classnames):
    """(attributes [K], {class: {attribute: [sentences]}}) for the given class names, from any supported format."""
    path = Path(path)
    if not path.exists():
        raise data.InputError(f"no description file {path}; write one with `python descriptions/describe.py "
                              f"--dataset ... --llm-url ...` or pass --descriptions FILE")
    fix = "fix the file or write it again with descriptions/describe.py"
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise data.InputError(f"{path} is not valid JSON ({e}); {fix}") from None
    def strings(v, where):  # every value of every format: a non-empty list of non-empty strings, else one error line
        bad = [s for s in v if not (isinstance(s, str) and s.strip())] if isinstance(v, list) and v else [v]
        if bad:
            raise data.InputError(f"{path}: {where} must be a list of non-empty strings, found "
                                  f"{json.dumps(bad[0])[:80]}{'' if bad[0] is v else ' in it'}; {fix}")
        return list(v)
    ours = isinstance(raw, dict) and "descriptions" in raw and "attributes" in raw
    table = raw["descriptions"] if ours else raw  # ours, TAP's {class: {attribute: [...]}} or CuPL's {class: [...]}
    if not isinstance(table, dict):
        raise data.InputError(f"{path}: expected an object {{class: ...}}, found {json.dumps(table)[:80]}; {fix}")
    normal = lambda c: data.classname(c).strip().lower()  # noqa: E731  data.py's rule, case-blind like TAP
    table = {normal(c): {a: strings(s, f"class {c!r}, attribute {a!r}") for a, s in v.items()}
             if isinstance(v, dict) and v else {"description": strings(v, f"class {c!r}")} for c, v in table.items()}
    missing = [c for c in classnames if normal(c) not in table]
    if missing:
        raise data.InputError(f"{path} has no descriptions for {len(missing)} classes: {missing}")
    attributes = strings(raw["attributes"], 'its "attributes"') if ours else list(table[normal(classnames[0])])
    out = {}
    for c in classnames:
        entry = table[normal(c)]
        lacking = [a for a in attributes if not entry.get(a)]
        if lacking:
            raise data.InputError(f"{path}: class {c!r} has no sentences for attributes {lacking}")
        out[c] = {a: list(entry[a]) for a in attributes}
    return attributes, out


@torch.no_grad()
def attribute_embeddings(model, attributes, descriptions, store, autocast, chunk=256):
    """{class: (K, E)}: per attribute, the mean of its J sentences' normalised features, normalised; kept in the
    feature store (--store) under a key of the text encoder's weights, the sentences and the precision."""
    names = list(descriptions)
    device = model.positional_embedding.device

    def compute():
        sentences = [(i, k, s) for i, c in enumerate(names) for k, a in enumerate(attributes) for s in descriptions[c][a]]
        feats = []
        for start in experiment.progress(range(0, len(sentences), chunk), "attribute embeddings"):
            tokens = clip.tokenize([s for _, _, s in sentences[start:start + chunk]], truncate=True).to(device)
            with autocast():
                feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        feats = torch.cat(feats)  # (sentences, E)
        index = torch.tensor([i * len(attributes) + k for i, k, _ in sentences], device=device)
        sums = torch.zeros(len(names) * len(attributes), feats.shape[1], device=device).index_add_(0, index, feats)
        A = F.normalize(sums, dim=-1).view(len(names), len(attributes), -1)  # (C, K, E); the mean's 1/J cancels here
        return {"embeddings": A.cpu()}
    if store is None:
        A = compute()["embeddings"]
    else:
        parts = [evaluation.model_fingerprint(model, part="text"), attributes, descriptions,
                 evaluation.precision_of(autocast)]
        key = "sempt_attributes_" + evaluation.key_of(parts)[:32]
        A = evaluation.stored(store, key, compute)["embeddings"]
    return dict(zip(names, A.to(device)))


def attributes_of(model, dataset, classnames, args, autocast):
    """{class: (K, E)} attribute embeddings of a dataset's classes, from its description file (or --descriptions)."""
    path = args.descriptions or default_descriptions(dataset)
    names, descriptions = load_descriptions(path, classnames)
    print(f"{path}: {len(names)} attributes {names}")
    return attribute_embeddings(model, names, descriptions, store=evaluation.store_dir(args), autocast=autocast)


# ---------------------------------------------------------------------------------------------------------------
# The model: CoOp's learned label embeddings + visually weighted attribute embeddings.

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


# Copied from coop.py: text_features
def text_features(model, prompt_learner, autocast):
    """(C, E) normalised features of the learned prompts."""
    with autocast():
        features = model.encode_token_embeddings(prompt_learner(), prompt_learner.eot_idx)
    return F.normalize(features.float(), dim=-1)


class SemPT(nn.Module):
    """The learned context, and for the current class list: attribute embeddings A (C, K, E), M = A A^T (C, K, K)
    and CLIP's hand-crafted features (for the optional KgCoOp term)."""

    def __init__(self, model, classnames, cfg):
        super().__init__()
        self.cfg = cfg
        self.prompt_learner = PromptLearner(model, classnames, cfg.ctx_init, cfg.n_ctx)

    @torch.no_grad()
    def set_classnames(self, model, classnames, attributes, template):
        self.prompt_learner.set_classnames(model, classnames)
        self.A = torch.stack([attributes[c] for c in classnames])  # (C, K, E)
        self.M = self.A @ self.A.transpose(1, 2)  # (C, K, K)
        if self.cfg.kg_weight:
            self.clip_t = evaluation.zeroshot_weights(model, classnames, template, self.A.device)  # (C, E)

    def logits(self, f, t, label_head, scale):
        """(B, C) test logits of normalised image features f (B, E) and label embeddings t (C, E): per class, the
        label head or, where label_head (C,) is False, the attribute head."""
        label = scale * f @ t.t()  # (B, C)
        if bool(label_head.all()):
            return label
        attr = attribute_logits(f, t, self.A, self.M, beta=self.cfg.beta, tau=self.cfg.tau, scale=scale)  # (B, C)
        return torch.where(label_head[None], label, attr)


def attribute_weights(s, tau):
    """Visually guided weighting: (B, C, K) = softmax over the K attributes of s / tau, where s (B, C, K) holds
    cos(image b, attribute k of class c)."""
    return (s / tau).softmax(dim=-1)


def attribute_logits(f, t, A, M, beta, tau, scale):
    """(B, C) = scale * cos(f_b, normalize(t_c + beta * sum_k w_bck a_ck)) without building the (B, C, E) tensor.

    f (B, E), t (C, E) and A (C, K, E) are normalised; M = A A^T (C, K, K). With s = f.a and G = t.a:
    f.u = f.t + beta sum_k w s,   |u|^2 = 1 + 2 beta sum_k w G + beta^2 sum_kl w_k w_l M_kl.
    """
    s = torch.einsum("be,cke->bck", f, A)  # (B, C, K)
    w = attribute_weights(s, tau)  # (B, C, K)
    G = torch.einsum("ce,cke->ck", t, A)  # (C, K)
    dot = f @ t.t() + beta * (w * s).sum(-1)  # (B, C)
    wMw = (torch.einsum("bck,ckl->bcl", w, M) * w).sum(-1)  # (B, C)
    norm_sq = 1 + 2 * beta * (w * G).sum(-1) + beta ** 2 * wMw  # (B, C)
    return scale * dot / norm_sq.clamp_min(1e-12).sqrt()


def use_label_head(classnames, seen, seen_head="label"):
    """(C,) bool: the label head for classes seen in training (unless --dg-head attr), the attribute head otherwise."""
    return torch.tensor([c in seen and seen_head == "label" for c in classnames])


def step_loss(sempt, model, features, labels, autocast):
    """(loss, label logits) of one batch of raw image features: CE(label head) + lambda CE(attribute head) (+ KgCoOp)."""
    cfg, scale = sempt.cfg, model.logit_scale.exp().float()
    f = F.normalize(features, dim=-1)  # (B, E)
    t = text_features(model, sempt.prompt_learner, autocast)  # (C, E)
    label = scale * f @ t.t()  # (B, C)
    loss = F.cross_entropy(label, labels)
    attr = attribute_logits(f, t, sempt.A, sempt.M, beta=cfg.beta, tau=cfg.tau, scale=scale)  # (B, C)
    loss = loss + cfg.attr_weight * F.cross_entropy(attr, labels)
    if cfg.kg_weight:
        loss = loss + cfg.kg_weight * (1 - (t * sempt.clip_t).sum(-1).mean())
    return loss, label


# Copied from coop.py: train
def train(module, model, split, args, *, device, autocast):
    """SGD over the module's trainable tensors with Dassl's schedule; one line per epoch; a snapshot at each end."""
    transform = split.train_transform(model.visual.input_resolution)
    batches = experiment.training_batches(model, split.train, transform, args.batch_size, seed=args.seed,
                                          device=device, autocast=autocast, views=args.cache_views,
                                          store=evaluation.store_dir(args), dataset=args.dataset,
                                          num_workers=args.workers)
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def step(inputs, labels):
        """One training step: the frozen image encoder (no gradients), the loss, backward, SGD."""
        if inputs.dim() == 4:  # images (B, 3, R, R); --cache-views hands stored features (B, E) instead
            with torch.no_grad(), autocast():
                inputs = model.encode_image(inputs).float()  # (B, E)
        loss, logits = step_loss(module, model, inputs, labels, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    if args.cuda_graph:
        step = harness.cuda_graph(step, optimizer)  # the same step, captured once per learning rate and replayed
    start, _ = experiment.resume(args.out, module, optimizer) if args.resume else (0, {})
    for epoch in range(start, args.epochs):
        lr = experiment.lr_at_epoch(epoch, args.lr, args.epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter = experiment.Meter()
        for inputs, labels in experiment.progress(batches(epoch), f"epoch {epoch + 1}/{args.epochs}"):
            loss, logits = step(inputs, labels)
            meter.add(loss, logits, labels)
        print(f"epoch {epoch + 1}/{args.epochs}  {meter.summary(epoch, lr)}")
        experiment.snapshot(args.out, module, optimizer, epoch, meter=meter)


@torch.no_grad()
def evaluate(sempt, model, test, args, *, seen, seen_head, device, autocast):
    """(accuracy, heads used) on one test set, each class scored by its head; images in batches keep memory at
    (B, C, K). seen: the training classes; seen_head: their head (--dg-head when tested in another domain)."""
    t = text_features(model, sempt.prompt_learner, autocast)  # (C, E)
    label_head = use_label_head(test.classnames, seen, seen_head).to(device)  # (C,)
    f, labels = evaluation.stored_test_features(model, test, args, device=device, autocast=autocast)  # (N, E) raw, (N,)
    f, scale = F.normalize(f, dim=-1), model.logit_scale.exp().float()
    logits = torch.cat([sempt.logits(fb, t, label_head, scale) for fb in f.split(256)])  # (N, C)
    heads = "label" if bool(label_head.all()) else "attribute" if not bool(label_head.any()) else \
        "label (seen) + attribute (unseen)"
    return evaluation.accuracy(logits, labels), heads


def configure(args):
    """SemPT has no presets; its runs take this file's name (sempt; a copy's own)."""


def run(args):
    """One run (one dataset, one seed): train the context with both heads, then score every test set."""
    split = data.prepare_for(args)
    experiment.check_prompts(split, args.ctx_init or " ".join(["X"] * args.n_ctx))  # CLIP reads 77 tokens: checked now
    device, autocast = experiment.start(args, split)  # seeded; autocast: bf16 for the frozen CLIP on CUDA, fp32 on CPU
    model, _ = clip.load(args.backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen: only the context trains
    if args.compile:
        model = harness.compile_encoders(model)
    own = [t for t in split.tests.values() if t.dataset == split.dataset]  # the training dataset's own test sets
    attributes = attributes_of(model, args.dataset, sorted({c for t in own for c in t.classnames}), args,
                               autocast=autocast)
    sempt = SemPT(model, split.classnames, SemPTConfig.from_args(args)).to(device)
    experiment.show_trainable(sempt)
    if args.eval_only:
        seen = set(experiment.load_checkpoint(args.out, sempt)["classnames"])
    else:
        sempt.set_classnames(model, split.classnames, attributes, split.template)
        train(sempt, model, split, args, device=device, autocast=autocast)
        experiment.save_checkpoint(args.out, sempt, split)
        seen = set(split.classnames)
    accs, heads = {}, {}
    for name, test in split.tests.items():
        # A cross-dataset target reads its own descriptions; its seen classes (another domain) use --dg-head.
        target = test.dataset != split.dataset
        test_attributes = attributes_of(model, name, test.classnames, args, autocast=autocast) if target else attributes
        sempt.set_classnames(model, test.classnames, test_attributes, test.template)
        accs[name], heads[f"{name}_head"] = evaluate(sempt, model, test, args, seen=seen, device=device,
                                                     seen_head=args.dg_head if target else "label", autocast=autocast)
    return evaluation.results(split, accs, **heads)


def main(argv=None):
    return harness.main(parser, configure, run, argv)


if __name__ == "__main__":
    main()
