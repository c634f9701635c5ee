// The public functions' way in for the plain call, in C++ (the extension's Python module, fused_attn._C).
//
// A fused op called from Python spends more host time in its Python validation and backend choice
// (some twenty small steps, 15-30 us in all) than a small kernel takes, and more than PyTorch's own
// functions spend in C++. Each public function (fused_attn/ops) therefore first hands its arguments
// to the function here of the same name, which checks, in a few hundred nanoseconds, that the call
// is the plain one: exact tensors (or Parameters) of one CPU or CUDA device with no subclass,
// mode, transform or tracer around them, a kernel dtype, shapes that agree, masks that broadcast
// and need no gradient, Python numbers where numbers are asked for, nothing empty, no autocast,
// no backend asked for. For such a call it does what the Python path would do (the same
// reshapes, the same dropout seed drawn from torch's default generator, the same op of the
// extension, its inference form where no gradient is needed) and returns the result; for any
// other call it returns None and the Python path runs, which also raises every error with its
// message. Nothing is decided here that the Python path does not decide the same way: in
// particular which backend runs is not. The policy (fused_attn/backends.py, the one place where
// each backend's limits are declared) approves its choice of this extension's cpu or cuda kernels
// for an op, device, dtype and feature values (the same features it is asked about: head dims,
// lengths, widths), and a call whose key was not approved goes the Python way. So the first call
// of a shape takes the Python path and approves it; the calls after it come here.
//
// State (the approved keys, the per-op count of calls served) is guarded by the GIL; the GIL is
// released while an op runs, as torch's own bindings release it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <tuple>
#include <unordered_set>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/python_headers.h>

#include "fused_attn/cpu_tiles.h"

namespace fused_attn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Op : int8_t { kLayerNorm, kAddLayerNorm, kSoftmax, kAttention, kLinearGelu, kFfn, kOps };
// The names fused_attn/backends.py registers the ops under (and last_backend answers for).
constexpr const char* kOpNames[kOps] = {"layer_norm", "add_layer_norm", "softmax", "scaled_dot_product_attention",
                                        "linear_gelu", "ffn"};
constexpr int kMaxFeatures = 5;
constexpr size_t kMaxApproved = 4096;  // as the policy's own cache of choices

struct Key {
  int8_t op;
  int8_t device_type;
  int16_t device_index;
  int8_t dtype;
  int8_t count;
  int64_t features[kMaxFeatures];

  bool operator==(const Key& other) const {
    return op == other.op && device_type == other.device_type && device_index == other.device_index &&
           dtype == other.dtype && count == other.count &&
           std::memcmp(features, other.features, sizeof(int64_t) * count) == 0;
  }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&h](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(static_cast<uint64_t>(key.op) << 32 | static_cast<uint16_t>(key.device_index) << 16 |
        static_cast<uint8_t>(key.device_type) << 8 | static_cast<uint8_t>(key.dtype));
    for (int i = 0; i < key.count; ++i) mix(static_cast<uint64_t>(key.features[i]));
    return static_cast<size_t>(h);
  }
};

std::unordered_set<Key, KeyHash> approved;
int64_t served[kOps] = {};
PyObject* last_choice = nullptr;        // fused_attn.backends._last_choice (op name -> backend)
PyObject* op_names[kOps] = {};          // interned op names
PyObject* backend_names[2] = {};        // "cpu", "cuda"

Key make_key(Op op, const Tensor& like, std::initializer_list<int64_t> features) {
  Key key{};
  key.op = op;
  key.device_type = static_cast<int8_t>(like.device().type());
  key.device_index = like.device().index();
  key.dtype = static_cast<int8_t>(like.scalar_type());
  key.count = static_cast<int8_t>(features.size());
  int i = 0;
  for (int64_t f : features) key.features[i++] = f;
  return key;
}

// ---------------------------------------------------------------------------------------------
// What makes a call plain

