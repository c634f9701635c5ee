// The fused_attn ops under torch.autocast: their kernels run with autocast off.
//
// The ops take their inputs in the dtypes the caller gives them: the public functions
// (fused_attn/ops) apply autocast's rules to their own arguments first, as the PyTorch functions they
// mirror do. Inside, the kernels call ATen (GEMMs, conversions) and must get what they ask for. An op
// without a kernel for an autocast key falls through it with autocast still on, so an at::addmm inside
// a kernel would be cast to the autocast dtype: the CPU linear_gelu's float32 GEMM (the widened path
// for bfloat16) came back in bfloat16 and its pre-activation was left unwritten, and a float32 op
// called under autocast computed its GEMMs in 16 bits. This kernel, registered for every op and every
// autocast key, turns autocast off for the op's whole call (its backward op too, when a backward runs
// inside an autocast region) and calls it again below.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace fused_attn {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

// Every op of csrc/ops.cpp (tests/test_autocast.py checks that none is missing).
constexpr const char* kOps[] = {
    "layer_norm_fwd",     "layer_norm_bwd",        "add_layer_norm_fwd", "add_layer_norm_inference",
    "add_layer_norm_bwd", "attention_fwd",         "attention_bwd",      "softmax_fwd",
    "softmax_bwd",        "linear_gelu_fwd",       "linear_gelu_inference", "linear_gelu_bwd",
    "linear_gelu_bwd_scratch", "linear_gelu_bwd_consuming", "ffn_fwd", "ffn_inference", "ffn_bwd",
    "ffn_bwd_consuming",
};

void register_for(torch::Library& m) {
  for (const char* op : kOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, AutocastCPU, m) { fused_attn::register_for(m); }
TORCH_LIBRARY_IMPL(fused_attn, AutocastCUDA, m) { fused_attn::register_for(m); }
