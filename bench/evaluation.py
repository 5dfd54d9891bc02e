#!/usr/bin/env python3
"""Pixel flipping speed: `lrp_scratch.evaluation.pixel_flipping` (all images and steps batched) against the loops people
usually write, measured in one run.

    python bench/evaluation.py                 # VGG11 (3x32x32), 32 images, 16 steps of 2x2 patches
    python bench/evaluation.py --threads 1 --reps 5 --images 16 --batch-size 64

Baselines, timed in the same run and in a rotated order each repeat:
  per (image, step): one forward pass of one perturbed image per step (the textbook loop);
  per image:         one forward pass per image, of its steps+1 perturbed copies stacked.
Reported: the median time of each, and the median over repeats of (baseline time / batched time) in the same repeat
(> 1: the batched version is faster). The curves of the three are checked to agree before timing.
"""
import argparse, statistics, time

import torch

from lrp_scratch.evaluation import pixel_flipping, patch_relevance, removal_ranks
from lrp_scratch.models import VGG11


def loop_per_image_step(model, x, rel, t, steps, fraction, p, base):
    "One forward per (image, step)."
    n, _, h, w = x.shape
    pr = patch_relevance(rel, p).flatten(1)
    P = pr.shape[1]
    n_remove = round(fraction * P)
    out = torch.empty(n, steps + 1)
    with torch.no_grad():
        for i in range(n):
            order = torch.sort(pr[i], descending=True, stable=True).indices
            for k in range(steps + 1):
                xi = x[i].clone()
                for q in order[: k * n_remove // steps].tolist():  # the patches removed so far
                    r, c = divmod(q, w // p)
                    xi[:, r * p:(r + 1) * p, c * p:(c + 1) * p] = base
                out[i, k] = model(xi[None])[0, t[i]]
    return out


def loop_per_image(model, x, rel, t, steps, fraction, p, base):
    "One forward per image, its steps+1 perturbed copies in one batch (masks built with tensor ops)."
    n, _, h, w = x.shape
    pr = patch_relevance(rel, p).flatten(1)
    P = pr.shape[1]
    counts = torch.arange(steps + 1) * round(fraction * P) // steps
    ranks = removal_ranks(pr)
    out = torch.empty(n, steps + 1)
    with torch.no_grad():
        for i in range(n):
            mask = (ranks[i][None] < counts[:, None]).view(-1, 1, h // p, w // p)
            mask = mask.repeat_interleave(p, 2).repeat_interleave(p, 3)
            out[i] = model(torch.where(mask, torch.full_like(x[i], base), x[i]))[:, t[i]]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=32)
    ap.add_argument('--steps', type=int, default=16)
    ap.add_argument('--patch', type=int, default=2)
    ap.add_argument('--fraction', type=float, default=0.5)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--width', type=float, default=1.0, help='VGG11 width multiplier')
    ap.add_argument('--batch-size', type=int, default=256, help="pixel_flipping's (image, step) pairs per forward pass")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VGG11(n_classes=10, batch_norm=True, width=args.width, seed=0).eval()
    x = torch.randn(args.images, 3, 32, 32)
    rel = torch.randn_like(x)
    with torch.no_grad(): t = model(x).argmax(1)
    base = -0.5
    kw = dict(steps=args.steps, fraction=args.fraction, p=args.patch, base=base)
    fns = {
        'batched (pixel_flipping)': lambda: pixel_flipping(model, x, rel, t, steps=args.steps, fraction=args.fraction, patch_size=args.patch,
                                                           baseline=base, random_baseline=False, batch_size=args.batch_size).curves,
        'loop per image': lambda: loop_per_image(model, x, rel, t, **kw),
        'loop per (image, step)': lambda: loop_per_image_step(model, x, rel, t, **kw),
    }
    ref = fns['batched (pixel_flipping)']()
    for k, f in fns.items():
        torch.testing.assert_close(f(), ref, atol=1e-4, rtol=1e-4)
    names = list(fns)
    times = {k: [] for k in names}
    for rep in range(args.reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter(); fns[k](); times[k].append(time.perf_counter() - t0)
    n_fwd = args.images * (args.steps + 1)
    print(f"VGG11 width {args.width}, {args.images} images x {args.steps + 1} points ({n_fwd} perturbed images), "
          f"{args.patch}x{args.patch} patches, batch_size={args.batch_size}, threads={torch.get_num_threads()}, {args.reps} repeats")
    print(f"{'method':<26} {'median s':>9} {'images/s':>9} {'ratio vs batched':>17}")
    for k in names:
        ratio = statistics.median(a / b for a, b in zip(times[k], times[names[0]]))
        med = statistics.median(times[k])
        print(f"{k:<26} {med:9.3f} {n_fwd / med:9.1f} {ratio:17.2f}")


if __name__ == '__main__':
    main()
