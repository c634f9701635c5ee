// fused_attn::ffn_fwd / ffn_bwd / ffn_bwd_consuming / ffn_inference for CPU and CUDA tensors (and
// linear_gelu_bwd_consuming for CUDA ones; schemas in csrc/ops.cpp): the position-wise FFN composed
// of the backend's fused linear_gelu kernels (csrc/cpu/ffn.cpp, csrc/cuda/ffn.cu) and a library
// GEMM for the second linear. The forward is the same code for both devices, calling the kernels
// through the dispatcher below the autograd key (the autograd formula is in csrc/autograd.cpp). The
// backward differs by device after the dropout: on CUDA, cuBLASLt's DGELU epilogue where it serves
// the call, else the hidden gradient's GEMM and the scratch form of linear_gelu's backward; on CPU,
// ffn_hidden_bwd_cpu, which works slab by slab of rows so that neither the hidden gradient nor the
// recomputed activation exists whole, and, from ffn_bwd_consuming, forms the pre-activation's
// gradient over the pre-activation. On a CPU without native fp16/bf16 GEMMs, every GEMM of the FFN
// runs widened to float32 (as linear_gelu's do: torch's portable 16-bit GEMM is tens of times
// slower).
//
// Dropout after the second linear is the package's shared Philox stream (fused_attn/philox.h) at
// element row * out_features + col of the output, the element the Triton GEMM epilogue draws, so
// every backend drops the same elements for the same seed; the backward regenerates the mask from the
// seed instead of storing it. Kept values are divided by the keep rate, 1 - dropout_p in float
// (philox::keep_divisor). The forward applies it in place on the GEMM's output.
//
// The file is compiled twice: into each CPU kernel library (fused_attn/_C_cpu_<set>, with
// FUSED_ATTN_CPU_KERNELS: the CPU registrations, beside csrc/cpu/ffn.cpp's kernels) and, where CUDA
// is built, into fused_attn._C (with FUSED_ATTN_WITH_CUDA: the CUDA registrations).
#include <array>
#include <optional>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include "fused_attn/checks.h"
#ifdef FUSED_ATTN_CPU_KERNELS
#include "fused_attn/ffn_cpu.h"
#endif
#ifdef FUSED_ATTN_WITH_CUDA
#include "fused_attn/ffn_cuda.h"
#endif

namespace fused_attn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using LinearGeluFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, c10::string_view);
using LinearGeluInference = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view);
using LinearGeluBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         c10::string_view, std::array<bool, 3>);
using LinearGeluBwdScratch = std::tuple<Tensor, Tensor, Tensor>(Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                                c10::string_view, std::array<bool, 3>);

c10::OperatorHandle find(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// dropout(x) as described above: in place where x is this function's own (the forward's GEMM output,
// or a contiguous copy made here), else into a new tensor.
Tensor dropped(const Tensor& x, const OptTensor& seed, double dropout_p, bool own) {
  const Tensor src = x.contiguous();
  const Tensor dst = own || !src.is_same(x) ? src : at::empty_like(src);
#ifdef FUSED_ATTN_CPU_KERNELS
  ffn_dropout_cpu(src, dst, dropout_seed(seed, x), dropout_p);
#else
  ffn_dropout_cuda(src, dst, seed, dropout_p);
#endif
  return dst;
}

// The second linear's GEMM, on CPU widened to float32 where the dtype's is not native.
Tensor second_linear(const Tensor& hidden, const Tensor& w2, const OptTensor& b2) {
#ifdef FUSED_ATTN_CPU_KERNELS
  return ffn_linear_cpu(hidden, w2, b2);
#else
  return at::linear(hidden, w2, b2);
#endif
}

// Whether linear_gelu's kernels take a weight of any strides (the CPU GEMMs) or only a contiguous one
// (cuBLASLt's operand, csrc/cuda/ffn.cu).
#ifdef FUSED_ATTN_CPU_KERNELS
constexpr bool kContiguousW1 = false;
#else
constexpr bool kContiguousW1 = true;
#endif

// The first linear: the input [rows, in_features], w1 [hidden, in_features] and b1 [hidden], checked
// under their own names (linear_gelu, which checks them again, calls them weight and bias). Returns hidden.
int64_t check_first_linear(const Tensor& input, const Tensor& w1, const OptTensor& b1) {
  const int64_t in_features = check_rows_input(input, "input").second;
  const int64_t hidden = check_linear_weight(w1, "w1", input, in_features, "in_features of the input", kContiguousW1);
  check_affine_param(b1, "b1", input, hidden, std::nullopt, /*contiguous=*/true, "hidden features of w1");
  return hidden;
}

// The second linear: w2 [out_features, hidden] and b2 [out_features] (any strides: they only enter a
// GEMM), in the input's dtype and on its device. Checked with the first before any GEMM, so that a wrong
// one is named rather than broadcast, widened or reported by the GEMM in its own words.
void check_second_linear(const Tensor& w2, const OptTensor& b2, const Tensor& input, int64_t hidden) {
  const int64_t out_features =
      check_linear_weight(w2, "w2", input, hidden, "hidden features of w1", /*contiguous=*/false);
  check_affine_param(b2, "b2", input, out_features, std::nullopt, /*contiguous=*/false, "out_features of w2");
}

// The backward's arguments besides pre_activation (checked by the device's hidden backward), before the
// dropout reads grad_out.
void check_ffn_bwd_args(const Tensor& grad_out, const Tensor& input, const Tensor& w1, const Tensor& w2,
                        double dropout_p) {
  check_dropout_p(dropout_p);
  const int64_t rows = check_rows_input(input, "input").first;
  TORCH_CHECK(w1.dim() == 2, "w1 must be 2-D [hidden, in_features], got ", w1.dim(), " dimensions");
  check_second_linear(w2, std::nullopt, input, w1.size(0));
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == w2.size(0),
              "grad_out must have shape [", rows, ", ", w2.size(0), "] ([rows of input, out_features of w2]), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "grad_out must have dtype ", input.scalar_type(),
              " like the input, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "grad_out must be on ", input.device(), ", got ",
              grad_out.device());
}

