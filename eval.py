"""Evaluation: accuracy and H, the zero-shot text weights, frozen image features and the feature store, each run's
results, and the papers' tables.

    python eval.py runs/            # every results.json below runs/ as the papers' tables

Text features are computed once per class list and image features once per test set (never per batch); frozen
features can be kept on disk in a feature store keyed by everything they depend on, so every method and seed that
scores the same test set with the same backbone encodes it once.
"""
import argparse
import hashlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import clip
import data
import files


# ---------------------------------------------------------------------------------------------------------------
# Scores.

def harmonic_mean(base, new):
    """H = 2BN / (B + N), the papers' base-to-new summary (0 when both are 0, NaN when either is)."""
    return 2 * base * new / (base + new) if base + new != 0 else 0.0

def two(x):
    """A table cell: x to two decimals, n/a where a run gave no number (NaN)."""
    return f"{x:.2f}" if math.isfinite(x) else "n/a"

def accuracy(logits, labels):
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()

@torch.no_grad()
def zeroshot_weights(model, classnames, template, device):
    """(C, E) normalised text features of the hand-crafted prompts, computed once per class list."""
    tokens = clip.tokenize([template.format(c) for c in classnames]).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)

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
# Frozen image features and the feature store.

EVAL_BATCH = 100  # images per batch when test features are computed (sharded ones too: whole batches)

@torch.no_grad()
def image_features(model, loader, device, autocast, desc="features"):
    """(N, E) raw frozen image features and (N,) labels of a loader, computed once."""
    feats, labels = [], []
    for images, y in files.progress(loader, desc):
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
    return key_of({"backbone": fingerprint, "dataset": dataset, "split": part, "transform": repr(transform),
                   "files": [str(f) for f in files], "precision": precision})


def key_of(parts):
    """sha256 of JSON-able parts (sorted keys): a feature-store key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def stored(store, key, compute):
    """compute() -> {name: tensor}, kept as store/<key>.pt: read back when its key matches, else computed and
    written. A file that is unreadable or belongs to another key is computed again, never trusted."""
    path = Path(store) / f"{key}.pt"
    if path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if entry.pop("key") == key:
                return entry
            print(f"feature store: {path} does not match its key; recomputing it")
        except Exception as e:  # truncated or garbled: rebuild rather than fail on a cache
            print(f"feature store: {path} is unreadable ({type(e).__name__}); recomputing it")
    tensors = compute()
    files.atomic_write(path, lambda tmp: torch.save({"key": key} | tensors, tmp))
    return tensors


def cached_image_features(store, key, compute):
    """(features, labels) from the store, or compute() -> (features, labels) and store them."""
    entry = stored(store, key, lambda: dict(zip(("features", "labels"), compute())))
    return entry["features"], entry["labels"]


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
# Results and tables.

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
            r = results[-1]
            if any(not math.isfinite(v) for v in [*(r.get(k) for k in ("acc", "base_acc", "new_acc")),
                                                  *r.get("targets", {}).values()] if isinstance(v, float)):
                print(f"warning: {path.parent}: an accuracy is NaN (a diverged run?); its cells show n/a", file=sys.stderr)
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
    for label in table:  # runs of one dataset on different split files are rows of their own: "dtd [split 1a2b3c4d]"
        for key, runs in list(table[label].items()):
            splits = {r.get("split_sha256") for r in runs}
            if len(splits) > 1:
                del table[label][key]
                for r in runs:
                    table[label][f"{key} [split {(r.get('split_sha256') or 'none')[:8]}]"].append(r)
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
            lines.append(f"| {m} | {d} | {two(b)} | {two(n)} | {two(h)} | {seeds} seed{'s' * (seeds > 1)} |")
        if len(rows) > 1:
            b, n, h = average(rows)
            lines.append(f"| {m} | **Average** | {two(b)} | {two(n)} | {two(h)} | {len(rows)} datasets |")
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
        cells = [f"{two(mean([r['acc'] for r in table[m][row]]))} ({len(table[m][row])})" if table[m].get(row) else "–"
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
