"""Everything that produces inputs: datasets, the papers' protocols, CLIP's transforms and loaders (no models).

Datasets are read from their published layouts (CoOp's split files and folders for the 11 prompt-tuning datasets
and the ImageNet variants; for DA-VPT, VPT's split files in the official folders of CUB-200-2011, NABirds, Stanford
Dogs, Stanford Cars and Oxford Flowers, and VTAB-1k in NOAH's layout), from a folder of your own (--dataset folder),
or from the built-in world (world.py).

Protocol (CoCoOp, identical in CaPT/DePT): seed -> k shots per class over ALL classes of the train split ->
base = first ceil(n/2) sorted labels, new = the rest -> relabel 0..k-1. Test sets keep every test image of the
selected classes. Few-shot uses every class; cross-dataset trains on the source and tests each target with its
own class names and template.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

import files
import world
from clip.clip import MEAN, STD  # CLIP's normalisation, one copy for the whole project
from files import ROOT, InputError  # noqa: F401  (the default --root; the one error type for bad input)


class Item(NamedTuple):
    """One image of a dataset."""
    path: str
    label: int
    classname: str


@dataclass
class TestSet:
    """One test set of a run: its images, the class names they are scored against, and how to prompt them."""
    name: str  # "base", "new", "all", or a target dataset's name
    dataset: str  # the dataset it comes from
    part: str  # which part of it: base / new / all of the source, test of a target (names it in the feature store)
    items: list
    classnames: list
    template: str  # the dataset's hand-crafted prompt
    imagenet_rows: list = None  # ImageNet-A/-R/-V2/-Sketch from ImageNet: the ImageNet labels of its classes
    test_crop: float = 1.0  # center crop / resized shorter side of the test transform (its dataset's, see DATASETS)

    def transform(self, resolution):
        """This test set's transform at the model's input resolution."""
        return transform(resolution, train=False, test_crop=self.test_crop)


@dataclass
class Split:
    """What one run trains on and tests on (see `prepare`)."""
    dataset: str
    train: list  # [Item] of the training classes, relabelled 0..C-1
    classnames: list  # the training classes, index = label
    template: str  # the training dataset's hand-crafted prompt
    tests: dict = field(default_factory=dict)  # {name: TestSet}
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop's scale for the training images; None: no augmentation
    test_crop: float = 1.0

    def train_transform(self, resolution):
        """The training transform (random crop and flip, or the dataset's own rule) at the input resolution."""
        return transform(resolution, train=True, crop_scale=self.crop_scale, test_crop=self.test_crop)


def shots(text):
    """--shots: a positive number of images per class, or 'all' (the whole train split)."""
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images per class or 'all', got {text!r}")
    return int(text)


def add_arguments(parser):
    """The data and protocol flags every method script shares."""
    group = parser.add_argument_group("data and protocol (shared by every method)")
    group.add_argument("--dataset", nargs="+", default=None,
                       help="dataset name(s) (see data.DATASETS) or 'folder'; default world (imagenet for crossdataset)")
    group.add_argument("--root", default=str(ROOT), type=files.path,
                       help="folder holding the datasets in their published layouts (default: data/ beside the code, "
                            "where the built-in world is cached)")
    group.add_argument("--shots", type=shots, default=16,
                       help="training images per class (papers: 16), or 'all' for the whole train split")
    group.add_argument("--setting", default="base2new", choices=["base2new", "fewshot", "crossdataset"],
                       help="base2new: train on base classes, test base and new; fewshot: all classes; "
                            "crossdataset: train on the source, test on --targets")
    group.add_argument("--targets", nargs="+", default=CROSS_TARGETS,
                       help="crossdataset: datasets tested with their own class names and templates")
    group.add_argument("--val", action="store_true",
                       help="tune on the validation split: train without it and test on it (VTAB-1k: train800 / val200)")
    group.add_argument("--download", action="store_true", help="fetch the dataset with torchvision if it is missing")


# name -> folder under --root, image folder inside it, split file, hand-crafted template (CoOp's CUSTOM_TEMPLATES)
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
    # DA-VPT's five fine-grained sets as VPT and DA-VPT read them: VPT's split files train.json (the train images
    # minus VPT's validation ones), val.json and test.json, {path relative to `images`: class id}, in the official
    # folders; test images Resize 256 -> CenterCrop 224 (test_crop 0.875), as the released transforms.
    "cub": dict(dir="CUB_200_2011", images="images", split=None, reader="vpt-json", test_crop=0.875,
                template="a photo of a {}, a type of bird."),
    "nabirds": dict(dir="nabirds", images="images", split=None, reader="vpt-json", test_crop=0.875,
                    template="a photo of a {}, a type of bird."),
    "dogs": dict(dir="Stanford-dogs", images="Images", split=None, reader="vpt-json", test_crop=0.875,
                 template="a photo of a {}, a type of dog."),
    "cars": dict(dir="Stanford-cars", images="", split=None, reader="vpt-json", test_crop=0.875, template="a photo of a {}."),
    "flowers": dict(dir="OxfordFlower", images="", split=None, reader="vpt-json", test_crop=0.875,
                    template="a photo of a {}, a type of flower."),
    # VTAB-1k in NOAH's layout (vtab-1k/<task>/ with train800val200.txt, val200.txt and test.txt, "path label" per
    # line), as DA-VPT reads it: no augmentation (train images resized and center-cropped like the test ones).
    **{f"vtab-{name}": dict(dir=f"vtab-1k/{folder}", images="", split=None, reader="vtab", crop_scale=None,
                            template="a photo of a {}.") for name, folder in {
        "cifar100": "cifar", "caltech101": "caltech101", "dtd": "dtd", "oxford_flowers102": "oxford_flowers102",
        "oxford_iiit_pet": "oxford_iiit_pet", "svhn": "svhn", "sun397": "sun397", "patch_camelyon": "patch_camelyon",
        "eurosat": "eurosat", "resisc45": "resisc45", "retinopathy": "diabetic_retinopathy",
        "clevr_count": "clevr_count", "clevr_dist": "clevr_dist", "dmlab": "dmlab", "kitti": "kitti",
        "dsprites_loc": "dsprites_loc", "dsprites_ori": "dsprites_ori", "smallnorb_azi": "smallnorb_azi",
        "smallnorb_ele": "smallnorb_ele"}.items()},
}

