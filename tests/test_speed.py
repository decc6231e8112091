"""The speed paths compute what the plain paths compute: the attention rule, the training step (eager, and the function
a CUDA graph captures), --compile, the weights' fingerprint kept per model, and bench.py's FLOP count.

CUDA graphs cannot run on a CPU: here the graphed step runs its captured function on its static inputs (the same
function, the same bookkeeping); the tests marked `cuda` replay real graphs against the eager step.
Run: python -m pytest -q tests/test_speed.py
"""
import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import capt
import clip
import coop
import eval as evaluation
import sempt
from clip.model import Attention, set_sdpa
from conftest import NAMES, make_clip
import harness
from harness import runs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def test_attention_rule_takes_math_up_to_77_tokens_and_sdpa_beyond(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 4)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: seen.append(q.shape[-2]) or sdpa(q, *a, **k))
    xs = [torch.randn(2, N, 64) for N in (11, 77, 78, 197)]
    outs = [attn(x) for x in xs]
    assert seen == [78, 197]  # the rule: SDPA only beyond 77 tokens
    for x, out in zip(xs, outs):
        attn.use_sdpa = x.shape[1] <= 77  # the other path, forced: the same numbers
        assert (out - attn(x)).abs().max() <= 1e-5
    model = set_sdpa(set_sdpa(make_clip(), True), None)  # None restores the rule
    assert all(m.use_sdpa is None for m in model.modules() if isinstance(m, Attention))


def reference_fingerprint(model, keep):
    """The store key's hash as eval.py computed it on every call before it was kept per model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if keep(name):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_fingerprint_is_hashed_once_per_frozen_model_and_unchanged():
    model = make_clip().requires_grad_(False)
    visual = evaluation.model_fingerprint(model)
    text = evaluation.model_fingerprint(model, part="text")
    assert visual == reference_fingerprint(model, lambda n: n.startswith("visual."))  # stored features stay valid
    assert text == reference_fingerprint(model, lambda n: not n.startswith("visual."))  # and SemPT's attribute cache
    model.state_dict = None  # hashing again would fail: both parts must come from what the model keeps
    assert evaluation.model_fingerprint(model) == visual and evaluation.model_fingerprint(model, part="text") == text
    tuned = make_clip().requires_grad_(False)
    tuned.visual.ln_post.bias.requires_grad_(True)  # DA-VPT tunes biases: that part is hashed afresh every time
    before = evaluation.model_fingerprint(tuned)
    with torch.no_grad():
        tuned.visual.ln_post.bias.add_(1.0)
    assert evaluation.model_fingerprint(tuned) != before


def make_method(method, model, device):
    """(step_loss, module, optimizer) as the method's run() and train() build them, on NAMES."""
    torch.manual_seed(0)
    if method == "coop":
        module, step_loss = coop.PromptLearner(model, NAMES).to(device), coop.step_loss
    elif method == "sempt":
        module, step_loss = sempt.SemPT(model, NAMES, sempt.SemPTConfig()).to(device), sempt.step_loss
        attributes = {c: F.normalize(torch.randn(3, 32, device=device), dim=-1) for c in NAMES}  # K = 3
        module.set_classnames(model, NAMES, attributes, "a photo of a {}.")
    else:  # CaPT (text condition, dropout 0.1) or DeCaPT (+ KgCoOp, CAT head at 18x the learning rate)
        cfg = capt.CaPTConfig(decapt=True, base="kgcoop", scale=0.9, hidden=64, epsilon=0.0008) \
            if method == "decapt" else capt.CaPTConfig()
        module, step_loss = capt.CaPT(model, NAMES, "a photo of a {}.", cfg).to(device), capt.step_loss
        module.set_classnames(model, NAMES, off)
        module.train()
    head = [p for n, p in module.named_parameters() if n.startswith(("film_", "classifier"))]
    rest = [p for n, p in module.named_parameters() if not n.startswith(("film_", "classifier"))]
    groups = [{"params": rest, "mult": 1.0}] + ([{"params": head, "mult": 18.0}] if head else [])
    return step_loss, module, torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)


def run_steps(method, kind, batches, device="cpu"):
    """Every step's (loss, logits, trainable tensors, momentum buffers) over two epochs of `batches`, each epoch at
    its own learning rate. kind: "eager" (a train loop's step, written here as the methods write theirs, the
    reference) or "graphed" (the same step wrapped by harness.cuda_graph, as --cuda-graph does)."""
    model = make_clip().requires_grad_(False).to(device)
    step_loss, module, optimizer = make_method(method, model, device)

    def step(inputs, labels):  # images (B, 3, R, R), or stored features (B, E) with --cache-views
        with torch.no_grad():
            features = model.encode_image(inputs).float() if inputs.dim() == 4 else inputs
        loss, logits = step_loss(module, model, features, labels, autocast=off)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    if kind == "graphed":
        step = harness.cuda_graph(step, optimizer)
    torch.manual_seed(1)  # the dropout of CaPT's meta-net draws from here
    record = []
    for epoch, lr in enumerate([0.05, 0.02]):
        for group in optimizer.param_groups:
            group["lr"] = lr * group["mult"]
        for images, labels in batches:
            loss, logits = step(images.to(device), labels.to(device))
            momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in module.parameters() if p.requires_grad]
            record.append([loss.detach().clone(), logits.detach().clone()] +
                          [p.detach().clone() for p in module.parameters() if p.requires_grad] + momentum)
    return record, step


