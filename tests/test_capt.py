"""capt.py: CaPT's pieces against independent references (CoOp's own code, hand arithmetic), and whole runs.

Run: python -m pytest tests/test_capt.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

import capt
import clip
import coop
import eval as evaluation
from conftest import NAMES
import files
from harness import runs

OFF = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731  fp32 everywhere


def make(tiny, argv=()):
    """A frozen tiny CLIP and a CaPT module configured exactly as `python capt.py *argv` would configure it."""
    model, _ = clip.load(str(tiny / "clip.pt"))
    model.requires_grad_(False)
    _, (args,) = runs.plan(capt.parser, capt.configure, capt.__file__, list(argv))
    cfg = capt.CaPTConfig.from_args(args)
    module = capt.CaPT(model, NAMES, "a photo of a {}.", cfg, seed=args.seed)
    module.set_classnames(model, NAMES, OFF)
    return model, module, cfg


@pytest.mark.parametrize("condition", ["text", "noise", "image"])
def test_zero_meta_output_gives_exactly_coops_logits(tiny, condition):
    model, module, cfg = make(tiny, ["--condition", condition])
    torch.nn.init.zeros_(module.meta.up.weight), torch.nn.init.zeros_(module.meta.up.bias)
    images = torch.randn(3, 3, 32, 32)
    f = model.encode_image(images)
    learner = coop.PromptLearner(model, NAMES, ctx_init="a photo of a")
    reference = 100 * F.normalize(f, dim=-1) @ coop.text_features(model, learner, OFF).t()  # CoOp's own path
    offsets = module.offsets(f)
    ours = capt.itm_logits(f, capt.encode_prompts(model, module.prompts(offsets), module.prompt_learner.eot_idx, OFF,
                                                  cfg.chunk), 100.0)
    assert torch.allclose(ours, reference, atol=1e-4)


def test_margin_itm_loss_equals_hand_computed_example():
    logits, labels = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
    S = torch.tensor([[1.0, 0.5, 0.25], [0.5, 1.0, 0.0], [0.25, 0.0, 1.0]])
    # eps/(C-1) = 0.1: m_1 = 0.05, m_2 = 0.025, m_0 = -0.075; z' = z - 10*m = [1.75, 1.5, 0.25] (target raised)
    expected = -1.75 + math.log(math.exp(1.75) + math.exp(1.5) + math.exp(0.25))
    assert capt.margin_itm_loss(logits, labels, S, 0.2, 10.0).item() == pytest.approx(expected, abs=1e-6)
    assert capt.margin_itm_loss(logits, labels, S, 0.0, 10.0).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_kgcoop_term_is_zero_for_the_hand_crafted_prompt(tiny):
    """Context "a photo of a" with template "a photo of a {}." and no offset is exactly CLIP's hand-crafted prompt."""
    model, module, cfg = make(tiny, ["--condition", "none", "--base", "kgcoop"])
    g = capt.encode_prompts(model, module.prompts(None), module.prompt_learner.eot_idx, OFF, cfg.chunk)
    assert capt.kgcoop_loss(g, module.tci).item() == pytest.approx(0.0, abs=1e-5)
    assert capt.kgcoop_loss(g + torch.randn_like(g), module.tci).item() > 0.01


def test_image_mode_gives_per_image_prompts_and_chunking_is_exact(tiny):
    model, module, cfg = make(tiny, ["--condition", "image"])
    f = model.encode_image(torch.randn(3, 3, 32, 32))
    prompts = module.prompts(module.offsets(f))
    K, T, D = module.prompt_learner().shape
    assert prompts.shape == (3, K, T, D)
    assert not torch.allclose(prompts[0], prompts[1])  # each image its own prompts
    eot = module.prompt_learner.eot_idx
    chunked = capt.encode_prompts(model, prompts, eot, OFF, chunk=4)
    per_image = torch.stack([model.encode_token_embeddings(p, eot) for p in prompts])  # one image at a time
    assert chunked.shape == (3, K, model.text_projection.shape[1])
    assert torch.allclose(chunked, per_image, atol=1e-5)


