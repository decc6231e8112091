"""CLIP's ResNet image encoders (clip/resnet.py) against open_clip's ModifiedResNet with the same weights, the
methods on a ResNet backbone, and OpenAI's API as existing user code calls it.

Run: python -m pytest -q tests/test_clip_resnet.py
"""
import pytest
import torch

import capt
import clip
import coop
import davpt
import files
import sempt
from conftest import NAMES
from clip.resnet import ModifiedResNet

open_clip = pytest.importorskip("open_clip")

# Scaled-down OpenAI ResNets: (embed, image size, stage blocks, stem width), text 64 wide x 1 layer
CONFIGS = [(32, 64, (1, 1, 1, 1), 16), (24, 32, (2, 1, 2, 1), 8)]


def open_clip_resnet(embed, image, layers, width):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed, quick_gelu=True, vision_cfg=open_clip.CLIPVisionCfg(layers=layers, width=width,
                                                                                      image_size=image),
                           text_cfg=open_clip.CLIPTextCfg(width=64, heads=1, layers=1))
    with torch.no_grad():  # every parameter and BatchNorm statistic matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module", params=CONFIGS, ids=["rn-w16-r64", "rn-w8-r32"])
def pair(request, tmp_path_factory):
    ref = open_clip_resnet(*request.param)
    path = tmp_path_factory.mktemp("rn") / "rn.pt"
    torch.save(ref.state_dict(), path)
    return ref, clip.load(str(path), device="cpu", jit=False)[0], request.param, path


def test_matches_open_clip(pair):
    ref, model, _, _ = pair
    res = model.visual.input_resolution
    images = torch.randn(3, 3, res, res)
    tokens = clip.tokenize(["a photo of a dog.", "", "a much longer prompt about an unusual bird"])
    with torch.no_grad():
        img_err = (model.encode_image(images) - ref.encode_image(images)).abs().max().item()
        txt_err = (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
        logits = model(images, tokens)[0]  # OpenAI's model(image, text): (B, C) logits
    assert img_err <= 1e-5 and txt_err <= 1e-5, (img_err, txt_err)
    assert logits.shape == (3, 3)


def test_architecture_is_read_off_the_state_dict_as_openais(pair):
    _, model, (embed, image, layers, width), _ = pair
    visual = model.visual
    assert isinstance(visual, ModifiedResNet) and visual.input_resolution == image
    assert tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5)) == layers
    assert visual.attnpool.heads == width * 32 // 64 and visual.attnpool.c_proj.out_features == embed
    assert model.dtype == torch.float32  # OpenAI's model.dtype


def test_openais_resnets_are_known_by_their_published_hashes():
    published = {"RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
                 "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"}
    for name, sha in published.items():
        assert name in clip.available_models() and clip.clip._MODELS[name] == (sha, f"{name}.pt")


def test_load_takes_openais_arguments(pair, monkeypatch):
    _, _, _, path = pair
    with pytest.raises(clip.LoadError, match="jit=False"):
        clip.load(str(path), jit=True)
    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(clip.model.CLIP, "to", lambda self, device: moved.append(device) or self)
    clip.load(str(path))  # OpenAI's default: CUDA when there is one
    clip.load(str(path), device="cpu")
    assert moved == ["cuda", "cpu"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The smaller ResNet's checkpoint (32 x 32 images, as the world's), for the method runs."""
    path = tmp_path_factory.mktemp("rn") / "rn_small.pt"
    torch.save(open_clip_resnet(*CONFIGS[1]).state_dict(), path)
    return path


def world(*extra, out):
    return ["--epochs", "1", "--shots", "1", "--device", "cpu", "--workers", "0", "--out", str(out), *extra]


def folder(tiny, *extra, out):
    """The 5-class tiny folder dataset (conftest), 2 shots: a method's whole run in a second or two."""
    return ["--dataset", "folder", "--root", str(tiny / "ds"), "--shots", "2", *world(*extra, out=out)[2:]]


@pytest.mark.parametrize("main, extra", [(coop.main, []), (capt.main, []), (capt.main, ["--decapt"]),
                                         (capt.main, ["--condition", "image"]), (capt.main, ["--base", "kgcoop"]),
                                         (sempt.main, [])], ids=["coop", "capt", "decapt", "cocoop", "kgcoop", "sempt"])
def test_text_side_methods_train_on_a_resnet(small, tiny, tmp_path, main, extra):
    path = small
    if main is sempt.main:  # the tiny folder's classes need descriptions of their own
        files.save_json(tmp_path / "d.json", {c: ["a shape.", "a colour."] for c in NAMES})
        extra = ["--descriptions", str(tmp_path / "d.json")]
    result = main(folder(tiny, "--backbone", str(path), *extra, out=tmp_path / "run"))
    assert 0 <= result["H"] <= 100


def test_davpt_refuses_resnets(small, tmp_path, capsys):
    path = small
    for backbone in ("RN50", str(path)):
        with pytest.raises(SystemExit) as e:
            davpt.main(world("--backbone", backbone, out=tmp_path / "run"))
        assert e.value.code == 2 and "DA-VPT's prompts are ViT tokens" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
