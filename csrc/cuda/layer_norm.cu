// CUDA kernels of fused_attn::layer_norm_fwd / layer_norm_bwd and add_layer_norm_fwd / add_layer_norm_bwd
// (schemas in csrc/ops.cpp).
//
// Row mapping. LayerNorm is memory bound, so the layout is chosen to keep every byte moved once
// from DRAM and the reductions cheap:
//   * hidden <= 1024: one warp per row, 4 rows (warps) per 128-thread block. The row is held in
//     registers (at most 1024 / 32 = 32 floats per lane), so mean, variance and the output come from a
//     single read, and the row sums are pure warp shuffles with no shared memory or barriers.
//   * hidden > 1024: one block per row (128..1024 threads, about 4 vectors per thread). The row is
//     re-read for each pass; a row of up to a few tens of KB stays in L1/L2 between passes, so DRAM
//     traffic is still one read. Row sums are warp shuffles plus one shared-memory exchange.
//   Both kernels loop over rows with a grid stride, so any row count fits the grid limits.
//
// Vector width. When the input, output, weight and bias pointers are 16-byte aligned and hidden is a
// multiple of 16 / sizeof(T) (4 floats, 8 halves), every row start is 16-byte aligned and each access
// is one 128-bit load/store (two for the float32 parameters of a 16-bit input). Otherwise (odd hidden,
// offset views) the same kernels run with width 1.
//
// Parameters. weight and bias (type P) are the input's dtype, or float32 with a float16/bfloat16
// input (norms kept in float32, checks.h's affine_dtype): read unrounded, their gradients written as
// float32.
//
// Statistics. Two-pass in fp32: mean first, then the mean of squared deviations from it, which does
// not suffer the cancellation of E[x^2] - E[x]^2, corrected by the deviations' sum (refined_stats:
// a constant row normalises to exactly the bias). The variance and rstd = 1 / sqrt(biased variance +
// eps) are formed in double from the float32 sums, once per row, as the cpu kernels do: correctly
// rounded, and free of --use_fast_math's flush to zero, which would turn a subnormal variance (a row
// whose deviations are below 1e-19) into 0 and, at eps = 0, rstd into inf (the squares and their
// sums are formed with cuda_utils::fma_rn / add_rn for the same reason).
//
// Backward. grad_input uses the same row mapping: with g = dy * w and xhat = (x - mean) * rstd,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). grad_weight = sum_rows dy * xhat and
// grad_bias = sum_rows dy are column sums, done in two stages: a kernel over (32-column tiles x row
// splits) in which each warp reads 32 consecutive columns of one row (coalesced) and 8 warps stride
// down the split's rows, reducing to float32 partials [splits, hidden]; then a kernel that adds the
// partials of each column in split order and casts to the output dtype.
//
// Add & Norm. add_layer_norm runs the same row kernels, instantiated with kAdd = true:
//   * forward: where the plain kernel loads a vector of x, the add variant loads input, residual and
//     input_bias, forms prenorm = residual + dropout(input + input_bias) in fp32, rounds it to the
//     storage type, stores it and keeps the rounded values, so the statistics describe exactly the
//     prenorm tensor that the backward reads. Warp rows keep it in registers; block rows re-read the
//     prenorm this same thread stored (each pass visits the thread's own columns) instead of
//     recomputing it, which would draw the dropout mask three times. The inference form
//     (add_layer_norm_inference: no gradient, no pre-norm sum wanted) passes no prenorm tensor: warp
//     rows store nothing but the output, block rows form the sum in the output row and normalise it
//     in place (the same thread reads and then overwrites its own columns), so the output has the
//     same bits and no [rows, hidden] tensor besides it is made.
//   * backward: the LayerNorm input gradient is formed from (grad_out, prenorm) as above; the store
//     adds grad_prenorm, writes grad_residual = d_prenorm and grad_input = d_prenorm * keep / (1 - p).
//     grad_weight / grad_bias are the plain column sums of (grad_out, prenorm); grad_input_bias is the
//     column sum of grad_input (a scratch buffer when grad_input itself was not requested), by the
//     same two-stage kernels.
//   Dropout uses the shared Philox stream (fused_attn/philox.h) with element e = row * hidden + col,
//   regenerated in the backward from the seed; nothing is stored.
//
// Determinism. No floating-point atomics anywhere: every sum is taken in an order fixed by the shapes
// and the vector width alone (thread counts and the number of splits depend on rows and hidden, never
// on the device or on timing), so repeated calls give bitwise identical results.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "fused_attn/checks.h"
#include "fused_attn/cuda_utils.cuh"
#include "fused_attn/philox.h"

