// CUDA kernels of lrp_scratch._C. Same semantics as the CPU kernels in lrp_ops.cpp (see there).
//
// Launch geometry: one thread per element in a grid-stride loop, 256 threads per block, at most
// 32 blocks per SM (enough to fill the GPU; larger tensors are covered by the stride). Inputs are
// made contiguous (and broadcast) first, so every load and store is coalesced: one pass over memory.

#include "lrp_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>

namespace lrp_scratch {

namespace {

template <typename scalar_t>
__global__ void stabilized_div_kernel(const scalar_t* __restrict__ n, const scalar_t* __restrict__ d,
                                      scalar_t* __restrict__ o, int64_t len, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t e = static_cast<opmath_t>(eps);
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < len; i += stride) {
    const opmath_t dv = static_cast<opmath_t>(d[i]);
    const opmath_t q = dv >= opmath_t(0) ? dv + e : dv - e;
    const opmath_t r = static_cast<opmath_t>(n[i]) / q;
    o[i] = static_cast<scalar_t>(q == opmath_t(0) ? opmath_t(0) : r);
  }
}

}  // namespace

at::Tensor stabilized_div_cuda(const at::Tensor& num, const at::Tensor& den, double eps) {
  check_stabilized_div_args(num, den, eps);
  const auto shape = stabilized_div_shape(num, den);
  const c10::cuda::CUDAGuard guard(num.device());
  at::Tensor out = at::empty(shape, num.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t len = out.numel();
  if (len == 0) return out;
  const at::Tensor n = num.expand(shape).contiguous();
  const at::Tensor d = den.expand(shape).contiguous();

  constexpr int threads = 256;
  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, num.device().index()));
  const int64_t wanted = (len + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, static_cast<int64_t>(sms) * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(num.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, num.scalar_type(), "stabilized_div_cuda", [&] {
    stabilized_div_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        n.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), len, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(lrp_scratch, CUDA, m) {
  m.impl("stabilized_div", &stabilized_div_cuda);
}

}  // namespace lrp_scratch
