"""SemPT: semantic prompt tuning with shared, LLM-written attribute descriptions.

Paper: "SemPT: Semantic Prompt Tuning for Vision-Language Models", Shi, Ou, Chen; arXiv 2508.10645 (2025).
Idea: class labels alone carry nothing to unseen classes; attributes SHARED by all classes of a dataset do. An LLM
is asked in two steps (1: the K visual attributes shared by the dataset's classes; 2: J sentences per attribute for
each class). At training, the image weighs the K attribute embeddings of each class (visually guided weighting) and
the weighted sum enhances the learned label embedding; the image is aligned with both the label and the
attribute-enhanced embeddings. At test, seen classes use the label head and unseen classes the attribute head.

    python sempt.py                                             # the built-in offline world (CPU, a few minutes)
    python sempt.py --dataset eurosat --root ~/data             # a real benchmark with OpenAI's ViT-B/16
    OPENAI_API_KEY=... python sempt.py --describe --dataset dtd --root ~/data \\
        --llm-url https://api.openai.com/v1 --llm-model gpt-4o  # write descriptions/dtd.json with any chat LLM

What is SemPT's and what is reconstructed. The paper's body and code are not public; its abstract states: the
two-step prompting for shared attributes and attribute-level descriptions, visually guided weighting of the
attribute embeddings, joint alignment with label and attribute-enhanced embeddings, and the seen -> label /
unseen -> attribute choice at inference. Reconstructed here (closest published code: TAP, MMRL, KgCoOp/TCP):
- the two prompts' wording (prompt version v1 below), K = 5 attributes, J = 3 sentences;
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
import argparse
import hashlib
import json
import math
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import eval as evaluation

parser = argparse.ArgumentParser(description="SemPT: prompt tuning with shared attribute descriptions")
# shared by every method script
parser.add_argument("--dataset", nargs="+", default=None,
                    help="dataset name(s) (see data.DATASETS), or 'folder'; default world (imagenet for crossdataset)")
parser.add_argument("--root", default="data", help="folder holding the datasets (CoOp's layout)")
parser.add_argument("--shots", type=int, default=16, help="training images per class (papers: 16)")
parser.add_argument("--seed", type=int, nargs="+", default=[1],
                    help="seed(s) of the few-shot sample and the training (papers: 1 2 3); one run per dataset and seed")
parser.add_argument("--backbone", default="auto",
                    help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
parser.add_argument("--epochs", type=int, default=10, help="training epochs (SemPT's recipe is not public: coop.py's 10)")
parser.add_argument("--batch-size", type=int, default=4, help="training batch size (coop.py's 4)")
parser.add_argument("--lr", type=float, default=0.0035, help="SGD learning rate (coop.py's 0.0035)")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--out", default=None,
                    help="run folder of a single run; for several, their parent (default runs/sempt/<setting>/<dataset>/shots<k>_seed<s>)")
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
# method (reconstructed defaults, see the docstring)
parser.add_argument("--descriptions", default=None, help="description file (default descriptions/<dataset>.json)")
parser.add_argument("--tau", type=float, default=0.01, help="temperature of the visually guided weighting (0.01)")
parser.add_argument("--beta", type=float, default=1.0, help="weight of the attribute summary in the enhanced embedding (1)")
parser.add_argument("--attr-weight", type=float, default=1.0, help="lambda: weight of the attribute-head loss (1)")
parser.add_argument("--kg-weight", type=float, default=0.0, help="optional KgCoOp term toward CLIP's hand-crafted prompts (0 = off)")
parser.add_argument("--dg-head", default="label", choices=["label", "attr"],
                    help="head for seen classes evaluated in another domain (ImageNet variants); MMRL uses attr")
parser.add_argument("--cache-dir", default=None, help="where attribute embeddings are cached (default <root>/.cache)")
parser.add_argument("--ctx-init", default="a photo of a", help="words the context starts from ('' = random init)")
parser.add_argument("--n-ctx", type=int, default=4, help="context length when --ctx-init is ''")
parser.add_argument("--csc", action="store_true", help=argparse.SUPPRESS)  # PromptLearner's option; not used by SemPT
parser.add_argument("--warmup-lr", type=float, default=1e-5, help="constant learning rate of the warm-up epoch")
parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default)")
parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default)")
# writing the descriptions with an LLM (--describe); the API key is read from the environment only
parser.add_argument("--describe", action="store_true", help="write descriptions/<dataset>.json with an LLM, then exit")
parser.add_argument("--llm-url", default="https://api.openai.com/v1", help="base URL of an OpenAI-compatible chat API")
parser.add_argument("--llm-model", default="gpt-4o", help="chat model name")
parser.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="NAME of the environment variable holding the API key")
parser.add_argument("--llm-timeout", type=float, default=120.0, help="seconds to wait for one answer")
parser.add_argument("--llm-json-mode", action=argparse.BooleanOptionalAction, default=True,
                    help="ask for response_format json_object (--no-llm-json-mode for servers without it)")
parser.add_argument("--llm-retries", type=int, default=5, help="tries per question before giving up")
parser.add_argument("--llm-backoff", type=float, default=2.0, help="first wait between tries, doubled after each")
parser.add_argument("--domain", default=None, help="what the dataset shows, for the prompts (default: per dataset)")
parser.add_argument("--n-attributes", type=int, default=5, help="K: shared attributes asked for in step 1 (5)")
parser.add_argument("--n-sentences", type=int, default=3, help="J: sentences per attribute asked for in step 2 (3)")

# The two-step prompts (reconstruction; SemPT's own wording is not public). Change them -> change PROMPT_VERSION.
PROMPT_VERSION = "v1"
SYSTEM = "You are an expert in visual recognition. Answer with one JSON object and nothing else."
STEP1 = ("Here are all category names of an image classification dataset of {domain}: {names}.\n"
         "Name exactly {k} visual attributes that (1) can be seen in a single image, (2) apply to every one of these "
         "categories, and (3) help most to tell them apart. Use short noun phrases; no non-visual properties (price, "
         "behaviour, origin, taste).\nAnswer as {{\"attributes\": [{k} strings]}}.")
STEP2 = ("Category: \"{name}\", one of the categories of a dataset of {domain}.\n"
         "For each of these visual attributes: {attributes}, write {j} different short sentences (at most 20 words "
         "each) that describe how this attribute looks for a \"{name}\" in a typical image. Every sentence starts "
         "with \"{name}, which\" and talks only about that attribute and visible appearance. If the attribute does "
         "not apply, describe how its absence looks.\n"
         "Answer as {{\"<attribute>\": [{j} sentences], ...}} with exactly these attribute names as keys.")
DOMAINS = {"world": "small rendered images of coloured shapes on a dark noisy background",
           "imagenet": "everyday objects and animals", "caltech101": "objects", "oxford_pets": "pets (cat and dog breeds)",
           "stanford_cars": "car models", "oxford_flowers": "flower species", "food101": "dishes of food",
           "fgvc_aircraft": "aircraft models", "sun397": "scenes", "dtd": "texture photographs",
           "eurosat": "satellite images of land use and land cover", "ucf101": "people doing actions"}


# ---------------------------------------------------------------------------------------------------------------
# Writing the descriptions: two-step prompting against any OpenAI-compatible chat-completions endpoint.

def ask(url, model, messages, key, timeout, json_mode=True):
    """One chat completion over plain HTTP + JSON; returns the answer's text."""
    url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
    body = {"model": model, "messages": messages, "temperature": 0}
    body = json.dumps(body | ({"response_format": {"type": "json_object"}} if json_mode else {})).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def parse_json(text):
    """The JSON object in an answer (tolerates a ```json fence around it)."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("the answer is JSON but not an object")
    return obj


def check_attributes(answer, k):
    """Step 1: exactly k distinct, non-empty attribute names."""
    attributes = answer.get("attributes")
    if not (isinstance(attributes, list) and all(isinstance(a, str) and a.strip() for a in attributes)):
        raise ValueError("'attributes' is not a list of strings")
    attributes = [a.strip() for a in attributes]
    if len(attributes) != k or len(set(attributes)) != k:
        raise ValueError(f"expected {k} distinct attributes, got {attributes}")
    return attributes


def check_sentences(answer, attributes):
    """Step 2: every attribute present with >= 1 sentence, each sentence within CLIP's 77-token context."""
    out = {}
    for a in attributes:
        sentences = answer.get(a)
        if not (isinstance(sentences, list) and sentences and all(isinstance(s, str) and s.strip() for s in sentences)):
            raise ValueError(f"attribute {a!r} is missing or has no sentences")
        for s in sentences:
            clip.tokenize(s)  # raises if the sentence does not fit CLIP's context
        out[a] = [s.strip() for s in sentences]
    return out


