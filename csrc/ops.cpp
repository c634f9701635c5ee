// Operator schemas of the fused_attn library: one schema per op, nothing else.
// Kernels register their implementations with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda
// (csrc/ffn.cpp for the FFN, which composes them); the autograd formulas of the forward ops are
// in csrc/autograd.cpp; fake (meta) kernels are registered from Python (fused_attn/ops).
//
// Conventions shared by every backend:
//  * Row statistics (mean, rstd, log-sum-exp) are float32; log-sum-exp is in natural-log units,
//    +inf for a row whose every element is masked (so recomputed probabilities are exactly 0). The
//    CUDA attention keeps its row statistics in another form (attention_fwd below).
//  * Masks arrive expanded to the full logical shape as views: a stride of 0 is a broadcast dim,
//    so kernels index them through their strides and never materialise them.
//  * Dropout takes `seed`, an int64 tensor with one element (None when dropout_p == 0): on the CPU for
//    the cpu kernels; on the inputs' device for the CUDA and Triton kernels, which read it when they run
//    (so a captured CUDA graph replays with each replay's seed), or on the CPU outside a capture
//    (cuda_utils::kernel_seed, fused_attn/ops/_random.py). Element e of a
//    call's random stream keeps its value when u(e) >= dropout_p, where u(e) is output word e % 4
//    of Philox4x32-10 keyed by (seed & 0xffffffff, seed >> 32) at counter c = e / 4, counter words
//    (c & 0xffffffff, c >> 32, 0, 0) (the four words of triton.language.randint4x), the word w
//    taken as int32 and mapped to [0, 1) by (w < 0 ? -w - 1 : w) * 4.6566127342e-10
//    (fused_attn/philox.h). For attention e = (bh * q_len + i) * k_len + j; for
//    row-wise ops e = row * hidden + col; for the FFN's dropout after its second linear
//    e = row * out_features + col. Every backend draws the same mask from the same seed.
//  * An output that was not asked for (output_mask false) comes back as an empty tensor [0].
#include <torch/library.h>

