"""Multi-process checks of `Trainer`/`Tester` under torchrun: 2 processes, gloo over 127.0.0.1.

Run as pytest, this file launches itself with `python -m torch.distributed.run --standalone --nproc-per-node=2
tests/test_distributed.py SCENARIO OUT` (each launch under an outer timeout) and compares what the ranks wrote
with single-process references computed here. A launch costs about 12 s of start-up, so each scenario checks
several things at once.
"""
from __future__ import annotations
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
OPTIMIZERS = {'sgd': dict(momentum=0.9), 'adam': {}, 'adamw': dict(weight_decay=0.05), 'rmsprop': {}}
N_TRAIN, N_VALID, N_TEST, B, EPOCHS = 64, 37, 101, 8, 3  # W=2 ranks of batch B == one process of batch 2B
LAUNCH_TIMEOUT = 240  # seconds: an outer bound for one launch on a loaded 2-core machine (start-up ~12 s)


# ---------------------------------------------------------------- models and data shared by ranks and references
class TinyNet(nn.Module):
    "A BatchNorm-free CNN for any image size (optionally with dropout, to exercise the per-rank random streams)."
    def __init__(self, c: int = 1, k: int = 10, p: float = 0.0, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.random.fork_rng(); g.__enter__(); torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten())
        self.drop, self.head = nn.Dropout(p), nn.Linear(64, k)
        g.__exit__(None, None, None)
        self.to(dtype)
        self.config = dict(c=c, k=k, p=p, seed=seed, dtype=str(dtype))
    def forward(self, x): return self.head(self.drop(self.features(x.to(self.head.weight.dtype))))


def float64_data(n: int, seed: int):
    "A TensorDataset of n random float64 images 1x8x8 with labels 0..9."
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g))


def digits(n: int, seed: int):
    from lrp_scratch.data_loaders import get_dataset
    from lrp_scratch.data_transformations import mnist_transform
    return get_dataset('.', transform=mnist_transform(), dataset='digits', split='test', n_test=n, seed=seed)


def exact_loaders(kind: str, batch: int, reference: bool):
    "Training and validation loaders: per-rank batch `batch`; `reference`: one process that must see the same order."
    from torch.utils.data import DataLoader, DistributedSampler
    from lrp_scratch.data_loaders import TensorLoader
    if kind == 'tensor':
        tr, va = TensorLoader(digits(N_TRAIN, 1), batch_size=batch, shuffle=True, seed=4), TensorLoader(digits(N_VALID, 2), batch_size=batch)
        return tr, va
    ds, vs = float64_data(N_TRAIN, 1), float64_data(N_VALID, 2)
    if reference:  # DistributedSampler's order for one replica: randperm(n, seed + epoch), which the ranks share
        return DataLoader(ds, batch_size=batch, sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=4)), DataLoader(vs, batch_size=batch)
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(4)), DataLoader(vs, batch_size=batch)


def exact_trainer(opt: str, kind: str, batch: int, reference: bool, checkpoint=None):
    from lrp_scratch.trainers import Trainer
    tr, va = exact_loaders(kind, batch, reference)
    model = TinyNet(c=1 if kind == 'plain' else 3)
    return Trainer(model, tr, va, train_epochs=EPOCHS, learning_rate=0.01, optimization_method=opt, optimizer_kwargs=OPTIMIZERS[opt],
                   scheduler='onecycle' if opt == 'adam' else None, checkpoint_path=checkpoint, progress=False, seed=0,
                   distributed=False if reference else 'auto')


def resume_trainer(out: Path, epochs: int = 4):
    "The kill-and-resume job: dropout, augmentation, a step schedule, a checkpoint every epoch."
    from lrp_scratch.data_loaders import TensorLoader
    from lrp_scratch.data_augmentations import Augmentations, GaussianNoise
    from lrp_scratch.trainers import Trainer
    tr = TensorLoader(digits(96, 3), batch_size=8, shuffle=True, seed=2, augment=Augmentations(GaussianNoise(0.1)))
    return Trainer(TinyNet(c=3, p=0.3, dtype=torch.float32), tr, TensorLoader(digits(21, 4), batch_size=8), train_epochs=epochs,
                   learning_rate=0.01, scheduler='step', checkpoint_path=out/'ck.pt', progress=False, seed=1)


