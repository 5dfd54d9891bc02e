"""Training loop benchmarks: our Trainer against a bare PyTorch loop, and Trainer vs MPTrainer throughput.

(1) Overhead: one epoch with `Trainer.run()` (progress bars off) vs a bare hand-written loop
    (zero_grad, forward, loss, backward, step) on the same model architecture, optimizer, loss and batches,
    interleaved repetitions, medians. Ratio = trainer time / bare time (target <= 1.05 on CPU).
(2) Throughput: VGG11 (3x32x32, 10 classes, full width), images/s of one epoch with Trainer (float32) and
    MPTrainer, interleaved, medians. MPTrainer autocasts to what the device computes natively (float16 + gradient
    scaling on CUDA, bfloat16 on a CPU with native bfloat16, else float32 with a warning); the line says which it
    chose. `--cpu-bf16 0|1` forces the CPU's bfloat16 check (as LRP_SCRATCH_CPU_BF16 does), `--amp-dtype` the dtype.
    Ratio = MPTrainer images/s / Trainer images/s (about 1 where MPTrainer falls back to float32).

    python bench/train.py                    # CPU, both parts
    python bench/train.py --threads 1 --clock process   # on a busy shared machine: CPU time, one thread
    python bench/train.py --device cuda      # on a GPU
    python bench/train.py --only throughput --cpu-bf16 0   # MPTrainer as on a CPU without native bfloat16
"""
from __future__ import annotations
import argparse, copy, statistics, time
import torch
from lrp_scratch.core import cpu_native_bf16, seed_everything
from lrp_scratch.loss_funcs import CrossEntropyLoss
from lrp_scratch.models import VGG11
from lrp_scratch.optimizers import get_optimizer
from lrp_scratch.trainers import MPTrainer, Trainer


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def make_batches(n_batches: int, bs: int, device) -> list:
    "Fixed random images and labels (the loader is not what is measured), already on the device."
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device)) for _ in range(n_batches)]


def bare_epoch(model, opt, loss_func, batches):
    model.train()
    for xb, yb in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_func(model(xb), yb)
        loss.backward()
        opt.step()


def trainer_epoch(trainer):
    trainer.train_epochs += 1  # run() trains the epochs not done yet: exactly one more
    trainer.run()


CLOCK = time.perf_counter  # --clock process: CPU time of this process (robust on a busy shared machine with --threads 1)

def timed(fn, device) -> float:
    sync(device)
    t = CLOCK()
    fn()
    sync(device)
    return CLOCK() - t


def overhead(args, device):
    batches = make_batches(args.batches, args.bs, device)
    seed_everything(0)
    base = VGG11(n_classes=10, width=args.width, seed=0).to(device)
    m_bare, m_tr = copy.deepcopy(base), copy.deepcopy(base)
    opt = get_optimizer('adam', m_bare.parameters(), lr=1e-3)
    loss_func = CrossEntropyLoss()
    tr = Trainer(m_tr, batches, None, train_epochs=0, learning_rate=1e-3, loss_func=loss_func, optimization_method='adam',
                 device=device, progress=False)
    runs = {'bare': lambda: bare_epoch(m_bare, opt, loss_func, batches), 'trainer': lambda: trainer_epoch(tr)}
    for f in runs.values(): f()  # warm-up
    times = {k: [] for k in runs}
    for r in range(args.reps):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # interleaved, alternating order
        for k in order: times[k].append(timed(runs[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.batches * args.bs
    print(f"(1) Trainer overhead: VGG11(width={args.width}), {args.batches} batches of {args.bs}, adam, {device}, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved reps (medians), {args.clock} clock")
    print(f"    bare loop : {med['bare']:.3f} s/epoch ({n / med['bare']:.0f} images/s)")
    print(f"    Trainer   : {med['trainer']:.3f} s/epoch ({n / med['trainer']:.0f} images/s)")
    print(f"    ratio Trainer / bare = {med['trainer'] / med['bare']:.3f}  (target <= 1.05)")


def throughput(args, device):
    batches = make_batches(args.vgg_batches, args.bs, device)
    seed_everything(0)
    base = VGG11(n_classes=10, seed=0).to(device)
    kw = dict(train_epochs=0, learning_rate=1e-3, device=device, progress=False)
    trainers = {'Trainer': Trainer(copy.deepcopy(base), batches, None, **kw),
                'MPTrainer': MPTrainer(copy.deepcopy(base), batches, None, amp_dtype=args.amp_dtype, cpu_bf16=args.cpu_bf16, **kw)}
    for t in trainers.values(): trainer_epoch(t)  # warm-up
    times = {k: [] for k in trainers}
    for r in range(args.vgg_reps):
        order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for k in order: times[k].append(timed(lambda: trainer_epoch(trainers[k]), device))
    n = args.vgg_batches * args.bs
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    mp = trainers['MPTrainer']
    choice = f"{str(mp.amp_dtype).replace('torch.', '')} autocast" if mp.amp_dtype is not None else 'float32, no autocast'
    if device.type == 'cpu':
        native = cpu_native_bf16(args.cpu_bf16)
        why = f"native bfloat16 {'yes' if native else 'no'}" + (f" (forced: --cpu-bf16 {int(args.cpu_bf16)})" if args.cpu_bf16 is not None else
                                                              f", {torch.backends.cpu.get_cpu_capability()}")
    else: why = f"{torch.cuda.get_device_name(device)}" if device.type == 'cuda' else device.type
    print(f"(2) VGG11 32x32 throughput: {args.vgg_batches} batches of {args.bs}, adam, {device}, {torch.get_num_threads()} threads, "
          f"{args.vgg_reps} interleaved reps (medians), {args.clock} clock")
    print(f"    MPTrainer chose        : {choice} ({why}{', amp_dtype=' + args.amp_dtype_name if args.amp_dtype_name else ''})")
    print(f"    Trainer (float32)      : {ips['Trainer']:.1f} images/s")
    print(f"    MPTrainer ({choice}): {ips['MPTrainer']:.1f} images/s")
    print(f"    ratio MPTrainer / Trainer = {ips['MPTrainer'] / ips['Trainer']:.3f}  (> 1: mixed precision faster)")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--width', type=float, default=0.25, help='VGG11 width multiplier of the overhead model (small = overhead shows more)')
    p.add_argument('--batches', type=int, default=16, help='batches per epoch for the overhead comparison')
    p.add_argument('--reps', type=int, default=9)
    p.add_argument('--vgg-batches', type=int, default=6, help='batches per epoch for the VGG11 throughput')
    p.add_argument('--vgg-reps', type=int, default=3)
    p.add_argument('--only', choices=('overhead', 'throughput'), default=None)
    p.add_argument('--cpu-bf16', choices=('auto', '0', '1'), default='auto', help="force the CPU's native-bfloat16 check for MPTrainer (default: the hardware)")
    p.add_argument('--amp-dtype', dest='amp_dtype_name', choices=('float16', 'bfloat16', 'float32'), default=None, help="MPTrainer's amp_dtype (default: its choice)")
    p.add_argument('--clock', choices=('wall', 'process'), default='wall', help="'process': CPU time (use with --threads 1 on a busy machine; CPU only)")
    args = p.parse_args()
    args.cpu_bf16 = None if args.cpu_bf16 == 'auto' else args.cpu_bf16 == '1'
    args.amp_dtype = getattr(torch, args.amp_dtype_name) if args.amp_dtype_name else None
    if args.clock == 'process': CLOCK = time.process_time
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only != 'throughput': overhead(args, device)
    if args.only != 'overhead': throughput(args, device)
