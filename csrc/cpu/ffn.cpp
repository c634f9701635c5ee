// CPU kernels of fused_attn::linear_gelu_fwd / linear_gelu_bwd (schemas in csrc/ops.cpp).
//
// The GEMMs go to the BLAS that torch uses (at::mm / at::addmm: MKL or oneDNN, already blocked
// and multi-threaded far better than a hand-written loop would be); what is fused is the
// elementwise work around them, each in one vectorised, multi-threaded pass over memory:
//  * forward: in float32 the GEMM without the bias (at::mm), then one pass that adds the bias,
//    writes the pre-activation (an output anyway) back in place where it is kept, and writes
//    gelu(pre-activation): at::addmm (F.linear's form) broadcasts the bias into the output and the
//    GEMM reads it back, two passes over the output that the GELU pass, bound by its arithmetic,
//    absorbs the add of (linear_gelu at 2048 x 768 -> 3072, A/B alternating on a 2-core AVX-512
//    CPU: 34.4-34.9 -> 33.5-34.2 ms without gradient, 32.4-32.6 -> 31.5-32.0 ms with it; at 512
//    tokens 8.5-9.3 -> 8.5-8.8 and 8.5-8.6 -> 8.3-8.5 ms; an earlier AVX2 machine had measured the
//    addmm form 5% faster at 512 x 768 -> 3072). Where the 16-bit GEMMs are native the bias rides
//    in at::addmm and the GELU is torch's (below). Where the
//    GEMM runs widened to float32 (below), that pass also rounds the pre-activation to the
//    storage dtype and stores it, and the GELU reads the rounded value -- what the backward
//    reads, as the Triton kernel does. The inference form (linear_gelu_inference, for calls
//    that need no gradient) keeps no pre-activation: the pass writes the GELU over the GEMM's
//    result in place, one [rows, out_features] tensor instead of two, the same output bits;
//  * backward: one pass forms grad_pre = grad_out * gelu'(pre) and, in the same pass, the bias
//    gradient (column sums of grad_pre); then grad_input = grad_pre @ weight and
//    grad_weight = grad_pre^T @ input are two GEMMs;
//  * the FFN's backward (ffn_hidden_bwd_cpu, called by csrc/ffn.cpp) runs the same pass slab by
//    slab of rows (kSlabMinRows, kSlabBytes), each slab's hidden gradient grad_out @ w2 formed by
//    its own GEMM and gone after the pass, as is its recomputed activation gelu(pre), which enters
//    dW2 += grad_out^T gelu(pre) first (float32 GEMMs; a 16-bit native GEMM takes the batch whole,
//    so that dW2 is not summed in 16 bits). Where the autograd formula allows (ffn_bwd_consuming),
//    grad_pre is written over the saved pre-activation, row by row after it was read: the backward
//    then holds one [rows, hidden] tensor at its peak where eager PyTorch holds three.
// The activation is the GELU (approximate "none": erf; "tanh") or ReLU (approximate "relu", the FFN's
// activation="relu"), the same passes templated on it (Activation, fused_attn/activation.h); "gelu"
// below stands for either.
// The elementwise arithmetic is float32 on at::vec::Vectorized<float>, with torch's GELU
// formulas (erf, or tanh for approximate="tanh") evaluated inline (see gelu below). The bias
// gradient is deterministic: rows are cut into chunks by shape alone
// (cpu_rows::num_row_chunks), each chunk sums into its own float64 buffer,
// and the buffers are added in chunk order, so the bits do not depend on the thread count.
//
// fp16/bf16: the GEMMs (the FFN's second linear's and backward's too: ffn_linear_cpu,
// ffn_hidden_bwd_cpu) run in the storage dtype where the CPU multiplies it natively (oneDNN on
// AVX512-BF16/AMX for bf16, AVX512-FP16/AMX-FP16 for fp16), as torch does; elsewhere torch's
// reduced-precision GEMM is a slow portable loop, so the operands are widened to float32 and
// sgemm does the work (on an AVX2 machine without either, BERT-base's FFN forward + backward at
// 512 tokens took 7.0 s eager in bf16 and 0.16 s here, against 0.13 s in float32). Measured at
// 2048x768->3072 on an AVX512-BF16 EPYC (no AVX512-FP16): bf16 natively 63 ms vs 148 ms widened;
// fp16 natively 490-980 ms vs 137-284 ms widened. The
// widened path is also at least as accurate: products of fp16/bf16 values are exact in float32,
// the accumulation is float32 either way, the bias is added before the one rounding of the
// pre-activation, and grad_pre enters the gradient GEMMs unrounded.
// Where the 16-bit GEMMs run natively (torch_gelu), the GELU and its gradient are torch's own
// kernels instead of this file's passes: on an AMX Xeon the AVX2 set's exact-GELU pass took 0.97 ms
// over 512 x 3072 bf16 against 0.33 ms for torch's (the FFN's forward then ran at 0.87x eager), and
// the AVX-512 set's still leaves the FFN's forward at 0.83-0.87x eager against 0.93-0.98x with
// torch's (README, CPU figures). What eager computes, with its accuracy:
// torch's 1 + erf loses the far negative tail (x < -4.5, |GELU| < 1.6e-5) to cancellation, which
// normal_parts below does not; the bias gradient is the column sum of the 16-bit grad_pre, as
// F.linear's backward forms it.
#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/Utils.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "fused_attn/activation.h"
#include "fused_attn/checks.h"
#include "fused_attn/cpu_rows.h"
#include "fused_attn/ffn_cpu.h"
#include "fused_attn/philox.h"