def _tester_setups():
    "(name, model, loader) for the Tester check: odd-sized test sets, torch's and our loader."
    from torch.utils.data import DataLoader
    from lrp_scratch.data_loaders import TensorLoader
    torch.manual_seed(0)
    return [('plain', TinyNet(c=1, seed=3), DataLoader(float64_data(N_TEST, 5), batch_size=16)),
            ('tensor', TinyNet(c=3, seed=4), TensorLoader(digits(N_TEST, 6), batch_size=16))]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- what the ranks run
def worker_core(out: Path):
    "Exactness for every optimizer and both loader kinds, checkpoints, uneven loaders, the Tester, the uninterrupted resume run."
    from lrp_scratch.distributed import get_rank, init_distributed, barrier
    from lrp_scratch.testers import Tester
    from lrp_scratch.loggers import set_logger
    set_logger(level='INFO')  # INFO to stderr: the test checks that only rank 0 prints it
    env = init_distributed('cpu', timeout=120)
    rank = env.rank
    res = {'world_size': env.world_size, 'runs': {}}
    for kind in ('plain', 'tensor'):
        for opt in OPTIMIZERS:
            if kind == 'tensor' and opt != 'adam': continue
            ck = out/f'ck_{kind}_{opt}'
            t = exact_trainer(opt, kind, B, reference=False, checkpoint=ck/'checkpoint.pt')
            t.run()
            torch.save(params(t.model), out/f'final_{kind}_{opt}_rank{rank}.pt')
            res['runs'][f'{kind}_{opt}'] = dict(history=t.history.to_dict(), n_batches=len(t.train_dataloader), epoch=t.epoch)
    # uneven loaders: rank 0 has 3 batches, rank 1 has 2; the epoch ends for both after 2, nobody waits
    from lrp_scratch.trainers import Trainer
    data = float64_data(40, 9)
    batches = [(data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]) for i in range(0, 8 * (3 - rank), 8)]
    t0 = time.perf_counter()
    u = Trainer(TinyNet(), batches, train_epochs=2, learning_rate=0.01, progress=False, seed=0)
    u.run()
    res['uneven'] = dict(steps=int(u.optimizer.state_dict()['state'][0]['step']), seconds=time.perf_counter() - t0)
    torch.save(params(u.model), out/f'final_uneven_rank{rank}.pt')
    # mixed precision (bfloat16 autocast on the CPU) under DDP: the ranks stay identical
    from lrp_scratch.trainers import MPTrainer
    m = MPTrainer(TinyNet(dtype=torch.float32), *exact_loaders('plain', B, reference=False), train_epochs=1, progress=False, seed=0)
    m.run()
    torch.save(params(m.model), out/f'final_mixed_rank{rank}.pt')
    res['mixed'] = m.history.to_dict()
    # the Tester on odd-sized test sets (contiguous unpadded shares + one reduction)
    res['tester'] = {name: Tester(m, dl, verbose=False).run().to_dict() for name, m, dl in _tester_setups()}
    # a grid search: every rank runs every trial data-parallel; rank 0 writes the results
    from lrp_scratch.parameter_tuning import GridSearch
    gs = GridSearch(lambda: TinyNet(), dict(learning_rate=[0.01, 0.03]), exact_loaders('plain', B, reference=False),
                    trainer_kwargs=dict(train_epochs=1), results_path=out/'search'/'results.jsonl', progress=False).run()
    res['search'] = [r['score'] for r in gs.results_]
    # the uninterrupted run of the kill-and-resume test
    r = resume_trainer(out/'straight'); r.run()
    torch.save(params(r.model), out/f'final_straight_rank{rank}.pt')
    (out/f'result_rank{rank}.json').write_text(json.dumps(res))
    barrier()


