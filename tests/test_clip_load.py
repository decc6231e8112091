"""clip.load on files in the real formats (OpenAI's TorchScript archive, plain state dicts) and on bad input.

Run: python -m pytest -q tests/test_clip_load.py
"""
import hashlib
import io
import urllib.error

import pytest
import torch
import torch.nn as nn

import clip
import clip.clip as loader
from clip.model import CLIP

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CLIP(**TINY).eval()


def openai_style_state_dict(model):
    """What OpenAI's archives hold: the weights plus attn_mask buffers and the three scalars."""
    sd = dict(model.state_dict())
    for i in range(TINY["transformer_layers"]):
        sd[f"transformer.resblocks.{i}.attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return sd


class Holder(nn.Module):
    """A module tree whose state_dict has the given keys, to torch.jit.script and save like OpenAI's archives."""

    def __init__(self, tensors):
        super().__init__()
        children = {}
        for key, value in tensors.items():
            head, _, rest = key.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = value
            elif value.is_floating_point() and value.dim() > 0 and not key.endswith("attn_mask"):
                self.register_parameter(key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value.clone())
        for name, sub in children.items():
            self.add_module(name, Holder(sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(sd, path):
    torch.jit.save(torch.jit.script(Holder(sd)), str(path))


def assert_same_weights(model, reference):
    ref = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_torchscript_archive_round_trip(tiny, tmp_path):
    path = tmp_path / "ViT-tiny.pt"
    save_torchscript(openai_style_state_dict(tiny), path)
    assert "input_resolution" in torch.jit.load(str(path)).state_dict()  # the archive looks like OpenAI's
    model, preprocess = clip.load(str(path))
    assert_same_weights(model, tiny)
    assert not model.training and model.visual.conv1.weight.dtype == torch.float32


def test_plain_and_fp16_state_dicts(tiny, tmp_path):
    torch.save({"module." + k: v for k, v in openai_style_state_dict(tiny).items()}, tmp_path / "a.pt")
    assert_same_weights(clip.load(str(tmp_path / "a.pt"))[0], tiny)
    torch.save({k: v.half() for k, v in tiny.state_dict().items()}, tmp_path / "b.pt")  # OpenAI ships fp16
    model = clip.load(str(tmp_path / "b.pt"))[0]
    assert model.visual.conv1.weight.dtype == torch.float32
    assert torch.equal(model.text_projection, tiny.text_projection.half().float())


def test_preprocess_follows_resolution(tiny, tmp_path):
    from PIL import Image
    torch.save(tiny.state_dict(), tmp_path / "a.pt")
    _, preprocess = clip.load(str(tmp_path / "a.pt"))
    x = preprocess(Image.new("L", (80, 40), color=255))  # grayscale, not square
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(loader.MEAN)) / torch.tensor(loader.STD))


def test_unknown_name():
    assert clip.available_models() == ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B/32", "ViT-B/16",
                                       "ViT-L/14", "ViT-L/14@336px"]  # OpenAI's list, in its order
    with pytest.raises(RuntimeError, match="ViT-B/32"):
        clip.load("ViT-H/99")


class FakeResponse(io.BytesIO):
    headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_no_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, *a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(loader.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        clip.load("ViT-B/32", download_root=str(tmp_path))
    msg = str(e.value)
    assert "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt" in msg
    assert str(tmp_path / "ViT-B-32.pt") in msg
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(RuntimeError):
        clip.load("ViT-B/32", download_root=str(tmp_path / "clip"))
    assert not (tmp_path / "clip").exists()  # nor a cache folder the failed download created


def test_checksum_mismatch_refused_and_good_file_kept(tmp_path, monkeypatch):
    urls = []
    monkeypatch.setattr(loader.urllib.request, "urlopen", lambda url, *a, **k: urls.append(url) or FakeResponse(b"evil"))
    with pytest.raises(RuntimeError, match="sha256"):
        clip.load("ViT-B/16", download_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    # a cached file with the right hash is used as is and never downloaded again
    good = b"pretend checkpoint"
    monkeypatch.setitem(loader._MODELS, "ViT-B/16", (hashlib.sha256(good).hexdigest(), "ViT-B-16.pt"))
    (tmp_path / "ViT-B-16.pt").write_bytes(good)
    urls.clear()
    assert loader._download("ViT-B/16", tmp_path) == tmp_path / "ViT-B-16.pt"
    assert urls == [] and (tmp_path / "ViT-B-16.pt").read_bytes() == good


def test_bad_cached_file_is_downloaded_again(tmp_path, monkeypatch):
    good = b"the real bytes"
    monkeypatch.setitem(loader._MODELS, "ViT-B/16", (hashlib.sha256(good).hexdigest(), "ViT-B-16.pt"))
    (tmp_path / "ViT-B-16.pt").write_bytes(b"half a downl")
    monkeypatch.setattr(loader.urllib.request, "urlopen", lambda url, *a, **k: FakeResponse(good))
    assert loader._download("ViT-B/16", tmp_path).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-B-16.pt"]


def test_a_partial_resnet_checkpoint_names_what_it_lacks(tmp_path):
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                "text_projection": torch.zeros(64, 32)}, tmp_path / "rn50.pt")
    with pytest.raises(clip.LoadError, match="visual.attnpool.positional_embedding"):
        clip.load(str(tmp_path / "rn50.pt"))


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "garbage"])
def test_truncated_or_corrupt_file(tiny, tmp_path, kind):
    path = tmp_path / "cut.pt"
    save_torchscript(openai_style_state_dict(tiny), path) if kind == "torchscript" else torch.save(tiny.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if kind != "garbage" else b"\x00not a checkpoint" * 9)
    with pytest.raises(RuntimeError, match="cut.pt"):
        clip.load(str(path))


def test_missing_keys_are_named(tiny, tmp_path):
    sd = tiny.state_dict()
    del sd["transformer.resblocks.1.mlp.c_fc.bias"], sd["ln_final.weight"]
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(clip.LoadError, match="ln_final.weight"):
        clip.load(str(tmp_path / "a.pt"))
    sd = tiny.state_dict()
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(clip.LoadError, match="transformer.resblocks.1.mlp.c_fc.bias"):
        clip.load(str(tmp_path / "b.pt"))
