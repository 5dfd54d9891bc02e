// The relevance filter and the fused epilogues of LRP, CPU kernels and schemas (lrp_scratch._C).
//
// relevance_filter(r, k): r is (N, ...), read as N rows of M = numel/N values. Per row keep the k largest
//   values and write +0 elsewhere. Kept: every value strictly greater than t, the k-th largest value of the
//   row (counted with multiplicity), and of the values equal to t those with the lowest indices (in the
//   row-major order of r) until k are kept. Values are compared as numbers (-0 == +0, -inf < ... < +inf);
//   a kept value is copied bit for bit. NaN has no order: a NaN anywhere in r is an error. k >= M keeps
//   everything (a copy); k < 1 is an error. The result is contiguous, of r's shape and dtype.
// filtered_stabilized_div(r, den, eps, k) = stabilized_div(relevance_filter(r, k), den, eps), den of r's
//   shape, without materialising the filtered tensor.
// mul_sum_channels(a, c) = (a * c).sum(1) for a, c of the same shape (N, C, ...), products and sums in the
//   op-math precision (float for half/bfloat16), channels added in order; the product is never stored.
//
// The filter's selection works on order-preserving integer keys (see KeyOf in lrp_ops.h). Per row:
//   sample  about M/16 values (128 to 4096, strided) give a bound L that a little more than k keys exceed
//           (k's rank in the sample + 3 sigma, found by counting selection, below);
//   pass 1  reads the row and copies the keys >= L to a buffer (about 1.5 to 4 k keys; zeros are only counted,
//           since relevance is sparse), counting NaNs. With AVX-512: 16 floats per step, compared into a mask,
//           the kept keys compressed into a register that is stored whole (the count advances by the mask's
//           popcount); AVX2: 8 per step, the compress a permutation from a 256-entry table; otherwise groups of
//           8/16 are tested with a vectorisable comparison first, so groups with nothing to copy cost little;
//   select  the k-th largest key t, with the numbers of keys greater than and equal to t, from the buffer alone
//           (radix digits of 11 bits with in-place compaction while more than 4096 keys are left, then counting
//           selection: t is the largest key c with at least k keys >= c, found bit by bit, each bit one
//           vectorised counting pass over the keys; no data-dependent branches, which matters: nth_element's
//           mispredictions made it 2-3x slower on fresh data than on the benchmark's repeated input), or
//           directly from the count of zeros when the cut is 0;
//   pass 2  writes x >= t ? x : 0 (vectorised), or x > t ? x : 0 when values equal to t straddle the cut, followed
//           by a scan from the row's start that keeps the first `room` of them (short when ties are dense).
// When the sample misleads (too few keys >= L, or too many for the buffer) an exact fallback replaces the sample
// and pass 1: a histogram of the top 11 bits of every key (four sub-histograms, so runs of equal keys do not
// serialise), then the keys of the one bin that holds the k-th largest, then the lower digits on those only.
// Rows are processed in parallel with at::parallel_for (each row by one thread, so its passes hit the cache);
// when there are fewer rows than about twice the threads and the rows are long (>= 128 Ki values), each row is
// split into chunks: per-chunk buffers at exact offsets, per-chunk histograms in the fallback, per-chunk masking,
// all in parallel. No pass writes anything the size of r except the output.

#include "lrp_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#ifdef LRP_SCRATCH_X86_SIMD
#include <immintrin.h>
#endif

namespace lrp_scratch {

void check_relevance_filter_args(const char* op, const at::Tensor& r, int64_t k) {
  TORCH_CHECK(r.dim() >= 1, op, ": r must have a batch dimension (N, ...), got a 0-d tensor; use r[None]");
  TORCH_CHECK(at::isFloatingType(r.scalar_type()), op,
              ": expected a floating dtype (float16, bfloat16, float32, float64), got ", r.scalar_type());
  TORCH_CHECK(k >= 1, op, ": k must be >= 1 (the number of values kept per sample), got ", k);
}

void check_filtered_stabilized_div_args(const at::Tensor& r, const at::Tensor& den, double eps, int64_t k) {
  check_relevance_filter_args("filtered_stabilized_div", r, k);
  TORCH_CHECK(r.device() == den.device(), "filtered_stabilized_div: r and den must be on the same device, got ",
              r.device(), " and ", den.device());
  TORCH_CHECK(r.scalar_type() == den.scalar_type(), "filtered_stabilized_div: r and den must have the same dtype, got ",
              r.scalar_type(), " and ", den.scalar_type(), "; cast one of them with .to(other.dtype)");
  TORCH_CHECK(r.sizes() == den.sizes(), "filtered_stabilized_div: den must have the shape of r, got ", den.sizes(),
              " and ", r.sizes(), " (it does not broadcast: expand it first)");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "filtered_stabilized_div: eps must be finite and >= 0, got ", eps);
}

void check_mul_sum_channels_args(const at::Tensor& a, const at::Tensor& c) {
  TORCH_CHECK(a.dim() >= 2, "mul_sum_channels: a and c must be (N, C, ...), got ", a.dim(), " dimension(s)");
  TORCH_CHECK(a.device() == c.device(), "mul_sum_channels: a and c must be on the same device, got ", a.device(),
              " and ", c.device());
  TORCH_CHECK(a.scalar_type() == c.scalar_type(), "mul_sum_channels: a and c must have the same dtype, got ",
              a.scalar_type(), " and ", c.scalar_type(), "; cast one of them with .to(other.dtype)");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()),
              "mul_sum_channels: expected a floating dtype (float16, bfloat16, float32, float64), got ", a.scalar_type());
  TORCH_CHECK(a.sizes() == c.sizes(), "mul_sum_channels: a and c must have the same shape, got ", a.sizes(), " and ",
              c.sizes());
}

std::vector<int64_t> mul_sum_channels_shape(const at::Tensor& a) {
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.erase(shape.begin() + 1);
  return shape;
}

