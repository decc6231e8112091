"""Benchmark nanoprompt's hot paths on the current device, with random weights at real sizes (like nanoGPT's bench.py).

What it measures (a table per section, plus device, dtype and versions):
  1. text encoder forward+backward over C class prompts, full 77 tokens vs truncated to the longest prompt (eager,
     and compiled with --variants compile), with the max difference of the features (the truncation is exact, so
     this is rounding only) and the achieved TFLOP/s (on CUDA also the share of the device's dense bf16 peak);
  2. image-encoder evaluation throughput (images/s) with each attention path (plain math vs torch SDPA);
  3. peak memory;
  4. one training step of each method script (the step its train loop runs: encode the batch's images, the
     method's loss, backward, SGD) over C classes at batch 4 (their default), per variant: eager, compile
     (--compile), graph (--cuda-graph), compile+graph; DA-VPT's step against plain VPT-deep;
  5. the feature store: a first evaluation of a test set (hash the weights, encode, write) against a second (read);
  6. --protocol: how long one seed of the 11-dataset base-to-new protocol would take on this device (CoOp with
     CaPT's recipe: 16 shots, batch 4, 10 epochs), from a sample of real steps and evaluations per dataset on
     synthetic JPEGs of the datasets' typical sizes (decoding included), extrapolated.

    python bench.py                # ViT-B/16 (and ViT-L/14 on a GPU), C in {10, 100, 1000}, every variant on CUDA
    python bench.py --quick        # CPU-sized: ViT-B/16, C in {10, 100}, eager only, 2-4 minutes on 2 cores
    python bench.py --quick --sections methods --classes 100   # one section only
    python bench.py --protocol     # the protocol estimate (on a CPU: a few steps and images per dataset)

Random weights give the same timings as OpenAI's (the arithmetic does not depend on the values).
"""
import argparse
import itertools
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import capt
import clip
import coop
import data
import davpt
import eval as evaluation
import experiment
import harness
import sempt
from harness.runs import plan
from clip.model import CLIP, set_sdpa

# OpenAI's sizes: embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text width/heads/layers
SIZES = {
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0}  # dense, no sparsity
VARIANTS = ["eager", "compile", "graph", "compile+graph"]

# The base-to-new protocol (CoCoOp's split): base and new classes, test images of all classes (base and new are
# about half each), and the typical image size (width, height) of its JPEGs. Sizes assumed: ImageNet 500x375,
# EuroSAT 64x64, DTD 640x640, every other dataset 500x400.
PROTOCOL = {
    "imagenet": (500, 500, 50000, (500, 375)),
    "caltech101": (50, 50, 2465, (500, 400)),
    "oxford_pets": (19, 18, 3669, (500, 400)),
    "stanford_cars": (98, 98, 8041, (500, 400)),
    "oxford_flowers": (51, 51, 2463, (500, 400)),
    "food101": (51, 50, 30300, (500, 400)),
    "fgvc_aircraft": (50, 50, 3333, (500, 400)),
    "sun397": (199, 198, 19850, (500, 400)),
    "dtd": (24, 23, 1692, (640, 640)),
    "eurosat": (5, 5, 8100, (64, 64)),
    "ucf101": (51, 50, 3783, (500, 400)),
}
SHOTS, BATCH, EPOCHS = 16, 4, 10  # CaPT's recipe

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="CPU-sized run: ViT-B/16 only, C in {10, 100}, fewer repeats")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders (auto: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--classes", type=experiment.positive_int, nargs="+", default=None, help="class counts C (default 10 100 1000)")
parser.add_argument("--repeats", type=experiment.positive_int, default=None, help="timed repeats per cell (default 5, --quick 1)")
parser.add_argument("--sections", default="text,image,methods,store", help="comma-separated: text, image, methods, store")
parser.add_argument("--variants", default=None,
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: all on CUDA, eager on CPU, where "
                         f"compiling takes minutes and graphs do not exist)")
parser.add_argument("--protocol", action="store_true", help="only the estimate of one seed of the 11-dataset protocol")
parser.add_argument("--protocol-variant", default=None, choices=VARIANTS,
                    help="the training step the protocol estimate uses (default: graph on CUDA, eager on CPU)")
parser.add_argument("--protocol-steps", type=experiment.positive_int, default=None, help="timed training steps per dataset (default 50, CPU 2)")
parser.add_argument("--protocol-images", type=experiment.positive_int, default=None, help="test images encoded per dataset (default 1000, CPU 16)")
parser.add_argument("--datasets", nargs="+", default=list(PROTOCOL), choices=list(PROTOCOL),
                    help="--protocol: the datasets to sample (default all 11)")


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, repeats, device, warmup=1):
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # max RSS of the process, in MiB (Linux: KiB)