def batches(sizes, features=False):
    """Random images (B, 3, 32, 32), or stored features (B, E) as --cache-views yields them, and labels."""
    g = torch.Generator().manual_seed(5)
    shape = (32,) if features else (3, 32, 32)
    return [(torch.randn(n, *shape, generator=g), torch.randint(3, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("method,sizes,captures,features", [
    ("coop", (4, 4, 4, 4, 3, 3, 3, 3), 4, False), ("coop", (4,) * 4, 2, True), ("capt", (4,) * 4, 2, False),
    ("decapt", (4,) * 4, 2, False), ("sempt", (4,) * 4, 2, False)])
def test_the_captured_step_equals_the_eager_step_bit_for_bit(method, sizes, captures, features):
    data = batches(sizes, features)
    eager, _ = run_steps(method, "eager", data)
    graphed, step = run_steps(method, "graphed", data)
    for a, b in zip(eager, graphed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert step.captures == captures  # once per epoch (a new lr) and batch shape, after 3 eager steps of that shape


def test_cuda_graph_flag_is_refused_where_it_cannot_run(capsys):
    with pytest.raises(SystemExit):
        runs.plan(coop.parser, coop.configure, coop.__file__, ["--cuda-graph", "--device", "cpu"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err
    args = capt.parser.parse_args(["--cuda-graph", "--condition", "image"])
    with pytest.raises(ValueError, match="image condition"):
        capt.configure(args)


def test_compiled_blocks_compute_what_the_eager_ones_do():
    """The graph torch.compile traces (aot_eager: the traced forward and backward, run by PyTorch; inductor's code
    generation takes minutes on a CPU and runs in the CUDA test) gives the eager features and prompt gradients."""
    eager, compiled = make_clip(), harness.compile_encoders(make_clip(), backend="aot_eager")
    tokens, images = clip.tokenize(["a photo of a cat.", "a dog"]), torch.randn(2, 3, 32, 32)
    eot = tokens.argmax(-1)
    out = []
    for model in (eager, compiled):
        emb = model.token_embedding(tokens[:, :int(eot.max()) + 1]).detach().requires_grad_(True)
        features = model.encode_token_embeddings(emb, eot)
        features.pow(2).sum().backward()
        with torch.no_grad():
            out.append((features.detach(), emb.grad, model.encode_image(images)))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


def test_bench_counts_the_text_encoders_flops_as_torch_does():
    """bench.text_flops against torch's FlopCounterMode, which counts the matmuls autograd really runs: with frozen
    weights the backward computes input gradients only."""
    model = make_clip(transformer_layers=2, transformer_width=128, transformer_heads=2).requires_grad_(False)
    tokens = clip.tokenize(["a photo of a cat.", "a dog", "one two three four five six"])
    eot = tokens.argmax(-1)
    T = int(eot.max()) + 1
    for backward in (False, True):
        emb = model.token_embedding(tokens[:, :T]).detach().requires_grad_(True)
        counter = FlopCounterMode(display=False)
        with counter:
            features = model.encode_token_embeddings(emb, eot)
            if backward:
                features.sum().backward()
        assert bench.text_flops(model, T, 3, backward=backward) == counter.get_total_flops()


@cuda
@pytest.mark.parametrize("method", ["coop", "capt"])
def test_cuda_graph_replays_the_eager_step(method):
    """On CUDA the graphed step gives the eager step's logits and updates: bit for bit where the eager step is itself
    deterministic (two eager runs agree), else within the eager runs' own spread."""
    data = batches((4, 4, 4, 4, 4, 4))
    first, _ = run_steps(method, "eager", data, "cuda")
    second, _ = run_steps(method, "eager", data, "cuda")
    graphed, step = run_steps(method, "graphed", data, "cuda")
    assert step.graph is not None and step.captures == 2
    for a, b, c in zip(first, second, graphed):
        for x, y, z in zip(a, b, c):
            assert (x - z).abs().max() <= (x - y).abs().max()


@cuda
def test_cuda_compiled_blocks_are_close_to_eager():
    eager = make_clip().cuda()
    compiled = harness.compile_encoders(make_clip().cuda())
    tokens = clip.tokenize(["a photo of a cat.", "a dog"]).cuda()
    images = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        for a, b in [(eager.encode_text(tokens), compiled.encode_text(tokens)),
                     (eager.encode_image(images), compiled.encode_image(images))]:
            assert (a - b).abs().max() <= 1e-4  # TF32 and fused kernels: looser than CPU
