"""Evaluation shared by every method: features, accuracy, base/new/H, results.json, and the papers' tables.

    python eval.py runs/            # aggregate every results.json below runs/ into a base-to-new table

Text features are computed once per class list and image features once per test set (never per batch); frozen
image features can also be kept on disk in a feature store keyed by everything they depend on.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import clip
import data


def harmonic_mean(base, new):
    """H = 2BN / (B + N), the papers' base-to-new summary (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def accuracy(logits, labels):
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def zeroshot_weights(model, classnames, template, device):
    """(K, E) normalised text features of the hand-crafted prompts, computed once per class list."""
    tokens = clip.tokenize([template.format(c) for c in classnames]).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def image_features(model, loader, device, autocast, desc="features", normalize=True):
    """(M, E) frozen image features (normalised unless normalize=False) and (M,) labels of a loader, computed once."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False):
        with autocast():
            f = model.encode_image(images.to(device))
        feats.append((F.normalize(f.float(), dim=-1) if normalize else f.float()).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------------------
# Feature store: frozen image features on disk, reused by every text-side method and seed.

def model_fingerprint(model, keep=lambda name: name.startswith("visual.")):
    """sha256 over the weights whose names pass `keep` (default: the image encoder's): the backbone part of a key."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if keep(name):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def store_key(fingerprint, dataset, split, transform, files):
    """One hash over everything the features depend on: change any part and the stored file no longer matches."""
    parts = {"backbone": fingerprint, "dataset": dataset, "split": split, "transform": repr(transform),
             "files": [str(f) for f in files]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def atomic_write(path, write):
    """write(tmp_path) into a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_image_features(store_dir, key, compute):
    """(features, labels) from `store_dir/<key>.pt`, or compute() and store them. A corrupt file is rebuilt."""
    path = Path(store_dir) / f"{key}.pt"
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


def stored_image_features(model, items, transform, dataset, split, store, device, autocast, fingerprint=None):
    """(N, E) raw frozen image features and (N,) labels of `items`, through the feature store when `store` is a folder.

    The key covers the image encoder's weights, dataset, split, transform and file list: every text-side method and
    seed that evaluates the same test set with the same backbone reads the same file.
    """
    def compute():
        loader = data.loader(items, transform, 100, train=False)
        return image_features(model, loader, device, autocast, desc=f"{dataset} {split}", normalize=False)
    if not store:
        return compute()
    key = store_key(fingerprint or model_fingerprint(model), dataset, split, transform, [p for p, _, _ in items])
    return cached_image_features(store, key, compute)


def training_batches(model, items, transform, batch_size, device, autocast, seed, views=0, store=None, dataset="",
                     num_workers=None):
    """epoch -> iterator over (raw image features (B, E), labels (B,)) of the few-shot training set, for text-side methods.

    Every epoch draws its order and augmentations from a seed of its own (seed, epoch): an interrupted run resumed at
    epoch e replays exactly what an uninterrupted one does.

    views = 0: online, the papers' way: every step augments and encodes its images.
    views = K (--cache-views K): K augmented views of every image are encoded once (and stored); each epoch visits
    every image once, through one of its K views drawn at random. This matches online augmentation in distribution
    (a view is a draw of the same random transform), not bit for bit, and it reuses views when epochs > K.
    """
    g = torch.Generator().manual_seed(seed)
    if not views:
        loader = data.loader(items, transform, batch_size, train=True, num_workers=num_workers, seed=seed)

        def online(epoch):
            torch.manual_seed(seed * 1000 + epoch)  # the augmentations (and workers' seeds) of this epoch
            loader.generator.manual_seed(seed * 1000 + epoch)  # its order
            for images, labels in loader:
                with torch.no_grad(), autocast():
                    f = model.encode_image(images.to(device)).float()  # (B, E)
                yield f, labels.to(device)
        return online
    fingerprint = model_fingerprint(model) if store else None
    cached = []
    for v in range(views):  # view v of every image: the train transform under its own seed, without touching ours
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + 999 - v)
            cached.append(stored_image_features(model, items, transform, dataset, f"train view {v}/{views} seed {seed}",
                                                store, device, autocast, fingerprint)[0])
    feats = torch.stack(cached).to(device)  # (K, N, E)
    labels = torch.tensor([y for _, y, _ in items], device=device)  # (N,)
    N = len(items)

    def from_views(epoch):
        torch.manual_seed(seed * 1000 + epoch)  # any other randomness of this epoch (dropout)
        g.manual_seed(seed * 1000 + epoch)
        order = torch.randperm(N, generator=g)
        drop = N > batch_size and N % batch_size  # as the image loader: never drop the only batch
        order = order[: N - (N % batch_size)] if drop else order
        for idx in order.split(batch_size):
            view = torch.randint(views, (len(idx),), generator=g)
            yield feats[view.to(device), idx.to(device)], labels[idx.to(device)]
    return from_views


# ---------------------------------------------------------------------------------------------------------------
# Results and tables.

def save_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_results(out_dir, results):
    """Write results.json (atomically); adds H when base and new accuracies are present."""
    if results.get("base_acc") is not None and results.get("new_acc") is not None:
        results["H"] = harmonic_mean(results["base_acc"], results["new_acc"])
    save_json(Path(out_dir) / "results.json", results)
    return results


def average(rows):
    """Papers' average over datasets: mean base, mean new, then H of the means (not the mean of the H's)."""
    base = sum(r["base_acc"] for r in rows) / len(rows)
    new = sum(r["new_acc"] for r in rows) / len(rows)
    return base, new, harmonic_mean(base, new)


def collect(runs_dir, setting="base2new"):
    """{method: {dataset: [results of each seed]}} from every results.json of one setting below runs_dir."""
    table = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(runs_dir).rglob("results.json")):
        r = json.loads(path.read_text())
        if r.get("setting", "base2new") != setting:
            continue
        if setting == "base2new" and (r.get("base_acc") is None or r.get("new_acc") is None):
            continue
        key = f"{r['dataset']} {r['shots']}-shot" if setting == "fewshot" else r["dataset"]
        table[r.get("method", "?")][key].append(r)
    return table


def base2new_table(runs_dir):
    """Markdown: one row per dataset + Average, Base / New / H per method, seed count per cell."""
    table = collect(runs_dir)
    methods = sorted(table)
    datasets = sorted({d for m in methods for d in table[m]})
    lines = ["| Dataset | " + " | ".join(f"{m} Base | {m} New | {m} H" for m in methods) + " |",
             "|---|" + "---|---|---|" * len(methods)]
    for d in datasets:
        cells = []
        for m in methods:
            runs = table[m].get(d, [])
            if not runs:
                cells += ["–"] * 3
                continue
            b, n, h = average(runs)  # over seeds: same rule as over datasets
            cells += [f"{b:.2f} ({len(runs)})", f"{n:.2f}", f"{h:.2f}"]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        per_dataset = [dict(zip(("base_acc", "new_acc"), average(table[m][d])[:2])) for d in table[m]]
        b, n, h = average(per_dataset)
        cells += [f"{b:.2f} ({len(per_dataset)})", f"{n:.2f}", f"{h:.2f}"]
    lines.append("| **Average** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean(values):
    return sum(values) / len(values)


def fewshot_table(runs_dir):
    """Markdown: one row per dataset and shot count, accuracy on all classes per method (seed count in brackets)."""
    table = collect(runs_dir, "fewshot")
    methods = sorted(table)
    rows = sorted({d for m in methods for d in table[m]}, key=lambda k: (k.split()[0], int(k.split()[1].split("-")[0])))
    lines = ["| Dataset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for row in rows:
        cells = [f"{mean([r['acc'] for r in table[m][row]]):.2f} ({len(table[m][row])})" if table[m].get(row) else "–"
                 for m in methods]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crossdataset_table(runs_dir):
    """Markdown, as the papers: one row per method (and source), one column per target, plus the average.

    Cross-dataset targets and the ImageNet variants (domain generalisation) are averaged separately."""
    table = collect(runs_dir, "crossdataset")
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
                lines.append(f"| {m} | {src} | " + " | ".join(cells) + f" | {mean(known):.2f} |")
        lines.append("")
    return "\n".join(lines)


TABLES = {"base2new": base2new_table, "fewshot": fewshot_table, "crossdataset": crossdataset_table}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Aggregate results.json files into the papers' tables.")
    parser.add_argument("runs_dir", help="folder searched recursively for results.json")
    args = parser.parse_args(argv)
    found = False
    for setting, render in TABLES.items():
        if collect(args.runs_dir, setting):
            found = True
            print(f"## {setting}\n\n{render(args.runs_dir)}\n")
    if not found:
        sys.exit(f"no results.json found under {args.runs_dir}")


if __name__ == "__main__":
    main()
