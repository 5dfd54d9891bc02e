// CUDA kernels of the relevance filter and the fused epilogues. Same semantics as kernels/lrp_filter.cpp (see there).
//
// relevance_filter / filtered_stabilized_div: an exact radix select of the k-th largest key of every row, digit by
// digit from the top (11 bits per digit: 3 passes for float32, 2 for 16-bit types, 6 for float64), then a masking pass.
//   histogram_kernel  grid: (blocks per row) x N, flattened; 256 threads; a shared-memory histogram of the current
//                     digit of the keys that match the digits found so far, flushed with one atomicAdd per non-empty
//                     bin; each block reads a contiguous range of a row (coalesced). The first pass also counts NaNs.
//   pick_kernel       one block of 1024 threads per row: a block-wide scan of the bins from the top finds the bin of
//                     the k-th largest key; the row's state (digits found, rank left, count above) is updated and the
//                     histogram cleared for the next digit. After the last digit the k-th largest key t is known
//                     with the number of keys greater than t and equal to t.
//   tie kernels       only for rows where values equal to t straddle the cut: per-tile tie counts, then a per-row
//                     exclusive scan over the tiles (one block per row) -- the ties before each tile.
//   mask_kernel       tiles of 4096 values, one block of 256 threads per tile: out = key >= t ? x : 0 (or, fused,
//                     stabilized_div(that, den, eps)); in straddling rows the ties are ranked in index order with
//                     warp ballots and a per-block prefix, and kept while the rank is below the room left.
// Every pass reads the row once, coalesced; only the output is written at the size of r. The NaN check needs the
// count on the host: one synchronisation at the end (the Python engine synchronises per layer anyway).
//
// mul_sum_channels: one thread per output element (n, s) in a grid-stride loop, looping over the channels; the loads
// of a warp are consecutive s, so coalesced.

#include "lrp_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace lrp_scratch {

namespace {

constexpr int kDigit = 11;             // bits per radix digit
constexpr int kBins = 1 << kDigit;     // 2048
constexpr int kHistThreads = 256;
constexpr int64_t kHistPerBlock = 16384;  // values per histogram block (amortises clearing/flushing the bins)
constexpr int kPickThreads = 1024;     // two bins per thread
constexpr int kMaskThreads = 256;
constexpr int64_t kTile = 4096;        // values per masking block

// Per-row state of the selection, in an int64 tensor (N, 4).
enum { kPrefix = 0, kRank = 1, kGreater = 2, kEqual = 3 };

template <typename scalar_t>
__device__ __forceinline__ typename KeyOf<scalar_t>::type key_of(scalar_t v) {
  using K = typename KeyOf<scalar_t>::type;
  K b;
  memcpy(&b, &v, sizeof(K));
  return key_of_bits<K>(b);
}

template <typename scalar_t>
__device__ __forceinline__ bool is_nan_key(typename KeyOf<scalar_t>::type key) {
  using K = typename KeyOf<scalar_t>::type;
  // NaN keys lie above the key of +inf (positive sign) or below the key of -inf
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  return key > key_of<scalar_t>(inf) || key < key_of<scalar_t>(-inf);
}

template <typename scalar_t>
__global__ void histogram_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t blocks_per_row,
                                 const int64_t* __restrict__ state, unsigned int* __restrict__ hist, int shift,
                                 int digit_bits, int prefix_shift, bool first, int* __restrict__ nan) {
  using K = typename KeyOf<scalar_t>::type;
  __shared__ unsigned int sh[kBins];
  const int nbins = 1 << digit_bits;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  const int64_t row = blockIdx.x / blocks_per_row, part = blockIdx.x % blocks_per_row;
  const int64_t per = (M + blocks_per_row - 1) / blocks_per_row;
  const int64_t begin = part * per, end = min(M, begin + per);
  const scalar_t* xr = x + row * M;
  const K prefix = static_cast<K>(static_cast<uint64_t>(state[row * 4 + kPrefix]));
  const K mask = static_cast<K>((uint64_t(1) << digit_bits) - 1);
  int bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const K key = key_of<scalar_t>(xr[i]);
    if (first) {
      bad += is_nan_key<scalar_t>(key);
      atomicAdd(&sh[(key >> shift) & mask], 1u);
    } else if (static_cast<K>(key >> prefix_shift) == prefix) {
      atomicAdd(&sh[(key >> shift) & mask], 1u);
    }
  }
  if (bad) atomicAdd(nan, bad);
  __syncthreads();
  unsigned int* hr = hist + row * kBins;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x)
    if (sh[b]) atomicAdd(&hr[b], sh[b]);
}

