"""DA-VPT: distribution-aware visual prompt tuning on CLIP's image encoder.

Paper: Ren, Chen, Wang, Hua, "DA-VPT: Semantic-Guided Visual Prompt Tuning for Vision Transformers", CVPR 2025,
arXiv 2505.23694. Official code: Noahsark/DA-VPT (MIT).
Idea: VPT-deep (fresh prompts at every block) where the prompts of the guided layers (default: the last block) act as
class-cluster proxies. Classes are mapped to prompts by cosine k-means over per-class mean image features, and two
Proxy-Anchor losses pull (a) an image's tokens and (b) its [CLS] query towards its class's prompt and push them from the
others. At test time it is plain VPT-deep plus a head.
Run: python davpt.py --dataset cub --root ~/data/CUB_200_2011 --shots 0     (the paper's full-data FGVC setting)
     python davpt.py --setting fewshot            (the built-in offline world, linear probe on all 32 classes)

Paper results (ViT-B/16 IN-21k, Table 1/3): FGVC mean 91.22 (DA-VPT) / 91.94 (DA-VPT+); VTAB-1k mean of group means
74.69 / 76.14 (Natural 80.25/81.98, Specialized 85.12/86.47, Structured 58.71/59.96); 0.16-0.27% trainable parameters.
The often-quoted "40% faster training" and "<0.1% extra parameters" appear nowhere in the paper or code (they come from
a third-party summary); the paper's Table 4 shows DA-VPT slightly *slower* per image than VPT-deep.

Choices and differences from the official code (paper by default, code behind a flag):
- Tokens<->prompts loss input: the attention output (before out_proj) at the image's assigned prompt (paper Sec. 3.3);
  `--token-feature mean-patch` = the released code's effective choice (mean of the block-input patch tokens).
- Loss averaging: both Proxy-Anchor terms are averaged over all M prompts, as the code does (see `proxy_anchor`).
- Margin/scale: alpha = 32, delta = 0.1 (the code's values; the paper text's "delta = 32, tau = 10" contradicts Eq. 4).
- Layer-0 prompts are inserted after ln_pre (same space as the deeper insertions); a CLIP-specific choice.
- DA-VPT+ (`--tune-bias kv`): b_V as a trainable zero-initialised delta. A delta on b_K is not created: adding the same
  vector to every key adds q.dk to every score of a query row, which softmax cancels, so b_K has exactly zero gradient
  (in the paper and the code too). `--tune-bias all` also unfreezes the extra parameters the released configs tune
  (out_proj bias, c_proj bias, ln_2 bias, ln_1 weight+bias, class embedding).
- Initial class->prompt mapping uses 10 training images per class (the code), not "an additional epoch" (the paper).
- Prompt init: xavier divided by 8 by default, as most released ViT-B configs (`--init-divide 1` = plain xavier).
- Stanford Dogs is read from VPT's train.json / test.json split files, as the released code does (the official
  .mat lists would need scipy); CUB-200-2011 and NABirds from their official txt files.
- Trainable parameters on ViT-B/16 (measured, % of the 86.2M image encoder): CUB-200 with M_o 10 194,760 (0.23%),
  DA-VPT+ 203,976 (0.24%); a 100-class VTAB task 143,460 (0.17%); the paper: 0.16-0.27%.
- Heads: `--head linear` is the paper's linear probe (closed set: new classes are not evaluated); `--head text` is
  CLIP's frozen zero-shot text head (not in the paper) so base-to-new works as for the other scripts.
- The class-mean features are CLIP's joint embedding ln_post(CLS) @ proj (the code uses the final-norm CLS).

Dimension legend: B batch, C training classes, M prompts of a layer (M_g guided, M_o other), P patches,
N = 1 + M + P tokens, D width, H heads, hd head width, E joint embedding.
"""
import argparse
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data
import eval as evaluation

parser = argparse.ArgumentParser(description="DA-VPT: distribution-aware visual prompt tuning on CLIP's ViT")
# shared by every method script
parser.add_argument("--dataset", nargs="+", default=None,
                    help="dataset name(s) (see data.DATASETS), 'folder', or an FGVC set read here: cub, nabirds, dogs")
