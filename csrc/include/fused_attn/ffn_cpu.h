// What csrc/ffn.cpp (the FFN op, shared by both devices) calls in csrc/cpu/ffn.cpp directly.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace fused_attn {

// The FFN's dropout, dst = src * keep / (1 - p): element e of the contiguous src (for the
// [rows, out_features] output, e = row * out_features + col) is kept when element e of the shared
// Philox stream of `seed` (fused_attn/philox.h) is >= p, as the Triton GEMM epilogue draws it. src
// and dst are contiguous CPU tensors of one float dtype and shape; dst may be src. csrc/cuda/ffn.cu
// has the CUDA twin (ffn_dropout_cuda, fused_attn/ffn_cuda.h).
void ffn_dropout_cpu(const at::Tensor& src, const at::Tensor& dst, uint64_t seed, double dropout_p);

}  // namespace fused_attn