namespace {

// ------------------------------------------------------------------------------------------ selection
template <typename scalar_t>
inline typename KeyOf<scalar_t>::type key_of(scalar_t v) {
  using K = typename KeyOf<scalar_t>::type;
  K b;
  std::memcpy(&b, &v, sizeof(K));
  return key_of_bits<K>(b);
}

template <typename scalar_t>
inline scalar_t value_of_key(typename KeyOf<scalar_t>::type key) {
  using K = typename KeyOf<scalar_t>::type;
  const K b = bits_of_key<K>(key);
  scalar_t v;
  std::memcpy(&v, &b, sizeof(K));
  return v;
}

// Histogram of the top bits of the keys (key >> shift) of x[0, n) into h; returns the number of NaNs.
template <typename scalar_t>
int64_t histogram_top(const scalar_t* x, int64_t n, int shift, uint32_t* h) {
  using K = typename KeyOf<scalar_t>::type;
  const K hi = key_of<scalar_t>(std::numeric_limits<scalar_t>::infinity());
  const K lo = key_of<scalar_t>(-std::numeric_limits<scalar_t>::infinity());
  // Four sub-histograms, so that runs of equal keys (e.g. the zeros after a ReLU) do not serialise on one counter.
  const int64_t nbins = int64_t(1) << (sizeof(K) * 8 - shift);
  std::vector<uint32_t> sub(3 * nbins, 0);
  uint32_t* hs[4] = {h, sub.data(), sub.data() + nbins, sub.data() + 2 * nbins};
  int64_t nan = 0, i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const K key = key_of<scalar_t>(x[i + j]);
      ++hs[j][key >> shift];
      nan += (key > hi) | (key < lo);  // NaN keys lie above +inf's (positive sign) or below -inf's
    }
  }
  for (; i < n; ++i) {
    const K key = key_of<scalar_t>(x[i]);
    ++h[key >> shift];
    nan += (key > hi) | (key < lo);
  }
  for (int64_t b = 0; b < nbins; ++b) h[b] += sub[b] + sub[nbins + b] + sub[2 * nbins + b];
  return nan;
}

// Copies the keys of x[0, n) whose top bits are `bin` to out (branch-free: writes one slot past the count).
template <typename scalar_t>
int64_t gather_bin(const scalar_t* x, int64_t n, int shift, uint32_t bin, typename KeyOf<scalar_t>::type* out) {
  using K = typename KeyOf<scalar_t>::type;
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K key = key_of<scalar_t>(x[i]);
    out[j] = key;
    j += static_cast<uint32_t>(key >> shift) == bin;
  }
  return j;
}

struct Bin {
  uint32_t bin;  // the bin holding the k-th largest key
  int64_t above;  // how many keys lie in higher bins
};

inline Bin find_bin(const uint32_t* h, int64_t nbins, int64_t k) {
  int64_t cum = 0;
  for (int64_t b = nbins - 1; b > 0; --b) {
    if (cum + h[b] >= k) return {static_cast<uint32_t>(b), cum};
    cum += h[b];
  }
  return {0, cum};
}

template <typename K>
struct Cut {
  K key;            // the k-th largest key
  int64_t greater;  // keys > key
  int64_t equal;    // keys == key
};

// Counting selection for small key sets: how many keys are >= c is one vectorised pass (the compiler vectorises these
// loops; multi-versioned), and the k-th largest key t is the largest c with count(>= c) >= k, found bit by bit from
// the highest bit in which the smallest and largest key differ (at most the key's width in passes, no branches that
// depend on the data, unlike nth_element, whose mispredictions dominate on arrays of a few hundred keys).
// target_clones does not apply to templates: each body below is written once and stamped per key type.
#define LRP_SCRATCH_COUNT_GE(K, Acc)                                        \
  LRP_SCRATCH_MULTIVERSION                                                  \
  int64_t count_ge(const K* __restrict b, int64_t n, K c) {                 \
    Acc s = 0; /* n < 2^32 (a row) */                                       \
    for (int64_t i = 0; i < n; ++i) s += b[i] >= c;                         \
    return static_cast<int64_t>(s);                                         \
  }                                                                         \
  LRP_SCRATCH_MULTIVERSION                                                  \
  void min_max(const K* __restrict b, int64_t n, K& lo, K& hi) {            \
    K l = b[0], h = b[0];                                                   \
    for (int64_t i = 0; i < n; ++i) l = std::min(l, b[i]), h = std::max(h, b[i]); \
    lo = l, hi = h;                                                         \
  }
LRP_SCRATCH_COUNT_GE(uint16_t, uint32_t)
LRP_SCRATCH_COUNT_GE(uint32_t, uint32_t)
LRP_SCRATCH_COUNT_GE(uint64_t, uint64_t)
#undef LRP_SCRATCH_COUNT_GE

// The k-th largest of b[0, n) (1 <= k <= n), counted with multiplicity.
template <typename K>
K kth_largest(const K* b, int64_t n, int64_t k) {
  K lo, hi;
  min_max(b, n, lo, hi);
  const uint64_t diff = uint64_t(lo) ^ uint64_t(hi);
  if (diff == 0) return lo;
  const int top = 63 - __builtin_clzll(diff);  // the highest bit in which the keys differ
  const uint64_t below = (uint64_t(2) << top) - 1;  // top < 64 bits; for top = 63 this wraps to all ones, as wanted
  uint64_t t = uint64_t(hi) & ~below;  // the bits above `top`, common to all keys
  for (int bit = top; bit >= 0; --bit) {
    const uint64_t c = t | (uint64_t(1) << bit);
    if (count_ge(b, n, static_cast<K>(c)) >= k) t = c;
  }
  return static_cast<K>(t);
}

// The k-th largest key of buf[0, n), whose keys agree on all bits above `shift`. Overwrites buf.
template <typename K>
Cut<K> select_in_buffer(K* buf, int64_t n, int64_t k, int shift, int digit_bits, std::vector<uint32_t>& h) {
  int64_t greater = 0;
  while (true) {
    if (shift == 0) return {buf[0], greater, n};  // every key left is equal
    if (n <= 4096) {  // small: counting selection (below about 4096 keys it beats another radix digit)
      const K t = kth_largest(buf, n, k);
      const int64_t ge = count_ge(buf, n, t);
      const int64_t g = t == std::numeric_limits<K>::max() ? 0 : count_ge(buf, n, static_cast<K>(t + 1));
      return {t, greater + g, ge - g};
    }
    const int d = std::min(digit_bits, shift);
    const int s = shift - d;
    const K mask = static_cast<K>((uint64_t(1) << d) - 1);
    h.assign(size_t(1) << d, 0);
    for (int64_t i = 0; i < n; ++i) ++h[(buf[i] >> s) & mask];
    const Bin b = find_bin(h.data(), int64_t(1) << d, k);
    greater += b.above;
    k -= b.above;
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {  // in-place compaction: j <= i
      const K v = buf[i];
      buf[j] = v;
      j += ((v >> s) & mask) == b.bin;
    }
    n = j;
    shift = s;
  }
}

