"""The compiled kernels on every device there is, against the pure-PyTorch references on the CPU.

On a machine without a GPU only the CPU cases run (the `cuda` cases are skipped, and say so); `bash tools/gpu_check.sh`
runs the `cuda` ones, also under `compute-sanitizer --tool memcheck` (small tensors on purpose: memcheck is slow).
The notebooks test the same ops more exhaustively; this file exists so that a single process with a handful of
kernel launches can run under the sanitizer."""
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU here"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture
def k(require_c):
    "The kernels module, with the CUDA kernels switched on (they are opt-in) for the test."
    prev = require_c.use_cuda_kernels(True)
    yield require_c
    require_c.use_cuda_kernels(prev)


def bits(t):
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


def rnd(*shape, g, dtype, zeros=0.0):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if zeros: x[torch.rand(*shape, generator=g, dtype=torch.float64) < zeros] = 0
    return x.to(dtype)


def on(device, *ts): return [t.to(device) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stabilized_div(k, device, dtype):
    assert k.kernels_active(device, "stabilized_div"), k.build_info()
    g = torch.Generator().manual_seed(0)
    n, d = rnd(6, 5, 33, g=g, dtype=dtype), rnd(6, 5, 33, g=g, dtype=dtype, zeros=0.2)
    cases = {"contiguous": (n, d), "broadcast": (n, d[:1, :, :1]), "strided": (n.transpose(0, 2), d.transpose(0, 2)),
             "empty": (n[:0], d[:0]), "large": (rnd(70_000, g=g, dtype=dtype), rnd(70_000, g=g, dtype=dtype, zeros=0.1))}
    for name, (a, b) in cases.items():
        for eps in (0.0, 1e-3):
            got = torch.ops.lrp_scratch.stabilized_div(*on(device, a, b), eps)
            assert got.device.type == device
            want = k.stabilized_div_ref(a, b, eps)
            assert torch.equal(bits(got.cpu()), bits(want)), f"{device} {dtype} {name} eps={eps}"


@pytest.mark.parametrize("device", DEVICES)
def test_stabilized_div_gradients(k, device):
    g = torch.Generator().manual_seed(1)
    n = rnd(3, 4, g=g, dtype=torch.float64).to(device).requires_grad_()
    d = (torch.rand(1, 4, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.lrp_scratch.stabilized_div(a, b, 1e-3), (n, d))


def filter_cases(g, dtype):
    return {"rows": rnd(4, 50, g=g, dtype=dtype, zeros=0.3), "images": rnd(2, 3, 8, 8, g=g, dtype=dtype, zeros=0.5),
            "ties": torch.tensor([[1., 2., 2., 2., 0., 2., -1., 2.]] * 3, dtype=dtype),
            "long row": rnd(1, 70_000, g=g, dtype=dtype, zeros=0.5), "empty": rnd(0, 7, g=g, dtype=dtype)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relevance_filter_and_fused_division(k, device, dtype):
    assert k.kernels_active(device, "relevance_filter") and k.kernels_active(device, "filtered_stabilized_div"), k.build_info()
    g = torch.Generator().manual_seed(2)
    for name, x in filter_cases(g, dtype).items():
        m = x[0].numel() if x.numel() else 1
        z = rnd(*x.shape, g=g, dtype=dtype, zeros=0.1)
        for kk in sorted({1, 2, max(1, m // 50), m // 2 or 1, max(1, m - 1), m, m + 3}):
            got = torch.ops.lrp_scratch.relevance_filter(x.to(device), kk)
            assert torch.equal(bits(got.cpu()), bits(k.relevance_filter_ref(x, kk))), f"filter {device} {dtype} {name} k={kk}"
            got = torch.ops.lrp_scratch.filtered_stabilized_div(*on(device, x, z), 1e-3, kk)
            want = k.filtered_stabilized_div_ref(x, z, 1e-3, kk)
            assert torch.equal(bits(got.cpu()), bits(want)), f"fused {device} {dtype} {name} k={kk}"


@pytest.mark.parametrize("device", DEVICES)
def test_relevance_filter_rejects_nan(k, device):
    x = torch.tensor([[1., float("nan"), 3.]], device=device)
    with pytest.raises(RuntimeError, match="NaN has no order"):
        torch.ops.lrp_scratch.relevance_filter(x, 1)
        if device == "cuda": torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mul_sum_channels(k, device, dtype):
    from lrp_scratch.core import tolerance
    assert k.kernels_active(device, "mul_sum_channels"), k.build_info()
    g = torch.Generator().manual_seed(3)
    for shape in [(2, 1, 5, 7), (2, 3, 32, 32), (1, 4, 3, 3), (3, 7, 9, 11), (0, 3, 4, 4), (2, 5)]:
        a, c = rnd(*shape, g=g, dtype=dtype), rnd(*shape, g=g, dtype=dtype)
        got = torch.ops.lrp_scratch.mul_sum_channels(*on(device, a, c)).cpu()
        tol = tolerance(dtype)
        torch.testing.assert_close(got, k.mul_sum_channels_ref(a, c), rtol=tol["rtol"], atol=tol["atol"] * shape[1],
                                   msg=lambda m: f"{device} {dtype} {shape}: {m}")