namespace fused_attn {
namespace {

using cuda_utils::kWarpSize;

// Largest hidden handled by the warp-per-row kernels; it bounds their per-lane register arrays.
constexpr int kWarpMaxHidden = 1024;
constexpr int kWarpRowsPerBlock = 4;

constexpr int kBlockMinThreads = 128;
constexpr int kBlockMaxThreads = 1024;
// Several independent loads in flight per thread hide DRAM latency without a huge block.
constexpr int kBlockVectorsPerThread = 4;

// Parameter-gradient partial kernel: a block covers kParamCols columns with kParamRowStripes warps.
constexpr int kParamCols = kWarpSize;
constexpr int kParamRowStripes = 8;
// Enough blocks to fill every SM of current GPUs several times over; a constant (not the SM count)
// so that the split, and therefore the summation order, does not depend on the device.
constexpr int64_t kParamTargetBlocks = 1024;
// Keeps each thread summing at least 8 rows, so partials stay few and each thread has work to overlap.
constexpr int64_t kParamMinRowsPerSplit = 64;
constexpr int kFinalizeThreads = 256;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels accept any grid size; capping at the gridDim.x limit keeps huge row counts legal.
unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

int block_row_threads(int64_t hidden, int vec) {
  const int64_t threads = ceil_div(ceil_div(ceil_div(hidden, vec), kBlockVectorsPerThread), kWarpSize) * kWarpSize;
  return static_cast<int>(std::clamp<int64_t>(threads, kBlockMinThreads, kBlockMaxThreads));
}

// 1/hidden for the kernels, computed on the host: correctly rounded (so exact for hidden == 1 and other
// powers of two), where a device division under --use_fast_math is approximate and a correctly rounded
// device reciprocal (__frcp_rn) costs a slow-path call that made ptxas spill.
float reciprocal(int64_t hidden) { return 1.f / static_cast<float>(hidden); }

// g = dy * w, rounded on its own: __fmul_rn is never contracted into an FMA. dx subtracts mean(g) from
// the very g values that were averaged, so a row whose g are all equal gets exactly 0 wherever their
// float32 mean comes out exact (always for hidden == 1) rather than rstd times the rounding error of an
// unrounded product. (Elsewhere mean(g) may differ from g by its rounding: the CPU backend, whose row
// constants are double, gives 0 for every such row.)
__device__ __forceinline__ float scaled_grad(float dy, float w) { return __fmul_rn(dy, w); }

// Elements of P per access of the parameters in a VEC-wide row access: VEC, or as many as 16 bytes
// hold (float32 parameters of a 16-bit row: two 16-byte loads for its 8 elements), so that the
// parameters need no more than 16-byte alignment.
template <int VEC, typename P>
constexpr int param_piece() {
  return VEC < cuda_utils::vec16_width<P>() ? VEC : cuda_utils::vec16_width<P>();
}

// Loads VEC affine parameters at column c, or `fill` when the parameter is absent (identity).
template <int VEC, typename P>
__device__ __forceinline__ void load_param_or(const P* p, int64_t c, float fill, float (&out)[VEC]) {
  if (p != nullptr) {
    constexpr int kPiece = param_piece<VEC, P>();
#pragma unroll
    for (int i = 0; i < VEC; i += kPiece) {
      float piece[kPiece];
      cuda_utils::load_as_float<kPiece>(p + c + i, piece);
#pragma unroll
      for (int j = 0; j < kPiece; ++j) out[i + j] = piece[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  }
}

// ---------------------------------------------------------------------------------------------
// Add & Norm operands
// ---------------------------------------------------------------------------------------------

// Dropout of add_layer_norm: element e of the [rows, hidden] tensor is kept when uniform(seed, e) >= p
// (philox.h), and v becomes (v * keep) / keep_prob with keep 1 or 0 and keep_prob = 1 - p in float
// (philox::keep_divisor): the CPU and Triton kernels' arithmetic (cuda_utils::dropout_value: IEEE
// multiply and correctly rounded division, which --use_fast_math would otherwise approximate and flush
// to zero), and a multiply rather than a select, so that a dropped inf/NaN gives NaN, as torch's dropout
// (x * mask / (1 - p)) does. Inactive: v is left as it is.
struct DropoutArgs {
  cuda_utils::DropoutSeed seed;
  float p = 0.f;
  float keep_prob = 1.f;
  bool active = false;
};

// Applies the dropout to the elements [e, e + VEC) held in v (philox::keep_run: one Philox evaluation
// per four elements where e is a multiple of 4, as it is when hidden is).
template <int VEC>
__device__ __forceinline__ void apply_dropout(const DropoutArgs& d, int64_t e, float (&v)[VEC]) {
  if (!d.active) return;
  bool keep[VEC];
  philox::keep_run(d.seed.load(), static_cast<uint64_t>(e), d.p, keep);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = cuda_utils::dropout_value(v[j], keep[j], d.keep_prob);
}

// Extra operands of the forward kernels when kAdd (ignored otherwise). All [rows, hidden] row-major
// like x, input_bias [hidden] or null.
template <typename T>
struct AddFwdArgs {
  const T* residual = nullptr;
  const T* input_bias = nullptr;
  T* prenorm = nullptr;
  DropoutArgs dropout;
};

// Extra operands of the backward input kernels when kAdd. Null pointers: not given / not wanted.
template <typename T>
struct AddBwdArgs {
  const T* grad_prenorm = nullptr;
  T* grad_residual = nullptr;
  T* grad_input = nullptr;
  DropoutArgs dropout;
};

// prenorm = residual + dropout(x + input_bias) for the VEC elements at flat index e (column c): rounded
// to T, stored to dst + e (unless dst is null), and returned in `v` as the rounded values. The adds are
// cuda_utils::add_rn (no flush to zero under --use_fast_math), as is the backward's d + grad_prenorm.
template <int VEC, typename T>
__device__ __forceinline__ void add_prenorm(const T* x, const AddFwdArgs<T>& add, T* dst, int64_t e, int64_t c,
                                            float (&v)[VEC]) {
  float xv[VEC], rv[VEC], bv[VEC];
  cuda_utils::load_as_float<VEC>(x + e, xv);
  cuda_utils::load_as_float<VEC>(add.residual + e, rv);
  if (add.input_bias != nullptr) {  // not x + 0, which would turn an input of -0 into +0 (the cpu op keeps -0)
    load_param_or<VEC>(add.input_bias, c, 0.f, bv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) xv[j] = cuda_utils::add_rn(xv[j], bv[j]);
  }
  apply_dropout<VEC>(add.dropout, e, xv);
  cuda_utils::AlignedVector<T, VEC> pre;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    pre.val[j] = static_cast<T>(cuda_utils::add_rn(rv[j], xv[j]));
    v[j] = static_cast<float>(pre.val[j]);
  }
  if (dst != nullptr) *reinterpret_cast<cuda_utils::AlignedVector<T, VEC>*>(dst + e) = pre;
}

// Stores the backward of add_layer_norm for the VEC elements at flat index e, given d = the LayerNorm
// input gradient: d_prenorm = d + grad_prenorm -> grad_residual, d_prenorm * keep / (1 - p) -> grad_input.
template <int VEC, typename T>
__device__ __forceinline__ void add_bwd_store(const AddBwdArgs<T>& add, int64_t e, const float (&d)[VEC]) {
  float dp[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dp[j] = d[j];
  if (add.grad_prenorm != nullptr) {
    float gp[VEC];
    cuda_utils::load_as_float<VEC>(add.grad_prenorm + e, gp);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dp[j] = cuda_utils::add_rn(dp[j], gp[j]);
  }
  if (add.grad_residual != nullptr) cuda_utils::store_from_float<VEC>(add.grad_residual + e, dp);
  if (add.grad_input != nullptr) {
    apply_dropout<VEC>(add.dropout, e, dp);
    cuda_utils::store_from_float<VEC>(add.grad_input + e, dp);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

struct RowStats {
  float mean, rstd;
};

// A row's mean and rstd from its first mean (the sum over n, inv_hidden = 1 / n) and the sums of the
// deviations d = x - first_mean and of their squares: the corrected two-pass algorithm,
// var = (sum d^2 - (sum d)^2 / n) / n, which takes the rounding of first_mean out of the variance,
// and the mean refined to first_mean + sum d / n. Where the variance is tiny this matters: in a
// constant row every d is the first mean's rounding error, var is 0 and rstd 1 / sqrt(eps), which
// would scale that error up (to about 1 at BERT's eps of 1e-12); with the refined mean, x - mean
// is 0 and the row normalises to the bias, as torch's Welford statistics give. The variance is
// clamped at 0 against rounding, NaN kept (a row holding NaN or inf normalises to NaN).
__device__ __forceinline__ RowStats refined_stats(float first_mean, float sum_dev, float sum_sq, float inv_hidden,
                                                  float eps) {
  const double dev = sum_dev, inv_n = inv_hidden;
  double var = (static_cast<double>(sum_sq) - dev * (dev * inv_n)) * inv_n;
  // An overflowed sum of squares (|x| past ~1e19) is an infinite variance, not inf - inf: the row
  // normalises to the bias, as on the cpu backend (whose sums are double).
  var = var < 0.0 ? 0.0 : (isinf(sum_sq) ? static_cast<double>(sum_sq) : var);
  return {first_mean + sum_dev * inv_hidden, static_cast<float>(1.0 / sqrt(var + static_cast<double>(eps)))};
}

// kAdd: x is add_layer_norm's input and the normalised row is prenorm, formed by add_prenorm.
template <typename T, typename P, int VEC, bool kAdd>
__global__ void __launch_bounds__(kWarpSize * kWarpRowsPerBlock)
    layer_norm_fwd_warp_kernel(const T* __restrict__ x, const P* __restrict__ w, const P* __restrict__ b,
                               T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                               int hidden, float inv_hidden, float eps, AddFwdArgs<T> add) {
  static_assert(kWarpMaxHidden % (kWarpSize * VEC) == 0, "warp row tile must divide kWarpMaxHidden");
  constexpr int kChunks = kWarpMaxHidden / (kWarpSize * VEC);
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // `row` is uniform across the warp, so every lane takes the shuffles below together.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_stride) {
    const T* xr = x + row * hidden;
    // Chunk i of a lane covers columns [(i * 32 + lane) * VEC, +VEC): each chunk index reads one contiguous
    // 32 * VEC-element span across the warp. Chunks past `hidden` are zeroed although never used: left
    // undefined, ptxas spilled more in the half/bfloat16 instantiations (8-24 bytes remain at VEC 8).
    float v[kChunks][VEC];
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = (i * kWarpSize + lane) * VEC;
      if (c < hidden) {
        if constexpr (kAdd) {
          add_prenorm<VEC>(x, add, add.prenorm, row * hidden + c, c, v[i]);
        } else {
          cuda_utils::load_as_float<VEC>(xr + c, v[i]);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += v[i][j];
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
      }
    }
    const float first_mu = cuda_utils::warp_allreduce_sum(sum) * inv_hidden;

    float dev = 0.f, sq = 0.f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = (i * kWarpSize + lane) * VEC;
      if (c < hidden) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = v[i][j] - first_mu;
          dev += d;
          sq = cuda_utils::fma_rn(d, d, sq);
        }
      }
    }
    const RowStats stats = refined_stats(first_mu, cuda_utils::warp_allreduce_sum(dev),
                                         cuda_utils::warp_allreduce_sum(sq), inv_hidden, eps);
    const float mu = stats.mean, rs = stats.rstd;

    T* yr = y + row * hidden;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = (i * kWarpSize + lane) * VEC;
      if (c < hidden) {
        float wv[VEC], bv[VEC], out[VEC];
        load_param_or<VEC>(w, c, 1.f, wv);
        load_param_or<VEC>(b, c, 0.f, bv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = (v[i][j] - mu) * rs * wv[j] + bv[j];
        cuda_utils::store_from_float<VEC>(yr + c, out);
      }
    }
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

template <typename T, typename P, int VEC, bool kAdd>
__global__ void __launch_bounds__(kBlockMaxThreads)
    layer_norm_fwd_block_kernel(const T* __restrict__ x, const P* __restrict__ w, const P* __restrict__ b,
                                T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                                int64_t hidden, float inv_hidden, float eps, AddFwdArgs<T> add) {
  __shared__ float smem[2 * kWarpSize];  // block_allreduce_sum of up to two values
  const int64_t first_col = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t col_stride = static_cast<int64_t>(blockDim.x) * VEC;
  // add_layer_norm's sum goes to prenorm, or in the inference form (no prenorm) to the output row, which
  // the last pass below overwrites column by column after reading it.
  T* const sum_dst = kAdd ? (add.prenorm != nullptr ? add.prenorm : y) : nullptr;
  // `row` is uniform across the block, so all threads reach the barriers in block_allreduce_sum.
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    float sum[1] = {0.f};
    for (int64_t c = first_col; c < hidden; c += col_stride) {
      float xv[VEC];
      if constexpr (kAdd) {
        add_prenorm<VEC>(x, add, sum_dst, row * hidden + c, c, xv);
      } else {
        cuda_utils::load_as_float<VEC>(xr + c, xv);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum[0] += xv[j];
    }
    cuda_utils::block_allreduce_sum(sum, smem);
    const float first_mu = sum[0] * inv_hidden;
    // The passes below re-read the normalised row: x, or for add_layer_norm the sum this thread has
    // just stored (same columns; block_allreduce_sum's barrier also orders the accesses block-wide).
    const T* nr = xr;
    if constexpr (kAdd) nr = sum_dst + row * hidden;

    float sums[2] = {0.f, 0.f};  // deviations from first_mu, and their squares
    for (int64_t c = first_col; c < hidden; c += col_stride) {
      float xv[VEC];
      cuda_utils::load_as_float<VEC>(nr + c, xv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = xv[j] - first_mu;
        sums[0] += d;
        sums[1] = cuda_utils::fma_rn(d, d, sums[1]);
      }
    }
    cuda_utils::block_allreduce_sum(sums, smem);
    const RowStats stats = refined_stats(first_mu, sums[0], sums[1], inv_hidden, eps);
    const float mu = stats.mean, rs = stats.rstd;

    T* yr = y + row * hidden;
    for (int64_t c = first_col; c < hidden; c += col_stride) {
      float xv[VEC], wv[VEC], bv[VEC], out[VEC];
      cuda_utils::load_as_float<VEC>(nr + c, xv);
      load_param_or<VEC>(w, c, 1.f, wv);
      load_param_or<VEC>(b, c, 0.f, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (xv[j] - mu) * rs * wv[j] + bv[j];
      cuda_utils::store_from_float<VEC>(yr + c, out);
    }
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

template <typename T, typename P, int VEC, bool kAdd = false>
void launch_fwd(const T* x, const P* w, const P* b, T* y, float* mean, float* rstd, int64_t rows, int64_t hidden,
                float eps, cudaStream_t stream, const AddFwdArgs<T>& add = {}) {
  if (hidden <= kWarpMaxHidden) {
    const dim3 block(kWarpSize, kWarpRowsPerBlock);
    layer_norm_fwd_warp_kernel<T, P, VEC, kAdd><<<grid_size(ceil_div(rows, kWarpRowsPerBlock)), block, 0, stream>>>(
        x, w, b, y, mean, rstd, rows, static_cast<int>(hidden), reciprocal(hidden), eps, add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    layer_norm_fwd_block_kernel<T, P, VEC, kAdd><<<grid_size(rows), block_row_threads(hidden, VEC), 0, stream>>>(
        x, w, b, y, mean, rstd, rows, hidden, reciprocal(hidden), eps, add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_input
// ---------------------------------------------------------------------------------------------

// kAdd: x is prenorm and the gradient goes through add_bwd_store (dx unused, may be null).
template <typename T, typename P, int VEC, bool kAdd>
__global__ void __launch_bounds__(kWarpSize * kWarpRowsPerBlock)
    layer_norm_bwd_input_warp_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     const P* __restrict__ w, T* __restrict__ dx, int64_t rows, int hidden,
                                     float inv_hidden, AddBwdArgs<T> add) {
  static_assert(kWarpMaxHidden % (kWarpSize * VEC) == 0, "warp row tile must divide kWarpMaxHidden");
  constexpr int kChunks = kWarpMaxHidden / (kWarpSize * VEC);
  const int lane = static_cast<int>(threadIdx.x);
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_stride) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    const float mu = mean[row];
    const float rs = rstd[row];
    // Same chunk layout as the forward warp kernel; g and xhat stay in registers for the second pass.
    float g[kChunks][VEC], xhat[kChunks][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = (i * kWarpSize + lane) * VEC;
      if (c < hidden) {
        float wv[VEC];
        cuda_utils::load_as_float<VEC>(dyr + c, g[i]);
        cuda_utils::load_as_float<VEC>(xr + c, xhat[i]);
        load_param_or<VEC>(w, c, 1.f, wv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          g[i][j] = scaled_grad(g[i][j], wv[j]);
          xhat[i][j] = (xhat[i][j] - mu) * rs;
          sum_g += g[i][j];
          sum_gx += g[i][j] * xhat[i][j];
        }
      }
    }
    const float mean_g = cuda_utils::warp_allreduce_sum(sum_g) * inv_hidden;
    const float mean_gx = cuda_utils::warp_allreduce_sum(sum_gx) * inv_hidden;

#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = (i * kWarpSize + lane) * VEC;
      if (c < hidden) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = rs * (g[i][j] - mean_g - xhat[i][j] * mean_gx);
        if constexpr (kAdd) {
          add_bwd_store<VEC>(add, row * hidden + c, out);
        } else {
          cuda_utils::store_from_float<VEC>(dx + row * hidden + c, out);
        }
      }
    }
  }
}

template <typename T, typename P, int VEC, bool kAdd>
__global__ void __launch_bounds__(kBlockMaxThreads)
    layer_norm_bwd_input_block_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                      const P* __restrict__ w, T* __restrict__ dx, int64_t rows, int64_t hidden,
                                      float inv_hidden, AddBwdArgs<T> add) {
  __shared__ float smem[2 * kWarpSize];
  const int64_t first_col = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t col_stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    const float mu = mean[row];
    const float rs = rstd[row];
    // sums[0] = sum(g), sums[1] = sum(g * xhat), reduced together to share the barriers.
    float sums[2] = {0.f, 0.f};
    for (int64_t c = first_col; c < hidden; c += col_stride) {
      float dyv[VEC], xv[VEC], wv[VEC];
      cuda_utils::load_as_float<VEC>(dyr + c, dyv);
      cuda_utils::load_as_float<VEC>(xr + c, xv);
      load_param_or<VEC>(w, c, 1.f, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = scaled_grad(dyv[j], wv[j]);
        sums[0] += g;
        sums[1] += g * ((xv[j] - mu) * rs);
      }
    }
    cuda_utils::block_allreduce_sum(sums, smem);
    const float mean_g = sums[0] * inv_hidden;
    const float mean_gx = sums[1] * inv_hidden;

    for (int64_t c = first_col; c < hidden; c += col_stride) {
      float dyv[VEC], xv[VEC], wv[VEC], out[VEC];
      cuda_utils::load_as_float<VEC>(dyr + c, dyv);
      cuda_utils::load_as_float<VEC>(xr + c, xv);
      load_param_or<VEC>(w, c, 1.f, wv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out[j] = rs * (scaled_grad(dyv[j], wv[j]) - mean_g - ((xv[j] - mu) * rs) * mean_gx);
      }
      if constexpr (kAdd) {
        add_bwd_store<VEC>(add, row * hidden + c, out);
      } else {
        cuda_utils::store_from_float<VEC>(dx + row * hidden + c, out);
      }
    }
  }
}

template <typename T, typename P, int VEC, bool kAdd = false>
void launch_bwd_input(const T* dy, const T* x, const float* mean, const float* rstd, const P* w, T* dx, int64_t rows,
                      int64_t hidden, cudaStream_t stream, const AddBwdArgs<T>& add = {}) {
  if (hidden <= kWarpMaxHidden) {
    const dim3 block(kWarpSize, kWarpRowsPerBlock);
    layer_norm_bwd_input_warp_kernel<T, P, VEC, kAdd>
        <<<grid_size(ceil_div(rows, kWarpRowsPerBlock)), block, 0, stream>>>(
            dy, x, mean, rstd, w, dx, rows, static_cast<int>(hidden), reciprocal(hidden), add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    layer_norm_bwd_input_block_kernel<T, P, VEC, kAdd><<<grid_size(rows), block_row_threads(hidden, VEC), 0, stream>>>(
        dy, x, mean, rstd, w, dx, rows, hidden, reciprocal(hidden), add);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_weight / grad_bias
// ---------------------------------------------------------------------------------------------

// grid = (ceil(hidden / 32) column tiles, splits), block = (32, 8). Writes partial_w / partial_b
// [splits, hidden] for the rows [split * rows_per_split, min(rows, (split + 1) * rows_per_split)).
// A null partial pointer means that gradient is not wanted (partial_w null also skips reading x).
template <typename T>
__global__ void __launch_bounds__(kParamCols * kParamRowStripes)
    layer_norm_bwd_param_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const float* __restrict__ mean, const float* __restrict__ rstd,
                                        float* __restrict__ partial_w, float* __restrict__ partial_b, int64_t rows,
                                        int64_t hidden, int64_t rows_per_split) {
  __shared__ float stripe_w[kParamRowStripes][kParamCols];
  __shared__ float stripe_b[kParamRowStripes][kParamCols];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kParamCols + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = rows - row_begin < rows_per_split ? rows : row_begin + rows_per_split;
  float acc_w = 0.f, acc_b = 0.f;
  if (c < hidden) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kParamRowStripes) {
      const int64_t i = r * hidden + c;
      const float d = static_cast<float>(dy[i]);
      acc_b += d;
      if (partial_w != nullptr) acc_w += d * ((static_cast<float>(x[i]) - mean[r]) * rstd[r]);
    }
  }
  stripe_w[threadIdx.y][threadIdx.x] = acc_w;
  stripe_b[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && c < hidden) {
    float total_w = 0.f, total_b = 0.f;
#pragma unroll
    for (int s = 0; s < kParamRowStripes; ++s) {
      total_w += stripe_w[s][threadIdx.x];
      total_b += stripe_b[s][threadIdx.x];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.y) * hidden + c;
    if (partial_w != nullptr) partial_w[o] = total_w;
    if (partial_b != nullptr) partial_b[o] = total_b;
  }
}

// One thread per column adds that column's partials in split order (reads coalesced across threads) and
// writes the total as G (the parameters' dtype).
template <typename G>
__global__ void __launch_bounds__(kFinalizeThreads)
    layer_norm_bwd_param_finalize_kernel(const float* __restrict__ partial_w, const float* __restrict__ partial_b,
                                         G* __restrict__ grad_w, G* __restrict__ grad_b, int64_t splits,
                                         int64_t hidden) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= hidden) return;
  if (partial_w != nullptr) {
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) total += partial_w[s * hidden + c];
    grad_w[c] = static_cast<G>(total);
  }
  if (partial_b != nullptr) {
    float total = 0.f;
    for (int64_t s = 0; s < splits; ++s) total += partial_b[s * hidden + c];
    grad_b[c] = static_cast<G>(total);
  }
}

// Column sums over rows > 0 and hidden > 0: grad_w = sum_rows dy * (x - mean) * rstd when grad_w is not
// null, grad_b = sum_rows dy when grad_b is not null (at least one of them). x, mean and rstd are read
// only for grad_w, so with grad_w null this is a plain deterministic column sum of dy. The sums are written
// as G: the parameters' dtype (T, or float for norms kept in float32), T for add_layer_norm's input bias.
template <typename T, typename G>
void launch_param_grads(const T* dy, const T* x, const float* mean, const float* rstd, G* grad_w, G* grad_b,
                        int64_t rows, int64_t hidden, const at::TensorOptions& float_options, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(hidden, kParamCols);
  const int64_t wanted_splits =
      std::clamp<int64_t>(ceil_div(kParamTargetBlocks, col_tiles), 1, ceil_div(rows, kParamMinRowsPerSplit));
  const int64_t rows_per_split = ceil_div(rows, wanted_splits);
  // Recomputed so that no split is empty; at most kParamTargetBlocks, far below the gridDim.y limit.
  const int64_t splits = ceil_div(rows, rows_per_split);
  at::Tensor partial_w = grad_w != nullptr ? at::empty({splits, hidden}, float_options) : at::Tensor();
  at::Tensor partial_b = grad_b != nullptr ? at::empty({splits, hidden}, float_options) : at::Tensor();
  float* partial_w_p = grad_w != nullptr ? partial_w.mutable_data_ptr<float>() : nullptr;
  float* partial_b_p = grad_b != nullptr ? partial_b.mutable_data_ptr<float>() : nullptr;

  const dim3 partial_grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(splits));
  const dim3 partial_block(kParamCols, kParamRowStripes);
  layer_norm_bwd_param_partial_kernel<T><<<partial_grid, partial_block, 0, stream>>>(
      dy, x, mean, rstd, partial_w_p, partial_b_p, rows, hidden, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  layer_norm_bwd_param_finalize_kernel<G>
      <<<static_cast<unsigned>(ceil_div(hidden, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
          partial_w_p, partial_b_p, grad_w, grad_b, splits, hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------------------------

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

// Whether the affine parameters (null: absent) take the vector path of VEC elements per access, read in
// pieces of param_piece<VEC, P>() elements (at most 16 bytes).
template <int VEC, typename P>
bool param_vectors_aligned(const P* w, const P* b = nullptr) {
  constexpr std::size_t kBytes = sizeof(P) * param_piece<VEC, P>();
  return cuda_utils::is_aligned(w, kBytes) && cuda_utils::is_aligned(b, kBytes);
}

// eps as every other backend takes it: finite and >= 0 (written so that NaN fails too). The kernels
// take it as a float, where one beyond float32's range becomes inf, as in torch's CUDA LayerNorm and
// the Triton kernels: rstd is then 0 and the row normalises to the bias.
void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
}

float eps_as_float(double eps) {
  return eps > std::numeric_limits<float>::max() ? std::numeric_limits<float>::infinity() : static_cast<float>(eps);
}

// Keeps hidden, and every grid dimension derived from it, within 32-bit range.
void check_hidden_fits_int(int64_t hidden) {
  TORCH_CHECK(hidden <= std::numeric_limits<int32_t>::max(), "input must have fewer than 2^31 columns, got ",
              hidden);
}

// dropout_p in [0, 1); the seed (cuda_utils::kernel_seed) is required and checked whenever dropout_p > 0,
// as on the CPU, and read by the kernels only when dropout is applied (`used`).
DropoutArgs make_dropout(double dropout_p, const std::optional<at::Tensor>& seed, const at::Tensor& like,
                         bool used) {
  check_dropout_p(dropout_p);
  DropoutArgs d;
  if (dropout_p == 0) return d;
  d.seed = cuda_utils::kernel_seed(seed, like, "fused_attn::add_layer_norm");
  if (!used) return d;
  d.p = static_cast<float>(dropout_p);
  d.keep_prob = philox::keep_divisor(d.p);
  d.active = true;
  return d;
}

// The forward of layer_norm (residual null) and of add_layer_norm: checks, outputs, one launch.
// keep_pre: make and return the prenorm tensor (add_layer_norm's forward); false for layer_norm and for
// add_layer_norm's inference form, whose second result is then an undefined tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_impl(
    const at::Tensor& input, const at::Tensor* residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed, bool keep_pre) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  const std::pair<int64_t, int64_t> dims = check_rows_input(input, "input");
  const int64_t rows = dims.first;
  const int64_t hidden = dims.second;
  if (residual != nullptr) check_same_as(*residual, "residual", input, "input");
  const at::ScalarType param_dtype = affine_dtype(weight, input);
  check_affine_param(weight, "weight", input, hidden, param_dtype);
  check_affine_param(bias, "bias", input, hidden, param_dtype);
  check_affine_param(input_bias, "input_bias", input, hidden);
  check_eps(eps);
  const DropoutArgs dropout = make_dropout(dropout_p, seed, input, /*used=*/true);
  check_hidden_fits_int(hidden);

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({rows, hidden}, input.options());
  at::Tensor prenorm = keep_pre ? at::empty({rows, hidden}, input.options()) : at::Tensor();
  at::Tensor mean = at::empty({rows}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, input.options().dtype(at::kFloat));
  if (rows == 0) return {out, prenorm, mean, rstd};
  if (hidden == 0) {
    // Nothing to normalise: the statistics of an empty row are defined as zero (every backend).
    mean.zero_();
    rstd.zero_();
    return {out, prenorm, mean, rstd};
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Exactly the dtypes check_rows_input admits: AT_DISPATCH_FLOATING_TYPES_AND2 would also compile
  // unreachable double kernels (twice the build time, and ptxas spills in one of them).
  AT_DISPATCH_V2(input.scalar_type(), "layer_norm_fwd_cuda", AT_WRAP([&] {
    with_param_type<scalar_t>(param_dtype, [&](auto* tag) {
      using param_t = std::remove_pointer_t<decltype(tag)>;
      constexpr int kVec = cuda_utils::vec16_width<scalar_t>();
      AddFwdArgs<scalar_t> add;
      add.residual = residual != nullptr ? residual->const_data_ptr<scalar_t>() : nullptr;
      add.input_bias = optional_data<scalar_t>(input_bias);
      add.prenorm = keep_pre ? prenorm.mutable_data_ptr<scalar_t>() : nullptr;
      add.dropout = dropout;
      const scalar_t* x = input.const_data_ptr<scalar_t>();
      const param_t* w = optional_data<param_t>(weight);
      const param_t* b = optional_data<param_t>(bias);
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      float* mean_p = mean.mutable_data_ptr<float>();
      float* rstd_p = rstd.mutable_data_ptr<float>();
      const float eps_f = eps_as_float(eps);
      // Null pointers count as aligned.
      const bool vectorize = hidden % kVec == 0 && cuda_utils::is_aligned(x, 16) && cuda_utils::is_aligned(y, 16) &&
                             param_vectors_aligned<kVec>(w, b) && cuda_utils::is_aligned(add.residual, 16) &&
                             cuda_utils::is_aligned(add.input_bias, 16) && cuda_utils::is_aligned(add.prenorm, 16);
      const auto launch = [&](auto vec, auto with_add) {
        launch_fwd<scalar_t, param_t, decltype(vec)::value, decltype(with_add)::value>(
            x, w, b, y, mean_p, rstd_p, rows, hidden, eps_f, stream, add);
      };
      using Plain = std::false_type;
      using Add = std::true_type;
      using Vec = std::integral_constant<int, kVec>;
      using Scalar = std::integral_constant<int, 1>;
      if (residual == nullptr) {
        vectorize ? launch(Vec{}, Plain{}) : launch(Scalar{}, Plain{});
      } else {
        vectorize ? launch(Vec{}, Add{}) : launch(Scalar{}, Add{});
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out, prenorm, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& input,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    double eps) {
  const auto result =
      norm_fwd_impl(input, nullptr, weight, bias, std::nullopt, eps, 0.0, std::nullopt, /*keep_pre=*/false);
  return {std::get<0>(result), std::get<2>(result), std::get<3>(result)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(const at::Tensor& grad_out,
                                                                    const at::Tensor& input, const at::Tensor& mean,
                                                                    const at::Tensor& rstd,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    std::array<bool, 3> output_mask) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  const std::pair<int64_t, int64_t> dims = check_rows_input(input, "input");
  const int64_t rows = dims.first;
  const int64_t hidden = dims.second;
  check_same_as(grad_out, "grad_out", input, "input");
  check_row_stats(mean, "mean", input, rows);
  check_row_stats(rstd, "rstd", input, rows);
  const at::ScalarType param_dtype = affine_dtype(weight, input);
  check_affine_param(weight, "weight", input, hidden, param_dtype);
  const bool has_weight = weight.has_value() && weight->defined();
  TORCH_CHECK(!output_mask[1] || has_weight, "weight must be given when grad_weight is requested (output_mask[1])");
  check_hidden_fits_int(hidden);

  const c10::cuda::CUDAGuard guard(input.device());
  // Unselected outputs are distinct empty tensors: outputs of a non-aliasing schema must not share storage.
  at::Tensor grad_input =
      output_mask[0] ? at::empty({rows, hidden}, input.options()) : at::empty({0}, input.options());
  at::Tensor grad_weight = output_mask[1] ? at::empty({hidden}, weight->options()) : at::empty({0}, input.options());
  at::Tensor grad_bias =
      output_mask[2] ? at::empty({hidden}, input.options().dtype(param_dtype)) : at::empty({0}, input.options());
  if (hidden == 0) return {grad_input, grad_weight, grad_bias};
  if (rows == 0) {
    // Sums over no rows.
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(input.scalar_type(), "layer_norm_bwd_cuda", AT_WRAP([&] {
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const float* mean_p = mean.const_data_ptr<float>();
    const float* rstd_p = rstd.const_data_ptr<float>();

    with_param_type<scalar_t>(param_dtype, [&](auto* tag) {
      using param_t = std::remove_pointer_t<decltype(tag)>;
      if (output_mask[0]) {
        constexpr int kVec = cuda_utils::vec16_width<scalar_t>();
        const param_t* w = optional_data<param_t>(weight);
        scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
        const bool vectorize = hidden % kVec == 0 && cuda_utils::is_aligned(dy, 16) &&
                               cuda_utils::is_aligned(x, 16) && param_vectors_aligned<kVec>(w) &&
                               cuda_utils::is_aligned(dx, 16);
        if (vectorize) {
          launch_bwd_input<scalar_t, param_t, kVec>(dy, x, mean_p, rstd_p, w, dx, rows, hidden, stream);
        } else {
          launch_bwd_input<scalar_t, param_t, 1>(dy, x, mean_p, rstd_p, w, dx, rows, hidden, stream);
        }
      }

      if (output_mask[1] || output_mask[2]) {
        param_t* grad_w_p = output_mask[1] ? grad_weight.mutable_data_ptr<param_t>() : nullptr;
        param_t* grad_b_p = output_mask[2] ? grad_bias.mutable_data_ptr<param_t>() : nullptr;
        launch_param_grads<scalar_t, param_t>(dy, x, mean_p, rstd_p, grad_w_p, grad_b_p, rows, hidden,
                                              input.options().dtype(at::kFloat), stream);
      }
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd_cuda(
    const at::Tensor& input, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  return norm_fwd_impl(input, &residual, weight, bias, input_bias, eps, dropout_p, seed, /*keep_pre=*/true);
}

at::Tensor add_layer_norm_inference_cuda(const at::Tensor& input, const at::Tensor& residual,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& input_bias, double eps, double dropout_p,
                                         const std::optional<at::Tensor>& seed) {
  return std::get<0>(
      norm_fwd_impl(input, &residual, weight, bias, input_bias, eps, dropout_p, seed, /*keep_pre=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_prenorm, const at::Tensor& prenorm,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, double dropout_p,
    const std::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  TORCH_CHECK(prenorm.is_cuda(), "prenorm must be a CUDA tensor, got device ", prenorm.device());
  const std::pair<int64_t, int64_t> dims = check_rows_input(prenorm, "prenorm");
  const int64_t rows = dims.first;
  const int64_t hidden = dims.second;
  check_same_as(grad_out, "grad_out", prenorm, "prenorm");
  const bool has_grad_prenorm = grad_prenorm.has_value() && grad_prenorm->defined();
  if (has_grad_prenorm) check_same_as(*grad_prenorm, "grad_prenorm", prenorm, "prenorm");
  check_row_stats(mean, "mean", prenorm, rows);
  check_row_stats(rstd, "rstd", prenorm, rows);
  const at::ScalarType param_dtype = affine_dtype(weight, prenorm);
  check_affine_param(weight, "weight", prenorm, hidden, param_dtype);
  const bool has_weight = weight.has_value() && weight->defined();
  TORCH_CHECK(!output_mask[2] || has_weight, "weight must be given when grad_weight is requested (output_mask[2])");
  const bool want_input = output_mask[0];
  const bool want_residual = output_mask[1];
  const bool want_input_bias = output_mask[4];
  const DropoutArgs dropout = make_dropout(dropout_p, seed, prenorm, /*used=*/want_input || want_input_bias);
  check_hidden_fits_int(hidden);

  const c10::cuda::CUDAGuard guard(prenorm.device());
  const auto opts = prenorm.options();
  // Unselected outputs are distinct empty tensors: outputs of a non-aliasing schema must not share storage.
  at::Tensor grad_input = want_input ? at::empty({rows, hidden}, opts) : at::empty({0}, opts);
  at::Tensor grad_residual = want_residual ? at::empty({rows, hidden}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight = output_mask[2] ? at::empty({hidden}, weight->options()) : at::empty({0}, opts);
  at::Tensor grad_bias = output_mask[3] ? at::empty({hidden}, opts.dtype(param_dtype)) : at::empty({0}, opts);
  at::Tensor grad_input_bias = want_input_bias ? at::empty({hidden}, opts) : at::empty({0}, opts);
  if (hidden == 0) return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};
  if (rows == 0) {
    // Sums over no rows.
    if (output_mask[2]) grad_weight.zero_();
    if (output_mask[3]) grad_bias.zero_();
    if (want_input_bias) grad_input_bias.zero_();
    return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};
  }
  // grad_input_bias is the column sum of grad_input: a scratch grad_input when only the former is wanted.
  const at::Tensor input_grad_buffer =
      want_input ? grad_input : (want_input_bias ? at::empty({rows, hidden}, opts) : at::Tensor());

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(prenorm.scalar_type(), "add_layer_norm_bwd_cuda", AT_WRAP([&] {
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x = prenorm.const_data_ptr<scalar_t>();
    const float* mean_p = mean.const_data_ptr<float>();
    const float* rstd_p = rstd.const_data_ptr<float>();
    scalar_t* input_grad_p = input_grad_buffer.defined() ? input_grad_buffer.mutable_data_ptr<scalar_t>() : nullptr;

    const auto float_options = opts.dtype(at::kFloat);
    with_param_type<scalar_t>(param_dtype, [&](auto* tag) {
      using param_t = std::remove_pointer_t<decltype(tag)>;
      if (want_input || want_residual || want_input_bias) {
        constexpr int kVec = cuda_utils::vec16_width<scalar_t>();
        AddBwdArgs<scalar_t> add;
        add.grad_prenorm = has_grad_prenorm ? grad_prenorm->const_data_ptr<scalar_t>() : nullptr;
        add.grad_residual = want_residual ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
        add.grad_input = input_grad_p;
        add.dropout = dropout;
        const param_t* w = optional_data<param_t>(weight);
        const bool vectorize = hidden % kVec == 0 && cuda_utils::is_aligned(dy, 16) &&
                               cuda_utils::is_aligned(x, 16) && param_vectors_aligned<kVec>(w) &&
                               cuda_utils::is_aligned(add.grad_prenorm, 16) &&
                               cuda_utils::is_aligned(add.grad_residual, 16) &&
                               cuda_utils::is_aligned(add.grad_input, 16);
        if (vectorize) {
          launch_bwd_input<scalar_t, param_t, kVec, true>(dy, x, mean_p, rstd_p, w, nullptr, rows, hidden, stream,
                                                          add);
        } else {
          launch_bwd_input<scalar_t, param_t, 1, true>(dy, x, mean_p, rstd_p, w, nullptr, rows, hidden, stream, add);
        }
      }
      if (output_mask[2] || output_mask[3]) {
        param_t* grad_w_p = output_mask[2] ? grad_weight.mutable_data_ptr<param_t>() : nullptr;
        param_t* grad_b_p = output_mask[3] ? grad_bias.mutable_data_ptr<param_t>() : nullptr;
        launch_param_grads<scalar_t, param_t>(dy, x, mean_p, rstd_p, grad_w_p, grad_b_p, rows, hidden, float_options,
                                              stream);
      }
    });
    if (want_input_bias) {
      launch_param_grads<scalar_t, scalar_t>(input_grad_p, nullptr, nullptr, nullptr, nullptr,
                                   grad_input_bias.mutable_data_ptr<scalar_t>(), rows, hidden, float_options, stream);
    }
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {grad_input, grad_residual, grad_weight, grad_bias, grad_input_bias};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("layer_norm_fwd", &fused_attn::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fused_attn::layer_norm_bwd_cuda);
  m.impl("add_layer_norm_fwd", &fused_attn::add_layer_norm_fwd_cuda);
  m.impl("add_layer_norm_inference", &fused_attn::add_layer_norm_inference_cuda);
  m.impl("add_layer_norm_bwd", &fused_attn::add_layer_norm_bwd_cuda);
}