// No torch function or dispatch mode, functorch transform, tracer or autocast around the call, and
// no backend named through the environment (the Python side checks torch.compile, use_backend and
// forward-mode AD levels before calling in).
bool plain_state() {
  // Modes and functorch layers add keys to the thread's included set (inference mode takes one away).
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  if (!included.remove(c10::DispatchKey::BackendSelect).remove(c10::DispatchKey::ADInplaceOrView).empty()) return false;
  if (at::impl::torch_function_mode_enabled()) return false;
  if (torch::jit::tracer::isTracing()) return false;
  if (at::autocast::is_autocast_enabled(at::kCPU) || at::autocast::is_autocast_enabled(at::kCUDA)) return false;
  const char* env = std::getenv("FUSED_ATTN_BACKEND");
  return env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0;
}

// The tensor ``obj`` holds when it is a plain dense tensor (torch.Tensor or nn.Parameter) of a CPU
// or CUDA device: no subclass, wrapper, lazy conjugate or negation, nor any other dispatch key
// beyond its backend's, autograd's and autocast's.
const Tensor* plain_tensor(PyObject* obj) {
  static const c10::DispatchKeySet cpu_keys{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                            c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};
  static const c10::DispatchKeySet cuda_keys{c10::DispatchKey::CUDA, c10::DispatchKey::ADInplaceOrView,
                                             c10::DispatchKey::AutogradCUDA, c10::DispatchKey::AutocastCUDA};
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != c10::kStrided) return nullptr;
  const auto type = t.device().type();
  const c10::DispatchKeySet& allowed = type == c10::DeviceType::CPU ? cpu_keys : cuda_keys;
  if ((type != c10::DeviceType::CPU && type != c10::DeviceType::CUDA) || !allowed.isSupersetOf(t.key_set())) {
    return nullptr;
  }
  return &t;
}

// An optional tensor argument: None, or a plain tensor on ``like``'s device (false: neither).
bool optional_tensor(PyObject* obj, const Tensor& like, OptTensor* out) {
  if (obj == Py_None) {
    *out = std::nullopt;
    return true;
  }
  const Tensor* t = plain_tensor(obj);
  if (t == nullptr || t->device() != like.device()) return false;
  *out = *t;
  return true;
}