// ------------------------------------------------------------------------------------------ epilogues
// An epilogue writes the output of flat indices [begin, end) given the cut t: `cmp` keeps x >= t (no ties straddle
// the cut) or x > t (`strict`, when they do); `fix` then keeps the first `room` values equal to t in index order.

// The float and double loops, one body each stamped per type (target_clones does not apply to templates).
#define LRP_SCRATCH_KEEP_CMP(T)                                                                                  \
  LRP_SCRATCH_MULTIVERSION                                                                                       \
  void keep_cmp(const T* __restrict x, T* __restrict o, int64_t n, T t, bool strict) {                           \
    if (strict) for (int64_t i = 0; i < n; ++i) o[i] = x[i] > t ? x[i] : T(0);                                   \
    else for (int64_t i = 0; i < n; ++i) o[i] = x[i] >= t ? x[i] : T(0);                                         \
  }                                                                                                              \
  LRP_SCRATCH_MULTIVERSION                                                                                       \
  void keep_cmp_div(const T* __restrict x, const T* __restrict d, T* __restrict o, int64_t n, T t, T e,          \
                    bool strict) {                                                                               \
    if (strict) for (int64_t i = 0; i < n; ++i) o[i] = stab_div_one<T>(x[i] > t ? x[i] : T(0), d[i], e);         \
    else for (int64_t i = 0; i < n; ++i) o[i] = stab_div_one<T>(x[i] >= t ? x[i] : T(0), d[i], e);               \
  }
LRP_SCRATCH_KEEP_CMP(float)
LRP_SCRATCH_KEEP_CMP(double)
#undef LRP_SCRATCH_KEEP_CMP

template <typename scalar_t>
struct FilterEpilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* o;
  void cmp(int64_t begin, int64_t end, scalar_t t, bool strict) const {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      keep_cmp(x + begin, o + begin, end - begin, t, strict);
    } else {
      const opmath_t tt = static_cast<opmath_t>(t);
      for (int64_t i = begin; i < end; ++i) {
        const opmath_t v = static_cast<opmath_t>(x[i]);
        o[i] = (strict ? v > tt : v >= tt) ? x[i] : scalar_t(0);
      }
    }
  }
  void keep(int64_t i) const { o[i] = x[i]; }
  void all(int64_t begin, int64_t end) const {  // nothing filtered (k >= M): a copy
    std::memcpy(o + begin, x + begin, (end - begin) * sizeof(scalar_t));
  }
};

template <typename scalar_t>
struct DivEpilogue {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* d;
  scalar_t* o;
  double eps;
  void cmp(int64_t begin, int64_t end, scalar_t t, bool strict) const {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      keep_cmp_div(x + begin, d + begin, o + begin, end - begin, t, static_cast<scalar_t>(eps), strict);
    } else {
      const opmath_t tt = static_cast<opmath_t>(t), e = static_cast<opmath_t>(eps);
      for (int64_t i = begin; i < end; ++i) {
        const opmath_t v = static_cast<opmath_t>(x[i]);
        const bool kept = strict ? v > tt : v >= tt;
        o[i] = static_cast<scalar_t>(stab_div_one<opmath_t>(kept ? v : opmath_t(0), static_cast<opmath_t>(d[i]), e));
      }
    }
  }
  void keep(int64_t i) const {
    o[i] = static_cast<scalar_t>(stab_div_one<opmath_t>(static_cast<opmath_t>(x[i]), static_cast<opmath_t>(d[i]),
                                                        static_cast<opmath_t>(eps)));
  }
  void all(int64_t begin, int64_t end) const {  // nothing filtered (k >= M): the plain stabilised division
    for (int64_t i = begin; i < end; ++i) keep(i);
  }
};

// Keeps the first `room` values equal to t of x[begin, end) (after `cmp` with strict = true).
template <typename scalar_t, typename Epilogue>
void keep_first_ties(const scalar_t* x, int64_t begin, int64_t end, scalar_t t, int64_t room, const Epilogue& epi) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t tt = static_cast<opmath_t>(t);
  for (int64_t i = begin; i < end && room > 0; ++i)
    if (static_cast<opmath_t>(x[i]) == tt) epi.keep(i), --room;
}

constexpr int64_t kChunk = 65536;  // elements per chunk when a row is split across threads
constexpr int64_t kBlock = 1024;   // gather_ge checks its buffer's room every kBlock elements

// Step 0, from a sample: a key L that probably has a little more than k keys of the row at or above it.
// Returns L and the room to give the buffer of those keys (twice the expected count, plus slack).
template <typename scalar_t>
std::pair<typename KeyOf<scalar_t>::type, int64_t> sample_bound(const scalar_t* x, int64_t M, int64_t k,
                                                                std::vector<typename KeyOf<scalar_t>::type>& s) {
  const int64_t S = std::clamp<int64_t>(M / 16, std::min<int64_t>(M, 128), 4096);
  s.resize(S);
  for (int64_t i = 0; i < S; ++i) s[i] = key_of<scalar_t>(x[(i * M) / S]);
  const double ks = double(k) * double(S) / double(M);               // k's rank in the sample
  const int64_t rank = std::min<int64_t>(S, int64_t(ks + 3.0 * std::sqrt(ks) + 4.0));  // + 3 sigma and some
  const int64_t expected = int64_t(double(M) * double(rank) / double(S));
  return {kth_largest(s.data(), S, rank), 2 * expected + 2 * kBlock};
}

