"""Datasets, the few-shot base-to-new protocol, CLIP transforms and loaders (CoOp's on-disk layout).

Protocol (CoCoOp, identical in CaPT/DePT): seed -> k shots per class over ALL classes of the train split ->
base = first ceil(n/2) sorted labels, new = the rest -> relabel 0..k-1. Test sets keep every test image of the
selected classes.
"""
import json
import math
import os
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torchvision import transforms as T

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# name -> folder under --root, image folder inside it, CoOp split file, hand-crafted template (CoOp's CUSTOM_TEMPLATES)
DATASETS = {
    # The built-in world's objects are small and centred: random crops would cut them away, so it trains on whole
    # images (flip only). Every real dataset uses the papers' crop scale (0.08, 1).
    "world": dict(dir="world", images="images", split="split_world.json", template="a photo of a {}.", crop_scale=(1.0, 1.0)),
    "caltech101": dict(dir="caltech-101", images="101_ObjectCategories", split="split_zhou_Caltech101.json", template="a photo of a {}."),
    "oxford_pets": dict(dir="oxford_pets", images="images", split="split_zhou_OxfordPets.json", template="a photo of a {}, a type of pet."),
    "stanford_cars": dict(dir="stanford_cars", images="", split="split_zhou_StanfordCars.json", template="a photo of a {}."),
    "oxford_flowers": dict(dir="oxford_flowers", images="jpg", split="split_zhou_OxfordFlowers.json", template="a photo of a {}, a type of flower."),
    "food101": dict(dir="food-101", images="images", split="split_zhou_Food101.json", template="a photo of {}, a type of food."),
    "sun397": dict(dir="sun397", images="SUN397", split="split_zhou_SUN397.json", template="a photo of a {}."),
    "dtd": dict(dir="dtd", images="images", split="split_zhou_DescribableTextures.json", template="{} texture."),
    "eurosat": dict(dir="eurosat", images="2750", split="split_zhou_EuroSAT.json", template="a centered satellite photo of {}."),
    "ucf101": dict(dir="ucf101", images="UCF-101-midframes", split="split_zhou_UCF101.json", template="a photo of a person doing {}."),
    "fgvc_aircraft": dict(dir="fgvc_aircraft", images="images", split=None, template="a photo of a {}, a type of aircraft."),
    "imagenet": dict(dir="imagenet", images="images", split=None, template="a photo of a {}."),
    "imagenetv2": dict(dir="imagenetv2", images="imagenetv2-matched-frequency-format-val", split=None, template="a photo of a {}."),
    "imagenet_sketch": dict(dir="imagenet-sketch", images="images", split=None, template="a photo of a {}."),
    "imagenet_a": dict(dir="imagenet-adversarial", images="imagenet-a", split=None, template="a photo of a {}."),
    "imagenet_r": dict(dir="imagenet-rendition", images="imagenet-r", split=None, template="a photo of a {}."),
}

# Class-name rules of CoOp's readers that the split files do not already apply.
EUROSAT_NAMES = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
                 "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                 "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
                 "SeaLake": "Sea or Lake"}


def classname(name):
    """CoOp's prompt-time rule: underscores become spaces ('american_pit_bull_terrier', 'Apply_Eye_Makeup')."""
    return name.replace("_", " ")


def _need(path, name):
    if not Path(path).exists():
        layout = DATASETS[name]
        raise FileNotFoundError(
            f"{path} not found. Dataset '{name}' is expected at <root>/{layout['dir']}/ in CoOp's layout "
            f"(images under {layout['images'] or '.'}/" + (f", split file {layout['split']}" if layout["split"] else "")
            + "); see CoOp's DATASETS.md, or pass --download where torchvision can fetch it.")
    return Path(path)


def _read_split_file(path, image_dir):
    """CoOp's split_zhou_*.json -> {split: [(path, label, classname)]}."""
    with open(path) as f:
        raw = json.load(f)
    return {s: [(str(image_dir / p), int(y), classname(c)) for p, y, c in raw[s]] for s in raw}


def _read_folders(image_dir, classnames_file=None):
    """Folder-per-class tree -> items, classes in sorted folder order; names from an ImageNet classnames.txt if given."""
    folders = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith("."))  # no .cache
    names = {}
    if classnames_file is not None:
        for line in _need(classnames_file, "imagenet").read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name
    items = []
    for label, folder in enumerate(folders):
        for f in sorted(f for f in (image_dir / folder).iterdir() if not f.name.startswith(".")):  # no .DS_Store
            items.append((str(f), label, names.get(folder, classname(folder))))
    return items


