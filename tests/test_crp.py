"""relevance_maximization in real processes: killed and resumed == uninterrupted, and 2 ranks under torchrun == 1 process,
byte for byte. Every launch runs under an outer timeout; the 2-rank run uses gloo over the loopback interface."""
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest

from conftest import files, run_job, torchrun_env

ROOT = Path(__file__).resolve().parent.parent

# 64 offline test digits, an untrained VGG11 (an eighth of the channels), chunks of 16 items in batches of 8.
# MODE 'run' goes to the end; 'item=K' dies (SIGKILL) while loading item K.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from lrp_scratch.factory import build_model, load_datasets
    from lrp_scratch.crp import relevance_maximization

    out, mode = sys.argv[1], sys.argv[2]
    kill_item = int(mode[5:]) if mode.startswith('item=') else -1

    class Items:
        def __init__(self, ds): self.ds = ds
        def __len__(self): return len(self.ds)
        def __getitem__(self, i):
            if i == kill_item: os.kill(os.getpid(), signal.SIGKILL)
            return self.ds[i]

    ds = load_datasets('digits', n_test=64, only_test=True)
    model = build_model('vgg11', width=0.125, seed=0).eval()
    index = relevance_maximization(model, Items(ds), out, ['features.8', 'classifier.3'], batch_size=8, chunk_size=16, progress=False)
    print('done', len(index))
""")


def job(tmp: Path, out: Path, mode: str = "run", nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_job(SCRIPT, tmp, out, mode, nproc, timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    p = job(tmp, tmp / "concepts")
    assert p.returncode == 0, p.stderr
    ref = files(tmp / "concepts")
    assert len([k for k in ref if k.startswith("concepts/items.")]) == 4
    return ref


def test_killed_and_resumed_equals_uninterrupted(reference, tmp_path):
    p = job(tmp_path, tmp_path / "concepts", "item=40")  # dies in the third chunk
    assert p.returncode != 0
    done = [k for k in files(tmp_path / "concepts") if k.startswith("concepts/items.")]
    assert 0 < len(done) < 4, done
    p = job(tmp_path, tmp_path / "concepts")
    assert p.returncode == 0, p.stderr
    assert files(tmp_path / "concepts") == reference


def test_two_ranks_equal_one_process(reference, tmp_path):
    p = job(tmp_path, tmp_path / "concepts", nproc=2, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert files(tmp_path / "concepts") == reference