bool kernel_dtype(const Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The first tensor of a call: plain, of a kernel dtype, with a dim to work along and something to compute
// (an empty call is the reference's, launching no kernel).
const Tensor* kernel_input(PyObject* obj) {
  const Tensor* t = plain_tensor(obj);
  return t != nullptr && kernel_dtype(*t) && t->dim() >= 1 && t->numel() > 0 ? t : nullptr;
}

// A Python float or int (not a bool, not a NumPy scalar: those take the Python path), as float().
bool number(PyObject* obj, double* out) {
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    *out = PyLong_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

bool flag(PyObject* obj, bool* out) {
  if (obj != Py_True && obj != Py_False) return false;
  *out = obj == Py_True;
  return true;
}

bool dropout(PyObject* obj, double* p) { return number(obj, p) && *p >= 0.0 && *p < 1.0; }

// A parameter vector or block: ``shape``, on ``like``'s device, in ``dtype`` (the Python path
// casts other dtypes; such calls take it), contiguous as the kernels read it.
bool param(PyObject* obj, const Tensor& like, c10::IntArrayRef shape, at::ScalarType dtype, OptTensor* out) {
  if (!optional_tensor(obj, like, out)) return false;
  if (!out->has_value()) return true;
  if ((*out)->scalar_type() != dtype || (*out)->sizes() != shape) return false;
  *out = (*out)->contiguous();
  return true;
}

// The dtype the norms take their weight and bias in (fused_attn.ops._validate.affine_dtype):
// float32 for a 16-bit input whose weight is float32 and whose bias is float32 or absent.
at::ScalarType affine_dtype(const Tensor& input, PyObject* weight, PyObject* bias) {
  auto float32 = [](PyObject* obj) {
    const Tensor* t = THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
    return t != nullptr && t->scalar_type() == at::kFloat;
  };
  const bool half = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  return half && float32(weight) && (bias == Py_None || float32(bias)) ? at::kFloat : input.scalar_type();
}

// A mask (bool, or floating: added to the scores) that needs no gradient, expanded to ``shape`` as
// a view; false when it does not broadcast, or takes the Python path (a learned mask).
bool mask_view(PyObject* obj, const Tensor& like, c10::IntArrayRef shape, OptTensor* out) {
  if (!optional_tensor(obj, like, out)) return false;
  if (!out->has_value()) return true;
  const Tensor& mask = **out;
  const auto dtype = mask.scalar_type();
  if (dtype != at::kBool && !kernel_dtype(mask) && dtype != at::kDouble) return false;
  if (mask.requires_grad() || mask.dim() > static_cast<int64_t>(shape.size())) return false;
  const int64_t offset = static_cast<int64_t>(shape.size()) - mask.dim();
  for (int64_t d = 0; d < mask.dim(); ++d) {
    if (mask.size(d) != 1 && mask.size(d) != shape[offset + d]) return false;
  }
  *out = mask.expand(shape);
  return true;
}

bool needs_grad(std::initializer_list<const OptTensor*> tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const OptTensor* t : tensors) {
    if (t->has_value() && (*t)->requires_grad()) return true;
  }
  return false;
}

bool approved_key(const Key& key) { return approved.count(key) != 0; }

// The contiguous [rows, width] a row-wise kernel takes (fused_attn.ops._validate.rows), and its
// result viewed back with ``shape``'s leading dims (unrows).
Tensor rows(const Tensor& t, int64_t width) {
  return (t.dim() == 2 && t.size(1) == width ? t : t.reshape({-1, width})).contiguous();
}

Tensor unrows(const Tensor& out, c10::IntArrayRef shape) {
  if (out.dim() == static_cast<int64_t>(shape.size())) return out;
  std::vector<int64_t> sizes(shape.begin(), shape.end() - 1);
  sizes.push_back(out.size(-1));
  return out.view(sizes);
}

Tensor unit_last_stride(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A weight as the kernels of its device take it (fused_attn.ops.ffn._weight_operand): the CPU GEMMs
// read any strides (a weight stored transposed is read in place, and autograd saves that view, not a
// copy), the CUDA kernels a contiguous one.
Tensor weight_operand(const Tensor& w) { return w.is_cpu() ? w : w.contiguous(); }

// The dropout seed, as fused_attn.ops._random.draw_seed draws it (the same draw from torch's
// default generator of like's device, on that device); none without dropout.
OptTensor draw_seed(double p, const Tensor& like) {
  if (p <= 0.0) return std::nullopt;
  return at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong).device(like.device()));
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether the extension registered add_layer_norm's inference form for ``like``'s device (asked once
// per device type: registrations do not change once the library is loaded).
bool has_add_layer_norm_inference(const Tensor& like) {
  static const bool registered[2] = {
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_attn::add_layer_norm_inference", "")
          .hasKernelForDispatchKey(c10::DispatchKey::CPU),
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_attn::add_layer_norm_inference", "")
          .hasKernelForDispatchKey(c10::DispatchKey::CUDA),
  };
  return registered[like.is_cuda() ? 1 : 0];
}

// Drops the GIL while an op runs (taken back on every exit, exceptions included).
struct NoGil {
  PyThreadState* state = PyEval_SaveThread();
  ~NoGil() { PyEval_RestoreThread(state); }
};

// Records the call as served by this device's backend (fused_attn.last_backend) and counts it.
PyObject* done(Op op, const Tensor& like, Tensor out) {
  if (PyDict_SetItem(last_choice, op_names[op], backend_names[like.is_cuda() ? 1 : 0]) < 0) return nullptr;
  ++served[op];
  return THPVariable_Wrap(std::move(out));
}

PyObject* fall_through() { Py_RETURN_NONE; }

bool arity(Py_ssize_t nargs, Py_ssize_t expected, const char* name) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "fused_attn._C.%s takes %zd arguments, got %zd", name, expected, nargs);
  return false;
}