// Exclusive prefix sum over the threads of a block (blockDim.x a multiple of 32, at most 1024); returns the total.
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t v, int64_t* warp_sums, int64_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int64_t inc = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t u = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += u;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < warps ? warp_sums[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t u = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += u;
    }
    if (lane < warps) warp_sums[lane] = w;  // inclusive prefix over the warps
  }
  __syncthreads();
  total = warp_sums[warps - 1];
  const int64_t before = (warp ? warp_sums[warp - 1] : 0) + inc - v;
  __syncthreads();  // warp_sums may be reused by the caller
  return before;
}

__global__ void pick_kernel(unsigned int* __restrict__ hist, int64_t* __restrict__ state, int digit_bits, bool last) {
  __shared__ int64_t warp_sums[32];
  const int64_t row = blockIdx.x;
  unsigned int* hr = hist + row * kBins;
  int64_t* st = state + row * 4;
  const int nbins = 1 << digit_bits;
  const int64_t rank = st[kRank];
  // position j counts bins from the top: bin = nbins - 1 - j; thread t holds positions 2t and 2t+1
  const int j0 = 2 * threadIdx.x;
  const unsigned int c0 = j0 < nbins ? hr[nbins - 1 - j0] : 0u;
  const unsigned int c1 = j0 + 1 < nbins ? hr[nbins - 2 - j0] : 0u;
  int64_t total;
  const int64_t before = block_exclusive_scan(int64_t(c0) + c1, warp_sums, total);
  int found = -1;
  int64_t above = 0;
  unsigned int count = 0;
  if (j0 < nbins && before < rank && rank <= before + c0) found = j0, above = before, count = c0;
  else if (j0 + 1 < nbins && before + c0 < rank && rank <= before + c0 + c1) found = j0 + 1, above = before + c0, count = c1;
  if (found >= 0) {
    const uint64_t bin = static_cast<uint64_t>(nbins - 1 - found);
    st[kPrefix] = static_cast<int64_t>((static_cast<uint64_t>(st[kPrefix]) << digit_bits) | bin);
    st[kRank] = rank - above;
    st[kGreater] += above;
    if (last) st[kEqual] = count;
  }
  if (j0 < nbins) hr[nbins - 1 - j0] = 0;
  if (j0 + 1 < nbins) hr[nbins - 2 - j0] = 0;
}

struct RowCutDev {
  uint64_t key;
  int64_t room;
  bool straddle;
};

__device__ __forceinline__ RowCutDev row_cut(const int64_t* state, int64_t row, int64_t k) {
  const int64_t* st = state + row * 4;
  const int64_t greater = st[kGreater], equal = st[kEqual];
  return {static_cast<uint64_t>(st[kPrefix]), k - greater, greater + equal > k};
}

template <typename scalar_t>
__global__ void tie_count_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t tiles, const int64_t* __restrict__ state,
                                 int64_t k, int64_t* __restrict__ tied) {
  using K = typename KeyOf<scalar_t>::type;
  __shared__ int64_t warp_sums[32];
  const int64_t row = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const RowCutDev c = row_cut(state, row, k);
  if (!c.straddle) return;  // uniform over the block
  const K t = static_cast<K>(c.key);
  const int64_t begin = tile * kTile, end = min(M, begin + kTile);
  int64_t e = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) e += key_of<scalar_t>(x[row * M + i]) == t;
  int64_t total;
  block_exclusive_scan(e, warp_sums, total);
  if (threadIdx.x == 0) tied[row * tiles + tile] = total;
}