def load_dataset(name, root, download=False):
    """Dataset with .train/.val/.test lists of (path, label, classname), .classnames (index = label), .template."""
    if name not in DATASETS and name != "folder":
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or 'folder' (with --root)")
    root = Path(root).expanduser()
    if name == "folder":
        return _folder_dataset(root)
    layout = DATASETS[name]
    base = root / layout["dir"]
    if name == "world":
        import world  # the built-in offline world renders its images on first use
        base = world.prepare_dataset(root)
    elif download:
        _download(name, root)
    image_dir = _need(base / layout["images"], name)
    own_split = base / f"split_nanoprompt_{name}.json"  # written by --download where CoOp has no split file
    if layout["split"]:
        splits = _read_split_file(_need(base / layout["split"], name), image_dir)
    elif own_split.exists():
        splits = _read_split_file(own_split, image_dir)
    elif name == "fgvc_aircraft":
        variants = _need(base / "variants.txt", name).read_text().splitlines()
        label = {v: i for i, v in enumerate(variants)}
        splits = {}
        for s in ("train", "val", "test"):
            lines = _need(base / f"images_variant_{s}.txt", name).read_text().splitlines()
            splits[s] = [(str(image_dir / f"{l.split(' ', 1)[0]}.jpg"), label[l.split(' ', 1)[1]], l.split(" ", 1)[1])
                         for l in lines if l.strip()]
    elif name == "imagenet":
        cn = base / "classnames.txt"
        splits = {"train": _read_folders(_need(image_dir / "train", name), cn),
                  "test": _read_folders(_need(image_dir / "val", name), cn)}
        splits["val"] = splits["test"]
    else:  # the ImageNet variants are test sets only
        items = _read_folders(image_dir, base / "classnames.txt")
        if name == "imagenetv2":  # folders are named 0..999 by ImageNet label
            names = [l.strip().partition(" ")[2] for l in (base / "classnames.txt").read_text().splitlines()]
            items = [(p, int(Path(p).parent.name), names[int(Path(p).parent.name)]) for p, _, _ in items]
        splits = {"train": [], "val": [], "test": items}
    classnames = _classnames(splits["train"] or splits["test"])
    return SimpleNamespace(name=name, template=layout["template"], classnames=classnames, **splits)


def _classnames(items):
    names = {}
    for _, label, c in items:
        names.setdefault(label, c)
    return [names[i] for i in sorted(names)]


def _folder_dataset(root):
    """Bring your own data: root/<class name>/*.jpg, optionally under root/train/ and root/test/."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found; --dataset folder expects --root DIR with DIR/<class name>/*.jpg "
                                f"(optionally DIR/train/<class>/ and DIR/test/<class>/)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _read_folders(root / "train"), _read_folders(root / "test")
    else:  # no split given: a deterministic 80/20 split of each class (by a hash of the file name)
        train, test = [], []
        by_class = defaultdict(list)
        for item in _read_folders(root):
            by_class[item[1]].append(item)
        for items in by_class.values():
            items = sorted(items, key=lambda item: hash_fraction(Path(item[0]).name))
            n_test = max(1, len(items) // 5) if len(items) > 1 else 0
            test += items[:n_test]
            train += items[n_test:]
    return SimpleNamespace(name="folder", template="a photo of a {}.", classnames=_classnames(train),
                           train=train, val=[], test=test)


# --download: torchvision class, its split names -> ours (None: one pool split 50/20/30 as CoOp's own splits).
TORCHVISION = {"eurosat": ("EuroSAT", None), "dtd": ("DTD", {"train": "train", "val": "val", "test": "test"}),
               "oxford_flowers": ("Flowers102", {"train": "train", "val": "val", "test": "test"}),
               "oxford_pets": ("OxfordIIITPet", {"train": "trainval", "test": "test"}),
               "food101": ("Food101", {"train": "train", "test": "test"}),
               "fgvc_aircraft": ("FGVCAircraft", {"train": "train", "val": "val", "test": "test"}),
               "caltech101": ("Caltech101", None), "sun397": ("SUN397", None)}
CALTECH_RENAME = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def _torchvision_items(name, ds, base):
    """(absolute path, class name) of every image of a torchvision dataset, with CoOp's class-name rules."""
    if name == "eurosat":
        return [(p, EUROSAT_NAMES[Path(p).parent.name]) for p, _ in ds.samples]
    if name == "caltech101":
        folder = Path(ds.root) / "101_ObjectCategories"
        return [(str(folder / ds.categories[y] / f"image_{i:04d}.jpg"), CALTECH_RENAME.get(ds.categories[y], ds.categories[y]).lower())
                for y, i in zip(ds.y, ds.index) if ds.categories[y] not in ("BACKGROUND_Google", "Faces_easy")]
    files = getattr(ds, "_image_files", None) or ds._images
    if name == "oxford_flowers":
        names_file = _need(base / "cat_to_name.json", name)  # CoOp ships it; torchvision has no flower names
        names = json.loads(names_file.read_text())
        return [(str(f), names[str(y + 1)]) for f, y in zip(files, ds._labels)]
    classes = [c.lower() if name == "oxford_pets" else c for c in ds.classes]
    return [(str(f), classes[y]) for f, y in zip(files, ds._labels)]