# Cross-dataset transfer (CoCoOp's protocol): train on ImageNet, test on the 10 others; the 4 variants = domain shift.
CROSS_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
                 "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
IMAGENET_VARIANTS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]

# (classes, train images, test images) as published (CoOp's DATASETS.md and splits; the official test sets), so
# that a run's cost can be estimated before any dataset is read (eval.expected_cost balances torchrun's ranks).
SIZES = {"world": (32, 768, 1280), "caltech101": (100, 4128, 2465), "oxford_pets": (37, 2944, 3669),
         "stanford_cars": (196, 6509, 8041), "oxford_flowers": (102, 4093, 2463), "food101": (101, 50500, 30300),
         "sun397": (397, 15880, 19850), "dtd": (47, 2820, 1692), "eurosat": (10, 13500, 8100),
         "ucf101": (101, 7639, 3783), "fgvc_aircraft": (100, 3334, 3333), "imagenet": (1000, 1281167, 50000),
         "imagenetv2": (1000, 0, 10000), "imagenet_sketch": (1000, 0, 50889), "imagenet_a": (200, 0, 7500),
         "imagenet_r": (200, 0, 30000), "cub": (200, 5994, 5794), "nabirds": (555, 23929, 24633),
         "dogs": (120, 12000, 8580), "cars": (196, 8144, 8041), "flowers": (102, 2040, 6149)}


