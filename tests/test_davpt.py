"""Tests for davpt.py (DA-VPT on CLIP's ViT). Run: python -m pytest -q tests/test_davpt.py"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from PIL import Image

import data
import davpt
import eval as evaluation
from clip.model import set_sdpa
from conftest import make_clip, write_images
import files
from harness import runs


def tiny_clip(seed=0):
    """Three vision blocks of 8x8 patches (16 patches), plain-math attention."""
    return set_sdpa(make_clip(seed, vision_layers=3, vision_patch_size=8), False)


def model_for(clip_model, num_classes=6, **kw):
    cfg = davpt.DAVPTConfig(**(dict(guided_layers="-1", num_guided=4, num_other=3) | kw))
    return davpt.DAVPT(clip_model, num_classes, cfg)


def test_no_prompts_equals_encode_image():
    m = model_for(tiny_clip(), num_guided=0, num_other=0)
    images = torch.randn(2, 3, 32, 32)
    feats, _ = m(images)
    assert torch.equal(feats, m.clip.encode_image(images))


def test_prompt_shapes_and_replacement():
    clip_model = tiny_clip()
    m = model_for(clip_model, guided_layers="1,2")
    assert m.proxy_prompts.shape == (2, 4, 64) and m.other_prompts.shape == (1, 3, 64)
    assert [m.prompts(l).shape[0] for l in range(3)] == [3, 4, 4]
    seen = []
    for blk in clip_model.visual.transformer.resblocks:
        blk.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].shape[1]))
    hooks = []
    for l, blk in enumerate(clip_model.visual.transformer.resblocks):
        blk.attn.register_forward_pre_hook(lambda mod, inp, l=l: hooks.append((l, inp[0].clone())))
    m(torch.randn(2, 3, 32, 32))
    P = 16
    assert [x.shape[1] for _, x in hooks] == [1 + 3 + P, 1 + 4 + P, 1 + 4 + P]  # old prompts dropped each block
    # the prompt slots hold exactly this layer's prompts (after ln_1 of the block)
    for l, x in hooks:
        M = m.prompts(l).shape[0]
        ln = clip_model.visual.transformer.resblocks[l].ln_1
        assert torch.allclose(x[0, 1:1 + M], ln(m.prompts(l)), atol=1e-6)


def test_mask_blocks_prompt_to_cls_and_prompts():
    m = model_for(tiny_clip(), mask=True)
    mask = m.mask(3, 1 + 3 + 16, "cpu")
    assert torch.isinf(mask[1:4, :4]).all() and (mask[1:4, 4:] == 0).all()
    assert (mask[0] == 0).all() and (mask[4:] == 0).all()
    # behaviour: with the mask, changing the [CLS] embedding does not change what the prompts attend to in block 0
    blk = m.clip.visual.transformer.resblocks[0]
    x = torch.randn(1, 20, 64)
    x2 = x.clone()
    x2[:, 0] += 3 * torch.randn(64)
    x2[:, 2] += 3 * torch.randn(64)  # another prompt
    a1 = blk.attn(blk.ln_1(x), mask)
    a2 = blk.attn(blk.ln_1(x2), mask)
    assert torch.allclose(a1[:, 1], a2[:, 1], atol=1e-5)
    assert not torch.allclose(a1[:, 4:], a2[:, 4:], atol=1e-3)  # patches still see [CLS]


def test_kmeans_deterministic_per_seed():
    feats = torch.randn(30, 16)
    a1, _ = davpt.initial_mapping(feats, 5, seed=3, one_to_one=False)
    a2, _ = davpt.initial_mapping(feats, 5, seed=3, one_to_one=False)
    assert torch.equal(a1, a2) and a1.max() < 5
    # well-separated clusters are recovered
    centers = torch.randn(3, 16) * 10
    x = centers.repeat_interleave(4, 0) + 0.01 * torch.randn(12, 16)
    a, _ = davpt.initial_mapping(x, 3, seed=0, one_to_one=False)
    assert all(len(set(a[i * 4:(i + 1) * 4].tolist())) == 1 for i in range(3)) and len(set(a.tolist())) == 3
    assert torch.equal(davpt.initial_mapping(torch.randn(3, 4), 5, 0, one_to_one=True)[0], torch.arange(3))


def test_released_mapping_rules_random_images_and_clustering_at_as_many_classes_as_prompts(tmp_path, monkeypatch):
    """The released code: the initial class means from n random images per class (MappingSampler), a fixed
    one-to-one mapping only for fewer classes than guided prompts; with as many (VTAB-EuroSAT: 10 and 10) it clusters."""
    labels = [c for c in range(3) for _ in range(20)] + [3, 3, 3]  # class 3: 3 images for n = 7
    picks = davpt.mapping_images(labels, 7, torch.Generator().manual_seed(1))
    by_class = [[i for i in picks if labels[i] == c] for c in range(4)]
    assert all(len(p) == 7 for p in by_class) and all(len(set(p)) == 7 for p in by_class[:3])
    assert by_class[0] != list(range(7))  # random, not the first 7
    assert sorted(by_class[3]) == sorted([60, 61, 62] * 2 + [by_class[3][-1]])  # all twice + 1 random (7 = 2*3 + 1)
    assert picks == davpt.mapping_images(labels, 7, torch.Generator().manual_seed(1))  # seeded
    assert picks != davpt.mapping_images(labels, 7, torch.Generator().manual_seed(2))
    # A run with as many classes as guided prompts maps by k-means (clusters may share a prompt), the released way.
    calls, real = [], davpt.initial_mapping
    monkeypatch.setattr(davpt, "initial_mapping", lambda means, k, seed, one_to_one:
                        calls.append((k, one_to_one)) or real(means, k, seed, one_to_one))
    torch.save(tiny_clip().state_dict(), tmp_path / "tiny.pt")
    root = write_fixture(tmp_path)  # 4 classes
    for n in (4, 5):
        davpt.main(["--dataset", "folder", "--root", str(root), "--setting", "fewshot", "--backbone",
                    str(tmp_path / "tiny.pt"), "--epochs", "1", "--num-guided", str(n), "--batch-size", "4",
                    "--device", "cpu", "--workers", "0", "--out", str(tmp_path / f"run{n}")])
    assert calls == [(4, False), (4, True)]


def test_proxy_anchor_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    a, d, s = 2.0, 0.1, 1.5
    c = 1 / math.sqrt(2)
    cos = [[1, 0, -1], [0, 1, 0], [c, c, -c]]  # cos[i][k]
    S = [[s * v for v in row] for row in cos]
    pos0 = math.log(1 + math.exp(-a * (S[0][0] - d)) + math.exp(-a * (S[1][0] - d)))
    pos1 = math.log(1 + math.exp(-a * (S[2][1] - d)))
    pos2 = 0.0  # prompt 2 has no positives
    neg0 = math.log(1 + math.exp(a * (S[2][0] + d)))
    neg1 = math.log(1 + math.exp(a * (S[0][1] + d)) + math.exp(a * (S[1][1] + d)))
    neg2 = math.log(1 + sum(math.exp(a * (S[i][2] + d)) for i in range(3)))
    expected = (pos0 + pos1 + pos2) / 3 + (neg0 + neg1 + neg2) / 3
    got = davpt.proxy_anchor(x, p, y, alpha=a, delta=d, sigma=s)
    assert abs(got.item() - expected) < 1e-5


@pytest.mark.parametrize("tune_bias", ["none", "kv", "all"])
@pytest.mark.parametrize("token_feature", ["attn-out", "mean-patch"])
def test_only_prompts_head_and_biases_get_gradients(tune_bias, token_feature):
    clip_model = tiny_clip()
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    m = model_for(clip_model, tune_bias=tune_bias, mask=True, token_feature=token_feature)
    y = torch.tensor([0, 1, 2, 3])
    feats, ml = m(torch.randn(4, 3, 32, 32), y % m.M_g)
    loss = F.cross_entropy(m.logits(feats), y) + sum(t + c for t, c in ml)
    loss.backward()
    with_grad = {k for k, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    allowed = {"proxy_prompts", "other_prompts", "head.weight", "head.bias"}
    if tune_bias != "none":
        allowed.add("dv")
    if tune_bias == "all":
        allowed |= {k for k, p in m.named_parameters() if k.startswith("clip.") and p.requires_grad}
        assert "clip.visual.class_embedding" in with_grad
    assert {"proxy_prompts", "other_prompts", "head.weight"} <= with_grad and with_grad <= allowed
    assert ("dv" in with_grad) == (tune_bias != "none")
    assert not any(p.requires_grad for p in m.clip.transformer.parameters())  # the text tower stays frozen
    for k, v in clip_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_value_bias_delta_is_exact():
    """dv equals adding the delta to the v-slice of in_proj_bias (an independent reference)."""
    clip_model = tiny_clip()
    m = model_for(clip_model, tune_bias="kv")
    with torch.no_grad():
        m.dv.normal_()
    images = torch.randn(2, 3, 32, 32)
    got, _ = m(images)
    D = 64
    with torch.no_grad():
        for l, blk in enumerate(clip_model.visual.transformer.resblocks):
            blk.attn.in_proj_bias[2 * D:] += m.dv[l]
        m.dv.zero_()
    ref, _ = m(images)
    assert torch.allclose(got, ref, atol=1e-5)


def write_fixture(tmp_path):
    """A tiny image-folder dataset for data.py's generic folder reader."""
    from PIL import Image
    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(32, 32, 3, generator=g) * 60 + c * 60).clamp(0, 255).byte().numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("head", ["linear", "text"])
