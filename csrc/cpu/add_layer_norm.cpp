// CPU kernels of fused_attn::add_layer_norm_fwd / add_layer_norm_bwd (schemas in csrc/ops.cpp):
// prenorm = residual + dropout(input + input_bias), output = layer_norm(prenorm) * weight + bias.
//
// Rows are independent, so both ops split the rows across threads with at::parallel_for, and
// each row is worked on while it sits in L1/L2 (see csrc/cpu/layer_norm.cpp, whose design this
// follows; the shared row helpers are in fused_attn/cpu_rows.h).
//  * Forward: the pass that loads input, input_bias and residual forms the pre-norm sum in
//    float32 (dropout applied to input + input_bias), rounds it to the storage dtype, stores it
//    and sums the rounded values -- so the forward normalises exactly what the backward will
//    read, as the Triton kernel does. Two more passes over the cached pre-norm row give the
//    variance from deviations (two-pass, accurate when |mean| >> std) and the normalised output.
//    The inference form (add_layer_norm_inference) forms the sum in the output's row instead and
//    normalises it in place: no pre-norm tensor;
//  * Backward: d_pre = LayerNorm backward of grad_out (+ grad_prenorm), which is the residual's
//    gradient; the input's gradient is d_pre through the same dropout keep-mask, regenerated from
//    the seed; the input bias's gradient is the column sum of that. A first pass per row (loads
//    only) gives the row constants; the second writes the gradients and adds the row's share
//    of grad_weight = sum(dy * xhat), grad_bias = sum(dy) and grad_input_bias to per-chunk
//    float64 column sums (cpu_rows::ColumnSums), added in chunk order afterwards. Chunks are cut
//    by shape alone (cpu_rows::num_row_chunks), so the sums do not depend on the thread count.
// Dropout is the shared Philox stream (fused_attn/philox.h) at element row * hidden + col,
// drawn a batch of counters at a time (philox::uniforms); an element is kept when its uniform is >= dropout_p (in float)
// and kept values are divided by 1 - dropout_p (in float: philox::keep_divisor), exactly as the
// Triton kernels do, so every backend drops the same elements for the same seed. All arithmetic is
// float32 on at::vec::Vectorized<float>, fp16/bf16 widened on load and rounded once on store.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "fused_attn/checks.h"
#include "fused_attn/cpu_rows.h"

