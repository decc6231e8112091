"""data.py and eval.py: readers in CoOp's layouts, the few-shot base-to-new protocol, eval math, feature store.

Run: python -m pytest tests/test_protocol.py
"""
import gzip
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import files
import experiment

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "coop_splits"

# Published sizes (CoOp's DATASETS.md): train / val / test and classes.
PUBLISHED = {
    "split_zhou_Caltech101.json": (4128, 1649, 2465, 100),
    "split_zhou_OxfordPets.json": (2944, 736, 3669, 37),
    "split_zhou_StanfordCars.json": (6509, 1635, 8041, 196),
    "split_zhou_OxfordFlowers.json": (4093, 1633, 2463, 102),
    "split_zhou_DescribableTextures.json": (2820, 1128, 1692, 47),
    "split_zhou_EuroSAT.json": (13500, 5400, 8100, 10),
    "split_zhou_UCF101.json": (7639, 1898, 3783, 101),
}
# Published base/new class counts of the base-to-new protocol (CoCoOp: first ceil(n/2) labels), by total class count.
BASE_NEW = {1000: (500, 500), 100: (50, 50), 37: (19, 18), 196: (98, 98), 102: (51, 51), 101: (51, 50),
            397: (199, 198), 47: (24, 23), 10: (5, 5)}


def write_images(paths, size=12):
    rng = np.random.default_rng(0)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)


@pytest.mark.skipif(not SPLITS.exists(), reason="shared/reference/coop_splits is not beside the repo")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_split_files_match_published_sizes(name):
    splits = data._read_split_file(SPLITS / name, Path("img"))
    sizes = tuple(len(splits[s]) for s in ("train", "val", "test"))
    n_classes = len(data._classnames(splits["train"]))
    assert sizes + (n_classes,) == PUBLISHED[name]
    assert all(" " in c or "_" not in c for _, _, c in splits["train"])  # underscores become spaces


@pytest.mark.parametrize("n", sorted(BASE_NEW))
def test_base_new_sizes_and_relabelling(n):
    items = [(f"{y}_{i}.jpg", y, f"class {y:04d}") for y in range(n) for i in range(2)]
    base, base_names = data.split_base_new(items, "base")
    new, new_names = data.split_base_new(items, "new")
    assert (len(base_names), len(new_names)) == BASE_NEW[n]
    assert sorted({y for _, y, _ in new}) == list(range(len(new_names)))  # relabelled 0..k-1
    assert new_names[0] == f"class {BASE_NEW[n][0]:04d}"  # new starts right after the base half, in sorted order
    assert base_names == [f"class {y:04d}" for y in range(BASE_NEW[n][0])]


def test_fewshot_k_per_class_deterministic_and_seeded():
    items = [(f"{y}_{i}.jpg", y, str(y)) for y in range(5) for i in range(30)]
    a, b, c = data.fewshot(items, 16, seed=1), data.fewshot(items, 16, seed=1), data.fewshot(items, 16, seed=2)
    assert a == b and a != c
    assert all(sum(1 for _, y, _ in a if y == k) == 16 for k in range(5))
    with pytest.raises(ValueError, match="fewer than --shots"):
        data.fewshot(items, 31, seed=1)


FEWSHOT = SPLITS.parent / "coop_fewshot" / "oxford_flowers.json"


@pytest.mark.skipif(not FEWSHOT.exists(), reason="shared/reference/coop_fewshot is not beside the repo")
def test_fewshot_picks_are_coops_published_picks():
    """CoOp's published OxfordFlowers picks (Dassl's generate_fewshot_dataset on split_zhou_OxfordFlowers.json,
    whose train list is not in label order): the same images in the same order, for 1, 4 and 16 shots, seeds 1-3."""
    published = json.loads(FEWSHOT.read_text())
    train = data._read_split_file(SPLITS / published["split_file"], Path("jpg"))["train"]
    assert [y for _, y, _ in train] != sorted(y for _, y, _ in train)  # the case where sorted labels differ
    for key, picks in published["picks"].items():
        shots, seed = (int(n) for n in key.removeprefix("shot").split("_seed"))
        ours = [it.path for it in data.fewshot(train, shots, seed)]
        assert ours == [str(Path("jpg") / Path(p).name) for p in picks], key