parser.add_argument("--root", default="data", help="folder holding the datasets (for cub/nabirds/dogs: that dataset)")
parser.add_argument("--shots", type=int, default=16, help="images per class (0 = the full train split, the paper)")
parser.add_argument("--seed", type=int, nargs="+", default=[1],
                    help="seed(s) of the few-shot sample and the training; one run per dataset and seed")
parser.add_argument("--backbone", default="auto",
                    help="OpenAI model name (ViT-B/16 ...) or checkpoint path; auto = the world's CLIP on world, else ViT-B/16")
parser.add_argument("--epochs", type=int, default=100, help="training epochs (paper: 100)")
parser.add_argument("--batch-size", type=int, default=32, help="batch size, B/2 classes x 2 images (paper: 32)")
parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (configs: 5e-5 .. 1e-2; 1e-3 is the most common)")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoder on CUDA (auto = bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--out", default=None,
                    help="run folder of a single run; for several, their parent (default runs/davpt/<setting>/<dataset>/shots<k>_seed<s>)")
parser.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint saved in --out, no training")
parser.add_argument("--download", action="store_true", help="fetch the dataset with torchvision if it is missing")
parser.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(4, cores))")
parser.add_argument("--setting", default="base2new", choices=["base2new", "fewshot", "crossdataset"],
                    help="base2new: train base, test base and new (text head); fewshot: all classes; crossdataset: "
                         "train on the source, test on --targets (text head)")
parser.add_argument("--targets", nargs="+", default=data.CROSS_TARGETS,
                    help="crossdataset: datasets evaluated with their own class names and templates")
parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished epoch")
parser.add_argument("--force", action="store_true", help="redo runs that already have results.json")
# method (the paper's defaults; the released configs vary them per dataset, see the notes in the docstring)
parser.add_argument("--head", default="linear", choices=["linear", "text"],
                    help="linear probe (paper) or CLIP's frozen zero-shot text head (base-to-new)")
parser.add_argument("--guided-layers", default="-1", help="comma-separated guided block indices (paper: last)")
parser.add_argument("--num-guided", type=int, default=10, help="M_g prompts per guided layer (code default 10)")
parser.add_argument("--num-other", type=int, default=20, help="M_o prompts per other layer (code default 20)")
parser.add_argument("--init-divide", type=float, default=8.0,
                    help="divide the xavier init by this (most ViT-B configs: 8; 1 = plain xavier)")
parser.add_argument("--prompt-mask", action="store_true", help="prompts attend only to patches (several FGVC configs)")
parser.add_argument("--beta", type=float, default=0.01, help="weight of the tokens<->prompts loss (VTAB configs 0.01)")
parser.add_argument("--lam", type=float, default=0.01, help="weight of the [CLS] query<->prompts loss (VTAB: 0.01)")
parser.add_argument("--alpha", type=float, default=32.0, help="Proxy-Anchor scale (code: 32)")
parser.add_argument("--delta", type=float, default=0.1, help="Proxy-Anchor margin (code: 0.1)")
parser.add_argument("--sigma", type=float, default=5.0, help="similarity scale, s = sigma*cos (code: 5)")
parser.add_argument("--token-feature", default="attn-out", choices=["attn-out", "mean-patch"],
                    help="attn-out = attention output at the assigned prompt (paper); mean-patch = released code")
parser.add_argument("--dynamic-kmeans", type=int, default=1, help="re-run k-means at every epoch end from this epoch on")
parser.add_argument("--kmeans-images", type=int, default=10, help="images per class for the initial mapping (code: 10)")
parser.add_argument("--tune-bias", default="none", choices=["none", "kv", "all"], help="none = DA-VPT, kv = DA-VPT+")
parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on prompts (FGVC configs 0.05)")
parser.add_argument("--wd-head", type=float, default=3.0, help="weight decay of the linear head weight (configs 3-5)")
parser.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up epochs (code: 10)")
parser.add_argument("--vtab1k", action="store_true", help="VTAB-1k style: 800 train / 200 val images")
parser.add_argument("--clip-grad", type=float, default=10.0, help="gradient value clipping (code: 10)")