namespace fused_attn {
namespace {

using namespace cpu_rows;

// GELU and its derivative with the constants of torch's CPU kernels
// (aten/src/ATen/native/cpu/Activation.cpp), the exponentials evaluated inline (exp_inline, exp_in_range)
// instead of through Sleef's dispatched, out-of-line calls. The exact GELU's normal cdf comes
// from erfc with a small relative error everywhere (normal_parts), not from 1 + erf(z) with
// Abramowitz-Stegun's 7.1.26 erf (absolute error 1.5e-7, as Vectorized<float>::erf): in the
// negative tail, where 1 + erf(z) is small, that absolute error is a large relative one (GELU at
// x = -3.7 off by 2.8e-7 on a value of 5e-4). One exponential serves the cdf and, in the
// derivative, the density. The tanh approximation takes tanh from one
// exponential (tanh_parts) instead of Sleef's tanh: about twice the throughput, at least the same
// accuracy.
// The FFN backward (ffn_hidden_bwd_cpu) forms the hidden gradient slab by slab of at least this many
// rows and bytes (float32): at BERT-base's 3072 hidden units, 683 rows (8 MiB) instead of the batch,
// large enough that the GEMMs run as fast as on the whole batch.
constexpr int64_t kSlabMinRows = 256;
constexpr int64_t kSlabBytes = int64_t{8} << 20;

constexpr float kSqrtHalf = 0.70710678118654752440f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;

// exp(x) to about 1 ulp (Cephes expf) for x in [log(FLT_MIN), 88]: x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by a degree-6 polynomial, times 2^n built
// in the exponent bits. NaN stays NaN. For arguments the caller keeps in range (normal_parts),
// without exp_inline's clamp and underflow select, about 6 of the pass's 60-odd instructions.
C10_ALWAYS_INLINE fVec exp_in_range(const fVec& x) {
  const fVec n = (x * fVec(1.44269504088896341f)).round();
  fVec r = at::vec::fnmadd(n, fVec(0.693359375f), x);
  r = at::vec::fnmadd(n, fVec(-2.12194440e-4f), r);
  fVec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, fVec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, fVec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, fVec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, fVec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, fVec(5.0000001201e-1f));
  const fVec y = at::vec::fmadd(p, r * r, r + fVec(1.f));
#if defined(CPU_CAPABILITY_AVX512)
  return fVec(_mm512_scalef_ps(y, n));  // y * 2^n in one instruction, the same bits
#else
  using iVec = at::vec::Vectorized<int32_t>;
  const iVec biased = at::vec::convert_to_int_of_same_size(n) + iVec(127);
  const fVec scale = at::vec::cast<float>(biased << iVec(23));
  return y * scale;
#endif
}

// 1 / d for d >= 1. With AVX-512, vrcp14ps (relative error below 2^-14) and one Newton step,
// r + r (1 - d r): within an ulp or so, where vdivps's 512-bit form occupies its port for 10
// cycles a vector, as much as the rest of normal_parts' arithmetic on it. d = +inf gives NaN,
// which normal_parts' callers never read (its far lanes are blended away).
C10_ALWAYS_INLINE fVec reciprocal(const fVec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(d);
  return fVec(_mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r));
#else
  return fVec(1.f) / d;
#endif
}

// exp(x) for any x: arguments above 88 give e^88 (only tanh_parts reads such arguments, and its
// results, 2 and ~0, are the same either way); arguments below log(FLT_MIN) give 0.
C10_ALWAYS_INLINE fVec exp_inline(const fVec& x) {
  constexpr float kMinArg = -87.33654475f;  // log(FLT_MIN)
  const fVec y = exp_in_range(at::vec::clamp(x, fVec(kMinArg), fVec(88.f)));
  return fVec::blendv(y, fVec(0.f), x < fVec(kMinArg));
}

// The standard normal cdf Phi(x) and exp(-x^2 / 2) (the density without its 1 / sqrt(2 pi)),
// to a few ulps relative, from one exponential. For |x| <= 1, where most pre-activations fall,
// Phi(x) = 1/2 + x R(x^2), R a degree-5 polynomial fitted (relative minimax on Chebyshev nodes)
// to (Phi(x) - 1/2) / x: relative error 7e-10, the GELU within 1.9 ulps on (-0.7, 1] and 2.7 on
// [-1, -0.7] evaluated in float (x R is at most twice Phi there, so R's rounding is not
// amplified further), where torch's 1 + erf stays within 2.2 (the erfc route below, taking
// erfc's relative error at the size of 1/2 in 1 - erfc / 2, was up to 5.8 ulps off there).
// Beyond, with a = |x| / sqrt(2) and t = 1 / (1 + a/2), erfc(a) = t exp(-a^2) Q(t), Q a degree-8
// polynomial fitted the same way to erfc(a) exp(a^2) / t over t in [0.18, 0.739], i.e. |x| from 1
// to 12.6: relative error 4e-9, about an ulp evaluated in float (by Estrin's scheme: a dependency
// chain of 4 FMAs, not 8); Phi(x) = erfc(a) / 2 for x < 0 and 1 - erfc(a) / 2 above, neither of
// which cancels. (Before R, Q was a degree-10 fit over every t in (0, 1], and the exact GELU
// took 1.2 ns an element on one AVX2 core, 1.35x torch's own F.gelu; R and the shorter Q cost
// about 4% more over a row in cache, 256 x 3072 on an AMX Xeon 0.30 -> 0.32 ms: in the FFN it is
// lost in the GEMMs.) exp(-a^2) = exp(-x^2 / 2) keeps its large
// argument exact: x^2 = hi + lo by an FMA (halving is exact), exp(-hi/2) (hi/2 a float) times
// 1 - lo/2 (|lo| is below half an ulp of x^2). Past x^2 / 2 = 80 (|x| > 12.6) Phi is 0 or 1 and
// the density 0: the true values (below 1e-35) would be subnormal, which costs a microcode
// assist per lane. NaN stays NaN; x = +-inf gives Phi 1 or 0 and density 0, so GELU(-inf) and
// both gradients at +-inf are NaN (inf * 0), as torch's.
constexpr float kPhiNearZeroFit[6] = {
    3.98942292e-01f, -6.64903596e-02f, 9.97332297e-03f, -1.18632999e-03f, 1.13486363e-04f, -7.65420646e-06f,
};
constexpr float kErfcFit[9] = {
    2.8207594156e-01f, 2.8257668018e-01f, 2.4153253436e-01f, 2.0911949873e-01f, -4.1489291936e-02f,
    2.9719007015e-01f, -4.9919107556e-01f, 2.8627005219e-01f, -5.8046389371e-02f,
};

