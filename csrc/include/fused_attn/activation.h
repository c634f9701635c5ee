// The FFN kernels' activation (the ops' approximate argument: "none" erf GELU, "tanh" tanh GELU,
// "relu"; fused_attn.reference.ffn.ACTIVATION_CODES, in that order), shared by the CPU and CUDA
// kernels and the autograd formulas.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>

#include <c10/util/Exception.h>

namespace fused_attn {

enum class Activation : int { kGeluErf = 0, kGeluTanh = 1, kRelu = 2 };

// The activation of a code; raises naming approximate for any other string.
inline Activation parse_activation(std::string_view code) {
  if (code == "none") return Activation::kGeluErf;
  if (code == "tanh") return Activation::kGeluTanh;
  TORCH_CHECK(code == "relu", "approximate must be \"none\", \"tanh\" or \"relu\", got \"", std::string(code), "\"");
  return Activation::kRelu;
}

// fn(std::integral_constant<Activation, act>{}): the activation as a template argument.
template <typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kGeluErf: return fn(std::integral_constant<Activation, Activation::kGeluErf>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
  }
}

}  // namespace fused_attn