def _download(name, root):
    """Fetch a dataset with torchvision and write a split file in CoOp's format that the normal reader then reads."""
    import torchvision.datasets as tvd
    if name not in TORCHVISION:
        raise ValueError(f"--download supports {sorted(TORCHVISION)}; get {name!r} as CoOp's DATASETS.md describes")
    layout, (cls, splits) = DATASETS[name], TORCHVISION[name]
    base = root / layout["dir"]
    target = base / (layout["split"] or f"split_nanoprompt_{name}.json")
    if target.exists() or (name == "fgvc_aircraft" and (base / "variants.txt").exists()):
        return  # already in CoOp's layout
    image_dir = base / layout["images"]
    fetched = base / "torchvision"
    kwargs = {"annotation_level": "variant"} if name == "fgvc_aircraft" else {}
    if splits is None:
        pools = {"all": _torchvision_items(name, getattr(tvd, cls)(fetched, download=True, **kwargs), base)}
    else:
        pools = {ours: _torchvision_items(name, getattr(tvd, cls)(fetched, split=theirs, download=True, **kwargs), base)
                 for ours, theirs in splits.items()}
    if "all" in pools:  # CoOp's own rule for datasets without an official split: 50% train, 20% val, 30% test
        items = pools.pop("all")
        pools = {"train": [], "val": [], "test": []}
        for item in items:
            f = hash_fraction(item[0])
            pools["train" if f < 0.5 else "val" if f < 0.7 else "test"].append(item)
    pools.setdefault("val", [])
    label = {c: i for i, c in enumerate(sorted({c for items in pools.values() for _, c in items}))}
    split = {s: [[os.path.relpath(p, image_dir), label[c], c] for p, c in items] for s, items in pools.items()}
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(split))
    os.replace(tmp, target)
    print(f"no CoOp split file for {name}: wrote a deterministic split to {target}")


def hash_fraction(text):
    """A stable number in [0, 1) from a string (Python's hash() changes between runs)."""
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def fewshot(items, shots, seed):
    """k items per class, sampled over all classes, deterministic per seed (Dassl's generate_fewshot_dataset)."""
    by_label = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        pool = by_label[label]
        if shots > len(pool):
            raise ValueError(f"class {pool[0][2]!r} has {len(pool)} training images, fewer than --shots {shots}; "
                             f"use fewer shots")
        out.extend(rng.sample(pool, shots))
    return out


def split_base_new(items, which, labels=None):
    """Keep base (first ceil(n/2) sorted labels), new (the rest) or all classes; relabel 0..k-1 in sorted order.

    `labels` is the label set the halves are taken from (the few-shot train labels); default: those in items.
    Returns (items, classnames).
    """
    labels = sorted({y for _, y, _ in items} if labels is None else labels)
    m = math.ceil(len(labels) / 2)
    keep = {"all": labels, "base": labels[:m], "new": labels[m:]}[which]
    relabel = {y: i for i, y in enumerate(keep)}
    out = [(p, relabel[y], c) for p, y, c in items if y in relabel]
    return out, _classnames(out) if out else []


# Cross-dataset transfer (CoCoOp's protocol): train on ImageNet, test on the 10 others; the 4 variants = domain shift.
CROSS_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
                 "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