struct NormalParts {
  fVec cdf;      // Phi(x)
  fVec density;  // exp(-x^2 / 2)
};

// x * x - hi exactly, for hi = x * x rounded: one FMA where at::vec's fmsub is fused (AVX2,
// AVX-512, NEON), else Dekker's product (x split into halves whose products are exact in float)
// for the portable loops of the generic set on x86, whose fmsub rounds twice (and left the
// GELU's far negative tail off by 2e-6 relative).
C10_ALWAYS_INLINE fVec square_residual(const fVec& x, const fVec& hi) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(__aarch64__)
  return at::vec::fmsub(x, x, hi);
#else
  const fVec c = x * fVec(4097.f);  // 2^12 + 1: splits a 24-bit significand into two 12-bit halves
  const fVec xh = c - (c - x);
  const fVec xl = x - xh;
  return ((xh * xh - hi) + fVec(2.f) * xh * xl) + xl * xl;
#endif
}

C10_ALWAYS_INLINE NormalParts normal_parts(const fVec& x) {
  const fVec hi = x * x;
  const fVec lo = square_residual(x, hi);  // x^2 - hi, exactly
  const fVec half_hi = fVec(0.5f) * hi;
  const fVec a = x.abs() * fVec(kSqrtHalf);
  const fVec t = reciprocal(at::vec::fmadd(fVec(0.5f), a, fVec(1.f)));
  const fVec t2 = t * t;
  const fVec t4 = t2 * t2;
  const auto pair = [&](int k) { return at::vec::fmadd(fVec(kErfcFit[k + 1]), t, fVec(kErfcFit[k])); };
  const fVec low = at::vec::fmadd(at::vec::fmadd(pair(6), t2, pair(4)), t4, at::vec::fmadd(pair(2), t2, pair(0)));
  const fVec q = at::vec::fmadd(fVec(kErfcFit[8]), t4 * t4, low);
  const fVec density =
      exp_in_range(at::vec::clamp_max(half_hi, fVec(80.f)).neg()) * at::vec::fnmadd(fVec(0.5f), lo, fVec(1.f));
  const fVec half_erfc = fVec(0.5f) * t * density * q;
  fVec r(kPhiNearZeroFit[5]);
  for (int k = 4; k >= 0; --k) r = at::vec::fmadd(r, hi, fVec(kPhiNearZeroFit[k]));
  const fVec near_cdf = at::vec::fmadd(x, r, fVec(0.5f));
#if defined(CPU_CAPABILITY_AVX512)
  // The same selections on mask registers (at::vec's comparisons give vectors, which each blend
  // turns back into a mask). far: past x^2 / 2 = 80, also x = +-inf; false for NaN.
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __mmask16 far_lanes = _mm512_cmp_ps_mask(half_hi, _mm512_set1_ps(80.f), _CMP_GT_OQ);
  const __mmask16 near_lanes = _mm512_cmp_ps_mask(hi, _mm512_set1_ps(1.f), _CMP_LE_OQ);
  const __m512 cdf = _mm512_mask_blend_ps(
      near_lanes, _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.f), half_erfc), half_erfc), near_cdf);
  const __m512 far_cdf = _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.f), _mm512_setzero_ps());
  return {fVec(_mm512_mask_blend_ps(far_lanes, cdf, far_cdf)), fVec(_mm512_maskz_mov_ps(~far_lanes, density))};
#else
  const fVec far = half_hi > fVec(80.f);  // also x = +-inf; false for NaN
  const fVec negative = x < fVec(0.f);
  const fVec cdf = fVec::blendv(fVec::blendv(fVec(1.f) - half_erfc, half_erfc, negative), near_cdf, hi <= fVec(1.f));
  const fVec far_cdf = fVec::blendv(fVec(1.f), fVec(0.f), negative);
  return {fVec::blendv(cdf, far_cdf, far), fVec::blendv(density, fVec(0.f), far)};
#endif
}

// For the tanh approximation, with t = tanh(u) = 1 - s, s = 2 / (E + 1), E = exp(2u) (the
// Triton kernel's formula, which saturates without overflow): 1 + t = 2 - s where u >= 0 and
// E * s where u < 0, and 1 - t^2 = s * (1 + t), each free of the cancellation that 1 + t and
// 1 - t * t suffer where |t| is near 1.
struct TanhParts {
  fVec one_plus_t;    // 1 + tanh(u)
  fVec one_minus_t2;  // 1 - tanh(u)^2
};

