#!/usr/bin/env python3
"""Compiled kernels vs their pure-PyTorch formulations, timed in the same run; and the LRP profile.

    python bench/kernels.py [--op all|stabilized_div|relevance_filter|filtered_stabilized_div|mul_sum_channels]
                            [--device cpu|cuda] [--reps 30] [--threads N] [--dtype float32]
    python bench/kernels.py [--isa portable|avx2|avx512]  # the filter's hand-vectorised loops with this instruction set
    python bench/kernels.py --profile [--threads N] [--case classic]  # torch.profiler on LRP: reference path vs kernels
    python bench/kernels.py --cores [--threads N]  # each kernel on all threads vs one: cores busy, speed-up

One table per op. For each size (tensors that occur in LRP on VGG16 at 224x224 and VGG11 at 32x32), the
implementations are timed interleaved (kernel, baseline, ..., kernel, ...) and the medians compared:
ratio = baseline time / kernel time (> 1: the kernel is faster). Baselines:
- stabilized_div: the reference `stabilized_div_ref`, and `floor` = `num / (den + eps)` (two ops, no sign, no zero
  guard: not a correct replacement, a lower bound for any PyTorch formulation).
- relevance_filter: `topk+scatter` = `topk` + `zeros_like` + `scatter` (the fastest PyTorch formulation; its ties are
  unspecified, so it is a lower bound), and the exact reference `relevance_filter_ref`. k = 2% of a sample (top_k=0.02).
- filtered_stabilized_div: `topk+scatter` then `stabilized_div_ref` (the pure-PyTorch floor), the exact reference, and
  the two compiled kernels one after the other (`unfused`: what fusing itself saves).
- mul_sum_channels: `(a*c).sum(1)` (the reference) and `einsum`.
`--cores`: CPU time over wall time while each kernel runs (about 1 on one thread, about the thread count when the
work is split across all cores) and the wall-time speed-up over one thread, beside the number of threads the kernel's
tasks ran on (`threads_used`, counted by the kernels: the tests check that count, this measures what it buys).
The relevance is random with half of it exactly 0 (as after a ReLU). Absolute times are only indicative on a
shared CPU machine; the ratios are what to read.
"""
import argparse, statistics, time
from contextlib import ExitStack

import torch

import lrp_scratch.kernels as K
from lrp_scratch.kernels import CPU_ISAS, build_info, cpu_isa, kernels_active, reference_kernels, use_cuda_kernels

VGG_SIZES = {  # name: shape (batch, channels, height, width)
    "vgg16-224 conv1_2 out, bs 1": (1, 64, 224, 224),
    "vgg16-224 conv1_2 out, bs 8": (8, 64, 224, 224),
    "vgg16-224 conv3_3 out, bs 8": (8, 256, 56, 56),
    "vgg16-224 conv5_3 out, bs 8": (8, 512, 14, 14),
    "vgg11-32 conv1 out, bs 64": (64, 64, 32, 32),
    "vgg11-32 conv5 out, bs 64": (64, 512, 4, 4),
    "vgg11-32 conv8 out, bs 64": (64, 512, 2, 2),
    "vgg11-32 classifier, bs 64": (64, 4096),
}
INPUT_SIZES = {  # the first layer's input: where LRPModel.forward sums the relevance over channels
    "vgg16-224 input, bs 1": (1, 3, 224, 224),
    "vgg16-224 input, bs 8": (8, 3, 224, 224),
    "vgg11-32 input, bs 64": (64, 3, 32, 32),
    "vgg11-32 conv1 out, bs 64": (64, 64, 32, 32),
}


def timeit(f, sync):
    sync(); t0 = time.perf_counter(); f(); sync()
    return time.perf_counter() - t0


def bench(fs, reps, sync):
    "Median time of each function in `fs`, timed interleaved."
    for _ in range(2):
        for f in fs: f()
    ts = [[] for _ in fs]
    for _ in range(reps):
        for t, f in zip(ts, fs): t.append(timeit(f, sync))
    return [statistics.median(t) for t in ts]


