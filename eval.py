"""Evaluation: accuracy and H, the zero-shot text weights, frozen image features and the feature store, each run's
results, and the papers' tables.

    python eval.py runs/                  # every results.json below runs/ as the papers' tables (mean ± std)
    python eval.py runs/ --paper          # ours beside the published numbers (papers.py), what differs
    python eval.py runs/ --format csv     # the same numbers as spreadsheet rows
    python eval.py runs/ --plot plots/    # PNGs: few-shot curves and base/new/H bars (needs matplotlib)
    python eval.py words RUN              # the nearest vocabulary words of a run's learned context

Text features are computed once per class list and image features once per test set (never per batch); frozen
features can be kept on disk in a feature store keyed by everything they depend on, so every method and seed that
scores the same test set with the same backbone encodes it once.
"""
import argparse
import csv
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
import papers


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
    """Markdown: per method, one row per dataset (mean ± standard deviation over its seeds; H: H of the means, ± the
    spread of the seeds' H) and the papers' Average over datasets (mean base, mean new, H of the means) when there
    are several. results: read_results(runs_dir)."""
    table = collect(results)
    lines = ["| Method | Dataset | Base | New | H | Runs |", "|---|---|---|---|---|---|"]
    for m in sorted(table):
        rows = []
        for d in sorted(table[m]):
            runs = table[m][d]
            b, n, h = average(runs)  # over seeds: the same rule as over datasets
            rows.append({"base_acc": b, "new_acc": n})
            hs = [harmonic_mean(r["base_acc"], r["new_acc"]) for r in runs]  # each seed's H, for its spread
            lines.append(f"| {m} | {d} | {cell([r['base_acc'] for r in runs])} | {cell([r['new_acc'] for r in runs])} "
                         f"| {cell(hs, h)} | {len(runs)} seed{'s' * (len(runs) > 1)} |")
        if len(rows) > 1:
            b, n, h = average(rows)
            lines.append(f"| {m} | **Average** | {two(b)} | {two(n)} | {two(h)} | {len(rows)} datasets |")
    return "\n".join(lines)

def mean(values):
    """The arithmetic mean of a non-empty list."""
    return sum(values) / len(values)

