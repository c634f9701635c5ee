// CUDA kernels of fused_attn::linear_gelu_fwd / linear_gelu_bwd (schemas in csrc/ops.cpp).
//
// Activations, by the ops' `approximate` argument: "none" the erf GELU, "tanh" the tanh GELU, "relu" ReLU
// (torch's: relu(x) = x < 0 ? 0 : x, its gradient threshold_backward's). The pre-activation is x W^T + b
// for all three. Only "tanh" has a cuBLASLt epilogue path (below); "none" and "relu" always take the
// elementwise kernels.
//
// The GEMMs are cuBLASLt's (a hand-written GEMM would not beat it); what is fused is everything around
// them, so that no [rows, out_features] tensor is read or written more often than it has to be.
//
// Layout. PyTorch tensors are row-major and cuBLASLt matrices column-major, so a contiguous [r, c] tensor
// is handed over as its column-major transpose [c x r] with leading dimension c:
//   forward      out^T [out x rows] = op_T(W^T [in x out]) * X^T [in x rows]      (m = out, n = rows, k = in)
//   grad_input   dX^T  [in x rows]  = W^T [in x out] * dPre^T [out x rows]         (m = in,  n = rows, k = out)
//   grad_weight  dW^T  [in x out]   = X^T [in x rows] * op_T(dPre^T [out x rows])  (m = in,  n = out,  k = rows)
//   FFN hidden   dPre^T [hid x rows] = dgelu(W2^T [hid x model] * dY^T [model x rows], Pre^T)  (m = hid, n = rows,
//                k = model; W2 is [model, hid] row-major, i.e. [hid x model] column-major, so no transposes)
// Bias vectors run along m (out_features) in the forward, which is what cuBLASLt's bias epilogues expect.
//
// Forward. Two paths, chosen per call:
//   * fused (approximate == "tanh", float16/bfloat16, out_features % 8 == 0): one cublasLtMatmul with
//     CUBLASLT_EPILOGUE_GELU_AUX_BIAS (GELU_AUX without a bias) writes out = gelu(x W^T + b) and, as the
//     epilogue's auxiliary output, the pre-activation. cuBLASLt requires the aux leading dimension (here
//     out_features) to be a multiple of 8; if the heuristic offers no algorithm anyway, the call falls
//     through to the second path.
//   * otherwise: cublasLtMatmul with CUBLASLT_EPILOGUE_BIAS (DEFAULT without a bias) writes the
//     pre-activation, then one vectorised elementwise kernel writes act(pre) into out. cuBLASLt has no erf
//     GELU, so approximate == "none" always takes this path, as does "relu" (CUBLASLT_EPILOGUE_RELU_AUX would
//     store a bit mask, not the pre-activation, and its max(x, 0) does not promise torch's NaN propagation,
//     which the inference form would also have to match bit for bit). float32 takes it for "tanh" too:
//     cuBLASLt does not document the accuracy of its GELU epilogue, the fused result is known not to match an
//     unfused GELU bit for bit, and the float32 parity bound is a few ulps. In 16-bit types the output
//     rounding (2^-11 / 2^-8 relative) is taken to cover the epilogue's own GELU arithmetic (measured by the
//     parity tests on a GPU), and the epilogue takes the GELU of the float32 pre-activation where the unfused
//     path (and gelu(linear(x)) in PyTorch) takes that of its 16-bit rounding: the two differ by gelu'(x)
//     times that rounding, several output ulps in the negative tail (x ~ -3, where |gelu'(x) x| >>
//     |gelu(x)|), and the fused output is the closer to the exact value. The backward of both paths reads the
//     stored 16-bit pre-activation.
// Matmuls use CUBLAS_COMPUTE_32F (float32 accumulation; for float32 operands this excludes TF32) and
// split-K reductions in float32 only (CUBLASLT_REDUCTION_SCHEME_NONE | COMPUTE_TYPE): never the in-place
// reduction in the 16-bit output type.
//
// GELU math (elementwise kernels), in float32 from 16-bit storage:
//   erf:  gelu(x) = x/2 erfc(-x/sqrt2),   gelu'(x) = erfc(-x/sqrt2)/2 + x exp(-x^2/2)/sqrt(2 pi)
//   tanh: with u = sqrt(2/pi) (x + 0.044715 x^3), 1 + tanh(u) = 2 sigmoid(2u); with e = exp(-2|u|) in [0, 1]
//         and r = 1 / (1 + e): s = sigmoid(2u) = (u >= 0 ? r : e r), s (1 - s) = e r^2, so
//         gelu(x) = x s,   gelu'(x) = s + 2 x e r^2 sqrt(2/pi) (1 + 3 * 0.044715 x^2).
//   Nothing overflows (exp of a non-positive argument), nothing cancels (erfc instead of 1 + erf, the
//   sigmoid instead of 1 + tanh near tanh = -1), and tanhf is avoided on purpose: under --use_fast_math it
//   compiles to tanh.approx.f32 (about 2^-11 relative error), far outside a float32 parity bound. For the
//   same reason the exponentials are the cpu kernels' (exp_nonpositive, gaussian), not __expf, which
//   --use_fast_math makes of expf.
// ReLU: relu(x) = x < 0 ? 0 : x (NaN and -0 pass); grad_pre = pre <= 0 ? 0 : grad_out, a selection as
// torch's threshold_backward (so NaN pre passes grad_out, and an inf / NaN grad_out at pre <= 0 gives 0).
// Both exact, in any dtype.
//
// Backward. grad_pre = grad_out * act'(pre) has to be materialised: both GEMMs take it as an operand and
// cuBLASLt has no prologue fusion. CUBLASLT_EPILOGUE_DGELU_BGRAD does not fit linear_gelu_bwd: it applies
// gelu' to the output of a matmul (the one producing the gradient w.r.t. the GELU output, i.e. the next
// layer's dgrad GEMM), whereas here that gradient arrives as the input grad_out. It fits the FFN, whose
// backward makes that matmul itself (grad_hidden = grad_out @ w2): linear_gelu_bwd_from_next_cuda runs it
// with DGELU_BGRAD (DGELU when the bias gradient is not wanted), pre as the epilogue's auxiliary input, so
// grad_pre and grad_b1 come out of the GEMM and no elementwise pass is left -- for the calls the forward's
// epilogue serves (approximate == "tanh", float16/bfloat16, hidden % 8 == 0, as cuBLASLt has only the tanh
// GELU and requires the aux leading dimension to be a multiple of 8; its DRELU epilogues read a bit mask
// that ffn_fwd does not keep); other calls, or a GEMM cuBLASLt
// declines, take the unfused path below. Otherwise one elementwise kernel reads grad_out
// and pre once, writes grad_pre and, when grad_bias is requested, reduces its columns in the same pass
// (deterministically: float32 partials over fixed row splits, summed in split order by a second small
// kernel, exactly as the LayerNorm dweight/dbias); then two plain cuBLASLt GEMMs (epilogue DEFAULT).
// linear_gelu_bwd_scratch (what the FFN's backward calls on its own hidden gradient) writes grad_pre over
// grad_out instead, sparing a [rows, out_features] buffer at the backward's peak.
//
// Fallbacks. If cuBLASLt offers no algorithm for a plain GEMM (an exotic alignment or leading dimension),
// the GEMM goes to ATen (at::mm_out / at::addmm_out), which always has one; the fused epilogue falls back to
// the unfused path. Those ATen GEMMs (also the ones of a dimension of 1) follow torch's float32 matmul
// precision (torch.backends.cuda.matmul.allow_tf32), which is off unless the user turns it on, and in
// float16/bfloat16 torch's allow_{fp16,bf16}_reduced_precision_reduction (on by default), under which
// cuBLAS may reduce split-K sums in the 16-bit type, as F.linear does, unlike the cuBLASLt GEMMs above.
// Handle and workspace are PyTorch's (getCurrentCUDABlasLtHandle, getCUDABlasLtWorkspace), everything
// runs on the current stream.
//
// Degenerate shapes: rows == 0 or out_features == 0 launch nothing; in_features == 0 gives
// pre = bias (or 0) without a GEMM; the backward fills the sums over no rows with zeros.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "fused_attn/activation.h"
#include "fused_attn/checks.h"
#include "fused_attn/cuda_utils.cuh"
#include "fused_attn/ffn_cuda.h"
#include "fused_attn/philox.h"

