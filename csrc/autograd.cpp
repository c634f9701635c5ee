// Autograd formulas of the fused_attn ops that have CPU and CUDA kernels (schemas in csrc/ops.cpp).
//
// They are registered for the Autograd dispatch key here, in C++, rather than from Python with
// torch.library.register_autograd: a Python formula costs every call a trip through Python's
// autograd.Function machinery (tens of microseconds), more than a small kernel takes, which makes
// a fused model slower than eager wherever the host's launch rate bounds it (small batches,
// inference on a GPU). Each formula forwards to the op below the autograd key, saves what its
// backward reads, and in backward calls the op's `_bwd` op, asking only for the gradients the
// graph needs (output_mask). The statistics outputs (mean, rstd, log-sum-exp, pre-activation)
// exist to be saved: materialize_grads is off, so gradients nobody sent them arrive undefined and
// are ignored (they are not marked non-differentiable, which compiled autograd refuses). A
// backward that must give gradients with a derivative (create_graph=True) takes the op's reference
// instead (differentiable_backward below). The `_bwd` ops themselves have no derivative: their
// Autograd kernel (no_derivative, as torch's "not implemented" fallback) makes differentiating what
// one gave when called directly raise instead of silently giving None or zeros. Fake kernels stay in Python
// (fused_attn/ops), so torch.compile traces these ops as single nodes and AOTAutograd traces the
// backward through these formulas. The Triton ops keep their Python formulas (their kernels are
// Python anyway).
#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/SavedTensorHooks.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "fused_attn/activation.h"

