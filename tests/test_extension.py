"Build properties of the extension that notebooks cannot show: import without it, thread use, import-time switches."
import os
from pathlib import Path

import pytest
import torch

from conftest import run_py

CHECK_FALLBACK = """
import torch, lrp_scratch.kernels as k
assert not k.HAS_C, 'extension loaded although it was blocked'
assert not k.kernels_active()
n, d = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
d[::10] = 0
r = k.stabilized_div(n, d, 0.)
assert torch.isfinite(r).all() and (r[::10] == 0).all()
torch.testing.assert_close(r, torch.where(d == 0, torch.zeros_like(d), n / d), rtol=0, atol=0)
print(k.build_info()['reason'])
"""


def test_import_with_extension_disabled():
    p = run_py(CHECK_FALLBACK, {"LRP_SCRATCH_DISABLE_C": "1", "LRP_SCRATCH_REQUIRE_C": None})
    assert p.returncode == 0, p.stderr
    assert "LRP_SCRATCH_DISABLE_C" in p.stdout


def test_import_with_extension_missing():
    # As if the .so were absent: importing lrp_scratch._C raises ImportError.
    p = run_py("import sys; sys.modules['lrp_scratch._C'] = None\n" + CHECK_FALLBACK, {"LRP_SCRATCH_REQUIRE_C": None})
    assert p.returncode == 0, p.stderr
    assert "ModuleNotFoundError: import of lrp_scratch._C halted" in p.stdout


def test_require_c_fails_loudly_when_missing():
    p = run_py("import lrp_scratch.kernels", {"LRP_SCRATCH_DISABLE_C": "1", "LRP_SCRATCH_REQUIRE_C": "1"})
    assert p.returncode != 0
    assert "LRP_SCRATCH_REQUIRE_C=1" in p.stderr and "build_ext --inplace" in p.stderr


def test_reference_switch_from_environment(require_c):
    p = run_py("import lrp_scratch.kernels as k; assert k.HAS_C and not k.kernels_active(); print('ok')",
               {"LRP_SCRATCH_REFERENCE": "1"})
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


def test_cuda_kernels_opt_in_from_environment(require_c):
    "CUDA kernels are off by default (never run on a GPU yet) and on with LRP_SCRATCH_CUDA_KERNELS=1."
    code = ("import lrp_scratch.kernels as k; has = 'cuda' in k.OP_DEVICES['stabilized_div']; "
            "print(k.build_info()['cuda_kernels'], k.kernels_active('cuda') == (has and {want}), k.kernels_active('cpu'))")
    p = run_py(code.format(want=False), {"LRP_SCRATCH_CUDA_KERNELS": None})
    assert p.returncode == 0 and p.stdout.split() == ["False", "True", "True"], (p.stdout, p.stderr)
    p = run_py(code.format(want=True), {"LRP_SCRATCH_CUDA_KERNELS": "1"})
    assert p.returncode == 0 and p.stdout.split() == ["True", "True", "True"], (p.stdout, p.stderr)


def test_cpu_isa_is_the_widest_the_cpu_has(require_c):
    k = require_c
    assert k.build_info()["cpu_isa_detected"] == k.available_cpu_isas()[-1]
    assert k.build_info()["cpu_isa"] == (k.isa_from_env() or k.available_cpu_isas()[-1])
    cpuinfo = Path("/proc/cpuinfo")  # Linux: the CPU's flags, to check the detection against
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if "avx512f" in flags: assert k.available_cpu_isas()[-1] == "avx512"
    elif "avx2" in flags: assert k.available_cpu_isas()[-1] == "avx2"


ISA = "import lrp_scratch.kernels as k; print(k.build_info()['cpu_isa'], k.build_info()['cpu_isa_detected'])"