namespace fused_attn {
namespace {

using cuda_utils::kWarpSize;

// Elementwise forward kernel: threads per block.
constexpr int kEltThreads = 256;
// grad_pre / grad_bias kernel: a block covers kWarpSize * VEC columns with kBiasRowStripes warps, each
// warp striding down the rows of one split.
constexpr int kBiasRowStripes = 8;
// As in layer_norm.cu: a constant (not the SM count) so that the split, and the summation order, do not
// depend on the device; at least kBiasMinRowsPerSplit rows per split keeps the partials few.
constexpr int64_t kBiasTargetBlocks = 1024;
constexpr int64_t kBiasMinRowsPerSplit = 64;
constexpr int kFinalizeThreads = 256;
// cuBLASLt: the GELU aux leading dimension must be a multiple of 8 elements (cublasLt.h,
// CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD).
constexpr int64_t kAuxLdMultiple = 8;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, std::numeric_limits<int32_t>::max()));
}

// ---------------------------------------------------------------------------------------------
// GELU
// ---------------------------------------------------------------------------------------------

constexpr float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr float kTanhBeta = 0.79788456080286536f;    // sqrt(2 / pi)
constexpr float kTanhKappa = 0.044715f;

// exp(x) for x <= 0 to about 1 ulp, as the cpu kernels' exp_inline (Cephes expf): x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by a degree-6 polynomial, times 2^n built in the
// exponent bits. Under --use_fast_math expf is __expf, whose error grows with the argument (2 + 1.17 |x|
// ulp: 14 ulp at the x = -11 that the tanh GELU reaches at x = -4). Arguments below log(FLT_MIN) give 0
// (the kernels flush subnormals anyway), -inf gives 0, NaN stays NaN.
__device__ __forceinline__ float exp_nonpositive(float x) {
  constexpr float kMinArg = -87.33654475f;  // log(FLT_MIN)
  if (!(x >= kMinArg)) return x != x ? x : 0.f;
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p, r * r, r + 1.f);
  return y * __int_as_float((static_cast<int>(n) + 127) << 23);
}

// exp(-x^2 / 2) with its argument exact, as the cpu kernel's: x^2 = hi + lo by an FMA, exp(-hi / 2)
// times 1 - lo / 2 (|lo| is below half an ulp of x^2, whose rounding would otherwise cost up to 40 ulp
// of the result near x = 13). Past x^2 / 2 = 80 it is 0 (also for x = +-inf, where lo would be inf);
// NaN stays NaN.
__device__ __forceinline__ float gaussian(float x) {
  const float hi = x * x;
  const float lo = fmaf(x, x, -hi);
  return 0.5f * hi > 80.f ? 0.f : exp_nonpositive(-0.5f * hi) * fmaf(-0.5f, lo, 1.f);
}

// The normal cdf Phi(x): erfc(-x / sqrt(2)) / 2, and for |x| <= 1, where that carries erfcf's
// error at the size of 1/2 (most pre-activations), 1/2 + x R(x^2) with the cpu kernels' fit of R
// (csrc/cpu/ffn.cpp, normal_parts).
__device__ __forceinline__ float normal_cdf(float x) {
  const float x2 = x * x;
  if (x2 > 1.f) return 0.5f * erfcf(-x * kSqrtHalf);
  float r = -7.65420646e-06f;
  r = fmaf(r, x2, 1.13486363e-04f);
  r = fmaf(r, x2, -1.18632999e-03f);
  r = fmaf(r, x2, 9.97332297e-03f);
  r = fmaf(r, x2, -6.64903596e-02f);
  r = fmaf(r, x2, 3.98942292e-01f);
  return fmaf(x, r, 0.5f);
}