def test_main_end_to_end(tmp_path, head):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_clip().state_dict(), ckpt)
    root = write_fixture(tmp_path)
    out = tmp_path / f"out_{head}"
    argv = ["--dataset", "folder", "--root", str(root), "--shots", "2", "--backbone", str(ckpt), "--epochs", "2",
            "--batch-size", "4", "--warmup-epochs", "1", "--device", "cpu", "--out", str(out), "--head", head,
            "--setting", "fewshot" if head == "linear" else "base2new", "--num-guided", "2", "--eval-after", "0"]
    res = davpt.main(argv)
    saved = json.loads((out / "results.json").read_text())
    acc = "base_acc" if head == "text" else "acc"  # base-to-new with the text head; the closed set with the linear one
    assert saved["method"] == {"linear": "davpt", "text": "davpt-texthead"}[head] and 0 <= saved[acc] <= 100
    # the last epoch's accuracy (honest) and the best epoch's on the test set (the released code's selection)
    assert saved[acc] <= saved[f"{acc}_best_epoch"] <= 100
    if head == "text":
        assert saved["new_acc"] is not None and saved["new_acc"] <= saved["new_acc_best_epoch"]
    again = davpt.main(argv + ["--eval-only"])
    assert again[acc] == res[acc]


def test_evaluating_during_training_leaves_training_unchanged(tmp_path):
    """Scoring the new classes after an epoch must put the training classes' text head back before training goes on:
    with evaluation after every epoch (--eval-after 0) or only at the end (--eval-after 3) the prompts are the same."""
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_clip().state_dict(), ckpt)
    root = write_fixture(tmp_path)
    trained = []
    for eval_after in ("0", "3"):
        out = tmp_path / f"out{eval_after}"
        davpt.main(["--dataset", "folder", "--root", str(root), "--shots", "2", "--backbone", str(ckpt), "--epochs", "3",
                    "--batch-size", "4", "--warmup-epochs", "1", "--device", "cpu", "--out", str(out), "--head", "text",
                    "--setting", "base2new", "--num-guided", "2", "--eval-after", eval_after])
        trained.append(torch.load(out / "checkpoint.pt", weights_only=True)["trainable"])
    assert trained[0].keys() == trained[1].keys()
    for name in trained[0]:
        torch.testing.assert_close(trained[0][name], trained[1][name], rtol=0, atol=0)


