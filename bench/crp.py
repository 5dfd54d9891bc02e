#!/usr/bin/env python3
"""Concept relevance (CRP) speed and memory: K conditional heatmaps against one plain heatmap, measured in one run.

    python bench/crp.py                   # VGG11 3x64x64 (as the CRP study), batch 1, K = 1, 8, 64 on features.16
    python bench/crp.py --reps 5 --layer features.3
    python bench/crp.py --memory          # peak memory growth of one call per K, each in a fresh process

Methods: `explain` (one plain heatmap: the baseline), the batched path `conditional_relevance` (one forward, one
backward down to the layer, one batched backward for all K conditions) and the same K conditions one at a time (a
loop of K calls: what a per-condition implementation costs). Reported: median time and the median over repeats of
(method time / plain time in the same repeat). zennit-crp is not compared here: it pins zennit<=0.4.6, which
conflicts with the zennit this project tests against.
"""
import argparse, json, os, statistics, subprocess, sys, time

import torch

from lrp_scratch.lrp import LRPModel, EpsilonPlusFlat
from lrp_scratch.crp import conditional_relevance
from lrp_scratch.models import VGG


def setup(layer):
    torch.manual_seed(0)
    model = VGG('A', n_classes=10, input_size=64).eval()
    x = torch.rand(1, 3, 64, 64)
    lrp = LRPModel(model, composite=EpsilonPlusFlat())
    n = dict(model.named_modules())[layer].out_channels
    return lrp, x, n


def methods(lrp, x, layer, ks):
    out = {"plain explain": lambda: lrp.explain(x, target=0)[0]}
    for k in ks:
        conds = [{layer: [c]} for c in range(k)]
        out[f"batched K={k}"] = lambda conds=conds: conditional_relevance(lrp, x, 0, conds)[0]
        out[f"loop K={k}"] = lambda conds=conds: [conditional_relevance(lrp, x, 0, c)[0] for c in conds]
    return out


def run_speed(layer, ks, reps):
    lrp, x, n = setup(layer)
    ks = [k for k in ks if k <= n]
    fs = methods(lrp, x, layer, ks)
    for f in fs.values(): f()  # warm up
    times = {name: [] for name in fs}
    ratios = {name: [] for name in fs}
    for rep in range(reps):
        names = list(fs)[rep % len(fs):] + list(fs)[:rep % len(fs)]
        got = {}
        for name in names:
            t = time.perf_counter(); fs[name](); got[name] = time.perf_counter() - t
        for name in fs:
            times[name].append(got[name]); ratios[name].append(got[name] / got["plain explain"])
    print(f"VGG11 3x64x64, batch 1, conditions on `{layer}` ({n} channels), {reps} repeats, {torch.get_num_threads()} threads")
    print(f"| method | median s | x plain |\n|---|---:|---:|")
    rows = []
    for name in fs:
        t, r = statistics.median(times[name]), statistics.median(ratios[name])
        rows.append(dict(method=name, seconds=t, ratio=r))
        print(f"| {name} | {t:.3f} | {r:.2f} |")
    return rows


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"): return int(line.split()[1]) / 1024


def memory_child(layer, k):
    lrp, x, n = setup(layer)
    lrp.explain(x, target=0)  # parameters cached, one call done: what stays is not per call
    base = rss_mib()
    if k == 0: lrp.explain(x, target=0)
    else: conditional_relevance(lrp, x, 0, [{layer: [c]} for c in range(k)])
    print(json.dumps(dict(k=k, growth_mib=rss_mib() - base)))


def run_memory(layer, ks):
    print(f"peak RSS growth of one call, each in a fresh process (VGG11 3x64x64, `{layer}`)")
    print("| call | MiB |\n|---|---:|")
    for k in [0] + list(ks):
        p = subprocess.run([sys.executable, __file__, "--child", str(k), "--layer", layer], capture_output=True, text=True, timeout=600)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"| {'plain explain' if k == 0 else f'batched K={k}'} | {r['growth_mib']:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="features.16")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    if a.child is not None: return memory_child(a.layer, a.child)
    if a.memory: return run_memory(a.layer, a.k)
    run_speed(a.layer, a.k, a.reps)


if __name__ == "__main__":
    main()