def dataset_size(name, root):
    """(classes, train images, test images) of a dataset: the published sizes, counted for --dataset folder, and
    (1, 1, 1) for a folder that cannot be read (its run reports why)."""
    if name in SIZES:
        return SIZES[name]
    try:
        ds = load_dataset(name, root)
    except InputError:
        return 1, 1, 1
    return len(ds.classnames), len(ds.train), len(ds.test)


def classname(name):
    """CoOp's prompt-time rule: underscores become spaces ('american_pit_bull_terrier', 'Apply_Eye_Makeup')."""
    return name.replace("_", " ")


def _need(path, name):
    if not Path(path).exists():
        layout = DATASETS[name]
        raise InputError(
            f"{path} not found. Dataset '{name}' is expected at <root>/{layout['dir']}/ in its published layout "
            f"(images under {layout['images'] or '.'}/" + (f", split file {layout['split']}" if layout["split"] else "")
            + "); see the README's dataset section, or pass --download where torchvision can fetch it.")
    return Path(path)


def _read_split_file(path, image_dir):
    """CoOp's split_zhou_*.json -> {split: [Item]}."""
    with open(path) as f:
        raw = json.load(f)
    return {s: [Item(str(image_dir / p), int(y), classname(c)) for p, y, c in raw[s]] for s in raw}


def _read_folders(image_dir, classnames_file=None):
    """Folder-per-class tree -> items, classes in sorted folder order; names from an ImageNet classnames.txt if given.
    A class's files are in sorted order, so ImageNet's few-shot pool (and its picks) is too; Dassl lists them with
    os.listdir, whose order depends on the filesystem."""
    folders = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    hidden = sorted(d.name for d in image_dir.iterdir() if d.is_dir() and d.name.startswith(".") and d.name != ".cache")
    if hidden:  # .cache is the feature store's
        print(f"note: {image_dir}: skipping folders whose names start with '.' (not classes): {hidden}")
    names = {}
    if classnames_file is not None:
        for line in _need(classnames_file, "imagenet").read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = classname(name)
    files = {folder: sorted(f for f in (image_dir / folder).iterdir() if not f.name.startswith("."))  # no .DS_Store
             for folder in folders}
    empty = [folder for folder in folders if not files[folder]]
    if empty:
        raise InputError(f"{image_dir}: class folders without images: {empty}; add their images or remove the folders")
    return [Item(str(f), label, names.get(folder, classname(folder))) for label, folder in enumerate(folders)
            for f in files[folder]]


def _read_vpt_json(name, base, image_dir):
    """VPT's JSON splits ({relative path: class id}; ids made contiguous in sorted order, as the released code).
    Class names (only a text head needs them) come from class folders ("001.Black_footed_Albatross",
    "n02085620-Chihuahua"), else NABirds' classes.txt ("295 Red-tailed Hawk", by its folder "0295") or Flowers'
    cat_to_name.json (keys 1..102 for ids 0..101), else "class <id>"."""
    raw = {s: json.loads(_need(base / f"{s}.json", name).read_text()) for s in ("train", "val", "test")
           if s != "val" or (base / "val.json").exists()}
    ids = sorted({int(y) for y in raw["train"].values()})
    label = {y: i for i, y in enumerate(ids)}
    listed = {}
    if (base / "classes.txt").exists():
        listed = {int(k): v.strip() for k, v in (l.split(" ", 1) for l in (base / "classes.txt").read_text().splitlines()
                                                 if l.strip())}
    elif (base / "cat_to_name.json").exists():
        listed = {int(k) - 1: v for k, v in json.loads((base / "cat_to_name.json").read_text()).items()}
    folders = defaultdict(set)
    for rel, y in raw["train"].items():
        folders[int(y)].add(Path(rel).parent.name)
    class_folders = all(len(f) == 1 for f in folders.values()) and len(set().union(*folders.values())) == len(folders)

    def name_of(y):
        folder = next(iter(folders[y])) if class_folders else ""
        if folder and not folder.isdigit():
            return re.sub(r"^(\d+\.|n\d+-)", "", folder).replace("_", " ")
        return listed.get(int(folder) if folder else y, f"class {y}")
    names = {y: name_of(y) for y in ids}
    return {s: [Item(str(image_dir / rel), label[int(y)], names[int(y)]) for rel, y in sorted(raw[s].items())]
            for s in raw} | ({} if "val" in raw else {"val": []})


