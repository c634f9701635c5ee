// What csrc/ffn.cpp (the FFN op, compiled by the host compiler) calls in csrc/cuda/ffn.cu directly.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fused_attn {

// The backward of linear_gelu(input, weight) given the gradient of the next linear's output, grad_next
// [rows, model], and that linear's weight w_next [model, hidden]: the gradient reaching the GELU output,
// grad_next @ w_next, is formed by a cuBLASLt GEMM whose DGELU(_BGRAD) epilogue applies gelu'(pre) and
// reduces the bias gradient (csrc/cuda/ffn.cu). Returns (grad_input, grad_weight, grad_bias) as
// linear_gelu_bwd per output_mask, or nullopt when the epilogue does not serve the call (then nothing ran):
// an activation other than the tanh GELU (approximate "none" or "relu"), another dtype, a hidden size that
// is not a multiple of 8, or operands that are not contiguous CUDA tensors of one dtype with matching 2-D
// shapes, which the caller's other path checks and names.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> linear_gelu_bwd_from_next_cuda(
    const at::Tensor& grad_next, const at::Tensor& w_next, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& pre_activation, c10::string_view approximate, std::array<bool, 3> output_mask);

// The FFN's dropout on CUDA tensors: ffn_dropout_cpu's contract (fused_attn/ffn_cpu.h), the same bits; the
// seed as the CUDA kernels take it (cuda_utils::kernel_seed: on src's device, or on the CPU outside a
// CUDA graph capture).
void ffn_dropout_cuda(const at::Tensor& src, const at::Tensor& dst, const std::optional<at::Tensor>& seed,
                      double dropout_p);

}  // namespace fused_attn