def reps_for(numel, reps):
    "Fewer repeats for the largest sizes (their baselines take a good fraction of a second)."
    return max(5, min(reps, int(reps * 2e6 / max(numel, 1)))) if numel > 2e6 else reps


def table(title, cols, rows, gm):
    print(f"\n{title}")
    print(f"{'size':30} {'elements':>10} " + " ".join(f"{c:>12}" for c in cols))
    for label, n, vals in rows: print(f"{label:30} {n:>10} " + " ".join(f"{v:>12}" for v in vals))
    print("geometric mean: " + ", ".join(f"{statistics.geometric_mean(v):.2f}x {name}" for name, v in gm.items()))


def topk_scatter(r, k):
    flat = r.reshape(r.shape[0], -1)
    v, i = flat.topk(k, dim=1, sorted=False)
    return torch.zeros_like(flat).scatter_(1, i, v).reshape(r.shape)


def relevance(shape, g, dev, dtype):
    r = torch.randn(shape, generator=g, device=dev).relu_() * torch.rand(shape, generator=g, device=dev)
    return r.to(dtype)


def run_stabilized_div(a, dev, dtype, sync, g):
    rows, ratios, floors = [], [], []
    for label, shape in VGG_SIZES.items():
        n = torch.randn(shape, generator=g, device=dev).to(dtype)
        d = torch.randn(shape, generator=g, device=dev).to(dtype)
        tk, tr, tf = bench([lambda: K.stabilized_div(n, d, 1e-6), lambda: K.stabilized_div_ref(n, d, 1e-6),
                            lambda: torch.div(n, d + 1e-6)], reps_for(n.numel(), a.reps), sync)
        ratios.append(tr / tk); floors.append(tf / tk)
        rows.append((label, n.numel(), [f"{tk*1e3:.3f}", f"{tr*1e3:.3f}", f"{tf*1e3:.3f}", f"{tr/tk:.2f}x", f"{tf/tk:.2f}x"]))
    table("stabilized_div (ms; ratio = baseline / kernel)", ["kernel", "reference", "floor", "vs ref", "vs floor"],
          rows, {"vs the reference": ratios, "vs the floor": floors})


def run_relevance_filter(a, dev, dtype, sync, g):
    rows, r_topk, r_ref = [], [], []
    for label, shape in VGG_SIZES.items():
        r = relevance(shape, g, dev, dtype)
        k = max(1, int(0.02 * r[0].numel()))
        tk, tt, tr = bench([lambda: K.relevance_filter(r, k), lambda: topk_scatter(r, k), lambda: K.relevance_filter_ref(r, k)],
                           reps_for(r.numel(), a.reps), sync)
        r_topk.append(tt / tk); r_ref.append(tr / tk)
        rows.append((label, r.numel(), [f"{k}", f"{tk*1e3:.3f}", f"{tt*1e3:.3f}", f"{tr*1e3:.3f}", f"{tt/tk:.2f}x", f"{tr/tk:.2f}x"]))
    table("relevance_filter, k = 2% per sample (ms; ratio = baseline / kernel; target >= 3x vs topk+scatter)",
          ["k", "kernel", "topk+scatter", "reference", "vs topk", "vs ref"], rows,
          {"vs topk+scatter": r_topk, "vs the reference": r_ref})