def cached_answer(prompt, validate, args, key, cache_dir, what):
    """Ask once: a validated answer is stored under a hash of (model, prompt); failures are retried with backoff."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    path = Path(cache_dir) / (hashlib.sha256(json.dumps([args.llm_model, messages]).encode()).hexdigest() + ".json")
    if path.exists():
        return validate(json.loads(path.read_text()))
    delay, error = args.llm_backoff, None
    for attempt in range(1, args.llm_retries + 1):
        try:
            answer = parse_json(ask(args.llm_url, args.llm_model, messages, key, args.llm_timeout, args.llm_json_mode))
            result = validate(answer)
            evaluation.save_json(path, answer)
            return result
        except urllib.error.HTTPError as e:
            if e.code in (400, 401, 403, 404):
                raise SystemExit(f"the LLM endpoint refused the request for {what} (HTTP {e.code}): check --llm-url, "
                                 f"--llm-model and the key in ${args.llm_key_env} (servers without JSON mode answer "
                                 f"400: add --no-llm-json-mode)") from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as e:
            error = f"no answer ({getattr(e, 'reason', e)})"
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
            error = f"malformed answer ({e})"
        if attempt < args.llm_retries:
            print(f"{what}: try {attempt}/{args.llm_retries} failed: {error}; retrying in {delay:.1f} s")
            time.sleep(delay)
            delay *= 2
    raise SystemExit(f"{what}: no valid answer after {args.llm_retries} tries (last: {error}). The answers so far are "
                     f"cached in {cache_dir}; run the same command again to resume.")


def describe(args):
    """Step 1 once per dataset (K shared attributes), step 2 once per class (J sentences per attribute)."""
    classnames = data.load_dataset(args.dataset, args.root, args.download).classnames
    domain = args.domain or DOMAINS.get(args.dataset, "images")
    key = os.environ.get(args.llm_key_env)  # never printed, never saved
    out = Path(args.descriptions or Path(__file__).parent / "descriptions" / f"{args.dataset}.json")
    cache_dir = out.parent / ".cache" / out.stem
    shown = classnames if len(classnames) <= 100 else sorted(random.Random(0).sample(classnames, 100))  # long lists
    prompt = STEP1.format(domain=domain, names=", ".join(shown), k=args.n_attributes)
    attributes = cached_answer(prompt, lambda a: check_attributes(a, args.n_attributes), args, key, cache_dir, "step 1")
    print(f"attributes of {args.dataset}: {attributes}")
    descriptions = {}
    for name in tqdm(classnames, desc="step 2: classes"):
        prompt = STEP2.format(name=name, domain=domain, attributes=json.dumps(attributes), j=args.n_sentences)
        descriptions[name] = cached_answer(prompt, lambda a: check_sentences(a, attributes), args, key, cache_dir,
                                           f"step 2 ({name})")
    evaluation.save_json(out, {"dataset": args.dataset, "llm": args.llm_model, "prompt_version": PROMPT_VERSION,
                               "attributes": attributes, "descriptions": descriptions})
    print(f"wrote {out}: {len(classnames)} classes x {len(attributes)} attributes")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading descriptions and turning them into attribute embeddings.

def default_descriptions(dataset):
    name = "imagenet" if dataset in data.IMAGENET_VARIANTS else dataset
    return Path(__file__).parent / "descriptions" / f"{name}.json"


def load_descriptions(path, classnames):
    """(attributes [K], {class: {attribute: [sentences]}}) for the given class names, from any supported format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no description file {path}; write one with `python sempt.py --describe --dataset ... "
                                f"--llm-url ...` or pass --descriptions FILE")
    raw = json.loads(path.read_text())
    table = raw["descriptions"] if "descriptions" in raw and "attributes" in raw else raw  # ours, or TAP/CuPL/DCLIP
    normal = lambda c: data.classname(c).strip().lower()  # noqa: E731  data.py's rule, case-blind like TAP
    table = {normal(c): v if isinstance(v, dict) else {"description": v} for c, v in table.items()}
    missing = [c for c in classnames if normal(c) not in table]
    if missing:
        raise ValueError(f"{path} has no descriptions for {len(missing)} classes: {missing}")
    attributes = raw.get("attributes") or list(table[normal(classnames[0])])
    out = {}
    for c in classnames:
        entry = table[normal(c)]
        lacking = [a for a in attributes if not entry.get(a)]
        if lacking:
            raise ValueError(f"{path}: class {c!r} has no sentences for attributes {lacking}")
        out[c] = {a: list(entry[a]) for a in attributes}
    return attributes, out


