"""The papers' published numbers, for `python eval.py runs --paper` (ours beside theirs). Data only.

Every number is top-1 accuracy (%) as printed in its source, ViT-B/16 (DA-VPT: ViT-B ImageNet-21k), 16 shots and
3 seeds for base-to-new, the whole training set for DA-VPT. Keys are nanoprompt's method names (a run's
`method`) and dataset names; SETUP says how each source ran, so that `--paper` can say what differs.
"""

B2N = ["average", "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
       "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]  # the column order of both base-to-new tables


def _b2n(*cells):
    """{dataset: (base, new, H)} from B2N-ordered 'B/N/H' strings."""
    return {d: tuple(float(v) for v in c.split("/")) for d, c in zip(B2N, cells)}


CAPT = "CaPT (arXiv 2506.23856), base-to-new table (examples/b2n.png)"
COCOOP = "CoCoOp (arXiv 2203.05557), Table 1"
DAVPT = "DA-VPT (arXiv 2505.23694), Table 3 (FGVC) and Table 1 (VTAB-1k group means)"

PUBLISHED = {  # (setting, method) -> (source, {dataset: number or (base, new, H)})
    ("base2new", "coop"): (CAPT, _b2n(
        "80.82/69.68/74.84", "76.60/69.70/72.99", "98.03/93.83/95.89", "95.53/97.40/96.46", "72.00/68.13/70.01",
        "96.33/72.30/82.60", "90.50/91.77/91.13", "34.13/16.80/22.52", "80.40/75.90/78.09", "78.70/49.47/60.75",
        "83.73/58.70/69.02", "83.10/72.43/77.40")),
    ("base2new", "capt"): (CAPT, _b2n(
        "81.32/73.92/77.44", "76.73/69.60/72.99", "97.97/94.67/96.29", "94.83/97.47/96.13", "74.07/74.07/74.07",
        "96.83/74.57/84.25", "90.43/91.43/90.93", "35.37/34.17/34.76", "81.57/76.90/79.16", "77.87/55.40/64.74",
        "85.03/69.00/76.18", "83.87/75.83/79.65")),
    ("base2new", "kgcoop+capt"): (CAPT, _b2n(
        "81.50/74.47/77.83", "76.60/69.63/72.95", "97.93/94.40/96.13", "94.93/97.50/96.20", "74.40/74.17/74.28",
        "97.40/74.53/84.45", "90.50/91.57/91.03", "36.63/34.83/35.71", "81.93/77.40/79.60", "79.23/54.73/64.74",
        "83.60/72.33/77.56", "83.33/78.07/80.61")),
    ("base2new", "decapt"): (CAPT, _b2n(  # its SUN397 new is printed 78.87 (sic), its H 80.05
        "83.99/75.70/79.63", "77.00/70.00/73.33", "98.40/94.60/96.46", "93.87/97.57/95.68", "79.87/74.77/77.23",
        "98.53/75.43/85.45", "90.47/91.63/91.05", "43.47/35.93/39.34", "82.37/78.87/80.05", "82.70/62.47/71.17",
        "91.37/73.93/81.73", "85.83/78.47/81.98")),
    ("base2new", "cocoop"): (COCOOP, _b2n(
        "80.47/71.69/75.83", "75.98/70.43/73.10", "97.96/93.81/95.84", "95.20/97.69/96.43", "70.49/73.59/72.01",
        "94.87/71.75/81.71", "90.70/91.29/90.99", "33.41/23.71/27.74", "79.74/76.86/78.27", "77.01/56.00/64.85",
        "87.49/60.04/71.21", "82.33/73.45/77.64")),
    ("base2new", "zero-shot"): (COCOOP, _b2n(
        "69.34/74.22/71.70", "72.43/68.14/70.22", "96.84/94.00/95.40", "91.17/97.26/94.12", "63.37/74.89/68.65",
        "72.08/77.80/74.83", "90.10/91.22/90.66", "27.19/36.29/31.09", "69.36/75.35/72.23", "53.24/59.90/56.37",
        "56.48/64.05/60.03", "70.53/77.50/73.85")),
    ("fewshot", "davpt"): (DAVPT, {"cub": 90.2, "nabirds": 87.4, "flowers": 99.4, "dogs": 89.4, "cars": 89.7,
                                   "fgvc mean": 91.22, "vtab natural": 80.25, "vtab specialized": 85.12,
                                   "vtab structured": 58.71, "vtab mean": 74.69}),
    ("fewshot", "vpt-deep"): (DAVPT, {"cub": 88.5, "nabirds": 84.2, "flowers": 99.0, "dogs": 90.2, "cars": 83.6,
                                      "fgvc mean": 89.11, "vtab natural": 78.48, "vtab specialized": 82.43,
                                      "vtab structured": 54.98, "vtab mean": 71.96}),
}

# How each source ran (what a run must match for its number to be comparable).
SETUP = {CAPT: "ViT-B/16, 16 shots, seeds 1-3, CoOp's split files, CaPT's recipes",
         COCOOP: "ViT-B/16, 16 shots, seeds 1-3, CoOp's split files, CoCoOp's recipes (CoOp: batch 32, 200 epochs)",
         DAVPT: "ViT-B/16 ImageNet-21k (not CLIP), every training image, VPT's / NOAH's splits, released configs"}
PAPER_BACKBONE = {CAPT: "ViT-B/16", COCOOP: "ViT-B/16", DAVPT: "ViT-B/16 (ImageNet-21k)"}

# DA-VPT's averages: FGVC the mean of its 5 sets; VTAB-1k the mean of its 3 group means (each a mean of tasks).
FGVC = ["cub", "nabirds", "flowers", "dogs", "cars"]
VTAB_GROUPS = {"vtab natural": ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn",
                                "sun397"],
               "vtab specialized": ["patch_camelyon", "eurosat", "resisc45", "retinopathy"],
               "vtab structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                                   "smallnorb_azi", "smallnorb_ele"]}