// Per row: tied[row, :] becomes the exclusive prefix sum over its tiles (ties before each tile).
__global__ void tie_scan_kernel(int64_t* __restrict__ tied, int64_t tiles, const int64_t* __restrict__ state, int64_t k) {
  __shared__ int64_t warp_sums[32];
  const int64_t row = blockIdx.x;
  if (!row_cut(state, row, k).straddle) return;
  int64_t carry = 0;
  for (int64_t base = 0; base < tiles; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < tiles ? tied[row * tiles + i] : 0;
    int64_t total;
    const int64_t before = block_exclusive_scan(v, warp_sums, total);
    if (i < tiles) tied[row * tiles + i] = carry + before;
    carry += total;
  }
}

template <typename scalar_t, bool kDivide>
__global__ void mask_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ den, scalar_t* __restrict__ out,
                            int64_t M, int64_t tiles, const int64_t* __restrict__ state, int64_t k,
                            const int64_t* __restrict__ ties_before, double eps) {
  using K = typename KeyOf<scalar_t>::type;
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ int warp_ties[kMaskThreads / 32];
  const int64_t row = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const RowCutDev c = row_cut(state, row, k);
  const K t = static_cast<K>(c.key);
  const opmath_t e = static_cast<opmath_t>(eps);
  const int64_t begin = row * M + tile * kTile, end = row * M + min(M, (tile + 1) * kTile);
  auto write = [&](int64_t i, scalar_t v, bool keep) {
    if constexpr (kDivide) {
      const opmath_t n = keep ? static_cast<opmath_t>(v) : opmath_t(0);
      out[i] = static_cast<scalar_t>(stab_div_one<opmath_t>(n, static_cast<opmath_t>(den[i]), e));
    } else {
      out[i] = keep ? v : scalar_t(0);
    }
  };
  if (!c.straddle) {  // uniform over the block
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const scalar_t v = x[i];
      write(i, v, key_of<scalar_t>(v) >= t);
    }
    return;
  }
  // Ties straddle the cut: rank them in index order, round by round (blockDim consecutive values per round).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int64_t carry = ties_before[row * tiles + tile];
  for (int64_t base = begin; base < end; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const bool in = i < end;
    const scalar_t v = in ? x[i] : scalar_t(0);
    const K key = key_of<scalar_t>(v);
    const bool tie = in && key == t;
    const unsigned int ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = carry + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < warps; ++w) {
      if (w < warp) before += warp_ties[w];
      total += warp_ties[w];
    }
    if (in) write(i, v, key > t || (tie && before < c.room));
    carry += total;
    __syncthreads();
  }
}

void fail_on_nan(const at::Tensor& nan, const char* op) {
  TORCH_CHECK(nan.item<int>() == 0, op, ": r contains NaN; NaN has no order, so the k largest values are undefined. "
              "Find where the relevance became NaN (e.g. torch.isnan(r).any() per layer).");
}