def device_peak_tflops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def class_names(C):
    """C class names of varied length (1-4 words)."""
    words = ["red", "striped", "small", "mountain", "bike", "tabby", "cat", "sea", "plane", "oak"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 4)) for i in range(C)]


def class_prompts(C):
    """C prompts 'a photo of a <name>.', tokenized to (C, 77)."""
    return clip.tokenize([f"a photo of a {n}." for n in class_names(C)])


def text_flops(model, T, C, backward=True):
    """Matmul FLOPs of the text encoder for C prompts of T tokens: its forward, or forward + backward with frozen
    weights (the input, i.e. the learned prompt, needs a gradient; no weight does).

    Forward, per layer: the weight matmuls (qkv 3D^2, out D^2, MLP 8D^2 per token: 2 * C*T*12*D^2 FLOPs, a
    multiply-add being 2) and attention's two activation matmuls, scores Q K^T and values P V (2 * 2*C*T*T*D; the
    whole T x T square, as the kernels compute it under the causal mask); then the projection of the C end tokens
    (2*C*D*E). Backward: a weight matmul Y = X W needs only dX = dY W^T, one matmul (1x; dW is not computed for a
    frozen W); an activation matmul needs the gradients of both operands, two matmuls (2x). So forward + backward
    = 2x the weight matmuls + 3x the activation matmuls, not 3x everything.
    """
    D, L, E = model.transformer.width, model.transformer.layers, model.text_projection.shape[1]
    weights = L * 2 * C * T * 12 * D * D + 2 * C * D * E
    activations = L * 2 * 2 * C * T * T * D
    return 2 * weights + 3 * activations if backward else weights + activations


def counted_flops(fn):
    """FLOPs of one call of fn as torch counts them (matmuls, convolutions, attention kernels; forward and backward
    as executed, so the gradients of frozen weights, never computed, are never counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def rate(flops, seconds, peak):
    """'12.3 TFLOP/s (4% of peak)'."""
    tflops = flops / seconds / 1e12
    return f"{tflops:.2f} TFLOP/s" + (f" ({100 * tflops / peak:.0f}% of peak)" if peak else "")


def build(name, device, variant="eager"):
    """A frozen random CLIP of OpenAI's sizes (the same weights every time), its blocks compiled for compile variants."""
    torch.manual_seed(0)
    model = CLIP(*SIZES[name]).to(device).eval().requires_grad_(False)
    return harness.compile_encoders(model) if "compile" in variant else model


def bench_text(model, C, autocast, device, *, repeats, truncated_only=False):
    tokens = class_prompts(C).to(device)
    eot = tokens.argmax(-1)
    # The prompt embeddings require grad, as a learned context would: the backward pass runs through every layer.
    emb = model.token_embedding(tokens).detach().requires_grad_(True)  # (C, 77, D)
    row = {}
    for name, T in [("77 tokens", tokens.shape[1]), ("truncated", int(eot.max()) + 1)][truncated_only:]:
        def step():
            with autocast():
                feats = model.encode_token_embeddings(emb[:, :T], eot)
            feats.float().pow(2).sum().backward()
            return feats
        row[name] = (timeit(step, repeats, device, warmup=2 if truncated_only else 1), T)  # compiled: compile first
    with torch.no_grad(), autocast():
        full = model.encode_text(tokens, truncate=False).float()
        trunc = model.encode_text(tokens, truncate=True).float()
    return row, (full - trunc).abs().max().item()


def bench_image(model, autocast, device, *, repeats, batch):
    images = torch.randn(batch, 3, model.visual.input_resolution, model.visual.input_resolution, device=device)
    out = {}
    for path, enabled in [("math", False), ("sdpa", True)]:
        set_sdpa(model, enabled)
        with torch.no_grad():
            def run():
                with autocast():
                    return model.encode_image(images)
            out[path] = batch / timeit(run, repeats, device)
    set_sdpa(model, None)  # back to the default rule
    return out


def sgd(module):
    """The text-side methods' optimizer (CoOp's recipe)."""
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0035, momentum=0.9,
                           weight_decay=5e-4)