// The activation of x, in float32. ReLU as torch's: x < 0 ? 0 : x, so NaN and -0 pass unchanged.
template <Activation kKind>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kKind == Activation::kRelu) {
    return x < 0.f ? 0.f : x;
  } else if constexpr (kKind == Activation::kGeluErf) {
    return x * normal_cdf(x);
  } else {
    const float u = kTanhBeta * (x + kTanhKappa * x * x * x);
    const float e = exp_nonpositive(-2.f * fabsf(u));
    const float r = __frcp_rn(1.f + e);  // correctly rounded under --use_fast_math
    return x * (u >= 0.f ? r : e * r);
  }
}

template <Activation kKind>
__device__ __forceinline__ float gelu_grad(float x) {
  static_assert(kKind != Activation::kRelu, "ReLU's gradient is a selection: activation_grad");
  if constexpr (kKind == Activation::kGeluErf) {
    return normal_cdf(x) + x * kInvSqrt2Pi * gaussian(x);
  } else {
    const float x2 = x * x;
    const float u = kTanhBeta * (x + kTanhKappa * x2 * x);
    const float e = exp_nonpositive(-2.f * fabsf(u));
    const float r = __frcp_rn(1.f + e);  // correctly rounded under --use_fast_math
    const float s = u >= 0.f ? r : e * r;
    const float du = kTanhBeta * (1.f + 3.f * kTanhKappa * x2);
    const float one_minus_t2_over_4 = e * r * r;
    // Where 1 - t^2 is 0 so is the second term, also where x * x overflows (|x| > 1.8e19, where
    // 0 * inf would be NaN); x * 0 keeps torch's NaN at x = +-inf.
    return s + (one_minus_t2_over_4 > 0.f ? 2.f * x * one_minus_t2_over_4 * du : x * 0.f);
  }
}

// The gradient reaching the pre-activation x from dy, the gradient of the activation's output. ReLU's is
// torch's threshold_backward(dy, relu(x), 0): 0 where relu(x) <= 0 (x <= 0, -0 included), dy elsewhere,
// NaN x included (NaN <= 0 is false) -- a selection, not dy * relu'(x), so an infinite or NaN dy where
// x <= 0 gives 0 as in torch.
template <Activation kKind>
__device__ __forceinline__ float activation_grad(float dy, float x) {
  if constexpr (kKind == Activation::kRelu) {
    return x <= 0.f ? 0.f : dy;
  } else {
    return dy * gelu_grad<kKind>(x);
  }
}

// out = act(pre) over n contiguous elements: VEC-wide grid-stride body, then the n % VEC tail element by
// element (the tail is shorter than VEC, hence than the grid). pre and out must be 16-byte aligned for
// VEC > 1. out may be pre (in place: each thread reads its elements before it writes them), so neither
// pointer is __restrict__. (This kernel and gelu_bwd_kernel serve every Activation; their names are
// kept, as tests/test_ffn.py counts gelu_bwd_kernel launches in a profile.)
template <typename T, int VEC, Activation kKind>
__global__ void __launch_bounds__(kEltThreads) gelu_fwd_kernel(const T* pre, T* out, int64_t n) {
  const int64_t n_vec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = first; v < n_vec; v += stride) {
    float x[VEC], y[VEC];
    cuda_utils::load_as_float<VEC>(pre + v * VEC, x);
#pragma unroll
    for (int j = 0; j < VEC; ++j) y[j] = activate<kKind>(x[j]);
    cuda_utils::store_from_float<VEC>(out + v * VEC, y);
  }
  if constexpr (VEC > 1) {
    const int64_t t = n_vec * VEC + first;
    if (t < n) out[t] = static_cast<T>(activate<kKind>(static_cast<float>(pre[t])));
  }
}

// grad_pre = activation_grad(grad_out, pre) over [rows, cols] (not stored when grad_pre is null).
// grid = (ceil(cols / (32 * VEC)) column tiles, splits), block = (32, kBiasRowStripes): thread (tx, ty) owns
// columns [c, c + VEC) and the rows row_begin + ty, + kBiasRowStripes, ... of its split. With `partial`
// (grad_bias wanted) the column sums over the split's rows, of the float32 values before their rounding
// to T, go to partial[split, cols], reduced over the stripes in stripe order. VEC > 1 requires
// cols % VEC == 0 and 16-byte aligned pointers. grad_pre may be grad_out (linear_gelu_bwd_scratch: each
// thread reads its elements before it writes them, and no element is read twice), so neither pointer is
// __restrict__.
template <typename T, int VEC, Activation kKind>
__global__ void __launch_bounds__(kWarpSize * kBiasRowStripes)
    gelu_bwd_kernel(const T* grad_out, const T* __restrict__ pre, T* grad_pre,
                    float* __restrict__ partial, int64_t rows, int64_t cols, int64_t rows_per_split) {
  // [stripe][j * 32 + tx]: consecutive threads hit consecutive banks on both the write and the read.
  __shared__ float stripe_sums[kBiasRowStripes][kWarpSize * VEC];
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t row_end = rows - row_begin < rows_per_split ? rows : row_begin + rows_per_split;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (c < cols) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kBiasRowStripes) {
      const int64_t i = r * cols + c;
      float dy[VEC], x[VEC], g[VEC];
      cuda_utils::load_as_float<VEC>(grad_out + i, dy);
      cuda_utils::load_as_float<VEC>(pre + i, x);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        g[j] = activation_grad<kKind>(dy[j], x[j]);
        acc[j] += g[j];
      }
      if (grad_pre != nullptr) cuda_utils::store_from_float<VEC>(grad_pre + i, g);
    }
  }
  // Uniform across the block, so either every thread or none reaches the barrier.
  if (partial == nullptr) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) stripe_sums[threadIdx.y][j * kWarpSize + threadIdx.x] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float total = 0.f;