def _read_vtab(name, base, val=False):
    """VTAB-1k task folder (NOAH's lists): train = train800val200.txt (all 1,000 images), test = test.txt; with
    val (tuning) train = train800.txt and val = val200.txt. NOAH keeps each list's own copies of the images, so
    val200's images cannot be told apart inside train800val200 by path: the tuning lists are read instead."""
    def lines(file):
        return [Item(str(base / p), int(y), f"class {y}") for p, y in
                (l.split() for l in _need(base / file, name).read_text().splitlines() if l.strip())]
    return {"train": lines("train800.txt" if val else "train800val200.txt"), "val": lines("val200.txt"),
            "test": lines("test.txt")}


@dataclass
class Dataset:
    """A dataset as read from disk: its splits as lists of Items, class names by label and CoOp's template."""
    name: str
    template: str
    classnames: list  # index = label
    train: list
    val: list
    test: list


def load_dataset(name, root, download=False, val=False):
    """A Dataset with .train/.val/.test lists of Items, .classnames (index = label) and .template. val: the train
    list to tune on, where a dataset has its own (VTAB-1k's train800)."""
    if name not in DATASETS and name != "folder":
        raise InputError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} or 'folder' (with --root)")
    root = Path(root).expanduser()
    if name == "folder":
        return _folder_dataset(root)
    layout = DATASETS[name]
    base = root / layout["dir"]
    if name == "world":
        base = world.prepare_dataset(root)  # the built-in offline world renders its images on first use
    elif download:
        _download(name, root)
    image_dir = base / layout["images"] if name == "dogs" else _need(base / layout["images"], name)
    if layout["split"]:
        path = _need(base / layout["split"], name)
        shipped = SPLITS / f"{layout['split']}.gz"
        if shipped.exists() and gzip.decompress(shipped.read_bytes()) != path.read_bytes():
            print(f"note: {path} is not CoOp's split file (splits/{shipped.name} differs); runs on it are kept apart "
                  f"from runs on CoOp's. An older nanoprompt's --download wrote its own: delete it and run --download")
        splits = _read_split_file(path, image_dir)
    elif layout.get("reader") == "vpt-json":
        if name == "dogs" and not image_dir.exists() and (base / "images").exists():  # DA-VPT's copy: lower case
            image_dir = base / "images"
        splits = _read_vpt_json(name, base, image_dir)
    elif layout.get("reader") == "vtab":
        splits = _read_vtab(name, base, val)
    elif name == "fgvc_aircraft":
        # Lines are stripped, as CoOp's reader does ("<image id> <variant>" in the lists).
        variants = [v.strip() for v in _need(base / "variants.txt", name).read_text().splitlines() if v.strip()]
        label = {v: i for i, v in enumerate(variants)}
        splits = {}
        for s in ("train", "val", "test"):
            lines = [l.strip().partition(" ") for l in
                     _need(base / f"images_variant_{s}.txt", name).read_text().splitlines() if l.strip()]
            splits[s] = [Item(str(image_dir / f"{image}.jpg"), label[v], classname(v)) for image, _, v in lines]
    elif name == "imagenet":
        cn = base / "classnames.txt"
        splits = {"train": _read_folders(_need(image_dir / "train", name), cn),
                  "test": _read_folders(_need(image_dir / "val", name), cn),
                  "val": []}  # ImageNet's val folder is its test set: no split to tune on (--val is refused)
    else:  # the ImageNet variants are test sets only
        items = _read_folders(image_dir, base / "classnames.txt")
        if name == "imagenetv2":  # folders are named 0..999 by ImageNet label
            names = [classname(l.strip().partition(" ")[2]) for l in (base / "classnames.txt").read_text().splitlines()]
            items = [Item(p, int(Path(p).parent.name), names[int(Path(p).parent.name)]) for p, _, _ in items]
        splits = {"train": [], "val": [], "test": items}
    return Dataset(name, layout["template"], _classnames(splits["train"] or splits["test"]), splits["train"],
                   splits.get("val", []), splits["test"])


