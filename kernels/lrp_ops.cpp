// lrp_scratch._C: operator schemas, the CPU kernels, and the Python module the package imports.
//
// stabilized_div(num, den, eps) = num / (den + eps * s(den)), s(z) = +1 for z >= 0 (sign(0) := +1)
// and -1 for z < 0; where the stabilised denominator is exactly zero (only possible with eps == 0
// and den == 0) the result is 0, so a zero denominator passes no relevance instead of NaN/inf.
// Half and bfloat16 are computed in float and rounded once.

#include "lrp_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <Python.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>

namespace lrp_scratch {

void check_stabilized_div_args(const at::Tensor& num, const at::Tensor& den, double eps) {
  TORCH_CHECK(num.device() == den.device(), "stabilized_div: num and den must be on the same device, got ",
              num.device(), " and ", den.device());
  TORCH_CHECK(num.scalar_type() == den.scalar_type(), "stabilized_div: num and den must have the same dtype, got ",
              num.scalar_type(), " and ", den.scalar_type(), "; cast one of them with .to(other.dtype)");
  TORCH_CHECK(at::isFloatingType(num.scalar_type()),
              "stabilized_div: expected a floating dtype (float16, bfloat16, float32, float64), got ", num.scalar_type());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "stabilized_div: eps must be finite and >= 0, got ", eps);
}

std::vector<int64_t> stabilized_div_shape(const at::Tensor& num, const at::Tensor& den) {
  auto shape = at::infer_size(num.sizes(), den.sizes());  // raises a clear error when not broadcastable
  return std::vector<int64_t>(shape.begin(), shape.end());
}

namespace {

LRP_SCRATCH_MULTIVERSION
void stab_div_contig_f32(const float* __restrict n, const float* __restrict d, float* __restrict o, int64_t len,
                         float e) {
  for (int64_t i = 0; i < len; ++i) o[i] = stab_div_one<float>(n[i], d[i], e);
}

LRP_SCRATCH_MULTIVERSION
void stab_div_contig_f64(const double* __restrict n, const double* __restrict d, double* __restrict o, int64_t len,
                         double e) {
  for (int64_t i = 0; i < len; ++i) o[i] = stab_div_one<double>(n[i], d[i], e);
}

template <typename scalar_t>
void stab_div_contig(const scalar_t* n, const scalar_t* d, scalar_t* o, int64_t len, double eps) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    stab_div_contig_f32(n, d, o, len, static_cast<float>(eps));
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    stab_div_contig_f64(n, d, o, len, eps);
  } else {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t e = static_cast<opmath_t>(eps);
    for (int64_t i = 0; i < len; ++i)
      o[i] = static_cast<scalar_t>(stab_div_one<opmath_t>(static_cast<opmath_t>(n[i]), static_cast<opmath_t>(d[i]), e));
  }
}

// Elements per task of at::parallel_for: small tensors stay on the calling thread.
constexpr int64_t kGrain = 32768;

at::Tensor stabilized_div_cpu(const at::Tensor& num, const at::Tensor& den, double eps) {
  check_stabilized_div_args(num, den, eps);
  const auto shape = stabilized_div_shape(num, den);
  at::Tensor out = at::empty(shape, num.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  if (num.sizes() == den.sizes() && num.is_contiguous() && den.is_contiguous()) {
    // Fast path (the usual case in LRP): one pass over three flat arrays, split across threads.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, num.scalar_type(), "stabilized_div_cpu", [&] {
      const scalar_t* n = num.const_data_ptr<scalar_t>();
      const scalar_t* d = den.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, out.numel(), kGrain, [&](int64_t begin, int64_t end) {
        note_thread();
        stab_div_contig<scalar_t>(n + begin, d + begin, o + begin, end - begin, eps);
      });
    });
    return out;
  }

  // General path: broadcasting and arbitrary strides through TensorIterator (also split across threads).
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(num).add_const_input(den).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, num.scalar_type(), "stabilized_div_cpu_strided", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t e = static_cast<opmath_t>(eps);
    iter.for_each(
        [e](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
          note_thread();
          for (int64_t j = 0; j < size1; ++j) {
            char* o = data[0] + j * strides[3];
            const char* n = data[1] + j * strides[4];
            const char* d = data[2] + j * strides[5];
            for (int64_t i = 0; i < size0; ++i) {
              const opmath_t nv = static_cast<opmath_t>(*reinterpret_cast<const scalar_t*>(n + i * strides[1]));
              const opmath_t dv = static_cast<opmath_t>(*reinterpret_cast<const scalar_t*>(d + i * strides[2]));
              *reinterpret_cast<scalar_t*>(o + i * strides[0]) = static_cast<scalar_t>(stab_div_one<opmath_t>(nv, dv, e));
            }
          }
        },
        kGrain);
  });
  return out;
}

// The backward, in C++ (an autograd kernel registered from Python would run Python on every call, about 2.4 us):
// d out/d num = 1/q (0 where q = 0) = stabilized_div(grad, den, eps); d out/d den = -num/q^2 = -(1/q) * out; both
// summed to the shapes of the (broadcast) inputs. The backward calls the op again, so it is differentiable too.
at::Tensor stabilized_div_op(const at::Tensor& num, const at::Tensor& den, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lrp_scratch::stabilized_div", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(num, den, eps);
}