@pytest.mark.parametrize("argv", [["--condition", "none"], ["--condition", "image"], ["--condition", "noise"],
                                  ["--condition", "text"], ["--decapt"]])
def test_clip_is_bit_identical_after_a_step_and_trainables_move(tiny, argv):
    model, module, cfg = make(tiny, argv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    f = model.encode_image(torch.randn(4, 3, 32, 32))
    loss, _ = capt.step_loss(module, model, f, torch.tensor([0, 1, 2, 3]), OFF)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(module.prompt_learner.ctx, params["prompt_learner.ctx"])
    if module.meta is not None:
        # (the bias: CoCoOp's 2 hidden ReLU units on the tiny CLIP may both be off for these 4 images)
        assert not torch.equal(module.meta.up.bias, params["meta.up.bias"])


def test_decapt_fuses_on_base_and_uses_itm_only_on_new(tiny):
    model, module, cfg = make(tiny, ["--decapt"])
    module.eval()  # no meta-net dropout
    with torch.no_grad():
        module.classifier.weight.normal_()
    f = model.encode_image(torch.randn(6, 3, 32, 32))
    itm = capt.predict(module, model, f, None, OFF)
    cat = f @ module.classifier.weight.t() + module.classifier.bias  # FiLM starts as the identity
    assert torch.allclose(capt.predict(module, model, f, slice(None), OFF), 0.3 * itm + 0.7 * cat, atol=1e-4)
    cfg.fusion = "probs"
    assert torch.allclose(capt.predict(module, model, f, slice(None), OFF), 0.3 * itm.softmax(-1) + 0.7 * cat.softmax(-1),
                          atol=1e-5)


def test_main_asks_for_fusion_on_base_only(tiny, tmp_path, monkeypatch):
    calls = []
    real = capt.predict
    monkeypatch.setattr(capt, "predict", lambda capt_, model, f, rows, autocast: calls.append(
        (len(capt_.prompt_learner.eot_idx), rows)) or real(capt_, model, f, rows, autocast))
    capt.main(argv(tiny, tmp_path, "--decapt"))
    assert calls == [(3, slice(None)), (2, None)]  # 3 base classes fused, 2 new ones ITM only


def argv(tiny, tmp_path, *extra):
    return ["--dataset", "folder", "--root", str(tiny / "ds"), "--backbone", str(tiny / "clip.pt"), "--shots", "2",
            "--epochs", "2", "--lr", "0.05", "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("extra", [["--condition", "none"], ["--condition", "image"], ["--condition", "noise"],
                                   ["--condition", "text"], ["--base", "kgcoop"], ["--decapt"]])
def test_main_trains_then_eval_only_reproduces(tiny, tmp_path, extra):
    trained = capt.main(argv(tiny, tmp_path, *extra))
    for f in ("args.json", "results.json", "train_files.json", "checkpoint.pt"):
        assert (tmp_path / "run" / f).exists()
    again = capt.main(argv(tiny, tmp_path, *extra, "--eval-only"))
    assert (again["base_acc"], again["new_acc"]) == (trained["base_acc"], trained["new_acc"])


def test_noise_vector_survives_save_and_load(tiny, tmp_path):
    capt.main(argv(tiny, tmp_path, "--condition", "noise"))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["trainable"]
    model, other, _ = make(tiny, ["--condition", "noise", "--seed", "7"])  # another seed draws another vector
    assert not torch.equal(other.noise, saved["noise"])
    other.load_state_dict(saved)
    assert torch.equal(other.noise, saved["noise"])