def worker_resume(out: Path):
    "The kill-and-resume job: KILL_AT=epoch:batch makes rank 1 kill itself with SIGKILL there; the same command again resumes."
    from lrp_scratch.distributed import init_distributed
    env = init_distributed('cpu', timeout=120)
    t = resume_trainer(out/'killed')
    kill = os.environ.get('KILL_AT')
    if kill and env.rank == 1:
        epoch, batch = map(int, kill.split(':'))
        calls, loss = [0], t.loss_func
        def killing_loss(out_, y):
            calls[0] += t.model.training  # training batches only (validation uses the loss too)
            if t.model.training and calls[0] == (epoch - 1) * len(t.train_dataloader) + batch: os.kill(os.getpid(), signal.SIGKILL)
            return loss(out_, y)
        t.loss_func = killing_loss
    start = t._resume_path(None) is not None
    t.run()
    torch.save(params(t.model), out/f'final_killed_rank{env.rank}.pt')
    (out/f'resume_rank{env.rank}.json').write_text(json.dumps(dict(resumed=start, history=t.history.to_dict())))


# ---------------------------------------------------------------- the pytest side
def torchrun(*args, cwd: Path, nproc: int = 2, env: dict|None = None, module: str|None = None, timeout: float = LAUNCH_TIMEOUT):
    "Run a torchrun job on this machine (gloo over loopback) under an outer timeout; the completed process."
    target = ['-m', module] if module else [str(HERE)]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}', *target, *map(str, args)]
    e = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
         **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess):
    assert p.returncode == 0, f"exit status {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"