std::tuple<Tensor, Tensor> ffn_fwd(const Tensor& input, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                                   const OptTensor& b2, c10::string_view approximate, double dropout_p,
                                   const OptTensor& seed) {
  static const auto linear_gelu = find("fused_attn::linear_gelu_fwd").typed<LinearGeluFwd>();
  check_dropout_p(dropout_p);
  // The dropout's seed comes last, after both GEMMs: checked before them.
  if (dropout_p > 0.0) check_seed_device(checked_seed(seed), input);
  check_second_linear(w2, b2, input, check_first_linear(input, w1, b1));
  at::AutoDispatchBelowADInplaceOrView below;
  auto [hidden, pre] = linear_gelu.call(input, w1, b1, approximate);
  Tensor out = second_linear(hidden, w2, b2);
  if (dropout_p > 0.0) out = dropped(out, seed, dropout_p, /*own=*/true);
  return {out, pre};
}

Tensor ffn_inference(const Tensor& input, const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2,
                     c10::string_view approximate) {
  static const auto linear_gelu = find("fused_attn::linear_gelu_inference").typed<LinearGeluInference>();
  check_second_linear(w2, b2, input, check_first_linear(input, w1, b1));
  const Tensor hidden = linear_gelu.call(input, w1, b1, approximate);
  return second_linear(hidden, w2, b2);
}