def _classnames(items):
    names = {}
    for _, label, c in items:
        names.setdefault(label, c)
    return [names[i] for i in sorted(names)]


def _folder_dataset(root):
    """Bring your own data: root/<class name>/*.jpg, optionally under root/train/ and root/test/."""
    if not root.is_dir():
        raise InputError(f"{root} " + ("is a file, not a folder" if root.exists() else "not found")
                         + "; --dataset folder expects --root DIR with DIR/<class name>/*.jpg "
                         + f"(optionally DIR/train/<class>/ and DIR/test/<class>/)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _read_folders(root / "train"), _read_folders(root / "test")
    else:  # no split given: a deterministic 80/20 split of each class (by a hash of the file name)
        train, test = [], []
        by_class = defaultdict(list)
        for item in _read_folders(root):
            by_class[item.label].append(item)
        for items in by_class.values():
            items = sorted(items, key=lambda item: hash_fraction(Path(item.path).name))
            n_test = max(1, len(items) // 5) if len(items) > 1 else 0
            test += items[:n_test]
            train += items[n_test:]
    return Dataset("folder", "a photo of a {}.", _classnames(train), train, [], test)


# --download: the torchvision class, where its download keeps the images (under <dataset dir>/torchvision/), options.
TORCHVISION = {"eurosat": ("EuroSAT", "eurosat/2750", {}), "dtd": ("DTD", "dtd/dtd/images", {}),
               "oxford_flowers": ("Flowers102", "flowers-102/jpg", {}),
               "oxford_pets": ("OxfordIIITPet", "oxford-iiit-pet/images", {}),
               "food101": ("Food101", "food-101/images", {}), "sun397": ("SUN397", "SUN397", {}),
               "caltech101": ("Caltech101", "caltech101/101_ObjectCategories", {}),
               "fgvc_aircraft": ("FGVCAircraft", "fgvc-aircraft-2013b/data", {"annotation_level": "variant"})}
# CoOp's split files (KaiyangZhou/CoOp, MIT licence; see splits/README.md): seven ship in splits/ (gzip), Food101's
# and SUN397's are fetched from the public copies CoOp's DATASETS.md links (Google Drive file ids).
SPLITS = files.HERE / "splits"
SPLIT_DRIVE = {"split_zhou_Food101.json": "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
               "split_zhou_SUN397.json": "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"}
DRIVE_URL = "https://drive.google.com/uc?export=download&id={}"
COOP_SIZES = {"caltech101": (4128, 1649, 2465), "oxford_pets": (2944, 736, 3669), "stanford_cars": (6509, 1635, 8041),
              "oxford_flowers": (4093, 1633, 2463), "food101": (50500, 20200, 30300), "sun397": (15880, 3970, 19850),
              "dtd": (2820, 1128, 1692), "eurosat": (13500, 5400, 8100), "ucf101": (7639, 1898, 3783)}  # train/val/test


def coop_split(name):
    """The bytes of CoOp's split file of a dataset: the shipped copy, else the public one (downloaded)."""
    filename = DATASETS[name]["split"]
    shipped = SPLITS / f"{filename}.gz"
    if shipped.exists():
        return gzip.decompress(shipped.read_bytes())
    url = DRIVE_URL.format(SPLIT_DRIVE[filename])
    where = f"download {filename} by hand (CoOp's DATASETS.md links it) and put it at <root>/{DATASETS[name]['dir']}/"
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            raw = answer.read()
    except OSError as e:
        raise InputError(f"--download: could not fetch CoOp's {filename} from {url} ({e}); {where}")
    try:
        json.loads(raw)
    except ValueError:
        raise InputError(f"--download: {url} did not answer with CoOp's {filename} (it sent {raw[:60]!r}); {where}")
    return raw


def check_coop_split(name, split, image_dir):
    """CoOp's split sizes, and every image it lists present under image_dir (before the file is written)."""
    sizes = tuple(len(split.get(s, [])) for s in ("train", "val", "test"))
    if sizes != COOP_SIZES[name]:
        raise InputError(f"--download: the split file of {name} holds {sizes} train/val/test images, CoOp's "
                         f"{COOP_SIZES[name]}: it is not CoOp's split")
    missing = [p for part in split.values() for p, _, _ in part if not (image_dir / p).exists()]
    if missing:
        raise InputError(f"--download: {len(missing)} images of CoOp's {name} split are not under {image_dir} "
                         f"(e.g. {missing[0]}): the download is incomplete; remove {image_dir.parent} and run again")


def _download(name, root):
    """--download: the images with torchvision, placed where CoOp's layout has them (links into the download), and
    CoOp's own split file beside them, checked against the images before it is written (FGVC: its official lists)."""
    import torchvision.datasets as tvd  # only --download needs torchvision's dataset classes
    if name not in TORCHVISION:
        raise InputError(f"--download supports {sorted(TORCHVISION)}; get {name!r} as CoOp's DATASETS.md describes")
    layout, (cls, folder, options) = DATASETS[name], TORCHVISION[name]
    base = root / layout["dir"]
    done = base / (layout["split"] or "variants.txt")  # the split file (FGVC: its class list) is written last
    if done.exists():
        return
    getattr(tvd, cls)(base / "torchvision", download=True, **options)
    source = base / "torchvision" / folder
    links = [(base / f.name, f) for f in sorted(source.iterdir()) if f.name != "variants.txt"] \
        if name == "fgvc_aircraft" else [(base / layout["images"], source)]
    for link, target in links:
        if not link.exists():
            link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=target.is_dir())
    if name == "fgvc_aircraft":
        done.symlink_to(os.path.relpath(source / "variants.txt", base))
        return
    raw = coop_split(name)
    check_coop_split(name, json.loads(raw), base / layout["images"])
    files.atomic_write(done, lambda tmp: Path(tmp).write_bytes(raw))
    print(f"--download: {name}'s images in {base / layout['images']}, CoOp's split file {done}")


def split_sha256(name, root):
    """sha256 of the file that defines a dataset's split (CoOp's split file, the world's), or of `sha256sum`'s
    lines for several (FGVC's lists, VPT's JSON, VTAB's lists); None where folders alone define it (ImageNet, its
    variants, a folder) or the files are not there (yet: nothing is downloaded or rendered here).
    A run records it, is reused only on the same files, and the tables keep runs on other files apart."""
    if name == "folder":
        return None
    layout = DATASETS[name]
    base = Path(root).expanduser() / layout["dir"]
    if layout["split"]:
        names = [layout["split"]]
    elif name == "fgvc_aircraft":
        names = ["variants.txt"] + [f"images_variant_{s}.txt" for s in ("train", "val", "test")]
    elif layout.get("reader") == "vpt-json":
        names = ["train.json", "val.json", "test.json"]
    elif layout.get("reader") == "vtab":
        names = ["train800val200.txt", "train800.txt", "val200.txt", "test.txt"]
    else:
        return None
    sums = [(n, hashlib.sha256((base / n).read_bytes()).hexdigest()) for n in names if (base / n).exists()]
    if len(names) == 1:  # the split file's own sha256 (what `sha256sum` prints)
        return sums[0][1] if sums else None
    return hashlib.sha256("".join(f"{h}  {n}\n" for n, h in sums).encode()).hexdigest()  # of `sha256sum`'s lines


def hash_fraction(text):
    """A stable number in [0, 1) from a string (Python's hash() changes between runs)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


# ---------------------------------------------------------------------------------------------------------------
# The protocol.

def fewshot(items, shots, seed):
    """k items per class, the images Dassl's generate_fewshot_dataset picks (and so CoOp's published picks): the
    classes in order of first appearance in the train list (not sorted), random.sample(class's items, k) for each,
    all from one stream seeded with the run's seed. Dassl keeps every image of a class smaller than k (a
    silently smaller class); here that is an error that says which class."""
    by_label = defaultdict(list)  # label -> its items, labels in order of first appearance
    for item in items:
        by_label[item[1]].append(item)
    rng = random.Random(seed)
    out = []
    for pool in by_label.values():
        if shots > len(pool):
            raise InputError(f"class {pool[0][2]!r} has {len(pool)} training images, fewer than --shots {shots}; "
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
    out = [Item(p, relabel[y], c) for p, y, c in items if y in relabel]
    return out, _classnames(out) if out else []


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
        raise InputError(f"{name}: folders {unknown[:5]} are not WordNet ids of {base / 'classnames.txt'}")
    return [index[f] for f in folders]


def prepare(name, root, *, shots, seed, setting="base2new", targets=(), download=False, val=False):
    """The Split of one run: few-shot train items of the training classes and the setting's test sets.

    base2new: train on the base half, tests "base" and "new"; fewshot: train and test "all" classes;
    crossdataset: train and test "all" classes of the source, then one test set per target (its own class names
    and template; ImageNet's variants carry the ImageNet labels of their classes). shots "all": the whole train split.
    val: the validation split replaces the test split, and its images leave the train split (hyperparameter tuning).
    Every image of the run is checked before anything is trained (see check_images).
    """
    ds = load_dataset(name, root, download, val=val)
    if val:
        if not ds.val:
            raise InputError(f"--val: {name} has no validation split")
        held_out = {it.path for it in ds.val}
        ds = Dataset(ds.name, ds.template, ds.classnames, [it for it in ds.train if it.path not in held_out], [], ds.val)
    train = ds.train if shots == "all" else fewshot(ds.train, shots, seed)
    labels = {it.label for it in ds.train}
    if setting not in ("base2new", "fewshot", "crossdataset"):
        raise InputError(f"unknown setting {setting!r}; use base2new, fewshot or crossdataset")
    if setting == "base2new" and len(labels) < 2:
        raise InputError(f"{name} has {len(labels)} class: base-to-new needs 2 or more (base and new halves); "
                         f"use --setting fewshot")
    parts = ("base", "new") if setting == "base2new" else ("all",)
    train_items, classnames = split_base_new(train, parts[0], labels)
    tests = {}
    layout = lambda n: DATASETS.get(n, {})  # noqa: E731  ('folder' has none)
    for part in parts:
        items, names = split_base_new(ds.test, part, labels)
        tests[part] = TestSet(part, name, "val " + part if val else part, items, names, ds.template,
                              test_crop=layout(name).get("test_crop", 1.0))
    for target in targets if setting == "crossdataset" else ():
        target_ds = load_dataset(target, root, download)
        rows = imagenet_labels(target, root) if name == "imagenet" and target in IMAGENET_VARIANTS else None
        tests[target] = TestSet(target, target, "test", target_ds.test, target_ds.classnames, target_ds.template, rows,
                                test_crop=layout(target).get("test_crop", 1.0))
    check_images(train_items + [it for t in tests.values() for it in t.items], Path(root).expanduser() / ".cache" / "checked")
    return Split(name, train_items, classnames, ds.template, tests, crop_scale=layout(name).get("crop_scale", (0.08, 1.0)),
                 test_crop=layout(name).get("test_crop", 1.0))


def prepare_for(args):
    """The Split of one run from its flags: `prepare` with --dataset, --root, --shots, --seed, --setting, --targets."""
    return prepare(args.dataset, args.root, shots=args.shots, seed=args.seed, setting=args.setting,
                   targets=args.targets, download=args.download, val=args.val)


def check_images(items, cache_dir=None):
    """Open the header of every image once and report every file that is missing, not an image, or too large to
    decode (PIL's decompression-bomb limit) in one InputError, before anything is trained. A list that passed is
    remembered in cache_dir (keyed by every path, size and modification time), so a rerun pays nothing."""
    paths = sorted({it[0] for it in items})
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p) else (p, None, None) for p in paths]
    marker = Path(cache_dir or ".") / (hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32] + ".ok")
    if cache_dir and marker.exists():
        return
    bad = []
    for path in files.progress(paths, "checking images", disable=len(paths) < 2000):
        try:
            with Image.open(path) as image:  # reads the header; PIL refuses decompression bombs here
                image.size
        except FileNotFoundError:
            bad.append(f"{path} (missing)")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise InputError(f"{len(bad)} of the run's {len(paths)} images cannot be read:\n  {shown}\n"
                         f"replace or delete these files (and their entries in the split file), then run again")
    if cache_dir:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as e:  # a read-only dataset folder: the check simply runs again next time
            print(f"note: could not remember the image check in {marker.parent} ({e})")


# ---------------------------------------------------------------------------------------------------------------
# Transforms, loaders and training batches.

def transform(resolution, train, crop_scale=(0.08, 1.0), test_crop=1.0):
    """CLIP transforms (bicubic). train: RandomResizedCrop(crop_scale) + flip, or the test transform when crop_scale is
    None (no augmentation); test: shorter side to resolution / test_crop, then the center crop (FGVC: 256 -> 224)."""
    bicubic = T.InterpolationMode.BICUBIC
    if train and crop_scale is not None:
        ratio = (1.0, 1.0) if crop_scale == (1.0, 1.0) else (3 / 4, 4 / 3)  # (1, 1): the whole image, resized
        steps = [T.RandomResizedCrop(resolution, scale=crop_scale, ratio=ratio, interpolation=bicubic),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(resolution / test_crop), interpolation=bicubic), T.CenterCrop(resolution)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


class ImageList(torch.utils.data.Dataset):
    """(image tensor, label) of a list of Items. With a seed, image i's random transform draws from seed and i alone,
    so the training images are the same whatever the number of loader workers (a worker's own RNG stream would
    make them depend on --workers, hence on the machine's core count)."""

    def __init__(self, items, transform, seed=None):
        self.items, self.transform, self.seed = items, transform, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, _ = self.items[i]
        try:
            image = to_rgb(Image.open(path))
        except FileNotFoundError:
            raise InputError(f"image {path} is missing; check the dataset folder against its split file") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"image {path} cannot be decoded ({e}); re-download or delete it from the split") from e
        if self.seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + i) % 2**63)  # the CPU RNG the transforms use
            return self.transform(image), label


def to_rgb(image):
    """8-bit RGB. 16- and 32-bit integer greyscale (16-bit PNGs) is scaled to 8 bits: PIL's convert("RGB") would clip
    every value above 255 to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        scaled = (np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)  # 65535 -> 255
        image = Image.fromarray(scaled)
    return image.convert("RGB")


def workers(num_workers=None):
    """Data-loading processes: --workers, or min(4, cores)."""
    return min(4, os.cpu_count() or 1) if num_workers is None else num_workers


def loader(items, transform, batch_size, train, num_workers=None, seed=None, batch_sampler=None):
    """DataLoader of (images, labels). seed: the shuffle order and each image's random transform (see ImageList);
    set it anew each epoch through loader.generator and loader.dataset.seed. Training never drops its only batch: a
    batch size larger than the few-shot set still trains (Dassl's drop_last once silently skipped EuroSAT 1-shot)."""
    dataset = ImageList(items, transform, seed)
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers(num_workers))
    g = torch.Generator().manual_seed(seed or 0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train,
                                       drop_last=train and len(items) > batch_size, generator=g if train else None,
                                       num_workers=workers(num_workers), persistent_workers=False)
