#!/usr/bin/env python3
"""Hand-written optimizers (lrp_scratch.optimizers) vs torch.optim, one step on VGG11's parameters, same run.

    python bench/optim.py [--device cpu|cuda] [--reps 20] [--threads N] [--model ours|torchvision] [--sweep]

The parameters of VGG11 (10 classes; `lrp_scratch.models.VGG11` when it imports, else torchvision's `vgg11`)
get random gradients once. For SGD with momentum, Adam, AdamW and RMSprop, these step functions are timed
interleaved (one call of each per round, the order rotating between rounds), after a warm-up that creates the
optimizer state, and their medians compared:

    torch foreach   torch.optim.<Opt>(..., foreach=True)    the baseline
    ours foreach    lrp_scratch.optimizers.<Opt>(..., foreach=True)
    ours auto       lrp_scratch.optimizers.<Opt>(...)        foreach=None: the automatic choice
    torch default   torch.optim.<Opt>(...)                   for reference (on the CPU torch picks its loop)

ratio = ours time / torch foreach time (< 1: ours is faster; the target is <= 1.15), taken per round (the two
calls of a round run back to back, under the same machine load) and then the median over rounds. All variants
update the same parameter tensors (each keeps its own state), so they do the same work on the same memory.

`--sweep` instead times our loop path against our foreach path on 32 tensors of growing size (the measurement
behind `CPU_FOREACH_MAX_NUMEL`, the size up to which the automatic choice uses foreach on the CPU); ratio =
loop time / foreach time (> 1: foreach is faster).
"""
import argparse, statistics, time

import torch

from lrp_scratch import optimizers as ours

CONFIGS = {  # name: (our class, torch class, hyper-parameters)
    "SGD momentum": (ours.SGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "Adam": (ours.Adam, torch.optim.Adam, dict(lr=1e-3)),
    "AdamW": (ours.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "RMSprop": (ours.RMSprop, torch.optim.RMSprop, dict(lr=1e-3)),
}


def vgg11(which):
    "VGG11 with 10 classes, and where it came from."
    if which in ("ours", "auto"):
        try:
            from lrp_scratch.models import VGG11
            return VGG11(n_classes=10), "lrp_scratch.models.VGG11(n_classes=10)"
        except ImportError as e:
            if which == "ours": raise
            why = f" (lrp_scratch.models.VGG11 not importable: {e})"
    else: why = ""
    import torchvision
    return torchvision.models.vgg11(num_classes=10), "torchvision.models.vgg11(num_classes=10)" + why


def bench(fs, reps, sync):
    "Seconds per call of each function in `fs` in each round, timed interleaved with a rotating order."
    for f in fs: f(); f()
    sync()
    ts = [[] for _ in fs]
    for r in range(reps):
        for j in range(len(fs)):
            i = (j + r) % len(fs)
            sync(); t0 = time.perf_counter(); fs[i](); sync()
            ts[i].append(time.perf_counter() - t0)
    return ts


def median_ratio(a, b):
    "Median over rounds of a[r] / b[r]."
    return statistics.median(x / y for x, y in zip(a, b))


def main_vgg(a, dev, sync):
    model, source = vgg11(a.model)
    params = [p for p in model.to(dev).parameters() if p.requires_grad]
    g = torch.Generator(device=dev).manual_seed(0)
    for p in params: p.grad = torch.randn(p.shape, generator=g, device=dev) * 1e-2
    n = sum(p.numel() for p in params)
    print(f"model: {source}: {n:,} parameters in {len(params)} tensors")
    print(f"{'optimizer':14} {'torch foreach':>14} {'ours foreach':>13} {'ours auto':>10} {'torch default':>14} "
          f"{'foreach ratio':>14} {'auto ratio':>11}   (ms, median of {a.reps} rounds; ratio = ours / torch foreach, median of per-round ratios)")
    worst = 0.
    for name, (cls, tcls, kw) in CONFIGS.items():
        opts = [tcls(params, foreach=True, **kw), cls(params, foreach=True, **kw), cls(params, **kw), tcls(params, **kw)]
        ts = bench([o.step for o in opts], a.reps, sync)
        t_torch, t_fe, t_auto, t_tdef = map(statistics.median, ts)
        r_fe, r_auto = median_ratio(ts[1], ts[0]), median_ratio(ts[2], ts[0])
        worst = max(worst, r_fe, r_auto)
        print(f"{name:14} {t_torch*1e3:14.2f} {t_fe*1e3:13.2f} {t_auto*1e3:10.2f} {t_tdef*1e3:14.2f} "
              f"{r_fe:13.2f}x {r_auto:10.2f}x")
        del opts
    print(f"worst ratio ours / torch foreach: {worst:.2f}x (target <= 1.15x)")


def main_sweep(a, dev, sync):
    print(f"our loop vs our foreach path, 32 tensors of each size (ms, median of {a.reps}; ratio = loop / foreach, > 1: foreach faster)")
    print(f"{'elements':>9} " + " ".join(f"{name:>22}" for name in CONFIGS))
    for size in (256, 4096, 8192, 16384, 32768, 131072, 524288):
        ps = [torch.zeros(size, device=dev, requires_grad=True) for _ in range(32)]
        for p in ps: p.grad = torch.randn_like(p) * 1e-2
        cells = []
        for cls, _, kw in CONFIGS.values():
            ts = bench([cls(ps, foreach=False, **kw).step, cls(ps, foreach=True, **kw).step], a.reps, sync)
            t_loop, t_fe = map(statistics.median, ts)
            cells.append(f"{t_loop*1e3:6.3f}/{t_fe*1e3:6.3f} {median_ratio(*ts):5.2f}x")
        print(f"{size:>9} " + " ".join(f"{c:>22}" for c in cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--model", default="auto", choices=["auto", "ours", "torchvision"],
                    help="auto: lrp_scratch.models.VGG11 if it imports, else torchvision's vgg11")
    ap.add_argument("--sweep", action="store_true", help="time our loop vs foreach paths over tensor sizes instead")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"optimizer step, float32, {where}, torch {torch.__version__}")
    (main_sweep if a.sweep else main_vgg)(a, dev, sync)


if __name__ == "__main__":
    main()