// Step 1: copies the keys >= L of x[0, n) to out (room for `cap`), except zeros, which are only counted (relevance
// is sparse: most of a row may be 0); also counts NaNs. Returns the number of keys copied, or -1 when they would
// not fit (the sample was misleading: the caller falls back to the histogram). Two loops, so that each keeps its
// counters in registers: zeros matter only when they are >= L.
template <typename scalar_t>
__attribute__((noinline)) int64_t gather_ge(const scalar_t* __restrict x, int64_t n, typename KeyOf<scalar_t>::type L,
                                            typename KeyOf<scalar_t>::type* __restrict out, int64_t cap, int64_t& zeros,
                                            int64_t& nan) {
  using K = typename KeyOf<scalar_t>::type;
  const K hi = key_of<scalar_t>(std::numeric_limits<scalar_t>::infinity());
  const K lo = key_of<scalar_t>(-std::numeric_limits<scalar_t>::infinity());
  const K zero = key_of<scalar_t>(scalar_t(0));
  int64_t j = 0, bad = 0, z = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    if (j + kBlock > cap) return -1;
    const int64_t i1 = std::min(n, i0 + kBlock);
    if (zero < L) {
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {  // as below: a vectorisable test of each group of 8 first
        uint32_t hit = 0, nans = 0;
        for (int l = 0; l < 8; ++l) {
          const K key = key_of<scalar_t>(x[i + l]);
          hit |= static_cast<uint32_t>(key >= L);
          nans |= static_cast<uint32_t>((key > hi) | (key < lo));
        }
        bad += nans;
        if (!hit) continue;
        for (int l = 0; l < 8; ++l) {
          const K key = key_of<scalar_t>(x[i + l]);
          out[j] = key;
          j += static_cast<int64_t>(key >= L);
        }
      }
      for (; i < i1; ++i) {
        const K key = key_of<scalar_t>(x[i]);
        out[j] = key;  // branch-free: written always, kept when the count advances
        j += static_cast<int64_t>(key >= L);
        bad += static_cast<int64_t>((key > hi) | (key < lo));
      }
    } else {
      int64_t i = i0;
      // Sparse relevance: most groups of 16 hold only zeros and values below L. A vectorisable test of the
      // whole group first; only groups with a key to copy take the element-wise loop.
      for (; i + 16 <= i1; i += 16) {
        uint32_t hit = 0, zs = 0, nans = 0;
        for (int l = 0; l < 16; ++l) {
          const K key = key_of<scalar_t>(x[i + l]);
          hit |= static_cast<uint32_t>((key >= L) & (key != zero));
          zs += static_cast<uint32_t>(key == zero);
          nans |= static_cast<uint32_t>((key > hi) | (key < lo));
        }
        z += zs;
        bad += nans;
        if (!hit) continue;
        for (int l = 0; l < 16; ++l) {
          const K key = key_of<scalar_t>(x[i + l]);
          out[j] = key;
          j += static_cast<int64_t>((key >= L) & (key != zero));
        }
      }
      for (; i < i1; ++i) {
        const K key = key_of<scalar_t>(x[i]);
        const int64_t is_zero = key == zero;
        out[j] = key;
        j += static_cast<int64_t>(key >= L) - is_zero;  // (key >= L holds for zeros here)
        z += is_zero;
        bad += static_cast<int64_t>((key > hi) | (key < lo));
      }
    }
  }
  nan += bad;
  zeros += z;
  return j;
}

// ------------------------------------------------------------------------------------------ step 1, vectorised
// gather_ge with AVX-512 (16 floats / 8 doubles per step: compare to a mask, compress the kept keys into a register
// and store the whole register; the count advances by the mask's popcount) or AVX2 (8 / 4 per step: the compress is
// a permutation from a 256- / 16-entry table). Same results as gather_ge: the same keys in the same order, the same
// zeros, NaN found. The whole register is stored, so the buffer needs one register of spare room: the caller's room
// check every kBlock values leaves kBlock slots. One loop per instruction set; the lane operations of each key width
// come from a small struct (Lanes512<K>, Lanes256<K>).
#ifdef LRP_SCRATCH_X86_SIMD
#define LRP_SCRATCH_AVX512 __attribute__((target("avx512f,popcnt"))) static inline
#define LRP_SCRATCH_AVX2 __attribute__((target("avx2,popcnt"))) static inline

// The permutation that moves the lanes set in a mask to the front, as 8 indices of 4 bits (32-bit lanes); for 64-bit
// lanes (a 4-bit mask) each lane is a pair of 32-bit lanes.
struct Compress8 {
  uint32_t idx[256];
  constexpr Compress8() : idx() {
    for (int m = 0; m < 256; ++m) {
      uint32_t w = 0;
      int p = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) w |= uint32_t(b) << (4 * p++);
      idx[m] = w;
    }
  }
};
struct Compress4x64 {
  uint32_t idx[16];
  constexpr Compress4x64() : idx() {
    for (int m = 0; m < 16; ++m) {
      uint32_t w = 0;
      int p = 0;
      for (int b = 0; b < 4; ++b)
        if (m >> b & 1) w |= (uint32_t(2 * b) << (4 * p)) | (uint32_t(2 * b + 1) << (4 * p + 4)), p += 2;
      idx[m] = w;
    }
  }
};
constexpr Compress8 kCompress8{};
constexpr Compress4x64 kCompress4x64{};

template <typename K> struct Lanes512;
template <> struct Lanes512<uint32_t> {
  using Mask = __mmask16;
  static constexpr int n = 16;
  LRP_SCRATCH_AVX512 __m512i set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  LRP_SCRATCH_AVX512 __m512i load(Mask m, const void* p) { return _mm512_maskz_loadu_epi32(m, p); }
  LRP_SCRATCH_AVX512 Mask eq(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpeq_epi32_mask(m, a, b); }
  LRP_SCRATCH_AVX512 Mask ge(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpge_epu32_mask(m, a, b); }
  LRP_SCRATCH_AVX512 Mask gt(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpgt_epu32_mask(m, a, b); }
  LRP_SCRATCH_AVX512 __m512i zero_where(Mask m, __m512i b) { return _mm512_mask_mov_epi32(b, m, _mm512_setzero_si512()); }
  LRP_SCRATCH_AVX512 __m512i sign_fill(__m512i b) { return _mm512_maskz_srai_epi32(Mask(0xFFFF), b, 31); }
  LRP_SCRATCH_AVX512 __m512i compress(Mask m, __m512i v) { return _mm512_maskz_compress_epi32(m, v); }
};
template <> struct Lanes512<uint64_t> {
  using Mask = __mmask8;
  static constexpr int n = 8;
  LRP_SCRATCH_AVX512 __m512i set1(uint64_t v) { return _mm512_set1_epi64(static_cast<long long>(v)); }
  LRP_SCRATCH_AVX512 __m512i load(Mask m, const void* p) { return _mm512_maskz_loadu_epi64(m, p); }
  LRP_SCRATCH_AVX512 Mask eq(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpeq_epi64_mask(m, a, b); }
  LRP_SCRATCH_AVX512 Mask ge(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpge_epu64_mask(m, a, b); }
  LRP_SCRATCH_AVX512 Mask gt(Mask m, __m512i a, __m512i b) { return _mm512_mask_cmpgt_epu64_mask(m, a, b); }
  LRP_SCRATCH_AVX512 __m512i zero_where(Mask m, __m512i b) { return _mm512_mask_mov_epi64(b, m, _mm512_setzero_si512()); }
  LRP_SCRATCH_AVX512 __m512i sign_fill(__m512i b) { return _mm512_maskz_srai_epi64(Mask(0xFF), b, 63); }
  LRP_SCRATCH_AVX512 __m512i compress(Mask m, __m512i v) { return _mm512_maskz_compress_epi64(m, v); }
};

