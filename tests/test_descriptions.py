"""SemPT's shipped description files: one per benchmark dataset (and the world), each covering exactly its dataset's
class list, with sentences that tell classes apart and fit CLIP's context; and sempt.py running on every benchmark
dataset, the four ImageNet variants and every cross-dataset target, out of the box.

The class lists are CoOp's (tests/coop_classnames.json, a copy of ../shared/reference/coop_classnames.json, checked
against it where it is present). The runs use trees of tiny images at the paths of CoOp's real split files where
../shared/reference has them (the other datasets in their published layouts with CoOp's class names), and a tiny
random CLIP. Run: python -m pytest tests/test_descriptions.py
"""
import collections
import json
from pathlib import Path

import pytest

import clip
import data
import sempt
import world
from conftest import write_images

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
COOP = json.loads((Path(__file__).parent / "coop_classnames.json").read_text())["classnames"]
BENCHMARK = list(COOP)  # CoOp's 11 datasets
CLASSES = COOP | {"world": world.CLASSNAMES}
normal = lambda c: data.classname(c).strip().lower()  # noqa: E731  the rule sempt.load_descriptions reads keys by


def test_the_class_lists_are_coops():
    path = SHARED / "coop_classnames.json"
    if not path.exists():
        pytest.skip(f"{path} is not here (it is beside the project in CI)")
    assert json.loads(path.read_text())["classnames"] == COOP


@pytest.mark.parametrize("dataset", sorted(CLASSES))
def test_a_shipped_file_covers_its_class_list_and_tells_the_classes_apart(dataset):
    path = sempt.default_descriptions(dataset)
    raw = json.loads(path.read_text())
    assert raw["dataset"] == dataset and raw["prompt_version"] == "v1" and raw["llm"]
    attributes = raw["attributes"]
    assert len(attributes) == len(set(attributes)) >= 3
    assert {normal(c) for c in raw["descriptions"]} == {normal(c) for c in CLASSES[dataset]}  # exactly its classes
    bodies, sentences = collections.defaultdict(set), []
    for c, entry in raw["descriptions"].items():
        assert list(entry) == attributes, c
        for a in attributes:
            assert entry[a] and all(isinstance(s, str) and s.strip() for s in entry[a]), (c, a)
            for s in entry[a]:
                sentences.append(s)
                body = s[len(c):] if s.lower().startswith(c.lower()) else s  # the sentence without its class name
                bodies[body.strip(" ,").lower()].add(c)
    assert len(sentences) == len(set(sentences)), "a sentence is duplicated"
    # The world's attributes are its rendering rules, shared on purpose (a colour by 4 classes, size by all 32).
    few = len(CLASSES["world"]) if dataset == "world" else 3
    pasted = {b: sorted(cs) for b, cs in bodies.items() if len(cs) > few}
    assert not pasted, f"sentences pasted across classes: {list(pasted.items())[:3]}"
    for s in sentences:  # sempt.py encodes each sentence as it is (no template around it): it must fit 77 tokens
        clip.tokenize(s)  # raises for a longer one
    names, table = sempt.load_descriptions(path, CLASSES[dataset])  # and sempt.py reads it
    assert names == attributes and len(table) == len({*CLASSES[dataset]})


def test_every_dataset_and_target_finds_its_own_file():
    """The 11 datasets, the ImageNet variants (ImageNet's file: their classes are ImageNet's) and every
    cross-dataset target."""
    for name in BENCHMARK + data.IMAGENET_VARIANTS + data.CROSS_TARGETS + ["world"]:
        assert sempt.default_descriptions(name).exists(), name
    for variant in data.IMAGENET_VARIANTS:
        assert sempt.default_descriptions(variant).name == "imagenet.json"


# ---------------------------------------------------------------------------------------------------------------
# sempt.py on every benchmark, on trees of tiny images.