#pragma unroll
      for (int s = 0; s < kBiasRowStripes; ++s) total += stripe_sums[s][j * kWarpSize + threadIdx.x];
      partial[static_cast<int64_t>(blockIdx.y) * cols + c + j] = total;
    }
  }
}

// grad_bias[c] = sum over splits of partial[s, c], in split order.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
    bias_grad_finalize_kernel(const float* __restrict__ partial, T* __restrict__ grad_bias, int64_t splits,
                              int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int64_t s = 0; s < splits; ++s) total += partial[s * cols + c];
  grad_bias[c] = static_cast<T>(total);
}

// The FFN's dropout (ffn_dropout_cuda): one thread per four elements (one Philox counter's words,
// philox::keep_run), grid-stride; element e of the stream is element e of the contiguous tensor; the
// arithmetic is cuda_utils::dropout_value's, the CPU and Triton kernels'. src may be dst (the forward
// drops in place), hence no __restrict__.
constexpr int64_t kDropRun = philox::kWords;
template <typename T>
__global__ void __launch_bounds__(kEltThreads)
    ffn_dropout_kernel(const T* src, T* dst, int64_t n, cuda_utils::DropoutSeed seed_arg, float p, float keep_prob) {
  const uint64_t seed = seed_arg.load();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kDropRun;
  for (int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kDropRun; e < n; e += stride) {
    bool keep[kDropRun];
    philox::keep_run(seed, static_cast<uint64_t>(e), p, keep);
#pragma unroll
    for (int j = 0; j < kDropRun; ++j) {
      if (e + j < n) {
        dst[e + j] = static_cast<T>(cuda_utils::dropout_value(static_cast<float>(src[e + j]), keep[j], keep_prob));
      }
    }
  }
}