// AVX2 has no unsigned compare and no masks: keys are compared as signed integers with the sign bit flipped (key ^
// sign is the float's bits with the other bits flipped for negative values, an order-preserving signed integer), and
// masks are vectors of all-ones lanes.
template <typename K> struct Lanes256;
template <> struct Lanes256<uint32_t> {
  static constexpr int n = 8;
  LRP_SCRATCH_AVX2 __m256i set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  LRP_SCRATCH_AVX2 __m256i index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  LRP_SCRATCH_AVX2 __m256i load(const void* p, __m256i m) { return _mm256_maskload_epi32(static_cast<const int*>(p), m); }
  LRP_SCRATCH_AVX2 __m256i eq(__m256i a, __m256i b) { return _mm256_cmpeq_epi32(a, b); }
  LRP_SCRATCH_AVX2 __m256i gt(__m256i a, __m256i b) { return _mm256_cmpgt_epi32(a, b); }
  LRP_SCRATCH_AVX2 unsigned bits(__m256i m) { return static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }
  LRP_SCRATCH_AVX2 __m256i front(unsigned bits) {  // the lane permutation that moves the set lanes to the front
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompress8.idx[bits])), shifts),
                            _mm256_set1_epi32(15));
  }
};
template <> struct Lanes256<uint64_t> {
  static constexpr int n = 4;
  LRP_SCRATCH_AVX2 __m256i set1(uint64_t v) { return _mm256_set1_epi64x(static_cast<long long>(v)); }
  LRP_SCRATCH_AVX2 __m256i index() { return _mm256_setr_epi64x(0, 1, 2, 3); }
  LRP_SCRATCH_AVX2 __m256i load(const void* p, __m256i m) {
    return _mm256_maskload_epi64(static_cast<const long long*>(p), m);
  }
  LRP_SCRATCH_AVX2 __m256i eq(__m256i a, __m256i b) { return _mm256_cmpeq_epi64(a, b); }
  LRP_SCRATCH_AVX2 __m256i gt(__m256i a, __m256i b) { return _mm256_cmpgt_epi64(a, b); }
  LRP_SCRATCH_AVX2 unsigned bits(__m256i m) { return static_cast<unsigned>(_mm256_movemask_pd(_mm256_castsi256_pd(m))); }
  LRP_SCRATCH_AVX2 __m256i front(unsigned bits) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompress4x64.idx[bits])), shifts),
                            _mm256_set1_epi32(15));
  }
};

template <typename scalar_t>
__attribute__((target("avx512f,popcnt"))) int64_t gather_ge_avx512(const scalar_t* __restrict x, int64_t n,
                                                                   typename KeyOf<scalar_t>::type L,
                                                                   typename KeyOf<scalar_t>::type* __restrict out,
                                                                   int64_t cap, int64_t& zeros, int64_t& nan) {
  using K = typename KeyOf<scalar_t>::type;
  using V = Lanes512<K>;
  using Mask = typename V::Mask;
  constexpr K kSign = K(K(1) << (sizeof(K) * 8 - 1));  // also the key of +0
  const __m512i sign = V::set1(kSign), Lv = V::set1(L);
  const __m512i hi = V::set1(key_of<scalar_t>(std::numeric_limits<scalar_t>::infinity()));
  const __m512i lo = V::set1(key_of<scalar_t>(-std::numeric_limits<scalar_t>::infinity()));
  const bool zero_ge = kSign >= L;
  int64_t j = 0, z = 0;
  Mask bad = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    if (j + kBlock > cap) return -1;
    const int64_t i1 = std::min(n, i0 + kBlock);
    for (int64_t i = i0; i < i1; i += V::n) {
      const Mask live = i + V::n <= i1 ? Mask(~Mask(0)) : Mask((1u << (i1 - i)) - 1);
      __m512i b = V::load(live, x + i);
      b = V::zero_where(V::eq(Mask(~Mask(0)), b, sign), b);  // -0 -> +0
      const __m512i key = _mm512_xor_si512(b, _mm512_or_si512(V::sign_fill(b), sign));
      Mask ge = V::ge(live, key, Lv);
      bad |= V::gt(live, key, hi) | V::gt(live, lo, key);
      if (zero_ge) {
        const Mask isz = V::eq(live, key, sign);
        z += _mm_popcnt_u32(isz);
        ge &= Mask(~isz);
      }
      _mm512_storeu_si512(out + j, V::compress(ge, key));  // compress in a register: fast everywhere
      j += _mm_popcnt_u32(ge);
    }
  }
  nan += bad != 0;
  zeros += z;
  return j;
}

template <typename scalar_t>
__attribute__((target("avx2,popcnt"))) int64_t gather_ge_avx2(const scalar_t* __restrict x, int64_t n,
                                                               typename KeyOf<scalar_t>::type L,
                                                               typename KeyOf<scalar_t>::type* __restrict out,
                                                               int64_t cap, int64_t& zeros, int64_t& nan) {
  using K = typename KeyOf<scalar_t>::type;
  using V = Lanes256<K>;
  constexpr K kSign = K(K(1) << (sizeof(K) * 8 - 1));
  const __m256i sign = V::set1(kSign), low = V::set1(K(~kSign)), zero = _mm256_setzero_si256();
  const __m256i Ls = V::set1(L ^ kSign);  // compared signed: every key ^ sign
  const __m256i his = V::set1(key_of<scalar_t>(std::numeric_limits<scalar_t>::infinity()) ^ kSign);
  const __m256i los = V::set1(key_of<scalar_t>(-std::numeric_limits<scalar_t>::infinity()) ^ kSign);
  const __m256i lane = V::index();
  const bool zero_ge = kSign >= L;
  int64_t j = 0, z = 0;
  __m256i bad = zero;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    if (j + kBlock > cap) return -1;
    const int64_t i1 = std::min(n, i0 + kBlock);
    for (int64_t i = i0; i < i1; i += V::n) {
      const __m256i live = V::gt(V::set1(K(std::min<int64_t>(V::n, i1 - i))), lane);
      __m256i b = V::load(x + i, live);
      b = _mm256_andnot_si256(V::eq(b, sign), b);                                  // -0 -> +0
      const __m256i ks = _mm256_xor_si256(b, _mm256_and_si256(V::gt(zero, b), low));  // key ^ sign
      __m256i ge = _mm256_andnot_si256(V::gt(Ls, ks), live);
      bad = _mm256_or_si256(bad, _mm256_and_si256(live, _mm256_or_si256(V::gt(ks, his), V::gt(los, ks))));
      if (zero_ge) {
        const __m256i isz = _mm256_and_si256(V::eq(ks, zero), live);
        z += _mm_popcnt_u32(V::bits(isz));
        ge = _mm256_andnot_si256(isz, ge);
      }
      const unsigned m = V::bits(ge);
      const __m256i key = _mm256_xor_si256(ks, sign);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permutevar8x32_epi32(key, V::front(m)));
      j += _mm_popcnt_u32(m);
    }
  }
  nan += !_mm256_testz_si256(bad, bad);
  zeros += z;
  return j;
}
#undef LRP_SCRATCH_AVX512
#undef LRP_SCRATCH_AVX2
#endif