def test_kmeans_restart_from_centroids_and_balanced_batches():
    feats = torch.randn(20, 8)
    a, cent = davpt.cosine_kmeans(feats, 4, generator=torch.Generator().manual_seed(0))
    a2, cent2 = davpt.cosine_kmeans(feats, 4, init=cent)  # converged centroids are a fixed point
    assert torch.equal(a, a2) and torch.allclose(cent, cent2, atol=1e-6)
    labels = [c for c in range(8) for _ in range(3)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # the released sampler draws classes and images without replacement
        batches = davpt.balanced_batches(labels, 8, 2, g)
        assert len(batches) == 3
        for b in batches:  # 4 distinct classes x 2 distinct images
            cls = [labels[i] for i in b]
            assert len(b) == len(set(b)) == 8 and all(cls.count(c) == 2 for c in set(cls)) and len(set(cls)) == 4
    batch = davpt.balanced_batches(labels, 8, 4, g)[0]  # 4 per class from 3 images: all 3 once, one drawn again
    assert all(sorted(set(i for i in batch if labels[i] == c)) == [3 * c, 3 * c + 1, 3 * c + 2] for c in set(map(labels.__getitem__, batch)))


def vpt_json(folder, splits, files=()):
    """A dataset folder in VPT's JSON format: {split}.json = {relative image path: class id}, plus extra files."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, table in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(table))
    for name, text in files:
        (folder / name).write_text(text)


def test_fgvc_sets_read_vpt_json_splits_with_names_and_the_released_test_crop(tmp_path):
    cub = {"train": {"001.Black_footed_Albatross/a.jpg": 0, "005.Crested_Auklet/c.jpg": 4},
           "val": {"001.Black_footed_Albatross/v.jpg": 0}, "test": {"005.Crested_Auklet/b.jpg": 4}}
    vpt_json(tmp_path / "CUB_200_2011", cub)
    vpt_json(tmp_path / "nabirds", {s: {"0295/x.jpg": 295, "0313/y.jpg": 313} for s in ("train", "test")},
             [("classes.txt", "295 Red-tailed Hawk\n313 Barn Owl\n")])
    vpt_json(tmp_path / "OxfordFlower", {s: {"jpg/image_00001.jpg": 0, "jpg/image_00002.jpg": 1} for s in ("train", "test")},
             [("cat_to_name.json", json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid"}))])
    vpt_json(tmp_path / "Stanford-dogs", {s: {"n02085620-Chihuahua/a.jpg": 0, "n02085782-Japanese_spaniel/b.jpg": 1}
                                          for s in ("train", "test")})
    (tmp_path / "Stanford-dogs" / "Images").mkdir()
    vpt_json(tmp_path / "Stanford-cars", {s: {"cars_train/00001.jpg": 3, "cars_train/00002.jpg": 7} for s in ("train", "test")})
    (tmp_path / "CUB_200_2011" / "images").mkdir()
    (tmp_path / "nabirds" / "images").mkdir()
    ds = data.load_dataset("cub", tmp_path)
    assert ds.classnames == ["Black footed Albatross", "Crested Auklet"]  # class ids 0, 4 -> labels 0, 1
    assert ds.train == [(str(tmp_path / "CUB_200_2011/images/001.Black_footed_Albatross/a.jpg"), 0, "Black footed Albatross"),
                        (str(tmp_path / "CUB_200_2011/images/005.Crested_Auklet/c.jpg"), 1, "Crested Auklet")]
    assert [it.label for it in ds.test] == [1] and len(ds.val) == 1  # train.json holds no validation image
    assert data.load_dataset("nabirds", tmp_path).classnames == ["Red-tailed Hawk", "Barn Owl"]
    assert data.load_dataset("flowers", tmp_path).classnames == ["pink primrose", "hard-leaved pocket orchid"]
    assert data.load_dataset("dogs", tmp_path).classnames == ["Chihuahua", "Japanese spaniel"]
    assert data.load_dataset("cars", tmp_path).classnames == ["class 3", "class 7"]
    test_transform = repr(data.TestSet("all", "cub", "all", [], [], "", test_crop=data.DATASETS["cub"]["test_crop"])
                          .transform(224))
    assert "Resize(size=256" in test_transform and "CenterCrop(size=(224, 224))" in test_transform
    (tmp_path / "CUB_200_2011" / "train.json").unlink()
    with pytest.raises(data.InputError, match="train.json"):
        data.load_dataset("cub", tmp_path)


def test_vtab_1k_trains_on_all_1000_without_augmentation_and_val_tunes_on_800_200(tmp_path):
    """NOAH's layout: every list has its own copies of its images (images/<list>/...), so val200's images are not
    found in train800val200 by path; --val trains on train800.txt."""
    task = tmp_path / "vtab-1k" / "cifar"
    lists = {"train800": range(6), "val200": range(6, 8), "train800val200": range(8), "test": range(8, 12)}
    paths = {name: [f"images/{name}/{i}.png" for i in idx] for name, idx in lists.items()}
    for name, idx in lists.items():
        write_images([task / p for p in paths[name]], size=40)
        (task / f"{name}.txt").write_text("".join(f"{p} {i % 2}\n" for p, i in zip(paths[name], idx)))
    split = data.prepare("vtab-cifar100", tmp_path, shots="all", seed=1, setting="fewshot")
    assert len(split.train) == 8 and len(split.tests["all"].items) == 4
    tuned = data.prepare("vtab-cifar100", tmp_path, shots="all", seed=1, setting="fewshot", val=True)
    assert [it.path for it in tuned.train] == [str(task / p) for p in paths["train800"]]
    assert [it.path for it in tuned.tests["all"].items] == [str(task / p) for p in paths["val200"]]
    paths = paths["train800val200"]
    train_transform, image = split.train_transform(32), Image.open(task / paths[0]).convert("RGB")
    first, second = train_transform(image), train_transform(image)
    assert torch.equal(first, second) and torch.equal(first, split.tests["all"].transform(32)(image))  # no augmentation


def test_released_presets_reach_model_and_optimizer_and_flags_override_them():
    (cub,) = runs.plan(davpt.parser, davpt.configure, davpt.__file__, ["--dataset", "cub", "--root", "/nowhere"])[1]
    assert (cub.lr, cub.guided_layers, cub.num_guided, cub.num_other, cub.beta, cub.lam, cub.sigma) == \
        (5e-4, "10,11", 10, 10, 0.05, 0.05, 5)
    assert (cub.mask, cub.vpt_norm, cub.drop_path, cub.dynamic_kmeans, cub.wd_head, cub.eval_after) == (True, "l2", 0.1, 1, 5, 80)
    assert (cub.setting, cub.shots, cub.variant) == ("fewshot", "all", "")  # the paper's setting, nothing changed
    clip_model = make_clip(vision_layers=12, vision_patch_size=16)
    model = davpt.DAVPT(clip_model, 200, davpt.DAVPTConfig.from_args(cub))
    assert model.guided == [10, 11] and model.proxy_prompts.shape == (2, 10, 64) and model.other_prompts.shape == (10, 10, 64)
    groups = davpt.optimizer(model, cub).param_groups
    assert [g["lr"] for g in groups] == [5e-4] * 3 and [g["weight_decay"] for g in groups] == [0.05, 0.0, 5]
    (mine,) = runs.plan(davpt.parser, davpt.configure, davpt.__file__, ["--dataset", "cub", "--root", "/nowhere", "--lr", "0.01",
                                                               "--no-mask"])[1]
    assert (mine.lr, mine.mask, mine.num_other) == (0.01, False, 10) and mine.variant == "lr=0.01_mask=False"
    (dogs,) = runs.plan(davpt.parser, davpt.configure, davpt.__file__, ["--dataset", "dogs", "--root", "/nowhere"])[1]
    assert (dogs.beta, dogs.lam, dogs.batch_size, dogs.samples_per_class) == (0.01, 0.01, 64, 4)  # the config's intent
    (world,) = runs.plan(davpt.parser, davpt.configure, davpt.__file__, [])[1]
    assert (world.guided_layers, world.lr, world.mask) == ("-1", 1e-3, False)  # no config applies
    # The row for datasets without a config is not called params.py's defaults (those switch the losses off).
    assert "default" not in davpt.PRESETS and (world.beta, world.lam) == (0.01, 0.01)
    # smallnorb_ele's damaged file as the released parser reads it: cls_loss_weight 0.1 and eval_after 90 are set
    # before the damage, vpt_loss_weight is not (params.py's 0).
    (ele,) = runs.plan(davpt.parser, davpt.configure, davpt.__file__, ["--dataset", "vtab-smallnorb_ele", "--root", "/x"])[1]
    assert (ele.beta, ele.lam, ele.eval_after, ele.lr, ele.num_other, ele.dynamic_kmeans) == (0, 0.1, 90, 5e-5, 5, 10)


def test_l2_prompt_norm_and_drop_path():
    clip_model = tiny_clip()
    m = model_for(clip_model, vpt_norm="l2", drop_path=0.5)
    with torch.no_grad():
        m.other_prompts.mul_(7)
    assert torch.allclose(m.prompts(0).norm(dim=-1), torch.ones(3), atol=1e-5)  # unit-norm prompts enter the blocks
    branch = torch.randn(64, 5, 8)
    m.eval()
    assert torch.equal(m.drop_path(branch, 2), branch)  # no stochastic depth at test time
    m.train()
    assert torch.equal(m.drop_path(branch, 0), branch)  # the first block's rate is 0 (linear in depth)
    out = m.drop_path(branch, 2)  # the last block: rate 0.5, kept samples scaled by 1 / (1 - 0.5)
    kept = out.flatten(1).abs().sum(1) > 0
    assert 10 < kept.sum() < 54 and torch.allclose(out[kept], 2 * branch[kept])


def test_lr_is_timms_cosine_over_all_updates_warm_up_included():
    """CUB's schedule: 168 updates per epoch, 100 epochs, 10 warm-up epochs, lr 0.01. Values worked out from timm's
    CosineLRScheduler (warmup_lr_init 1e-8, lr_min 1e-9, warmup_prefix False, t_initial = all updates)."""
    total, warmup, lr = 100 * 168, 10 * 168, 0.01
    by_hand = {0: 1e-8,  # warmup_lr_init
               840: 1e-8 + 840 * (0.01 - 1e-8) / 1680,  # half-way up the warm-up: 0.005000005
               1680: 1e-9 + 0.5 * (0.01 - 1e-9) * (1 + 0.9510565162951535),  # cos(pi/10): the cosine is not at its top
               8400: 1e-9 + 0.5 * (0.01 - 1e-9),  # epoch 50: half the lr (a restarted cosine gives 1.17x this)
               16632: 1e-9 + 0.5 * (0.01 - 1e-9) * (1 - 0.9995065603657316)}  # epoch 99: cos(0.99 pi)
    for step, want in by_hand.items():
        assert davpt.lr_at(step, total, warmup, lr) == pytest.approx(want, rel=1e-9), step