C10_ALWAYS_INLINE TanhParts tanh_parts(const fVec& u) {
  const fVec e = exp_inline(u + u);
  const fVec s = fVec(2.f) / (e + fVec(1.f));
  const fVec one_plus_t = fVec::blendv(fVec(2.f) - s, e * s, u < fVec(0.f));
  // Past u = 40, 1 - t^2 (below 1e-34) is 0: exp_inline saturates at e^88, which would leave a
  // floor of about 1e-38 that the tanh GELU's gradient multiplies by a cube of x.
  return {one_plus_t, fVec::blendv(s * one_plus_t, fVec(0.f), u > fVec(40.f))};
}

template <bool kTanh>
C10_ALWAYS_INLINE fVec gelu(const fVec& x) {
  if constexpr (kTanh) {
    const fVec inner = fVec(kSqrt2OverPi) * (x + fVec(kKappa) * (x * x * x));
    return fVec(0.5f) * x * tanh_parts(inner).one_plus_t;
  } else {
    return x * normal_parts(x).cdf;
  }
}

template <bool kTanh>
C10_ALWAYS_INLINE fVec gelu_grad(const fVec& x) {
  if constexpr (kTanh) {
    const fVec x_sq = x * x;
    const fVec inner = fVec(kSqrt2OverPi) * (x + fVec(kKappa) * (x_sq * x));
    const TanhParts t = tanh_parts(inner);
    const fVec left_derivative = fVec(0.5f) * t.one_plus_t;
    const fVec right_derivative =
        fVec(0.5f) * x * t.one_minus_t2 * fVec(kSqrt2OverPi) * (fVec(1.f) + fVec(3.f * kKappa) * x_sq);
    // Where 1 - t^2 is 0 so is the second term, also where x * x overflows (|x| > 1.8e19, where
    // 0 * inf would be NaN); x * 0 keeps torch's NaN at x = +-inf.
    return left_derivative + fVec::blendv(right_derivative, x * fVec(0.f), t.one_minus_t2 == fVec(0.f));
  } else {
    const NormalParts n = normal_parts(x);
    return at::vec::fmadd(x, fVec(kInvSqrt2Pi) * n.density, n.cdf);
  }
}

template <Activation kAct>
C10_ALWAYS_INLINE fVec activation(const fVec& x) {
  if constexpr (kAct == Activation::kRelu) {
    return fVec::blendv(x, fVec(0.f), x < fVec(0.f));  // as torch.relu: NaN stays NaN
  } else {
    return gelu<kAct == Activation::kGeluTanh>(x);
  }
}

// dy * act'(x). ReLU's is torch's threshold_backward: 0 where x <= 0, else dy (x = NaN passes dy).
template <Activation kAct>
C10_ALWAYS_INLINE fVec activation_grad_times(const fVec& dy, const fVec& x) {
  if constexpr (kAct == Activation::kRelu) {
    return fVec::blendv(dy, fVec(0.f), x <= fVec(0.f));
  } else {
    return dy * gelu_grad<kAct == Activation::kGeluTanh>(x);
  }
}

// Whether this CPU multiplies T natively (where torch's GEMM for T goes to oneDNN's fast
// kernels); float32 always.
bool native_gemm(at::ScalarType type) {
  static const std::array<bool, 2> reduced = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto has = [&](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return std::array<bool, 2>{has("avx512_bf16") || has("amx_bf16"), has("avx512_fp16") || has("amx_fp16")};
  }();
  if (type == at::kBFloat16) return reduced[0];
  if (type == at::kHalf) return reduced[1];
  return true;
}

// The 16-bit dtypes whose activation passes are torch's kernels (see the header).
bool torch_gelu(at::ScalarType type) { return type != at::kFloat && native_gemm(type); }

// torch's kernels of the activation (torch_gelu dtypes): act(x), in place on x where asked.
at::Tensor torch_activation(const at::Tensor& x, c10::string_view approximate, bool in_place) {
  at::Tensor y = x;  // a non-const handle for the in-place forms
  if (approximate == "relu") return in_place ? at::relu_(y) : at::relu(x);
  return in_place ? at::gelu_(y, approximate) : at::gelu(x, approximate);
}

// g = dy * act'(pre) by torch's kernels (torch_gelu dtypes).
void torch_activation_backward_out(at::Tensor& g, const at::Tensor& dy, const at::Tensor& pre,
                                   c10::string_view approximate) {
  if (approximate == "relu") {
    at::threshold_backward_out(g, dy, pre, 0);
  } else {
    at::gelu_backward_out(g, dy, pre, approximate);
  }
}

// Rows [begin, end) of the forward's elementwise pass over src [rows, cols] (the GEMM's result,
// float32 or the storage dtype): v = src (+ bias[col] where bias is not null, the float32 GEMM's
// bias) rounded to scalar_t, stored to pre where pre is not null (it may be src itself), and
// out = act(v). out may be src itself (in place: each block is loaded before it is stored).
template <typename scalar_t, typename src_t, Activation kAct>
void activation_fwd_rows(const src_t* src, const float* bias, scalar_t* pre, scalar_t* out, int64_t cols,
                         int64_t begin, int64_t end) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * cols;
    for_each_block<B>(cols, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
      fVec v[P], o[P];
      prefetch_ahead(src + row + j);
      load_block(src + row + j, len, v);
      if (bias != nullptr) {
        fVec b[P];
        load_block(bias + j, len, b);
        for (int k = 0; k < P; ++k) v[k] = v[k] + b[k];
      }
      if (pre != nullptr) store_block(pre + row + j, len, v);
      if constexpr (!std::is_same_v<src_t, scalar_t>) round_block<scalar_t>(v);
      for (int k = 0; k < P; ++k) o[k] = activation<kAct>(v[k]);
      store_block(out + row + j, len, o);
    });
  }
}