namespace fused_attn {
namespace {

using namespace cpu_rows;

// Every pass of these kernels visits a row in blocks of Parts<kDropout> float vectors, whatever the
// dtype: with dropout, dropout blocks (kDropBlock elements, so that the draw lines up with the
// Philox counter groups), else two float vectors (one fp16/bf16 vector), which keep fewer values
// in registers (64-element blocks made the float32 forward without dropout about 10% slower at
// 4096 x 768 on AVX2; 32-element blocks, one Philox chain each, made the forward and backward
// with dropout 1.35x and 1.2x slower).
template <bool kDropout>
constexpr int Parts = kDropout ? kDropParts : 2;

// The dropout parameters of one call: seed, p, and the divisor 1 - p, both rounded to float.
struct Dropout {
  uint64_t seed = 0;
  float p = 0.f;
  float keep_prob = 1.f;
};

template <typename scalar_t, bool kDropout>
void add_layer_norm_fwd_rows(const scalar_t* x, const scalar_t* res, const float* xb, const float* w,
                             const float* b, int64_t hidden, double eps, const Dropout& drop, int64_t begin,
                             int64_t end, scalar_t* out, scalar_t* pre, float* mean, float* rstd) {
  constexpr int P = Parts<kDropout>;
  constexpr int64_t B = P * kLanes;
  constexpr int C = kChainsFor<P>;
  const double inv_n = 1.0 / static_cast<double>(hidden);
  const fVec pv(drop.p), kpv(drop.keep_prob);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t row = r * hidden;

    // Pass 1: the pre-norm sum, stored rounded to scalar_t, and the sum of the rounded values.
    RowSum<C, P> sum;
    for_each_block<B, C>(
        hidden,
        [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
          fVec h[P], rv[P];
          load_block(x + row + j, len, h);  // zero past the row, as is everything added to it
          if (xb != nullptr) {
            fVec bv[P];
            load_block(xb + j, len, bv);
            for (int k = 0; k < P; ++k) h[k] += bv[k];
          }
          if constexpr (kDropout) dropout_block(drop.seed, static_cast<uint64_t>(row + j), pv, kpv, h);
          load_block(res + row + j, len, rv);
          for (int k = 0; k < P; ++k) h[k] += rv[k];
          store_block(pre + row + j, len, h);
          round_block<scalar_t>(h);
          for (int k = 0; k < P; ++k) sum.acc[c][k] += h[k];
        },
        [&] { sum.end_segment(); });
    // Passes 2 and 3 on the cached pre-norm row: the two-pass variance and the output.
    const RowStats stats =
        normalize_row<P, B, C>(pre + row, hidden, static_cast<float>(sum.total * inv_n), inv_n, eps, w, b, out + row);
    mean[r] = stats.mean;
    rstd[r] = stats.rstd;
  }
}

// Where the backward writes: full-size gradients (null when not wanted) and this chunk's
// float64 column sums (cpu_rows::ColumnSums; null when not wanted).
template <typename scalar_t>
struct BwdOut {
  scalar_t* d_input = nullptr;
  scalar_t* d_residual = nullptr;
  double* dw_part = nullptr;
  double* db_part = nullptr;
  double* dib_part = nullptr;
};

// Rows [begin, end) of the backward; x is the pre-norm sum (what was normalised), dpre_in the
// gradient reaching it directly (null when none).
template <typename scalar_t, bool kDropout>
void add_layer_norm_bwd_rows(const scalar_t* dy, const scalar_t* dpre_in, const scalar_t* x, const float* mean,
                             const float* rstd, const float* w, int64_t hidden, const Dropout& drop, int64_t begin,
                             int64_t end, const BwdOut<scalar_t>& o) {
  constexpr int P = Parts<kDropout>;
  constexpr int64_t B = P * kLanes;
  const bool need_dinput = o.d_input != nullptr || o.dib_part != nullptr;
  const bool need_dpre = need_dinput || o.d_residual != nullptr;
  const fVec pv(drop.p), kpv(drop.keep_prob);
  // Per row, a first pass (loads only) gives the LayerNorm row constants; the second, on the
  // cached row, writes the gradients and adds the row's share of the sums
  // (cpu_rows::backward_rows: the order of rows and blocks).
  backward_rows<scalar_t, 3, B>(
      hidden, begin, end, {o.dw_part, o.db_part, o.dib_part},
      [&](int64_t r) C10_ALWAYS_INLINE_ATTRIBUTE {
        return layer_norm_row(dy, x, mean, rstd, w, hidden, r, need_dpre);
      },
      [&](int64_t r, int64_t j, int64_t len, LayerNormRow row, auto& sums) C10_ALWAYS_INLINE_ATTRIBUTE {
        const int64_t offset = r * hidden + j;
        fVec d[P];
        layer_norm_grad_block(dy, x, w, offset, j, len, row, sums, need_dpre, d);
        if (!need_dpre) return;
        if (dpre_in != nullptr) {
          fVec extra[P];
          load_block(dpre_in + offset, len, extra);
          for (int k = 0; k < P; ++k) d[k] += extra[k];
        }
        if (o.d_residual != nullptr) store_block(o.d_residual + offset, len, d);
        if (need_dinput) {
          if constexpr (kDropout) dropout_block(drop.seed, static_cast<uint64_t>(offset), pv, kpv, d);
          if (o.d_input != nullptr) store_block(o.d_input + offset, len, d);
          // Lanes past the row hold garbage here; they are not stored, and land in the
          // partials' padding.
          if (sums.wanted(2)) sums.add(2, d);
        }
      });
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
}

// dropout_p in [0, 1), and with it a seed: a CPU int64 scalar tensor. Returns the parameters.
Dropout check_dropout(double dropout_p, const std::optional<at::Tensor>& seed, const at::Tensor& like) {
  check_dropout_p(dropout_p);
  Dropout drop;
  if (dropout_p == 0.0) return drop;
  drop.seed = dropout_seed(seed, like);
  drop.p = static_cast<float>(dropout_p);
  drop.keep_prob = philox::keep_divisor(drop.p);
  return drop;
}

template <typename Fn>
void dispatch_dropout(const Dropout& drop, const Fn& fn) {
  if (drop.p > 0.f) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// The forward, with the pre-norm sum (keep_pre: what the backward reads) or without it (inference:
// the second tensor is undefined, and the sum is formed in the output's rows, which are then
// normalised in place: one [rows, hidden] tensor instead of two, the same output bits).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_impl(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed, bool keep_pre) {
  const auto shape = check_rows_input(input, "input");
  const int64_t rows = shape.first, hidden = shape.second;
  check_same_as(residual, "residual", input, "input");
  const at::ScalarType param_dtype = affine_dtype(weight, input);
  check_affine_param(weight, "weight", input, hidden, param_dtype);
  check_affine_param(bias, "bias", input, hidden, param_dtype);
  check_affine_param(input_bias, "input_bias", input, hidden);
  check_eps(eps);
  const Dropout drop = check_dropout(dropout_p, seed, input);

  at::Tensor out = at::empty({rows, hidden}, input.options());
  at::Tensor prenorm = keep_pre ? at::empty({rows, hidden}, input.options()) : out;
  const at::Tensor kept = keep_pre ? prenorm : at::Tensor();
  if (rows == 0 || hidden == 0) {
    // Nothing to normalise: the statistics of an empty row are defined as zero.
    const auto stats = input.options().dtype(at::kFloat);
    return {out, kept, at::zeros({rows}, stats), at::zeros({rows}, stats)};
  }
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  const at::Tensor w = affine_as_float(weight, input, hidden, 1.f);
  const at::Tensor b = affine_as_float(bias, input, hidden, 0.f);
  const bool has_input_bias = input_bias.has_value() && input_bias->defined();
  const at::Tensor xb = has_input_bias ? input_bias->to(at::kFloat) : at::Tensor();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (drop.p > 0.f ? 4 : 1) / hidden);