template <typename T, Activation kKind>
void launch_gelu_fwd(const T* pre, T* out, int64_t n, cudaStream_t stream) {
  constexpr int kVec = cuda_utils::vec16_width<T>();
  if (cuda_utils::is_aligned(pre, 16) && cuda_utils::is_aligned(out, 16)) {
    gelu_fwd_kernel<T, kVec, kKind>
        <<<grid_size(ceil_div(n / kVec, kEltThreads)), kEltThreads, 0, stream>>>(pre, out, n);
  } else {
    gelu_fwd_kernel<T, 1, kKind><<<grid_size(ceil_div(n, kEltThreads)), kEltThreads, 0, stream>>>(pre, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The row splits of the bias gradient are a function of the shape alone (the column tiles of the widest
// vector width, whichever width runs), so its bits do not depend on the operands' alignment: each
// column's sum runs over the same rows in the same order for any VEC.
template <typename T, int VEC, Activation kKind>
void launch_gelu_bwd_vec(const T* grad_out, const T* pre, T* grad_pre, T* grad_bias, int64_t rows, int64_t cols,
                         const at::TensorOptions& float_options, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(cols, static_cast<int64_t>(kWarpSize) * VEC);
  const int64_t shape_tiles = ceil_div(cols, static_cast<int64_t>(kWarpSize) * cuda_utils::vec16_width<T>());
  const int64_t wanted_splits =
      std::clamp<int64_t>(ceil_div(kBiasTargetBlocks, shape_tiles), 1, ceil_div(rows, kBiasMinRowsPerSplit));
  const int64_t rows_per_split = ceil_div(rows, wanted_splits);
  // Recomputed so that no split is empty; at most kBiasTargetBlocks, far below the gridDim.y limit.
  const int64_t splits = ceil_div(rows, rows_per_split);
  at::Tensor partial = grad_bias != nullptr ? at::empty({splits, cols}, float_options) : at::Tensor();
  float* partial_p = grad_bias != nullptr ? partial.mutable_data_ptr<float>() : nullptr;

  const dim3 grid(grid_size(col_tiles), static_cast<unsigned>(splits));
  const dim3 block(kWarpSize, kBiasRowStripes);
  gelu_bwd_kernel<T, VEC, kKind>
      <<<grid, block, 0, stream>>>(grad_out, pre, grad_pre, partial_p, rows, cols, rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (grad_bias != nullptr) {
    bias_grad_finalize_kernel<T>
        <<<grid_size(ceil_div(cols, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(partial_p, grad_bias, splits,
                                                                                         cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// rows > 0, cols > 0. grad_pre / grad_bias null: not wanted (not both).
template <typename T, Activation kKind>
void launch_gelu_bwd(const T* grad_out, const T* pre, T* grad_pre, T* grad_bias, int64_t rows, int64_t cols,
                     const at::TensorOptions& float_options, cudaStream_t stream) {
  constexpr int kVec = cuda_utils::vec16_width<T>();
  const bool vectorize = cols % kVec == 0 && cuda_utils::is_aligned(grad_out, 16) && cuda_utils::is_aligned(pre, 16) &&
                         cuda_utils::is_aligned(grad_pre, 16);
  if (vectorize) {
    launch_gelu_bwd_vec<T, kVec, kKind>(grad_out, pre, grad_pre, grad_bias, rows, cols, float_options, stream);
  } else {
    launch_gelu_bwd_vec<T, 1, kKind>(grad_out, pre, grad_pre, grad_bias, rows, cols, float_options, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt
// ---------------------------------------------------------------------------------------------

void check_cublaslt(cublasStatus_t status, const char* call) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, call, " failed: ", cublasLtGetStatusString(status), " (status ",
              static_cast<int>(status), ")");
}

// Owns a cuBLASLt descriptor; destroyed on every exit path (a failed destroy has no remedy, so its status
// is dropped).
template <typename Handle, cublasStatus_t (*kDestroy)(Handle)>
class LtDescriptor {
 public:
  LtDescriptor() = default;
  LtDescriptor(const LtDescriptor&) = delete;
  LtDescriptor& operator=(const LtDescriptor&) = delete;
  ~LtDescriptor() {
    if (handle_ != nullptr) static_cast<void>(kDestroy(handle_));
  }
  Handle* out() { return &handle_; }
  Handle get() const { return handle_; }

 private:
  Handle handle_ = nullptr;
};
using MatmulDesc = LtDescriptor<cublasLtMatmulDesc_t, &cublasLtMatmulDescDestroy>;
using MatrixLayout = LtDescriptor<cublasLtMatrixLayout_t, &cublasLtMatrixLayoutDestroy>;
using MatmulPreference = LtDescriptor<cublasLtMatmulPreference_t, &cublasLtMatmulPreferenceDestroy>;

template <typename V>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value, const char* call) {
  check_cublaslt(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), call);
}

template <typename V>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const V& value,
              const char* call) {
  check_cublaslt(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)), call);
}

// Largest power of two (at most 256, cuBLASLt's default assumption) dividing the address: the heuristic
// must not pick a kernel that needs more alignment than the operand has (offset views, odd sizes).
uint32_t pointer_alignment(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

cudaDataType_t cuda_data_type(at::ScalarType t) {
  if (t == at::kHalf) return CUDA_R_16F;
  if (t == at::kBFloat16) return CUDA_R_16BF;
  TORCH_CHECK(t == at::kFloat, "linear_gelu: unsupported dtype ", t);
  return CUDA_R_32F;
}

// D [m x n] (column-major, ldd) = epilogue(op(A) op(B)); op(A) is m x k, op(B) k x n; all operands of one
// dtype, float32 accumulation and scale. C is D with beta = 0.
struct LtGemm {
  cudaDataType_t dtype = CUDA_R_32F;
  cublasOperation_t trans_a = CUBLAS_OP_N;
  cublasOperation_t trans_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // BIAS / GELU_AUX_BIAS: [m]
  void* bias_grad = nullptr;   // DGELU_BGRAD: [m], the row sums of D (an output)
  void* aux = nullptr;         // GELU_AUX(_BIAS): [m x n] written; DGELU(_BGRAD): read. Leading dimension aux_ld
  int64_t aux_ld = 0;
};

enum class LtOutcome { kDone, kRefused, kUnexpected };

// Runs the GEMM on the current stream. kRefused / kUnexpected: nothing was launched, because cuBLASLt
// has no algorithm for it (NOT_SUPPORTED, an empty heuristic answer) or rejected the descriptors
// (kUnexpected: INVALID_VALUE or another status from the heuristic query, which for a plain GEMM means a
// bug here rather than an unsupported case). Any other failure raises, naming the call.
LtOutcome run_lt_gemm(const LtGemm& g) {
  // A dimension of 1 (one token, one feature): the heuristic query answers INVALID_VALUE for a matrix
  // of one row or column, as PyTorch's addmm notes where it keeps such products off cuBLASLt; ATen's
  // GEMM serves them, with no warning.
  if (g.m <= 1 || g.n <= 1 || g.k <= 1) return LtOutcome::kRefused;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  // The size before the buffer, in PyTorch's own order: the buffer is sized from it.
  const uint64_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  MatmulDesc op;
  check_cublaslt(cublasLtMatmulDescCreate(op.out(), CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  set_desc(op.get(), CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(g.trans_a),
           "cublasLtMatmulDescSetAttribute(TRANSA)");
  set_desc(op.get(), CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(g.trans_b),
           "cublasLtMatmulDescSetAttribute(TRANSB)");
  set_desc(op.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(g.epilogue),
           "cublasLtMatmulDescSetAttribute(EPILOGUE)");
  // One pointer attribute for both: the bias an epilogue reads, or the bias gradient DGELU_BGRAD writes.
  if (const void* bias = g.bias != nullptr ? g.bias : g.bias_grad; bias != nullptr) {
    set_desc(op.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias, "cublasLtMatmulDescSetAttribute(BIAS_POINTER)");
  }
  if (g.aux != nullptr) {
    set_desc(op.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux,
             "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_POINTER)");
    set_desc(op.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.aux_ld,
             "cublasLtMatmulDescSetAttribute(EPILOGUE_AUX_LD)");
  }

  // Stored shapes: op(X) = X^T is stored transposed.
  const bool ta = g.trans_a != CUBLAS_OP_N;
  const bool tb = g.trans_b != CUBLAS_OP_N;
  MatrixLayout a_layout, b_layout, d_layout;
  check_cublaslt(cublasLtMatrixLayoutCreate(a_layout.out(), g.dtype, static_cast<uint64_t>(ta ? g.k : g.m),
                                            static_cast<uint64_t>(ta ? g.m : g.k), g.lda),
                 "cublasLtMatrixLayoutCreate(A)");
  check_cublaslt(cublasLtMatrixLayoutCreate(b_layout.out(), g.dtype, static_cast<uint64_t>(tb ? g.n : g.k),
                                            static_cast<uint64_t>(tb ? g.k : g.n), g.ldb),
                 "cublasLtMatrixLayoutCreate(B)");
  check_cublaslt(cublasLtMatrixLayoutCreate(d_layout.out(), g.dtype, static_cast<uint64_t>(g.m),
                                            static_cast<uint64_t>(g.n), g.ldd),
                 "cublasLtMatrixLayoutCreate(D)");

  MatmulPreference pref;
  check_cublaslt(cublasLtMatmulPreferenceCreate(pref.out()), "cublasLtMatmulPreferenceCreate");
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size,
           "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  const uint32_t reduction_schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reduction_schemes,
           "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)");
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, pointer_alignment(g.a),
           "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_A_BYTES)");
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, pointer_alignment(g.b),
           "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_B_BYTES)");
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, pointer_alignment(g.d),
           "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_C_BYTES)");
  set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, pointer_alignment(g.d),
           "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT_D_BYTES)");

  cublasLtMatmulHeuristicResult_t heuristic{};
  int returned = 0;
  const cublasStatus_t query = cublasLtMatmulAlgoGetHeuristic(handle, op.get(), a_layout.get(), b_layout.get(),
                                                              d_layout.get(), d_layout.get(), pref.get(), 1,
                                                              &heuristic, &returned);
  if (query == CUBLAS_STATUS_NOT_SUPPORTED || (query == CUBLAS_STATUS_SUCCESS && returned == 0)) {
    return LtOutcome::kRefused;
  }
  if (query != CUBLAS_STATUS_SUCCESS) return LtOutcome::kUnexpected;

  const float alpha = 1.f;
  const float beta = 0.f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, op.get(), &alpha, g.a, a_layout.get(), g.b, b_layout.get(), &beta, g.d, d_layout.get(),
                     g.d, d_layout.get(), &heuristic.algo, workspace, workspace_size, stream);
  // These two are argument checks made before anything is launched.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return LtOutcome::kRefused;
  if (status == CUBLAS_STATUS_INVALID_VALUE) return LtOutcome::kUnexpected;
  check_cublaslt(status, "cublasLtMatmul");
  return LtOutcome::kDone;
}

// A plain GEMM (epilogue DEFAULT or BIAS) must always succeed: when cuBLASLt declines, `fallback` (ATen)
// computes the same product.
template <typename Fallback>
void lt_gemm_or(const LtGemm& g, const char* what, Fallback&& fallback) {
  const LtOutcome outcome = run_lt_gemm(g);
  if (outcome == LtOutcome::kDone) return;
  if (outcome == LtOutcome::kUnexpected) {
    TORCH_WARN_ONCE("fused_attn linear_gelu: cuBLASLt rejected the ", what,
                    " GEMM descriptors (m=", g.m, ", n=", g.n, ", k=", g.k, "); computing it with at::mm instead");
  }
  fallback();
}

// ---------------------------------------------------------------------------------------------
// Host entry points
// ---------------------------------------------------------------------------------------------

// weight [out_features, in_features], contiguous, with the input's dtype and device; returns out_features.
int64_t check_weight(const at::Tensor& weight, const at::Tensor& input, int64_t in_features) {
  return check_linear_weight(weight, "weight", input, in_features, "in_features of the input", /*contiguous=*/true);
}

template <Activation kKind>
void gelu_fwd_dispatch(const at::Tensor& pre, at::Tensor& out, cudaStream_t stream) {
  AT_DISPATCH_V2(pre.scalar_type(), "linear_gelu_fwd_cuda", AT_WRAP([&] {
    launch_gelu_fwd<scalar_t, kKind>(pre.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), pre.numel(),
                                     stream);
  }), at::kFloat, at::kHalf, at::kBFloat16);
}

// The forward, with the pre-activation (keep_pre: what the backward reads) or without it (inference:
// the second tensor is undefined). Without it the GEMM writes the output buffer and the activation is
// applied there in place, so the call makes one [rows, out_features] tensor instead of two -- except where
// cuBLASLt's GELU epilogue serves the call, whose auxiliary pre-activation is then a temporary (so
// that the output has the same bits either way).
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_impl(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view approximate, bool keep_pre) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  const std::pair<int64_t, int64_t> dims = check_rows_input(input, "input");
  const int64_t rows = dims.first;
  const int64_t in_features = dims.second;
  const int64_t out_features = check_weight(weight, input, in_features);
  check_affine_param(bias, "bias", input, out_features);
  const Activation kind = parse_activation(std::string_view(approximate.data(), approximate.size()));
  const bool has_bias = bias.has_value() && bias->defined();

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({rows, out_features}, input.options());
  const auto kept = [&](const at::Tensor& pre) { return keep_pre ? pre : at::Tensor(); };
  if (rows == 0 || out_features == 0) return {out, kept(at::empty({rows, out_features}, input.options()))};
  // The GEMM's result: a tensor of its own when it is kept, else the output buffer, activated in place.
  at::Tensor pre = keep_pre ? at::empty({rows, out_features}, input.options()) : out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (in_features == 0) {
    // An empty dot product: the pre-activation is the bias alone.
    if (has_bias) {
      pre.copy_(bias->unsqueeze(0).expand({rows, out_features}));
    } else {
      pre.zero_();
    }
  } else {
    LtGemm g;
    g.dtype = cuda_data_type(input.scalar_type());
    g.trans_a = CUBLAS_OP_T;
    g.trans_b = CUBLAS_OP_N;
    g.m = out_features;
    g.n = rows;
    g.k = in_features;
    g.a = weight.const_data_ptr();
    g.lda = in_features;
    g.b = input.const_data_ptr();
    g.ldb = in_features;
    // The epilogue reads the bias with vector loads: a bias that is a view at an odd offset (a slice of
    // a larger buffer) is copied to a fresh, aligned allocation first.
    at::Tensor bias_buf;
    if (has_bias) bias_buf = cuda_utils::is_aligned(bias->const_data_ptr(), 16) ? *bias : bias->clone();
    g.bias = has_bias ? bias_buf.const_data_ptr() : nullptr;

    if (kind == Activation::kGeluTanh && input.scalar_type() != at::kFloat && out_features % kAuxLdMultiple == 0) {
      const at::Tensor aux = keep_pre ? pre : at::empty({rows, out_features}, input.options());
      if (cuda_utils::is_aligned(aux.const_data_ptr(), 16)) {
        LtGemm fused = g;
        fused.d = out.mutable_data_ptr();
        fused.ldd = out_features;
        fused.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        fused.aux = aux.mutable_data_ptr();
        fused.aux_ld = out_features;
        // Declined (e.g. no such kernel for this architecture / dtype): the unfused path below.
        if (run_lt_gemm(fused) == LtOutcome::kDone) return {out, kept(aux)};
      }
    }

    g.d = pre.mutable_data_ptr();
    g.ldd = out_features;
    g.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    lt_gemm_or(g, "forward", [&] {
      if (has_bias) {
        at::addmm_out(pre, *bias, input, weight.t());
      } else {
        at::mm_out(pre, input, weight.t());
      }
    });
  }

  dispatch_activation(kind, [&](auto kind_tag) { gelu_fwd_dispatch<decltype(kind_tag)::value>(pre, out, stream); });
  return {out, kept(pre)};
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        c10::string_view approximate) {
  return linear_gelu_fwd_impl(input, weight, bias, approximate, /*keep_pre=*/true);
}

at::Tensor linear_gelu_inference_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  return std::get<0>(linear_gelu_fwd_impl(input, weight, bias, approximate, /*keep_pre=*/false));
}