def training_step(step_loss, module, model, optimizer, *, autocast, cuda_graph=False):
    """The training step the text-side methods' train() writes (coop.py's `step`): the frozen image encoder, the
    method's step_loss, backward, SGD; with cuda_graph, wrapped as --cuda-graph wraps it."""
    def step(inputs, labels):
        if inputs.dim() == 4:  # images (B, 3, R, R); stored features (B, E) otherwise
            with torch.no_grad(), autocast():
                inputs = model.encode_image(inputs).float()  # (B, E)
        loss, logits = step_loss(module, model, inputs, labels, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss, logits
    return harness.cuda_graph(step, optimizer) if cuda_graph else step


def method_steps(model, C, autocast, device, batch=4):
    """{name: (step(inputs, labels) factory, inputs, labels)} for each method's training step on C classes."""
    names, tokens = class_names(C), class_prompts(C)
    R = model.visual.input_resolution
    images, labels = torch.randn(batch, 3, R, R, device=device), torch.arange(batch, device=device) % C

    def capt_module(argv):  # configured as `python capt.py *argv` would be
        _, (args,) = plan(capt.parser, capt.configure, capt.__file__, argv)
        module = capt.CaPT(model, names, "a photo of a {}.", capt.CaPTConfig.from_args(args)).to(device)
        module.set_classnames(model, names, autocast)
        return module.train()

    learner = coop.PromptLearner(model, names).to(device)
    full = coop.PromptLearner(model, names).to(device)  # the same prompts run over all 77 positions
    with torch.no_grad():
        full.suffix = model.token_embedding(tokens.to(device))[:, 1 + full.n_ctx:].float()  # (C, 77-1-M, D)
        cached = model.encode_image(images).float()  # --cache-views: the step reads stored features (B, E)
    _, (args,) = plan(sempt.parser, sempt.configure, sempt.__file__, [])
    semantic = sempt.SemPT(model, names, sempt.SemPTConfig.from_args(args)).to(device)
    E = model.text_projection.shape[1]
    attributes = {c: F.normalize(torch.randn(5, E, device=device), dim=-1) for c in names}  # K = 5 attributes
    semantic.set_classnames(model, names, attributes, "a photo of a {}.")
    steps = {}  # CaPT's image condition first, so that the peak-memory reading is its own (B x C prompts, chunked)
    if device == "cuda" or C * batch <= 400:  # too slow on a CPU beyond that
        steps["capt image (CoCoOp)"] = (capt.step_loss, capt_module(["--condition", "image"]), images)
    steps |= {"coop (77 tokens)": (coop.step_loss, full, images), "coop": (coop.step_loss, learner, images),
              "coop (cached views)": (coop.step_loss, learner, cached)}
    for label, argv in [("capt none", ["--condition", "none"]), ("capt noise", ["--condition", "noise"]),
                        ("capt text (CaPT)", ["--condition", "text"]), ("decapt", ["--decapt"])]:
        steps[label] = (capt.step_loss, capt_module(argv), images)
    steps["sempt"] = (sempt.step_loss, semantic, images)
    return steps, labels


def bench_methods(models, C, variants, *, autocast, device, repeats, peak):
    """{method: {variant: seconds per training step}}, FLOPs per step, and notes, on C classes at batch 4.
    models: {"eager": model, "compile": its compiled twin}."""
    times, flops, notes = {}, {}, {}
    for variant in variants:
        model = models["compile" if "compile" in variant else "eager"]
        steps, labels = method_steps(model, C, autocast, device)
        if variant == "eager":  # before any step trains the two prompts apart
            with torch.no_grad():
                a, b = (coop.step_loss(steps[k][1], model, steps["coop (cached views)"][2], labels, autocast=autocast)[1]
                        for k in ("coop (77 tokens)", "coop"))
            notes["coop logits, 77 vs truncated, max |diff|"] = f"{(a - b).abs().max():.1e}"
        for label, (step_loss, module, inputs) in steps.items():
            if "graph" in variant and label.startswith("capt image"):
                continue  # not captured (checkpointed chunks): capt.py refuses --cuda-graph with it
            step = training_step(step_loss, module, model, sgd(module), autocast=autocast,
                                 cuda_graph="graph" in variant)
            if label.startswith("capt image") and variant == "eager":
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb(device)
                step(inputs, labels)
                notes["image condition peak memory"] = f"+{peak_memory_mb(device) - before:.0f} MiB over the " \
                                                       f"model (chunk {module.cfg.chunk})"
            if variant == "eager" and peak:
                flops[label] = counted_flops(lambda: step(inputs, labels))
            warmup = 5 if "graph" in variant else 2 if "compile" in variant else 1  # graphs: 3 eager, capture, replay
            times.setdefault(label, {})[variant] = timeit(lambda: step(inputs, labels), repeats, device, warmup=warmup)
        del steps
        if device == "cuda":
            torch.cuda.empty_cache()
    return times, flops, notes


def print_methods(C, variants, results, peak):
    times, flops, notes = results
    print(f"\nC = {C}: one training step (batch 4), ms" + (" (share of the bf16 peak)" if peak else "") +
          "; last column: eager relative to CoOp\n")
    print("| step | " + " | ".join(variants) + " | eager vs CoOp |")
    print("|---|" + "---|" * (len(variants) + 1))
    for label, row in times.items():
        cells = []
        for v in variants:
            t = row.get(v)
            share = f" ({100 * flops[label] / t / 1e12 / peak:.0f}%)" if label in flops and t else ""
            cells.append(f"{1e3 * t:.1f}{share}" if t else "–")
        ratio = row["eager"] / times["coop"]["eager"] if "eager" in row and "eager" in times["coop"] else None
        print(f"| {label} | " + " | ".join(cells) + (f" | {ratio:.2f}x |" if ratio else " | – |"))
    print("    " + "; ".join(f"{k}: {v}" for k, v in notes.items()))


def bench_davpt(model, autocast, device, *, repeats, batch):
    """DA-VPT's training step (prompted forward + Proxy-Anchor losses) against plain VPT-deep (same prompts, CE only)."""
    net = davpt.DAVPT(model, 16, davpt.DAVPTConfig(num_guided=10, num_other=10)).to(device)
    R = model.visual.input_resolution
    images, y = torch.randn(batch, 3, R, R, device=device), torch.arange(batch, device=device) % 16
    mapping = torch.arange(16, device=device) % net.M_g

    def step(metric):
        with autocast():
            feats, ml = net(images, mapping[y] if metric else None)
        loss = F.cross_entropy(net.logits(feats), y)
        if metric:
            loss = loss + sum(t + c for t, c in ml)
        net.zero_grad(set_to_none=True)
        loss.backward()
    return timeit(lambda: step(False), repeats, device), timeit(lambda: step(True), repeats, device)


def synthetic_jpegs(folder, size, n, seed=0):
    """n JPEG files of `size` (width, height) with the smooth structure of photographs (upsampled coarse noise plus
    fine grain), so that they decode like real ones; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.normal(0, 12, (size[1], size[0], 3))
        path = Path(folder) / f"{size[0]}x{size[1]}_{i}.jpg"
        Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def bench_store(model, autocast, device, n_images):
    """Seconds of a first evaluation through the feature store (hash the weights, encode, write) and of a second (read)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(tmp, (500, 375), 16)  # ImageNet-like size, decoded and resized as in an evaluation
        items = [data.Item(paths[i % 16], i % 10, f"class {i % 10}") for i in range(n_images)]
        transform = data.transform(model.visual.input_resolution, train=False)
        times = []
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            evaluation.stored_image_features(model, items, transform, dataset="bench", part="test",
                                             store=Path(tmp) / "store", device=device, autocast=autocast)
            sync(device)
            times.append(time.perf_counter() - start)
    return times


def protocol(args, device, autocast):
    """One seed of the base-to-new protocol with CoOp and CaPT's recipe, per dataset: a sample of real training
    steps (data loading and JPEG decoding included) and of test-image encodings, extrapolated to the real counts."""
    cpu = device == "cpu"
    variant = args.protocol_variant or ("eager" if cpu else "graph")
    n_steps, n_images = args.protocol_steps or (2 if cpu else 50), args.protocol_images or (16 if cpu else 1000)
    model = build("ViT-B/16", device, variant)
    print(f"\n## one seed of the base-to-new protocol: CoOp, {SHOTS} shots, batch {BATCH}, {EPOCHS} epochs, "
          f"ViT-B/16, {variant} step, workers {data.workers()}; sampled: {n_steps} steps, {n_images} test images "
          f"per dataset\n")
    with tempfile.TemporaryDirectory() as tmp:
        sd = {k: v.half() for k, v in model.state_dict().items()}  # OpenAI's checkpoints hold fp16 weights
        torch.save(sd, Path(tmp) / "clip.pt")
        del sd
        t = time.perf_counter()
        loaded, _ = clip.load(str(Path(tmp) / "clip.pt"), device=device)
        evaluation.model_fingerprint(loaded)  # once per run (the feature store's key)
        start = time.perf_counter() - t
        del loaded
        print(f"per run: load the checkpoint and hash the image encoder {start:.1f} s\n")
        print("| dataset | base / new classes | steps | ms / step | s / epoch start | train (s) | test images "
              "| ms / image | eval (s) | total (s) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        total, warm = 0.0, None
        for name in args.datasets:
            base, new, tests, size = PROTOCOL[name]
            jpegs = synthetic_jpegs(tmp, size, 32)
            steps = EPOCHS * (SHOTS * base // BATCH)  # the loader drops no batch here: 16 x base is a multiple of 4
            items = [data.Item(jpegs[i % len(jpegs)], i // SHOTS, f"class {i // SHOTS}") for i in range(SHOTS * base)]
            step_s, epoch_s, warm_s = sample_training(model, items, base, variant=variant, n_steps=n_steps,
                                                      autocast=autocast, device=device)
            warm = warm_s if warm is None else warm  # the first dataset's warm-up holds the compilation
            image_s, text_s = sample_evaluation(model, jpegs, (base, new), n_images=n_images, autocast=autocast,
                                                device=device)
            train, evaluate = steps * step_s + EPOCHS * epoch_s, tests * image_s + text_s
            total += start + train + evaluate
            print(f"| {name} | {base} / {new} | {steps:,} | {1e3 * step_s:.1f} | {epoch_s:.2f} | {train:,.0f} "
                  f"| {tests:,} | {1e3 * image_s:.2f} | {evaluate:,.0f} | {start + train + evaluate:,.0f} |")
    total += warm
    print(f"\nwarm-up steps of the first dataset (compilation, if any; counted once): {warm:.1f} s")
    print(f"one seed, {len(args.datasets)} datasets: {total:,.0f} s = {total / 60:.1f} min = {total / 3600:.2f} h "
          f"on {device_name(device)}")


def sample_training(model, items, C, *, variant, n_steps, autocast, device):
    """(seconds per training step in steady state, seconds each epoch adds: loader start and, for graphs, a capture;
    seconds of the eager warm-up steps, which hold the compilation)."""
    transform = data.transform(model.visual.input_resolution, train=True)
    batches = experiment.training_batches(model, items, transform, BATCH, seed=1, device=device, autocast=autocast)
    learner = coop.PromptLearner(model, class_names(C)).to(device)
    optimizer = sgd(learner)
    step = training_step(coop.step_loss, learner, model, optimizer, autocast=autocast, cuda_graph="graph" in variant)
    stream = itertools.chain.from_iterable(batches(epoch) for epoch in itertools.count())
    t = time.perf_counter()
    inputs, labels = next(stream)  # the loader's start: every epoch pays it again (no persistent workers)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(step.warmup if "graph" in variant else 1):  # eager steps (graphs: before the capture)
        step(inputs, labels)
        inputs, labels = next(stream)
    sync(device)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    step(inputs, labels)  # graphs capture here (and replay); every epoch (a new lr) captures again
    sync(device)
    capture = time.perf_counter() - t if "graph" in variant else 0.0
    t = time.perf_counter()
    for _ in range(n_steps):
        step(*next(stream))
    sync(device)
    per_step = (time.perf_counter() - t) / n_steps
    return per_step, first + max(0.0, capture - per_step), warm


def sample_evaluation(model, jpegs, classes, *, n_images, autocast, device):
    """(seconds per test image: decode, transform, encode in batches of 100 as evaluate does; seconds that do not
    grow with the test set: the loader's start for the base and the new test set, and their text features)."""
    transform = data.transform(model.visual.input_resolution, train=False)
    seconds = []
    for n in (1, n_images):  # two sizes: the slope is the cost per image, the rest the loader's start
        items = [data.Item(jpegs[i % len(jpegs)], 0, "class") for i in range(n)]
        sync(device)
        t = time.perf_counter()
        evaluation.stored_image_features(model, items, transform, dataset="bench", part="test", store=None,
                                         device=device, autocast=autocast)
        sync(device)
        seconds.append(time.perf_counter() - t)
    per_image = max(0.0, seconds[1] - seconds[0]) / (n_images - 1)
    t = time.perf_counter()
    for C in classes:
        learner = coop.PromptLearner(model, class_names(C)).to(device)
        with torch.no_grad():
            coop.text_features(model, learner, autocast)
    sync(device)
    return per_image, time.perf_counter() - t + 2 * max(0.0, seconds[0] - per_image)


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


def main(argv=None):
    args = parser.parse_args(argv)
    device, autocast = experiment.device_and_autocast(args.device, args.precision)
    precision = evaluation.precision_of(autocast)
    classes = args.classes or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = args.repeats or (1 if args.quick else 5)
    variants = args.variants.split(",") if args.variants else (VARIANTS if device == "cuda" else ["eager"])
    if any(v not in VARIANTS for v in variants) or (device != "cuda" and any("graph" in v for v in variants)):
        parser.error(f"--variants: choose from {VARIANTS} (graph variants need CUDA)")
    backbones = ["ViT-B/16"] if args.quick or device == "cpu" else ["ViT-B/16", "ViT-L/14"]
    print(f"device {device} ({device_name(device)}), precision {precision}, torch {torch.__version__}, "
          f"python {platform.python_version()}, threads {torch.get_num_threads()}, variants {', '.join(variants)}")
    if args.protocol:
        return protocol(args, device, autocast)
    peak = device_peak_tflops(device)
    sections = args.sections.split(",")
    if any(s not in ("text", "image", "methods", "store") for s in sections):
        parser.error(f"--sections: comma-separated, of text, image, methods, store (got {args.sections!r})")
    for name in backbones:
        print(f"\n## {name} (random weights)")
        model = build(name, device)
        compiled = build(name, device, "compile") if any("compile" in v for v in variants) else None
        if "methods" in sections:
            for C in classes:
                results = bench_methods({"eager": model, "compile": compiled}, C, variants, autocast=autocast,
                                        device=device, repeats=repeats, peak=peak)
                print_methods(C, variants, results, peak)
            batch = 8 if device == "cpu" else 32
            vpt, da = bench_davpt(model, autocast, device, repeats=repeats, batch=batch)
            print(f"\nDA-VPT step, batch {batch}: VPT-deep {1e3 * vpt:.0f} ms, DA-VPT {1e3 * da:.0f} ms ({da / vpt:.2f}x)")
        if "text" in sections:
            print("\ntext encoder forward + backward (frozen weights, the prompts need gradients); TFLOP/s counted as "
                  "2x the weight matmuls + 3x the attention matmuls of the forward (bench.text_flops)\n")
            print("| C | 77 tokens (ms) | truncated (ms) | T | speed-up | max |diff| | truncated |"
                  + (" compiled (ms) | compiled |" if compiled else ""))
            print("|---|---|---|---|---|---|---|" + ("---|---|" if compiled else ""))
        for C in classes if "text" in sections else []:
            row, diff = bench_text(model, C, autocast, device, repeats=repeats)
            (t_full, _), (t_trunc, T) = row["77 tokens"], row["truncated"]
            line = f"| {C} | {1e3 * t_full:.1f} | {1e3 * t_trunc:.1f} | {T} | {t_full / t_trunc:.2f}x | {diff:.1e} " \
                   f"| {rate(text_flops(model, T, C), t_trunc, peak)} |"
            if compiled:
                t_comp, _ = bench_text(compiled, C, autocast, device, repeats=repeats, truncated_only=True)[0]["truncated"]
                line += f" {1e3 * t_comp:.1f} | {rate(text_flops(model, T, C), t_comp, peak)} |"
            print(line)
        if "store" in sections:
            n = 64 if device == "cpu" else 2048
            first, second = bench_store(model, autocast, device, n)
            print(f"\nfeature store, {n} test images: first evaluation {first:.2f} s, second {second:.3f} s "
                  f"({first / second:.0f}x faster)")
        if "image" in sections:
            batch = 8 if device == "cpu" else 256
            ips = bench_image(model, autocast, device, repeats=repeats, batch=batch)
            print(f"\nimage encoder, batch {batch}: math {ips['math']:.1f} images/s, sdpa {ips['sdpa']:.1f} images/s")
        print(f"peak memory: {peak_memory_mb(device):.0f} MiB")
        del model, compiled
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