def std(values):
    """The seeds' sample standard deviation (n - 1), None for a single seed (NaN where a seed is NaN)."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

def cell(values, centre=None):
    """A table cell over seeds: 'mean ± std' ('mean' for one seed); centre replaces the mean (H of the means)."""
    m, s = mean(values) if centre is None else centre, std(values)
    return two(m) + (f" ± {two(s)}" if s is not None and math.isfinite(m) else "")

def fewshot_table(results):
    """Markdown: one row per dataset and shot count, accuracy on all classes per method (seed count in brackets)."""
    table = collect(results, "fewshot")
    methods = sorted(table)
    shots = lambda k: float("inf") if k.split()[1] == "all-shot" else int(k.split()[1].split("-")[0])  # noqa: E731
    rows = sorted({d for m in methods for d in table[m]}, key=lambda k: (k.split()[0], shots(k)))
    lines = ["| Dataset | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for row in rows:
        cells = [f"{cell([r['acc'] for r in table[m][row]])} ({len(table[m][row])})" if table[m].get(row) else "–"
                 for m in methods]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Each cell: the mean accuracy ± its standard deviation over seeds (the number of seeds in brackets)."])

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
                seen = [[r["targets"][t] for r in runs if t in r["targets"]] for t in targets]
                known = [mean(v) for v in seen if v]
                cells = [cell(v) if v else "–" for v in seen]
                src = f"{source} {cell([r['acc'] for r in runs])} ({len(runs)})"
                average = two(mean(known)) if known else "–"  # a row may have none of this group's targets
                lines.append(f"| {m} | {src} | " + " | ".join(cells) + f" | {average} |")
        lines.append("")
    return "\n".join(lines + ["Source: its accuracy, the mean ± std over seeds (the number of seeds in brackets); "
                               "targets: the same seeds' mean ± std."])


# ---------------------------------------------------------------------------------------------------------------
# Plots (optional: matplotlib): per dataset the few-shot curve and the base/new/H bars of every method.

def plot_runs(results, folder):
    """fewshot_<dataset>.png (mean accuracy over seeds against shots, a line per method, std bars) and
    base2new_<dataset>.png (base, new and H bars per method) in folder; returns the paths written."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    curves, bars, written = defaultdict(dict), defaultdict(dict), []
    for m, keys in collect(results, "fewshot").items():
        for runs in keys.values():
            curves[runs[0]["dataset"]].setdefault(m, []).append((runs[0]["shots"], [r["acc"] for r in runs]))
    for m, keys in collect(results, "base2new").items():
        for runs in keys.values():
            bars[runs[0]["dataset"]][m] = [[r[k] for r in runs] for k in ("base_acc", "new_acc", "H")]
    Path(folder).mkdir(parents=True, exist_ok=True)
    for dataset, methods in sorted(curves.items()):
        fig, ax = plt.subplots(figsize=(5, 4))
        for m, points in sorted(methods.items()):
            points = sorted((s, v) for s, v in points if s != "all")
            ax.errorbar([s for s, _ in points], [mean(v) for _, v in points], marker="o", capsize=3, label=m,
                        yerr=[std(v) if len(v) > 1 else 0 for _, v in points])
        ax.set(xscale="log", xlabel="shots per class", ylabel="accuracy (%)", title=f"{dataset}: few-shot")
        ax.set_xticks(sorted({s for p in methods.values() for s, _ in p if s != "all"}), minor=False)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        written.append(_save(plt, fig, ax, Path(folder) / f"fewshot_{dataset}.png"))
    for dataset, methods in sorted(bars.items()):
        fig, ax = plt.subplots(figsize=(5, 4))
        width = 0.8 / len(methods)
        for i, (m, values) in enumerate(sorted(methods.items())):
            ax.bar([x + i * width for x in range(3)], [mean(v) for v in values], width, label=m,
                   yerr=[std(v) if len(v) > 1 else 0 for v in values], capsize=3)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(3)], ["base", "new", "H"])
        ax.set(ylabel="accuracy (%)", title=f"{dataset}: base-to-new")
        written.append(_save(plt, fig, ax, Path(folder) / f"base2new_{dataset}.png"))
    return written

def _save(plt, fig, ax, path):
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path

TABLES = {"base2new": base2new_table, "fewshot": fewshot_table, "crossdataset": crossdataset_table}

def csv_rows(results):
    """The tables as spreadsheet rows: setting, method, dataset, metric, mean, std (empty for one seed), seeds."""
    rows = [["setting", "method", "dataset", "metric", "mean", "std", "seeds"]]
    for setting in TABLES:
        for m, by_dataset in sorted(collect(results, setting).items()):
            for d, runs in sorted(by_dataset.items()):
                metrics = {"base": [r["base_acc"] for r in runs], "new": [r["new_acc"] for r in runs],
                           "H": [harmonic_mean(r["base_acc"], r["new_acc"]) for r in runs]} \
                    if setting == "base2new" else {"acc": [r["acc"] for r in runs]} | {
                        t: [r["targets"][t] for r in runs if t in r["targets"]] for t in sorted(
                            {t for r in runs for t in r.get("targets", {})})}
                for metric, values in metrics.items():
                    centre = average(runs)[2] if metric == "H" else mean(values)
                    s = std(values)
                    rows.append([setting, m, d, metric, f"{centre:.4f}", "" if s is None else f"{s:.4f}", len(values)])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The paper beside the run (`--paper`): the published numbers of papers.py, ours, the difference, the seeds' spread.

