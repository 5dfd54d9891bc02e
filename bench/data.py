#!/usr/bin/env python3
"""Data loading throughput next to VGG11's training throughput, measured in the same run.

    python bench/data.py [--n 12000] [--reps 5] [--threads N] [--device cpu|cuda]

The data: the embedded offline digits (`get_dataset(dataset='digits')`, so it runs without MNIST files), 28x28
uint8, turned into the walkthrough's 3x32x32 normalised input. Loader rows time whole passes of `--batches`
batches of `loader(...)[0]` (the training loader: shuffled), including the transform and, where marked, the
default augmentation chain (affine, elastic, noise, erasing). `tv per-item` is the walkthrough's torchvision
list applied per PIL item by torch's DataLoader (0 workers), for comparison. The training rows time
forward + backward + SGD step of VGG11 (`lrp_scratch.models.VGG11` if it imports, else torchvision's
`vgg11(num_classes=10)`) on batches prepared beforehand. Loader passes and training steps are interleaved,
`--reps` rounds, medians. ratio = loader images/s / training images/s at the same batch size (target >= 5 on
CPU: the data path is not the bottleneck). The generation speed of the digits is printed first. Absolute numbers
on a shared machine are noisy; read the ratios.
"""
import argparse, itertools, statistics, time

import torch
import torchvision.transforms as transforms

from lrp_scratch.data_augmentations import default_augmentations
from lrp_scratch.data_loaders import get_dataset, loader
from lrp_scratch.data_transformations import mnist_transform
from lrp_scratch.digits import glyph_templates, make_digits


def vgg11():
    try:
        from lrp_scratch.models import VGG11
        return VGG11(10), "lrp_scratch.models.VGG11(10)"
    except Exception as e:  # not written yet, or broken: the torchvision model of the same architecture
        import torchvision
        return torchvision.models.vgg11(num_classes=10), f"torchvision.models.vgg11(num_classes=10) (lrp_scratch.models.VGG11: {type(e).__name__})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12000, help="digits in the training set")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, default=20, help="batches per timed loader pass")
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    t0 = time.perf_counter(); glyph_templates(); t_tmpl = time.perf_counter() - t0
    t0 = time.perf_counter(); make_digits(a.n, seed=123); t_gen = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}")
    print(f"digits: templates {t_tmpl:.2f} s (once per process), generation {a.n / t_gen:,.0f} images/s ({a.n} images)")

    fast_train, fast_test = get_dataset(".", transform=mnist_transform(), dataset="digits", n_train=a.n, n_test=1000)
    walk = [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,)),
            transforms.Lambda(lambda x: x.repeat(3, 1, 1))]
    tv_train, tv_test = get_dataset(".", transform=mnist_transform(walk), dataset="digits", n_train=a.n, n_test=1000)
    device = dev if dev.type == "cuda" else None
    configs = []  # (label, batch size, loader)
    for bs in (64, 256):
        configs.append((f"ours, batch {bs}", bs, loader(fast_train, fast_test, batch_size=bs, device=device)[0]))
        configs.append((f"ours + augment, batch {bs}", bs, loader(fast_train, fast_test, batch_size=bs, device=device,
                                                                   augment=default_augmentations())[0]))
    configs.append(("tv per-item, batch 64", 64, loader(tv_train, tv_test, batch_size=64, num_workers=0)[0]))

    model, model_name = vgg11()
    model = model.to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = {bs: next(iter(loader(fast_train, batch_size=bs)[0])) for bs in (64, 256)}
    batches = {bs: (x.to(dev), y.to(dev)) for bs, (x, y) in batches.items()}
    print(f"model: {model_name}, input {tuple(batches[64][0].shape[1:])}")

    def load_pass(dl, k):
        n = 0
        for x, _ in itertools.islice(iter(dl), k): n += len(x)
        sync()
        return n

    def train_steps(bs, k):
        x, y = batches[bs]
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sync()
        return k * bs

    def rate(f, *args):
        t0 = time.perf_counter(); n = f(*args)
        return n / (time.perf_counter() - t0)

    for _, _, dl in configs: load_pass(dl, 2)  # warm up (weight caches, allocator)
    for bs in (64, 256): train_steps(bs, 1)
    load_rates = {label: [] for label, _, _ in configs}
    train_rates = {64: [], 256: []}
    for _ in range(a.reps):  # interleaved: every round times every loader and both training batch sizes
        for label, _, dl in configs: load_rates[label].append(rate(load_pass, dl, a.batches))
        for bs in (64, 256): train_rates[bs].append(rate(train_steps, bs, a.steps))
    train_med = {bs: statistics.median(v) for bs, v in train_rates.items()}
    print(f"\n{'loader':28} {'loader img/s':>13} {'train img/s':>12} {'ratio':>8}")
    for label, bs, _ in configs:
        lr_ = statistics.median(load_rates[label])
        print(f"{label:28} {lr_:>13,.0f} {train_med[bs]:>12,.1f} {lr_ / train_med[bs]:>7.1f}x")
    print("\nratio = loader images/s / VGG11 training images/s (forward + backward + SGD step) at the same batch size; target >= 5x")


if __name__ == "__main__":
    main()