// Step 1 with the widest loop the CPU (and cpu_isa()) allows; 16-bit types take the portable loop.
template <typename scalar_t>
int64_t gather_keys_ge(const scalar_t* x, int64_t n, typename KeyOf<scalar_t>::type L,
                       typename KeyOf<scalar_t>::type* out, int64_t cap, int64_t& zeros, int64_t& nan) {
#ifdef LRP_SCRATCH_X86_SIMD
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    switch (cpu_isa()) {
      case Isa::avx512: return gather_ge_avx512(x, n, L, out, cap, zeros, nan);
      case Isa::avx2: return gather_ge_avx2(x, n, L, out, cap, zeros, nan);
      default: break;
    }
  }
#endif
  return gather_ge<scalar_t>(x, n, L, out, cap, zeros, nan);
}

void fail_nan(int64_t row) {
  TORCH_CHECK(false, "relevance_filter: r contains NaN (sample ", row, "); NaN has no order, so the k largest values "
              "are undefined. Find where the relevance became NaN (e.g. torch.isnan(r).any() per layer).");
}

template <typename scalar_t>
struct RowCut {
  scalar_t t;       // the k-th largest value
  int64_t room;     // how many of the values equal to t are kept (lowest indices first)
  bool straddle;    // whether some values equal to t are not kept
};

template <typename scalar_t, typename K>
RowCut<scalar_t> row_cut(const Cut<K>& c, int64_t greater_outside, int64_t k) {
  const int64_t greater = greater_outside + c.greater;
  return {value_of_key<scalar_t>(c.key), k - greater, greater + c.equal > k};
}

// The cut from the keys >= L but zeros (buf[0, n)) and the number of zeros of the row. False when the k-th largest
// key is not among them (the caller falls back to the histogram).
template <typename scalar_t>
bool cut_from_gathered(typename KeyOf<scalar_t>::type* buf, int64_t n, int64_t zeros, typename KeyOf<scalar_t>::type L,
                       int64_t k, std::vector<uint32_t>& h, RowCut<scalar_t>& out) {
  using K = typename KeyOf<scalar_t>::type;
  constexpr int W = sizeof(K) * 8;
  const int D = 11;
  const K zero = key_of<scalar_t>(scalar_t(0));
  const bool with_zeros = zeros > 0 && zero >= L;  // the zeros belong to the keys >= L
  if (n + (with_zeros ? zeros : 0) < k) return false;
  if (!with_zeros) {
    out = row_cut<scalar_t>(select_in_buffer<K>(buf, n, k, W, D, h), 0, k);
    return true;
  }
  int64_t pos = 0;  // keys above zero
  if (n > 0) pos = count_ge(buf, n, static_cast<K>(zero + 1));
  if (k <= pos) {  // the cut is positive: the zeros are below it
    out = row_cut<scalar_t>(select_in_buffer<K>(buf, n, k, W, D, h), 0, k);
  } else if (k <= pos + zeros) {  // the cut is 0: every positive value, and the first zeros
    out = {scalar_t(0), k - pos, pos + zeros > k};
  } else {  // the cut is negative: every positive value and zero are above it
    out = row_cut<scalar_t>(select_in_buffer<K>(buf, n, k - zeros, W, D, h), zeros, k);
  }
  return true;
}

// The exact path, used when the sample's bound fails: a histogram of the top digit of all keys, then the keys
// of the bin holding the k-th largest, then the remaining digits on those keys only.
template <typename scalar_t>
RowCut<scalar_t> cut_by_histogram(const scalar_t* x, int64_t M, int64_t k, int64_t row, std::vector<uint32_t>& h,
                                  std::vector<typename KeyOf<scalar_t>::type>& buf) {
  using K = typename KeyOf<scalar_t>::type;
  constexpr int W = sizeof(K) * 8;
  const int D = M >= 65536 ? 11 : 8;
  const int64_t nbins = int64_t(1) << D;
  h.assign(nbins, 0);
  if (histogram_top(x, M, W - D, h.data()) != 0) fail_nan(row);
  const Bin b = find_bin(h.data(), nbins, k);
  buf.resize(h[b.bin] + 1);
  const int64_t n = gather_bin(x, M, W - D, b.bin, buf.data());
  return row_cut<scalar_t>(select_in_buffer<K>(buf.data(), n, k - b.above, W - D, D, h), b.above, k);
}

