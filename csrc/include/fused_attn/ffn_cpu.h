// What csrc/ffn.cpp (the FFN op, shared by both devices) calls in csrc/cpu/ffn.cpp directly.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fused_attn {

// The FFN's dropout, dst = src * keep / (1 - p): element e of the contiguous src (for the
// [rows, out_features] output, e = row * out_features + col) is kept when element e of the shared
// Philox stream of `seed` (fused_attn/philox.h) is >= p, as the Triton GEMM epilogue draws it. src
// and dst are contiguous CPU tensors of one float dtype and shape; dst may be src. csrc/cuda/ffn.cu
// has the CUDA twin (ffn_dropout_cuda, fused_attn/ffn_cuda.h).
void ffn_dropout_cpu(const at::Tensor& src, const at::Tensor& dst, uint64_t seed, double dropout_p);

// The FFN's second linear, input @ weight^T + bias, widened to float32 where the dtype's GEMM is not
// native (the result rounded once to the storage dtype).
at::Tensor ffn_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// The FFN's backward after its dropout: given grad_out [rows, out_features] (contiguous, the
// gradient of the second linear's output), returns (grad_input, grad_w1, grad_b1, grad_w2) as
// selected by output_mask (grad_out is released before the last two GEMMs: a caller that moves its
// only reference in frees it there). Row slab by row slab: dW2 += grad_out^T gelu(pre) (the activation
// recomputed), the hidden gradient grad_out @ w2 (never whole), and grad_pre = it * gelu'(pre)
// with grad_b1's partial sums in the same pass; then grad_input = grad_pre @ w1 and
// grad_w1 = grad_pre^T @ input. consume_pre: pre_activation (contiguous) is the caller's to
// overwrite, and grad_pre is written over it where it has the GEMMs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_hidden_bwd_cpu(
    at::Tensor grad_out, const at::Tensor& input, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, c10::string_view approximate, std::array<bool, 4> output_mask,
    bool consume_pre);

}  // namespace fused_attn
