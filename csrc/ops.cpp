// Operator schemas of the fused_attn library: one schema per op, nothing else.
// Kernels register their implementations with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda;
// fake (meta) kernels and autograd formulas are registered from Python (fused_attn/ops).
#include <torch/library.h>

TORCH_LIBRARY(fused_attn, m) {
  // LayerNorm over the last dimension of a contiguous 2-D input [rows, hidden].
  // Returns (output [rows, hidden] in the input dtype, mean [rows] fp32, rstd [rows] fp32).
  m.def("layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward of layer_norm_fwd. output_mask selects (grad_input, grad_weight, grad_bias); an
  // unselected gradient comes back as an empty tensor of shape [0].
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