TORCH_LIBRARY(fused_attn, m) {
  // LayerNorm over the last dimension of a contiguous 2-D input [rows, hidden].
  // Returns (output [rows, hidden] in the input dtype, mean [rows], rstd [rows]).
  m.def("layer_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Backward of layer_norm_fwd: (grad_input, grad_weight, grad_bias) as selected by output_mask.
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Scaled dot-product attention. query [B, H, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv]
  // (Hkv a divisor of H: grouped-query attention), any strides with a unit last-dim stride; attn_mask
  // bool (True = attend) or floating (added to the scores), expanded to [B, H, Lq, Lk]; causal is
  // top-left aligned (query i sees keys j <= i). Returns (output [B, H, Lq, Dv] in the query's layout
  // (fused_attn/layout.h), the row statistics its backward reads: on CPU the log-sum-exp [B, H, Lq]
  // (natural log); on CUDA [B, H, 2, Lq], the row max and log2 of the row sum in log2 units, kept
  // apart for precision (csrc/cuda/attention.cu)). The backward reads the statistics, not the output.
  m.def(
      "attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, bool is_causal, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Backward: (grad_query, grad_key, grad_value, grad_scores); grad_scores is the gradient of the
  // masked scores [B, H, Lq, Lk] float32 (the gradient of a floating mask) when mask_needs_grad,
  // else empty.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor lse, float scale, bool is_causal, float dropout_p, Tensor? seed, bool mask_needs_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // softmax(input * scale + mask) over the last dim of a 4-D input [A, B, M, N] (any strides);
  // mask bool (True = keep) or floating, expanded to the input's shape; causal masks j > i of
  // (M, N). Rows with every element masked give 0. Returns a contiguous tensor.
  m.def("softmax_fwd(Tensor input, Tensor? mask, float scale, bool is_causal) -> Tensor");
  // Backward from the output: (grad_input, grad_scores); grad_scores (the gradient of a floating
  // mask, float32) only when mask_needs_grad, else empty.
  m.def("softmax_bwd(Tensor grad_out, Tensor output, float scale, bool mask_needs_grad) -> (Tensor, Tensor)");

  // act(input @ weight^T + bias) for a contiguous 2-D input [rows, in_features], weight
  // [out_features, in_features]; approximate is the activation: the GELU, "none" (erf) or "tanh", or
  // "relu" (ReLU: the public ffn's activation="relu"; public linear_gelu passes GELUs only).
  // Returns (output, pre-activation), both [rows, out_features] in the input dtype; the
  // pre-activation is what the backward needs.
  m.def("linear_gelu_fwd(Tensor input, Tensor weight, Tensor? bias, str approximate) -> (Tensor, Tensor)");
  // The output of linear_gelu_fwd alone (the same bits), for calls that need no gradient: no
  // pre-activation is kept, the GELU is applied over the GEMM's result in place where the backend
  // can, so it makes one [rows, out_features] tensor instead of two. Not differentiable.
  m.def("linear_gelu_inference(Tensor input, Tensor weight, Tensor? bias, str approximate) -> Tensor");
  // Backward: (grad_input, grad_weight, grad_bias) as selected by output_mask.
  m.def(
      "linear_gelu_bwd(Tensor grad_out, Tensor input, Tensor weight, Tensor pre_activation, str approximate, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The same, for a caller that owns grad_out (the FFN's hidden gradient, a temporary): grad_out
  // is scratch space, overwritten with grad_pre where that has grad_out's dtype, which spares a
  // [rows, out_features] buffer at the backward's peak. Its contents afterwards are unspecified.
  m.def(
      "linear_gelu_bwd_scratch(Tensor(a!) grad_out, Tensor input, Tensor weight, Tensor pre_activation, "
      "str approximate, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The same, for a caller whose pre_activation nobody reads afterwards (the autograd formula's saved
  // tensor in a backward that frees its graph): grad_pre is written over pre_activation where it has
  // pre_activation's dtype, so the backward holds one [rows, out_features] tensor of its own fewer.
  // pre_activation's contents afterwards are unspecified (on CUDA, where the autograd formula does not
  // call it, it is linear_gelu_bwd and leaves pre_activation as it is).
  m.def(
      "linear_gelu_bwd_consuming(Tensor grad_out, Tensor input, Tensor weight, Tensor(a!) pre_activation, "
      "str approximate, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // The position-wise FFN: dropout(linear(gelu(input @ w1^T + b1), w2, b2)) for a contiguous 2-D
  // input [rows, in_features], w1 [hidden, in_features], w2 [out_features, hidden]. Returns
  // (output [rows, out_features], pre-activation [rows, hidden]); the backward recomputes the
  // activation from the pre-activation.
  m.def(
      "ffn_fwd(Tensor input, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate, float dropout_p, "
      "Tensor? seed) -> (Tensor, Tensor)");
  // The output of ffn_fwd without dropout (the same bits), for calls that need no gradient: the first
  // linear in its inference form (linear_gelu_inference), no pre-activation kept. Not differentiable.
  m.def("ffn_inference(Tensor input, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate) -> Tensor");
  // Backward: (grad_input, grad_w1, grad_b1, grad_w2, grad_b2) as selected by output_mask.
  m.def(
      "ffn_bwd(Tensor grad_out, Tensor input, Tensor w1, Tensor w2, Tensor pre_activation, str approximate, "
      "float dropout_p, Tensor? seed, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same, for a caller whose pre_activation nobody else reads afterwards (the autograd formula's
  // saved tensor in a backward that frees its graph): pre_activation is scratch space, overwritten
  // with the pre-activation's gradient where the dtypes allow, so the backward's peak holds one
  // [rows, hidden] tensor where ffn_bwd holds two. Its contents afterwards are unspecified (on CUDA,
  // where the autograd formula does not call it, it is ffn_bwd and leaves pre_activation as it is).
  m.def(
      "ffn_bwd_consuming(Tensor grad_out, Tensor input, Tensor w1, Tensor w2, Tensor(a!) pre_activation, "
      "str approximate, float dropout_p, Tensor? seed, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");

  // Add & Norm over contiguous 2-D [rows, hidden] tensors:
  //   prenorm = residual + dropout(input + input_bias);  output = layer_norm(prenorm) * weight + bias.
  // Returns (output, prenorm, mean [rows], rstd [rows]).
  m.def(
      "add_layer_norm_fwd(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor? input_bias, "
      "float eps, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)");
  // The output of add_layer_norm_fwd alone (the same bits, the same dropout draw), for calls that need
  // no gradient and no pre-norm sum: the sum is formed in the output and normalised in place, one
  // [rows, hidden] tensor instead of two. Not differentiable.
  m.def(
      "add_layer_norm_inference(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, Tensor? input_bias, "
      "float eps, float dropout_p, Tensor? seed) -> Tensor");
  // Backward. grad_prenorm (optional) is the gradient reaching the returned prenorm directly.
  // Returns (grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias) per output_mask.
  m.def(
      "add_layer_norm_bwd(Tensor grad_out, Tensor? grad_prenorm, Tensor prenorm, Tensor mean, Tensor rstd, "
      "Tensor? weight, float dropout_p, Tensor? seed, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