// ---------------------------------------------------------------------------------------------
// The ops (arguments in the public functions' order, without backend=): each serves a plain call
// and returns its result, else None (fall_through).

// The Python function around an op's ``Serve``: its argument count, the state every call checks
// first, and C++ errors turned into Python exceptions (torch's: an out-of-memory error is
// torch.OutOfMemoryError, as from any op).
template <Op op, Py_ssize_t Arity, PyObject* (*Serve)(PyObject* const*)>
PyObject* entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!arity(nargs, Arity, kOpNames[op])) return nullptr;
  if (!plain_state()) return fall_through();
  return Serve(args);
  END_HANDLE_TH_ERRORS
}

// layer_norm(input, normalized_shape, weight, bias, eps)
PyObject* layer_norm(PyObject* const* args) {
  const Tensor* input = kernel_input(args[0]);
  if (input == nullptr) return fall_through();
  std::vector<int64_t> shape;
  PyObject* dims = args[1];
  if (PyLong_CheckExact(dims)) {
    shape.push_back(PyLong_AsLongLong(dims));
  } else if (PyTuple_Check(dims) || PyList_CheckExact(dims)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(dims);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* d = PySequence_Fast_GET_ITEM(dims, i);
      if (!PyLong_CheckExact(d)) return fall_through();
      shape.push_back(PyLong_AsLongLong(d));
    }
  } else {
    return fall_through();
  }
  if (PyErr_Occurred()) {  // a dim beyond int64
    PyErr_Clear();
    return fall_through();
  }
  if (shape.empty() || static_cast<int64_t>(shape.size()) > input->dim()) return fall_through();
  int64_t hidden = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (input->size(input->dim() - static_cast<int64_t>(shape.size() - i)) != shape[i]) return fall_through();
    hidden *= shape[i];
  }
  const at::ScalarType param_dtype = affine_dtype(*input, args[2], args[3]);
  OptTensor weight, bias;
  double eps;
  if (!param(args[2], *input, shape, param_dtype, &weight) || !param(args[3], *input, shape, param_dtype, &bias) ||
      !number(args[4], &eps) || !std::isfinite(eps) || eps < 0.0) {
    return fall_through();
  }
  if (!approved_key(make_key(kLayerNorm, *input, {hidden}))) return fall_through();
  if (shape.size() > 1) {  // the kernels take the parameters flat, as the rows
    if (weight) weight = weight->view(-1);
    if (bias) bias = bias->view(-1);
  }
  static const auto op = find_op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                                      const OptTensor&, double)>(
      "fused_attn::layer_norm_fwd");
  Tensor out;
  {
    NoGil no_gil;
    out = std::get<0>(op.call(rows(*input, hidden), weight, bias, eps));
    if (!(shape.size() == 1 && input->dim() == 2)) out = out.view(input->sizes());
  }
  return done(kLayerNorm, *input, std::move(out));
}