def paper_rows(results):
    """[(method, dataset, metric, paper, ours, std over seeds, seeds, runs)] of every run group with a published
    number, per-dataset rows and the papers' averages (base-to-new: H of the mean base and new over the 11
    datasets; DA-VPT: the FGVC mean, VTAB-1k's group means and their mean) where all their datasets were run."""
    out = []
    for setting in ("base2new", "fewshot"):
        for label, by_key in sorted(collect(results, setting).items()):
            method = label.split(" (")[0]
            if (setting, method) not in papers.PUBLISHED:
                continue
            source, published = papers.PUBLISHED[(setting, method)]
            ours = {}  # dataset (VTAB without its 'vtab-' prefix) -> its runs
            for key, runs in by_key.items():
                ours.setdefault(key.split()[0].removeprefix("vtab-"), runs)
            for d, runs in sorted(ours.items()):
                if d not in published:
                    continue
                if setting == "base2new":
                    hs = [harmonic_mean(r["base_acc"], r["new_acc"]) for r in runs]
                    for i, (metric, values) in enumerate([("base", [r["base_acc"] for r in runs]),
                                                          ("new", [r["new_acc"] for r in runs]), ("H", hs)]):
                        centre = average(runs)[2] if metric == "H" else mean(values)
                        out.append((label, d, metric, published[d][i], centre, std(values), len(runs), runs))
                else:
                    values = [r["acc"] for r in runs]
                    out.append((label, d, "acc", published[d], mean(values), std(values), len(runs), runs))
            every = [r for runs in ours.values() for r in runs]
            if setting == "base2new" and all(d in ours for d in papers.B2N[1:]):
                b, n, h = average([dict(zip(("base_acc", "new_acc"), average(ours[d])[:2])) for d in papers.B2N[1:]])
                out += [(label, "average", m, p, v, None, "-", every) for m, p, v in zip(("base", "new", "H"),
                                                                                        published["average"], (b, n, h))]
            groups = {"fgvc mean": papers.FGVC, **papers.VTAB_GROUPS}
            means = {g: mean([mean([r["acc"] for r in ours[d]]) for d in ds]) for g, ds in groups.items()
                     if setting == "fewshot" and all(d in ours for d in ds)}
            if len(means) == 4:
                means["vtab mean"] = mean([means[g] for g in papers.VTAB_GROUPS])
            out += [(label, g, "acc", published[g], v, None, "-", every) for g, v in means.items()]
    return out