def run_filtered_stabilized_div(a, dev, dtype, sync, g):
    rows, r_floor, r_ref, r_unf = [], [], [], []
    for label, shape in VGG_SIZES.items():
        r = relevance(shape, g, dev, dtype)
        z = torch.randn(shape, generator=g, device=dev).to(dtype)
        k = max(1, int(0.02 * r[0].numel()))
        fs = [lambda: K.filtered_stabilized_div(r, z, 1e-6, k),
              lambda: K.stabilized_div_ref(topk_scatter(r, k), z, 1e-6),
              lambda: K.filtered_stabilized_div_ref(r, z, 1e-6, k),
              lambda: K.stabilized_div(K.relevance_filter(r, k), z, 1e-6)]
        tk, tf, tr, tu = bench(fs, reps_for(r.numel(), a.reps), sync)
        r_floor.append(tf / tk); r_ref.append(tr / tk); r_unf.append(tu / tk)
        rows.append((label, r.numel(), [f"{tk*1e3:.3f}", f"{tf*1e3:.3f}", f"{tr*1e3:.3f}", f"{tu*1e3:.3f}",
                                        f"{tf/tk:.2f}x", f"{tr/tk:.2f}x", f"{tu/tk:.2f}x"]))
    table("filtered_stabilized_div, k = 2% (ms; ratio = baseline / kernel; target >= 2x vs PyTorch)",
          ["fused", "topk+div", "reference", "unfused", "vs topk+div", "vs ref", "vs unfused"], rows,
          {"vs topk+scatter+div": r_floor, "vs the reference": r_ref, "vs the two kernels": r_unf})


def run_mul_sum_channels(a, dev, dtype, sync, g):
    rows, r_ref, r_ein = [], [], []
    for label, shape in INPUT_SIZES.items():
        x = torch.randn(shape, generator=g, device=dev).to(dtype)
        c = torch.randn(shape, generator=g, device=dev).to(dtype)
        tk, tr, te = bench([lambda: K.mul_sum_channels(x, c), lambda: (x * c).sum(1),
                            lambda: torch.einsum("nchw,nchw->nhw", x, c)], reps_for(x.numel(), a.reps), sync)
        r_ref.append(tr / tk); r_ein.append(te / tk)
        rows.append((label, x.numel(), [f"{tk*1e3:.3f}", f"{tr*1e3:.3f}", f"{te*1e3:.3f}", f"{tr/tk:.2f}x", f"{te/tk:.2f}x"]))
    table("mul_sum_channels (ms; ratio = baseline / kernel; target >= 2x)", ["kernel", "(a*c).sum(1)", "einsum", "vs ref", "vs einsum"],
          rows, {"vs (a*c).sum(1)": r_ref, "vs einsum": r_ein})


OPS = {"stabilized_div": run_stabilized_div, "relevance_filter": run_relevance_filter,
       "filtered_stabilized_div": run_filtered_stabilized_div, "mul_sum_channels": run_mul_sum_channels}


def run_cores(a):
    "Each CPU kernel with all of torch's threads and with one: threads used, cores busy (CPU time / wall time), speed-up."
    from lrp_scratch.kernels import threads_used
    g = torch.Generator().manual_seed(0)
    shape = VGG_SIZES["vgg11-32 conv1 out, bs 64"]
    r, z = relevance(shape, g, "cpu", torch.float32), torch.randn(shape, generator=g)
    k = max(1, int(0.02 * r[0].numel()))
    calls = {"stabilized_div": lambda: K.stabilized_div(z, r, 1e-6), "relevance_filter": lambda: K.relevance_filter(r, k),
             "filtered_stabilized_div": lambda: K.filtered_stabilized_div(r, z, 1e-6, k),
             "mul_sum_channels": lambda: K.mul_sum_channels(r, z)}
    n_all = torch.get_num_threads()

    def measure(f, reps):
        for _ in range(2): f()
        best = None
        for _ in range(5):  # best of 5 (the least disturbed by other jobs)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps): f()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            best = (w, c) if best is None or w < best[0] else best
        return best[0] / reps, best[1] / best[0]

    print(f"\ncores: {shape} float32, {n_all} threads vs 1, best of 5 runs of {a.reps} calls; cores busy = CPU time / wall time")
    print(f"{'op':26} {'threads':>8} {'used':>5} {'wall ms':>9} {'cores busy':>11} {'speed-up':>9}")
    for name, f in calls.items():
        rows = {}
        for n in sorted({n_all, 1}, reverse=True):
            torch.set_num_threads(n)
            try: rows[n] = (threads_used(f),) + measure(f, a.reps)
            finally: torch.set_num_threads(n_all)
        for n, (used, wall, busy) in rows.items():
            print(f"{name:26} {n:>8} {used:>5} {wall*1e3:>9.3f} {busy:>11.2f} {rows[1][1] / wall:>8.2f}x")


