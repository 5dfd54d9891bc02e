"""Data-parallel training throughput: `Trainer` under torchrun with 1 and N processes (gloo, one thread each).

Each job trains VGG11 (3x32x32 offline digits, `--width` of the channels) with the same per-process batch
(`--batch-size`) and the same number of steps per epoch, so N processes see N times the images per epoch (weak
scaling). Reported: global images/s (median over `--reps` timed epochs after one warm-up epoch), the ratio to
one process (the baseline, measured in the same run), and the bytes DDP all-reduced per step, counted by a
communication hook (the gradient buckets: 4 bytes per parameter in float32).

    python bench/distributed.py                      # 1 and 2 processes
    python bench/distributed.py --nproc 1 2 4 --width 0.5

On a 2-core machine shared with other jobs expect little gain: the processes share the cores with each other and
with gloo's communication. The throughput model for many GPUs is on the distributed docs page.
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args):
    "One rank: train, time the epochs, count the all-reduced bytes; rank 0 writes the result."
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from lrp_scratch.data_loaders import TensorLoader, get_dataset
    from lrp_scratch.data_transformations import mnist_transform
    from lrp_scratch.distributed import barrier, get_world_size, init_distributed, is_main, shutdown_distributed
    from lrp_scratch.models import VGG11
    from lrp_scratch.trainers import Trainer
    init_distributed('cpu', timeout=300)
    w = get_world_size()
    ds = get_dataset('.', transform=mnist_transform(), dataset='digits', split='test', n_test=w * args.batch_size * args.steps)
    torch.manual_seed(0)
    model = VGG11(width=args.width)
    t = Trainer(model, TensorLoader(ds, batch_size=args.batch_size, shuffle=True), train_epochs=0, learning_rate=1e-3, progress=False, seed=0)
    sent = [0, 0]  # bytes, steps
    if t._ddp is not None:
        def counting_hook(state, bucket):
            sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)
        t._ddp.register_comm_hook(None, counting_hook)
    times = []
    for rep in range(args.reps + 1):
        barrier()
        t0 = time.perf_counter()
        t.train_epochs += 1
        t.run()
        barrier()
        if rep: times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    if is_main():
        Path(args.out).write_text(json.dumps(dict(world_size=w, images=len(ds), times=times, n_params=n_params,
                                                  bytes_per_step=sent[0] / ((args.reps + 1) * len(t.train_dataloader)) if t._ddp is not None else 0)))
    shutdown_distributed()


def launch(n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)/'result.json'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={n}', __file__, '--worker', '--out', str(out),
               '--width', str(args.width), '--batch-size', str(args.batch_size), '--steps', str(args.steps), '--reps', str(args.reps)]
        env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode: sys.exit(f"the {n}-process job failed (exit status {p.returncode}):\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nproc', type=int, nargs='+', default=[1, 2], help='process counts to run (the first is the baseline)')
    ap.add_argument('--width', type=float, default=0.25, help='VGG11 channel multiplier')
    ap.add_argument('--batch-size', type=int, default=32, help='images per process and step')
    ap.add_argument('--steps', type=int, default=10, help='steps per epoch')
    ap.add_argument('--reps', type=int, default=3, help='timed epochs (after one warm-up epoch)')
    ap.add_argument('--timeout', type=float, default=900, help='seconds for one job (outer bound)')
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--out', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker: return worker(args)
    rows = []
    for n in args.nproc:
        r = launch(n, args)
        r['ips'] = r['images'] / statistics.median(r['times'])
        rows.append(r)
    base = rows[0]['ips']
    print(f"VGG11 width {args.width:g} ({rows[0]['n_params']:,} parameters), 3x32x32, batch {args.batch_size} per process, {args.steps} steps per "
          f"epoch, median of {args.reps} epochs; gloo, one thread per process, {os.cpu_count()} CPUs here")
    print(f"{'processes':>9} {'global batch':>12} {'images/s':>9} {'ratio':>6} {'all-reduced bytes/step':>23}")
    for r in rows:
        print(f"{r['world_size']:>9} {r['world_size'] * args.batch_size:>12} {r['ips']:>9.1f} {r['ips'] / base:>6.2f} {r['bytes_per_step']:>23,.0f}")
    print(f"(ratio: images/s / images/s of {rows[0]['world_size']} process{'es' * (rows[0]['world_size'] > 1)}; float32 gradients: "
          f"4 x {rows[0]['n_params']:,} = {4 * rows[0]['n_params']:,} bytes)")


if __name__ == '__main__':
    main()
