"Warnings name the user's line (the file and line of the call), not a line inside the package; mixed precision warns once."
import warnings

import pytest
import torch
from torch import nn

from conftest import run_py
from lrp_scratch.core import autocast_dtype, get_device
from lrp_scratch import testers
from lrp_scratch.trainers import MPTrainer, Trainer

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the use_gpu warnings appear only without CUDA")


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def caught(f, contains: str):
    "Run f; the warnings whose message contains `contains`."
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        f()
    return [w for w in ws if contains in str(w.message)]


def assert_here(ws, n=1):
    assert len(ws) == n, [str(w.message) for w in ws]
    for w in ws: assert w.filename == __file__, f"the warning points at {w.filename}:{w.lineno}, not at the caller ({__file__})"


@no_cuda
def test_get_device_warns_at_the_caller():
    assert_here(caught(lambda: get_device(True), "CUDA is not available"))
    assert_here(caught(lambda: get_device("cuda"), "CUDA is not available"))


@no_cuda
def test_tester_use_gpu_warns_at_the_caller():
    assert_here(caught(lambda: testers.Tester(small(), batches(), use_gpu=True, verbose=False), "CUDA is not available"))


@no_cuda
def test_trainer_use_gpu_warns_at_the_caller():
    assert_here(caught(lambda: Trainer(small(), batches(), use_gpu=True, progress=False), "CUDA is not available"))
    assert_here(caught(lambda: MPTrainer(small(), batches(), use_gpu=True, progress=False, cpu_bf16=True), "CUDA is not available"))


def test_mixed_precision_without_native_bf16_warns_once_at_the_caller():
    "Construction and a whole run give one warning, at the line that made the trainer; the run is in float32."
    made = {}
    def make_and_run():
        made["t"] = MPTrainer(small(), batches(), batches(), train_epochs=2, progress=False, device="cpu", cpu_bf16=False)
        made["t"].run()
    ws = caught(make_and_run, "no native bfloat16")
    assert_here(ws)
    assert "amp_dtype=torch.bfloat16" in str(ws[0].message) and "LRP_SCRATCH_CPU_BF16=1" in str(ws[0].message)
    assert made["t"].amp_dtype is None and not made["t"].mixed_precision
    assert_here(caught(lambda: autocast_dtype("cpu", cpu_bf16=False), "no native bfloat16"))
    assert caught(lambda: MPTrainer(small(), batches(), progress=False, device="cpu", cpu_bf16=True), "bfloat16") == []
    assert caught(lambda: MPTrainer(small(), batches(), progress=False, device="cpu", cpu_bf16=False, amp_dtype=torch.float32), "bfloat16") == []


CHOICE = """
import warnings, torch
from torch import nn
from lrp_scratch.trainers import MPTrainer
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter('always')
    t = MPTrainer(nn.Linear(2, 2), [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))], progress=False, device='cpu')
print(t.amp_dtype, t.mixed_precision, sum('no native bfloat16' in str(w.message) for w in ws))
"""


@pytest.mark.parametrize("env, want", [("0", "None False 1"), ("1", "torch.bfloat16 True 0")])
def test_cpu_bf16_check_forced_from_environment(env, want):
    p = run_py(CHOICE, {"LRP_SCRATCH_CPU_BF16": env})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == want


def test_hardware_check_reads_onednn():
    "ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN treat this CPU as AVX2-only: the unforced check then says no native bfloat16."
    p = run_py(CHOICE, {"LRP_SCRATCH_CPU_BF16": None, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "None False 1"


def test_resume_warning_points_at_the_caller(tmp_path):
    "Resuming with a loader whose random generators differ from the checkpoint's: the warning names run()'s caller."
    t = Trainer(small(), batches(), train_epochs=1, progress=False, device="cpu")
    t.run()
    path = t.save_model(tmp_path / "ck.pt")
    ds = torch.utils.data.TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    t2 = Trainer(small(), dl, train_epochs=2, progress=False, device="cpu")
    assert_here(caught(lambda: t2.run(resume_from=path), "random generators"))
