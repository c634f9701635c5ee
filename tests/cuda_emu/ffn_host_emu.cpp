// csrc/ffn.cpp as compiled for CUDA (the FFN composed of the linear_gelu kernels, cuBLASLt's DGELU
// epilogue backward and the dropout kernel), its dispatcher calls pointed at the emulated kernels
// (tests/cuda_emu/emu_build.py rewrites "fused_attn::" lookups to "fused_attn_emu::"), registered as the
// fused_attn_emu ops ffn_fwd, ffn_inference and ffn_bwd on CPU tensors.
#define FUSED_ATTN_WITH_CUDA 1
#include <ATen/ATen.h>
#include <torch/library.h>

// The kernels' source as tests/cuda_emu/emu_build.py rewrote it.
#include "ffn_host_emulated.inc"

TORCH_LIBRARY_FRAGMENT(fused_attn_emu, m) {
  m.def("ffn_fwd", &fused_attn::ffn_fwd);
  m.def("ffn_inference", &fused_attn::ffn_inference);
  m.def("ffn_bwd", &fused_attn::ffn_bwd);
}