// Filters the N rows of length M of the contiguous x through `epi`.
template <typename scalar_t, typename Epilogue>
void filter_rows(const scalar_t* x, int64_t N, int64_t M, int64_t k, const Epilogue& epi) {
  using K = typename KeyOf<scalar_t>::type;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks_per_row =
      (N >= 2 * threads || M < 2 * kChunk) ? 1 : std::min<int64_t>((M + kChunk - 1) / kChunk, (2 * threads + N - 1) / N);

  if (chunks_per_row == 1) {  // one row per task: all passes of a row by one thread, while it is in cache
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      note_thread();
      std::vector<uint32_t> h;
      std::vector<K> buf, s;
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* xr = x + row * M;
        const auto [L, cap] = sample_bound(xr, M, k, s);
        buf.resize(cap);
        int64_t nan = 0, zeros = 0;
        const int64_t n = gather_keys_ge(xr, M, L, buf.data(), cap, zeros, nan);
        if (nan) fail_nan(row);
        RowCut<scalar_t> c;
        if (n < 0 || !cut_from_gathered<scalar_t>(buf.data(), n, zeros, L, k, h, c)) c = cut_by_histogram(xr, M, k, row, h, buf);
        epi.cmp(row * M, row * M + M, c.t, c.straddle);
        if (c.straddle) keep_first_ties(x, row * M, row * M + M, c.t, c.room, epi);
      }
    });
    return;
  }

  // Few long rows: the passes over the data are split into chunks, all in parallel.
  const int64_t CL = (M + chunks_per_row - 1) / chunks_per_row;
  const int64_t U = N * chunks_per_row;
  auto lo = [&](int64_t u) { return (u / chunks_per_row) * M + std::min(M, (u % chunks_per_row) * CL); };
  auto hi = [&](int64_t u) { return (u / chunks_per_row) * M + std::min(M, (u % chunks_per_row + 1) * CL); };
  std::vector<K> bound(N);
  std::vector<int64_t> cap(U), offset(U), got(U), nan(U, 0), zeros(U, 0);
  std::vector<std::vector<K>> bufs(N);
  {
    std::vector<K> s;
    for (int64_t row = 0; row < N; ++row) {
      const auto [L, row_cap] = sample_bound(x + row * M, M, k, s);
      bound[row] = L;
      int64_t off = 0;
      for (int64_t c = 0; c < chunks_per_row; ++c) {
        const int64_t u = row * chunks_per_row + c;
        cap[u] = (row_cap * (hi(u) - lo(u))) / M + 2 * kBlock;
        offset[u] = off;
        off += cap[u];
      }
      bufs[row].resize(off);
    }
  }
  at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
    note_thread();
    for (int64_t u = begin; u < end; ++u) {
      const int64_t row = u / chunks_per_row;
      got[u] = gather_keys_ge(x + lo(u), hi(u) - lo(u), bound[row], bufs[row].data() + offset[u], cap[u], zeros[u], nan[u]);
    }
  });
  std::vector<RowCut<scalar_t>> cuts(N);
  std::vector<char> exact(N, 1);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    note_thread();
    std::vector<uint32_t> h;
    for (int64_t row = begin; row < end; ++row) {
      K* buf = bufs[row].data();
      int64_t n = 0, z = 0;
      bool fits = true;
      for (int64_t c = 0; c < chunks_per_row; ++c) {
        const int64_t u = row * chunks_per_row + c;
        if (nan[u]) fail_nan(row);
        z += zeros[u];
        if (got[u] < 0) { fits = false; continue; }
        std::memmove(buf + n, buf + offset[u], got[u] * sizeof(K));  // close the gaps between the chunks' keys
        n += got[u];
      }
      exact[row] = fits && cut_from_gathered<scalar_t>(buf, n, z, bound[row], k, h, cuts[row]);
    }
  });
  for (int64_t row = 0; row < N; ++row) {
    if (exact[row]) continue;
    // Fallback, chunked: per-chunk histograms of the top digit, summed; the keys of the bin at exact offsets.
    constexpr int W = sizeof(K) * 8;
    const int D = 11;
    const int64_t nbins = int64_t(1) << D;
    const int shift0 = W - D;
    std::vector<uint32_t> H(chunks_per_row * nbins, 0), h(nbins, 0);
    std::vector<int64_t> bad(chunks_per_row, 0), off(chunks_per_row + 1, 0), cnt(chunks_per_row);
    const scalar_t* xr = x + row * M;
    auto clo = [&](int64_t c) { return std::min(M, c * CL); };
    auto chi = [&](int64_t c) { return std::min(M, (c + 1) * CL); };
    at::parallel_for(0, chunks_per_row, 1, [&](int64_t begin, int64_t end) {
      note_thread();
      for (int64_t c = begin; c < end; ++c) bad[c] = histogram_top(xr + clo(c), chi(c) - clo(c), shift0, H.data() + c * nbins);
    });
    for (int64_t c = 0; c < chunks_per_row; ++c) {
      if (bad[c]) fail_nan(row);
      for (int64_t b = 0; b < nbins; ++b) h[b] += H[c * nbins + b];
    }
    const Bin b = find_bin(h.data(), nbins, k);
    for (int64_t c = 0; c < chunks_per_row; ++c) off[c + 1] = off[c] + H[c * nbins + b.bin] + 1;  // + a spare slot
    std::vector<K> buf(off[chunks_per_row]);
    at::parallel_for(0, chunks_per_row, 1, [&](int64_t begin, int64_t end) {
      note_thread();
      for (int64_t c = begin; c < end; ++c) cnt[c] = gather_bin(xr + clo(c), chi(c) - clo(c), shift0, b.bin, buf.data() + off[c]);
    });
    int64_t n = 0;
    for (int64_t c = 0; c < chunks_per_row; ++c) {
      std::memmove(buf.data() + n, buf.data() + off[c], cnt[c] * sizeof(K));
      n += cnt[c];
    }
    cuts[row] = row_cut<scalar_t>(select_in_buffer<K>(buf.data(), n, k - b.above, shift0, D, h), b.above, k);
  }
  at::parallel_for(0, U, 1, [&](int64_t begin, int64_t end) {
    note_thread();
    for (int64_t u = begin; u < end; ++u) {
      const RowCut<scalar_t>& c = cuts[u / chunks_per_row];
      epi.cmp(lo(u), hi(u), c.t, c.straddle);
    }
  });
  // Ties straddling the cut: the first `room` of them in index order are kept (a scan from the row's start that
  // stops there; short when ties are dense, e.g. the zeros of sparse relevance).
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    note_thread();
    for (int64_t row = begin; row < end; ++row)
      if (cuts[row].straddle) keep_first_ties(x, row * M, row * M + M, cuts[row].t, cuts[row].room, epi);
  });
}

// The filter over the rows of the contiguous x through the epilogue make(scalar_t{}) returns; k >= M: epi.all.
template <typename Make>
void filter_op(const char* name, const at::Tensor& x, int64_t k, const Make& make) {
  if (x.numel() == 0) return;
  const int64_t N = x.size(0), M = x.numel() / N;
  TORCH_CHECK(M < (int64_t(1) << 32), name, ": rows of 2^32 values or more are not supported, got ", M);
  // (the dtype was checked before: the dispatch name, which must be a literal, never shows in an error)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrp_scratch_filter_cpu", [&] {
    const auto epi = make(scalar_t{});
    if (k >= M) {  // everything is kept: no order is needed, so NaN passes too
      at::parallel_for(0, x.numel(), kChunk, [&](int64_t b, int64_t e) { note_thread(); epi.all(b, e); });
      return;
    }
    filter_rows<scalar_t>(x.const_data_ptr<scalar_t>(), N, M, k, epi);
  });
}

at::Tensor relevance_filter_cpu(const at::Tensor& r, int64_t k) {
  check_relevance_filter_args("relevance_filter", r, k);
  const at::Tensor x = r.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  filter_op("relevance_filter", x, k, [&](auto tag) {
    using scalar_t = decltype(tag);
    return FilterEpilogue<scalar_t>{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>()};
  });
  return out;
}

