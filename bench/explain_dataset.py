#!/usr/bin/env python3
"""explain_dataset (the relevance store) against a bare loop over LRPModel.explain, 1 vs 2 processes, and bytes per image.

    python bench/explain_dataset.py                 # all three parts
    python bench/explain_dataset.py --only overhead --reps 7
    python bench/explain_dataset.py --only procs    # 1 process vs torchrun --nproc-per-node=2 (gloo)

(1) overhead: the same images, model, composite and batches, explained by a bare loop (load the batch, `LRPModel.explain`,
    sum over channels, keep the float32 maps in memory) and by `explain_dataset` into a fresh folder (the same work plus
    hashing the model and the data, the manifest, the chunk files written atomically with fsync). Repeats alternate the
    two; reported: median images/s of each and the median over repeats of (store time / bare time) - 1, the store's
    overhead (target <= 5%).
(2) procs: `explain_dataset` in one process vs two ranks under torchrun, each process with one thread; wall time of the
    call (the slowest rank) and of the whole launch (with interpreter start-up and rendezvous).
(3) bytes: bytes written per image, channel-summed and full maps.

Default case: VGG11 (a quarter of the channels, BatchNorm, random weights, eval mode) on 3x32x32 offline digits,
EpsilonPlusFlat, target 'pred', batch 64, 2,048 images in chunks of 1,024 (explain_dataset's default). The machines here are shared: read the ratios.
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lrp_scratch.factory import build_model, load_datasets  # noqa: E402
from lrp_scratch.lrp import EpsilonPlusFlat, LRPModel  # noqa: E402
import lrp_scratch.relevance_store as rs  # noqa: E402
from lrp_scratch.relevance_store import explain_dataset, load_batch  # noqa: E402

WRITE_SECONDS = [0.0]
_atomic_write = rs.atomic_write
def _timed_atomic_write(path, write):
    "The store's atomic_write, timed (how much of the overhead is writing files: data, fsync, rename)."
    t0 = time.perf_counter()
    try: return _atomic_write(path, write)
    finally: WRITE_SECONDS[0] += time.perf_counter() - t0
rs.atomic_write = _timed_atomic_write


def bare_loop(model, ds, n, bs):
    "The baseline: what explain_dataset does per batch, without the store."
    lrp = LRPModel(model, composite=EpsilonPlusFlat())
    idx = np.arange(n)
    maps = []
    for s in range(0, n, bs):
        x, _ = load_batch(ds, idx[s:s + bs])
        r, out = lrp.explain(x, target='pred')
        maps.append(r.sum(1).float().numpy())
        out.argmax(1).numpy()
    return np.concatenate(maps)


def overhead(args, model, ds, tmp):
    t_bare, t_store, ratios, t_write = [], [], [], []
    bare_loop(model, ds, min(args.n, 2 * args.batch_size), args.batch_size)  # warm-up
    for rep in range(args.reps):
        order = ('bare', 'store') if rep % 2 == 0 else ('store', 'bare')
        times = {}
        for what in order:
            out = tmp / f"store_{rep}"
            WRITE_SECONDS[0] = 0.0
            t0 = time.perf_counter()
            if what == 'bare': bare_loop(model, ds, args.n, args.batch_size)
            else: explain_dataset(model, ds, out, batch_size=args.batch_size, chunk_size=args.chunk_size, indices=range(args.n), progress=False)
            times[what] = time.perf_counter() - t0
            if what == 'store': t_write.append(WRITE_SECONDS[0])
        shutil.rmtree(tmp / f"store_{rep}")
        t_bare.append(times['bare']); t_store.append(times['store']); ratios.append(times['store'] / times['bare'])
    print(f"(1) overhead, {args.n} images, batch {args.batch_size}, chunks of {args.chunk_size}, {args.reps} repeats, {torch.get_num_threads()} thread(s)")
    print(f"    bare loop over LRPModel.explain : {args.n / statistics.median(t_bare):8.1f} images/s (median {statistics.median(t_bare):.3f} s)")
    print(f"    explain_dataset (store)        : {args.n / statistics.median(t_store):8.1f} images/s (median {statistics.median(t_store):.3f} s)")
    print(f"    store overhead (median of paired ratios - 1): {100 * (statistics.median(ratios) - 1):+.1f}%  "
          f"(per repeat: {', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})")
    print(f"    of which writing the files (atomic_write: data, fsync, rename): median {statistics.median(t_write):.3f} s = "
          f"{100 * statistics.median(t_write) / statistics.median(t_bare):.1f}% of the bare loop's time")


JOB = textwrap.dedent("""
    import json, sys, time, torch
    sys.path.insert(0, {root!r})
    from lrp_scratch.factory import build_model, load_datasets
    from lrp_scratch.relevance_store import explain_dataset
    from lrp_scratch.distributed import dist_env
    torch.set_num_threads(1)
    ds = load_datasets('digits', n_test={n}, only_test=True)
    model = build_model('vgg11', width={width}, seed=0).eval()
    t0 = time.perf_counter()
    explain_dataset(model, ds, sys.argv[1], batch_size={bs}, chunk_size={cs}, progress=False)
    print(json.dumps(dict(rank=dist_env().rank, seconds=time.perf_counter() - t0)))