class StabilizedDivFunction : public torch::autograd::Function<StabilizedDivFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& num, const at::Tensor& den,
                            double eps) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = stabilized_div_op(num, den, eps);
    }
    ctx->save_for_backward({den, out});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["num_shape"] = num.sizes().vec();
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& den = saved[0];
    const at::Tensor& out = saved[1];
    const at::Tensor g_num = stabilized_div_op(grads[0], den, ctx->saved_data["eps"].toDouble());
    const at::Tensor g_den = -g_num * out;
    return {at::sum_to(g_num, ctx->saved_data["num_shape"].toIntVector()), at::sum_to(g_den, den.sizes()),
            at::Tensor()};
  }
};

at::Tensor stabilized_div_autograd(const at::Tensor& num, const at::Tensor& den, double eps) {
  if (num.requires_grad() || den.requires_grad()) return StabilizedDivFunction::apply(num, den, eps);
  at::AutoDispatchBelowADInplaceOrView guard;  // nothing to record: skip the Function's bookkeeping
  return stabilized_div_op(num, den, eps);
}

}  // namespace

TORCH_LIBRARY(lrp_scratch, m) {
  m.def("stabilized_div(Tensor num, Tensor den, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lrp_scratch, CPU, m) {
  m.impl("stabilized_div", &stabilized_div_cpu);
}

TORCH_LIBRARY_IMPL(lrp_scratch, Autograd, m) {
  m.impl("stabilized_div", &stabilized_div_autograd);
}

}  // namespace lrp_scratch

namespace lrp_scratch {
namespace {
Isa detect_isa() {
#ifdef LRP_SCRATCH_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) return Isa::avx2;
#endif
  return Isa::portable;
}
const Isa kDetectedIsa = detect_isa();
std::atomic<int> active_isa{static_cast<int>(kDetectedIsa)};
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};
}  // namespace

Isa cpu_isa() { return static_cast<Isa>(active_isa.load(std::memory_order_relaxed)); }

}  // namespace lrp_scratch

// The Python module: importing lrp_scratch._C runs the registrations above. The ops live in
// torch.ops.lrp_scratch; the module describes how it was built, and reports or lowers the instruction set of the
// hand-vectorised CPU loops (for tests and benchmarks: every path can run on one machine).
#ifndef LRP_SCRATCH_VARIANT
#define LRP_SCRATCH_VARIANT "cpu"
#endif
#ifndef LRP_SCRATCH_CUDA_ARCHS
#define LRP_SCRATCH_CUDA_ARCHS ""
#endif

static PyObject* lrp_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(lrp_scratch::kIsaNames[static_cast<int>(lrp_scratch::cpu_isa())]);
}

static PyObject* lrp_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(name, lrp_scratch::kIsaNames[i]) != 0) continue;
    if (i > static_cast<int>(lrp_scratch::kDetectedIsa)) {
      return PyErr_Format(PyExc_ValueError, "set_cpu_isa: this CPU does not support %s (it has %s)", name,
                          lrp_scratch::kIsaNames[static_cast<int>(lrp_scratch::kDetectedIsa)]);
    }
    const int previous = lrp_scratch::active_isa.exchange(i);
    return PyUnicode_FromString(lrp_scratch::kIsaNames[previous]);
  }
  return PyErr_Format(PyExc_ValueError, "set_cpu_isa: expected 'portable', 'avx2' or 'avx512', got '%s'", name);
}

// The threads the CPU kernels' parallel loops ran on since the last reset (see note_thread in lrp_ops.h).
static PyObject* lrp_thread_tally(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(lrp_scratch::thread_tally().load(std::memory_order_relaxed));
}

static PyObject* lrp_reset_thread_tally(PyObject*, PyObject*) {
  lrp_scratch::thread_tally().store(0, std::memory_order_relaxed);
  Py_RETURN_NONE;
}

// at::get_num_threads() as the extension sees it (the intra-op thread count its at::parallel_for splits into).
static PyObject* lrp_num_threads(PyObject*, PyObject*) { return PyLong_FromLong(at::get_num_threads()); }

static PyMethodDef lrp_methods[] = {
    {"cpu_isa", lrp_cpu_isa, METH_NOARGS, "cpu_isa() -> str: the instruction set the hand-vectorised CPU loops use"},
    {"set_cpu_isa", lrp_set_cpu_isa, METH_O,
     "set_cpu_isa(name) -> str: use 'portable', 'avx2' or 'avx512' (at most what the CPU has); returns the previous"},
    {"thread_tally", lrp_thread_tally, METH_NOARGS,
     "thread_tally() -> int: bit t is set when thread t ran a task of a CPU kernel since the last reset"},
    {"reset_thread_tally", lrp_reset_thread_tally, METH_NOARGS, "reset_thread_tally(): clear thread_tally()"},
    {"num_threads", lrp_num_threads, METH_NOARGS, "num_threads() -> int: at::get_num_threads() inside the extension"},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lrp_scratch compiled kernels", -1,
                                          lrp_methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "variant", LRP_SCRATCH_VARIANT) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", LRP_SCRATCH_CUDA_ARCHS) < 0 ||
      PyModule_AddIntConstant(m, "parallel_openmp", AT_PARALLEL_OPENMP) < 0 ||
      PyModule_AddStringConstant(m, "cpu_isa_detected", lrp_scratch::kIsaNames[static_cast<int>(lrp_scratch::kDetectedIsa)]) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