# ----------------------------------------------------------------------------------------------- losses, k-means
def proxy_anchor(x, prompts, y, alpha=32.0, delta=0.1, sigma=5.0):
    """Proxy-Anchor loss with the prompts (M, D) as proxies for the batch features x (B, D) and prompt labels y (B,).

    Code's averaging: both terms are divided by M (all prompts); prompts with no positive in the batch add log(1) = 0.
    The paper's Eq. 4 (and the original Proxy-Anchor) divide the positive term by |P+| (prompts with positives).
    """
    M = prompts.shape[0]
    s = sigma * F.normalize(x.float(), dim=-1) @ F.normalize(prompts.float(), dim=-1).t()  # (B, M), fp32: alpha*s ~ 160
    pos = F.one_hot(y, M).bool()  # (B, M)
    zero = s.new_zeros(1, M)  # the "1 +" inside the log
    pos_logits = torch.where(pos, -alpha * (s - delta), float("-inf"))  # (B, M)
    neg_logits = torch.where(~pos, alpha * (s + delta), float("-inf"))  # (B, M)
    pos_term = torch.logsumexp(torch.cat([zero, pos_logits]), dim=0)  # (M,)
    neg_term = torch.logsumexp(torch.cat([zero, neg_logits]), dim=0)  # (M,)
    return pos_term.sum() / M + neg_term.sum() / M


def cosine_kmeans(feats, k, init=None, iters=20, tol=1e-4, generator=None):
    """Cosine k-means of feats (C, E): returns (assignment (C,), centroids (k, E)). Init: a random subset, or `init`."""
    x = F.normalize(F.layer_norm(feats.float(), feats.shape[-1:]), dim=-1)  # (C, E), the code's kmeans_norm: layer
    if init is None:
        init = x[torch.randperm(x.shape[0], generator=generator)[:k]]  # (k, E)
    cent = F.normalize(init.float(), dim=-1)
    for _ in range(iters):
        assign = (x @ cent.t()).argmax(dim=1)  # (C,)
        new = torch.zeros_like(cent).index_add_(0, assign, x)  # (k, E)
        empty = new.norm(dim=-1) == 0
        new = torch.where(empty[:, None], cent, F.normalize(new, dim=-1))  # keep a centroid that lost all members
        shift = (new - cent).norm(dim=-1).max()
        cent = new
        if shift < tol:
            break
    return (x @ cent.t()).argmax(dim=1), cent