// add_layer_norm(input, residual, weight, bias, eps, dropout_p, input_bias, return_prenorm)
PyObject* add_layer_norm(PyObject* const* args) {
  const Tensor* input = kernel_input(args[0]);
  const Tensor* residual = plain_tensor(args[1]);
  if (input == nullptr || residual == nullptr || residual->scalar_type() != input->scalar_type() ||
      residual->device() != input->device() || residual->sizes() != input->sizes()) {
    return fall_through();
  }
  const int64_t hidden = input->size(-1);
  const at::ScalarType param_dtype = affine_dtype(*input, args[2], args[3]);
  OptTensor weight, bias, input_bias;
  double eps, p;
  bool return_prenorm;
  if (!param(args[2], *input, {hidden}, param_dtype, &weight) ||
      !param(args[3], *input, {hidden}, param_dtype, &bias) ||
      !param(args[6], *input, {hidden}, input->scalar_type(), &input_bias) || !number(args[4], &eps) ||
      !std::isfinite(eps) || eps < 0.0 || !dropout(args[5], &p) || !flag(args[7], &return_prenorm)) {
    return fall_through();
  }
  if (!approved_key(make_key(kAddLayerNorm, *input, {hidden}))) return fall_through();
  using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                         const OptTensor&, const OptTensor&, double, double,
                                                         const OptTensor&);
  using Inference = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           double, double, const OptTensor&);
  static const auto fwd = find_op<Fwd>("fused_attn::add_layer_norm_fwd");
  static const auto inference = find_op<Inference>("fused_attn::add_layer_norm_inference");
  const OptTensor in{*input}, res{*residual};
  const bool inference_form = !return_prenorm && has_add_layer_norm_inference(*input) &&
                              !needs_grad({&in, &res, &weight, &bias, &input_bias});
  Tensor out, prenorm;
  {
    NoGil no_gil;
    const OptTensor seed = draw_seed(p, *input);
    const Tensor x = rows(*input, hidden), r = rows(*residual, hidden);
    if (inference_form) {
      out = inference.call(x, r, weight, bias, input_bias, eps, p, seed);
    } else {
      std::tie(out, prenorm, std::ignore, std::ignore) = fwd.call(x, r, weight, bias, input_bias, eps, p, seed);
      prenorm = unrows(prenorm, input->sizes());
    }
    out = unrows(out, input->sizes());
  }
  if (!return_prenorm) return done(kAddLayerNorm, *input, std::move(out));
  PyObject* first = done(kAddLayerNorm, *input, std::move(out));
  if (first == nullptr) return nullptr;
  PyObject* second = THPVariable_Wrap(std::move(prenorm));
  if (second == nullptr) {
    Py_DECREF(first);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, first, second);
  Py_DECREF(first);
  Py_DECREF(second);
  return pair;
}

// softmax(input, dim, mask, scale, is_causal): the softmax dim the last of at most 4.
PyObject* softmax(PyObject* const* args) {
  const Tensor* input = kernel_input(args[0]);
  if (input == nullptr || input->dim() > 4 || !PyLong_CheckExact(args[1])) {
    return fall_through();
  }
  const long dim = PyLong_AsLong(args[1]);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return fall_through();
  }
  double scale;
  bool causal;
  OptTensor mask;
  if ((dim != -1 && dim != input->dim() - 1) || !number(args[3], &scale) || !std::isfinite(scale) ||
      !flag(args[4], &causal) || (causal && input->dim() < 2) || !mask_view(args[2], *input, input->sizes(), &mask)) {
    return fall_through();
  }
  if (!approved_key(make_key(kSoftmax, *input, {input->size(-1)}))) return fall_through();
  static const auto op = find_op<Tensor(const Tensor&, const OptTensor&, double, bool)>("fused_attn::softmax_fwd");
  Tensor out;
  {
    NoGil no_gil;
    if (input->dim() == 4) {
      out = op.call(*input, mask, scale, causal);
    } else {  // viewed as [1, ..., M, N] (fused_attn.ops.softmax._as_4d)
      std::vector<int64_t> sizes(4 - input->dim(), 1);
      sizes.insert(sizes.end(), input->sizes().begin(), input->sizes().end());
      const OptTensor m = mask ? OptTensor(mask->reshape(sizes)) : std::nullopt;
      out = op.call(input->reshape(sizes), m, scale, causal).reshape(input->sizes());
    }
  }
  return done(kSoftmax, *input, std::move(out));
}

// scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
PyObject* scaled_dot_product_attention(PyObject* const* args) {
  const Tensor* q = plain_tensor(args[0]);
  const Tensor* k = plain_tensor(args[1]);
  const Tensor* v = plain_tensor(args[2]);
  if (q == nullptr || k == nullptr || v == nullptr || !kernel_dtype(*q) || q->dim() != 4 || k->dim() != 4 ||
      v->dim() != 4 || k->scalar_type() != q->scalar_type() || v->scalar_type() != q->scalar_type() ||
      k->device() != q->device() || v->device() != q->device() || q->numel() == 0 || k->numel() == 0 ||
      v->numel() == 0) {
    return fall_through();
  }
  bool causal, gqa;
  double p, scale;
  if (!flag(args[5], &causal) || !flag(args[7], &gqa) || !dropout(args[4], &p)) return fall_through();
  const int64_t batch = q->size(0), heads = q->size(1), q_len = q->size(2), head_dim = q->size(3);
  const int64_t kv_heads = k->size(1), k_len = k->size(2);
  if (k->size(0) != batch || v->size(0) != batch || v->size(1) != kv_heads || k->size(3) != head_dim ||
      v->size(2) != k_len || (kv_heads != heads && !(gqa && heads % kv_heads == 0))) {
    return fall_through();
  }
  if (args[6] == Py_None) {
    scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  } else if (!number(args[6], &scale) || !std::isfinite(scale)) {
    return fall_through();
  }
  OptTensor mask;
  if (!mask_view(args[3], *q, {batch, heads, q_len, k_len}, &mask)) return fall_through();
  const Key key = make_key(kAttention, *q, {head_dim, v->size(3), q_len, k_len, p > 0.0});
  if (!approved_key(key)) return fall_through();
  static const auto op = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                            const OptTensor&, double, bool, double,
                                                            const OptTensor&)>("fused_attn::attention_fwd");
  Tensor out;
  {
    NoGil no_gil;
    out = std::get<0>(op.call(unit_last_stride(*q), unit_last_stride(*k), unit_last_stride(*v), mask, scale,
                              causal, p, draw_seed(p, *q)));
  }
  return done(kAttention, *q, std::move(out));
}

// A linear layer's weight [out, in_features] and optional bias [out] in the input's dtype and on its device.
bool linear(PyObject* w_obj, PyObject* b_obj, const Tensor& input, int64_t in_features, Tensor* weight,
            OptTensor* bias) {
  const Tensor* w = plain_tensor(w_obj);
  if (w == nullptr || w->dim() != 2 || w->size(1) != in_features || w->scalar_type() != input.scalar_type() ||
      w->device() != input.device() || w->numel() == 0) {
    return false;
  }
  *weight = *w;
  return param(b_obj, input, {w->size(0)}, input.scalar_type(), bias);
}

// The kernels' activation code, "none", "tanh" or "relu" (fused_attn/ops/ffn.py: linear_activation's
// code, which public linear_gelu passes only for a GELU; ffn's, formed from activation and approximate).
bool approximation(PyObject* obj, std::string_view* out) {
  if (!PyUnicode_CheckExact(obj)) return false;
  Py_ssize_t size;
  const char* text = PyUnicode_AsUTF8AndSize(obj, &size);
  if (text == nullptr) {
    PyErr_Clear();
    return false;
  }
  *out = std::string_view(text, size);
  return *out == "none" || *out == "tanh" || *out == "relu";
}

// linear_activation(input, weight, bias, code)
PyObject* linear_gelu(PyObject* const* args) {
  const Tensor* input = kernel_input(args[0]);
  if (input == nullptr) return fall_through();
  const int64_t in_features = input->size(-1);
  Tensor weight;
  OptTensor bias;
  std::string_view approximate;
  if (!linear(args[1], args[2], *input, in_features, &weight, &bias) || !approximation(args[3], &approximate)) {
    return fall_through();
  }
  const int64_t gemm_dim = std::max({input->numel() / in_features, in_features, weight.size(0)});
  if (!approved_key(make_key(kLinearGelu, *input, {gemm_dim}))) return fall_through();
  static const auto fwd = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                             c10::string_view)>("fused_attn::linear_gelu_fwd");
  static const auto inference = find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view)>(
      "fused_attn::linear_gelu_inference");
  const OptTensor in{*input}, w{weight};
  const bool grad = needs_grad({&in, &w, &bias});
  Tensor out;
  {
    NoGil no_gil;
    const Tensor x = rows(*input, in_features), wc = weight_operand(weight);
    const c10::string_view approx(approximate.data(), approximate.size());
    out = grad ? std::get<0>(fwd.call(x, wc, bias, approx)) : inference.call(x, wc, bias, approx);
    out = unrows(out, input->sizes());
  }
  return done(kLinearGelu, *input, std::move(out));
}

