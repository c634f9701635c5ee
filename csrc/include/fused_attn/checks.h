// Precondition checks shared by the CPU and CUDA launchers. Every message names the argument
// and what was expected, so that a user who bypasses the Python layer still gets an actionable error.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_attn {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A [rows, hidden] row-major input; returns (rows, hidden).
inline std::pair<int64_t, int64_t> check_rows_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 2, name, " must be 2-D [rows, hidden], got ", input.dim(), " dimensions");
  TORCH_CHECK(input.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(is_supported_float(input.scalar_type()), name,
              " must be float32, float16 or bfloat16, got ", input.scalar_type());
  return {input.size(0), input.size(1)};
}

// weight/bias-like optional vector of length `hidden` with the dtype and device of `like`.
// The dtype of the norms' affine parameters (weight and bias, both in it): float32 where the input is
// float16/bfloat16 and the weight float32 (norms kept in float32: the kernels read them unrounded and
// give their gradients in float32, as F.layer_norm on CPU does), else the input's.
inline at::ScalarType affine_dtype(const std::optional<at::Tensor>& weight, const at::Tensor& like) {
  const bool half = like.scalar_type() == at::kHalf || like.scalar_type() == at::kBFloat16;
  return half && weight.has_value() && weight->defined() && weight->scalar_type() == at::kFloat
             ? at::kFloat
             : like.scalar_type();
}

// Calls fn with a null pointer of the affine parameters' element type (affine_dtype): float
// where param_dtype is float32, else scalar_t, the input's.
template <typename scalar_t, typename Fn>
void with_param_type(at::ScalarType param_dtype, Fn&& fn) {
  if (param_dtype == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<scalar_t*>(nullptr));
  }
}

// An optional [hidden] parameter on `like`'s device, of dtype `dtype` (default: like's), contiguous
// unless the caller only hands it to a GEMM (`contiguous` false); `what`, if given, says whose size
// hidden is.
inline void check_affine_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& like,
                               int64_t hidden, std::optional<at::ScalarType> dtype = std::nullopt,
                               bool contiguous = true, const char* what = nullptr) {
  if (!param.has_value() || !param->defined()) return;
  const at::Tensor& p = *param;
  TORCH_CHECK(p.dim() == 1 && p.size(0) == hidden, name, " must have shape [", hidden, "]", what ? " (" : "",
              what ? what : "", what ? ")" : "", ", got ", p.sizes());
  TORCH_CHECK(!contiguous || p.is_contiguous(), name, " must be contiguous");
  const at::ScalarType expected = dtype.value_or(like.scalar_type());
  TORCH_CHECK(p.scalar_type() == expected, name, " must have dtype ", expected,
              dtype.has_value() ? " (the input's, or float32 for weight and bias with a float16/bfloat16 input)"
                                : " like the input",
              ", got ", p.scalar_type());
  TORCH_CHECK(p.device() == like.device(), name, " must be on ", like.device(), ", got ", p.device());
}

// A linear layer's weight `name`, [out_features, in_features] with in_features given (`in_what` says
// whose size it is), of `like`'s dtype and on its device; contiguous when `contiguous` (else any
// strides: a GEMM reads it). Returns out_features.
inline int64_t check_linear_weight(const at::Tensor& weight, const char* name, const at::Tensor& like,
                                   int64_t in_features, const char* in_what, bool contiguous) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_features, name, " must have shape [out_features, ",
              in_features, "] (", in_what, "), got ", weight.sizes());
  TORCH_CHECK(!contiguous || weight.is_contiguous(), name, " must be contiguous (pass ", name, ".contiguous())");
  TORCH_CHECK(weight.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(),
              " like the input, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == like.device(), name, " must be on ", like.device(), ", got ", weight.device());
  return weight.size(0);
}

// dropout_p of every op with dropout: in [0, 1), written so that NaN fails too.
inline void check_dropout_p(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
}

// The seed argument of every op with dropout_p, checked alike on every device when dropout applies: an
// int64 tensor with one element, the key of the call's dropout stream (fused_attn/philox.h).
inline const at::Tensor& checked_seed(const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->defined(),
              "seed must be given when dropout_p > 0: an int64 tensor with one element (the dropout stream's key)");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "seed must be an int64 tensor with one element, got ", seed->scalar_type(), " of shape ", seed->sizes());
  return *seed;
}

// The device a (checked) seed may be on for inputs on like's: the CPU, where CPU inputs are; for CUDA
// inputs, theirs (read by the kernels) or the CPU (taken by value).
inline void check_seed_device(const at::Tensor& seed, const at::Tensor& like) {
  if (like.device().is_cpu()) {
    TORCH_CHECK(seed.device().is_cpu(), "seed must be on the CPU, the inputs' device, got ", seed.device());
  } else {
    TORCH_CHECK(seed.device().is_cpu() || seed.device() == like.device(), "seed must be on the inputs' device (",
                like.device(), ") or the CPU, got ", seed.device());
  }
}

// The seed's value for the cpu kernels, which take it on the CPU, as their inputs (like, a CPU tensor;
// the CUDA kernels take theirs through cuda_utils::kernel_seed).
inline uint64_t dropout_seed(const std::optional<at::Tensor>& seed, const at::Tensor& like) {
  const at::Tensor& s = checked_seed(seed);
  check_seed_device(s, like);
  return static_cast<uint64_t>(s.item<int64_t>());
}

// mean/rstd statistics: float32 vectors of length `rows` on the input's device.
inline void check_row_stats(const at::Tensor& stat, const char* name, const at::Tensor& like, int64_t rows) {
  TORCH_CHECK(stat.dim() == 1 && stat.size(0) == rows, name, " must have shape [", rows, "], got ", stat.sizes());
  TORCH_CHECK(stat.scalar_type() == at::kFloat, name, " must be float32, got ", stat.scalar_type());
  TORCH_CHECK(stat.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(stat.device() == like.device(), name, " must be on ", like.device(), ", got ", stat.device());
}

// Attention's key and value heads: query's, or (grouped-query attention) one shared divisor of
// query's heads. Batch and the other dims are checked by the callers.
inline void check_kv_heads(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  const int64_t kv_heads = key.size(1);
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0) && value.size(1) == kv_heads &&
                  (kv_heads == query.size(1) || (kv_heads > 0 && query.size(1) % kv_heads == 0)),
              "key and value must have query's batch and heads ", query.sizes().slice(0, 2),
              " (or, grouped, the same divisor of query's heads), got key ", key.sizes(), " and value ",
              value.sizes());
}

inline void check_same_as(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Bumps the version counter of a tensor an op wrote in place (its schema's Tensor(a!) argument): the
// autograd fallback those ops have (autogradNotImplementedFallback) dispatches past the
// ADInplaceOrView key that would, so without this a tensor another node saved and a raw call
// overwrote would give that node a silently wrong gradient instead of raising. (What
// torch::autograd::impl::bump_version does, inline: the CPU kernels' libraries link no autograd
// code. An inference tensor has no version counter.)
inline void mark_written(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace fused_attn
