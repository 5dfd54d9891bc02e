"""The `spray` command's ViRelAy project, opened by the real ViRelAy 0.6.1.

ViRelAy is AGPL-3.0 and pins pillow<11 and flask<4, so it cannot live in the project's environment: this test makes
a virtual environment of its own, once, in `.cache/virelay-0.6.1` at the repository root (git-ignored; about 20 s
from a nearby package index; set LRP_SCRATCH_VIRELAY_VENV to use another folder), and runs ViRelAy from there as
a separate process: nothing of it is imported here. When pip cannot install it (no package index), the test is
skipped and says so.

The test explains 36 digits of 3 classes into a relevance store, runs `lrp-scratch spray`, starts
`python -m virelay DIR/virelay/project.yaml` on 127.0.0.1, and checks that what ViRelAy serves for every class,
clustering and embedding is what we wrote (values, cluster numbers, indices, eigenvalues in CoRelAy's order), and
that the images and attributions are found by their dataset index. Where Chromium is installed it also takes a
headless screenshot of the page and checks it is a PNG that shows something; without Chromium that part is skipped.
"""
import json, os, shutil, socket, subprocess, sys, time, urllib.error, urllib.parse, urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LRP_SCRATCH_VIRELAY_VENV", ROOT / ".cache" / "virelay-0.6.1"))
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
h5py = pytest.importorskip("h5py")
pytest.importorskip("sklearn")


def virelay_python() -> Path:
    "The Python of the ViRelAy venv, made on first use (built beside it and renamed, so a killed build leaves no half venv)."
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import virelay"], capture_output=True).returncode == 0: return py
    tmp = VENV.with_name(f"{VENV.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", tmp], check=True, capture_output=True, timeout=300)
    p = subprocess.run([tmp / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "virelay==0.6.1"],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
        pytest.skip(f"pip could not install virelay==0.6.1 into a venv of its own (no package index?): {lines[-1] if lines else p.returncode}")
    shutil.rmtree(VENV, ignore_errors=True)
    tmp.rename(VENV)
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=20) as r: return r.status, r.headers.get_content_type(), r.read()


def get_json(url: str):
    status, _, body = get(url)
    assert status == 200, (url, status)
    return json.loads(body)


def wait_for(url: str, proc: subprocess.Popen, log: Path, limit: float = 90):
    "Poll `url` until it answers (at most `limit` s); fail with ViRelAy's output if it exits or never answers."
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None: pytest.fail(f"ViRelAy exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try: return get_json(url)
        except (urllib.error.URLError, ConnectionError, OSError): time.sleep(0.3)
    pytest.fail(f"ViRelAy did not answer {url} within {limit} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A store of 36 digits (classes 0, 1, 2 of 120 test digits, an untrained VGG11) and `lrp-scratch spray` on it."
    from lrp_scratch.factory import build_model, load_datasets
    from lrp_scratch.relevance_store import explain_dataset
    tmp = tmp_path_factory.mktemp("spray")
    ds = load_datasets("digits", n_test=120, only_test=True)
    idx = np.flatnonzero(np.isin(ds.targets.numpy(), [0, 1, 2]))
    store = explain_dataset(build_model("vgg11", width=0.125, seed=0).eval(), ds, tmp / "store", target="label", indices=idx, progress=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lrp_scratch", "spray", tmp / "store", "--out", tmp / "out", "--n-test", "120",
                        "--neighbors", "5", "--clusters", "2,3,4"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, store, tmp / "out" / "virelay"


def test_virelay_serves_what_spray_wrote(project, tmp_path):
    py = virelay_python()
    tmp, store, vdir = project
    port, log = free_port(), tmp_path / "virelay.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([py, "-m", "virelay", vdir / "project.yaml", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "BROWSER": "/bin/true"}, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        proj = wait_for(f"{base}/api/projects/0", proc, log)
        (method,) = proj["analysisMethods"]
        with h5py.File(vdir / "analysis.h5", "r") as h:
            classes = list(h)
            assert method["name"] == "spray"
            assert [c["name"] for c in method["categories"]] == classes == ["00000000", "00000001", "00000002"]
            assert [c["humanReadableName"] for c in method["categories"]] == ["0", "1", "2"]
            assert method["clusterings"] == ["selected", "kmeans-02", "kmeans-03", "kmeans-04"]
            assert method["embeddings"] == ["tsne", "spectral"]
            for c in classes:  # every class, clustering and embedding ViRelAy lists: served == written
                g = h[c]
                for k in method["clusterings"]:
                    for e in method["embeddings"]:
                        q = urllib.parse.urlencode(dict(category=c, clustering=k, embedding=e))
                        a = get_json(f"{base}/api/projects/0/analyses/{method['name']}?{q}")
                        assert (a["categoryName"], a["clusteringName"], a["embeddingName"]) == (c, k, e)
                        np.testing.assert_array_equal(np.array([p["value"] for p in a["embedding"]], dtype=np.float32), g["embedding"][e][:])
                        np.testing.assert_array_equal([p["cluster"] for p in a["embedding"]], g["cluster"][k][:])
                        np.testing.assert_array_equal([p["attributionIndex"] for p in a["embedding"]], g["index"][:])
                        if e == "spectral":
                            lam = np.array(a["eigenvalues"], dtype=np.float32)
                            np.testing.assert_array_equal(lam, g["embedding/spectral"].attrs["eigenvalue"])
                            assert np.all(np.diff(lam) <= 0) and abs(lam[-1]) < 1e-5  # CoRelAy's order: descending, 0 last
                sel = store.class_positions(int(c))
                np.testing.assert_array_equal(g["index"][:], store.index[sel])
        for pos in (0, len(store) - 1):  # an image and an attribution, looked up by dataset index
            i = int(store.index[pos])
            att = get_json(f"{base}/api/projects/0/attributions/{i}")
            assert (att["index"], [l["index"] for l in att["labels"]], att["width"]) == (i, [int(store.label[pos])], 32)
            np.testing.assert_array_equal(np.array(att["prediction"], dtype=np.float32), store.output[pos])
            sample = get_json(f"{base}/api/projects/0/dataset/{i}")
            assert (sample["index"], [l["name"] for l in sample["labels"]], sample["width"], sample["height"]) == (i, [str(store.label[pos])], 32, 32)
            status, ctype, body = get(f"{base}/api/projects/0/dataset/{i}/image")
            assert (status, ctype, len(body) > 100) == (200, "image/jpeg", True)
        if CHROMIUM is None:
            pytest.skip("Chromium is not installed (/usr/bin/chromium): ViRelAy's API was checked, the page screenshot was not taken")
        shot, profile = tmp_path / "virelay.png", tmp_path / "chromium-profile"
        vectors = ",".join(str(i) for i in store.index[store.class_positions(1)][:6])
        page = (f"{base}/projects/0?analysisMethod=spray&analysisCategory=00000001&clustering=kmeans-03&embedding=tsne"
                f"&imageMode=overlay&embeddingVectors={vectors}")
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,800",
                        "--virtual-time-budget=15000", f"--screenshot={shot}", page], capture_output=True, timeout=120)
        from PIL import Image
        img = np.asarray(Image.open(shot).convert("RGB"))
        assert img.shape == (800, 1280, 3)
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50 and img.std() > 20, "the screenshot is blank"
        if os.environ.get("LRP_SCRATCH_VIRELAY_SCREENSHOT"): shutil.copy(shot, os.environ["LRP_SCRATCH_VIRELAY_SCREENSHOT"])
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