// grad_input = grad_pre @ weight and grad_weight = grad_pre^T @ input, each where output_mask asks for it
// (grad_pre [rows, out_features], input [rows, in_features], in_features > 0).
void input_weight_grads(const at::Tensor& grad_pre, const at::Tensor& input, const at::Tensor& weight,
                        std::array<bool, 3> output_mask, at::Tensor& grad_input, at::Tensor& grad_weight) {
  const int64_t rows = input.size(0), in_features = input.size(1), out_features = weight.size(0);
  const cudaDataType_t dtype = cuda_data_type(input.scalar_type());
  if (output_mask[0]) {
    LtGemm g;
    g.dtype = dtype;
    g.m = in_features;
    g.n = rows;
    g.k = out_features;
    g.a = weight.const_data_ptr();
    g.lda = in_features;
    g.b = grad_pre.const_data_ptr();
    g.ldb = out_features;
    g.d = grad_input.mutable_data_ptr();
    g.ldd = in_features;
    lt_gemm_or(g, "grad_input", [&] { at::mm_out(grad_input, grad_pre, weight); });
  }
  if (output_mask[1]) {
    LtGemm g;
    g.dtype = dtype;
    g.trans_b = CUBLAS_OP_T;
    g.m = in_features;
    g.n = out_features;
    g.k = rows;
    g.a = input.const_data_ptr();
    g.lda = in_features;
    g.b = grad_pre.const_data_ptr();
    g.ldb = out_features;
    g.d = grad_weight.mutable_data_ptr();
    g.ldd = in_features;
    lt_gemm_or(g, "grad_weight", [&] { at::mm_out(grad_weight, grad_pre.t(), input); });
  }
}