// Rows [begin, end) of the backward's elementwise pass: grad_pre = dy * act'(pre), stored to
// grad_pre (float32 or scalar_t; it may be pre itself) when it is not null, and its column sums
// (unrounded) added to this chunk's float64 sums db_part (cpu_rows::ColumnSums) when not null.
// dy (scalar_t or float32) holds rows from dy_row0 on. The order of rows and blocks is
// cpu_rows::backward_rows'.
template <typename scalar_t, typename dy_t, typename grad_t, Activation kAct>
void activation_bwd_rows(const dy_t* dy, int64_t dy_row0, const scalar_t* pre, int64_t cols, int64_t begin,
                         int64_t end, grad_t* grad_pre, double* db_part) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  struct NoConstants {};
  backward_rows<scalar_t, 1, B>(
      cols, begin, end, {db_part}, [](int64_t) { return NoConstants{}; },
      [&](int64_t r, int64_t j, int64_t len, NoConstants, auto& sums) C10_ALWAYS_INLINE_ATTRIBUTE {
        const int64_t offset = r * cols + j;
        fVec dyv[P], xv[P], g[P];
        prefetch_ahead(dy + (r - dy_row0) * cols + j);
        prefetch_ahead(pre + offset);
        load_block(dy + (r - dy_row0) * cols + j, len, dyv);  // zero past the row: adds nothing to the sums
        load_block(pre + offset, len, xv);
        for (int k = 0; k < P; ++k) g[k] = activation_grad_times<kAct>(dyv[k], xv[k]);
        if (sums.wanted(0)) sums.add(0, g);
        if (grad_pre != nullptr) store_block(grad_pre + offset, len, g);
      });
}

Activation check_approximate(c10::string_view approximate) {
  return parse_activation(std::string_view(approximate.data(), approximate.size()));
}

// A weight [out_features, in_features] of the input's dtype and device (any strides: it only
// enters GEMMs); returns out_features.
int64_t check_weight(const at::Tensor& weight, const char* name, const at::Tensor& input, int64_t in_features) {
  return check_linear_weight(weight, name, input, in_features, "in_features of the input", /*contiguous=*/false);
}

// input [rows, in_features] @ weight^T + bias, the operands widened to float32 and the result left
// there: the GEMM of a dtype this CPU does not multiply natively (see above).
at::Tensor linear_float32(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const at::Tensor input_f = input.to(at::kFloat), weight_f = weight.to(at::kFloat);
  return bias.has_value() && bias->defined() ? at::addmm(bias->to(at::kFloat), input_f, weight_f.t())
                                             : at::mm(input_f, weight_f.t());
}

// Row chunks [c0, c1) (of nchunks over rows) of the backward's elementwise pass, activation_bwd_rows per
// chunk, in parallel: dy holds rows from dy_row0 on; grad_pre is not stored where null, and chunk
// c's column sums go to chunk_partials(db_part, c, cols) where db_part is not null.
template <typename scalar_t, typename dy_t, typename grad_t>
void activation_bwd_chunks(Activation act, const dy_t* dy, int64_t dy_row0, const scalar_t* pre, int64_t rows,
                           int64_t cols, int64_t nchunks, int64_t c0, int64_t c1, grad_t* grad_pre, double* db_part) {
  dispatch_activation(act, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    at::parallel_for(c0, c1, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const auto [begin, end] = chunk_rows(c, nchunks, rows);
        activation_bwd_rows<scalar_t, dy_t, grad_t, kAct>(dy, dy_row0, pre, cols, begin, end, grad_pre,
                                                          chunk_partials(db_part, c, cols));
      }
    });
  });
}

// t's data as T*, or null where t is undefined.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// The forward, with the pre-activation (keep_pre: what the backward reads) or without it
// (inference: the second tensor is undefined). Without it, where the GEMM runs in the storage
// dtype, the GELU is applied in place over the GEMM's result, so the call makes one
// [rows, out_features] tensor instead of two; the output has the same bits either way.
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_impl(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view approximate, bool keep_pre) {
  const auto shape = check_rows_input(input, "input");
  const int64_t rows = shape.first, in_features = shape.second;
  const int64_t out_features = check_weight(weight, "weight", input, in_features);
  check_affine_param(bias, "bias", input, out_features);
  const Activation act = check_approximate(approximate);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto storage = [&] { return at::empty({rows, out_features}, input.options()); };

  if (rows == 0 || out_features == 0) return {storage(), keep_pre ? storage() : at::Tensor()};

  at::Tensor acc;  // the GEMM's result, read by the pass: the pre-activation itself, or float32
  at::Tensor pre;  // the pre-activation in the storage dtype, when kept
  at::Tensor out;
  const bool widened = !native_gemm(input.scalar_type());
  const float* pass_bias = nullptr;  // the bias, where the pass adds it (float32 GEMM, own GELU)
  if (torch_gelu(input.scalar_type())) {
    // The bias rides in the GEMM, as in F.linear (the same BLAS call, so the same bits), and the
    // activation is torch's.
    acc = has_bias ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
    return {torch_activation(acc, approximate, /*in_place=*/!keep_pre), keep_pre ? acc : at::Tensor()};
  }
  if (!widened) {
    // float32: the GEMM without the bias, which the pass adds (one add a vector in a pass bound by
    // the GELU's arithmetic), writing the pre-activation back in place where it is kept: addmm's
    // bias is a broadcast copy into the output that the GEMM then reads back, two more passes over
    // [rows, out_features] memory (measured below).
    acc = at::mm(input, weight.t());
    if (has_bias) pass_bias = bias->const_data_ptr<float>();  // float32 and contiguous (checked above)
    pre = keep_pre ? acc : at::Tensor();
    out = keep_pre ? storage() : acc;
  } else {
    // Widened to float32 (see above); the pass rounds the pre-activation once (and stores it).
    acc = linear_float32(input, weight, bias);
    pre = keep_pre ? storage() : at::Tensor();
    out = storage();
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / 8 / out_features);

  AT_DISPATCH_V2(input.scalar_type(), "linear_gelu_fwd_cpu", AT_WRAP([&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // The pass makes pre where it is kept: rounding the widened GEMM's float32 result, or adding
    // the bias to the float32 GEMM's result in place (without a bias, pre is the result as it is).
    scalar_t* pp = keep_pre && (widened || pass_bias != nullptr) ? pre.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      if (widened) {
        const float* src = acc.const_data_ptr<float>();
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          activation_fwd_rows<scalar_t, float, kAct>(src, nullptr, pp, op, out_features, begin, end);
        });
      } else {
        const scalar_t* src = acc.const_data_ptr<scalar_t>();
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          activation_fwd_rows<scalar_t, scalar_t, kAct>(src, pass_bias, pp, op, out_features, begin, end);
        });
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view approximate) {
  return linear_gelu_fwd_impl(input, weight, bias, approximate, /*keep_pre=*/true);
}

