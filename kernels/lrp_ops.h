// Shared declarations of the lrp_scratch extension (kernels/ -> lrp_scratch._C).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define LRP_SCRATCH_HD __host__ __device__
#else
#define LRP_SCRATCH_HD
#endif

// Contiguous float/double loops of the CPU kernels are compiled for AVX-512 and AVX2 as well as the
// baseline on x86-64 Linux with GCC, and the loader picks the widest the CPU has (function multi-versioning),
// so a wheel built anywhere runs everywhere and still uses the vector units it finds.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && defined(__x86_64__) && defined(__linux__)
#define LRP_SCRATCH_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LRP_SCRATCH_MULTIVERSION
#endif

// Hand-vectorised loops (intrinsics in functions compiled for one instruction set each, chosen at run time):
// x86-64 with GCC or Clang only; elsewhere the portable loops serve.
#if defined(__GNUC__) && !defined(__CUDACC__) && defined(__x86_64__)
#define LRP_SCRATCH_X86_SIMD 1
#endif

namespace lrp_scratch {

#if !defined(__CUDACC__)
// Which threads ran the tasks of the CPU kernels' at::parallel_for since the last reset (bit t: thread t, threads
// past 63 share bit 63). Every task marks its thread once (one relaxed atomic OR per task, and tasks are at least
// a grain of work), so a test can check that the kernels run in parallel without timing the machine:
// lrp_scratch._C.thread_tally() reads the bits, lrp_scratch._C.reset_thread_tally() clears them.
inline std::atomic<uint64_t>& thread_tally() {
  static std::atomic<uint64_t> bits{0};
  return bits;
}
inline void note_thread() {
  const int t = std::min(std::max(at::get_thread_num(), 0), 63);
  thread_tally().fetch_or(uint64_t(1) << t, std::memory_order_relaxed);
}
#endif

// The instruction set of the hand-vectorised loops: the widest the CPU has, found once at load; tests lower it
// with lrp_scratch._C.set_cpu_isa to run every path on one machine.
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };
Isa cpu_isa();

// stabilized_div of one element, in the precision T (float for half/bfloat16): n / (d + eps*s(d)), s(0) = +1,
// and 0 where that denominator is 0. The division is unconditional and the select comes after it, so the
// compiler can if-convert and vectorise loops of it (x/0 never traps). Shared by every kernel that divides.
template <typename T>
LRP_SCRATCH_HD inline T stab_div_one(T n, T d, T e) {
  const T q = d >= T(0) ? d + e : d - e;
  const T r = n / q;
  return q == T(0) ? T(0) : r;
}

// Argument checks shared by the CPU and CUDA implementations, so both raise the same errors.
void check_stabilized_div_args(const at::Tensor& num, const at::Tensor& den, double eps);
void check_relevance_filter_args(const char* op, const at::Tensor& r, int64_t k);
void check_filtered_stabilized_div_args(const at::Tensor& r, const at::Tensor& den, double eps, int64_t k);
void check_mul_sum_channels_args(const at::Tensor& a, const at::Tensor& c);

// The shape every implementation returns: the broadcast of num and den.
std::vector<int64_t> stabilized_div_shape(const at::Tensor& num, const at::Tensor& den);
// (N, ...) -> (N, ...) without dimension 1: the shape of mul_sum_channels.
std::vector<int64_t> mul_sum_channels_shape(const at::Tensor& a);

// The selection of the relevance filter works on unsigned integer keys whose order is the order of the
// floating values: key(x) = bits(x) with the sign bit set for x >= 0, all bits flipped for x < 0; -0 is
// read as +0 first, so equal values (0 == -0) have equal keys. NaN is rejected before (it has no order).
template <typename scalar_t> struct KeyOf;
template <> struct KeyOf<double> { using type = uint64_t; };
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<at::Half> { using type = uint16_t; };
template <> struct KeyOf<at::BFloat16> { using type = uint16_t; };

template <typename K>
LRP_SCRATCH_HD inline K key_of_bits(K b) {
  constexpr K sign = K(K(1) << (sizeof(K) * 8 - 1));
  b = K(b & K(K(b == sign) - K(1)));                      // -0 -> +0 (branch-free)
  const K neg = K(K(0) - K(b >> (sizeof(K) * 8 - 1)));    // all ones for negative values
  return K(b ^ (neg | sign));
}

template <typename K>
LRP_SCRATCH_HD inline K bits_of_key(K key) {
  constexpr K sign = K(K(1) << (sizeof(K) * 8 - 1));
  return (key & sign) ? K(key ^ sign) : K(~key);
}

#ifdef LRP_SCRATCH_WITH_CUDA
at::Tensor stabilized_div_cuda(const at::Tensor& num, const at::Tensor& den, double eps);
#endif

}  // namespace lrp_scratch