IMAGENET_VARIANTS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def imagenet_labels(name, root):
    """ImageNet label (0..999) of each class of an ImageNet variant, in the variant's label order.

    ImageNet-A and -R hold 200 of the 1000 classes (folders named by WordNet id); V2 and Sketch hold all 1000.
    The papers score the variants with the ImageNet classifier restricted to these rows.
    """
    base = Path(root).expanduser() / DATASETS[name]["dir"]
    wnids = [line.split(" ", 1)[0] for line in _need(base / "classnames.txt", name).read_text().splitlines() if line.strip()]
    if name == "imagenetv2":  # folders 0..999 are ImageNet labels already
        return list(range(len(wnids)))
    folders = sorted(d.name for d in _need(base / DATASETS[name]["images"], name).iterdir()
                     if d.is_dir() and not d.name.startswith("."))
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"{name}: folders {unknown[:5]} are not WordNet ids of {base / 'classnames.txt'}")
    return [index[f] for f in folders]


def prepare(name, root, shots, seed, setting="base2new", download=False, targets=None):
    """Everything a method script needs: few-shot train items of the training classes and the test sets.

    .train: [(path, label, classname)] relabelled; .train_classnames; .tests: {name: (items, classnames)} with
    "base" and "new" (base2new), "all" (fewshot), or the source's "all" and one entry per target (crossdataset);
    .templates: {test name: its dataset's template}; .template: the training set's; .imagenet_rows: {variant:
    ImageNet labels of its classes} (crossdataset from ImageNet); .train_files: the chosen few-shot files;
    .crop_scale of the train transform.
    """
    ds = load_dataset(name, root, download)
    train = fewshot(ds.train, shots, seed) if shots > 0 else ds.train
    labels = {y for _, y, _ in ds.train}
    templates, imagenet_rows = {}, {}
    if setting == "base2new":
        train_items, train_names = split_base_new(train, "base", labels)
        tests = {w: split_base_new(ds.test, w, labels) for w in ("base", "new")}
    elif setting in ("fewshot", "crossdataset"):
        train_items, train_names = split_base_new(train, "all", labels)
        tests = {"all": split_base_new(ds.test, "all", labels)}
        for target in (targets or []) if setting == "crossdataset" else []:
            target_ds = load_dataset(target, root, download)
            tests[target] = (target_ds.test, target_ds.classnames)
            templates[target] = target_ds.template
            if name == "imagenet" and target in IMAGENET_VARIANTS:
                imagenet_rows[target] = imagenet_labels(target, root)
    else:
        raise ValueError(f"unknown setting {setting!r}; use base2new, fewshot or crossdataset")
    templates = {t: templates.get(t, ds.template) for t in tests}
    return SimpleNamespace(train=train_items, train_classnames=train_names, tests=tests, template=ds.template,
                           templates=templates, imagenet_rows=imagenet_rows, train_files=[p for p, _, _ in train_items],
                           crop_scale=DATASETS.get(name, {}).get("crop_scale", (0.08, 1.0)))


def transform(resolution, train, crop_scale=(0.08, 1.0)):
    """CLIP transforms. train: RandomResizedCrop(crop_scale, bicubic) + flip; test: shorter side + center crop."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        ratio = (1.0, 1.0) if crop_scale == (1.0, 1.0) else (3 / 4, 4 / 3)  # (1, 1): the whole image, resized
        steps = [T.RandomResizedCrop(resolution, scale=crop_scale, ratio=ratio, interpolation=bicubic),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(resolution, interpolation=bicubic), T.CenterCrop(resolution)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


class ImageList(torch.utils.data.Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, _ = self.items[i]
        try:
            image = Image.open(path).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} is missing; check the dataset folder against its split file")
        except OSError as e:
            raise OSError(f"image {path} cannot be decoded ({e}); re-download or delete it from the split") from e
        return self.transform(image), label


def loader(items, transform, batch_size, train, num_workers=None, seed=0):
    """DataLoader of (images, labels). Training never drops its only batch: a batch size larger than the few-shot
    set still trains (Dassl's drop_last once silently skipped EuroSAT 1-shot training)."""
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ImageList(items, transform), batch_size=batch_size, shuffle=train,
                                       drop_last=train and len(items) > batch_size, generator=g if train else None,
                                       num_workers=num_workers, persistent_workers=False)


def default_backbone(dataset, root):
    """The backbone a script uses when --backbone is 'auto': the world's tiny CLIP for the world, else ViT-B/16."""
    if dataset == "world":
        import world
        return str(world.prepare_clip(root))
    return "ViT-B/16"
