"""explain_dataset in real processes: killed and resumed == uninterrupted, and 2 ranks under torchrun == 1 process, byte for byte.

Every launch runs under an outer timeout; the 2-rank runs use gloo over the loopback interface.
"""
import os, subprocess, sys, textwrap
from pathlib import Path

import pytest

from conftest import files, run_job, torchrun_env

ROOT = Path(__file__).resolve().parent.parent

# One job: 120 offline test digits, an untrained VGG11 (an eighth of the channels), chunks of 16 items in batches of 8.
# MODE: 'run' (to the end), 'item=K' (SIGKILL while loading item K: mid-computation), 'write=K' (SIGKILL half way through
# writing the K-th .npy file: mid-write, a temporary file is left behind).
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from lrp_scratch.factory import build_model, load_datasets
    from lrp_scratch.relevance_store import explain_dataset

    out, mode = sys.argv[1], sys.argv[2]
    kill_item = int(mode[5:]) if mode.startswith('item=') else -1

    class Items:  # a torchvision-like dataset (items read one by one) that can die at one item
        def __init__(self, ds): self.ds = ds
        def __len__(self): return len(self.ds)
        def __getitem__(self, i):
            if i == kill_item: os.kill(os.getpid(), signal.SIGKILL)
            return self.ds[i]

    if mode.startswith('write='):
        kill_write, save, calls = int(mode[6:]), np.save, [0]
        def dying_save(f, a, *args, **kw):
            calls[0] += 1
            if calls[0] == kill_write:
                import io
                buf = io.BytesIO(); save(buf, a)
                f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(f, a, *args, **kw)
        np.save = dying_save

    ds = load_datasets('digits', n_test=120, only_test=True)
    model = build_model('vgg11', width=0.125, seed=0).eval()
    store = explain_dataset(model, Items(ds), out, batch_size=8, chunk_size=16, progress=False)
    print('done', len(store))
