#!/usr/bin/env python3
"""Compiled kernels vs their pure-PyTorch references, timed in the same run.

    python bench/kernels.py [--device cpu|cuda] [--reps 30] [--threads N]

For each op and size (sizes of tensors that occur in LRP on VGG16 at 224x224 and VGG11 at 32x32), the two
implementations are timed interleaved (kernel, reference, kernel, ...) and the medians compared:
ratio = reference time / kernel time (> 1: the kernel is faster). A second baseline, `floor`, is the cheapest
PyTorch expression of the same shape of work, `num / (den + eps)` (two ops, no sign, no zero guard: not a
correct replacement, a lower bound for any PyTorch formulation). Absolute times are only indicative on a
shared CPU machine; the ratios are what to read.
"""
import argparse, statistics, time

import torch

from lrp_scratch.kernels import build_info, stabilized_div, stabilized_div_ref, kernels_active

SIZES = {  # name: shape (batch, channels, height, width)
    "vgg16-224 conv1_2 out, bs 1": (1, 64, 224, 224),
    "vgg16-224 conv3_3 out, bs 8": (8, 256, 56, 56),
    "vgg16-224 conv5_3 out, bs 8": (8, 512, 14, 14),
    "vgg11-32 conv1 out, bs 64": (64, 64, 32, 32),
    "vgg11-32 conv5 out, bs 64": (64, 512, 4, 4),
    "vgg11-32 classifier, bs 64": (64, 4096),
}


def timeit(f, sync):
    sync(); t0 = time.perf_counter(); f(); sync()
    return time.perf_counter() - t0


def bench(fs, reps, sync):
    "Median time of each function in `fs`, timed interleaved."
    for _ in range(3):
        for f in fs: f()
    ts = [[] for _ in fs]
    for _ in range(reps):
        for t, f in zip(ts, fs): t.append(timeit(f, sync))
    return [statistics.median(t) for t in ts]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if not kernels_active(dev): raise SystemExit(f"no compiled kernel for {dev}: {build_info()}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"stabilized_div, {a.dtype}, {name}, torch {torch.__version__}, median of {a.reps}")
    print(f"{'size':32} {'elements':>10} {'kernel ms':>10} {'ref ms':>10} {'floor ms':>10} {'ratio':>7} {'vs floor':>9}")
    ratios, floors = [], []
    g = torch.Generator(device=dev).manual_seed(0)
    for label, shape in SIZES.items():
        n = torch.randn(shape, generator=g, device=dev).to(dtype)
        d = torch.randn(shape, generator=g, device=dev).to(dtype)
        tk, tr, tf = bench([lambda: stabilized_div(n, d, 1e-6), lambda: stabilized_div_ref(n, d, 1e-6),
                            lambda: torch.div(n, d + 1e-6)], a.reps, sync)
        ratios.append(tr / tk); floors.append(tf / tk)
        print(f"{label:32} {n.numel():>10} {tk*1e3:>10.3f} {tr*1e3:>10.3f} {tf*1e3:>10.3f} {tr/tk:>6.2f}x {tf/tk:>8.2f}x")
    print(f"geometric mean: {statistics.geometric_mean(ratios):.2f}x vs the reference, "
          f"{statistics.geometric_mean(floors):.2f}x vs the floor (baseline time / kernel time)")


if __name__ == "__main__":
    main()