def coop_tree(root, name, classnames):
    """<root>/<dir>/ in CoOp's layout: its split file (one train and one test image per class: CoOp's own entries
    where its real split file is in ../shared/reference, else paths made up in the same form) and the images."""
    layout = data.DATASETS[name]
    base = root / layout["dir"]
    real = SHARED / "coop_splits" / layout["split"]
    split = {"train": [], "val": [], "test": []}
    if real.exists():
        whole = json.loads(real.read_text())
        for part in ("train", "test"):
            first = {}
            for p, y, c in whole[part]:
                first.setdefault(y, [p, y, c])
            split[part] = [first[y] for y in sorted(first)]
    else:
        for part in ("train", "test"):
            split[part] = [[f"{c}/{part}_{y}.jpg", y, c] for y, c in enumerate(classnames)]
    write_images([base / layout["images"] / p for part in ("train", "test") for p, _, _ in split[part]], size=12)
    (base / layout["split"]).write_text(json.dumps(split))


def imagenet_trees(root, classnames):
    """ImageNet (classnames.txt, images/train and images/val by WordNet id) and its four variants' layouts."""
    wnids = [f"n{i:08d}" for i in range(len(classnames))]
    listing = "".join(f"{w} {c}\n" for w, c in zip(wnids, classnames))
    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text(listing)
    write_images([base / "images" / s / w / "0.jpg" for s in ("train", "val") for w in wnids], size=12)
    for name, folders in [("imagenetv2", [str(i) for i in range(1000)]), ("imagenet_sketch", wnids),
                          ("imagenet_a", wnids[::5]), ("imagenet_r", wnids[1::5])]:  # A and R: 200 of the classes
        layout = data.DATASETS[name]
        (root / layout["dir"]).mkdir(parents=True)
        (root / layout["dir"] / "classnames.txt").write_text(listing)
        write_images([root / layout["dir"] / layout["images"] / f / "0.jpg" for f in folders], size=12)


def aircraft_tree(root, classnames):
    base = root / "fgvc_aircraft"
    base.mkdir(parents=True)
    (base / "variants.txt").write_text("".join(f"{c}\n" for c in classnames))
    for s in ("train", "val", "test"):
        lines = [(f"{s}{y:05d}", c) for y, c in enumerate(classnames)] if s != "val" else []
        (base / f"images_variant_{s}.txt").write_text("".join(f"{i} {c}\n" for i, c in lines))
        write_images([base / "images" / f"{i}.jpg" for i, _ in lines], size=12)


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    for name in BENCHMARK:
        if name == "imagenet":
            imagenet_trees(root, COOP[name])
        elif name == "fgvc_aircraft":
            aircraft_tree(root, COOP[name])
        else:
            coop_tree(root, name, COOP[name])
    return root


def sempt_run(tiny, root, out, *argv):
    return sempt.main(["--root", str(root), "--backbone", str(tiny / "clip.pt"), "--shots", "1", "--epochs", "1",
                       "--batch-size", "32", "--device", "cpu", "--workers", "0", "--out", str(out), *argv])


def test_sempt_runs_on_every_benchmark_dataset(tiny, benchmark_root, tmp_path):
    for name in BENCHMARK:
        r = sempt_run(tiny, benchmark_root, tmp_path / name, "--dataset", name)
        assert r["base_head"] == "label" and r["new_head"] == "attribute", name
        assert len(r["base_classnames"]) + len(r["new_classnames"]) == len(COOP[name]), name


def test_sempt_cross_dataset_reads_each_targets_own_file(tiny, benchmark_root, tmp_path, capsys):
    """ImageNet -> the 10 other datasets and the 4 variants: each target is scored with its own descriptions."""
    r = sempt_run(tiny, benchmark_root, tmp_path / "cross", "--setting", "crossdataset")
    assert set(r["targets"]) == set(data.CROSS_TARGETS)
    out = capsys.readouterr().out
    for name in BENCHMARK:
        assert f"descriptions/{name}.json" in out, name