@pytest.mark.parametrize("env, want", [({"LRP_SCRATCH_CPU_ISA": "portable"}, "portable"),
                                       ({"LRP_SCRATCH_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "default"}, "avx2"),
                                       ({"LRP_SCRATCH_CPU_ISA": None, "ATEN_CPU_CAPABILITY": "default"}, "portable"),
                                       ({"LRP_SCRATCH_CPU_ISA": None, "ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
                                       ({"LRP_SCRATCH_CPU_ISA": None, "ATEN_CPU_CAPABILITY": None}, "widest")])
def test_cpu_isa_from_environment(require_c, env, want):
    "LRP_SCRATCH_CPU_ISA sets the loops' instruction set at import; without it PyTorch's ATEN_CPU_CAPABILITY lowers it."
    widest = require_c.available_cpu_isas()[-1]
    want = widest if want == "widest" else want
    if want not in require_c.available_cpu_isas(): pytest.skip(f"this CPU has {widest}, not {want}")
    p = run_py(ISA, env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [want, widest]


def test_cpu_isa_from_environment_rejects_bad_names(require_c):
    p = run_py(ISA, {"LRP_SCRATCH_CPU_ISA": "sse9"})
    assert p.returncode != 0 and "LRP_SCRATCH_CPU_ISA='sse9': expected one of" in p.stderr, p.stderr


def test_kernel_is_used(require_c):
    k = require_c
    assert k.kernels_active("cpu")
    assert "cpu" in k.build_info()["devices"]
    assert k.build_info()["openmp"], "built without OpenMP: at::parallel_for would run on one thread"


@pytest.fixture
def threads():
    "Set torch's intra-op thread count for the test (restored after)."
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


def _op_calls():
    g = torch.Generator().manual_seed(0)
    r, d = torch.randn(64, 4096, generator=g), torch.randn(64, 4096, generator=g)
    return {"stabilized_div": lambda: torch.ops.lrp_scratch.stabilized_div(r, d, 1e-6),
            "stabilized_div broadcast": lambda: torch.ops.lrp_scratch.stabilized_div(r, d[:1], 1e-6),
            "relevance_filter rows": lambda: torch.ops.lrp_scratch.relevance_filter(r, 40),
            "relevance_filter one long row": lambda: torch.ops.lrp_scratch.relevance_filter(r.reshape(1, -1).repeat(1, 3), 40),
            "relevance_filter keep all": lambda: torch.ops.lrp_scratch.relevance_filter(r, 4096),
            "filtered_stabilized_div": lambda: torch.ops.lrp_scratch.filtered_stabilized_div(r, d, 1e-6, 40),
            "mul_sum_channels": lambda: torch.ops.lrp_scratch.mul_sum_channels(r.view(64, 4, 1024), d.view(64, 4, 1024))}


@pytest.mark.parametrize("name", list(_op_calls()))
def test_extension_uses_all_threads(require_c, threads, name):
    """Each CPU kernel runs on as many threads as torch has (counted by the kernels, not timed: the machine may be busy).

    Without -fopenmp at::parallel_for would run on the calling thread alone; the count would be 1."""
    k, call = require_c, _op_calls()[name]
    assert k.build_info()["openmp"]
    for n in (1, 2, 3, 4):  # also on a one-core machine (OpenMP starts them); each call has at least 4 tasks' worth
        threads(n)
        assert k.build_info()["num_threads"] == n  # the extension sees torch's setting
        assert k.threads_used(call) == n, f"{name} ran on {k.threads_used(call)} thread(s) of {n}"


def test_default_thread_count_reaches_the_extension(require_c):
    "In a fresh process with OMP_NUM_THREADS=2 and =1, the kernels use that many threads."
    code = ("import torch, lrp_scratch.kernels as k; x = torch.randn(2**20); "
            "print(torch.get_num_threads(), k.threads_used(k.stabilized_div, x, x))")
    for n in ("1", "2"):
        p = run_py(code, {"OMP_NUM_THREADS": n})
        assert p.returncode == 0 and p.stdout.split() == [n, n], (p.stdout, p.stderr)