@pytest.fixture(scope='module')
def core(tmp_path_factory):
    out = tmp_path_factory.mktemp('core')
    p = torchrun('core', out, cwd=out)
    _ok(p)
    return out, [json.loads((out/f'result_rank{r}.json').read_text()) for r in range(2)], p


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize('run', ['plain_sgd', 'plain_adam', 'plain_adamw', 'plain_rmsprop', 'tensor_adam'])
def test_ddp_equals_one_process_with_the_big_batch(core, run):
    out, res, _ = core
    kind, opt = run.split('_')
    ranks = [torch.load(out/f'final_{run}_rank{r}.pt', weights_only=True) for r in range(2)]
    assert _max_diff(ranks[0], ranks[1]) == 0.0  # the ranks hold the same weights, bit for bit
    ref = exact_trainer(opt, kind, 2 * B, reference=True)
    ref.run()
    assert res[0]['runs'][run]['n_batches'] == len(ref.train_dataloader) == N_TRAIN // (2 * B)
    diff = _max_diff(ranks[0], params(ref.model))
    print(f"{run}: max |param difference| to one process with batch {2 * B}: {diff:.2e}")
    assert diff <= 1e-12
    # the history is reduced: identical on both ranks, and the single process's numbers
    h0, h1 = res[0]['runs'][run]['history'], res[1]['runs'][run]['history']
    assert h0 == h1
    for col in ('train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'lr'):
        tol = 1e-6 if col.endswith('loss') else 1e-12  # the Trainer computes losses in float32: batch means of 8 vs 16 items round differently
        assert len(h0[col]) == EPOCHS and all(math.isclose(a, b, rel_tol=tol, abs_tol=tol) for a, b in zip(h0[col], ref.history[col])), col


def test_one_checkpoint_written_without_module_prefix(core):
    from lrp_scratch.trainers import load_checkpoint
    out, res, _ = core
    for run in ('plain_sgd', 'tensor_adam'):
        folder = out/f'ck_{run}'
        assert sorted(p.name for p in folder.iterdir()) == ['checkpoint.history.csv', 'checkpoint.history.jsonl', 'checkpoint.pt']
        ck = load_checkpoint(folder/'checkpoint.pt')
        keys = list(ck['model']) + list(ck['early_stopping']['state'] or {})
        assert keys and not any(k.startswith('module.') for k in keys)
        assert b'module.' not in (folder/'checkpoint.pt').read_bytes()
        assert ck['config']['model'] == 'TinyNet' and ck['config']['model_config']['c'] == (1 if run.startswith('plain') else 3)
        assert ck['world_size'] == ck['config']['world_size'] == 2 and len(ck['ranks']) == 2
        assert not torch.equal(ck['ranks'][0]['rng']['torch'], ck['ranks'][1]['rng']['torch'])  # every rank's own stream is kept
        assert ck['epoch'] == EPOCHS


def test_uneven_batches_do_not_hang(core):
    out, res, _ = core
    assert [r['uneven']['steps'] for r in res] == [4, 4]  # 2 epochs of 2 common batches; rank 0's third batch skipped
    a, b = (torch.load(out/f'final_uneven_rank{r}.pt', weights_only=True) for r in range(2))
    assert _max_diff(a, b) == 0.0


def test_mixed_precision_ranks_agree(core):
    out, res, _ = core
    a, b = (torch.load(out/f'final_mixed_rank{r}.pt', weights_only=True) for r in range(2))
    assert _max_diff(a, b) == 0.0
    assert res[0]['mixed']['train_loss'] == res[1]['mixed']['train_loss'] and math.isfinite(res[0]['mixed']['train_loss'][0])


def test_search_results_written_once(core):
    out, res, _ = core
    assert res[0]['search'] == res[1]['search'] and len(res[0]['search']) == 2
    assert len((out/'search'/'results.jsonl').read_text().splitlines()) == 2
    assert sorted(p.name for p in (out/'search').iterdir()) == ['results.best.pt', 'results.jsonl']


def test_tester_equals_one_process(core):
    from lrp_scratch.testers import Tester
    out, res, _ = core
    for name, model, dl in _tester_setups():
        single = Tester(model, dl, verbose=False).run().to_dict()
        for r in range(2):
            got = res[r]['tester'][name]
            assert got['n'] == single['n'] == N_TEST
            assert got['confusion_matrix'] == single['confusion_matrix']
            assert got['report'] == single['report'] and got['accuracy'] == single['accuracy']
            assert math.isclose(got['loss'], single['loss'], rel_tol=1e-6)  # batch losses are float32, and the batches differ


def test_logs_on_rank_zero_only(core):
    out, res, p = core
    log = p.stdout + p.stderr
    assert log.count('distributed: 2 processes (gloo)') == 10  # one line per distributed run, from rank 0 only
    assert log.count(f'epoch {EPOCHS}/{EPOCHS}: train loss') == 5 and log.count('img/s on 2 processes') == 5 * EPOCHS + 2 + 1 + 2 + 4  # rank 0's epoch lines
    assert log.count('saved checkpoint') == 5 * EPOCHS + 4  # one writer
    assert '[rank 0/2] another rank ran out of batches after 2' in log  # warnings carry the rank
    assert '[rank 0/2] cannot split a list' in log and '[rank 1/2] cannot split a list' in log  # and come from every rank


def test_kill_one_worker_then_rerun_resumes_bitwise(core):
    out, _, _ = core
    straight = torch.load(out/'final_straight_rank0.pt', weights_only=True)
    killed = torchrun('resume', out, cwd=out, env={'KILL_AT': '3:2'})
    assert killed.returncode != 0  # rank 1 died in epoch 3; torchrun stopped the job
    assert not (out/'final_killed_rank0.pt').exists()
    from lrp_scratch.trainers import load_checkpoint
    assert load_checkpoint(out/'killed'/'ck.pt')['epoch'] == 2
    again = torchrun('resume', out, cwd=out)  # the same command again
    _ok(again)
    info = [json.loads((out/f'resume_rank{r}.json').read_text()) for r in range(2)]
    assert [i['resumed'] for i in info] == [True, True]
    for r in range(2):
        final = torch.load(out/f'final_killed_rank{r}.pt', weights_only=True)
        assert all(torch.equal(final[k], straight[k]) for k in straight), f"rank {r}: resumed weights differ from the uninterrupted run"
    assert info[0]['history']['train_loss'] == info[1]['history']['train_loss']


def test_resume_with_another_world_size_warns(core, caplog, tmp_path):
    import logging, shutil
    out, _, _ = core
    shutil.copy(out/'straight'/'ck.pt', tmp_path/'ck.pt')
    t = resume_trainer(tmp_path, epochs=5)  # one process continues the 2-process run for one more epoch
    with caplog.at_level(logging.WARNING, logger='lrp_scratch'):
        t.run(resume_from=tmp_path/'ck.pt')
    assert t.epoch == 5 and len(t.history) == 5
    assert any('saved by 2 processes, with 1' in r.getMessage() and 'will not equal' in r.getMessage() for r in caplog.records)


def test_sync_batchnorm_needs_cuda():
    from lrp_scratch.distributed import DistributedSetupError
    from lrp_scratch.trainers import Trainer
    if torch.cuda.is_available(): pytest.skip('CUDA present: the CPU error does not apply')
    with pytest.raises(DistributedSetupError, match='sync_batchnorm=True needs CUDA'):
        Trainer(TinyNet(), [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))], sync_batchnorm=True, device='cpu')