def profile_lrp(a):
    "Self CPU time of the top ops of LRP, on the pure-PyTorch reference path and with the compiled kernels."
    import torchvision
    from torch.profiler import ProfilerActivity, profile
    import lrp_scratch.lrp as L
    from lrp_scratch.models import VGG11

    torch.manual_seed(0)
    vgg16 = torchvision.models.vgg16().eval()
    cases = {"VGG16 224x224, batch 2, classic(), top_k=0.02":
             (L.LRPModel(vgg16, composite=L.classic(), top_k=0.02), torch.rand(2, 3, 224, 224)),
             "VGG16 224x224, batch 2, EpsilonPlusFlat()":
             (L.LRPModel(vgg16, composite=L.EpsilonPlusFlat()), torch.rand(2, 3, 224, 224)),
             "VGG11 32x32, batch 64, EpsilonPlusFlat()":
             (L.LRPModel(VGG11(n_classes=10).eval(), composite=L.EpsilonPlusFlat()), torch.rand(64, 3, 32, 32))}
    for name, (lrp, x) in cases.items():
        if a.case and a.case not in name: continue
        for variant, ref in (("reference path (pure PyTorch)", True), ("compiled kernels", False)):
            with reference_kernels(ref):
                lrp(x)  # warm up (parameter cache)
                walls = []
                for _ in range(a.walls):
                    t0 = time.perf_counter(); lrp(x); walls.append(time.perf_counter() - t0)
                with profile(activities=[ProfilerActivity.CPU]) as p: lrp(x)
            print(f"\n{name}: {variant}; LRPModel(...)(x) wall time {statistics.median(walls):.3f} s (median of {a.walls}), "
                  f"{torch.get_num_threads()} threads")
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="all", choices=["all", *OPS])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    ap.add_argument("--profile", action="store_true", help="profile LRP (VGG16 classic top_k=0.02 and EpsilonPlusFlat, VGG11 EpsilonPlusFlat): reference path vs kernels")
    ap.add_argument("--rows", type=int, default=15, help="rows of each profile table")
    ap.add_argument("--case", default="", help="profile only the cases whose name contains this (e.g. classic)")
    ap.add_argument("--walls", type=int, default=3, help="timed calls per profile case (median wall time)")
    ap.add_argument("--cores", action="store_true", help="each CPU kernel on all threads vs one: threads used, cores busy, speed-up")
    ap.add_argument("--isa", default=None, choices=list(CPU_ISAS),
                    help="instruction set of the hand-vectorised CPU loops (default: the widest this CPU has)")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    if a.profile: return profile_lrp(a)
    with ExitStack() as stack:
        if a.isa: stack.enter_context(cpu_isa(a.isa))
        if a.cores: return run_cores(a)
        run_ops(a)


def run_ops(a):
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if dev.type == "cuda": use_cuda_kernels(True)  # opt-in in the package until measured: this measures them
    if not kernels_active(dev): raise SystemExit(f"no compiled kernel for {dev}: {build_info()}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    if dev.type == "cpu": name += f", {build_info()['cpu_isa']} loops"
    print(f"{a.dtype}, {name}, torch {torch.__version__}, median of up to {a.reps} interleaved repeats")
    for op, run in OPS.items():
        if a.op in ("all", op):
            if not kernels_active(dev, op): print(f"\n{op}: no compiled kernel for {dev}, skipped"); continue
            run(a, dev, dtype, sync, torch.Generator(device=dev).manual_seed(0))


if __name__ == "__main__":
    main()