  AT_DISPATCH_V2(input.scalar_type(), "add_layer_norm_fwd_cpu", AT_WRAP([&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.const_data_ptr<scalar_t>();
    const float* xbp = has_input_bias ? xb.const_data_ptr<float>() : nullptr;
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* pp = prenorm.mutable_data_ptr<scalar_t>();
    float* mp = mean.mutable_data_ptr<float>();
    float* sp = rstd.mutable_data_ptr<float>();
    dispatch_dropout(drop, [&](auto dropout_tag) {
      constexpr bool kDropout = decltype(dropout_tag)::value;
      at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        add_layer_norm_fwd_rows<scalar_t, kDropout>(xp, rp, xbp, wp, bp, hidden, eps, drop, begin, end, op, pp,
                                                    mp, sp);
      });
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out, kept, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cpu(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias, double eps,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  return add_layer_norm_fwd_impl(input, residual, weight, bias, input_bias, eps, dropout_p, seed, /*keep_pre=*/true);
}

at::Tensor add_layer_norm_inference_cpu(const at::Tensor& input, const at::Tensor& residual,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& input_bias, double eps, double dropout_p,
                                        const std::optional<at::Tensor>& seed) {
  return std::get<0>(
      add_layer_norm_fwd_impl(input, residual, weight, bias, input_bias, eps, dropout_p, seed, /*keep_pre=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_prenorm, const at::Tensor& prenorm,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  const auto shape = check_rows_input(prenorm, "prenorm");
  const int64_t rows = shape.first, hidden = shape.second;
  check_same_as(grad_out, "grad_out", prenorm, "prenorm");
  const bool has_grad_prenorm = grad_prenorm.has_value() && grad_prenorm->defined();
  if (has_grad_prenorm) check_same_as(*grad_prenorm, "grad_prenorm", prenorm, "prenorm");
  check_row_stats(mean, "mean", prenorm, rows);
  check_row_stats(rstd, "rstd", prenorm, rows);
  const at::ScalarType param_dtype = affine_dtype(weight, prenorm);
  check_affine_param(weight, "weight", prenorm, hidden, param_dtype);
  const Dropout drop = check_dropout(dropout_p, seed, prenorm);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool need_dinput = output_mask[0], need_dres = output_mask[1], need_dw = output_mask[2],
             need_db = output_mask[3], need_dib = output_mask[4];
  TORCH_CHECK(has_weight || !need_dw,
              "output_mask[2] asks for grad_weight, which requires a weight, but weight is None");

  // Unselected gradients are distinct [0] tensors: outputs of an op must not alias each other.
  const auto options = prenorm.options();
  at::Tensor dinput = need_dinput ? at::empty({rows, hidden}, options) : at::empty({0}, options);
  at::Tensor dres = need_dres ? at::empty({rows, hidden}, options) : at::empty({0}, options);
  at::Tensor dw = need_dw ? at::empty({hidden}, weight->options()) : at::empty({0}, options);
  at::Tensor db = need_db ? at::empty({hidden}, options.dtype(param_dtype)) : at::empty({0}, options);
  at::Tensor dib = need_dib ? at::empty({hidden}, options) : at::empty({0}, options);
  if (rows == 0 || hidden == 0) {
    // Nothing was normalised; the parameter gradients are empty sums.
    dw.zero_();
    db.zero_();
    dib.zero_();
    return {dinput, dres, dw, db, dib};
  }
  if (!(need_dinput || need_dres || need_dw || need_db || need_dib)) return {dinput, dres, dw, db, dib};

  const int64_t nchunks = num_row_chunks(rows, hidden);
  const at::Tensor dw_part = column_partials(need_dw, nchunks, hidden, prenorm);
  const at::Tensor db_part = column_partials(need_db, nchunks, hidden, prenorm);
  const at::Tensor dib_part = column_partials(need_dib, nchunks, hidden, prenorm);
  const at::Tensor w = affine_as_float(weight, prenorm, hidden, 1.f);

  AT_DISPATCH_V2(prenorm.scalar_type(), "add_layer_norm_bwd_cpu", AT_WRAP([&] {
    const scalar_t* dyp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* dpp = has_grad_prenorm ? grad_prenorm->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = prenorm.const_data_ptr<scalar_t>();
    const float* mp = mean.const_data_ptr<float>();
    const float* sp = rstd.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    double* dwp = need_dw ? dw_part.mutable_data_ptr<double>() : nullptr;
    double* dbp = need_db ? db_part.mutable_data_ptr<double>() : nullptr;
    double* dibp = need_dib ? dib_part.mutable_data_ptr<double>() : nullptr;
    scalar_t* dinp = need_dinput ? dinput.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dresp = need_dres ? dres.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_dropout(drop, [&](auto dropout_tag) {
      constexpr bool kDropout = decltype(dropout_tag)::value;
      at::parallel_for(0, nchunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t c = chunk_begin; c < chunk_end; ++c) {
          const auto [begin, end] = chunk_rows(c, nchunks, rows);
          BwdOut<scalar_t> o;
          o.d_input = dinp;
          o.d_residual = dresp;
          o.dw_part = chunk_partials(dwp, c, hidden);
          o.db_part = chunk_partials(dbp, c, hidden);
          o.dib_part = chunk_partials(dibp, c, hidden);
          add_layer_norm_bwd_rows<scalar_t, kDropout>(dyp, dpp, xp, mp, sp, wp, hidden, drop, begin, end, o);
        }
      });
    });
    using Sum = std::pair<const double*, scalar_t*>;
    sum_partials(std::array<Sum, 1>{Sum{dibp, need_dib ? dib.mutable_data_ptr<scalar_t>() : nullptr}}, nchunks, hidden);
    sum_param_partials<scalar_t>(param_dtype, dwp, dw, dbp, db, nchunks, hidden);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {dinput, dres, dw, db, dib};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("add_layer_norm_fwd", &fused_attn::add_layer_norm_fwd_cpu);
  m.impl("add_layer_norm_inference", &fused_attn::add_layer_norm_inference_cpu);
  m.impl("add_layer_norm_bwd", &fused_attn::add_layer_norm_bwd_cpu);
}