@torch.no_grad()
def attribute_embeddings(model, attributes, descriptions, cache_dir, autocast, chunk=256):
    """{class: (K, E)}: per attribute, the mean of its J sentences' normalised features, normalised. Cached on disk."""
    names = list(descriptions)
    text_weights = evaluation.model_fingerprint(model, keep=lambda name: not name.startswith("visual."))
    key = hashlib.sha256(json.dumps([text_weights, attributes, descriptions], sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"sempt_attributes_{key[:32]}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry["key"] == key and entry["classnames"] == names:
                return dict(zip(names, entry["embeddings"].to(model.positional_embedding.device)))
        except Exception as e:  # a truncated or garbled cache is rebuilt, never trusted
            print(f"attribute cache {path} is unreadable ({type(e).__name__}); recomputing it")
    sentences = [(i, k, s) for i, c in enumerate(names) for k, a in enumerate(attributes) for s in descriptions[c][a]]
    device = model.positional_embedding.device
    feats = []
    for start in tqdm(range(0, len(sentences), chunk), desc="attribute embeddings", leave=False):
        tokens = clip.tokenize([s for _, _, s in sentences[start:start + chunk]], truncate=True).to(device)
        with autocast():
            feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    feats = torch.cat(feats)  # (sentences, E)
    index = torch.tensor([i * len(attributes) + k for i, k, _ in sentences], device=device)
    sums = torch.zeros(len(names) * len(attributes), feats.shape[1], device=device).index_add_(0, index, feats)
    A = F.normalize(sums, dim=-1).view(len(names), len(attributes), -1)  # (C, K, E); the mean's 1/J cancels here
    evaluation.atomic_write(path, lambda tmp: torch.save({"key": key, "classnames": names, "embeddings": A.cpu()}, tmp))
    return dict(zip(names, A))


# ---------------------------------------------------------------------------------------------------------------
# The model: CoOp's learned label embeddings + visually weighted attribute embeddings.

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


# Copied from coop.py: text_features
def text_features(model, prompt_learner, autocast):
    """(K, E) normalised features of the learned prompts."""
    with autocast():
        features = model.encode_token_embeddings(prompt_learner(), prompt_learner.eot_idx)
    return F.normalize(features.float(), dim=-1)


def attribute_weights(f, A, tau):
    """Visually guided weighting: (B, C, K) = softmax over the K attributes of cos(image b, attribute k of class c)/tau."""
    return torch.einsum("be,cke->bck", f, A).div(tau).softmax(dim=-1)


def attribute_logits(f, t, A, M, beta, tau, scale):
    """(B, C) = scale * cos(f_b, normalize(t_c + beta * sum_k w_bck a_ck)) without building the (B, C, E) tensor.

    f (B, E), t (C, E) and A (C, K, E) are normalised; M = A A^T (C, K, K). With s = f.a and G = t.a:
    f.u = f.t + beta sum_k w s,   |u|^2 = 1 + 2 beta sum_k w G + beta^2 sum_kl w_k w_l M_kl.
    """
    s = torch.einsum("be,cke->bck", f, A)  # (B, C, K)
    w = (s / tau).softmax(dim=-1)  # (B, C, K)
    G = torch.einsum("ce,cke->ck", t, A)  # (C, K)
    dot = f @ t.t() + beta * (w * s).sum(-1)  # (B, C)
    wMw = (torch.einsum("bck,ckl->bcl", w, M) * w).sum(-1)  # (B, C)
    norm_sq = 1 + 2 * beta * (w * G).sum(-1) + beta ** 2 * wMw  # (B, C)
    return scale * dot / norm_sq.clamp_min(1e-12).sqrt()


def use_label_head(classnames, seen, seen_head="label"):
    """(C,) bool: the label head for classes seen in training (unless --dg-head attr), the attribute head otherwise."""
    return torch.tensor([c in seen and seen_head == "label" for c in classnames])


def logits(f, t, A, M, label_head, args, scale):
    """(B, C) test logits: per class, the label head or the attribute head."""
    label = scale * f @ t.t()  # (B, C)
    if bool(label_head.all()):
        return label
    attr = attribute_logits(f, t, A, M, args.beta, args.tau, scale)  # (B, C)
    return torch.where(label_head.to(f.device)[None], label, attr)


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


def step_loss(model, prompt_learner, features, labels, A, M, clip_t, args, autocast, scale):
    """(loss, label logits) of one batch of raw image features: CE(label head) + lambda CE(attribute head) (+ KgCoOp)."""
    f = F.normalize(features, dim=-1)  # (B, E)
    t = text_features(model, prompt_learner, autocast)  # (C, E)
    label = scale * f @ t.t()  # (B, C)
    loss = F.cross_entropy(label, labels)
    loss = loss + args.attr_weight * F.cross_entropy(attribute_logits(f, t, A, M, args.beta, args.tau, scale), labels)
    if args.kg_weight:
        loss = loss + args.kg_weight * (1 - (t * clip_t).sum(-1).mean())
    return loss, label


def train(model, prompt_learner, split, A, M, clip_t, args, device, autocast):
    """SGD over the context only; one line per epoch; a resumable snapshot at every epoch end."""
    resolution = model.visual.input_resolution
    train_transform = data.transform(resolution, train=True, crop_scale=split.crop_scale)
    batches = evaluation.training_batches(model, split.train, train_transform, args.batch_size, device, autocast,
                                          args.seed, args.cache_views, store(args), args.dataset, args.workers)
    optimizer = torch.optim.SGD(prompt_learner.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    start = resume(prompt_learner, optimizer, args)
    scale = model.logit_scale.exp().float()
    for epoch in range(start, args.epochs):
        lr = lr_at_epoch(epoch, args.lr, args.epochs, args.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss, correct, seen = 0.0, 0, 0
        for features, labels in tqdm(batches(epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            loss, label = step_loss(model, prompt_learner, features, labels, A, M, clip_t, args, autocast, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (label.argmax(-1) == labels).sum().item()
            seen += len(labels)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total_loss / seen:.4f}  train acc {100 * correct / seen:.1f}  "
              f"lr {lr:.2e}")
        snapshot(prompt_learner, optimizer, epoch, args)


@torch.no_grad()
def evaluate(model, prompt_learner, items, classnames, key, attributes, seen, args, device, autocast, seen_head="label"):
    """Accuracy on one test set, each class scored by its head; batches of images keep memory at (B, C, K).

    key: (dataset, split) naming the test set in the feature store; attributes: {class: (K, E)}; seen_head: the head
    of seen classes, args.dg_head when they are tested in another domain (ImageNet variants).
    """
    prompt_learner.set_classnames(model, classnames)
    t = text_features(model, prompt_learner, autocast)  # (C, E)
    A = torch.stack([attributes[c] for c in classnames])  # (C, K, E)
    M = A @ A.transpose(1, 2)  # (C, K, K)
    label_head = use_label_head(classnames, seen, seen_head)
    transform = data.transform(model.visual.input_resolution, train=False)
    f, labels = evaluation.stored_image_features(model, items, transform, *key, store(args), device,
                                                 autocast)  # (N, E) raw, (N,)
    f = F.normalize(f.to(device), dim=-1)
    scale = model.logit_scale.exp().float()
    out = torch.cat([logits(fb, t, A, M, label_head, args, scale) for fb in f.split(256)])  # (N, C)
    return evaluation.accuracy(out, labels.to(device)), "label" if bool(label_head.all()) else (
        "attribute" if not bool(label_head.any()) else "label (seen) + attribute (unseen)")


def attributes_of(model, dataset, classnames, args, autocast):
    """{class: (K, E)} attribute embeddings of a dataset's classes, from its description file (or --descriptions)."""
    path = args.descriptions or default_descriptions(dataset)
    names, descriptions = load_descriptions(path, classnames)
    print(f"{path}: {len(names)} attributes {names}")
    return attribute_embeddings(model, names, descriptions, args.cache_dir or Path(args.root) / ".cache", autocast)


def method_name(args):
    """The name of this run's method in results.json, tables and the default run folder."""
    return "sempt"


def run(args):
    """One run: one dataset, one seed, one setting. Writes args.json, checkpoint.pt and results.json in args.out."""
    if args.describe:  # not a run: write the dataset's description file with an LLM
        return describe(args)
    torch.manual_seed(args.seed)
    device, autocast = resolve_device(args.device, args.precision)
    backbone = data.default_backbone(args.dataset, args.root) if args.backbone == "auto" else args.backbone
    print(json.dumps(vars(args) | {"backbone": backbone, "device": device}, indent=2))
    start = time.time()

    model, _ = clip.load(backbone, device=device)
    model.requires_grad_(False)  # CLIP stays frozen: only the context is learned
    split = data.prepare(args.dataset, args.root, args.shots, args.seed, args.setting, args.download, args.targets)
    own = [n for n in split.tests if n in ("base", "new", "all")]  # the training dataset's own test sets
    attributes = attributes_of(model, args.dataset, sorted({c for n in own for c in split.tests[n][1]}), args, autocast)
    prompt_learner = PromptLearner(model, split.train_classnames, args.ctx_init, args.n_ctx).to(device)
    n_params = sum(p.numel() for p in prompt_learner.parameters())
    print(f"trainable: {[n for n, _ in prompt_learner.named_parameters()]}, {n_params:,} parameters")

    checkpoint = Path(args.out) / "checkpoint.pt"
    if args.eval_only:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        prompt_learner.ctx.data.copy_(state["ctx"])
        seen = set(state["classnames"])
    else:
        evaluation.save_json(Path(args.out) / "args.json", vars(args) | {"backbone": backbone})
        evaluation.save_json(Path(args.out) / "train_files.json", split.train_files)
        A = torch.stack([attributes[c] for c in split.train_classnames])  # (C, K, E)
        with torch.no_grad(), autocast():  # CLIP's hand-crafted prompts, for the optional KgCoOp term
            clip_t = F.normalize(model.encode_text(clip.tokenize([split.template.format(c) for c in
                                                                  split.train_classnames]).to(device)).float(), dim=-1)
        train(model, prompt_learner, split, A, A @ A.transpose(1, 2), clip_t, args, device, autocast)
        state = {"ctx": prompt_learner.ctx.detach().cpu(), "args": vars(args), "classnames": split.train_classnames}
        evaluation.atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint
        seen = set(split.train_classnames)

    results = {"method": method_name(args), "setting": args.setting, "dataset": args.dataset, "seed": args.seed,
               "shots": args.shots, "backbone": backbone}
    accs = {}
    for name, (items, classnames) in split.tests.items():
        if name in own:
            key, test_attributes, seen_head = (args.dataset, name), attributes, "label"
        else:  # a cross-dataset target: its own descriptions; seen classes in another domain use --dg-head
            key, test_attributes = (name, "test"), attributes_of(model, name, classnames, args, autocast)
            seen_head = args.dg_head
        accs[name], results[f"{name}_head"] = evaluate(model, prompt_learner, items, classnames, key, test_attributes,
                                                       seen, args, device, autocast, seen_head)
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
