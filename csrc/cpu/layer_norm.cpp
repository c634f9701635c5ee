// CPU kernels of fused_attn::layer_norm_fwd / layer_norm_bwd (schemas in csrc/ops.cpp).
//
// Rows are independent, so both ops split the rows across threads with at::parallel_for. One row
// (a few KiB to a few tens of KiB) stays in L1/L2 while it is worked on, so revisiting it is
// cheap: the forward reads it three times (mean; deviations, for a two-pass variance; normalise)
// and the backward twice (row sums; grad_input), paying in cache hits, not DRAM traffic, for
// accuracy. All arithmetic is float32 on at::vec::Vectorized<float>, fp16/bf16 widened on load
// and rounded once on store; row sums are cascaded through a double every kSegment elements.
// grad_weight/grad_bias are accumulated in the backward's grad_input pass: the rows are cut into
// chunks fixed by the shape alone (cpu_rows::num_row_chunks), each summing into its own float64
// [hidden] buffers (cpu_rows::ColumnSums), and the buffers are added in chunk order, so there is
// no race and the bits depend neither on scheduling nor on the thread count.
#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "fused_attn/checks.h"
#include "fused_attn/cpu_rows.h"

namespace fused_attn {
namespace {

// Vector loads/stores, block visitors, cascaded row sums and compensated column sums shared with
// the other row-wise CPU kernels.
using namespace cpu_rows;

template <typename scalar_t>
void layer_norm_fwd_rows(const scalar_t* x, const float* w, const float* b, int64_t hidden, double eps,
                         int64_t begin, int64_t end, scalar_t* out, float* mean, float* rstd) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  constexpr int C = kChains / P;
  const double inv_n = 1.0 / static_cast<double>(hidden);  // hidden > 0: the caller returns early
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * hidden;

    RowSum<C, P> sum;
    for_each_block<B, C>(
        hidden,
        [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
          fVec xv[P];
          load_block(xr + j, len, xv);  // zero-filled past the row: adds nothing
          for (int k = 0; k < P; ++k) sum.acc[c][k] += xv[k];
        },
        [&] { sum.end_segment(); });
    const RowStats stats =
        normalize_row<P, B, C>(xr, hidden, static_cast<float>(sum.total * inv_n), inv_n, eps, w, b, out + r * hidden);
    mean[r] = stats.mean;
    rstd[r] = stats.rstd;
  }
}