// grad_out_is_scratch (linear_gelu_bwd_scratch): grad_pre is written over grad_out, a temporary of the
// caller's (the FFN's hidden gradient), instead of into a [rows, out_features] buffer of its own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_impl(const at::Tensor& grad_out,
                                                                    const at::Tensor& input, const at::Tensor& weight,
                                                                    const at::Tensor& pre_activation,
                                                                    c10::string_view approximate,
                                                                    std::array<bool, 3> output_mask,
                                                                    bool grad_out_is_scratch) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  const std::pair<int64_t, int64_t> dims = check_rows_input(input, "input");
  const int64_t rows = dims.first;
  const int64_t in_features = dims.second;
  const int64_t out_features = check_weight(weight, input, in_features);
  check_rows_input(grad_out, "grad_out");
  TORCH_CHECK(grad_out.size(0) == rows && grad_out.size(1) == out_features, "grad_out must have shape [", rows, ", ",
              out_features, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "grad_out must have dtype ", input.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "grad_out must be on ", input.device(), ", got ",
              grad_out.device());
  check_same_as(pre_activation, "pre_activation", grad_out, "grad_out");
  const Activation kind = parse_activation(std::string_view(approximate.data(), approximate.size()));

  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  // Unselected outputs are distinct empty tensors: outputs of a non-aliasing schema must not share storage.
  at::Tensor grad_input = output_mask[0] ? at::empty({rows, in_features}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight = output_mask[1] ? at::empty({out_features, in_features}, opts) : at::empty({0}, opts);
  at::Tensor grad_bias = output_mask[2] ? at::empty({out_features}, opts) : at::empty({0}, opts);
  if (rows == 0 || out_features == 0) {
    // Sums over no rows (grad_weight, grad_bias) or over no output features (grad_input).
    if (output_mask[0]) grad_input.zero_();
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  // grad_pre is only an operand of the GEMMs (whose outputs are empty when in_features == 0); grad_bias
  // alone is reduced without storing it.
  const bool need_gemm = in_features > 0 && (output_mask[0] || output_mask[1]);
  if (!need_gemm && !output_mask[2]) return {grad_input, grad_weight, grad_bias};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_pre;
  if (need_gemm && grad_out_is_scratch) {
    // The GEMMs read input and weight after grad_pre is written over grad_out: memory shared with
    // either would give them gradient values (the CPU kernel's check_not_read_after, same message).
    const auto check_not_read_after = [&](const at::Tensor& read, const char* name) {
      TORCH_CHECK(!grad_out.is_alias_of(read), "grad_out is overwritten with the pre-activation's gradient here, so "
                  "it must not share memory with ", name, ", which is read afterwards");
    };
    check_not_read_after(input, "input");
    check_not_read_after(weight, "weight");
  }
  if (need_gemm) grad_pre = grad_out_is_scratch ? grad_out : at::empty({rows, out_features}, opts);
  AT_DISPATCH_V2(input.scalar_type(), "linear_gelu_bwd_cuda", AT_WRAP([&] {
    const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pre = pre_activation.const_data_ptr<scalar_t>();
    scalar_t* dpre = need_gemm ? grad_pre.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* db = output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    const auto float_options = opts.dtype(at::kFloat);
    dispatch_activation(kind, [&](auto kind_tag) {
      launch_gelu_bwd<scalar_t, decltype(kind_tag)::value>(dy, pre, dpre, db, rows, out_features, float_options,
                                                           stream);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);

  if (need_gemm) input_weight_grads(grad_pre, input, weight, output_mask, grad_input, grad_weight);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_cuda(const at::Tensor& grad_out,
                                                                    const at::Tensor& input, const at::Tensor& weight,
                                                                    const at::Tensor& pre_activation,
                                                                    c10::string_view approximate,
                                                                    std::array<bool, 3> output_mask) {
  return linear_gelu_bwd_impl(grad_out, input, weight, pre_activation, approximate, output_mask, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd_scratch_cuda(at::Tensor& grad_out,
                                                                            const at::Tensor& input,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& pre_activation,
                                                                            c10::string_view approximate,
                                                                            std::array<bool, 3> output_mask) {
  auto grads = linear_gelu_bwd_impl(grad_out, input, weight, pre_activation, approximate, output_mask, true);
  mark_written(grad_out);
  return grads;
}

}  // namespace

std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor>> linear_gelu_bwd_from_next_cuda(
    const at::Tensor& grad_next, const at::Tensor& w_next, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& pre_activation, c10::string_view approximate, std::array<bool, 3> output_mask) {
  if (input.dim() != 2 || weight.dim() != 2) return std::nullopt;
  const int64_t rows = input.size(0), in_features = input.size(1), hidden = weight.size(0);
  const bool half = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  // Anything but what ffn_fwd's outputs and weights give goes to the other path, whose checks name it.
  bool operands_fit = input.is_cuda() && input.dim() == 2 && weight.dim() == 2 && weight.size(1) == in_features &&
                      grad_next.dim() == 2 && grad_next.size(0) == rows && w_next.dim() == 2 &&
                      w_next.size(0) == grad_next.size(1) && w_next.size(1) == hidden &&
                      pre_activation.sizes() == at::IntArrayRef({rows, hidden});
  for (const at::Tensor* t : {&grad_next, &w_next, &input, &weight, &pre_activation}) {
    operands_fit = operands_fit && t->is_contiguous() && t->scalar_type() == input.scalar_type() &&
                   t->device() == input.device();
  }
  if (std::string_view(approximate.data(), approximate.size()) != "tanh" || !half || !operands_fit ||
      hidden % kAuxLdMultiple != 0 || rows == 0 || hidden == 0 || in_features == 0 || grad_next.size(1) == 0 ||
      !cuda_utils::is_aligned(pre_activation.const_data_ptr(), 16)) {
    return std::nullopt;
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  at::Tensor grad_pre = at::empty({rows, hidden}, opts);
  at::Tensor grad_bias = output_mask[2] ? at::empty({hidden}, opts) : at::empty({0}, opts);
  // grad_pre^T [hidden x rows] = dgelu(w_next^T [hidden x model] * grad_next^T [model x rows], pre^T), in
  // the column-major view of the row-major tensors (see Layout); the bias gradient runs along m = hidden.
  LtGemm g;
  g.dtype = cuda_data_type(input.scalar_type());
  g.m = hidden;
  g.n = rows;
  g.k = grad_next.size(1);
  g.a = w_next.const_data_ptr();
  g.lda = hidden;
  g.b = grad_next.const_data_ptr();
  g.ldb = grad_next.size(1);
  g.d = grad_pre.mutable_data_ptr();
  g.ldd = hidden;
  g.epilogue = output_mask[2] ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
  g.bias_grad = output_mask[2] ? grad_bias.mutable_data_ptr() : nullptr;
  g.aux = const_cast<void*>(pre_activation.const_data_ptr());  // read, not written, by the DGELU epilogues
  g.aux_ld = hidden;
  const LtOutcome outcome = run_lt_gemm(g);
  if (outcome == LtOutcome::kUnexpected) {
    TORCH_WARN_ONCE("fused_attn ffn: cuBLASLt rejected the DGELU epilogue GEMM descriptors (m=", g.m, ", n=", g.n,
                    ", k=", g.k, "); the backward applies gelu' in a pass of its own instead");
  }
  if (outcome != LtOutcome::kDone) return std::nullopt;
  at::Tensor grad_input = output_mask[0] ? at::empty({rows, in_features}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight = output_mask[1] ? at::empty({hidden, in_features}, opts) : at::empty({0}, opts);
  input_weight_grads(grad_pre, input, weight, output_mask, grad_input, grad_weight);
  return std::make_tuple(grad_input, grad_weight, grad_bias);
}

void ffn_dropout_cuda(const at::Tensor& src, const at::Tensor& dst, const std::optional<at::Tensor>& seed,
                      double dropout_p) {
  TORCH_INTERNAL_ASSERT(src.is_contiguous() && dst.is_contiguous() && src.sizes() == dst.sizes() &&
                        src.scalar_type() == dst.scalar_type());
  const cuda_utils::DropoutSeed key = cuda_utils::kernel_seed(seed, src, "fused_attn::ffn");
  const int64_t n = src.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float p = static_cast<float>(dropout_p);
  AT_DISPATCH_V2(src.scalar_type(), "ffn_dropout_cuda", AT_WRAP([&] {
    ffn_dropout_kernel<scalar_t><<<grid_size(ceil_div(ceil_div(n, kDropRun), kEltThreads)), kEltThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), n, key, p, philox::keep_divisor(p));
  }), at::kFloat, at::kHalf, at::kBFloat16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("linear_gelu_fwd", &fused_attn::linear_gelu_fwd_cuda);
  m.impl("linear_gelu_inference", &fused_attn::linear_gelu_inference_cuda);
  m.impl("linear_gelu_bwd", &fused_attn::linear_gelu_bwd_cuda);
  m.impl("linear_gelu_bwd_scratch", &fused_attn::linear_gelu_bwd_scratch_cuda);
}
