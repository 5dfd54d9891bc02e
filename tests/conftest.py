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