namespace fused_attn {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A gradient the backward returns: the computed one where asked for, else undefined (None).
Tensor pick(const Tensor& grad, bool wanted) { return wanted ? grad : Tensor(); }

Tensor contiguous(const Tensor& t) { return t.defined() ? t.contiguous() : t; }

// The attention kernels read grad_out through its strides and need only a dense last dim: the
// gradient of heads merged back from the output's layout arrives strided, and stays as it is.
// (sym_stride: under torch.compile, reading the strides as integers would specialise them all.)
Tensor unit_last_stride(const Tensor& t) { return t.sym_stride(-1) == 1 ? t : t.contiguous(); }

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// The autograd node numbers its input edges over the tensor arguments a call was given (an
// absent optional tensor has none), so AutogradContext::needs_input_grad takes an edge index.
// Forward records which of its first arguments were given (a bit per position); this answers
// needs_input_grad by argument position, as Python's ctx.needs_input_grad does.
void record_given(AutogradContext* ctx, std::initializer_list<bool> flags) {
  int64_t bits = 0, position = 0;
  for (bool flag : flags) bits |= static_cast<int64_t>(flag) << position++;
  ctx->saved_data["given"] = bits;
}

template <size_t N>
std::array<bool, N> needs_grad(AutogradContext* ctx) {
  const int64_t bits = ctx->saved_data["given"].toInt();
  std::array<bool, N> needs{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) {
    if (bits >> i & 1) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

// ---------------------------------------------------------------------------------------------
// Second-order autograd. The `_bwd` kernels' gradients have no derivative. A backward that needs one
// (run with create_graph=True, so grad mode is on inside it, or given a gradient that carries a
// forward-mode tangent) returns instead the gradients of the op's plain-torch reference, recomputed
// from what the forward saved and differentiated with a graph: fused_attn::differentiable_backward,
// a CompositeImplicitAutograd op defined in Python (fused_attn/ops/_second_order.py), so autograd
// records what it runs. Every other backward calls the kernels.

bool differentiable_wanted(const variable_list& grads) {
  if (at::GradMode::is_enabled()) return true;
  return std::any_of(grads.begin(), grads.end(),
                     [](const Tensor& g) { return g.defined() && torch::autograd::isFwGradDefined(g); });
}

using DifferentiableBwd = std::vector<Tensor>(c10::string_view, const c10::List<OptTensor>&, c10::ArrayRef<double>,
                                              c10::IntArrayRef);

// The gradients of the first N tensor arguments (the rest of the `arguments` slots undefined) by the
// formula `op` of fused_attn/ops/_second_order.py, given the tensors it takes (undefined: None).
template <size_t N>
variable_list differentiable_backward(const char* op, std::initializer_list<Tensor> tensors,
                                      std::vector<double> scalars, const std::array<bool, N>& needs,
                                      size_t arguments) {
  static const auto handle = find_op<DifferentiableBwd>("fused_attn::differentiable_backward");
  c10::List<OptTensor> given_tensors;
  for (const Tensor& t : tensors) given_tensors.push_back(optional(t));
  const std::vector<int64_t> flags(needs.begin(), needs.end());
  const std::vector<Tensor> grads = handle.call(op, given_tensors, scalars, flags);
  variable_list out(arguments);
  for (size_t i = 0; i < N; ++i) out[i] = pick(grads[i], needs[i]);
  return out;
}

// ---------------------------------------------------------------------------------------------
// layer_norm_fwd(input, weight?, bias?, eps) -> (out, mean, rstd)

using LayerNormFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double);
using LayerNormBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        const OptTensor&, std::array<bool, 3>);

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static const auto op = find_op<LayerNormFwd>("fused_attn::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, rstd] = op.call(input, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
    ctx->saved_data["eps"] = eps;
    record_given(ctx, {true, given(weight), given(bias)});
    ctx->set_materialize_grads(false);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LayerNormBwd>("fused_attn::layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const std::array<bool, 3> mask = needs_grad<3>(ctx);
    if (!grads[0].defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    if (differentiable_wanted(grads)) {
      return differentiable_backward("layer_norm", {grads[0], input, weight}, {ctx->saved_data["eps"].toDouble()},
                                     mask, 4);
    }
    auto [dx, dw, db] = op.call(grads[0].contiguous(), input, mean, rstd, optional(weight), mask);
    return {pick(dx, mask[0]), pick(dw, mask[1]), pick(db, mask[2]), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& input, const OptTensor& weight,
                                                           const OptTensor& bias, double eps) {
  auto out = LayerNormFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------
// add_layer_norm_fwd(input, residual, weight?, bias?, input_bias?, eps, dropout_p, seed?)
//   -> (out, prenorm, mean, rstd)

using AddLayerNormFwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                                   const OptTensor&, const OptTensor&, double, double,
                                                                   const OptTensor&);
using AddLayerNormBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
    const OptTensor&, std::array<bool, 5>);

struct AddLayerNormFunction : torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& residual,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& input_bias,
                               double eps, double dropout_p, const OptTensor& seed) {
    static const auto op = find_op<AddLayerNormFwd>("fused_attn::add_layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, prenorm, mean, rstd] = op.call(input, residual, weight, bias, input_bias, eps, dropout_p, seed);
    ctx->save_for_backward({prenorm, mean, rstd, weight.value_or(Tensor()), seed.value_or(Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["eps"] = eps;
    record_given(ctx, {true, true, given(weight), given(bias), given(input_bias)});
    // Gradients of outputs nobody used arrive undefined instead of materialised zeros.
    ctx->set_materialize_grads(false);
    return {out, prenorm, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<AddLayerNormBwd>("fused_attn::add_layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &prenorm = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3], &seed = saved[4];
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    const std::array<bool, 5> mask = needs_grad<5>(ctx);
    if (differentiable_wanted(grads)) {
      return differentiable_backward("add_layer_norm", {grads[0], grads[1], prenorm, weight, seed},
                                     {ctx->saved_data["eps"].toDouble(), dropout_p}, mask, 8);
    }
    const Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(prenorm);
    // Without dropout the input's gradient is the residual's: computed and written once.
    const bool shared = dropout_p == 0.0 && mask[0];
    std::array<bool, 5> asked = mask;
    if (shared) {
      asked[0] = false;
      asked[1] = true;
    }
    auto [dx, dres, dw, db, dib] =
        op.call(grad_out, optional(contiguous(grads[1])), prenorm, mean, rstd, optional(weight), dropout_p,
                optional(seed), asked);
    if (shared) dx = dres;
    return {pick(dx, mask[0]), pick(dres, mask[1]), pick(dw, mask[2]), pick(db, mask[3]), pick(dib, mask[4]),
            Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_autograd(
    const Tensor& input, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& input_bias, double eps, double dropout_p, const OptTensor& seed) {
  auto out = AddLayerNormFunction::apply(input, residual, weight, bias, input_bias, eps, dropout_p, seed);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------------------------------------
// attention_fwd(query, key, value, attn_mask?, scale, is_causal, dropout_p, seed?) -> (out, stats)

using AttentionFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double,
                                                bool, double, const OptTensor&);
using AttentionBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const OptTensor&, const Tensor&,
                                                                double, bool, double,
                                                                const OptTensor&, bool);

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& query, const Tensor& key, const Tensor& value,
                               const OptTensor& attn_mask, double scale, bool is_causal, double dropout_p,
                               const OptTensor& seed) {
    static const auto op = find_op<AttentionFwd>("fused_attn::attention_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, stats] = op.call(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
    ctx->save_for_backward({query, key, value, attn_mask.value_or(Tensor()), stats, seed.value_or(Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["dropout_p"] = dropout_p;
    record_given(ctx, {true, true, true, given(attn_mask)});
    ctx->set_materialize_grads(false);
    return {out, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<AttentionBwd>("fused_attn::attention_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &query = saved[0], &key = saved[1], &value = saved[2], &mask = saved[3], &stats = saved[4],
                 &seed = saved[5];
    const std::array<bool, 4> needs = needs_grad<4>(ctx);
    const bool mask_needs_grad = needs[3];
    if (!grads[0].defined()) return variable_list(8);
    if (differentiable_wanted(grads)) {
      auto out = differentiable_backward(
          "attention", {grads[0], query, key, value, mask, seed},
          {ctx->saved_data["scale"].toDouble(), ctx->saved_data["is_causal"].toBool() ? 1.0 : 0.0,
           ctx->saved_data["dropout_p"].toDouble()},
          needs, 8);
      if (mask_needs_grad) out[3] = out[3].to(mask.scalar_type());
      return out;
    }
    auto [dq, dk, dv, dmask] =
        op.call(unit_last_stride(grads[0]), query, key, value, optional(mask), stats,
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["is_causal"].toBool(),
                ctx->saved_data["dropout_p"].toDouble(), optional(seed), mask_needs_grad);
    return {pick(dq, needs[0]), pick(dk, needs[1]), pick(dv, needs[2]),
            mask_needs_grad ? dmask.to(mask.scalar_type()) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_fwd_autograd(const Tensor& query, const Tensor& key, const Tensor& value,
                                                  const OptTensor& attn_mask, double scale, bool is_causal,
                                                  double dropout_p, const OptTensor& seed) {
  auto out = AttentionFunction::apply(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// softmax_fwd(input, mask?, scale, is_causal) -> out

using SoftmaxFwd = Tensor(const Tensor&, const OptTensor&, double, bool);
using SoftmaxBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, bool);

struct SoftmaxFunction : torch::autograd::Function<SoftmaxFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& mask, double scale,
                        bool is_causal) {
    static const auto op = find_op<SoftmaxFwd>("fused_attn::softmax_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = op.call(input, mask, scale, is_causal);
    ctx->save_for_backward({out});
    ctx->saved_data["scale"] = scale;
    if (mask.has_value()) ctx->saved_data["mask_dtype"] = mask->scalar_type();
    record_given(ctx, {true, given(mask)});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<SoftmaxBwd>("fused_attn::softmax_bwd");
    const Tensor out = ctx->get_saved_variables()[0];
    const std::array<bool, 2> needs = needs_grad<2>(ctx);
    if (differentiable_wanted(grads)) {
      auto grad = differentiable_backward("softmax", {grads[0], out}, {ctx->saved_data["scale"].toDouble()}, needs, 4);
      if (needs[1]) grad[1] = grad[1].to(ctx->saved_data["mask_dtype"].toScalarType());
      return grad;
    }
    auto [dx, dmask] = op.call(grads[0].contiguous(), out, ctx->saved_data["scale"].toDouble(), needs[1]);
    // The kernels give the scores' gradient in float32 (as the attention's); the mask gets its own dtype.
    if (needs[1]) dmask = dmask.to(ctx->saved_data["mask_dtype"].toScalarType());
    return {pick(dx, needs[0]), pick(dmask, needs[1]), Tensor(), Tensor()};
  }
};

Tensor softmax_fwd_autograd(const Tensor& input, const OptTensor& mask, double scale, bool is_causal) {
  return SoftmaxFunction::apply(input, mask, scale, is_causal);
}

// ---------------------------------------------------------------------------------------------
// linear_gelu_fwd(input, weight, bias?, approximate) -> (out, pre_activation)

// The activation code (approximate: "none", "tanh" or "relu") as the second-order formulas take it,
// its index in fused_attn.reference.ffn.ACTIVATION_CODES (fused_attn/ops/_second_order.py).
double activation_index(const std::string& approximate) {
  return static_cast<double>(parse_activation(approximate));
}

using LinearGeluFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, c10::string_view);
using LinearGeluBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         c10::string_view, std::array<bool, 3>);
using LinearGeluBwdConsuming = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  Tensor&, c10::string_view, std::array<bool, 3>);

// Whether a backward may overwrite the saved pre-activation with the consuming form of its op
// (linear_gelu_bwd_consuming, ffn_bwd_consuming: the gradient written over it instead of a buffer of
// its own). Nothing may read the tensor afterwards, which the forward and the backward establish
// together:
//  * at the forward (remember_pre): no saved-tensor hooks are active (a pack hook receives the op's
//    output itself and may keep it, e.g. save_on_cpu);
//  * at the backward (may_consume): the graph is freed after this backward (no retain_graph, so the
//    saved tensor is not unpacked again); the tensor is a plain dense CPU one whose kernel `op` has
//    (not a fake, functional or otherwise wrapped tensor, as under torch.compile's tracing, which
//    takes the plain backward op); it was unpacked from this node's saved output (compiled autograd
//    swaps in tensors of its own); and its memory is held by two tensors alone, the saved variable's
//    and the unpacked one (an output is saved as a tensor of its own, sharing the storage), so the
//    op's second output, which the public ops drop, was let go, and no view or alias of it is left
//    (tests/test_ffn.py: a caller holding any of them finds it intact).
void remember_pre(AutogradContext* ctx) {
  ctx->saved_data["pre_unhooked"] = !at::SavedTensorDefaultHooks::get_hooks().has_value();
}

bool may_consume(AutogradContext* ctx, const Tensor& pre, const c10::OperatorHandle& op) {
  static const c10::DispatchKeySet plain_cpu{c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                             c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU};
  constexpr int64_t kHolders = 2;
  if (!ctx->saved_data["pre_unhooked"].toBool()) return false;
  if (torch::autograd::get_current_graph_task_keep_graph()) return false;
  if (!pre.defined() || pre.layout() != c10::kStrided || !pre.is_contiguous()) return false;
  if (!plain_cpu.isSupersetOf(pre.key_set()) || !op.hasKernelForDispatchKey(c10::DispatchKey::CPU)) return false;
  // Unpacked from this node's own saved output, it carries the node as its grad_fn (a saved tensor
  // swapped in by other machinery, as compiled autograd's, does not, and is held otherwise).
  if (pre.grad_fn() == nullptr) return false;
  return pre.storage().use_count() <= kHolders;
}

struct LinearGeluFunction : torch::autograd::Function<LinearGeluFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight, const OptTensor& bias,
                               c10::string_view approximate) {
    static const auto op = find_op<LinearGeluFwd>("fused_attn::linear_gelu_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pre] = op.call(input, weight, bias, approximate);
    ctx->save_for_backward({input, weight, pre, bias.value_or(Tensor())});
    remember_pre(ctx);
    ctx->saved_data["approximate"] = std::string(approximate);
    record_given(ctx, {true, true, given(bias)});
    ctx->set_materialize_grads(false);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LinearGeluBwd>("fused_attn::linear_gelu_bwd");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = needs_grad<3>(ctx);
    if (!grads[0].defined()) return variable_list(4);
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    if (differentiable_wanted(grads)) {
      return differentiable_backward("linear_gelu", {grads[0], saved[0], saved[1], saved[3]},
                                     {activation_index(approximate)}, mask, 4);
    }
    // grad_pre is formed over the saved pre-activation where nothing reads it again (may_consume).
    static const auto consuming = find_op<LinearGeluBwdConsuming>("fused_attn::linear_gelu_bwd_consuming");
    Tensor pre = saved[2];
    auto [dx, dw, db] = may_consume(ctx, pre, consuming)
                            ? consuming.call(grads[0].contiguous(), saved[0], saved[1], pre, approximate, mask)
                            : op.call(grads[0].contiguous(), saved[0], saved[1], pre, approximate, mask);
    return {pick(dx, mask[0]), pick(dw, mask[1]), pick(db, mask[2]), Tensor()};
  }
};

std::tuple<Tensor, Tensor> linear_gelu_fwd_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                                    c10::string_view approximate) {
  auto out = LinearGeluFunction::apply(input, weight, bias, approximate);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// ffn_fwd(input, w1, b1?, w2, b2?, approximate, dropout_p, seed?) -> (out, pre_activation)

using FfnFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                          const OptTensor&, c10::string_view, double, const OptTensor&);
using FfnBwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&, c10::string_view,
                                                                  double, const OptTensor&, std::array<bool, 5>);

using FfnBwdConsuming = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                            const Tensor&, const Tensor&, Tensor&,
                                                                            c10::string_view, double, const OptTensor&,
                                                                            std::array<bool, 5>);

struct FfnFunction : torch::autograd::Function<FfnFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& w1, const OptTensor& b1,
                               const Tensor& w2, const OptTensor& b2, c10::string_view approximate,
                               double dropout_p, const OptTensor& seed) {
    static const auto op = find_op<FfnFwd>("fused_attn::ffn_fwd");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pre] = op.call(input, w1, b1, w2, b2, approximate, dropout_p, seed);
    ctx->save_for_backward({input, w1, w2, pre, seed.value_or(Tensor()), b1.value_or(Tensor())});
    remember_pre(ctx);
    ctx->saved_data["approximate"] = std::string(approximate);
    ctx->saved_data["dropout_p"] = dropout_p;
    record_given(ctx, {true, true, given(b1), true, given(b2)});
    ctx->set_materialize_grads(false);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<FfnBwd>("fused_attn::ffn_bwd");
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 5> mask = needs_grad<5>(ctx);
    if (!grads[0].defined()) return variable_list(8);
    const std::string approximate = ctx->saved_data["approximate"].toStringRef();
    const double dropout_p = ctx->saved_data["dropout_p"].toDouble();
    if (differentiable_wanted(grads)) {
      return differentiable_backward("ffn", {grads[0], saved[0], saved[1], saved[5], saved[2], saved[4]},
                                     {activation_index(approximate), dropout_p}, mask, 8);
    }
    Tensor pre = saved[3];
    // The pre-activation's gradient is formed over the saved pre-activation where nothing reads it again:
    // the backward's peak then holds one [rows, hidden] tensor instead of two.
    static const auto consuming = find_op<FfnBwdConsuming>("fused_attn::ffn_bwd_consuming");
    const Tensor grad_out = grads[0].contiguous();
    const OptTensor seed = optional(saved[4]);
    auto [dx, dw1, db1, dw2, db2] =
        may_consume(ctx, pre, consuming)
            ? consuming.call(grad_out, saved[0], saved[1], saved[2], pre, approximate, dropout_p, seed, mask)
            : op.call(grad_out, saved[0], saved[1], saved[2], pre, approximate, dropout_p, seed, mask);
    return {pick(dx, mask[0]), pick(dw1, mask[1]), pick(db1, mask[2]), pick(dw2, mask[3]), pick(db2, mask[4]),
            Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> ffn_fwd_autograd(const Tensor& input, const Tensor& w1, const OptTensor& b1,
                                            const Tensor& w2, const OptTensor& b2, c10::string_view approximate,
                                            double dropout_p, const OptTensor& seed) {
  auto out = FfnFunction::apply(input, w1, b1, w2, b2, approximate, dropout_p, seed);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// The autograd kernel of the ops without a derivative (the backwards and the inference forms).
// As torch's autogradNotImplementedFallback, for functional ops: with grad mode on and an input
// that requires grad (a backward run with create_graph=True), the outputs take an Error node,
// which raises when a second backward reaches it; its message says what to do instead. An input
// with a forward-mode tangent raises at once. The node
// is held by shared_ptr up to torch 2.11 and by intrusive_ptr later: Edge::function says which.

using NodePtr = decltype(torch::autograd::Edge::function);

template <typename Ptr = NodePtr, typename Node = torch::autograd::Error>
Ptr error_node(std::string message) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<Node>(std::move(message));
  } else {
    return c10::make_intrusive<Node>(std::move(message));
  }
}

void no_derivative(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  torch::autograd::edge_list edges;
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(schema.arguments().size()); it != stack->end(); ++it) {
    if (!it->isTensor() || !it->toTensor().defined()) continue;
    // A forward-mode tangent (forward-over-reverse, e.g. a Hessian-vector product) would be dropped.
    TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(it->toTensor()), "Trying to use forward AD with ",
                                schema.name(), " that does not support it: the fused kernels have no forward ",
                                "derivative; call the op with backend='reference', or fused_attn.restore(model)");
    if (at::GradMode::is_enabled() && it->toTensor().requires_grad()) {
      edges.push_back(torch::autograd::impl::gradient_edge(it->toTensor()));
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView below;  // the kernel's own ATen calls record nothing either
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (edges.empty()) return;
  const std::string& name = schema.name();
  const std::string suffix = "_inference";
  const bool inference =
      name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  auto node = error_node(
      "derivative for " + name + " is not implemented: " +
      (inference ? "it is the forward without what a backward reads, which fused_attn's ops call only when no "
                   "gradient is asked for"
                 : "it is the kernels' backward, whose gradients have no derivative of their own; the fused ops' "
                   "own backward gives differentiable gradients (create_graph=True), or call the op with "
                   "backend='reference'"));
  node->set_next_edges(std::move(edges));
  for (auto it = stack->end() - static_cast<std::ptrdiff_t>(schema.returns().size()); it != stack->end(); ++it) {
    if (it->isTensor() && torch::autograd::isDifferentiableType(it->toTensor().scalar_type())) {
      torch::autograd::set_history(it->toTensor(), node);
    }
  }
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, Autograd, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_autograd);
  m.impl("add_layer_norm_fwd", &fused_attn::add_layer_norm_fwd_autograd);
  m.impl("attention_fwd", &fused_attn::attention_fwd_autograd);
  m.impl("softmax_fwd", &fused_attn::softmax_fwd_autograd);
  m.impl("linear_gelu_fwd", &fused_attn::linear_gelu_fwd_autograd);
  m.impl("ffn_fwd", &fused_attn::ffn_fwd_autograd);
  // Ops without a derivative (the backwards, and the inference forms): a gradient asked
  // of them raises instead of being silently absent.
  for (const char* op : {"layer_norm_bwd", "add_layer_norm_bwd", "attention_bwd", "softmax_bwd", "linear_gelu_bwd",
                         "linear_gelu_bwd_scratch", "linear_gelu_bwd_consuming", "ffn_bwd", "ffn_bwd_consuming",
                         "linear_gelu_inference", "add_layer_norm_inference", "ffn_inference"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&fused_attn::no_derivative>());
  }
}
