// The memory layout of the attention output, shared by the CPU and CUDA launchers (and mirrored,
// for the fake kernels and Triton, by fused_attn/kernels/layout.py: the two must agree exactly).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>

namespace fused_attn {

// An uninitialised [B, H, Lq, dv] tensor laid out in memory as `query` [B, H, Lq, D] is: its
// first three dims nested in the order of query's strides (largest outermost, ties in dim order),
// the last dim innermost, as torch's SDPA lays out its output for the layouts projections give
// (torch nests expanded, stride-0 dims elsewhere). A query viewed from [B, Lq, H, D] (heads split
// off a projection) gives an output whose transpose back to [B, Lq, H, dv] is contiguous, so
// merging the heads again (transpose + reshape) copies nothing.
inline at::Tensor empty_in_query_layout(const at::Tensor& query, int64_t dv) {
  std::array<int64_t, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return query.stride(a) > query.stride(b); });
  std::array<int64_t, 4> strides{0, 0, 0, 1};
  int64_t step = dv;
  for (int64_t i = 2; i >= 0; --i) {
    strides[order[i]] = step;
    step *= query.size(order[i]);
  }
  return at::empty_strided({query.size(0), query.size(1), query.size(2), dv}, strides, query.options());
}

}  // namespace fused_attn
