// csrc/cuda/ffn.cu compiled for the host emulator (tests/cuda_emu/cuda_emu.h), its cuBLASLt calls served by
// tests/cuda_emu/cublaslt_emu.h, registered as the fused_attn_emu ops with the CUDA kernels' signatures, on
// CPU tensors: linear_gelu_fwd, linear_gelu_inference, linear_gelu_bwd, linear_gelu_bwd_scratch,
// linear_gelu_bwd_from_next (its result and whether the epilogue served the call) and ffn_dropout.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"
// After cuda_emu.h (the half-precision conversions) and before ffn.cu, whose #include <cublasLt.h> it
// has already made.
#include "cublaslt_emu.h"
// The kernels' source as tests/cuda_emu/emu_build.py rewrote it.
#include "ffn_emulated.inc"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> linear_gelu_bwd_from_next(
    const at::Tensor& grad_next, const at::Tensor& w_next, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& pre_activation, c10::string_view approximate, std::array<bool, 3> output_mask) {
  auto result = fused_attn::linear_gelu_bwd_from_next_cuda(grad_next, w_next, input, weight, pre_activation,
                                                           approximate, output_mask);
  if (!result.has_value()) return {at::Tensor(), at::Tensor(), at::Tensor(), false};
  return {std::get<0>(*result), std::get<1>(*result), std::get<2>(*result), true};
}

void ffn_dropout(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& seed, double dropout_p) {
  fused_attn::ffn_dropout_cuda(src, dst, seed, dropout_p);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_attn_emu, m) {
  m.def("linear_gelu_fwd", &fused_attn::linear_gelu_fwd_cuda);
  m.def("linear_gelu_inference", &fused_attn::linear_gelu_inference_cuda);
  m.def("linear_gelu_bwd", &fused_attn::linear_gelu_bwd_cuda);
  m.def("linear_gelu_bwd_scratch", &fused_attn::linear_gelu_bwd_scratch_cuda);
  m.def("linear_gelu_bwd_from_next", &linear_gelu_bwd_from_next);
  m.def("ffn_dropout", &ffn_dropout);
}