def paper_table(results):
    """Markdown: ours beside the published number, the difference (marked ** when more than 2 of our seeds'
    standard deviations away) and what can make them differ: backbone, recipe, split file, shots, seeds."""
    rows = paper_rows(results)
    if not rows:
        return ("No run here has a published counterpart: the papers report CoOp's 11 datasets (base-to-new), DA-VPT's "
                "FGVC and VTAB-1k sets (see papers.py); the built-in world is nanoprompt's own.")
    lines = ["| Method | Dataset | Metric | Paper | Ours | Diff | Std | Seeds | Backbone | Shots | Recipe | Split |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sources = set()
    for label, d, metric, paper, ours, s, seeds, runs in rows:
        sources.add(papers.PUBLISHED[(runs[0]["setting"], label.split(" (")[0])][0])
        diff = ours - paper
        far = s is not None and s > 0 and abs(diff) > 2 * s
        given = [r.get("args", {}) for r in runs]
        recipe = ", ".join(sorted({f"{a.get('epochs', '?')} ep, batch {a.get('batch_size', '?')}, lr {a.get('lr', '?')}"
                                   for a in given}))
        name = lambda b: b if b in clip.available_models() else Path(b).name  # noqa: E731  (a checkpoint: its file)
        facts = [sorted({name(str(r.get("backbone"))) for r in runs}), sorted({str(r.get("shots")) for r in runs})]
        split = ", ".join(sorted({(r.get("split_sha256") or "none")[:8] for r in runs}))
        lines.append(f"| {label} | {d} | {metric} | {paper:.2f} | {two(ours)} | {diff:+.2f}{' **' if far else ''} | "
                     f"{two(s) if s is not None else '–'} | {seeds} | {', '.join(facts[0])} | {', '.join(facts[1])} | "
                     f"{recipe} | {split} |")
    notes = [f"- {src}: {papers.SETUP[src]}." for src in sorted(sources)]
    return "\n".join(lines + ["", "** : more than 2 standard deviations of our seeds away. The papers' setups:", *notes])

def tables(argv=None):
    """`python eval.py RUNS_DIR`: every setting's table of the results.json files below RUNS_DIR."""
    parser = argparse.ArgumentParser(description="Aggregate results.json files into the papers' tables.")
    parser.add_argument("runs_dir", help="folder searched recursively for results.json")
    parser.add_argument("--paper", action="store_true", help="ours beside the papers' published numbers (papers.py)")
    parser.add_argument("--format", choices=["markdown", "csv"], default="markdown", help="markdown tables or CSV rows")
    parser.add_argument("--plot", default=None, help="also write PNG plots into this folder (needs matplotlib)")
    args = parser.parse_args(argv)
    results = read_results(args.runs_dir)
    if not results:
        sys.exit(f"no results.json found under {args.runs_dir}")
    if args.format == "csv":
        csv.writer(sys.stdout).writerows(csv_rows(results))
    elif args.paper:
        print(paper_table(results))
    else:
        for setting, render in TABLES.items():
            if collect(results, setting):
                print(f"## {setting}\n\n{render(results)}\n")
    if args.plot:
        for path in plot_runs(results, Path(args.plot)):
            print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
# What a learned prompt says (`python eval.py words RUN`): CoOp's interpret_prompt.py.

def nearest_words(ctx, token_embedding, k=3):
    """[[(word, distance)] * k] per context vector: the k vocabulary tokens nearest in Euclidean distance.
    ctx (M, D) learned vectors; token_embedding (V, D) CLIP's table."""
    distances = torch.cdist(ctx.float(), token_embedding.float(), compute_mode="donot_use_mm_for_euclid_dist")  # (M, V)
    values, ids = distances.topk(k, dim=1, largest=False)  # (M, k) each
    decode = clip.tokenizer.SimpleTokenizer().decode
    return [[(decode([i]).strip(), d) for i, d in zip(row_ids.tolist(), row_values.tolist())]
            for row_ids, row_values in zip(ids, values)]

def words(argv=None):
    """`python eval.py words RUN [--topk K]`: the nearest words of every learned context of a finished run."""
    parser = argparse.ArgumentParser(description="The nearest vocabulary words of a run's learned context vectors")
    parser.add_argument("run", type=files.path, help="a trained run folder (its args.json and checkpoint.pt)")
    parser.add_argument("--topk", type=int, default=3, help="words per context vector (default: 3)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk {args.topk}: give 1 or more words per context vector")
    try:
        recorded = files.read_json(Path(args.run) / "args.json")
        state = files.read_torch(Path(args.run) / "checkpoint.pt", "point at a trained run folder")["trainable"]
        method = recorded.get("method", "?")
        if method.startswith("zero-shot"):  # its checkpoint holds the untrained initial context
            raise files.InputError(f"a {method} run: nothing was trained, so there are no learned words")
        model = clip.load(recorded["backbone"], device="cpu")[0]
        table = model.token_embedding.weight.detach()  # (V, D)
        contexts = {n: t for n, t in state.items()
                    if n.split(".")[-1] == "ctx" and t.dim() == 2 and t.shape[1] == table.shape[1]}  # (M, D) each
        if not contexts:
            raise files.InputError(f"a {method} run has no learned word context (its prompts are visual, or it "
                                   f"learns none): nothing to read as words")
    except (files.InputError, clip.LoadError, FileNotFoundError, KeyError) as e:
        print(f"error: {args.run}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.run}: {method}, backbone {recorded['backbone']}")
    for name, ctx in contexts.items():
        for i, nearest in enumerate(nearest_words(ctx, table, args.topk), 1):
            print(f"{name} {i}: " + "  ".join(f"{w} ({d:.3f})" for w, d in nearest))


if __name__ == "__main__":  # python eval.py RUNS_DIR [--paper] [--format csv] [--plot DIR] | python eval.py words RUN
    if sys.argv[1:2] == ["words"]:
        words(sys.argv[2:])
    else:
        tables()