# ----------------------------------------------------------------------------------------------- model
class DAVPT(nn.Module):
    """Prompts for every block of CLIP's ViT, optional b_V deltas, a head, and the prompted forward + ML losses."""

    def __init__(self, clip_model, num_classes, guided, num_guided, num_other, init_divide=1.0, prompt_mask=False,
                 tune_bias="none", head="linear", text_weights=None):
        super().__init__()
        self.clip = clip_model
        for prm in self.clip.parameters():
            prm.requires_grad_(False)
        vis = clip_model.visual
        L, D = len(vis.transformer.resblocks), vis.conv1.weight.shape[0]
        self.guided = sorted(g % L for g in guided)
        self.M_g = min(num_guided, num_classes)  # C < M_g: one prompt per class (identity mapping)
        self.prompt_mask = prompt_mask
        other = [l for l in range(L) if l not in self.guided]
        self.proxy_prompts = nn.Parameter(torch.empty(len(self.guided), self.M_g, D))  # (|G|, M_g, D)
        self.other_prompts = nn.Parameter(torch.empty(len(other), num_other, D))  # (L-|G|, M_o, D)
        for t in (self.proxy_prompts, self.other_prompts):
            if t.numel():
                nn.init.xavier_uniform_(t)  # on the whole 3-D tensor, as the code
                t.data /= init_divide
        self.slot = {l: ("proxy", i) for i, l in enumerate(self.guided)}
        self.slot |= {l: ("other", i) for i, l in enumerate(other)}
        self.dv = nn.Parameter(torch.zeros(L, D)) if tune_bias in ("kv", "all") else None  # b_V deltas (L, D)
        if tune_bias == "all":  # what the released configs also tune
            for blk in vis.transformer.resblocks:
                for prm in (blk.attn.out_proj.bias, blk.mlp.c_proj.bias, blk.ln_2.bias, blk.ln_1.weight, blk.ln_1.bias):
                    prm.requires_grad_(True)
            vis.class_embedding.requires_grad_(True)
        E = vis.proj.shape[1]
        self.head_type = head
        if head == "linear":
            self.head = nn.Linear(E, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.register_buffer("text_weights", text_weights.float())  # (C, E) normalised, frozen
            self.logit_scale = clip_model.logit_scale.exp().item()  # CLIP's own temperature (100 for OpenAI's)

    def prompts(self, l):
        kind, i = self.slot[l]
        return (self.proxy_prompts if kind == "proxy" else self.other_prompts)[i]  # (M, D)

    def mask(self, M, N, device):
        """Additive (N, N) mask: prompt rows 1..M may not see columns 0..M ([CLS] and prompts)."""
        mask = torch.zeros(N, N, device=device)
        mask[1:1 + M, :1 + M] = float("-inf")
        return mask

    def forward(self, images, y_prompt=None, alpha=32.0, delta=0.1, sigma=5.0, token_feature="attn-out"):
        """images (B, 3, R, R) -> (features (B, E), metric losses per guided layer (tok, cls) or None)."""
        vis = self.clip.visual
        x = vis.embed(images)  # (B, 1+P, D)
        B, P = x.shape[0], x.shape[1] - 1
        losses = []
        for l, block in enumerate(vis.transformer.resblocks):
            prm = self.prompts(l)  # (M, D)
            M = prm.shape[0]
            x = torch.cat([x[:, :1], prm.to(x.dtype).expand(B, -1, -1), x[:, -P:]], dim=1)  # (B, N, D)
            mask = self.mask(M, x.shape[1], x.device) if (self.prompt_mask and M) else None
            a, parts = block.attn(block.ln_1(x), mask, return_parts=True)  # (B, N, D), parts
            if self.dv is not None:  # v + dv: the softmax weights sum to 1, so the output moves by out_proj.weight @ dv
                a = a + (block.attn.out_proj.weight @ self.dv[l].to(a.dtype))  # (B, N, D)
            if y_prompt is not None and l in self.guided:
                if token_feature == "attn-out":  # the paper: attention output at the image's assigned prompt
                    pre = parts["pre_out"]
                    if self.dv is not None:
                        pre = pre + self.dv[l].to(pre.dtype)
                    tok = pre[torch.arange(B, device=x.device), 1 + y_prompt]  # (B, D)
                else:  # the released code: mean of the block-input patch tokens
                    tok = x[:, -P:].mean(dim=1)  # (B, D)
                q_cls = parts["q"][:, :, 0].reshape(B, -1)  # (B, H*hd) = (B, D), [CLS] query
                losses.append((proxy_anchor(tok, prm, y_prompt, alpha, delta, sigma),
                               proxy_anchor(q_cls, prm, y_prompt, alpha, delta, sigma)))
            x = x + a
            x = x + block.mlp(block.ln_2(x))
        return vis.head(x), (losses if y_prompt is not None else None)  # (B, E)

    def logits(self, feats):
        if self.head_type == "linear":
            return self.head(feats.float())  # (B, C)
        return self.logit_scale * F.normalize(feats.float(), dim=-1) @ self.text_weights.t()  # (B, C)

    def trainable_state(self):
        return {k: v.detach().cpu() for k, v in self.named_parameters() if v.requires_grad}


# ----------------------------------------------------------------------------------------------- data helpers
def balanced_batches(labels, batch_size, generator):
    """Class-balanced batches for one epoch: batch_size/2 classes x 2 images (the code's class sampler)."""
    by_class = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    per = max(1, batch_size // 2)
    n_batches = max(1, len(labels) // batch_size)
    classes = list(by_class)
    batches = []
    for _ in range(n_batches):
        pick = [classes[j] for j in torch.randperm(len(classes), generator=generator)[:per].tolist()]
        batch = []
        for c in pick:
            idx = by_class[c]
            batch += [idx[j] for j in torch.randint(len(idx), (2,), generator=generator).tolist()]
        batches.append(batch)
    return batches


@torch.no_grad()
def class_means(forward_feats, loader, num_classes, device):
    sums, counts = None, torch.zeros(num_classes, device=device)
    for images, labels in loader:
        f = forward_feats(images.to(device)).float()  # (B, E)
        sums = torch.zeros(num_classes, f.shape[1], device=device) if sums is None else sums
        sums.index_add_(0, labels.to(device), f)
        counts.index_add_(0, labels.to(device), torch.ones_like(labels, dtype=torch.float, device=device))
    return sums / counts.clamp(min=1)[:, None]  # (C, E)


def initial_mapping(means, k, seed):
    """Class -> prompt index: identity when C <= k, else cosine k-means (never-sampled classes go to random prompts)."""
    C = means.shape[0]
    g = torch.Generator().manual_seed(seed)
    if C <= k:
        return torch.arange(C), None
    assign, cent = cosine_kmeans(means.cpu(), k, generator=g)
    unseen = means.cpu().abs().sum(1) == 0
    assign[unseen] = torch.randint(k, (int(unseen.sum()),), generator=g)
    return assign, cent


def read_cub_style(root):
    """CUB-200-2011 and NABirds in their official layouts (images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt, images/). Returns (train items, test items, classnames); labels are 0..C-1 in class-id order."""
    def table(name):
        with open(os.path.join(root, name)) as f:
            return dict(line.strip().split(" ", 1) for line in f if line.strip())
    missing = [n for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
               if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: point --root at the CUB_200_2011/ or nabirds/ folder")
    images, labels, is_train, classes = (table(n) for n in ("images.txt", "image_class_labels.txt",
                                                            "train_test_split.txt", "classes.txt"))
    used = sorted({labels[i] for i in images}, key=int)  # NABirds' class ids are sparse: keep those with images
    index = {c: k for k, c in enumerate(used)}
    names = [classes[c].split(".", 1)[-1].replace("_", " ") for c in used]  # "001.Black_footed_Albatross"
    train, test = [], []
    for i, rel in images.items():
        item = (os.path.join(root, "images", rel), index[labels[i]], names[index[labels[i]]])
        (train if is_train[i].strip() == "1" else test).append(item)
    return train, test, names


def read_vpt_json(root, image_dir="Images"):
    """Stanford Dogs as DA-VPT's code reads it: VPT's split files train.json / test.json ({relative path: label}) next
    to the official Images/<wnid>-<Breed>/ folders. Returns (train items, test items, classnames)."""
    missing = [n for n in ("train.json", "test.json", image_dir) if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise FileNotFoundError(f"{root} lacks {missing}: point --root at the Stanford Dogs folder holding Images/ and "
                                f"VPT's train.json / test.json split files")
    splits = {s: json.load(open(os.path.join(root, f"{s}.json"))) for s in ("train", "test")}
    names = {}
    for rel, label in splits["train"].items():  # "n02085620-Chihuahua/n02085620_10074.jpg" -> "Chihuahua"
        names.setdefault(int(label), rel.split("/")[0].split("-", 1)[-1].replace("_", " "))
    names = [names[i] for i in sorted(names)]
    items = {s: [(os.path.join(root, image_dir, rel), int(y), names[int(y)]) for rel, y in sorted(splits[s].items())]
             for s in splits}
    return items["train"], items["test"], names


FGVC = {"cub": read_cub_style, "nabirds": read_cub_style, "dogs": read_vpt_json}


def vtab1k(items, seed):
    """VTAB-1k style split of a training list: (800 train, 200 val), drawn with a fixed seed."""
    if len(items) < 1000:
        raise ValueError(f"VTAB-1k needs at least 1000 training images, got {len(items)}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:800]], [items[i] for i in order[800:1000]]


def lr_at(step, total, warmup, base_lr):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model, train_items, num_classes, tf_train, args, device, autocast):
    g = torch.Generator().manual_seed(args.seed)
    labels = [it[1] for it in train_items]
    ds = data.ImageList(train_items, tf_train)
    # initial mapping from the frozen encoder on up to 10 images per class
    sub, seen = [], {}
    for i, c in enumerate(labels):
        if seen.get(c, 0) < args.kmeans_images:
            sub.append(i)
            seen[c] = seen.get(c, 0) + 1
    sub_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, sub), batch_size=args.batch_size)
    with autocast():
        means = class_means(model.clip.encode_image, sub_loader, num_classes, device)
    mapping, cent = initial_mapping(means, model.M_g, args.seed)
    mapping = mapping.to(device)
    decay = [model.proxy_prompts, model.other_prompts] + ([model.head.weight] if model.head_type == "linear" else [])
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not d for d in decay)]
    groups = [{"params": [model.proxy_prompts, model.other_prompts], "weight_decay": args.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if model.head_type == "linear":
        groups.append({"params": [model.head.weight], "weight_decay": args.wd_head})
    opt = torch.optim.AdamW(groups, lr=args.lr)
    steps_per_epoch = max(1, len(labels) // args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    state_path = Path(args.out) / "train_state.pt"
    start = 0
    if args.resume and state_path.exists():  # the last epoch-end snapshot: tensors, optimizer, class->prompt mapping
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, mapping, cent = state["epoch"], state["mapping"].to(device), state["centroids"]
        print(f"resuming {args.out} after epoch {start}")
    step = start * steps_per_epoch
    for epoch in range(start, args.epochs):
        torch.manual_seed(args.seed * 1000 + epoch)  # each epoch's randomness from (seed, epoch): resumable exactly
        g.manual_seed(args.seed * 1000 + epoch)
        model.train()
        sums = torch.zeros(num_classes, model.clip.visual.proj.shape[1], device=device)
        counts = torch.zeros(num_classes, device=device)
        batches = balanced_batches(labels, args.batch_size, g)
        workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)
        for images, y in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            images, y = images.to(device), y.to(device)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, total, warmup, args.lr)
            with autocast():
                feats, ml = model(images, mapping[y], args.alpha, args.delta, args.sigma, args.token_feature)
            ce = F.cross_entropy(model.logits(feats), y)
            loss = ce + sum(args.beta * t + args.lam * c for t, c in ml) / len(ml)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], args.clip_grad)
            opt.step()
            step += 1
            if epoch >= args.dynamic_kmeans:
                sums.index_add_(0, y, feats.detach().float())
                counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float))
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} ce {ce.item():.4f}")
        if epoch >= args.dynamic_kmeans and cent is not None:  # re-run from the previous centroids
            new, new_cent = cosine_kmeans(sums.cpu() / counts.cpu().clamp(min=1)[:, None], model.M_g, init=cent)
            new = torch.where(counts.cpu() > 0, new, mapping.cpu())  # classes not drawn this epoch keep their prompt
            if new.unique().numel() > 1:  # skipped if everything fell into one cluster, as the code
                mapping, cent = new.to(device), new_cent
        state = {"trainable": model.trainable_state(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                 "mapping": mapping.cpu(), "centroids": cent}
        evaluation.atomic_write(state_path, lambda tmp: torch.save(state, tmp))
    return mapping


@torch.no_grad()
def evaluate(model, items, tf_test, args, device, autocast):
    """Top-1 accuracy of the prompted encoder + head on one test set."""
    model.eval()
    correct = total = 0
    for images, y in tqdm(data.loader(items, tf_test, 100, train=False, num_workers=args.workers), desc="test",
                          leave=False):
        with autocast():
            feats, _ = model(images.to(device))
        correct += (model.logits(feats).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(1, total)


# Copied from coop.py: resolve_device
def resolve_device(device, precision):
    """(device, autocast factory): bf16 autocast for the frozen encoders on CUDA by default, fp32 on CPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    precision = ("bf16" if device.startswith("cuda") else "fp32") if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    enabled = dtype != torch.float32
    return device, lambda: torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled)


def load_split(args):
    """data.prepare's split, or an FGVC dataset read here (closed set: train on all classes, test on all)."""
    if args.dataset in FGVC:
        train_items, test_items, names = FGVC[args.dataset](args.root)
        if args.shots > 0 and not args.vtab1k:
            train_items = data.fewshot(train_items, args.shots, args.seed)
        template = "a photo of a {}, a type of dog." if args.dataset == "dogs" else "a photo of a {}, a type of bird."
        split = SimpleNamespace(train=train_items, train_classnames=names, tests={"all": (test_items, names)},
                                template=template, crop_scale=(0.08, 1.0))
    else:
        shots = 0 if args.vtab1k else args.shots
        split = data.prepare(args.dataset, args.root, shots, args.seed, setting=args.setting, download=args.download)
    if args.vtab1k:  # train on 800 images of the full train split, report the 200 held out as "val"
        split.train, val_items = vtab1k(split.train, args.seed)
        split.tests["val"] = (val_items, split.train_classnames)
    split.templates = {name: getattr(split, "templates", {}).get(name, split.template) for name in split.tests}
    return split


def method_name(args):
    """The name of this run's method in results.json, tables and the default run folder."""
    return "davpt"


def run(args):
    """One run: one dataset, one seed, one setting. Writes args.json, checkpoint.pt and results.json in args.out."""
    torch.manual_seed(args.seed)
    device, autocast = resolve_device(args.device, args.precision)
    backbone = data.default_backbone(args.dataset, args.root) if args.backbone == "auto" else args.backbone
    print(json.dumps(vars(args) | {"backbone": backbone, "device": device}, indent=2))
    start = time.time()

    clip_model, _ = clip.load(backbone, device=device)
    split = load_split(args)
    C = len(split.train_classnames)
    text_w = evaluation.zeroshot_weights(clip_model, split.train_classnames, split.template, device) \
        if args.head == "text" else None
    guided = [int(g) for g in args.guided_layers.split(",")]
    model = DAVPT(clip_model, C, guided, args.num_guided, args.num_other, args.init_divide, args.prompt_mask,
                  args.tune_bias, args.head, text_w).to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_clip = sum(p.numel() for p in clip_model.visual.parameters())
    print(f"trainable: {[k for k, p in model.named_parameters() if p.requires_grad]}")
    print(f"trainable parameters: {n_train:,} ({100 * n_train / n_clip:.3f}% of the image encoder)")
    checkpoint = Path(args.out) / "checkpoint.pt"
    res = clip_model.visual.input_resolution
    if args.eval_only:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        bad = model.load_state_dict(state["trainable"], strict=False).unexpected_keys
        if bad:
            raise KeyError(f"{checkpoint} does not match these flags (unexpected {bad}); use the flags it was trained with")
    else:
        evaluation.save_json(Path(args.out) / "args.json", vars(args) | {"backbone": backbone})
        mapping = train(model, split.train, C, data.transform(res, True, split.crop_scale), args, device, autocast)
        state = {"trainable": model.trainable_state(), "mapping": mapping.cpu(), "args": vars(args)}
        evaluation.atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint

    results = {"method": method_name(args), "setting": args.setting, "dataset": args.dataset, "seed": args.seed,
               "shots": args.shots, "backbone": backbone, "trainable_params": n_train}
    accs = {}
    for name, (items, classnames) in split.tests.items():
        if args.head == "linear" and list(classnames) != list(split.train_classnames):
            print(f"skip '{name}': the linear head knows only the training classes (use --head text for new classes)")
            accs[name] = None
            continue
        if args.head == "text":
            model.text_weights = evaluation.zeroshot_weights(clip_model, classnames, split.templates[name], device).float()
        accs[name] = evaluate(model, items, data.transform(res, False), args, device, autocast)
    return finish(results, accs, split, args, start)


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