""")


def job(tmp: Path, out: Path, mode: str = "run", nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_job(SCRIPT, tmp, out, mode, nproc, timeout)


N_CHUNKS = 8  # 120 items in chunks of 16


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The files of an uninterrupted single-process run."
    tmp = tmp_path_factory.mktemp("ref")
    p = job(tmp, tmp / "store")
    assert p.returncode == 0, p.stderr
    ref = files(tmp / "store")
    assert len([k for k in ref if k.startswith("chunks/items.")]) == N_CHUNKS
    return ref


@pytest.mark.parametrize("kill", ["item=70", "write=7"])
def test_killed_and_resumed_is_bitwise_uninterrupted(tmp_path, reference, kill):
    out = tmp_path / "store"
    p = job(tmp_path, out, kill)
    assert p.returncode == -9, (p.returncode, p.stderr)  # it really died
    left = files(out)
    done = [k for k in left if k.startswith("chunks/items.")]
    assert 0 < len(done) < N_CHUNKS, sorted(left)
    if kill.startswith("write="): assert any(k.endswith(".tmp") for k in left), sorted(left)  # half a file, never under its name
    for k in left:  # what survived the kill is already final
        if not k.endswith(".tmp"): assert left[k] == reference[k], k
    p = job(tmp_path, out)
    assert p.returncode == 0, p.stderr
    assert files(out) == reference


def test_two_ranks_under_torchrun_equal_one_process(tmp_path, reference):
    p = job(tmp_path, tmp_path / "store", nproc=2, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("done 120") == 2  # both ranks open the whole store after the barrier
    assert files(tmp_path / "store") == reference


def test_resume_with_another_number_of_processes(tmp_path, reference):
    "Killed as one process, finished by two ranks: the chunks do not depend on the world size."
    out = tmp_path / "store"
    assert job(tmp_path, out, "item=40").returncode == -9
    p = job(tmp_path, out, nproc=2, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert files(out) == reference


def test_analysis_extra_in_package_metadata(tmp_path):
    "`pip install lrp_scratch[analysis]` installs scipy, scikit-learn and h5py (settings.ini -> setup.py extras)."
    p = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "LRP_SCRATCH_BUILD": "none"})
    assert p.returncode == 0, p.stderr
    req = (tmp_path / "lrp_scratch.egg-info" / "requires.txt").read_text()
    extras, cur = {}, None
    for line in req.splitlines():
        if line.startswith("["): cur = line.strip("[]"); extras[cur] = []
        elif line.strip() and cur: extras[cur].append(line.strip())
    assert {"scipy", "scikit-learn", "h5py"} <= set(extras.get("analysis", [])), req
    assert "nbdev==2.4.14" in extras.get("dev", []), req


def test_spray_eigenvalues_match_corelay():
    "Our spectrum (sklearn kNN graph, scipy eigsh) against CoRelAy's processors on the same features (GPL/LGPL: a test-only, optional check)."
    pytest.importorskip("corelay", reason="CoRelAy is not installed (optional; never a dependency of lrp_scratch)")
    import numpy as np
    from scipy.spatial.distance import pdist, squareform
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.laplacian import SymmetricNormalLaplacian
    from lrp_scratch.spray import knn_affinity, normalize_maps, pool_maps, spectral_embedding

    for strength in (3.0, 0.5):  # a group with an artifact: a graph of two components, and one connected graph
        rng = np.random.default_rng(0)
        maps = rng.normal(size=(150, 32, 32))
        maps[:40, :8, :8] += strength
        x = normalize_maps(pool_maps(maps, 8)).reshape(150, -1)
        ours, _ = spectral_embedding(knn_affinity(x, 10), 8)
        affinity = SparseKNN(n_neighbors=10, symmetric=True)(squareform(pdist(x)))
        # which='LA' (CoRelAy's default 'LM' can take a large negative eigenvalue of D^-1/2 A D^-1/2 instead of a small one
        # of L: on the connected graph here it returns 1.504 in place of 0.504)
        eigval, _ = EigenDecomposition(n_eigval=8, which='LA')(SymmetricNormalLaplacian()(affinity))
        np.testing.assert_allclose(np.sort(eigval), ours, rtol=0, atol=1e-8)


def test_missing_analysis_extra_is_named():
    "Without scikit-learn / scipy / h5py the package imports, and SpRAy and the HDF5 export say which extra to install."
    code = textwrap.dedent("""
        import sys
        for m in ('sklearn', 'scipy', 'h5py'): sys.modules[m] = None  # as if not installed
        import numpy as np
        import lrp_scratch.relevance_store, lrp_scratch.spray as s
        for f in (lambda: s.spray(np.zeros((5, 8, 8))), lambda: s.knn_affinity(np.zeros((5, 2)), 2),
                  lambda: s.normalized_laplacian(np.eye(3)), lambda: lrp_scratch.relevance_store.require('h5py', 'the HDF5 export')):
            try: f(); print('no error')
            except ImportError as e: print(e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=torchrun_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 4 and all("pip install 'lrp_scratch[analysis]'" in l for l in lines), p.stdout
    assert "SpRAy needs scikit-learn" in lines[0] and "needs scipy" in lines[2] and "needs h5py" in lines[3], p.stdout


def test_cli_nproc_equals_one_process(tmp_path):
    "`lrp-scratch explain-dataset --nproc 2` (torchrun's launcher in-process) writes the same store as one process."
    cli = [sys.executable, "-m", "lrp_scratch"]
    run = lambda *a, timeout=300: subprocess.run(cli + list(map(str, a)), capture_output=True, text=True, env=torchrun_env(), cwd=tmp_path, timeout=timeout)
    p = run("train", "--out", tmp_path / "ck", "--n-train", 200, "--n-test", 40, "--width", 0.125, "--epochs", 1, "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    args = ["explain-dataset", tmp_path / "ck" / "checkpoint.pt", "--n-test", 40, "--chunk-size", 8, "--no-progress"]
    p1 = run(*args, "--out", tmp_path / "one")
    assert p1.returncode == 0, p1.stderr[-2000:]
    p2 = run(*args, "--out", tmp_path / "two", "--nproc", 2, timeout=400)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert files(tmp_path / "one") == files(tmp_path / "two")
