// Shared declarations of the lrp_scratch extension (kernels/ -> lrp_scratch._C).
#pragma once

#include <ATen/ATen.h>

namespace lrp_scratch {

// Argument checks shared by the CPU and CUDA implementations, so both raise the same errors.
void check_stabilized_div_args(const at::Tensor& num, const at::Tensor& den, double eps);

// The shape every implementation returns: the broadcast of num and den.
std::vector<int64_t> stabilized_div_shape(const at::Tensor& num, const at::Tensor& den);

#ifdef LRP_SCRATCH_WITH_CUDA
at::Tensor stabilized_div_cuda(const at::Tensor& num, const at::Tensor& den, double eps);
#endif

}  // namespace lrp_scratch
