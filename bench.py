"""Benchmark nanoprompt's hot paths on the current device, with random weights at real sizes (like nanoGPT's bench.py).

What it measures (a table per section, plus device, dtype and versions):
  1. text encoder forward+backward over C class prompts, full 77 tokens vs truncated to the longest prompt,
     with the max difference of the features (the truncation is exact, so this is rounding only);
  2. image-encoder evaluation throughput (images/s) with each attention path (plain math vs torch SDPA);
  3. peak memory, and on CUDA the achieved TFLOP/s and its fraction of the device's dense bf16 peak.

    python bench.py                # ViT-B/16 (and ViT-L/14 on a GPU), C in {10, 100, 1000}
    python bench.py --quick        # CPU-sized: ViT-B/16, C in {10, 100}, about a minute on 2 cores

Random weights give the same timings as OpenAI's (the arithmetic does not depend on the values).
"""
import argparse
import platform
import resource
import time

import torch

import clip
from clip.model import CLIP, set_sdpa

# OpenAI's sizes: embed_dim, image_resolution, vision_layers, vision_width, patch, context, vocab, text width/heads/layers
SIZES = {
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0}  # dense, no sparsity

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="CPU-sized run: ViT-B/16 only, C in {10, 100}, fewer repeats")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="autocast dtype of the frozen encoders (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--classes", type=int, nargs="+", default=None, help="class counts C (default 10 100 1000)")
parser.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (default 5, --quick 2)")


def timeit(fn, repeats, device):
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
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


def class_prompts(C):
    """C prompts 'a photo of a <name>.' with names of varied length (1-4 words), tokenized to (C, 77)."""
    words = ["red", "striped", "small", "mountain", "bike", "tabby", "cat", "sea", "plane", "oak"]
    names = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 4)) for i in range(C)]
    return clip.tokenize([f"a photo of a {n}." for n in names])


def text_flops(model, T, C):
    """Matmul FLOPs of the text transformer's forward for C prompts of T tokens (x3 for forward+backward)."""
    D, L = model.transformer.width, model.transformer.layers
    per_layer = 2 * C * T * (12 * D * D) + 2 * 2 * C * T * T * D  # qkv/out/mlp matmuls + attention scores/values
    return L * per_layer


def bench_text(model, C, autocast, device, repeats):
    tokens = class_prompts(C).to(device)
    eot = tokens.argmax(-1)
    # The prompt embeddings require grad, as a learned context would: the backward pass runs through every layer.
    emb = model.token_embedding(tokens).detach().requires_grad_(True)  # (C, 77, D)
    row = {}
    for name, T in [("77 tokens", tokens.shape[1]), ("truncated", int(eot.max()) + 1)]:
        def step():
            with autocast():
                feats = model.encode_token_embeddings(emb[:, :T], eot)
            feats.float().pow(2).sum().backward()
            return feats
        row[name] = (timeit(step, repeats, device), T)
    with torch.no_grad(), autocast():
        full = model.encode_text(tokens, truncate=False).float()
        trunc = model.encode_text(tokens, truncate=True).float()
    return row, (full - trunc).abs().max().item()


def bench_image(model, autocast, device, repeats, batch):
    images = torch.randn(batch, 3, model.visual.input_resolution, model.visual.input_resolution, device=device)
    out = {}
    for path, enabled in [("math", False), ("sdpa", True)]:
        set_sdpa(model, enabled)
        with torch.no_grad():
            def run():
                with autocast():
                    return model.encode_image(images)
            out[path] = batch / timeit(run, repeats, device)
    return out


def main(argv=None):
    args = parser.parse_args(argv)
    device = args.device
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = lambda: torch.autocast(device, dtype=dtype, enabled=precision != "fp32")  # noqa: E731
    classes = args.classes or ([10, 100] if args.quick else [10, 100, 1000])
    repeats = args.repeats or (1 if args.quick else 5)
    backbones = ["ViT-B/16"] if args.quick or device == "cpu" else ["ViT-B/16", "ViT-L/14"]
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}), "
          f"precision {precision}, torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}")
    peak = device_peak_tflops(device)
    for name in backbones:
        torch.manual_seed(0)
        model = CLIP(*SIZES[name]).to(device).eval().requires_grad_(False)
        print(f"\n## {name} (random weights)\n")
        print("| C | 77 tokens (ms) | truncated (ms) | T | speed-up | max |diff| | TFLOP/s (truncated) |")
        print("|---|---|---|---|---|---|---|")
        for C in classes:
            row, diff = bench_text(model, C, autocast, device, repeats)
            (t_full, _), (t_trunc, T) = row["77 tokens"], row["truncated"]
            tflops = 3 * text_flops(model, T, C) / t_trunc / 1e12
            util = f" ({100 * tflops / peak:.0f}% of peak)" if peak else ""
            print(f"| {C} | {1e3 * t_full:.1f} | {1e3 * t_trunc:.1f} | {T} | {t_full / t_trunc:.2f}x | {diff:.1e} "
                  f"| {tflops:.2f}{util} |")
        batch = 8 if device == "cpu" else 256
        ips = bench_image(model, autocast, device, repeats, batch)
        print(f"\nimage encoder, batch {batch}: math {ips['math']:.1f} images/s, sdpa {ips['sdpa']:.1f} images/s")
        print(f"peak memory: {peak_memory_mb(device):.0f} MiB")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