CLI_TINY = ['--n-train', '200', '--n-test', '50', '--width', '0.125', '--batch-size', '16', '--no-progress', '--device', 'cpu', '--scheduler', 'step']

def test_cli_train_nproc_then_torchrun_resumes(tmp_path):
    "`lrp-scratch train --nproc 2`, then `torchrun -m lrp_scratch train` with the same --out continues it; `test` rebuilds the model."
    from lrp_scratch.cli import main
    from lrp_scratch.trainers import load_checkpoint
    env = {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    first = subprocess.run([sys.executable, '-m', 'lrp_scratch', 'train', '--nproc', '2', '--out', 'run', '--epochs', '1', *CLI_TINY],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    _ok(first)
    assert first.stdout.count('trained 1 epoch') == 1  # rank 0 prints the summary
    ck = load_checkpoint(tmp_path/'run'/'checkpoint.pt')
    assert (ck['epoch'], ck['world_size'], ck['config']['model_config']['width']) == (1, 2, 0.125)
    assert not any(k.startswith('module.') for k in ck['model'])
    cwd = os.getcwd()
    try:  # other arguments (a larger --epochs) are refused before any process starts, naming the flag; the same ones: nothing to do
        os.chdir(tmp_path)
        assert main(['train', '--nproc', '2', '--out', 'run', '--epochs', '2', *CLI_TINY]) == 1
        assert main(['train', '--nproc', '2', '--out', 'run', '--epochs', '1', *CLI_TINY]) == 0
    finally: os.chdir(cwd)
    assert load_checkpoint(tmp_path/'run'/'checkpoint.pt')['epoch'] == 1
    second = torchrun('train', '--out', 'run', '--epochs', '2', '--resume', *CLI_TINY, cwd=tmp_path, module='lrp_scratch')
    _ok(second)
    assert 'resumed run/checkpoint.pt at epoch 1' in (tmp_path/'run'/'log.txt').read_text()
    ck = load_checkpoint(tmp_path/'run'/'checkpoint.pt')
    assert ck['epoch'] == 2 and len(ck['history']['epoch']) == 2
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(['test', 'run/checkpoint.pt', '--n-test', '50', '--no-progress']) == 0
        assert main(['train', '--nnodes', '2', '--out', 'x']) == 1  # launcher options need --nproc
    finally: os.chdir(cwd)
    assert (tmp_path/'run'/'test_report.json').exists()


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    scenario, out = sys.argv[1], Path(sys.argv[2])
    {'core': worker_core, 'resume': worker_resume}[scenario](out)
    from lrp_scratch.distributed import shutdown_distributed
    shutdown_distributed()
