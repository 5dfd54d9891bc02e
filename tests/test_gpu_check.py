"tools/gpu_check.sh: valid bash; on a machine without a GPU one line and exit status 0 (it cannot run its checks here)."
import os, subprocess, sys

from conftest import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this runs the no-GPU path on every machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible here"), p.stdout
    assert p.stderr == ""
