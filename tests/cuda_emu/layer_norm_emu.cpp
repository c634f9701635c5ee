// csrc/cuda/layer_norm.cu compiled for the host emulator (tests/cuda_emu/cuda_emu.h) and registered as the
// fused_attn_emu ops with the CUDA kernels' signatures, on CPU tensors: layer_norm_fwd, layer_norm_bwd,
// add_layer_norm_fwd, add_layer_norm_inference, add_layer_norm_bwd.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"
// The kernels' source as tests/cuda_emu/emu_build.py rewrote it.
#include "layer_norm_emulated.inc"

TORCH_LIBRARY_FRAGMENT(fused_attn_emu, m) {
  m.def("layer_norm_fwd", &fused_attn::layer_norm_fwd_cuda);
  m.def("layer_norm_bwd", &fused_attn::layer_norm_bwd_cuda);
  m.def("add_layer_norm_fwd", &fused_attn::add_layer_norm_fwd_cuda);
  m.def("add_layer_norm_inference", &fused_attn::add_layer_norm_inference_cuda);
  m.def("add_layer_norm_bwd", &fused_attn::add_layer_norm_bwd_cuda);
}