// Rows [begin, end) of the backward. dx is null when grad_input is not wanted; dw_part/db_part
// (this chunk's float64 column sums, rows of cpu_rows::column_partials; null when not wanted)
// are accumulated into. Per row, a first pass (loads only, bringing the row into cache) gives
// the row constants when grad_input is wanted; the second, on the cached row, writes grad_input
// and adds the row's share of grad_weight/grad_bias, so the parameter gradients need no pass
// over the input of their own (cpu_rows::backward_rows: the order of rows and blocks).
template <typename scalar_t>
void layer_norm_bwd_rows(const scalar_t* dy, const scalar_t* x, const float* mean, const float* rstd,
                         const float* w, int64_t hidden, int64_t begin, int64_t end, scalar_t* dx,
                         double* dw_part, double* db_part) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  backward_rows<scalar_t, 2, B>(
      hidden, begin, end, {dw_part, db_part},
      [&](int64_t r) C10_ALWAYS_INLINE_ATTRIBUTE {
        return layer_norm_row(dy, x, mean, rstd, w, hidden, r, dx != nullptr);
      },
      [&](int64_t r, int64_t j, int64_t len, LayerNormRow row, auto& sums) C10_ALWAYS_INLINE_ATTRIBUTE {
        const int64_t offset = r * hidden + j;
        fVec dxv[P];
        layer_norm_grad_block(dy, x, w, offset, j, len, row, sums, dx != nullptr, dxv);
        if (dx != nullptr) store_block(dx + offset, len, dxv);  // lanes past the row are not stored
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& input,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  const auto shape = check_rows_input(input, "input");
  const int64_t rows = shape.first, hidden = shape.second;
  const at::ScalarType param_dtype = affine_dtype(weight, input);
  check_affine_param(weight, "weight", input, hidden, param_dtype);
  check_affine_param(bias, "bias", input, hidden, param_dtype);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);

  at::Tensor out = at::empty({rows, hidden}, input.options());
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  if (rows == 0 || hidden == 0) {
    // Nothing to normalise: the statistics of an empty row are defined as zero (every backend).
    mean.zero_();
    rstd.zero_();
    return {out, mean, rstd};
  }
  const at::Tensor w = affine_as_float(weight, input, hidden, 1.f);
  const at::Tensor b = affine_as_float(bias, input, hidden, 0.f);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hidden, 1));

  AT_DISPATCH_V2(input.scalar_type(), "layer_norm_fwd_cpu", AT_WRAP([&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const float* wp = w.const_data_ptr<float>();
    const float* bp = b.const_data_ptr<float>();
    float* mp = mean.mutable_data_ptr<float>();
    float* rp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      layer_norm_fwd_rows<scalar_t>(x, wp, bp, hidden, eps, begin, end, o, mp, rp);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(const at::Tensor& grad_out,
                                                                  const at::Tensor& input,
                                                                  const at::Tensor& mean,
                                                                  const at::Tensor& rstd,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  std::array<bool, 3> output_mask) {
  const auto shape = check_rows_input(input, "input");
  const int64_t rows = shape.first, hidden = shape.second;
  check_same_as(grad_out, "grad_out", input, "input");
  check_row_stats(mean, "mean", input, rows);
  check_row_stats(rstd, "rstd", input, rows);
  const at::ScalarType param_dtype = affine_dtype(weight, input);
  check_affine_param(weight, "weight", input, hidden, param_dtype);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  TORCH_CHECK(has_weight || !need_dw,
              "output_mask[1] asks for grad_weight, which requires a weight, but weight is None");

  // Unselected gradients are distinct [0] tensors: outputs of an op must not alias each other.
  at::Tensor dx = need_dx ? at::empty({rows, hidden}, input.options()) : at::empty({0}, input.options());
  at::Tensor dw = need_dw ? at::empty({hidden}, weight->options()) : at::empty({0}, input.options());
  at::Tensor db = need_db ? at::empty({hidden}, input.options().dtype(param_dtype)) : at::empty({0}, input.options());
  if (rows == 0 || hidden == 0) {
    // Nothing to normalise; the parameter gradients are empty sums.
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  if (!(need_dx || need_dw || need_db)) return {dx, dw, db};

  // A function of the shape alone (cpu_rows::num_row_chunks, as Add & Norm's), so the bits of
  // grad_weight/grad_bias do not depend on the thread count.
  const int64_t nchunks = num_row_chunks(rows, hidden);
  const at::Tensor dw_part = column_partials(need_dw, nchunks, hidden, input);
  const at::Tensor db_part = column_partials(need_db, nchunks, hidden, input);
  const at::Tensor w = affine_as_float(weight, input, hidden, 1.f);

  AT_DISPATCH_V2(input.scalar_type(), "layer_norm_bwd_cpu", AT_WRAP([&] {
    const scalar_t* dyp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const float* mp = mean.const_data_ptr<float>();
    const float* rp = rstd.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    scalar_t* dxp = need_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    double* dwp = need_dw ? dw_part.mutable_data_ptr<double>() : nullptr;
    double* dbp = need_db ? db_part.mutable_data_ptr<double>() : nullptr;
    at::parallel_for(0, nchunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t c = chunk_begin; c < chunk_end; ++c) {
        const auto [begin, end] = chunk_rows(c, nchunks, rows);
        layer_norm_bwd_rows<scalar_t>(dyp, xp, mp, rp, wp, hidden, begin, end, dxp,
                                      chunk_partials(dwp, c, hidden), chunk_partials(dbp, c, hidden));
      }
    });
    sum_param_partials<scalar_t>(param_dtype, dwp, dw, dbp, db, nchunks, hidden);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {dx, dw, db};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cpu);
}
