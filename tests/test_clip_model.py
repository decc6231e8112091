"""clip/model.py against independent references: open_clip's CLIP with the same weights, torch's own attention.

Run: python -m pytest -q tests/test_clip_model.py
"""
import pytest
import torch
import torch.nn.functional as F

import clip
from clip.model import build_causal_mask, set_sdpa

open_clip = pytest.importorskip("open_clip")

# Scaled-down OpenAI-architecture ViTs (QuickGELU, 64-wide heads): (embed, image, patch, vision w/l, text w/l)
CONFIGS = [(32, 32, 8, 64, 2, 64, 2), (48, 64, 16, 128, 3, 128, 2)]


def open_clip_model(embed, image, patch, vw, vl, tw, tl):
    torch.manual_seed(0)
    model = open_clip.CLIP(embed, quick_gelu=True,
                           vision_cfg=open_clip.CLIPVisionCfg(layers=vl, width=vw, patch_size=patch, image_size=image),
                           text_cfg=open_clip.CLIPTextCfg(width=tw, heads=tw // 64, layers=tl))
    with torch.no_grad():  # open_clip zero-inits some biases; make every parameter matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=CONFIGS, ids=["w64-p8-r32", "w128-p16-r64"])
def pair(request, tmp_path_factory):
    ref = open_clip_model(*request.param)
    path = tmp_path_factory.mktemp("ckpt") / "open_clip.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess = clip.load(str(path))
    return ref, model


def test_matches_open_clip(pair):
    ref, model = pair
    res = model.visual.input_resolution
    images = torch.randn(3, 3, res, res)
    tokens = clip.tokenize(["a photo of a dog.", "", "a much longer prompt about an unusual bird, with commas"])
    with torch.no_grad():
        for sdpa in (True, False):
            set_sdpa(model, sdpa)
            img_err = (model.encode_image(images) - ref.encode_image(images)).abs().max().item()
            txt_err = (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
            assert img_err <= 1e-5 and txt_err <= 1e-5, (sdpa, img_err, txt_err)
        assert torch.allclose(model.logit_scale, ref.logit_scale)


def test_truncated_text_equals_full_context(pair):
    _, model = pair
    tokens = clip.tokenize(["a", "a photo of a small brown dog", "x " * 20])
    with torch.no_grad():
        full, short = model.encode_text(tokens, truncate=False), model.encode_text(tokens, truncate=True)
    assert (full - short).abs().max() <= 1e-5


def test_block_loop_equals_encode_image(pair):
    _, model = pair
    res = model.visual.input_resolution
    images = torch.randn(2, 3, res, res)
    with torch.no_grad():
        x = model.visual.embed(images)  # (B, N, D)
        for block in model.visual.transformer.resblocks:
            x = block(x)
        assert (model.visual.head(x) - model.encode_image(images)).abs().max() <= 1e-6


def _attn(d=64, heads=4, seed=0):
    torch.manual_seed(seed)
    attn = clip.model.Attention(d, heads)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn


@pytest.mark.parametrize("masked", [False, True])
def test_attention_paths_and_torch_reference(masked):
    attn, N = _attn(), 7
    x = torch.randn(3, N, 64, requires_grad=True)
    mask = build_causal_mask(N) if masked else None
    results = {}
    for sdpa in (True, False):
        attn.use_sdpa = sdpa
        attn.zero_grad()
        x.grad = None
        out = attn(x, mask)
        out.square().sum().backward()
        results[sdpa] = (out.detach(), x.grad.clone(), attn.in_proj_weight.grad.clone())
    for a, b in zip(results[True], results[False]):  # output, grad wrt x, grad wrt in_proj_weight
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())  # relative: weight grads reach ~50
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    ref.load_state_dict(attn.state_dict())  # same key names: in_proj_weight, in_proj_bias, out_proj.*
    with torch.no_grad():
        expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    assert (results[False][0] - expected).abs().max() <= 1e-5
    expected2, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 64, 4, attn.in_proj_weight, attn.in_proj_bias,
        None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, need_weights=False, attn_mask=mask)
    assert (results[True][0] - expected2.transpose(0, 1)).abs().max() <= 1e-5


def test_return_parts():
    attn = _attn()
    x = torch.randn(2, 5, 64)
    out, parts = attn(x, return_parts=True)
    assert parts["q"].shape == parts["k"].shape == parts["v"].shape == (2, 4, 5, 16)
    assert parts["pre_out"].shape == (2, 5, 64)
    q_ref = F.linear(x, attn.in_proj_weight[:64], attn.in_proj_bias[:64]).view(2, 5, 4, 16).transpose(1, 2)
    assert torch.allclose(parts["q"], q_ref, atol=1e-6)
    assert torch.allclose(attn.out_proj(parts["pre_out"]), out, atol=1e-6)
    assert torch.allclose(out, attn(x), atol=1e-6)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_bf16_autocast_close_to_fp32(pair):
    ref, model = pair
    model = model.to("cuda")
    res = model.visual.input_resolution
    images, tokens = torch.randn(4, 3, res, res, device="cuda"), clip.tokenize(["a photo of a cat"]).cuda()
    with torch.no_grad():
        fp32 = model.encode_image(images), model.encode_text(tokens)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.encode_image(images), model.encode_text(tokens)
    model.to("cpu")
    for a, b in zip(fp32, bf16):
        assert F.cosine_similarity(a, b.float(), dim=-1).min() > 0.99


@cuda
def test_cuda_sdpa_matches_math():
    attn = _attn().cuda()
    x = torch.randn(4, 50, 64, device="cuda")
    mask = build_causal_mask(50, "cuda")
    outs = []
    for sdpa in (True, False):
        attn.use_sdpa = sdpa
        with torch.no_grad():
            outs.append(attn(x, mask))
    assert (outs[0] - outs[1]).abs().max() <= 1e-4  # TF32/fused kernels on CUDA: looser than CPU