def test_eurosat_layout_and_prepare(tmp_path):
    """CoOp's EuroSAT layout: eurosat/2750/<Class>/x.jpg + split_zhou_EuroSAT.json with CoOp's class names."""
    base = tmp_path / "eurosat"
    names = [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"), ("HerbaceousVegetation", "Herbaceous Vegetation Land"),
             ("Highway", "Highway or Road"), ("Industrial", "Industrial Buildings"), ("Pasture", "Pasture Land"),
             ("PermanentCrop", "Permanent Crop Land"), ("Residential", "Residential Buildings"), ("River", "River"),
             ("SeaLake", "Sea or Lake")]  # CoOp's EuroSAT folders and class names
    split = {s: [] for s in ("train", "val", "test")}
    for label, (folder, name) in enumerate(names):
        for i in range(4):
            rel = f"{folder}/{folder}_{i}.jpg"
            split["train" if i < 3 else "test"].append([rel, label, name])
            write_images([base / "2750" / rel])
    (base / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    s = data.prepare("eurosat", tmp_path, shots=2, seed=1)
    assert len(s.train) == 5 * 2 and s.classnames == [n for _, n in names[:5]]
    assert s.tests["new"].classnames == [n for _, n in names[5:]] and len(s.tests["new"].items) == 5
    assert s.template == "a centered satellite photo of {}."


def test_fgvc_aircraft_and_imagenet_layouts(tmp_path):
    air = tmp_path / "fgvc_aircraft"
    (air / "variants.txt").parent.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for s, ids in [("train", ["1", "2"]), ("val", ["3"]), ("test", ["4", "5"])]:
        (air / f"images_variant_{s}.txt").write_text("".join(f"{i} {'707-320' if int(i) % 2 else 'A300B4'}\n" for i in ids))
        write_images([air / "images" / f"{i}.jpg" for i in ids])
    ds = data.load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4"] and len(ds.test) == 2 and ds.train[0][1] == 0

    inet = tmp_path / "imagenet"
    (inet).mkdir()
    (inet / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    write_images([inet / "images" / s / w / f"{i}.JPEG" for s in ("train", "val") for w in ("n01", "n02") for i in range(2)])
    ds = data.load_dataset("imagenet", tmp_path)
    assert ds.classnames == ["tench", "goldfish"] and len(ds.train) == 4 and len(ds.test) == 4


def test_class_names_from_text_files_are_stripped_and_spaced_as_coops_readers_do(tmp_path):
    """FGVC's lists with trailing blanks and Windows line ends; an ImageNet classnames.txt with an underscore."""
    air = tmp_path / "fgvc_aircraft"
    air.mkdir()
    (air / "variants.txt").write_text("707-320 \r\nA300B4\r\n\r\n")
    for s, ids in [("train", ["1", "2"]), ("val", []), ("test", ["3"])]:
        (air / f"images_variant_{s}.txt").write_text("".join(f"{i} {'A300B4' if i == '2' else '707-320'} \r\n" for i in ids))
        write_images([air / "images" / f"{i}.jpg" for i in ids])
    ds = data.load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4"] and [it.label for it in ds.train] == [0, 1]

    inet = tmp_path / "imagenet"
    inet.mkdir()
    (inet / "classnames.txt").write_text("n01 great_white_shark \nn02 goldfish\n")
    write_images([inet / "images" / s / w / "0.JPEG" for s in ("train", "val") for w in ("n01", "n02")])
    assert data.load_dataset("imagenet", tmp_path).classnames == ["great white shark", "goldfish"]


def test_folder_dataset_and_bad_inputs(tmp_path):
    write_images([tmp_path / "mine" / c / f"{i}.png" for c in ("cat", "dog") for i in range(10)])
    ds = data.load_dataset("folder", tmp_path / "mine")
    assert ds.classnames == ["cat", "dog"] and len(ds.train) + len(ds.test) == 20 and ds.test
    with pytest.raises(data.InputError, match="--download"):
        data.load_dataset("dtd", tmp_path / "nowhere")
    with pytest.raises(data.InputError, match="unknown dataset"):
        data.load_dataset("mnistt", tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(data.InputError, match="broken.jpg"):
        data.ImageList([(str(bad), 0, "x")], data.transform(16, train=False))[0]
    with pytest.raises(data.InputError, match="gone.jpg"):
        data.ImageList([(str(tmp_path / "gone.jpg"), 0, "x")], data.transform(16, train=False))[0]


def test_loader_trains_when_batch_exceeds_the_fewshot_set(tmp_path):
    """The drop_last trap: 1 shot x 3 classes with batch 32 must still give one batch, not zero."""
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    write_images(paths, size=40)
    items = [(str(p), i, str(i)) for i, p in enumerate(paths)]
    batches = list(data.loader(items, data.transform(32, train=True), batch_size=32, train=True, num_workers=0))
    assert len(batches) == 1 and batches[0][0].shape == (3, 3, 32, 32)


def test_harmonic_mean_and_average_by_hand():
    assert evaluation.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    rows = [{"base_acc": 90.0, "new_acc": 50.0}, {"base_acc": 70.0, "new_acc": 70.0}]
    b, n, h = evaluation.average(rows)
    assert (b, n) == (80.0, 60.0) and h == pytest.approx(68.5714, abs=1e-4)  # H of the means
    assert h != pytest.approx((evaluation.harmonic_mean(90, 50) + 70) / 2)  # not the mean of the H's (66.07)


def test_table_aggregates_seeds_and_datasets(tmp_path):
    for d, seed, b, n in [("dtd", 1, 80, 40), ("dtd", 2, 70, 50), ("eurosat", 1, 90, 60)]:
        files.save_json(tmp_path / d / str(seed) / "results.json", {"method": "coop", "dataset": d, "seed": seed,
                                                                         "shots": 16, "base_acc": b, "new_acc": n})
    table = evaluation.base2new_table(evaluation.read_results(tmp_path))
    assert "| coop | dtd | 75.00 ± 7.07 | 45.00 ± 7.07 | 56.25 ± 3.54 | 2 seeds |" in table  # H of the means ± the seeds' H (53.33, 58.33)
    assert "| coop | **Average** | 82.50 | 52.50 | 64.17 | 2 datasets |" in table


def test_feature_store_keys_invalidation_and_corruption(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(3, 4), torch.arange(3)

    key = evaluation.store_key("abc", "dtd", "test", "T", ["a.jpg", "b.jpg"])
    f1, _ = evaluation.cached_image_features(tmp_path, key, compute)
    f2, _ = evaluation.cached_image_features(tmp_path, key, compute)
    assert torch.equal(f1, f2) and len(calls) == 1  # second read comes from disk
    for changed in [("abd", "dtd", "test", "T", ["a.jpg", "b.jpg"]), ("abc", "dtd", "val", "T", ["a.jpg", "b.jpg"]),
                    ("abc", "dtd", "test", "T2", ["a.jpg", "b.jpg"]), ("abc", "dtd", "test", "T", ["a.jpg"])]:
        assert evaluation.store_key(*changed) != key
    assert evaluation.store_key("abc", "dtd", "test", "T", ["a.jpg", "b.jpg"], precision="bfloat16") != key
    bf16 = experiment.device_and_autocast("cpu", "bf16")[1]
    assert evaluation.precision_of(bf16) == "bfloat16" and evaluation.precision_of(lambda: bf16().__class__(
        "cpu", enabled=False)) == "fp32"
    (tmp_path / f"{key}.pt").write_bytes(b"garbage")
    f3, _ = evaluation.cached_image_features(tmp_path, key, compute)
    assert len(calls) == 2 and not torch.equal(f1, f3)  # rebuilt
    assert list(tmp_path.glob("*.tmp")) == []


@pytest.mark.skipif(not SPLITS.exists(), reason="shared/reference/coop_splits is not beside the repo")
def test_the_shipped_split_files_are_coops_byte_for_byte():
    shipped = sorted(data.SPLITS.glob("split_zhou_*.json.gz"))
    assert len(shipped) == 7
    for f in shipped:
        assert gzip.decompress(f.read_bytes()) == (SPLITS / f.name.removesuffix(".gz")).read_bytes(), f.name


def small_split(names):
    """A split file in CoOp's format (class folders, CoOp's names, 2 train, 1 val, 1 test image per class)."""
    split = {s: [] for s in ("train", "val", "test")}
    for y, c in enumerate(names):
        for i, part in enumerate(["train", "train", "val", "test"]):
            split[part].append([f"{c}/{c}_{i:04d}.jpg", y, c])
    return split


def fake_torchvision(monkeypatch, cls, folder, split, leave_out=0):
    """torchvision's `cls` as --download uses it: download=True writes the images of `split` under root/folder."""
    import torchvision.datasets as tvd

    class Fake:
        def __init__(self, root, download, **options):
            assert download
            paths = [p for part in split.values() for p, _, _ in part]
            write_images([Path(root) / folder / p for p in paths[leave_out:]])
    monkeypatch.setattr(tvd, cls, Fake)


def test_download_places_coops_own_split_file_checked_against_the_images(tmp_path, monkeypatch):
    """--download dtd: torchvision's images linked where CoOp's layout has them and CoOp's split file (here a small
    one in its place) written beside them, unchanged; a download that lacks an image writes no split file."""
    split = small_split(["banded", "blotchy", "braided"])
    raw = json.dumps(split).encode()
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "split_zhou_DescribableTextures.json.gz").write_bytes(gzip.compress(raw))
    monkeypatch.setattr(data, "SPLITS", tmp_path / "splits")
    monkeypatch.setitem(data.COOP_SIZES, "dtd", (6, 3, 3))
    fake_torchvision(monkeypatch, "DTD", "dtd/dtd/images", split, leave_out=1)
    with pytest.raises(data.InputError, match="1 images of CoOp's dtd split are not under"):
        data.load_dataset("dtd", tmp_path / "a", download=True)
    assert not (tmp_path / "a/dtd/split_zhou_DescribableTextures.json").exists()
    fake_torchvision(monkeypatch, "DTD", "dtd/dtd/images", split)
    ds = data.load_dataset("dtd", tmp_path / "b", download=True)
    assert (tmp_path / "b/dtd/split_zhou_DescribableTextures.json").read_bytes() == raw  # CoOp's file, as it is
    assert ds.classnames == ["banded", "blotchy", "braided"] and (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
    assert Path(ds.test[0].path).resolve().is_relative_to((tmp_path / "b/dtd/torchvision").resolve())
    assert sorted(p.name for p in (tmp_path / "b/dtd").iterdir()) == ["images", "split_zhou_DescribableTextures.json",
                                                                      "torchvision"]
    monkeypatch.setitem(data.COOP_SIZES, "dtd", (4128, 1649, 2465))  # a file of other sizes is not CoOp's
    with pytest.raises(data.InputError, match="it is not CoOp's split"):
        data.load_dataset("dtd", tmp_path / "c", download=True)


def test_download_fetches_the_split_files_that_do_not_ship_from_coops_public_copy(tmp_path, monkeypatch):
    """Food101's split file comes from the public copy (a local server here, in Google Drive's place); an answer
    that is not the file (Drive's HTML page) is an error that says where to get it, and nothing is written."""
    split = small_split(["apple_pie", "baby_back_ribs"])
    answers = {"1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl": json.dumps(split).encode()}

    class Drive(BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers.get(self.path.rsplit("=", 1)[-1], b"<!DOCTYPE html><html>Google Drive</html>")
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Drive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(data, "DRIVE_URL", f"http://127.0.0.1:{server.server_port}/uc?id={{}}")
        monkeypatch.setitem(data.COOP_SIZES, "food101", (4, 2, 2))
        fake_torchvision(monkeypatch, "Food101", "food-101/images", split)
        ds = data.load_dataset("food101", tmp_path / "a", download=True)
        assert (tmp_path / "a/food-101/split_zhou_Food101.json").read_bytes() == answers["1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"]
        assert ds.classnames == ["apple pie", "baby back ribs"]
        answers.clear()
        with pytest.raises(data.InputError, match="did not answer with CoOp's split_zhou_Food101.json.*by hand"):
            data.load_dataset("food101", tmp_path / "b", download=True)
        assert not (tmp_path / "b/food-101/split_zhou_Food101.json").exists()
    finally:
        server.shutdown()


def test_a_run_records_its_split_files_sha256_and_other_split_files_are_other_runs(tiny, tmp_path, capsys):
    """results.json and args.json hold the split file's sha256 (what sha256sum prints); the same command on an
    edited split file is refused, not reused; the tables keep runs on different split files apart."""
    import coop
    argv = ["--root", str(tmp_path), "--backbone", str(tiny / "clip.pt"), "--epochs", "0", "--device", "cpu",
            "--workers", "0", "--out", str(tmp_path / "run")]
    r = coop.main(argv)
    split_file = tmp_path / "world" / "split_world.json"
    sha = hashlib.sha256(split_file.read_bytes()).hexdigest()
    assert r["split_sha256"] == sha and files.read_json(tmp_path / "run/args.json")["split_sha256"] == sha
    split_file.write_text(json.dumps(json.loads(split_file.read_text()), indent=1))  # the same split, another file
    with pytest.raises(SystemExit):
        coop.main(argv)
    assert "split_sha256" in capsys.readouterr().err
    runs = [dict(r, split_sha256=h, base_acc=b) for h, b in (("aaaaaaaa11", 60.0), ("bbbbbbbb22", 80.0))]
    table = evaluation.base2new_table(runs)
    assert "| world [split aaaaaaaa] | 60.00 |" in table and "| world [split bbbbbbbb] | 80.00 |" in table


@pytest.mark.parametrize("name", [n for n, d in data.DATASETS.items() if d["split"] and n != "world"])
def test_every_split_file_dataset_reads_its_exact_layout(tmp_path, name):
    """<root>/<dir>/<images>/... + <root>/<dir>/split_zhou_*.json, exactly CoOp's folder and file names."""
    layout = data.DATASETS[name]
    base = tmp_path / layout["dir"]
    split = {"train": [[f"a/{i}.jpg", i % 2, f"class_{i % 2}"] for i in range(4)], "val": [],
             "test": [[f"b/{i}.jpg", i % 2, f"class_{i % 2}"] for i in range(2)]}
    write_images([base / layout["images"] / p for s in split.values() for p, _, _ in s])
    (base / layout["split"]).write_text(json.dumps(split))
    ds = data.load_dataset(name, tmp_path)
    assert ds.classnames == ["class 0", "class 1"] and len(ds.train) == 4 and len(ds.test) == 2
    assert all(Path(p).exists() for p, _, _ in ds.train + ds.test)


@pytest.mark.parametrize("name", ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"])
def test_imagenet_variants_are_test_sets(tmp_path, name):
    layout = data.DATASETS[name]
    base = tmp_path / layout["dir"]
    base.mkdir()
    (base / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    folders = ["0", "1"] if name == "imagenetv2" else ["n01", "n02"]
    write_images([base / layout["images"] / f / f"{i}.jpg" for f in folders for i in range(2)])
    ds = data.load_dataset(name, tmp_path)
    assert ds.train == [] and ds.classnames == ["tench", "goldfish"] and len(ds.test) == 4


def test_folder_reader_skips_hidden_folders_and_files(tiny, tmp_path):
    import shutil
    shutil.copytree(tiny / "ds" / "train", tmp_path / "ds")
    (tmp_path / "ds" / ".cache" / "features").mkdir(parents=True)  # the default feature store lives here
    (tmp_path / "ds" / "red circle" / ".DS_Store").write_bytes(b"\0")
    ds = data.load_dataset("folder", tmp_path / "ds")
    assert len(ds.classnames) == 5 and not any(Path(p).name.startswith(".") for p, _, _ in ds.train + ds.test)


def test_scripts_read_test_features_from_the_store_the_second_time(tiny, tmp_path, monkeypatch):
    import coop
    argv = ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "1", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"),
            "--store", str(tmp_path / "store")]
    first = coop.main(argv)
    assert len(list((tmp_path / "store").glob("*.pt"))) == 2  # base and new test sets

    def fail(*a, **k):
        raise AssertionError("the image encoder ran although the store holds these features")
    monkeypatch.setattr(evaluation, "image_features", fail)
    again = coop.main(argv + ["--eval-only"])
    assert (again["base_acc"], again["new_acc"]) == (first["base_acc"], first["new_acc"])


def test_cached_views_visit_every_image_once_per_epoch_through_a_stored_view(tiny, tmp_path):
    import clip
    model, _ = clip.load(str(tiny / "clip.pt"))
    items = data.load_dataset("folder", tiny / "ds").train  # 15 images
    tf = data.transform(32, train=True)
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    batches = experiment.training_batches(model, items, tf, 4, seed=1, device="cpu", autocast=off, views=3, store=tmp_path,
                                    dataset="t")
    assert len(list(tmp_path.glob("*.pt"))) == 3  # one stored file per view
    views = torch.stack([evaluation.cached_image_features(tmp_path, k, None)[0] for k in sorted(
        p.stem for p in tmp_path.glob("*.pt"))])  # (3, 15, E)
    assert not torch.allclose(views[0], views[1])  # the views are different augmentations
    for epoch in range(2):
        seen = []
        for f, y in batches(epoch):
            for row, label in zip(f, y):
                i = [j for j in range(len(items)) if any(torch.equal(row, views[v, j]) for v in range(3))]
                assert len(i) == 1 and items[i[0]][1] == label  # a stored view of one image, with its label
                seen.append(i[0])
        assert len(seen) == len(set(seen)) == 12  # each image at most once; 15 images -> 3 full batches of 4