// out = filter(x, k) (den undefined) or stabilized_div(filter(x, k), den, eps); x, den, out contiguous, k < M.
void filter_cuda(const at::Tensor& x, const at::Tensor& den, double eps, int64_t k, at::Tensor& out, const char* op) {
  const int64_t N = x.size(0), M = x.numel() / N;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const auto i64 = x.options().dtype(at::kLong);
  at::Tensor state = at::zeros({N, 4}, i64);
  state.select(1, kRank).fill_(k);
  at::Tensor hist = at::zeros({N, kBins}, x.options().dtype(at::kInt));
  at::Tensor nan = at::zeros({1}, x.options().dtype(at::kInt));
  const int64_t tiles = (M + kTile - 1) / kTile;
  at::Tensor tied = at::zeros({N, tiles}, i64);
  const int64_t blocks_per_row = std::max<int64_t>(1, (M + kHistPerBlock - 1) / kHistPerBlock);
  TORCH_CHECK(N * std::max(blocks_per_row, tiles) < (int64_t(1) << 31), op, ": too many rows/values for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "relevance_filter_cuda", [&] {
    using K = typename KeyOf<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    unsigned int* hp = reinterpret_cast<unsigned int*>(hist.mutable_data_ptr<int>());
    int64_t* sp = state.mutable_data_ptr<int64_t>();
    int prefix_shift = sizeof(K) * 8;
    while (prefix_shift > 0) {
      const int d = std::min(kDigit, prefix_shift);
      const int shift = prefix_shift - d;
      histogram_kernel<scalar_t><<<N * blocks_per_row, kHistThreads, 0, stream>>>(
          xp, M, blocks_per_row, sp, hp, shift, d, prefix_shift, prefix_shift == int(sizeof(K) * 8),
          nan.mutable_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pick_kernel<<<N, kPickThreads, 0, stream>>>(hp, sp, d, shift == 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      prefix_shift = shift;
    }
    int64_t* tp = tied.mutable_data_ptr<int64_t>();
    tie_count_kernel<scalar_t><<<N * tiles, kMaskThreads, 0, stream>>>(xp, M, tiles, sp, k, tp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tie_scan_kernel<<<N, 1024, 0, stream>>>(tp, tiles, sp, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (den.defined()) {
      mask_kernel<scalar_t, true><<<N * tiles, kMaskThreads, 0, stream>>>(
          xp, den.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), M, tiles, sp, k, tp, eps);
    } else {
      mask_kernel<scalar_t, false><<<N * tiles, kMaskThreads, 0, stream>>>(
          xp, nullptr, out.mutable_data_ptr<scalar_t>(), M, tiles, sp, k, tp, eps);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  fail_on_nan(nan, op);
}

at::Tensor relevance_filter_cuda(const at::Tensor& r, int64_t k) {
  check_relevance_filter_args("relevance_filter", r, k);
  const c10::cuda::CUDAGuard guard(r.device());
  const at::Tensor x = r.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t M = x.numel() / x.size(0);
  if (k >= M) return out.copy_(x);
  filter_cuda(x, at::Tensor(), 0.0, k, out, "relevance_filter");
  return out;
}

at::Tensor filtered_stabilized_div_cuda(const at::Tensor& r, const at::Tensor& den, double eps, int64_t k) {
  check_filtered_stabilized_div_args(r, den, eps, k);
  const c10::cuda::CUDAGuard guard(r.device());
  const at::Tensor x = r.contiguous();
  const at::Tensor d = den.contiguous();
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t M = x.numel() / x.size(0);
  if (k >= M) return stabilized_div_cuda(x, d, eps);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  filter_cuda(x, d, eps, k, out, "filtered_stabilized_div");
  return out;
}

template <typename scalar_t>
__global__ void mul_sum_channels_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c,
                                        scalar_t* __restrict__ o, int64_t N, int64_t C, int64_t S) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * S; idx += stride) {
    const int64_t n = idx / S, s = idx % S;
    const scalar_t* ap = a + n * C * S + s;
    const scalar_t* cp = c + n * C * S + s;
    opmath_t acc = 0;
    for (int64_t ch = 0; ch < C; ++ch) acc += static_cast<opmath_t>(ap[ch * S]) * static_cast<opmath_t>(cp[ch * S]);
    o[idx] = static_cast<scalar_t>(acc);
  }
}

at::Tensor mul_sum_channels_cuda(const at::Tensor& a, const at::Tensor& c) {
  check_mul_sum_channels_args(a, c);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(mul_sum_channels_shape(a), a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out.zero_();
  const at::Tensor ac = a.contiguous(), cc = c.contiguous();
  const int64_t N = a.size(0), C = a.size(1), S = out.numel() / N;
  constexpr int threads = 256;
  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device().index()));
  const int blocks = static_cast<int>(std::min<int64_t>((N * S + threads - 1) / threads, static_cast<int64_t>(sms) * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mul_sum_channels_cuda", [&] {
    mul_sum_channels_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        ac.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, C, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrp_scratch, CUDA, m) {
  m.impl("relevance_filter", &relevance_filter_cuda);
  m.impl("filtered_stabilized_div", &filtered_stabilized_div_cuda);
  m.impl("mul_sum_channels", &mul_sum_channels_cuda);
}

}  // namespace lrp_scratch