// ffn(input, w1, b1, w2, b2, code, dropout_p): code the kernels' activation code (fused_attn/ops/ffn.py).
PyObject* ffn(PyObject* const* args) {
  const Tensor* input = kernel_input(args[0]);
  if (input == nullptr) return fall_through();
  const int64_t in_features = input->size(-1);
  Tensor w1, w2;
  OptTensor b1, b2;
  std::string_view approximate;
  double p;
  if (!linear(args[1], args[2], *input, in_features, &w1, &b1) ||
      !linear(args[3], args[4], *input, w1.size(0), &w2, &b2) || !approximation(args[5], &approximate) ||
      !dropout(args[6], &p)) {
    return fall_through();
  }
  const int64_t gemm_dim = std::max({input->numel() / in_features, in_features, w1.size(0), w2.size(0)});
  if (!approved_key(make_key(kFfn, *input, {gemm_dim}))) return fall_through();
  static const auto fwd = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                             const Tensor&, const OptTensor&, c10::string_view,
                                                             double, const OptTensor&)>("fused_attn::ffn_fwd");
  static const auto inference =
      find_op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                     c10::string_view)>("fused_attn::ffn_inference");
  const OptTensor in{*input}, o1{w1}, o2{w2};
  const bool inference_form = p == 0.0 && !needs_grad({&in, &o1, &b1, &o2, &b2});
  Tensor out;
  {
    NoGil no_gil;
    const Tensor x = rows(*input, in_features), w1c = weight_operand(w1), w2c = weight_operand(w2);
    const c10::string_view approx(approximate.data(), approximate.size());
    out = inference_form ? inference.call(x, w1c, b1, w2c, b2, approx)
                         : std::get<0>(fwd.call(x, w1c, b1, w2c, b2, approx, p, draw_seed(p, *input)));
    out = unrows(out, input->sizes());
  }
  return done(kFfn, *input, std::move(out));
}

// ---------------------------------------------------------------------------------------------
// The policy's side

// approve(op, device, dtype, features): the policy chose this extension's kernels for such calls.
PyObject* approve(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!arity(nargs, 4, "approve")) return nullptr;
  if (!PyUnicode_Check(args[0]) || !THPDevice_Check(args[1]) || !THPDtype_Check(args[2]) || !PyTuple_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "approve(op: str, device: torch.device, dtype: torch.dtype, features: tuple)");
    return nullptr;
  }
  Key key{};
  key.op = kOps;
  for (int i = 0; i < kOps; ++i) {
    if (PyUnicode_CompareWithASCIIString(args[0], kOpNames[i]) == 0) key.op = static_cast<int8_t>(i);
  }
  const Py_ssize_t count = PyTuple_GET_SIZE(args[3]);
  if (key.op == kOps || count > kMaxFeatures) Py_RETURN_NONE;  // not an op served here
  const at::Device device = reinterpret_cast<THPDevice*>(args[1])->device;
  key.device_type = static_cast<int8_t>(device.type());
  key.device_index = device.index();
  key.dtype = static_cast<int8_t>(reinterpret_cast<THPDtype*>(args[2])->scalar_type);
  key.count = static_cast<int8_t>(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyTuple_GET_ITEM(args[3], i);
    if (!PyLong_Check(value)) Py_RETURN_NONE;  // a symbolic size: nothing to approve
    key.features[i] = PyLong_AsLongLong(value);
    if (PyErr_Occurred()) return nullptr;
  }
  if (approved.size() >= kMaxApproved) approved.clear();
  approved.insert(key);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* clear(PyObject*, PyObject*) {
  approved.clear();
  Py_RETURN_NONE;
}

