import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_py(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    "Run `code` in a fresh interpreter (so import-time switches take effect); environment overrides in `env`."
    e = {**os.environ, **(env or {})}
    for k, v in list(e.items()):
        if v is None: del e[k]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=cwd or ROOT, timeout=600)


@pytest.fixture
def require_c():
    "The compiled extension must be present where the test command built it (LRP_SCRATCH_REQUIRE_C=1)."
    import lrp_scratch.kernels as k
    if not k.HAS_C:
        if os.environ.get("LRP_SCRATCH_REQUIRE_C") == "1": pytest.fail(f"lrp_scratch._C is missing: {k._C_MISSING}")
        pytest.skip(f"lrp_scratch._C is not built here ({k._C_MISSING})")
    return k


def torchrun_env() -> dict:
    "The environment of a job started by a test: this checkout first on the path, one thread, gloo on loopback, no torchrun variables."
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    return env


def run_job(script: str, tmp: Path, out: Path, mode: str = "run", nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    "Run `script` (given OUT and MODE as arguments) in a fresh process, or under torchrun with `nproc` ranks; an outer timeout."
    path = tmp / "job.py"
    path.write_text(script)
    cmd = [sys.executable, str(path), str(out), mode]
    if nproc > 1: cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] + cmd[1:]
    return subprocess.run(cmd, capture_output=True, text=True, env=torchrun_env(), cwd=tmp, timeout=timeout)


def files(d: Path) -> dict:
    "Every file under `d` (relative name -> bytes)."
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