def test_condition_none_without_margin_is_coop(tiny, tmp_path):
    """--condition none --epsilon 0 is CoOp: the same trained context as coop.py, to float precision."""
    common = argv(tiny, tmp_path)[:-2]
    capt.main(common + ["--out", str(tmp_path / "capt"), "--condition", "none", "--epsilon", "0"])
    coop.main(common + ["--out", str(tmp_path / "coop")])
    ours = torch.load(tmp_path / "capt" / "checkpoint.pt", weights_only=True)["trainable"]["prompt_learner.ctx"]
    reference = torch.load(tmp_path / "coop" / "checkpoint.pt", weights_only=True)["trainable"]["ctx"]
    assert torch.allclose(ours, reference, atol=1e-6) and not torch.equal(reference, coop.PromptLearner(
        clip.load(str(tiny / "clip.pt"))[0], NAMES).ctx.detach())


def test_image_condition_is_the_released_cocoop(tiny):
    """--condition image = CoCoOp (CaPT's base_trainers/cocoop.py): its recipe, Linear-ReLU-Linear with PyTorch's init,
    and a plain cross-entropy over per-image prompts ctx + meta(normalised image feature), built here by hand."""
    _, (args,) = runs.plan(capt.parser, capt.configure, capt.__file__, ["--condition", "image"])
    assert (args.method, args.batch_size, args.lr, args.epsilon, args.dropout, args.scale, args.hidden) == \
        ("cocoop", 1, 0.002, 0.0, 0.0, 1.0, None)  # None: the width follows the backbone
    _, (mine,) = runs.plan(capt.parser, capt.configure, capt.__file__, ["--condition", "image", "--batch-size", "4"])
    assert mine.batch_size == 4 and mine.lr == 0.002  # a flag still overrides the preset
    model, module, cfg = make(tiny, ["--condition", "image"])
    meta = module.meta
    # CoCoOp's vis_dim // 16 (32 on ViT-B's 512; the tiny CLIP's E = 32 gives 2), not a fixed 32
    assert isinstance(meta.activation, torch.nn.ReLU) and meta.down.out_features == 32 // 16 and meta.dropout.p == 0.0
    # PyTorch's init U(+-1/sqrt(in)), not CaPT's U(+-1/sqrt(out)): they differ where in != out, as in `up` (2 -> 64)
    assert meta.up.in_features != meta.up.out_features
    assert 1 / math.sqrt(meta.up.out_features) < meta.up.weight.abs().max() <= 1 / math.sqrt(meta.up.in_features)
    f, labels = model.encode_image(torch.randn(3, 3, 32, 32)), torch.tensor([0, 3, 4])
    loss, logits = capt.step_loss(module, model, f, labels, OFF)
    learner = coop.PromptLearner(model, NAMES)
    reference = []
    for fb in F.normalize(f, dim=-1):  # CoCoOp: every image gets its own context
        with torch.no_grad():
            learner.ctx.copy_(module.prompt_learner.ctx + meta.up(torch.relu(meta.down(fb))))
        reference.append(model.logit_scale.exp() * fb @ coop.text_features(model, learner, OFF).t())
    reference = torch.stack(reference)  # (B, C)
    assert torch.allclose(logits, reference, atol=1e-4)
    assert loss.item() == pytest.approx(F.cross_entropy(reference, labels).item(), abs=1e-5)
    with pytest.raises(SystemExit):  # CoCoOp has no KgCoOp variant
        runs.plan(capt.parser, capt.configure, capt.__file__, ["--condition", "image", "--base", "kgcoop"])


def test_kgcoop_target_uses_kgcoops_own_dtd_template(tiny):
    model, module, cfg = make(tiny, ["--base", "kgcoop"])
    module.set_classnames(model, NAMES, OFF, template="{} texture.", kg_template=capt.KGCOOP_TEMPLATES["dtd"])
    encode = lambda template: model.encode_text(clip.tokenize([template.format(c) for c in NAMES]))  # noqa: E731
    assert capt.KGCOOP_TEMPLATES["dtd"] == "a photo of a {}, a type of texture."
    assert torch.allclose(module.kg_target, encode("a photo of a {}, a type of texture."), atol=1e-5)
    assert torch.allclose(module.tci, encode("{} texture."), atol=1e-5)  # the TCI keeps CoOp's DTD template