// served(): {op: calls served here} since the module was loaded.
PyObject* served_calls(PyObject*, PyObject*) {
  PyObject* counts = PyDict_New();
  if (counts == nullptr) return nullptr;
  for (int i = 0; i < kOps; ++i) {
    PyObject* n = PyLong_FromLongLong(served[i]);
    if (n == nullptr || PyDict_SetItem(counts, op_names[i], n) < 0) {
      Py_XDECREF(n);
      Py_DECREF(counts);
      return nullptr;
    }
    Py_DECREF(n);
  }
  return counts;
}

// cpu_tile_dtypes(): the names of the dtypes whose products the CPU kernels run on the CPU's
// tile unit (cpu_tile_products), now (oneDNN may be turned off between calls).
PyObject* cpu_tile_dtypes(PyObject*, PyObject*) {
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  for (const auto& [type, name] : {std::pair{at::kBFloat16, "bfloat16"}, std::pair{at::kHalf, "float16"}}) {
    if (!cpu_tile_products(type)) continue;
    PyObject* s = PyUnicode_FromString(name);
    if (s == nullptr || PyList_Append(names, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(names);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return names;
}

// bind(last_choice): the dict fused_attn.last_backend reads, which each served call updates.
PyObject* bind(PyObject*, PyObject* dict) {
  if (!PyDict_CheckExact(dict)) {
    PyErr_SetString(PyExc_TypeError, "bind takes the dict of last choices");
    return nullptr;
  }
  Py_INCREF(dict);
  Py_XSETREF(last_choice, dict);
  Py_RETURN_NONE;
}

#define FAST_ENTRY(op, arity, name) {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>( \
                                       entry<op, arity, name>)), METH_FASTCALL,                           \
                                       "fused_attn." #name " for the plain call, else None"}

PyMethodDef methods[] = {
    FAST_ENTRY(kLayerNorm, 5, layer_norm),
    FAST_ENTRY(kAddLayerNorm, 8, add_layer_norm),
    FAST_ENTRY(kSoftmax, 5, softmax),
    FAST_ENTRY(kAttention, 8, scaled_dot_product_attention),
    FAST_ENTRY(kLinearGelu, 4, linear_gelu),
    FAST_ENTRY(kFfn, 7, ffn),
    {"approve", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(approve)), METH_FASTCALL,
     "approve(op, device, dtype, features): the policy chose this extension's kernels"},
    {"clear", clear, METH_NOARGS, "forgets every approval"},
    {"served", served_calls, METH_NOARGS, "{op: calls served here}"},
    {"bind", bind, METH_O, "bind(last_choice): the dict that records the backend of each op's last call"},
    {"cpu_tile_dtypes", cpu_tile_dtypes, METH_NOARGS,
     "the dtypes whose products the CPU kernels run on the CPU's tile unit (AMX)"},
    {nullptr, nullptr, 0, nullptr},
};

#undef FAST_ENTRY

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "fused_attn._C",
                          "The fused ops' entry for the plain call (the ops themselves: torch.ops.fused_attn).",
                          -1, methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace
}  // namespace fused_attn

PyMODINIT_FUNC PyInit__C() {
  using namespace fused_attn;
  for (int i = 0; i < kOps; ++i) {
    op_names[i] = PyUnicode_InternFromString(kOpNames[i]);
    if (op_names[i] == nullptr) return nullptr;
  }
  backend_names[0] = PyUnicode_InternFromString("cpu");
  backend_names[1] = PyUnicode_InternFromString("cuda");
  last_choice = PyDict_New();  // until bind()
  if (backend_names[0] == nullptr || backend_names[1] == nullptr || last_choice == nullptr) return nullptr;
  return PyModule_Create(&module_def);
}