// consume_pre: pre_activation is this backward's to overwrite (ffn_bwd_consuming): on CPU the gradient
// of the pre-activation is formed in its buffer where the dtypes allow.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd_impl(const Tensor& grad_out_, const Tensor& input,
                                                                const Tensor& w1, const Tensor& w2,
                                                                const Tensor& pre_activation,
                                                                c10::string_view approximate, double dropout_p,
                                                                const OptTensor& seed, std::array<bool, 5> output_mask,
                                                                bool consume_pre) {
  check_ffn_bwd_args(grad_out_, input, w1, w2, dropout_p);
  at::AutoDispatchBelowADInplaceOrView below;
  const auto [need_dx, need_dw1, need_db1, need_dw2, need_db2] = output_mask;
  Tensor grad_out = dropout_p > 0.0 ? dropped(grad_out_, seed, dropout_p, /*own=*/false) : grad_out_;
  auto empty = [&] { return at::empty({0}, input.options()); };
  Tensor db2 = need_db2 ? grad_out.sum(0) : empty();
#ifdef FUSED_ATTN_CPU_KERNELS
  // Slab by slab over the rows, GEMMs widened where the dtype's are not native (csrc/cpu/ffn.cpp);
  // the dropped copy of the gradient, this function's own, is freed there once read.
  if (!grad_out.is_contiguous()) grad_out = grad_out.contiguous();
  auto [dx, dw1, db1, dw2] = ffn_hidden_bwd_cpu(std::move(grad_out), input, w1, w2, pre_activation, approximate,
                                                {need_dx, need_dw1, need_db1, need_dw2}, consume_pre);
  return {dx, dw1, db1, dw2, db2};
#else
  static const auto scratch_op = find("fused_attn::linear_gelu_bwd_scratch");
  static const auto bwd_op = find("fused_attn::linear_gelu_bwd").typed<LinearGeluBwd>();
  Tensor dw2 = need_dw2 ? grad_out.t().mm(approximate == "relu" ? at::relu(pre_activation)
                                                                : at::gelu(pre_activation, approximate))
                        : empty();
  Tensor dx = empty(), dw1 = empty(), db1 = empty();
  if (need_dx || need_dw1 || need_db1) {
    const std::array<bool, 3> mask{need_dx, need_dw1, need_db1};
    // On CUDA the GEMM that forms the hidden gradient applies gelu' and reduces grad_b1 in its
    // epilogue where cuBLASLt serves the call (see csrc/cuda/ffn.cu).
    if (auto fused = linear_gelu_bwd_from_next_cuda(grad_out, w2, input, w1, pre_activation, approximate, mask)) {
      std::tie(dx, dw1, db1) = *fused;
      return {dx, dw1, db1, dw2, db2};
    }
    Tensor d_hidden = grad_out.mm(w2);
    // The hidden gradient is this function's own temporary: where the backend has the scratch
    // variant, grad_pre overwrites it instead of taking a buffer of its own.
    const auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, input.device());
    std::tie(dx, dw1, db1) =
        scratch_op.hasKernelForDispatchKey(key)
            ? scratch_op.typed<LinearGeluBwdScratch>().call(d_hidden, input, w1, pre_activation, approximate, mask)
            : bwd_op.call(d_hidden, input, w1, pre_activation, approximate, mask);
  }
  return {dx, dw1, db1, dw2, db2};
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd(const Tensor& grad_out, const Tensor& input,
                                                           const Tensor& w1, const Tensor& w2,
                                                           const Tensor& pre_activation, c10::string_view approximate,
                                                           double dropout_p, const OptTensor& seed,
                                                           std::array<bool, 5> output_mask) {
  return ffn_bwd_impl(grad_out, input, w1, w2, pre_activation, approximate, dropout_p, seed, output_mask, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd_consuming(const Tensor& grad_out, const Tensor& input,
                                                                     const Tensor& w1, const Tensor& w2,
                                                                     Tensor& pre_activation,
                                                                     c10::string_view approximate, double dropout_p,
                                                                     const OptTensor& seed,
                                                                     std::array<bool, 5> output_mask) {
  auto grads = ffn_bwd_impl(grad_out, input, w1, w2, pre_activation, approximate, dropout_p, seed, output_mask, true);
  mark_written(pre_activation);
  return grads;
}

#ifdef FUSED_ATTN_WITH_CUDA
// The consuming forms on CUDA, whose backward never takes them (csrc/autograd.cpp, may_consume): the
// plain ones, leaving pre_activation as it is (its contents afterwards are unspecified).
std::tuple<Tensor, Tensor, Tensor> linear_gelu_bwd_consuming_cuda(const Tensor& grad_out, const Tensor& input,
                                                                  const Tensor& weight, Tensor& pre_activation,
                                                                  c10::string_view approximate,
                                                                  std::array<bool, 3> output_mask) {
  static const auto bwd_op = find("fused_attn::linear_gelu_bwd").typed<LinearGeluBwd>();
  at::AutoDispatchBelowADInplaceOrView below;
  auto grads = bwd_op.call(grad_out, input, weight, pre_activation, approximate, output_mask);
  mark_written(pre_activation);
  return grads;
}
#endif

}  // namespace
}  // namespace fused_attn

#ifdef FUSED_ATTN_CPU_KERNELS
TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("ffn_fwd", &fused_attn::ffn_fwd);
  m.impl("ffn_inference", &fused_attn::ffn_inference);
  m.impl("ffn_bwd", &fused_attn::ffn_bwd);
  m.impl("ffn_bwd_consuming", &fused_attn::ffn_bwd_consuming);
}
#else
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("ffn_fwd", &fused_attn::ffn_fwd);
  m.impl("ffn_inference", &fused_attn::ffn_inference);
  m.impl("ffn_bwd", &fused_attn::ffn_bwd);
  m.impl("ffn_bwd_consuming", &fused_attn::ffn_bwd_consuming);
  m.impl("linear_gelu_bwd_consuming", &fused_attn::linear_gelu_bwd_consuming_cuda);
}
#endif