at::Tensor linear_gelu_inference_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  return std::get<0>(linear_gelu_fwd_impl(input, weight, bias, approximate, /*keep_pre=*/false));
}

// A tensor the backward writes grad_pre over must share no memory with an operand read after that
// write (the GEMMs forming the input and weight gradients): they would read gradient values instead.
void check_not_read_after(const at::Tensor& written, const char* name,
                          std::initializer_list<std::pair<const at::Tensor&, const char*>> read) {
  for (const auto& [t, read_name] : read) {
    TORCH_CHECK(!written.is_alias_of(t), name, " is overwritten with the pre-activation's gradient here, so it must not "
                "share memory with ", read_name, ", which is read afterwards");
  }
}

// Where grad_pre may go besides a buffer of its own, when the dtypes agree: over grad_out (kGradOut,
// linear_gelu_bwd_scratch) or over pre_activation (kPre, linear_gelu_bwd_consuming). In place is safe:
// each element of grad_out and pre_activation is read before the same element of grad_pre is stored.
enum class Scratch { kNone, kGradOut, kPre };

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_impl(const at::Tensor& grad_out,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    const at::Tensor& pre_activation,
                                                                    c10::string_view approximate,
                                                                    std::array<bool, 3> output_mask,
                                                                    Scratch scratch) {
  const auto shape = check_rows_input(input, "input");
  const int64_t rows = shape.first, in_features = shape.second;
  const int64_t out_features = check_weight(weight, "weight", input, in_features);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == out_features,
              "grad_out must have shape [", rows, ", ", out_features, "] ([rows of input, out_features of weight]), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "grad_out must have dtype ", input.scalar_type(),
              " like the input, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "grad_out must be on ", input.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(grad_out.is_contiguous(), "grad_out must be contiguous");
  check_same_as(pre_activation, "pre_activation", grad_out, "grad_out");
  const Activation act = check_approximate(approximate);
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];

  // Unselected gradients are distinct [0] tensors: outputs of an op must not alias each other. The
  // GEMMs' outputs are allocated after the elementwise pass, which then holds fewer tensors.
  const auto make_dx = [&] { return need_dx ? at::empty_like(input) : at::empty({0}, input.options()); };
  const auto make_dw = [&] { return need_dw ? at::empty_like(weight) : at::empty({0}, input.options()); };
  at::Tensor db = need_db ? at::empty({out_features}, input.options()) : at::empty({0}, input.options());
  if (!(need_dx || need_dw || need_db)) return {make_dx(), make_dw(), db};
  if (rows == 0 || out_features == 0) {
    // Empty sums: every gradient is zero (grad_input too when there are no output features).
    return {make_dx().zero_(), make_dw().zero_(), db.zero_()};
  }

  const bool native = native_gemm(input.scalar_type());
  const bool need_grad_pre = need_dx || need_dw;
  // grad_pre in the GEMMs' dtype: the storage dtype, or float32 (unrounded) when the GEMMs are.
  const auto gemm_dtype = native ? input.scalar_type() : at::kFloat;
  at::Tensor grad_pre;
  if (need_grad_pre) {
    if (scratch == Scratch::kGradOut && grad_out.scalar_type() == gemm_dtype) {
      check_not_read_after(grad_out, "grad_out", {{input, "input"}, {weight, "weight"}});
      grad_pre = grad_out;
    } else if (scratch == Scratch::kPre && pre_activation.scalar_type() == gemm_dtype) {
      check_not_read_after(pre_activation, "pre_activation", {{input, "input"}, {weight, "weight"}});
      grad_pre = pre_activation;
    } else {
      grad_pre = at::empty({rows, out_features}, input.options().dtype(gemm_dtype));
    }
  }
  if (torch_gelu(input.scalar_type())) {
    // torch's activation gradient (see the header), the bias gradient its column sum.
    at::Tensor g = need_grad_pre ? grad_pre : at::empty({rows, out_features}, input.options());
    torch_activation_backward_out(g, grad_out, pre_activation, approximate);
    if (need_db) at::sum_out(db, g, 0);
  } else {
    // The GEMMs run in float32 here (float32 inputs, or 16-bit ones widened): so does grad_pre.
    const int64_t nchunks = num_row_chunks(rows, out_features);
    const at::Tensor db_part = column_partials(need_db, nchunks, out_features, input);
    AT_DISPATCH_V2(input.scalar_type(), "linear_gelu_bwd_cpu", AT_WRAP([&] {
      double* dbp = need_db ? db_part.mutable_data_ptr<double>() : nullptr;
      activation_bwd_chunks(act, grad_out.const_data_ptr<scalar_t>(), 0, pre_activation.const_data_ptr<scalar_t>(),
                            rows, out_features, nchunks, 0, nchunks, data_or_null<float>(grad_pre), dbp);
      if (need_db) {
        using Sum = std::pair<const double*, scalar_t*>;
        sum_partials(std::array<Sum, 1>{Sum{dbp, db.mutable_data_ptr<scalar_t>()}}, nchunks, out_features);
      }
    }), at::kFloat, at::kHalf, at::kBFloat16);
  }

  at::Tensor dx = make_dx();
  at::Tensor dw = make_dw();
  if (gemm_dtype == input.scalar_type()) {
    if (need_dx) at::mm_out(dx, grad_pre, weight);
    if (need_dw) at::mm_out(dw, grad_pre.t(), input);
  } else {
    if (need_dx) dx.copy_(at::mm(grad_pre, weight.to(at::kFloat)));
    if (need_dw) dw.copy_(at::mm(grad_pre.t(), input.to(at::kFloat)));
  }
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                                   const at::Tensor& weight,
                                                                   const at::Tensor& pre_activation,
                                                                   c10::string_view approximate,
                                                                   std::array<bool, 3> output_mask) {
  return linear_gelu_bwd_impl(grad_out, input, weight, pre_activation, approximate, output_mask, Scratch::kNone);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_scratch_cpu(at::Tensor& grad_out, const at::Tensor& input,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& pre_activation,
                                                                           c10::string_view approximate,
                                                                           std::array<bool, 3> output_mask) {
  auto grads = linear_gelu_bwd_impl(grad_out, input, weight, pre_activation, approximate, output_mask,
                                    Scratch::kGradOut);
  mark_written(grad_out);
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_consuming_cpu(const at::Tensor& grad_out,
                                                                             const at::Tensor& input,
                                                                             const at::Tensor& weight,
                                                                             at::Tensor& pre_activation,
                                                                             c10::string_view approximate,
                                                                             std::array<bool, 3> output_mask) {
  auto grads = linear_gelu_bwd_impl(grad_out, input, weight, pre_activation, approximate, output_mask, Scratch::kPre);
  mark_written(pre_activation);
  return grads;
}

}  // namespace

at::Tensor ffn_linear_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (native_gemm(input.scalar_type())) return at::linear(input, weight, bias);
  return linear_float32(input, weight, bias).to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_hidden_bwd_cpu(
    at::Tensor grad_out, const at::Tensor& input, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& pre_activation, c10::string_view approximate, std::array<bool, 4> output_mask,
    bool consume_pre) {
  const Activation act = check_approximate(approximate);
  const auto [need_dx, need_dw1, need_db1, need_dw2] = output_mask;
  // grad_out and w2 are checked by the caller (csrc/ffn.cpp, before its dropout reads grad_out).
  const auto [rows, in_features] = check_rows_input(input, "input");
  const int64_t hidden = check_weight(w1, "w1", input, in_features);
  TORCH_CHECK(pre_activation.dim() == 2 && pre_activation.size(0) == rows && pre_activation.size(1) == hidden,
              "pre_activation must have shape [", rows, ", ", hidden, "], got ", pre_activation.sizes());
  TORCH_CHECK(pre_activation.scalar_type() == input.scalar_type() && pre_activation.device() == input.device(),
              "pre_activation must have the input's dtype and device, got ", pre_activation.scalar_type(), " on ",
              pre_activation.device());
  TORCH_CHECK(pre_activation.is_contiguous(), "pre_activation must be contiguous");
  const auto dtype = input.scalar_type();
  const auto gemm_dtype = native_gemm(dtype) ? dtype : at::kFloat;
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const auto widen = [&](const at::Tensor& t) { return t.scalar_type() == gemm_dtype ? t : t.to(gemm_dtype); };
  const auto narrow = [&](const at::Tensor& t) { return t.scalar_type() == dtype ? t : t.to(dtype); };
  if (rows == 0 || hidden == 0) {
    // Empty sums: every gradient is zero.
    // Contiguous, as the GEMMs' results are (and the fake kernels say), whatever the weights' strides.
    const auto zeros = [&](const at::Tensor& like) { return at::zeros(like.sizes(), input.options()); };
    return {need_dx ? zeros(input) : empty(), need_dw1 ? zeros(w1) : empty(),
            need_db1 ? at::zeros({hidden}, input.options()) : empty(), need_dw2 ? zeros(w2) : empty()};
  }
  const bool need_grad_pre = need_dx || need_dw1;
  const bool need_hidden_grad = need_grad_pre || need_db1;
  if (!need_hidden_grad && !need_dw2) return {empty(), empty(), empty(), empty()};

  at::Tensor go = widen(grad_out);
  const at::Tensor w2g = need_hidden_grad ? widen(w2) : at::Tensor();
  at::Tensor grad_pre;
  if (need_grad_pre) {
    const bool over_pre = consume_pre && pre_activation.scalar_type() == gemm_dtype;
    if (over_pre) check_not_read_after(pre_activation, "pre_activation", {{input, "input"}, {w1, "w1"}, {w2, "w2"}});
    grad_pre = over_pre ? pre_activation : at::empty({rows, hidden}, input.options().dtype(gemm_dtype));
  }
  at::Tensor dw2 = need_dw2 ? at::empty({w2.size(0), hidden}, input.options().dtype(gemm_dtype)) : at::Tensor();
  at::Tensor db1 = need_db1 ? at::empty({hidden}, input.options()) : empty();
  const int64_t nchunks = num_row_chunks(rows, hidden);
  const bool by_torch = torch_gelu(dtype);  // the pass is torch's activation gradient (see the header)
  const bool db_by_pass = need_db1 && !by_torch;  // else torch's column sum, or none
  const at::Tensor db_part = column_partials(db_by_pass, nchunks, hidden, input);
  // Slabs of whole chunks (the bias gradient's partial sums keep their chunks, hence their bits);
  // GEMMs in a 16-bit dtype take the whole batch at once, so that dW2 is not summed in it.
  const int64_t slab_min_rows =
      gemm_dtype == at::kFloat ? std::max<int64_t>(kSlabMinRows, kSlabBytes / (hidden * 4)) : rows;

  AT_DISPATCH_V2(dtype, "ffn_hidden_bwd_cpu", AT_WRAP([&] {
    const scalar_t* prep = pre_activation.const_data_ptr<scalar_t>();
    double* dbp = db_by_pass ? db_part.mutable_data_ptr<double>() : nullptr;
    for (int64_t c0 = 0, c1 = 0; c0 < nchunks; c0 = c1) {
      const int64_t r0 = chunk_rows(c0, nchunks, rows).first;
      int64_t r1 = r0;
      while (c1 < nchunks && r1 - r0 < slab_min_rows) r1 = chunk_rows(c1++, nchunks, rows).second;
      const at::Tensor go_slab = go.slice(0, r0, r1);
      if (need_dw2) {
        // act(pre) as the forward's output had it (rounded to the storage dtype), read before the
        // pass below may write grad_pre over these rows of pre.
        const at::Tensor h = widen(torch_activation(pre_activation.slice(0, r0, r1), approximate, false));
        if (c0 == 0) {
          at::mm_out(dw2, go_slab.t(), h);
        } else {
          dw2.addmm_(go_slab.t(), h);
        }
      }
      if (!need_hidden_grad) continue;
      // Rows [r0, r1) of the hidden gradient: float32 (unrounded) unless the GEMM is a native 16-bit one.
      const at::Tensor d_hidden = at::mm(go_slab, w2g);
      if (by_torch) {
        // One slab (the whole batch: 16-bit GEMMs); the hidden gradient's buffer takes grad_pre where
        // it has none of its own.
        at::Tensor g = need_grad_pre ? grad_pre.slice(0, r0, r1) : d_hidden;
        torch_activation_backward_out(g, d_hidden, pre_activation.slice(0, r0, r1), approximate);
        if (need_db1) at::sum_out(db1, g, 0);
      } else {
        activation_bwd_chunks(act, d_hidden.const_data_ptr<float>(), r0, prep, rows, hidden, nchunks, c0, c1,
                              data_or_null<float>(grad_pre), dbp);
      }
    }
    if (db_by_pass) {
      using Sum = std::pair<const double*, scalar_t*>;
      sum_partials(std::array<Sum, 1>{Sum{dbp, db1.mutable_data_ptr<scalar_t>()}}, nchunks, hidden);
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  // Read no more: where the caller handed over its only reference, this frees them before the GEMMs.
  go.reset();
  grad_out.reset();

  at::Tensor dx = need_dx ? narrow(at::mm(grad_pre, widen(w1))) : empty();
  at::Tensor dw1 = need_dw1 ? narrow(at::mm(grad_pre.t(), widen(input))) : empty();
  return {dx, dw1, db1, need_dw2 ? narrow(dw2) : empty()};
}

void ffn_dropout_cpu(const at::Tensor& src, const at::Tensor& dst, uint64_t seed, double dropout_p) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && dst.is_contiguous() && src.sizes() == dst.sizes() &&
                        src.scalar_type() == dst.scalar_type());
  const float p = static_cast<float>(dropout_p);
  const fVec pv(p), kpv(philox::keep_divisor(p));
  const int64_t n = src.numel();
  const int64_t blocks = (n + kDropBlock - 1) / kDropBlock;
  AT_DISPATCH_V2(src.scalar_type(), "ffn_dropout_cpu", AT_WRAP([&] {
    const scalar_t* from = src.const_data_ptr<scalar_t>();
    scalar_t* to = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElems / kDropBlock), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t j = b * kDropBlock;
        fVec h[kDropParts];
        load_block(from + j, n - j, h);
        dropout_block(seed, static_cast<uint64_t>(j), pv, kpv, h);
        store_block(to + j, n - j, h);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("linear_gelu_fwd", &fused_attn::linear_gelu_fwd_cpu);
  m.impl("linear_gelu_inference", &fused_attn::linear_gelu_inference_cpu);
  m.impl("linear_gelu_bwd", &fused_attn::linear_gelu_bwd_cpu);
  m.impl("linear_gelu_bwd_scratch", &fused_attn::linear_gelu_bwd_scratch_cpu);
  m.impl("linear_gelu_bwd_consuming", &fused_attn::linear_gelu_bwd_consuming_cpu);
}