at::Tensor filtered_stabilized_div_cpu(const at::Tensor& r, const at::Tensor& den, double eps, int64_t k) {
  check_filtered_stabilized_div_args(r, den, eps, k);
  const at::Tensor x = r.contiguous();
  const at::Tensor d = den.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  filter_op("filtered_stabilized_div", x, k, [&](auto tag) {
    using scalar_t = decltype(tag);
    return DivEpilogue<scalar_t>{x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), eps};
  });
  return out;
}

// ------------------------------------------------------------------------------------------ mul_sum_channels
// C <= 4 (the input relevance of images): one loop over positions reading every channel, no accumulator array.
// The channels are added in order from the first product (as the accumulator loop does, up to the sign of a zero).
// Otherwise (mul_acc) blocks of positions accumulate channel by channel.
#define LRP_SCRATCH_MUL_SUM(T)                                                                                 \
  LRP_SCRATCH_MULTIVERSION                                                                                     \
  void mul_acc(T* __restrict acc, const T* __restrict a, const T* __restrict c, int64_t n) {                    \
    for (int64_t i = 0; i < n; ++i) acc[i] += a[i] * c[i];                                                     \
  }                                                                                                            \
  LRP_SCRATCH_MULTIVERSION                                                                                     \
  void mul_sum_few(const T* __restrict a, const T* __restrict c, T* __restrict o, int64_t C, int64_t S,         \
                   int64_t len) {                                                                              \
    const T *a1 = a + S, *a2 = a + 2 * S, *a3 = a + 3 * S, *c1 = c + S, *c2 = c + 2 * S, *c3 = c + 3 * S;      \
    switch (C) {                                                                                               \
      case 1: for (int64_t s = 0; s < len; ++s) o[s] = a[s] * c[s]; break;                                    \
      case 2: for (int64_t s = 0; s < len; ++s) o[s] = a[s] * c[s] + a1[s] * c1[s]; break;                     \
      case 3: for (int64_t s = 0; s < len; ++s) o[s] = (a[s] * c[s] + a1[s] * c1[s]) + a2[s] * c2[s]; break;   \
      default:                                                                                                 \
        for (int64_t s = 0; s < len; ++s) o[s] = ((a[s] * c[s] + a1[s] * c1[s]) + a2[s] * c2[s]) + a3[s] * c3[s]; \
    }                                                                                                          \
  }
LRP_SCRATCH_MUL_SUM(float)
LRP_SCRATCH_MUL_SUM(double)
#undef LRP_SCRATCH_MUL_SUM

template <typename scalar_t>
void mul_sum_channels_kernel(const scalar_t* a, const scalar_t* c, scalar_t* o, int64_t N, int64_t C, int64_t S) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int64_t B = 1024;  // spatial positions per task: the accumulator stays in L1
  const int64_t blocks = (S + B - 1) / B;
  constexpr bool wide = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  at::parallel_for(0, N * blocks, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * std::min(S, B))),
                   [&](int64_t begin, int64_t end) {
    note_thread();
    opmath_t acc[B];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / blocks, s0 = (u % blocks) * B, len = std::min(B, S - s0);
      scalar_t* op = o + n * S + s0;
      if constexpr (wide) {
        if (C >= 1 && C <= 4) {
          mul_sum_few(a + n * C * S + s0, c + n * C * S + s0, op, C, S, len);
          continue;
        }
      }
      for (int64_t s = 0; s < len; ++s) acc[s] = opmath_t(0);
      for (int64_t ch = 0; ch < C; ++ch) {
        const scalar_t* ap = a + (n * C + ch) * S + s0;
        const scalar_t* cp = c + (n * C + ch) * S + s0;
        if constexpr (wide) {
          mul_acc(acc, ap, cp, len);
        } else {
          for (int64_t s = 0; s < len; ++s) acc[s] += static_cast<opmath_t>(ap[s]) * static_cast<opmath_t>(cp[s]);
        }
      }
      for (int64_t s = 0; s < len; ++s) op[s] = static_cast<scalar_t>(acc[s]);
    }
  });
}

at::Tensor mul_sum_channels_cpu(const at::Tensor& a, const at::Tensor& c) {
  check_mul_sum_channels_args(a, c);
  at::Tensor out = at::empty(mul_sum_channels_shape(a), a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out.zero_();
  const at::Tensor ac = a.contiguous(), cc = c.contiguous();
  const int64_t N = a.size(0), C = a.size(1), S = out.numel() / N;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mul_sum_channels_cpu", [&] {
    mul_sum_channels_kernel<scalar_t>(ac.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>(), N, C, S);
  });
  return out;
}

// The backward of mul_sum_channels (d/da = g c, d/dc = g a, g broadcast over the channels), in C++ like
// stabilized_div's (lrp_ops.cpp): from Python it would cost about 2.4 us a call, as much as the kernel on small inputs.
at::Tensor mul_sum_channels_op(const at::Tensor& a, const at::Tensor& c) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lrp_scratch::mul_sum_channels", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, c);
}

class MulSumChannelsFunction : public torch::autograd::Function<MulSumChannelsFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& c) {
    ctx->save_for_backward({a, c});
    at::AutoDispatchBelowADInplaceOrView guard;  // on to the CPU/CUDA kernel
    return mul_sum_channels_op(a, c);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor g = grads[0].unsqueeze(1);
    return {g * saved[1], g * saved[0]};
  }
};

at::Tensor mul_sum_channels_autograd(const at::Tensor& a, const at::Tensor& c) {
  if (a.requires_grad() || c.requires_grad()) return MulSumChannelsFunction::apply(a, c);
  at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record: skip the Function's bookkeeping
  return mul_sum_channels_op(a, c);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrp_scratch, m) {
  m.def("relevance_filter(Tensor r, int k) -> Tensor");
  m.def("filtered_stabilized_div(Tensor r, Tensor den, float eps, int k) -> Tensor");
  m.def("mul_sum_channels(Tensor a, Tensor c) -> Tensor");
}

TORCH_LIBRARY_IMPL(lrp_scratch, CPU, m) {
  m.impl("relevance_filter", &relevance_filter_cpu);
  m.impl("filtered_stabilized_div", &filtered_stabilized_div_cpu);
  m.impl("mul_sum_channels", &mul_sum_channels_cpu);
}

TORCH_LIBRARY_IMPL(lrp_scratch, Autograd, m) {
  m.impl("mul_sum_channels", &mul_sum_channels_autograd);
}

}  // namespace lrp_scratch