""")


def procs(args, tmp):
    script = tmp / 'job.py'
    script.write_text(JOB.format(root=str(ROOT), n=args.n, width=args.width, bs=args.batch_size, cs=args.chunk_size))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo'}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    print(f"(2) processes, {args.n} images, chunks of {args.chunk_size}, one thread per process, {args.reps_procs} launches each")
    res = {}
    for nproc in (1, 2):
        calls, walls = [], []
        for rep in range(args.reps_procs):
            out = tmp / f"p{nproc}_{rep}"
            cmd = [sys.executable, str(script), str(out)]
            if nproc > 1: cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}'] + cmd[1:]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            walls.append(time.perf_counter() - t0)
            if p.returncode != 0: sys.exit(f"the {nproc}-process run failed:\n{p.stdout}\n{p.stderr}")
            lines = [json.loads(m) for m in re.findall(r'\{"rank": [^}]*\}', p.stdout)]  # ranks' lines may interleave
            assert len(lines) == nproc, p.stdout
            calls.append(max(l['seconds'] for l in lines))
            shutil.rmtree(out)
        res[nproc] = (statistics.median(calls), statistics.median(walls))
        print(f"    {nproc} process{'es' if nproc > 1 else '  '}: explain_dataset {args.n / res[nproc][0]:7.1f} images/s ({res[nproc][0]:.2f} s, slowest rank), "
              f"whole launch {res[nproc][1]:.1f} s")
    print(f"    speed-up of the call, 2 vs 1 process: {res[1][0] / res[2][0]:.2f}x (on a 2-core machine shared with other work, "
          f"expect less than 2)")


def nbytes(args, model, ds, tmp):
    print(f"(3) bytes written per image ({args.n} images, chunks of {args.chunk_size})")
    for reduce in ('sum', 'none'):
        out = tmp / f"bytes_{reduce}"
        store = explain_dataset(model, ds, out, batch_size=args.batch_size, chunk_size=args.chunk_size, reduce=reduce,
                                indices=range(args.n), progress=False)
        total = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
        rel = sum(p.stat().st_size for p in (out / 'chunks').glob('relevance.*.npy'))
        print(f"    reduce={reduce!r:6} relevance {store.shape}: {total / args.n:8.0f} bytes/image in all "
              f"({rel / args.n:.0f} relevance, {(total - rel) / args.n:.0f} records and manifest)")
        shutil.rmtree(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--only', choices=('overhead', 'procs', 'bytes'))
    ap.add_argument('--n', type=int, default=2048, help='images (default: %(default)s)')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--chunk-size', type=int, default=1024, help="images per chunk (default: explain_dataset's, %(default)s)")
    ap.add_argument('--width', type=float, default=0.25, help='VGG11 channel multiplier (default: %(default)s)')
    ap.add_argument('--reps', type=int, default=5, help='repeats of the overhead pair (default: %(default)s)')
    ap.add_argument('--reps-procs', type=int, default=3, help='launches per process count (default: %(default)s)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads of the in-process parts (default: %(default)s)')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_datasets('digits', n_test=args.n, only_test=True)
    model = build_model('vgg11', width=args.width, seed=0).eval()
    print(f"VGG11 width {args.width} ({model.n_params:,} parameters), 3x32x32 digits, EpsilonPlusFlat, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, 'overhead'): overhead(args, model, ds, tmp)
        if args.only in (None, 'procs'): procs(args, tmp)
        if args.only in (None, 'bytes'): nbytes(args, model, ds, tmp)


if __name__ == '__main__':
    main()
