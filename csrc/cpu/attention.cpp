// CPU kernels of fused_attn::attention_fwd / attention_bwd and softmax_fwd / softmax_bwd (schemas
// and shared conventions in csrc/ops.cpp; the Triton kernels in fused_attn/kernels/triton are the
// semantic twins of these).
//
// Attention forward is FlashAttention-2 on the CPU. A task owns one (batch*head, block of queries)
// and streams the keys a block at a time: S = scale * Q_blk K_blk^T, the mask applied in place (a
// boolean mask sets -inf, a floating one is added; both read through their strides, so a
// [B, 1, 1, Lk] padding mask is never expanded), then an online softmax in float32 (running row
// max m and row sum l, the accumulator rescaled by exp(m_old - m_new) when the max grows) and
// acc += P V_blk. Nothing of size Lq x Lk exists: the extra memory is one set of tile buffers per
// thread (the scores tile, float32 copies of the Q/K/V blocks where needed, the accumulator), i.e.
// O(threads x block), however long the sequences. Causal attention (top-left: query i sees keys
// j <= i) ends a task's key loop at its last query, so tiles above the diagonal are never
// computed; only the tiles that straddle it are masked. Likewise a task walks only the keys a
// boolean mask lets some query of its block see (KeySpans: a padded tail is never computed). A
// row that sees no key has l == 0: its output is 0 and its log-sum-exp +inf, so every
// probability the backward recomputes is exactly 0 (zero gradients, no NaN).
//
// Arithmetic is in natural-log units (the Triton kernels fold log2(e) into the scale; the same
// in exact arithmetic): scores are rounded once as s = scale * q.k (+ mask), and the exponential
// sees s - max (or s - lse), whose rounding error is small exactly where the probabilities are
// large. exp is inlined Vectorized<float> code (about 1.5 ulp; exactly 0 for -inf); where P is
// rounded to 16 bits next (the products on the tile unit) a shorter polynomial (2.9e-6 relative),
// with the scale applied in the same pass where a tile has nothing to mask, and in the forward in
// a single pass that also rounds (exp_to, online_softmax_16): with the products on the tile unit,
// the exponentials are the forward's largest cost.
//
// The GEMM-shaped products (Q K^T, P V; in the backward also dO V^T, P^T dO, dS^T Q, dS K) go
// to the BLAS sgemm that libtorch_cpu links (MKL in the official wheels; LP64 Fortran ABI),
// declared weak and resolved at load time. torch's headers expose no raw-pointer GEMM
// (at::native::cpublas::gemm's float overload is not exported and its stub is the naive
// fallback); at::addmm_out on from_blob views is the fallback when sgemm_ is absent, 3-7%
// slower at these tile sizes (measured on 2 cores at head dim 64). Inside at::parallel_for MKL
// runs single-threaded per call. float32 inputs with a BLAS-compatible row stride are handed to
// sgemm in place; fp16/bf16 blocks are widened into per-thread float32 buffers once per block,
// so all arithmetic and accumulation is float32 and every output is rounded once. Except in the
// forward on CPUs whose tile unit multiplies the 16-bit dtype (AMX: bfloat16 on AMX-BF16, float16
// on AMX-FP16): there its two products run on the 16-bit values through oneDNN's brgemm
// micro-kernels (torch's cpublas::brgemm, K and V packed for them), float32 accumulated, P
// rounded to the input dtype for P V as in eager attention (see native_products); in the backward
// all five do (BwdNative): S = Q K^T and dP = dO V^T on the inputs, and dV, dK, dQ with P and dS
// (formed in float32) rounded to the dtype, as eager attention's backward rounds them (Bwd16Buffers).
// A forward of at most four queries a sequence (kFewQueries: a decoding step against a cache of
// keys) takes neither GEMM: its products run row by row on the K and V rows as they are, widened
// in registers (few_query_scores, few_query_values) or, bfloat16 on AVX512-BF16, multiplied in
// pairs as they are with P rounded to bfloat16 for P V (few_query_scores_bf16,
// few_query_values_bf16), for every dtype; a grouped-query group's heads (or a part of the group,
// where its key/value heads are fewer than the threads) share a task, which reads each key and
// value row from memory once for them all.
//
// Parallelism: tasks are handed out from an atomic counter to at::parallel_for workers, each
// with its own scratch, and no two tasks write the same output element, so the results are
// race-free and do not depend on scheduling. Causal tasks run longest first, which keeps the
// threads busy even with a single head.
//
// Backward. P is recomputed from the saved log-sum-exp, but the float32 lse is off by up to half
// an ulp of |lse| (a common relative error of a whole row of P, 5e-7 at |lse| ~ 8), and
// dS = P (dP - delta) amplifies it, and any mismatch between delta and the dP actually used, by
// |dP|. So the row statistics come from the very S and dP the gradients use: corr = 1 /
// sum_j exp(s_ij - lse_i) and delta = sum_j P_ij dP_ij with the normalised P = exp(s - lse) * corr
// (in exact arithmetic corr = 1 and delta = rowsum(dO * O), times 1 - p with dropout, whose
// 1 / (1 - p) the backward applies at its stores: see "Dropout"). dS then cancels as in the plain
// softmax backward, and the gradients stay within the error of the plain implementation
// (rowsum(dO * O) with the raw P was up to 4x worse on the mask gradient, and a float64 lse with
// rowsum(dO * O) still 9x on a mask gradient that is exactly 0, e.g. a single key). Either
//  * one task per head, when there are enough heads for the threads: query blocks of 64 rows,
//    each against all the keys it sees at once (S and dP [64, k_len] in the task's scratch), so
//    the statistics are two row sums over tiles already formed, then dS, dQ of the block
//    (complete, written out), and dK += dS^T Q, dV += P^T dO into float32 [k_len, head_dim]
//    accumulators (the outputs themselves for float32; [head_dim, k_len] where the products run
//    on the tile unit, Bwd16Buffers); five GEMMs per tile, statistics included,
//    each as wide as the key range; scratch O(64 x k_len + k_len x head_dim) per thread; or
//  * as the Triton kernels, when the heads are too few: a statistics pass per (head, query
//    block) (two GEMMs per tile), one task per (head, key block) accumulating dK, dV over the
//    query blocks (from the diagonal on, when causal), then one per (head, query block)
//    accumulating dQ over the key blocks: nine GEMMs per tile but all the parallelism of the
//    blocks, and every accumulator one block.
// Both are deterministic. grad_scores (a floating mask that requires grad) is written by the
// task that forms dS, zeros where causality skipped a tile.
//
// Grouped-query attention (key/value with fewer heads than query, a divisor of its heads): query
// head h reads key/value head h / (heads / kv_heads) in place, nothing is repeated in memory. The
// backward's dK/dV tasks own a key/value head and walk the query heads of its group, summing
// their contributions in the float32 accumulators (rounded once). With fewer key/value heads than
// threads a group is split into chunks of query heads, one task each, whose float32 sums go to
// slots of their own that a last pass adds in a fixed order (GroupSplit): deterministic, and no
// thread idles for want of key/value heads.
//
// Dropout regenerates the shared Philox stream (fused_attn/philox.h; the Triton kernels draw the
// same bits): element (bh, i, j) is element (bh * Lq + i) * Lk + j of the stream, four elements
// per Philox counter, drawn a chunk of a row at a time (philox::uniforms). The forward's row sum l
// takes the undropped P; P V takes P * keep, and 1 / (1 - p) joins 1 / l where the output is
// rounded (as the CUDA kernels do): a kept probability times 1 / (1 - p) can lie beyond float16's
// range (p > 1 - 2^-16) where the output does not, and the tile unit's P V takes P rounded to the
// input dtype. Likewise in the backward: dV = (P * keep)^T dO / (1 - p) and, with dP dropped as
// dP * keep, dS = P (dP - delta) / (1 - p), whose 1 / (1 - p) joins the scale where dQ and dK are
// rounded (first 1 / (1 - p), then the scale: their product may overflow where neither does, and
// a zero gradient would become NaN), and is applied where dV and a mask's gradient are written: dS
// itself can lie beyond float16's range where they do not, and is rounded for the tile unit too.
//
// Softmax: rows are independent, split across threads with at::parallel_for. A row is read once
// (any strides; scale, mask and causality applied on the way) into a float32 row buffer (the
// output row itself for float32), then max, exp-and-sum and normalise run on that buffer while it
// sits in L1/L2. The backward is dx = scale * y * (dy - sum(y * dy) / sum(y)) per row, two passes
// (the row term over the saved probabilities' own sum: softmax_row_term).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "fused_attn/checks.h"
#include "fused_attn/cpu_rows.h"
#include "fused_attn/cpu_tiles.h"
#include "fused_attn/layout.h"
#include "fused_attn/philox.h"

#ifndef FUSED_ATTN_NO_SGEMM
// Fortran BLAS single-precision GEMM (LP64: 32-bit integers), column-major. Weak, so that a
// libtorch built without BLAS still loads this library (the pointer is then null).
// -DFUSED_ATTN_NO_SGEMM compiles the at::addmm_out fallback alone (to test or measure it).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
#endif

namespace fused_attn {
namespace {

using cpu_rows::fVec;
using cpu_rows::kLanes;
using cpu_rows::WideDot;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Vector helpers

// exp(x) in float32 for x <= 0 (callers pass x = s - max or s - lse): 2^t with t = x log2(e),
// split as t = n + f, |f| <= 1/2, 2^f by a degree-6 minimax polynomial (relative error 2e-9
// before rounding; the result is within about 1.5 ulp), 2^n put into the exponent bits. t is
// clamped to [-127, 127]; at t = -127 the exponent bits are 0, so everything below (-inf
// included) comes out exactly 0, which the masking relies on, with no compare or blend. The
// rounding of x * log2(e) costs |x| * 2^-24 relative, at most 0.4 ulp of the largest results
// (those with |x| <= 1); large |x| give tiny results.
// exp_vec<true> is for values rounded to 16 bits next (P of the tiles on the tile unit: exp_to,
// probabilities<true>): degree 4 (relative error 2.9e-6 before rounding: 1/700 of bfloat16's half
// ulp, 1/170 of float16's), and t clamped from below only (its callers' x is <= 0).
// With AVX-512 both split t = floor(t) + f instead, f in [0, 1) in one instruction (vreduceps),
// 2^f by polynomials for that interval (degree 6, relative error 1.9e-9 before rounding, 1.04 ulp
// evaluated in float32; exp_vec<true> degree 4, 2.6e-6) and the power of two applied by vscalefps,
// which needs no exponent bits formed: a fifth fewer instructions. t is clamped at -126 and the
// lanes below it (-inf included) are zeroed by the write mask of vscalefps: results below 2^-126
// are 0, as in the portable form. Letting vscalefps underflow instead (t clamped at -160, or
// subnormal results) costs a microcode assist per lane, as any float result below the normal range
// does while flush-to-zero is off (torch's default): with the masked half of every causal
// diagonal tile underflowing, the bfloat16 causal forward took 2.5x its unmasked time.
template <bool kFor16Bit = false>
C10_ALWAYS_INLINE fVec exp_vec(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // vmaxps returns its second operand where either is NaN: a NaN stays NaN throughout (and the
  // compare, unordered-true, keeps its lane).
  const __m512 scaled = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 lowest = _mm512_set1_ps(-126.f);
  const __m512 t = _mm512_max_ps(lowest, scaled);
  const __mmask16 normal = _mm512_cmp_ps_mask(scaled, lowest, _CMP_NLT_UQ);
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF);  // t - floor(t)
  __m512 p;
  if constexpr (kFor16Bit) {
    p = _mm512_set1_ps(1.3534164987504482e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.201147124171257e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.414427548646927e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.930038332939148e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000026226043701f));
  } else {
    p = _mm512_set1_ps(2.1702254889532924e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.2439688434824347e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.678840637207031e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5483341217041016e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022983014583588e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  }
  return fVec(_mm512_maskz_scalef_ps(normal, p, t));  // p * 2^floor(t), 0 where t < -126
#else
  // On AVX2 clamp keeps a NaN (vmaxps/vminps return their second operand, t, for a NaN).
  const fVec scaled = x * fVec(1.44269504088896341f);
  const fVec t = kFor16Bit ? at::vec::clamp_min(scaled, fVec(-127.f))
                           : at::vec::clamp(scaled, fVec(-127.f), fVec(127.f));
  const fVec n = t.round();
  const fVec f = t - n;
  fVec p;
  if constexpr (kFor16Bit) {
    p = fVec(9.582847356796265e-3f);
    p = at::vec::fmadd(p, f, fVec(5.590643733739853e-2f));
    p = at::vec::fmadd(p, f, fVec(2.4024099111557007e-1f));
    p = at::vec::fmadd(p, f, fVec(6.931241750717163e-1f));
  } else {
    p = fVec(1.5337791410274804e-4f);
    p = at::vec::fmadd(p, f, fVec(1.3399862218648195e-3f));
    p = at::vec::fmadd(p, f, fVec(9.618518874049187e-3f));
    p = at::vec::fmadd(p, f, fVec(5.550329014658928e-2f));
    p = at::vec::fmadd(p, f, fVec(2.4022646248340607e-1f));
    p = at::vec::fmadd(p, f, fVec(6.931471824645996e-1f));
  }
  p = at::vec::fmadd(p, f, fVec(1.f));
  // 2^n as bits, (n + 127) << 23, formed in float (exact: an integer below 2^31) then converted.
  const fVec bits = at::vec::fmadd(n, fVec(8388608.f), fVec(1065353216.f));
  return p * at::vec::cast<float>(at::vec::convert_to_int_of_same_size(bits));
#endif
}

// Loads n (may exceed a vector or be <= 0) floats; the lanes past n hold `fill`.
C10_ALWAYS_INLINE fVec load_or(const float* src, int64_t n, float fill) {
  if (n >= kLanes) return fVec::loadu(src);
  return fVec::set(fVec(fill), fVec::loadu(src, std::max<int64_t>(n, 0)), std::max<int64_t>(n, 0));
}

float reduce_max(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
}

float reduce_sum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v);
}

// The largest of s[0, n). A NaN among them need not come out (the vector max keeps its second
// operand where either is NaN, without the compare that would carry it): the callers' exponentials
// spread it (exp(NaN) is NaN, and with it the row sum and every output of the row).
float row_max(const float* s, int64_t n) {
  fVec m0(-kInf), m1(-kInf);
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    m0 = at::vec::clamp_min(fVec::loadu(s + j), m0);
    m1 = at::vec::clamp_min(fVec::loadu(s + j + kLanes), m1);
  }
  for (; j < n; j += kLanes) m0 = at::vec::maximum(m0, load_or(s + j, n - j, -kInf));
  return reduce_max(at::vec::maximum(m0, m1));
}

// Row sums (the softmax normaliser, the backward's sum dy * y) are float vector sums over segments
// of cpu_rows::kSegment elements folded into a double: in float alone the error of a 2^20-long
// softmax row grows to several times torch's. An attention tile (at most 256 keys) is one segment.
using cpu_rows::kSegment;

// s[j] = exp(s[j] - shift) in place; returns the sum. -inf entries become exactly 0.
float exp_shift_sum(float* s, int64_t n, float shift) {
  const fVec sh(shift);
  double total = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSegment) {
    const int64_t end = std::min(n, j0 + kSegment);
    fVec acc(0.f);
    int64_t j = j0;
    for (; j + kLanes <= end; j += kLanes) {
      const fVec p = exp_vec(fVec::loadu(s + j) - sh);
      p.store(s + j);
      acc += p;
    }
    if (j < end) {
      const fVec p = exp_vec(load_or(s + j, end - j, -kInf) - sh);  // padding lanes give exp(-inf) = 0
      p.store(s + j, end - j);
      acc += p;
    }
    total += reduce_sum(acc);
  }
  return static_cast<float>(total);
}

void scale_row(float* x, int64_t n, float factor) {
  const fVec f(factor);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) (fVec::loadu(x + j) * f).store(x + j);
  if (j < n) (fVec::loadu(x + j, n - j) * f).store(x + j, n - j);
}

// dst[0, n) = src as float32.
template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n > 0) std::memcpy(dst, src, n * sizeof(float));
  } else {
    constexpr int P = cpu_rows::kParts<T>;
    cpu_rows::for_each_block<cpu_rows::kBlock<T>>(n, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
      fVec v[P];
      cpu_rows::load_block<P>(src + j, len, v);
      cpu_rows::store_block<P>(dst + j, len, v);
    });
  }
}

// dst[0, n) = src * factor (then times `then`: the two one after the other, whose product may
// overflow where each is finite), rounded to T once.
template <typename T>
void from_float(const float* src, float factor, T* dst, int64_t n, float then = 1.f) {
  constexpr int P = cpu_rows::kParts<T>;
  const fVec f(factor), g(then);
  const bool twice = then != 1.f;
  cpu_rows::for_each_block<cpu_rows::kBlock<T>>(n, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
    fVec v[P];
    cpu_rows::load_block<P>(src + j, len, v);
    for (auto& x : v) x = twice ? x * f * g : x * f;
    cpu_rows::store_block<P>(dst + j, len, v);
  });
}

// One block of exp_to: v = exp(f * s - sh) over the block's len elements (lanes past them read
// -inf, so 0), added into acc. f * s is rounded before the shift is subtracted, as a scaled score
// is: the shift is the largest of them, so every difference is <= 0 (one FMA would leave the
// product's rounding error in it, as large as 2^-24 |f s|: past |f s| ~ 1e8 no longer small).
template <int P>
C10_ALWAYS_INLINE void exp_block(const float* s, int64_t len, const fVec& f, const fVec& sh, fVec (&v)[P],
                                 fVec (&acc)[P]) {
  for (int k = 0; k < P; ++k) {
    v[k] = exp_vec<true>(cpu_rows::rounded_product(load_or(s + k * kLanes, len - k * kLanes, -kInf), f) - sh);
    acc[k] += v[k];
  }
}

template <int P>
float sum_of(const fVec (&acc)[P]) {
  fVec total = acc[0];
  for (int k = 1; k < P; ++k) total += acc[k];
  return reduce_sum(total);
}

// v *= drop over the block's len elements (dropout's factors, keep ? 1 : 0), where
// drop is not null.
template <int P>
C10_ALWAYS_INLINE void drop_block(const float* drop, int64_t len, fVec (&v)[P]) {
  if (drop == nullptr) return;
  for (int k = 0; k < P; ++k) v[k] = v[k] * load_or(drop + k * kLanes, len - k * kLanes, 0.f);
}

#if defined(CPU_CAPABILITY_AVX512)
// The write mask of a vector's first n lanes (n may exceed 32 or be <= 0): 32 bits for 16-bit
// lanes, its low 16 (a __mmask16) for 32-bit ones.
C10_ALWAYS_INLINE __mmask32 first_lanes(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : (__mmask32(1) << n) - 1;
}

// exp_to and round_row for bfloat16 with AVX512-BF16's conversion, which rounds 32 floats to
// bfloat16 in one instruction where at::vec's portable rounding takes a dozen (and was a third of
// exp_to's time). Every CPU whose tile unit multiplies bfloat16 (AMX-BF16, the callers' condition)
// has it; checked anyway (has_avx512_bf16). It rounds to nearest even as at::vec does, but flushes
// results below bfloat16's smallest normal (1.2e-38) to zero: no probability that can matter.
bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// dst[0, len) = lo, hi (16 values each) rounded to bfloat16; len <= 32.
__attribute__((target("avx512bf16"))) C10_ALWAYS_INLINE void store_bf16(c10::BFloat16* dst, int64_t len,
                                                                         const fVec& lo, const fVec& hi) {
  const __m512i bits = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  _mm512_mask_storeu_epi16(dst, first_lanes(len), bits);
}

__attribute__((target("avx512bf16"))) float exp_to_bf16(const float* s, int64_t n, float factor, float shift,
                                                         const float* drop, c10::BFloat16* p, int64_t padded) {
  constexpr int P = 2;
  const fVec f(factor), sh(shift);
  fVec acc[P] = {fVec(0.f), fVec(0.f)};
  for (int64_t j = 0; j < n; j += P * kLanes) {  // (a lambda would not take the function's target)
    const int64_t len = std::min<int64_t>(P * kLanes, n - j);
    fVec v[P];
    exp_block<P>(s + j, len, f, sh, v, acc);
    drop_block<P>(drop == nullptr ? nullptr : drop + j, len, v);
    store_bf16(p + j, len, v[0], v[1]);
  }
  if (padded > n) std::fill(p + n, p + padded, c10::BFloat16(0.f));
  return sum_of<P>(acc);
}

// round_row's form for bfloat16.
__attribute__((target("avx512bf16"))) void round_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t j = 0; j < n; j += 2 * kLanes) {
    const int64_t len = std::min<int64_t>(2 * kLanes, n - j);
    store_bf16(dst + j, len, fVec::loadu(src + j, std::clamp<int64_t>(len, 0, kLanes)),
               fVec::loadu(src + j + kLanes, std::clamp<int64_t>(len - kLanes, 0, kLanes)));
  }
}
#endif

// p[0, n) = exp(factor * s - shift), times drop[0, n) where not null, rounded to T once, zero on
// [n, padded); returns the sum of the undropped unrounded values. One pass: the 16-bit forward's
// scaling (factor = scale where the scores are raw), exponentials, dropout and rounding (see
// online_softmax_16).
template <typename T>
float exp_to(const float* s, int64_t n, float factor, float shift, const float* drop, T* p, int64_t padded) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16()) return exp_to_bf16(s, n, factor, shift, drop, p, padded);
  }
#endif
  constexpr int P = cpu_rows::kParts<T>;
  const fVec f(factor), sh(shift);
  fVec acc[P];
  for (auto& a : acc) a = fVec(0.f);
  cpu_rows::for_each_block<cpu_rows::kBlock<T>>(n, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
    fVec v[P];
    exp_block<P>(s + j, len, f, sh, v, acc);
    drop_block<P>(drop == nullptr ? nullptr : drop + j, len, v);
    cpu_rows::store_block<P>(p + j, len, v);
  });
  if (padded > n) std::fill(p + n, p + padded, T(0));
  return sum_of<P>(acc);
}

// dst[0, n) = src rounded to T once (the backward's P and dS for the tile unit: round_tile).
template <typename T>
void round_row(const float* src, int64_t n, T* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16()) return round_bf16(src, n, dst);
  }
#endif
  from_float(src, 1.f, dst, n);
}

// ---------------------------------------------------------------------------------------------
// GEMM on row-major float32 matrices: C[m, n] = alpha * op(A) op(B) + beta * C, where op(A) is
// m x k (A stored k x m when trans_a) and op(B) is k x n (B stored n x k when trans_b).

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) {
      if (beta == 0.f) {
        std::fill(c + i * ldc, c + i * ldc + n, 0.f);
      } else {
        scale_row(c + i * ldc, n, beta);
      }
    }
    return;
  }
#ifndef FUSED_ATTN_NO_SGEMM
  if (sgemm_ != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda), ildc = static_cast<int>(ldc);
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
    return;
  }
#endif
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor ta = trans_a ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                          : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor tb = trans_b ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(tc, tc, ta, tb, beta, alpha);
}

// Largest value the BLAS integer arguments take.
constexpr int64_t kBlasMax = std::numeric_limits<int>::max();

// Rows [r0, r0 + n) of a row-major [rows, cols] matrix (row stride `stride`, unit column stride)
// as float32: the tensor's own memory when it is float32 with a stride BLAS accepts as a leading
// dimension, else widened/copied into `buf` (leading dimension cols). Returns (pointer, ld).
template <typename T>
std::pair<const float*, int64_t> rows_as_float(const T* base, int64_t stride, int64_t r0, int64_t n, int64_t cols,
                                               float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride >= std::max<int64_t>(cols, 1) && stride <= kBlasMax) return {base + r0 * stride, stride};
  }
  for (int64_t r = 0; r < n; ++r) to_float(base + (r0 + r) * stride, buf + r * cols, cols);
  return {buf, std::max<int64_t>(cols, 1)};
}

// ---------------------------------------------------------------------------------------------
// 16-bit products on the CPU's tile unit. Where oneDNN's brgemm micro-kernels take T packed for
// the tile unit (AMX: cpublas::could_pack(T), bfloat16 on AMX-BF16 CPUs, float16 on AMX-FP16
// ones), the forward's products run on T itself with float32 accumulation instead of on widened
// float32 copies: S = Q K^T on the inputs as they are (each product exact in float32, as in the
// widened sgemm; then scaled, a second rounding where sgemm's alpha folds the scale in), and P V
// with P rounded to T, as eager attention, SDPA and the GPU kernels do (the row sum l takes the
// unrounded P). cpublas::brgemm is C[M, N] (+)= A[M, K] B[K, N], all row-major, B packed: K and
// V are packed by key chunk (pack_key_chunk), kTileKeys keys x kTileCols columns a chunk, the
// largest B the packing takes (64 columns), K as K^T chunks [head_dim, 64 keys] and V as chunks
// [64 keys, 64 features], zero-filled past the last key and feature, so every product of P V is
// a whole chunk (K = 64, P's columns past the tile's keys zero) and only the scores' last chunk
// is narrower. The forward packs K and V once for the tasks that read them: where a head's keys
// are read once, each task packs its tiles just before their products (attn_fwd_task_native);
// where they are read again (query blocks, a group's query heads), a task per key/value head packs
// its head into its scratch and walks all of its blocks, or, with too few heads to share out
// among the threads, the call packs all of K and V first (pack_keys); the backward's per-head
// tasks each pack their own head into their scratch (attn_bwd_head_task: no packed copy of the
// whole of K and V; a group of query heads split across tasks, GroupSplit, packs its key/value
// head once per task), its per-block passes the whole call's. Nothing of size Lq x Lk exists.
constexpr int64_t kTileKeys = 64, kTileCols = 64;

// Whether attention on T (head dim d) multiplies T natively (see above; the tile unit's pairs of
// values need an even head dim).
bool native_products(at::ScalarType type, int64_t d) { return d % 2 == 0 && cpu_tile_products(type); }

// K and V of every (batch, key/value head) packed for brgemm (pack_keys): key chunk c of head
// bkv is k_packed + (bkv * chunks + c) * k_chunk (K^T, head_dim x 64). For the forward's P V,
// feature chunk f of key chunk c of its V is v_packed + ((bkv * v_cols + f) * chunks + c) * v_chunk
// (64 x 64): a feature column's chunks are consecutive, and the packed (VNNI) layout of 64-row
// blocks laid end to end is that of their rows together, so a run of chunks is one operand of
// brgemm, K = its keys (attn_fwd_task_native, tile_dq_16). For the backward's dO V^T, its V^T is
// v_packed + (bkv * chunks + c) * v_chunk (value head dim x 64, v_cols 1), and for its dQ = dS K,
// K's rows are packed as the forward's V is: kr_packed + ((bkv * kr_cols + f) * chunks + c) *
// kTileKeys * kTileCols. A copy may hold the heads [first, first + heads) alone (bkv counted from
// first), and of their keys the chunks [chunk0, chunk0 + chunks): the backward's per-head tasks
// and the forward's per-key/value-head tasks pack their own head into their scratch
// (attn_bwd_head_task, attention_fwd_cpu), and a forward whose packed chunks would each be read
// once packs a tile at a time in its tasks (attn_fwd_task_native), so that no packed copy of the
// whole of K and V exists there.
template <typename T>
struct PackedKV {
  at::Tensor storage;
  T* k_packed = nullptr;
  T* v_packed = nullptr;
  T* kr_packed = nullptr;
  int64_t chunks = 0, v_cols = 0, k_chunk = 0, v_chunk = 0, kr_cols = 0;
  int64_t first = 0, heads = 0;
  // The first key chunk held (a copy of one tile's chunks: attn_fwd_task_native's own packing).
  int64_t chunk0 = 0;

  // The layout for `heads` heads from `first` (no storage yet: place() sets the pointers).
  PackedKV(int64_t k_len, int64_t d, int64_t dv, bool backward, int64_t first_head, int64_t num_heads)
      : chunks((k_len + kTileKeys - 1) / kTileKeys),
        v_cols(backward ? 1 : (dv + kTileCols - 1) / kTileCols),
        k_chunk(d * kTileKeys),
        v_chunk(backward ? dv * kTileKeys : kTileKeys * kTileCols),
        kr_cols(backward ? (d + kTileCols - 1) / kTileCols : 0),
        first(first_head),
        heads(num_heads) {}
  PackedKV() = default;
  // Elements of T that the packed heads take.
  int64_t elements() const { return heads * chunks * (k_chunk + v_cols * v_chunk + kr_cols * kTileKeys * kTileCols); }
  // The packed K^T, V (V^T) and K rows laid out from `out` on (elements() of T).
  void place(T* out) {
    k_packed = out;
    v_packed = out + heads * chunks * k_chunk;
    kr_packed = v_packed + heads * chunks * v_cols * v_chunk;
  }

  T* k(int64_t bkv, int64_t c) const { return k_packed + ((bkv - first) * chunks + c - chunk0) * k_chunk; }
  T* v(int64_t bkv, int64_t c, int64_t f) const {
    return v_packed + (((bkv - first) * v_cols + f) * chunks + c - chunk0) * v_chunk;
  }
  T* kr(int64_t bkv, int64_t c, int64_t f) const {
    return kr_packed + (((bkv - first) * kr_cols + f) * chunks + c - chunk0) * kTileKeys * kTileCols;
  }
};

// C[m, n] (+)= A[m, k] B (B one packed chunk, leading dimension kTileCols), float32 C.
template <typename T>
void brgemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, bool add, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, kTileCols, ldc, add, a, b, c, /*is_vnni=*/true);
}

// C[m, nk] = A[m, k] B^T for the keys of one tile, B^T's columns packed kTileKeys keys a chunk:
// chunk(c) holds the tile's keys [c * kTileKeys, ...), the last chunk's columns cut at nk.
template <typename T, typename Chunk>
void products_by_key_chunk(int64_t m, int64_t nk, int64_t k, const T* a, int64_t lda, const Chunk& chunk, float* c,
                           int64_t ldc) {
  for (int64_t c0 = 0; c0 < nk; c0 += kTileKeys) {
    brgemm(m, std::min(kTileKeys, nk - c0), k, a, lda, chunk(c0 / kTileKeys), false, c + c0, ldc);
  }
}

// The leading dimension with which brgemm reads the rows [i, i + rows) of a [len, cols] operand in
// place (row stride `stride`): any for a single row, else the stride; 0 where rows overlap (a
// stride below cols: not read in place).
int64_t in_place_ld(int64_t len, int64_t stride, int64_t cols) {
  const int64_t ld = len > 1 ? stride : cols;
  return ld >= cols ? ld : 0;
}

// ---------------------------------------------------------------------------------------------
// Masks

enum class MaskKind { kNone, kBool, kFloat, kHalf, kBFloat16, kDouble };

// A mask expanded (as a view) to [B, H, M, N]: strides in elements, zero on broadcast dims.
struct MaskView {
  const char* data = nullptr;
  MaskKind kind = MaskKind::kNone;
  int64_t elem = 1;
  int64_t sb = 0, sh = 0, sm = 0, sn = 0;

  const char* row(int64_t b, int64_t h, int64_t i) const { return data + (b * sb + h * sh + i * sm) * elem; }
};

// The mask dtypes the kernels read (MaskKind).
bool is_mask_dtype(at::ScalarType t) {
  return t == at::kBool || t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

MaskView make_mask_view(const std::optional<at::Tensor>& mask) {
  MaskView view;
  if (!mask.has_value() || !mask->defined()) return view;
  const at::Tensor& t = *mask;
  switch (t.scalar_type()) {
    case at::kBool: view.kind = MaskKind::kBool; break;
    case at::kFloat: view.kind = MaskKind::kFloat; break;
    case at::kHalf: view.kind = MaskKind::kHalf; break;
    case at::kBFloat16: view.kind = MaskKind::kBFloat16; break;
    case at::kDouble: view.kind = MaskKind::kDouble; break;
    default: TORCH_CHECK(false, "mask must be bool or floating, got ", t.scalar_type());
  }
  view.data = static_cast<const char*>(t.const_data_ptr());
  view.elem = t.element_size();
  view.sb = t.stride(0);
  view.sh = t.stride(1);
  view.sm = t.stride(2);
  view.sn = t.stride(3);
  return view;
}

template <typename T>
void add_bias(float* s, const T* m, int64_t stride, int64_t n) {
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) (fVec::loadu(s + j) + fVec::loadu(m + j)).store(s + j);
      if (j < n) (fVec::loadu(s + j, n - j) + fVec::loadu(m + j, n - j)).store(s + j, n - j);
    } else if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
      float tmp[2 * kLanes];
      for (int64_t j = 0; j < n; j += 2 * kLanes) {
        const int64_t len = std::min(2 * kLanes, n - j);
        to_float(m + j, tmp, len);
        for (int64_t t = 0; t < len; ++t) s[j + t] += tmp[t];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(m[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] += static_cast<float>(m[j * stride]);
  }
}

// Applies columns [j0, j0 + n) of one mask row to the scores s[0, n).
void apply_mask(float* s, int64_t n, const MaskView& mask, const char* row, int64_t j0) {
  const char* p = row + j0 * mask.sn * mask.elem;
  switch (mask.kind) {
    case MaskKind::kNone:
      return;
    case MaskKind::kBool: {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(p);
      if (mask.sn == 1) {
        for (int64_t j = 0; j < n; ++j) s[j] = m[j] != 0 ? s[j] : -kInf;
      } else {
        for (int64_t j = 0; j < n; ++j) s[j] = m[j * mask.sn] != 0 ? s[j] : -kInf;
      }
      return;
    }
    case MaskKind::kFloat: add_bias(s, reinterpret_cast<const float*>(p), mask.sn, n); return;
    case MaskKind::kHalf: add_bias(s, reinterpret_cast<const at::Half*>(p), mask.sn, n); return;
    case MaskKind::kBFloat16: add_bias(s, reinterpret_cast<const at::BFloat16*>(p), mask.sn, n); return;
    case MaskKind::kDouble: add_bias(s, reinterpret_cast<const double*>(p), mask.sn, n); return;
  }
}

// Causal: for query i, scores of keys j0 + t > i become -inf.
C10_ALWAYS_INLINE void apply_causal(float* s, int64_t n, int64_t i, int64_t j0) {
  for (int64_t t = std::max<int64_t>(0, i + 1 - j0); t < n; ++t) s[t] = -kInf;
}

// The keys a boolean mask lets each query see, as the smallest range [lo, hi) holding them (lo =
// k_len, hi = 0 for a row that sees none): one entry per distinct mask row, rows repeated by
// broadcasting (zero strides) sharing one, so a [B, 1, 1, Lk] padding mask is B entries, found by
// one scan of the mask. The kernels walk only the keys inside a block's range (the union of its
// rows'): the key tiles a padding mask hides from a whole block of queries are never formed (the
// padded tail of a sequence, like the tiles above the causal diagonal). Such tiles contribute
// exactly nothing where they are formed (P = 0, the running max unchanged), so the results are
// the same; only keys wholly hidden are not read at all (a NaN among their values stays out, as it
// does above the diagonal). Floating masks are walked whole: an added -1e4 still leaves a weight.
struct KeySpans {
  bool active = false;
  int64_t k_len = 0;
  int64_t nb = 1, nh = 1, nm = 1;  // distinct mask rows per batch, head and query index
  std::vector<int64_t> lo_hi;      // [nb * nh * nm][2]

  static KeySpans of(const MaskView& mask, int64_t batch, int64_t heads, int64_t q_len, int64_t k_len) {
    KeySpans ks;
    if (mask.kind != MaskKind::kBool || k_len == 0) return ks;
    ks.active = true;
    ks.k_len = k_len;
    ks.nb = mask.sb != 0 ? batch : 1;
    ks.nh = mask.sh != 0 ? heads : 1;
    ks.nm = mask.sm != 0 ? q_len : 1;
    ks.lo_hi.resize(2 * ks.nb * ks.nh * ks.nm);
    const int64_t rows = ks.nb * ks.nh * ks.nm;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k_len), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t i = row % ks.nm, h = row / ks.nm % ks.nh, b = row / (ks.nm * ks.nh);
        const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.row(b, h, i));
        int64_t lo = 0, hi = k_len;
        while (lo < k_len && m[lo * mask.sn] == 0) ++lo;
        while (hi > lo && m[(hi - 1) * mask.sn] == 0) --hi;
        ks.lo_hi[2 * row] = lo < hi ? lo : k_len;
        ks.lo_hi[2 * row + 1] = lo < hi ? hi : 0;
      }
    });
    return ks;
  }

  // The keys [lo, hi) that queries [i0, i0 + mq) of head (b, h) may see below end (lo >= hi: none).
  std::pair<int64_t, int64_t> range(int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t end) const {
    if (!active) return {0, end};
    const int64_t* row = lo_hi.data() + 2 * (((nb > 1 ? b : 0) * nh + (nh > 1 ? h : 0)) * nm + (nm > 1 ? i0 : 0));
    int64_t lo = k_len, hi = 0;
    for (int64_t r = 0; r < (nm > 1 ? mq : 1); ++r) {
      lo = std::min(lo, row[2 * r]);
      hi = std::max(hi, row[2 * r + 1]);
    }
    return {lo, std::min(hi, end)};
  }

  // Whether the tile of keys [j0, j0 + nk) holds a key those queries may see below end.
  bool sees(int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nk, int64_t end) const {
    const auto [lo, hi] = range(b, h, i0, mq, end);
    return j0 < hi && lo < j0 + nk;
  }
};

// ---------------------------------------------------------------------------------------------
// Dropout: fn(t, len, factor) over [0, n) in vectors of up to kLanes elements, factor[lane] =
// keep(counter + t + lane) ? inv_keep : 0 (the uniforms drawn a chunk at a time: philox::uniforms).
template <typename Fn>
C10_ALWAYS_INLINE void for_each_dropout_factor(int64_t n, uint64_t seed, uint64_t counter, float p, float inv_keep,
                                               const Fn& fn) {
  constexpr int64_t kChunk = 2 * philox::kBatchElements;
  const fVec pv(p), inv(inv_keep), zero(0.f);
  alignas(64) float u[kChunk];
  for (int64_t j = 0; j < n; j += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, n - j);
    philox::uniforms(seed, counter + static_cast<uint64_t>(j), len, u);
    for (int64_t t = 0; t < len; t += kLanes) {
      fn(j + t, std::min(kLanes, len - t), fVec::blendv(zero, inv, fVec::loadu(u + t) >= pv));
    }
  }
}

// x[t] = keep(counter + t) ? x[t] * inv_keep : 0 for t in [0, n) (inv_keep 1: P's drop).
void apply_dropout(float* x, int64_t n, uint64_t seed, uint64_t counter, float p, float inv_keep) {
  for_each_dropout_factor(n, seed, counter, p, inv_keep, [&](int64_t t, int64_t l, const fVec& factor) {
    (fVec::loadu(x + t, l) * factor).store(x + t, l);
  });
}

// factor[t] = keep(counter + t) ? inv_keep : 0 for t in [0, n): apply_dropout's factors, kept
// where one backward tile drops both dP and P (Philox is most of the cost of dropout: drawn
// once per element and tile, not once per use).
void dropout_factors(float* factor, int64_t n, uint64_t seed, uint64_t counter, float p, float inv_keep) {
  for_each_dropout_factor(n, seed, counter, p, inv_keep,
                          [&](int64_t t, int64_t l, const fVec& f) { f.store(factor + t, l); });
}

// x[t] *= factor[t] for t in [0, n).
void scale_by(float* x, const float* factor, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) (fVec::loadu(x + j) * fVec::loadu(factor + j)).store(x + j);
  if (j < n) (fVec::loadu(x + j, n - j) * fVec::loadu(factor + j, n - j)).store(x + j, n - j);
}

// ---------------------------------------------------------------------------------------------
// Task scheduling

// Runs fn(task, scratch) for every task in [0, num_tasks) on at::parallel_for workers that take
// tasks from a shared counter; each worker owns `scratch_floats` floats of scratch (allocated
// through the torch CPU allocator, so it shows in the profiler's memory accounting).
template <typename F>
void run_tasks(int64_t num_tasks, int64_t scratch_floats, const F& fn) {
  if (num_tasks <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::Tensor scratch = at::empty({std::max<int64_t>(scratch_floats, 1)}, at::TensorOptions().dtype(at::kFloat));
    float* buf = scratch.mutable_data_ptr<float>();
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) fn(t, buf);
  });
}

// Carves consecutive 64-byte aligned float buffers out of a worker's scratch (take_as: n elements
// of a 2- or 4-byte type, floats_for<U>(n) of the scratch each).
struct Carver {
  float* cur;
  static constexpr int64_t round_up(int64_t n) { return (n + 15) / 16 * 16; }
  template <typename U>
  static constexpr int64_t floats_for(int64_t n) {
    return round_up((n * static_cast<int64_t>(sizeof(U)) + 3) / 4);
  }
  float* take(int64_t n) {
    float* p = cur;
    cur += round_up(n);
    return p;
  }
  template <typename U>
  U* take_as(int64_t n) {
    U* p = reinterpret_cast<U*>(cur);
    cur += floats_for<U>(n);
    return p;
  }
};

// ---------------------------------------------------------------------------------------------
// Attention

// Block sizes (queries x keys per tile). Forward: 256 x 256 float32 scores (256 KiB) plus the
// Q/K/V blocks and the accumulator (64 KiB each at head dim 64) stay in a 1 MiB L2, and the GEMMs
// (256 x 256 x 64) run at sgemm's peak; measured on 2 cores, 128..512 in either dimension is
// within 2%, below 128 queries the repeated packing of K shows. Head dims above 128 halve the
// query block. Backward tiles are 128 x 128 (it keeps twice the tiles: P and dP). Short
// sequences or few heads get smaller query blocks, so that every thread has tasks.
constexpr int64_t kFwdQ = 256, kFwdK = 256;
constexpr int64_t kBwdQ = 128, kBwdK = 128;
// The per-head backward's query block: its scores against all keys ([block, k_len] for P and dP)
// are in scratch at once.
constexpr int64_t kBwdHeadQ = 64;

int64_t query_block(int64_t preferred, int64_t bh, int64_t q_len) {
  const int64_t threads = at::get_num_threads();
  int64_t block = preferred;
  while (block > 16 && bh * ((q_len + block - 1) / block) < 4 * threads) block /= 2;
  return block;
}

struct AttnProblem {
  int64_t batch, heads, q_len, k_len, d, dv;
  // Grouped-query attention: key and value have kv_heads heads, a divisor of heads; query head h
  // reads key/value head h / group (group = heads / kv_heads; 1 without grouping).
  int64_t kv_heads, group;
  // Strides (elements) of batch, head, row; the last dim has stride 1.
  int64_t q_s[3], k_s[3], v_s[3];
  MaskView mask;
  KeySpans keys;  // a boolean mask's key ranges (inactive otherwise)
  float scale;
  bool causal;
  bool dropout;
  float dropout_p, inv_keep;  // inv_keep = 1 / (1 - p), 1 without dropout
  uint64_t seed;

  int64_t bh() const { return batch * heads; }
  // The end of the keys queries [i0, i0 + mq) may see: causal, up to the last of them.
  int64_t key_end(int64_t i0, int64_t mq) const { return causal ? std::min(k_len, i0 + mq) : k_len; }
  int64_t kv(int64_t h) const { return h / group; }
  uint64_t counter(int64_t bh_index, int64_t i, int64_t j) const {
    return static_cast<uint64_t>((bh_index * q_len + i) * k_len + j);
  }
};

void fill_strides(const at::Tensor& t, int64_t (&s)[3]) {
  s[0] = t.stride(0);
  s[1] = t.stride(1);
  s[2] = t.stride(2);
}

// A [rows, 64] block of T (src, rows ld apart, rows even) as brgemm's packed B operand: the VNNI
// layout [rows / 2][64][2], rows r and r + 1 interleaved, which is what cpublas::pack writes for
// the tile unit; here without its per-call lookup of a packing kernel. Every packing of the
// attention's operands goes through it (pack_value_chunk; the backward's P and dS chunks).
template <typename T>
void pack_pairs(const T* src, int64_t ld, int64_t rows, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(T) == 2) {  // the 16-bit dtypes, the only ones the tile unit takes
    static_assert(kTileKeys == 64 && kTileCols == 64, "two 512-bit vectors of 16-bit values a row");
    // Output element 2 t + k is element t (+ 16 for the second half) of row r + k: index t + 32 k.
    alignas(64) static constexpr int16_t kFirst[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    alignas(64) static constexpr int16_t kSecond[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23,
                                                        55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62,
                                                        31, 63};
    const __m512i first = _mm512_load_si512(kFirst), second = _mm512_load_si512(kSecond);
    for (int64_t r = 0; r < rows; r += 2) {
      const T* a = src + r * ld;
      const T* b = a + ld;
      T* o = out + r * kTileKeys;
      for (int64_t h = 0; h < kTileKeys; h += 32) {
        const __m512i x = _mm512_loadu_si512(a + h), y = _mm512_loadu_si512(b + h);
        _mm512_storeu_si512(o + 2 * h, _mm512_permutex2var_epi16(x, first, y));
        _mm512_storeu_si512(o + 2 * h + 32, _mm512_permutex2var_epi16(x, second, y));
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; r += 2) {
    for (int64_t t = 0; t < kTileKeys; ++t) {
      out[r * kTileKeys + 2 * t] = src[r * ld + t];
      out[r * kTileKeys + 2 * t + 1] = src[(r + 1) * ld + t];
    }
  }
}

// Packs the value rows [lo, hi) of a chunk of keys (vb: its first key's row, rows ld apart; the
// other rows of the chunk zero) for brgemm: the packed [64 keys, 64 features] blocks of its
// features at out, out_step elements apart (stage: kTileKeys x kTileCols elements of scratch).
template <typename T>
void pack_value_chunk(const T* vb, int64_t ld, int64_t lo, int64_t hi, int64_t dv, T* stage, T* out,
                      int64_t out_step = kTileKeys * kTileCols) {
  for (int64_t f0 = 0; f0 < dv; f0 += kTileCols) {
    const int64_t w = std::min(kTileCols, dv - f0);
    if (lo == 0 && hi == kTileKeys && w == kTileCols) {  // a whole block: packed from its rows
      pack_pairs(vb + f0, ld, kTileKeys, out + f0 / kTileCols * out_step);
      continue;
    }
    for (int64_t t = 0; t < kTileKeys; ++t) {
      T* row = stage + t * kTileCols;
      const bool kept = t >= lo && t < hi;
      if (kept) std::copy(vb + t * ld + f0, vb + t * ld + f0 + w, row);
      std::fill(row + (kept ? w : 0), row + kTileCols, T(0));
    }
    pack_pairs(stage, kTileCols, kTileKeys, out + f0 / kTileCols * out_step);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The 16 x 16 matrix of 32-bit elements in r (a row a vector) transposed in place: pairs of rows
// interleaved (32-bit, then 64-bit), which leaves column 4 L + k of rows 4 g..4 g + 3 in 128-bit
// lane L of vector 4 g + k, then those lanes gathered across vectors in two rounds of
// _mm512_shuffle_i32x4.
C10_ALWAYS_INLINE void transpose16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    // Lanes 0 and 2 (x0, y0), 1 and 3 (x1, y1) of vectors k, 4 + k (x) and 8 + k, 12 + k (y).
    const __m512i x0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), x1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_i32x4(x0, y0, 0x88);       // column k: lane 0 of each
    t[4 + k] = _mm512_shuffle_i32x4(x1, y1, 0x88);   // column 4 + k: lane 1
    t[8 + k] = _mm512_shuffle_i32x4(x0, y0, 0xDD);   // column 8 + k: lane 2
    t[12 + k] = _mm512_shuffle_i32x4(x1, y1, 0xDD);  // column 12 + k: lane 3
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// Packs the first n rows of a chunk of keys (rows: its first key's row, rows ld apart, dim
// features, even) transposed for brgemm: [dim, 64 keys] in pack_pairs' layout, zero past n.
// Features f and f + 1 (f even) of key t are the packed pair (f / 2, t): the layout is the
// transpose of the rows read as pairs, written here without a transposed copy first.
template <typename T>
void pack_transposed_chunk(const T* rows, int64_t ld, int64_t n, int64_t dim, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(T) == 2) {
    // Blocks of 16 keys x 16 pairs read as 32-bit elements and transposed in registers
    // (transpose16_epi32); the pairs past dim masked off, the keys past n zero.
    static_assert(kTileKeys % 16 == 0, "blocks of 16 keys");
    for (int64_t f0 = 0; f0 < dim; f0 += 32) {
      const int pairs = static_cast<int>(std::min<int64_t>(16, (dim - f0) / 2));
      const __mmask16 cols = first_lanes(pairs);
      for (int64_t t0 = 0; t0 < kTileKeys; t0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = t0 + i < n ? _mm512_maskz_loadu_epi32(cols, rows + (t0 + i) * ld + f0) : _mm512_setzero_si512();
        }
        if (t0 < n) transpose16_epi32(r);
        for (int c = 0; c < pairs; ++c) _mm512_storeu_si512(out + (f0 + 2 * c) * kTileKeys + 2 * t0, r[c]);
      }
    }
    return;
  }
#endif
  for (int64_t f = 0; f < dim; f += 2) {
    T* pairs = out + f * kTileKeys;
    for (int64_t t = 0; t < n; ++t) {
      pairs[2 * t] = rows[t * ld + f];
      pairs[2 * t + 1] = rows[t * ld + f + 1];
    }
    std::fill(pairs + 2 * n, pairs + 2 * kTileKeys, T(0));
  }
}

// Packs key chunk c of head bkv (one of kv's) for the 16-bit products (PackedKV; V^T and K's
// rows too for the backward, V for the forward): K^T and V^T straight from the rows
// (pack_transposed_chunk), V's and K's rows interleaved in pairs (pack_value_chunk: straight from
// the rows, or, for a chunk cut by the keys' end or a width under kTileCols, through a
// zero-padded staging block, stage [kTileKeys, kTileCols]).
template <typename T>
void pack_key_chunk(const AttnProblem& pb, const PackedKV<T>& kv, const T* k_ptr, const T* v_ptr, bool backward,
                    int64_t bkv, int64_t c, T* stage) {
  const int64_t b = bkv / pb.kv_heads, hk = bkv % pb.kv_heads, j0 = c * kTileKeys;
  const int64_t n = std::min(kTileKeys, pb.k_len - j0);
  const T* kb = k_ptr + b * pb.k_s[0] + hk * pb.k_s[1] + j0 * pb.k_s[2];
  const T* vb = v_ptr + b * pb.v_s[0] + hk * pb.v_s[1] + j0 * pb.v_s[2];
  pack_transposed_chunk(kb, pb.k_s[2], n, pb.d, kv.k(bkv, c));
  // A chunk's feature columns are a column's run of chunks apart (PackedKV::v, kr).
  const int64_t step = kv.chunks * kTileKeys * kTileCols;
  if (backward) {
    pack_transposed_chunk(vb, pb.v_s[2], n, pb.dv, kv.v(bkv, c, 0));
    pack_value_chunk(kb, pb.k_s[2], 0, n, pb.d, stage, kv.kr(bkv, c, 0), step);
  } else {
    pack_value_chunk(vb, pb.v_s[2], 0, n, pb.dv, stage, kv.v(bkv, c, 0), step);
  }
}

// K and V of every (batch, key/value head) packed, one (head, key chunk) per task.
template <typename T>
PackedKV<T> pack_keys(const AttnProblem& pb, const T* k_ptr, const T* v_ptr, bool backward) {
  PackedKV<T> kv(pb.k_len, pb.d, pb.dv, backward, 0, pb.batch * pb.kv_heads);
  kv.storage = at::empty({kv.elements()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  kv.place(kv.storage.template mutable_data_ptr<T>());
  at::parallel_for(0, kv.heads * kv.chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> stage(kTileKeys * kTileCols);
    for (int64_t task = begin; task < end; ++task) {
      pack_key_chunk(pb, kv, k_ptr, v_ptr, backward, task / kv.chunks, task % kv.chunks, stage.data());
    }
  });
  return kv;
}

// The mask and causality applied to the scores of the tile (rows [i0, i0 + mq), keys [j0, j0 + nk))
// of head (b, h), in place: s += mask, -inf where the mask or causality hides the key. S has
// leading dimension ld_s.
void mask_tile(const AttnProblem& pb, int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nk, float* s,
               int64_t ld_s) {
  const bool straddles = pb.causal && j0 + nk - 1 > i0;
  if (pb.mask.kind == MaskKind::kNone && !straddles) return;
  for (int64_t r = 0; r < mq; ++r) {
    float* row = s + r * ld_s;
    if (pb.mask.kind != MaskKind::kNone) apply_mask(row, nk, pb.mask, pb.mask.row(b, h, i0 + r), j0);
    if (straddles) apply_causal(row, nk, i0 + r, j0);
  }
}

// Scores of that tile, masked: s = scale * Q K^T (+ mask), -inf where the mask or causality hides
// the key.
void masked_scores(const AttnProblem& pb, int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t nk,
                   const float* q, int64_t ldq, const float* k, int64_t ldk, float* s, int64_t ld_s) {
  gemm(false, true, mq, nk, pb.d, pb.scale, q, ldq, k, ldk, 0.f, s, ld_s);
  mask_tile(pb, b, h, i0, mq, j0, nk, s, ld_s);
}

// The same with 16-bit products (native_products): Q's rows q (ldq apart) times the packed K^T
// chunks of key/value head bkv from the tile's first key j0 (a multiple of kTileKeys), then
// scaled and masked; or, where `raw` is true, left unscaled (see online_softmax_16).
template <typename T>
void masked_scores_16(const AttnProblem& pb, const PackedKV<T>& kv, int64_t b, int64_t h, int64_t i0, int64_t mq,
                      int64_t j0, int64_t nk, const T* q, int64_t ldq, float* s, int64_t ld_s, bool raw = false) {
  const int64_t bkv = b * pb.kv_heads + pb.kv(h), c0 = j0 / kTileKeys;
  products_by_key_chunk(mq, nk, pb.d, q, ldq, [&](int64_t c) { return kv.k(bkv, c0 + c); }, s, ld_s);
  if (raw) return;
  for (int64_t r = 0; r < mq; ++r) scale_row(s + r * ld_s, nk, pb.scale);
  mask_tile(pb, b, h, i0, mq, j0, nk, s, ld_s);
}

// Whether the tile of queries from i0 and keys [j0, j0 + nk) has nothing to add or hide (no mask,
// not across the causal diagonal), so that its scores may stay raw products, the scale folded into
// the pass that takes their exponentials: the backward's probabilities, and the forward's
// online_softmax_16 where, besides, the scale is positive (the largest scaled score is then the
// scaled largest raw one: rounding is monotonic).
bool unmasked_tile(const AttnProblem& pb, int64_t i0, int64_t j0, int64_t nk) {
  return pb.mask.kind == MaskKind::kNone && !(pb.causal && j0 + nk - 1 > i0);
}

// The forward's online-softmax step for the scores tile s ([mq, nk], leading dimension ld_s) of
// queries i0.. and keys j0.. of head bh: the running max m and sum l, the accumulator acc ([mq,
// dv]) rescaled where the max grew, and s = P, dropped as the forward drops it, for acc += P V.
void online_softmax(const AttnProblem& pb, int64_t bh, int64_t i0, int64_t mq, int64_t j0, int64_t nk, float* s,
                    int64_t ld_s, float* m, float* l, float* acc) {
  for (int64_t r = 0; r < mq; ++r) {
    float* row = s + r * ld_s;
    const float m_new = std::max(m[r], row_max(row, nk));
    // A row with no visible key so far keeps m = -inf; shift by 0 so that exp gives 0, not NaN.
    const float shift = m_new == -kInf ? 0.f : m_new;
    const float row_sum = exp_shift_sum(row, nk, shift);
    const float alpha = std::exp(m[r] - shift);
    if (alpha != 1.f) scale_row(acc + r * pb.dv, pb.dv, alpha);
    l[r] = l[r] * alpha + row_sum;
    m[r] = m_new;
    if (pb.dropout) {
      apply_dropout(row, nk, pb.seed, pb.counter(bh, i0 + r, j0), pb.dropout_p, 1.f);  // 1 / (1 - p) at the store
    }
  }
}

// online_softmax for the 16-bit forward, which takes P rounded to T (p, leading dimension ld_p,
// zero from nk to `padded`): the exponentials, their sum, the dropout (its factors drawn first
// into drop, [nk] scratch) and the rounding are one pass (exp_to), and where `raw` the scale too
// (s then holds the raw products; the row max is taken of them and scaled once), so that a row is
// read twice instead of four or five times. The values are those of the separate passes: s *
// scale is rounded either way, then the shift subtracted, the max of the rounded products is the
// rounded max, and P is dropped before its one rounding.
template <typename T>
void online_softmax_16(const AttnProblem& pb, int64_t bh, int64_t i0, int64_t mq, int64_t j0, int64_t nk, float* s,
                       int64_t ld_s, bool raw, T* p, int64_t ld_p, int64_t padded, float* drop, float* m, float* l,
                       float* acc) {
  const float factor = raw ? pb.scale : 1.f;
  for (int64_t r = 0; r < mq; ++r) {
    const float* row = s + r * ld_s;
    const float m_new = std::max(m[r], row_max(row, nk) * factor);
    const float shift = m_new == -kInf ? 0.f : m_new;  // as online_softmax
    const float* keep = pb.dropout ? drop : nullptr;
    if (keep) dropout_factors(drop, nk, pb.seed, pb.counter(bh, i0 + r, j0), pb.dropout_p, 1.f);
    const float row_sum = exp_to(row, nk, factor, shift, keep, p + r * ld_p, padded);
    const float alpha = std::exp(m[r] - shift);
    if (alpha != 1.f) scale_row(acc + r * pb.dv, pb.dv, alpha);
    l[r] = l[r] * alpha + row_sum;
    m[r] = m_new;
  }
}

// The forward's last step for queries [i0, i0 + mq) of head bh: out = acc / l, times 1 / (1 - p)
// with dropout (0 for a row that saw no key), and the log-sum-exp m + log l (+inf for such a row).
template <typename T>
void store_forward_rows(const AttnProblem& pb, int64_t bh, int64_t i0, int64_t mq, const float* m, const float* l,
                        const float* acc, T* out, const int64_t (&o_s)[3], float* lse) {
  T* ob = out + bh / pb.heads * o_s[0] + bh % pb.heads * o_s[1];
  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    const bool empty = l[r] == 0.f;
    from_float(acc + r * pb.dv, empty ? 0.f : pb.inv_keep / l[r], ob + i * o_s[2], pb.dv);
    lse[bh * pb.q_len + i] = empty ? kInf : m[r] + std::log(l[r]);
  }
}

// A forward whose queries are few (at most kFewQueries a sequence: a decoding step's query
// against its cache of keys) takes its products row by row instead: with one to four rows, a
// GEMM's packing and blocking (the tile unit's packed K and V, or the float32 copies of K and V
// that sgemm reads) cost more than the products, which read each key and value row once. These
// kernels read the rows in place as T, widened in registers (bfloat16 on AVX512-BF16: as they
// are, few_query_scores_bf16): a query row's score against a key is its dot product (float32,
// the lanes summed at the end), and the accumulator rows stay in registers over a tile's keys, a
// block of kFewCols columns at a time, kFewRows rows at a time. A task may hold more rows than
// that, the queries of a grouped-query group's heads (attn_fwd_task_few): its further groups of
// rows read the tile's key and value rows from cache. Beyond four queries a sequence the products'
// cost, which grows with the rows, passes the packing's, which does not (measured on 2 cores at
// head dim 64, 1024 and 4096 keys: 6 and 8 queries 1.0-1.6x slower row by row in every dtype).
constexpr int64_t kFewQueries = 4;
constexpr int64_t kFewRows = 4;
constexpr int kFewParts = 4;
constexpr int64_t kFewCols = kFewParts * kLanes;

// s[0, n) = scale * the sums of the lanes of a[0, n) (n <= 4): one reduction tree for four
// vectors, their lanes paired within each 128-bit lane and then across them (with AVX-512 or
// AVX2), about a quarter of the instructions of four separate sums.
C10_ALWAYS_INLINE void store_scaled_sums4(const fVec (&a)[4], int64_t n, float scale, float* s) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  const __m128 sums = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), _mm_set1_ps(scale));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 t0 = _mm256_add_ps(_mm256_unpacklo_ps(a[0], a[1]), _mm256_unpackhi_ps(a[0], a[1]));
  const __m256 t1 = _mm256_add_ps(_mm256_unpacklo_ps(a[2], a[3]), _mm256_unpackhi_ps(a[2], a[3]));
  const __m256d d0 = _mm256_castps_pd(t0), d1 = _mm256_castps_pd(t1);
  const __m256 u = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(d0, d1)),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(d0, d1)));
  const __m128 sums = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)), _mm_set1_ps(scale));
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (n == 4) {
    _mm_storeu_ps(s, sums);
    return;
  }
  alignas(16) float out[4];
  _mm_store_ps(out, sums);
  std::copy(out, out + n, s);
#else
  for (int64_t g = 0; g < n; ++g) s[g] = scale * reduce_sum(a[g]);
#endif
}

// s[r, j] = scale * q_r . k_j for the R query rows of q (float32, ldq apart) and the keys [0, nk)
// of k (rows of T, ldk apart), d wide: four keys at a time, their lanes summed together
// (store_scaled_sums4; a last group of fewer keys sums zeros in the others' place).
template <int R, typename T>
void few_query_scores(int64_t nk, int64_t d, const float* q, int64_t ldq, const T* k, int64_t ldk, float scale,
                      float* s, int64_t ld_s) {
  constexpr int G = 4;
  for (int64_t j = 0; j < nk; j += G) {
    const int64_t keys = std::min<int64_t>(G, nk - j);
    fVec acc[R][G];
    for (int r = 0; r < R; ++r) {
      for (auto& a : acc[r]) a = fVec(0.f);
    }
    for (int64_t t = 0; t < d; t += kFewCols) {
      for (int64_t g = 0; g < keys; ++g) {
        fVec kv[kFewParts];
        cpu_rows::load_block<kFewParts>(k + (j + g) * ldk + t, d - t, kv);
        for (int r = 0; r < R; ++r) {
          fVec qv[kFewParts];
          cpu_rows::load_block<kFewParts>(q + r * ldq + t, d - t, qv);
          for (int c = 0; c < kFewParts; ++c) acc[r][g] = at::vec::fmadd(qv[c], kv[c], acc[r][g]);
        }
      }
    }
    for (int r = 0; r < R; ++r) store_scaled_sums4(acc[r], keys, scale, s + r * ld_s + j);
  }
}

// acc[r, :] += sum_j p[r, j] v_j for the R rows of p (ld_p apart) and the keys [0, nk) of v (rows
// of T, ldv apart), dv wide (acc's rows dv apart).
template <int R, typename T>
void few_query_values(int64_t nk, int64_t dv, const float* p, int64_t ld_p, const T* v, int64_t ldv, float* acc) {
  for (int64_t c0 = 0; c0 < dv; c0 += kFewCols) {
    fVec a[R][kFewParts];
    for (int r = 0; r < R; ++r) cpu_rows::load_block<kFewParts>(acc + r * dv + c0, dv - c0, a[r]);
    for (int64_t j = 0; j < nk; ++j) {
      fVec vv[kFewParts];
      cpu_rows::load_block<kFewParts>(v + j * ldv + c0, dv - c0, vv);
      for (int r = 0; r < R; ++r) {
        const fVec pr(p[r * ld_p + j]);
        for (int c = 0; c < kFewParts; ++c) a[r][c] = at::vec::fmadd(pr, vv[c], a[r][c]);
      }
    }
    for (int r = 0; r < R; ++r) cpu_rows::store_block<kFewParts>(acc + r * dv + c0, dv - c0, a[r]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The same two products for bfloat16 on AVX512-BF16 (has_avx512_bf16): vdpbf16ps multiplies
// pairs of bfloat16 values and adds both products to a float32 lane (each product exact, each
// sum rounded, as the widened FMAs' are), so the rows are read as they are, 32 values a vector,
// with no widening: half the instructions of the float32 form a key. Denormal bfloat16 inputs
// and float32 sums (below 1.2e-38) count as zero.

// few_query_scores for bfloat16 query rows q (ldq apart): the pairs run along the head dim.
template <int R>
__attribute__((target("avx512bf16"))) void few_query_scores_bf16(int64_t nk, int64_t d, const c10::BFloat16* q,
                                                                  int64_t ldq, const c10::BFloat16* k, int64_t ldk,
                                                                  float scale, float* s, int64_t ld_s) {
  constexpr int G = 4;
  for (int64_t j = 0; j < nk; j += G) {
    const int64_t keys = std::min<int64_t>(G, nk - j);
    const c10::BFloat16* kr[G];  // a last group of fewer keys repeats its last (its sums are not stored)
    for (int g = 0; g < G; ++g) kr[g] = k + (j + std::min<int64_t>(g, keys - 1)) * ldk;
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r) {
      for (auto& a : acc[r]) a = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < d; t += 32) {
      const __mmask32 mask = first_lanes(d - t);  // past the head dim both sides read 0
      __m512bh qv[R];
      for (int r = 0; r < R; ++r) qv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, q + r * ldq + t);
      for (int g = 0; g < G; ++g) {
        const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(mask, kr[g] + t);
        for (int r = 0; r < R; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], qv[r], kv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const fVec a[G] = {acc[r][0], acc[r][1], acc[r][2], acc[r][3]};
      store_scaled_sums4(a, keys, scale, s + r * ld_s + j);
    }
  }
}

// few_query_values for P rounded to bfloat16 (p, rows ld_p apart, zero from nk to the next even
// key): keys j and j + 1 paired, their value rows interleaved (vpunpck{l,h}wd, within each
// 128-bit lane: features 8 L + 0..3 in the low half's lanes 4 L.., 8 L + 4..7 in the high's), times
// the pair (p_rj, p_rj+1) in every lane. The accumulators stay in that order over the tile,
// brought from and back to acc's by one permutation each (kLo / kHi, kF0 / kF1).
template <int R>
__attribute__((target("avx512bf16"))) void few_query_values_bf16(int64_t nk, int64_t dv, const c10::BFloat16* p,
                                                                  int64_t ld_p, const c10::BFloat16* v, int64_t ldv,
                                                                  float* acc) {
  constexpr int C = 2;  // 32-feature vectors a pass: 2 C accumulators a row
  // lane 4 L + t of the low half holds feature 8 L + t, of the high half 8 L + 4 + t (indices into
  // features [0, 16) ++ [16, 32) of acc: 16 + i selects the second vector).
  alignas(64) static constexpr int32_t kLo[16] = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  alignas(64) static constexpr int32_t kHi[16] = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  // and back: feature f = 8 L + u of [0, 32) is lane 4 L + u (u < 4) of the low half or lane
  // 4 L + u - 4 of the high one (16 + ...).
  alignas(64) static constexpr int32_t kF0[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int32_t kF1[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512i lo_idx = _mm512_load_si512(kLo), hi_idx = _mm512_load_si512(kHi);
  const __m512i f0_idx = _mm512_load_si512(kF0), f1_idx = _mm512_load_si512(kF1);
  for (int64_t c0 = 0; c0 < dv; c0 += 32 * C) {
    __m512 lo[R][C], hi[R][C];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        const int64_t f = c0 + 32 * c;
        const float* a = acc + r * dv + f;
        const __m512 a0 = _mm512_maskz_loadu_ps(first_lanes(dv - f), a);
        const __m512 a1 = _mm512_maskz_loadu_ps(first_lanes(dv - f - 16), a + 16);
        lo[r][c] = _mm512_permutex2var_ps(a0, lo_idx, a1);
        hi[r][c] = _mm512_permutex2var_ps(a0, hi_idx, a1);
      }
    }
    __mmask32 mask[C];
    for (int c = 0; c < C; ++c) mask[c] = first_lanes(dv - c0 - 32 * c);
    for (int64_t j = 0; j < nk; j += 2) {
      const c10::BFloat16* v0 = v + j * ldv + c0;
      const bool pair = j + 1 < nk;  // a last odd key pairs with zeros (its p is 0 too: a NaN in the
                                     // row past the keys must not reach the sum)
      __m512i w0[C], w1[C];
      for (int c = 0; c < C; ++c) {
        w0[c] = _mm512_maskz_loadu_epi16(mask[c], v0 + 32 * c);
        w1[c] = _mm512_maskz_loadu_epi16(pair ? mask[c] : 0, v0 + ldv + 32 * c);
      }
      for (int c = 0; c < C; ++c) {
        const __m512bh l = (__m512bh)_mm512_unpacklo_epi16(w0[c], w1[c]);
        const __m512bh h = (__m512bh)_mm512_unpackhi_epi16(w0[c], w1[c]);
        for (int r = 0; r < R; ++r) {
          int32_t pp;
          std::memcpy(&pp, p + r * ld_p + j, sizeof(pp));
          const __m512bh pv = (__m512bh)_mm512_set1_epi32(pp);
          lo[r][c] = _mm512_dpbf16_ps(lo[r][c], pv, l);
          hi[r][c] = _mm512_dpbf16_ps(hi[r][c], pv, h);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) {
        const int64_t f = c0 + 32 * c;
        float* a = acc + r * dv + f;
        _mm512_mask_storeu_ps(a, first_lanes(dv - f), _mm512_permutex2var_ps(lo[r][c], f0_idx, hi[r][c]));
        _mm512_mask_storeu_ps(a + 16, first_lanes(dv - f - 16), _mm512_permutex2var_ps(lo[r][c], f1_idx, hi[r][c]));
      }
    }
  }
}
#endif

// fn(r0, std::integral_constant<int, R>{}) for the rows [r0, r0 + R) of [0, rows), four at a time
// (the products' accumulators in registers), so that a tile's key and value rows are read from
// memory once and from cache by the other groups.
template <typename Fn>
void for_few_rows(int64_t rows, const Fn& fn) {
  static_assert(kFewRows == 4, "one case a row count");
  for (int64_t r0 = 0; r0 < rows; r0 += kFewRows) {
    switch (std::min(kFewRows, rows - r0)) {
      case 1: fn(r0, std::integral_constant<int, 1>{}); break;
      case 2: fn(r0, std::integral_constant<int, 2>{}); break;
      case 3: fn(r0, std::integral_constant<int, 3>{}); break;
      default: fn(r0, std::integral_constant<int, 4>{}); break;
    }
  }
}

// Whether the few-query products of T run on bfloat16 pairs (few_query_scores_dot16), and those
// products: the bfloat16 kernels where built (the AVX-512 set), never called elsewhere.
template <typename T>
bool few_query_dot16() {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return has_avx512_bf16();
#endif
  return false;
}

template <int R, typename T>
void few_query_scores_dot16(int64_t nk, int64_t d, const T* q, const T* k, int64_t ldk, float scale, float* s,
                            int64_t ld_s) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return few_query_scores_bf16<R>(nk, d, q, d, k, ldk, scale, s, ld_s);
#endif
  TORCH_INTERNAL_ASSERT(false, "few_query_scores_dot16: bfloat16 with AVX512-BF16 only");
}

template <int R, typename T>
void few_query_values_dot16(int64_t nk, int64_t dv, const T* p, int64_t ld_p, const T* v, int64_t ldv, float* acc) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) return few_query_values_bf16<R>(nk, dv, p, ld_p, v, ldv, acc);
#endif
  TORCH_INTERNAL_ASSERT(false, "few_query_values_dot16: bfloat16 with AVX512-BF16 only");
}

// Forward of one (bh, query block) task.
template <typename T>
void attn_fwd_task(const AttnProblem& pb, const T* q_ptr, const T* k_ptr, const T* v_ptr, int64_t bh,
                   int64_t i0, int64_t mq, int64_t block_k, float* scratch, T* out, const int64_t (&o_s)[3],
                   float* lse) {
  const int64_t b = bh / pb.heads, h = bh % pb.heads;
  const int64_t d = pb.d, dv = pb.dv;
  Carver carve{scratch};
  float* qbuf = carve.take(mq * d);
  float* kbuf = carve.take(block_k * d);
  float* vbuf = carve.take(block_k * dv);
  float* s = carve.take(mq * block_k);
  float* acc = carve.take(mq * dv);
  float* m = carve.take(mq);
  float* l = carve.take(mq);

  const T* qb = q_ptr + b * pb.q_s[0] + h * pb.q_s[1];
  const T* kb = k_ptr + b * pb.k_s[0] + pb.kv(h) * pb.k_s[1];
  const T* vb = v_ptr + b * pb.v_s[0] + pb.kv(h) * pb.v_s[1];
  auto [q, ldq] = rows_as_float(qb, pb.q_s[2], i0, mq, d, qbuf);
  std::fill(acc, acc + mq * dv, 0.f);
  std::fill(m, m + mq, -kInf);
  std::fill(l, l + mq, 0.f);

  // Causal: the last tile stops at the block's last query (the backward renormalises its P); a
  // boolean mask's range of keys the block sees cuts the walk further (KeySpans).
  const auto [k_begin, k_end] = pb.keys.range(b, h, i0, mq, pb.key_end(i0, mq));
  for (int64_t j0 = k_begin; j0 < k_end; j0 += block_k) {
    const int64_t nk = std::min(block_k, k_end - j0);
    auto [k, ldk] = rows_as_float(kb, pb.k_s[2], j0, nk, d, kbuf);
    masked_scores(pb, b, h, i0, mq, j0, nk, q, ldq, k, ldk, s, block_k);
    online_softmax(pb, bh, i0, mq, j0, nk, s, block_k, m, l, acc);
    auto [v, ldv] = rows_as_float(vb, pb.v_s[2], j0, nk, dv, vbuf);
    gemm(false, false, mq, dv, nk, 1.f, s, block_k, v, ldv, 1.f, acc, dv);
  }
  store_forward_rows(pb, bh, i0, mq, m, l, acc, out, o_s, lse);
}

// The keys [lo, hi) that any query of the query heads [h0, h0 + heads) of sequence b sees (their
// mask rows' ranges, KeySpans, and causality): lo = k_len, hi = 0 where none sees a key.
std::pair<int64_t, int64_t> heads_key_range(const AttnProblem& pb, int64_t b, int64_t h0, int64_t heads) {
  int64_t lo = pb.k_len, hi = 0;
  for (int64_t g = 0; g < heads; ++g) {
    const auto [begin, end] = pb.keys.range(b, h0 + g, 0, pb.q_len, pb.key_end(0, pb.q_len));
    if (begin < end) lo = std::min(lo, begin), hi = std::max(hi, end);
  }
  return {lo, hi};
}

// Forward of a task of few queries (kFewQueries): all the queries of `heads` consecutive query
// heads from bh, which share a key/value head (one head, or a grouped-query group or part of one),
// their rows in one block (head by head), so that each key and value row is read from memory once
// for them all. Each head's rows are masked and normalised as their own task's would be, with the
// same arithmetic a row; the walk covers the keys any of them sees, so
// where a boolean mask hides different keys from different heads of the group, a head's tiles
// may start elsewhere than in a task of its own (its results then differ in rounding).
template <typename T>
void attn_fwd_task_few(const AttnProblem& pb, const T* q_ptr, const T* k_ptr, const T* v_ptr, int64_t bh,
                       int64_t heads, int64_t block_k, float* scratch, T* out, const int64_t (&o_s)[3], float* lse) {
  const int64_t b = bh / pb.heads, h0 = bh % pb.heads, mq = pb.q_len, rows = heads * mq;
  const int64_t d = pb.d, dv = pb.dv;
  // bfloat16 on AVX512-BF16: the products on the rows as they are (few_query_scores_bf16), P
  // rounded to bfloat16 for P V as eager attention and the tile unit's P V round it, its rows
  // padded to an even length with zeros (pairs of keys).
  const bool dot16 = few_query_dot16<T>();
  const int64_t ld_p = (block_k + 1) / 2 * 2;
  Carver carve{scratch};
  float* s = carve.take(rows * block_k);
  float* acc = carve.take(rows * dv);
  float* m = carve.take(rows);
  float* l = carve.take(rows);
  float* q = dot16 ? nullptr : carve.take(rows * d);
  T* q16 = dot16 ? carve.take_as<T>(rows * d) : nullptr;
  T* p = dot16 ? carve.take_as<T>(rows * ld_p) : nullptr;
  float* drop = dot16 ? carve.take(block_k) : nullptr;  // a row's dropout factors (online_softmax_16)
  for (int64_t g = 0; g < heads; ++g) {  // the query rows, head by head
    const T* qh = q_ptr + b * pb.q_s[0] + (h0 + g) * pb.q_s[1];
    for (int64_t i = 0; i < mq; ++i) {
      const T* src = qh + i * pb.q_s[2];
      const int64_t row = (g * mq + i) * d;
      if (dot16) {
        std::copy(src, src + d, q16 + row);
      } else {
        to_float(src, q + row, d);
      }
    }
  }
  const auto [k_begin, k_end] = heads_key_range(pb, b, h0, heads);
  std::fill(acc, acc + rows * dv, 0.f);
  std::fill(m, m + rows, -kInf);
  std::fill(l, l + rows, 0.f);
  const T* kb = k_ptr + b * pb.k_s[0] + pb.kv(h0) * pb.k_s[1];
  const T* vb = v_ptr + b * pb.v_s[0] + pb.kv(h0) * pb.v_s[1];
  for (int64_t j0 = k_begin; j0 < k_end; j0 += block_k) {
    const int64_t nk = std::min(block_k, k_end - j0);
    const T* kt = kb + j0 * pb.k_s[2];
    const T* vt = vb + j0 * pb.v_s[2];
    for_few_rows(rows, [&](int64_t r0, auto r) {
      float* sr = s + r0 * block_k;
      if (dot16) return few_query_scores_dot16<r>(nk, d, q16 + r0 * d, kt, pb.k_s[2], pb.scale, sr, block_k);
      few_query_scores<r>(nk, d, q + r0 * d, d, kt, pb.k_s[2], pb.scale, sr, block_k);
    });
    for (int64_t g = 0; g < heads; ++g) {
      const int64_t at = g * mq;
      float* sg = s + at * block_k;
      mask_tile(pb, b, h0 + g, 0, mq, j0, nk, sg, block_k);
      if (dot16) {
        online_softmax_16(pb, bh + g, 0, mq, j0, nk, sg, block_k, /*raw=*/false, p + at * ld_p, ld_p,
                          (nk + 1) / 2 * 2, drop, m + at, l + at, acc + at * dv);
      } else {
        online_softmax(pb, bh + g, 0, mq, j0, nk, sg, block_k, m + at, l + at, acc + at * dv);
      }
    }
    for_few_rows(rows, [&](int64_t r0, auto r) {
      if (dot16) return few_query_values_dot16<r>(nk, dv, p + r0 * ld_p, ld_p, vt, pb.v_s[2], acc + r0 * dv);
      few_query_values<r>(nk, dv, s + r0 * block_k, block_k, vt, pb.v_s[2], acc + r0 * dv);
    });
  }
  for (int64_t g = 0; g < heads; ++g) {
    store_forward_rows(pb, bh + g, 0, mq, m + g * mq, l + g * mq, acc + g * mq * dv, out, o_s, lse);
  }
}

// Forward of one (bh, query block) task with 16-bit products (native_products): Q read in place
// (row stride ldq), K and V from their packed chunks: those given (call_kv: the call's, or the
// key/value head's of a task per head), or, where call_kv holds none (k_packed null: each packed
// chunk would be read by this task alone, once), a tile's chunks packed here just before its
// products, so that they are read back from cache instead of memory.
// Tiles start on a chunk boundary: keys before a boolean mask's range that this walks are hidden
// by the mask. block_k is a multiple of kTileKeys; p holds the tile's P rounded to T, zero past
// its keys to the chunk's end.
template <typename T>
void attn_fwd_task_native(const AttnProblem& pb, const PackedKV<T>& call_kv, const T* q_ptr, const T* k_ptr,
                          const T* v_ptr, int64_t ldq, int64_t bh, int64_t i0, int64_t mq, int64_t block_k,
                          float* scratch, T* out, const int64_t (&o_s)[3], float* lse) {
  const int64_t b = bh / pb.heads, h = bh % pb.heads;
  const int64_t dv = pb.dv, bkv = b * pb.kv_heads + pb.kv(h);
  Carver carve{scratch};
  const bool own = call_kv.k_packed == nullptr;
  PackedKV<T> tile_kv(block_k, pb.d, dv, /*backward=*/false, bkv, 1);
  if (own) tile_kv.place(carve.take_as<T>(tile_kv.elements()));
  const PackedKV<T>& kv = own ? tile_kv : call_kv;
  float* s = carve.take(mq * block_k);
  float* acc = carve.take(mq * dv);
  float* m = carve.take(mq);
  float* l = carve.take(mq);
  T* p = carve.take_as<T>(mq * block_k);
  float* drop = carve.take(block_k);  // a row's dropout factors (online_softmax_16)
  // A value chunk that holds keys this block does not see (before a boolean mask's first key it
  // sees, or past its causal end) is packed again with those rows zero: a zero probability times
  // a NaN or inf among them would still spread it (a packed copy may hold them: chunks are packed
  // whole), and keys past the walk's ends take no part in a product.
  T* stage = carve.take_as<T>(kTileKeys * kTileCols);
  T* edge = carve.take_as<T>(kv.v_cols * kv.v_chunk);
  const T* q = q_ptr + b * pb.q_s[0] + h * pb.q_s[1] + i0 * pb.q_s[2];
  std::fill(acc, acc + mq * dv, 0.f);
  std::fill(m, m + mq, -kInf);
  std::fill(l, l + mq, 0.f);

  const auto [k_begin, k_end] = pb.keys.range(b, h, i0, mq, pb.key_end(i0, mq));
  for (int64_t j0 = k_begin / kTileKeys * kTileKeys; j0 < k_end; j0 += block_k) {
    const int64_t nk = std::min(block_k, k_end - j0);
    const int64_t c0 = j0 / kTileKeys, chunks = (nk + kTileKeys - 1) / kTileKeys;
    if (own) {
      tile_kv.chunk0 = c0;
      for (int64_t c = c0; c < c0 + chunks; ++c) pack_key_chunk(pb, tile_kv, k_ptr, v_ptr, false, bkv, c, stage);
    }
    const bool raw = unmasked_tile(pb, i0, j0, nk) && pb.scale > 0.f;
    masked_scores_16(pb, kv, b, h, i0, mq, j0, nk, q, ldq, s, block_k, raw);
    online_softmax_16(pb, bh, i0, mq, j0, nk, s, block_k, raw, p, block_k, chunks * kTileKeys, drop, m, l, acc);
    // acc += P V: a run of whole chunks as one product per feature column (K = its keys, acc read
    // and written once per tile instead of once per chunk), a chunk that holds keys the walk does
    // not see packed again (edge) and multiplied on its own.
    const auto partial = [&](int64_t c) {
      const int64_t first = (c0 + c) * kTileKeys;
      const int64_t keys = std::min(kTileKeys, pb.k_len - first);  // the chunk's rows that are keys
      return k_begin > first || k_end - first < keys;
    };
    for (int64_t c = 0; c < chunks;) {
      int64_t run = c;
      while (run < chunks && !partial(run)) ++run;
      if (run > c) {
        for (int64_t f = 0; f < kv.v_cols; ++f) {
          brgemm(mq, std::min(kTileCols, dv - f * kTileCols), (run - c) * kTileKeys, p + c * kTileKeys, block_k,
                 kv.v(bkv, c0 + c, f), true, acc + f * kTileCols, dv);
        }
        c = run;
        continue;
      }
      const int64_t first = (c0 + c) * kTileKeys;
      const int64_t lo = std::max<int64_t>(k_begin - first, 0), hi = std::min(k_end - first, kTileKeys);
      const T* vb = v_ptr + b * pb.v_s[0] + pb.kv(h) * pb.v_s[1] + first * pb.v_s[2];
      pack_value_chunk(vb, pb.v_s[2], lo, hi, dv, stage, edge);
      for (int64_t f = 0; f < kv.v_cols; ++f) {
        brgemm(mq, std::min(kTileCols, dv - f * kTileCols), kTileKeys, p + c * kTileKeys, block_k,
               edge + f * kv.v_chunk, true, acc + f * kTileCols, dv);
      }
      ++c;
    }
  }
  at::native::cpublas::brgemm_release(true);
  store_forward_rows(pb, bh, i0, mq, m, l, acc, out, o_s, lse);
}

// The scratch (floats) of one head's K and V packed for the forward, `keys` keys of it: a tile's
// (attn_fwd_task_native's own packing) or a whole head's (attn_fwd_head_task_native).
template <typename T>
int64_t packed_head_floats(const AttnProblem& pb, int64_t keys) {
  return Carver::floats_for<T>(PackedKV<T>(keys, pb.d, pb.dv, /*backward=*/false, 0, 1).elements());
}

// Forward of every query block of the query heads that read key/value head bkv (its group, or its
// one head) with 16-bit products: the keys any of their queries sees packed once into the task's
// scratch (packed_head_floats of k_len keys, then a staging block), then each block as
// attn_fwd_task_native reading that copy.
template <typename T>
void attn_fwd_head_task_native(const AttnProblem& pb, const T* q_ptr, const T* k_ptr, const T* v_ptr, int64_t ldq,
                               int64_t bkv, int64_t block_q, int64_t block_k, float* scratch, T* out,
                               const int64_t (&o_s)[3], float* lse) {
  const int64_t b = bkv / pb.kv_heads, h0 = bkv % pb.kv_heads * pb.group;
  Carver carve{scratch};
  PackedKV<T> kv(pb.k_len, pb.d, pb.dv, /*backward=*/false, bkv, 1);
  kv.place(carve.take_as<T>(kv.elements()));
  T* stage = carve.take_as<T>(kTileKeys * kTileCols);
  const auto [lo, hi] = heads_key_range(pb, b, h0, pb.group);
  for (int64_t c = lo / kTileKeys; c * kTileKeys < hi; ++c) pack_key_chunk(pb, kv, k_ptr, v_ptr, false, bkv, c, stage);
  for (int64_t g = 0; g < pb.group; ++g) {
    for (int64_t i0 = 0; i0 < pb.q_len; i0 += block_q) {
      attn_fwd_task_native<T>(pb, kv, q_ptr, k_ptr, v_ptr, ldq, b * pb.heads + h0 + g, i0,
                              std::min(block_q, pb.q_len - i0), block_k, carve.cur, out, o_s, lse);
    }
  }
}

void check_qkv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  TORCH_CHECK(is_supported_float(query.scalar_type()), "query must be float32, float16 or bfloat16, got ",
              query.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{query, "query"}, {key, "key"}, {value, "value"}}) {
    TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, heads, seq, head_dim], got ", t.dim(), " dimensions");
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have dtype ", query.scalar_type(),
                " like query, got ", t.scalar_type());
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride along head_dim, got strides ",
                t.strides());
  }
  check_kv_heads(query, key, value);  // grouped-query: fewer key/value heads allowed
  TORCH_CHECK(key.size(3) == query.size(3), "key head_dim ", key.size(3), " must equal query head_dim ", query.size(3));
  TORCH_CHECK(value.size(2) == key.size(2), "value length ", value.size(2), " must equal key length ", key.size(2));
}

void check_mask(const std::optional<at::Tensor>& attn_mask, const at::Tensor& query, int64_t k_len) {
  if (!attn_mask.has_value() || !attn_mask->defined()) return;
  const at::Tensor& m = *attn_mask;
  TORCH_CHECK(m.device().is_cpu(), "attn_mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(is_mask_dtype(m.scalar_type()), "attn_mask must be bool, float32, float16, bfloat16 or float64, got ",
              m.scalar_type());
  TORCH_CHECK(m.dim() == 4 && m.size(0) == query.size(0) && m.size(1) == query.size(1) && m.size(2) == query.size(2) &&
                  m.size(3) == k_len,
              "attn_mask must be expanded to [batch, heads, q_len, k_len] = [", query.size(0), ", ", query.size(1),
              ", ", query.size(2), ", ", k_len, "], got ", m.sizes());
}

// Fills the problem description shared by forward and backward; checks scale/dropout/seed.
AttnProblem make_problem(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
                         const std::optional<at::Tensor>& seed) {
  check_qkv(query, key, value);
  check_mask(attn_mask, query, key.size(2));
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_dropout_p(dropout_p);
  AttnProblem pb{};
  pb.batch = query.size(0);
  pb.heads = query.size(1);
  pb.kv_heads = key.size(1);
  pb.group = pb.kv_heads > 0 ? std::max<int64_t>(1, pb.heads / pb.kv_heads) : 1;
  pb.q_len = query.size(2);
  pb.k_len = key.size(2);
  pb.d = query.size(3);
  pb.dv = value.size(3);
  fill_strides(query, pb.q_s);
  fill_strides(key, pb.k_s);
  fill_strides(value, pb.v_s);
  pb.mask = make_mask_view(attn_mask);
  pb.keys = KeySpans::of(pb.mask, pb.batch, pb.heads, pb.q_len, pb.k_len);
  pb.scale = static_cast<float>(scale);
  pb.causal = is_causal;
  pb.dropout = dropout_p > 0.0;
  pb.dropout_p = static_cast<float>(dropout_p);
  pb.inv_keep = pb.dropout ? philox::keep_scale(pb.dropout_p) : 1.f;
  pb.seed = 0;
  if (pb.dropout) {
    pb.seed = dropout_seed(seed, query);
  }
  return pb;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value,
                                                     const std::optional<at::Tensor>& attn_mask, double scale,
                                                     bool is_causal, double dropout_p,
                                                     const std::optional<at::Tensor>& seed) {
  const AttnProblem pb = make_problem(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  at::Tensor out = empty_in_query_layout(query, pb.dv);
  at::Tensor lse = at::empty({pb.batch, pb.heads, pb.q_len}, query.options().dtype(at::kFloat));
  if (pb.bh() == 0 || pb.q_len == 0) return {out, lse};
  const int64_t o_s[3] = {out.stride(0), out.stride(1), out.stride(2)};

  const int64_t wide = std::max(pb.d, pb.dv) > 128 ? 2 : 1;
  const int64_t block_q = std::min(query_block(kFwdQ / wide, pb.bh(), pb.q_len), pb.q_len);
  const int64_t block_k = std::max<int64_t>(1, std::min(kFwdK, pb.k_len));
  const int64_t nq = (pb.q_len + block_q - 1) / block_q;
  const int64_t scratch = Carver::round_up(block_q * pb.d) + Carver::round_up(block_k * pb.d) +
                          Carver::round_up(block_k * pb.dv) + Carver::round_up(block_q * block_k) +
                          Carver::round_up(block_q * pb.dv) + 2 * Carver::round_up(block_q);
  // 16-bit products (native_products) read Q's rows in place (in_place_ld).
  const int64_t ldq = in_place_ld(pb.q_len, pb.q_s[2], pb.d);
  // Few queries (kFewQueries): their products row by row, for every dtype (few_query_scores).
  const bool few = pb.q_len <= kFewQueries;
  const bool native = !few && native_products(query.scalar_type(), pb.d) && ldq > 0 && pb.k_len > 0;
  const int64_t native_k = (block_k + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t v_cols = (pb.dv + kTileCols - 1) / kTileCols;
  const int64_t native_scratch = Carver::round_up(block_q * native_k) + Carver::round_up(block_q * pb.dv) +
                                 2 * Carver::round_up(block_q) + Carver::floats_for<at::Half>(block_q * native_k) +
                                 Carver::round_up(native_k) +
                                 Carver::floats_for<at::Half>(kTileKeys * kTileCols) +
                                 Carver::floats_for<at::Half>(v_cols * kTileKeys * kTileCols);
  AT_DISPATCH_V2(query.scalar_type(), "attention_fwd_cpu", AT_WRAP([&] {
    const scalar_t* qp = query.const_data_ptr<scalar_t>();
    const scalar_t* kp = key.const_data_ptr<scalar_t>();
    const scalar_t* vp = value.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* lp = lse.mutable_data_ptr<float>();
    const int64_t bh_count = pb.bh();
    // Causal: the last query blocks see the most keys, so they go first; otherwise a head's
    // blocks run consecutively (its K/V stay in cache).
    const auto block_of = [&](int64_t task) {
      const int64_t bh = pb.causal ? task % bh_count : task / nq;
      const int64_t qi = pb.causal ? nq - 1 - task / bh_count : task % nq;
      return std::pair<int64_t, int64_t>{bh, qi * block_q};
    };
    if (few) {
      // A grouped-query group's heads in one task, or in as few tasks as keep the threads busy:
      // the most heads a task (a divisor of the group) that leave at least as many tasks as
      // threads and at most a fifth of the threads' turns idle (rounds of tasks x threads <= 5/4
      // tasks). Their rows cost the same in any task; their key and value rows are read from
      // memory once a task.
      const int64_t threads = at::get_num_threads(), kv_count = pb.batch * pb.kv_heads;
      const auto balanced = [&](int64_t heads) {
        const int64_t tasks = kv_count * (pb.group / heads);
        return tasks >= threads && 4 * ((tasks + threads - 1) / threads * threads) <= 5 * tasks;
      };
      int64_t heads = pb.group;
      while (heads > 1 && (pb.group % heads != 0 || !balanced(heads))) --heads;
      const int64_t rows = heads * pb.q_len;
      const int64_t few_scratch = Carver::round_up(rows * pb.d) + Carver::round_up(rows * block_k) +
                                  Carver::round_up(rows * pb.dv) + 2 * Carver::round_up(rows) +
                                  Carver::floats_for<at::Half>(rows * (block_k + 1)) + Carver::round_up(block_k);
      run_tasks(bh_count / heads, few_scratch, [&](int64_t task, float* buf) {
        attn_fwd_task_few<scalar_t>(pb, qp, kp, vp, task * heads, heads, block_k, buf, op, o_s, lp);
      });
      return;
    }
    if (native) {  // never float32
      // K and V packed for the tile unit once for the tasks that read them. Where a head's chunks
      // are read once (its queries one block, no grouped-query sharing), each task packs its
      // tiles (attn_fwd_task_native). Where they are read more often (query blocks, a group's
      // heads) and the key/value heads are enough to share out among the threads, a task per
      // key/value head packs the keys its queries see into its scratch and walks all of its
      // query blocks. Otherwise the call packs all of K and V first (pack_keys).
      const int64_t kv_count = pb.batch * pb.kv_heads;
      const bool once = nq == 1 && pb.group == 1;
      if (!once && kv_count >= 2 * at::get_num_threads()) {
        const int64_t head_scratch =
            packed_head_floats<scalar_t>(pb, pb.k_len) + Carver::floats_for<scalar_t>(kTileKeys * kTileCols);
        run_tasks(kv_count, head_scratch + native_scratch, [&](int64_t bkv, float* buf) {
          attn_fwd_head_task_native<scalar_t>(pb, qp, kp, vp, ldq, bkv, block_q, native_k, buf, op, o_s, lp);
        });
        return;
      }
      const PackedKV<scalar_t> kv = once ? PackedKV<scalar_t>() : pack_keys(pb, kp, vp, /*backward=*/false);
      const int64_t own_scratch = once ? packed_head_floats<scalar_t>(pb, native_k) : 0;
      run_tasks(bh_count * nq, native_scratch + own_scratch, [&](int64_t task, float* buf) {
        const auto [bh, i0] = block_of(task);
        attn_fwd_task_native<scalar_t>(pb, kv, qp, kp, vp, ldq, bh, i0, std::min(block_q, pb.q_len - i0), native_k,
                                       buf, op, o_s, lp);
      });
      return;
    }
    run_tasks(bh_count * nq, scratch, [&](int64_t task, float* buf) {
      const auto [bh, i0] = block_of(task);
      attn_fwd_task<scalar_t>(pb, qp, kp, vp, bh, i0, std::min(block_q, pb.q_len - i0), block_k, buf, op, o_s, lp);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out, lse};
}

// --- backward

// Probabilities of a tile from the log-sum-exp: s[r, t] = exp(factor * s[r, t] - lse[r]) * corr[r]
// in place (corr: the row normaliser of the statistics pass; null for 1). kFor16Bit: a tile whose
// P and dS are rounded to 16 bits next (the tile unit's products): exp_vec<true>, and factor may
// be the scale (the scores raw, unmasked_tile), the product rounded as a scaled score is (see
// exp_block).
template <bool kFor16Bit = false>
void probabilities(float* s, int64_t mq, int64_t nk, int64_t ld_s, const float* lse, const float* corr,
                   float factor = 1.f) {
  const fVec f(factor);
  for (int64_t r = 0; r < mq; ++r) {
    float* row = s + r * ld_s;
    const fVec shift(lse[r]);
    const fVec c(corr != nullptr ? corr[r] : 1.f);
    // s - lse <= 0 in exact arithmetic, but the backward's GEMMs (other shapes than the forward's) may
    // round a score an ulp above it, which past |s| ~ 1e9 is more than exp takes (exp_vec is for
    // x <= 0; inf, then NaN gradients, where P is 1): clamped at 0 (minimum keeps a NaN, and so does
    // clamp_max: vminps returns its second operand, x, for a NaN).
    const fVec zero(0.f);
    const auto p = [&](fVec x) C10_ALWAYS_INLINE_ATTRIBUTE {
      if constexpr (kFor16Bit) {
        return exp_vec<true>(at::vec::clamp_max(cpu_rows::rounded_product(x, f) - shift, zero)) * c;
      } else {
        return exp_vec(at::vec::minimum(x - shift, zero)) * c;
      }
    };
    int64_t j = 0;
    for (; j + kLanes <= nk; j += kLanes) p(fVec::loadu(row + j)).store(row + j);
    if (j < nk) p(fVec::loadu(row + j, nk - j)).store(row + j, nk - j);
  }
}

// dS = P * (dP - delta) into dp. With dropout, dp holds dP already dropped where P was (the
// forward's factor keep ? 1 : 0, applied and stored by tile_p_dp with drop_dp, exactly as
// the statistics pass stored the dP its delta sums: a product folded in here instead, where -mfma
// contracts dP * factor - delta into one FMA, is not the rounded dP that delta holds, and dS no
// longer cancels, e.g. dQ and dK off zero with a single key); dS takes the undropped P, and P then
// becomes the dropped P_used that dV needs, by the tile's factors (tile_p_dp's, leading dimension
// ld_s; null without dropout).
void score_gradient(int64_t mq, int64_t nk, float* p, float* dp, int64_t ld_s, const float* delta,
                    const float* factors) {
  for (int64_t r = 0; r < mq; ++r) {
    float* prow = p + r * ld_s;
    float* dprow = dp + r * ld_s;
    const fVec dl(delta[r]);
    if (factors == nullptr) {
      int64_t j = 0;
      for (; j + kLanes <= nk; j += kLanes) {
        (fVec::loadu(prow + j) * (fVec::loadu(dprow + j) - dl)).store(dprow + j);
      }
      if (j < nk) (fVec::loadu(prow + j, nk - j) * (fVec::loadu(dprow + j, nk - j) - dl)).store(dprow + j, nk - j);
      continue;
    }
    const float* frow = factors + r * ld_s;
    for (int64_t j = 0; j < nk; j += kLanes) {
      const int64_t l = std::min(kLanes, nk - j);
      const fVec pval = fVec::loadu(prow + j, l);
      (pval * (fVec::loadu(dprow + j, l) - dl)).store(dprow + j, l);
      (pval * fVec::loadu(frow + j, l)).store(prow + j, l);
    }
  }
}

struct BwdTensors {
  int64_t do_s[3];  // grad_out strides
  int64_t dq_s[3], dk_s[3], dv_s[3];
  const float* lse;    // [B * H * Lq], from the forward
  float* corr;         // [B * H * Lq], 1 / sum_j exp(s_ij - lse_i) (0 for a row that sees no key)
  float* delta;        // [B * H * Lq], sum_j P_ij dP_ij with the normalised P
  float* dscores;      // [B, H, Lq, Lk] or null
};

// The backward's 16-bit products (native_products, and an even value head dim): S = Q K^T and
// dP = dO V^T of a tile whose keys start on a chunk (j0 a multiple of kTileKeys) run on the
// 16-bit inputs as the forward's S does, Q and dO read in place (rows ldq / lddo apart), K and V
// from their packed chunks (kv: K^T, V^T), and so do the tile's dV, dK and dQ products
// (Bwd16Buffers). Whether a tile is native depends on its keys alone, so the statistics pass and
// the gradient passes form the very same S and dP for it. kv null: none.
template <typename T>
struct BwdNative {
  const PackedKV<T>* kv = nullptr;
  const T* q = nullptr;
  const T* dout = nullptr;
  int64_t q_s[3] = {}, do_s[3] = {};
  int64_t ldq = 0, lddo = 0;

  bool tile(int64_t j0) const { return kv != nullptr && j0 % kTileKeys == 0; }
  const T* q_rows(int64_t b, int64_t h, int64_t i0) const { return q + b * q_s[0] + h * q_s[1] + i0 * q_s[2]; }
  const T* dout_rows(int64_t b, int64_t h, int64_t i0) const {
    return dout + b * do_s[0] + h * do_s[1] + i0 * do_s[2];
  }
};

// The (pointer, leading dimension) of a float32 operand that a tile of 16-bit products does not
// read, in place of its widened copy.
constexpr std::pair<const float*, int64_t> kNotWidened{nullptr, 0};

// The rows store_transposed writes out at once (a 16 x 16 transposition's).
constexpr int64_t kStoreRows = 16;

// The backward's products with P and dS on the tile unit, for the tiles whose S and dP are 16-bit
// products (BwdNative::tile): P (dropped) and dS are rounded to T, as eager attention's backward
// rounds them and as the GPU kernels do, and then
//  * dV^T += dO^T P and dK^T += Q^T dS, per chunk of 64 keys: the rounded P or dS chunk
//    [mq, 64] packed as B, the query block's dO^T or Q^T [head dim, mq] as A, so the dK/dV
//    accumulators of a task that takes these products are transposed ([head dim, keys]), and
//    its widened tiles' sgemm writes them so too;
//  * dQ += dS K with K's rows packed with K^T (PackedKV::kr); a chunk that holds keys past
//    the tile's end (which the widened product does not read either) is packed again with those
//    rows zero, so that a NaN or inf among them stays out.
// The query block's rows are padded to an even count (the tile unit multiplies pairs) with zero
// rows in A and B. Bwd16Buffers holds a task's buffers for them (cols: the widest tile's keys,
// rounded up to a chunk).
template <typename T>
struct Bwd16Buffers {
  T* qt = nullptr;      // [d, rows]: the query block's Q^T
  T* dot = nullptr;     // [dv, rows]: its dO^T
  T* p16 = nullptr;     // [rows, cols]: P rounded, zero past the tile's rows and keys
  T* ds16 = nullptr;    // [rows, cols]: dS rounded, likewise
  T* packed = nullptr;  // [rows, 64]: one packed chunk of either
  T* stage = nullptr;   // [64, 64] and [64 keys, d] (kr_cols chunks): K's rows packed again
  T* edge = nullptr;
  float* row = nullptr;  // [kStoreRows, max(d, dv)]: store_transposed's rows

  static int64_t even(int64_t n) { return n + (n & 1); }
  static int64_t floats(const AttnProblem& pb, int64_t block_q, int64_t cols) {
    const int64_t rows = even(block_q), kr_cols = (pb.d + kTileCols - 1) / kTileCols;
    return Carver::floats_for<T>(pb.d * rows) + Carver::floats_for<T>(pb.dv * rows) +
           2 * Carver::floats_for<T>(rows * cols) + Carver::floats_for<T>(rows * kTileCols) +
           Carver::floats_for<T>(kTileKeys * kTileCols) + Carver::floats_for<T>(kr_cols * kTileKeys * kTileCols) +
           Carver::round_up(kStoreRows * std::max(pb.d, pb.dv));
  }
  Bwd16Buffers() = default;
  Bwd16Buffers(Carver& carve, const AttnProblem& pb, int64_t block_q, int64_t cols) {
    const int64_t rows = even(block_q), kr_cols = (pb.d + kTileCols - 1) / kTileCols;
    qt = carve.take_as<T>(pb.d * rows);
    dot = carve.take_as<T>(pb.dv * rows);
    p16 = carve.take_as<T>(rows * cols);
    ds16 = carve.take_as<T>(rows * cols);
    packed = carve.take_as<T>(rows * kTileCols);
    stage = carve.take_as<T>(kTileKeys * kTileCols);
    edge = carve.take_as<T>(kr_cols * kTileKeys * kTileCols);
    row = carve.take(kStoreRows * std::max(pb.d, pb.dv));
  }
};

// The rounded width of a tile of nk keys in Bwd16Buffers' p16/ds16: whole chunks.
int64_t chunk_cols(int64_t nk) { return (nk + kTileKeys - 1) / kTileKeys * kTileKeys; }

// dst[c, r] = src[r, c] for the rows [0, n) of src (ld apart, cols wide); dst is [cols, rows],
// zero in the columns [n, rows).
template <typename T>
void transpose_rows(const T* src, int64_t ld, int64_t n, int64_t cols, int64_t rows, T* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(T) == 2) {
    // 32 rows x 16 columns at a time: rows 2 i and 2 i + 1 widened into the halves of 32-bit
    // pairs (vector i: column c's pair at lane c), the 16 x 16 pairs transposed (transpose16_epi32),
    // so that vector c holds column c of the 32 rows in order; rows past n read as zero.
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const int64_t block = std::min<int64_t>(32, rows - r0);
      const __mmask32 out_rows = first_lanes(block);
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int width = static_cast<int>(std::min<int64_t>(16, cols - c0));
        const __mmask16 in_cols = first_lanes(width);
        const auto row = [&](int64_t r) {
          return r < n ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in_cols, src + r * ld + c0))
                       : _mm512_setzero_si512();
        };
        __m512i v[16];
        for (int i = 0; i < 16; ++i) {
          v[i] = _mm512_or_si512(row(r0 + 2 * i), _mm512_slli_epi32(row(r0 + 2 * i + 1), 16));
        }
        transpose16_epi32(v);
        for (int c = 0; c < width; ++c) _mm512_mask_storeu_epi16(dst + (c0 + c) * rows + r0, out_rows, v[c]);
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < cols; ++c) {
    T* out = dst + c * rows;
    for (int64_t r = 0; r < n; ++r) out[r] = src[r * ld + c];
    std::fill(out + n, out + rows, T(0));
  }
}

// The [mq, nk] float32 tile src (leading dimension ld) rounded to T into dst [rows, cols], zero
// past nk and mq.
template <typename T>
void round_tile(const float* src, int64_t ld, int64_t mq, int64_t nk, int64_t rows, int64_t cols, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* out = dst + r * cols;
    const int64_t n = r < mq ? nk : 0;
    if (n > 0) round_row(src + r * ld, n, out);
    std::fill(out + n, out + cols, T(0));
  }
}

// dV^T[:, 0..nk) += dO^T P and dK^T[:, 0..nk) += Q^T dS for one tile (see Bwd16Buffers; w.qt,
// w.dot, w.p16 and w.ds16 filled, `rows` rows, p16/ds16 cols wide), into the transposed float32
// accumulators dkt [d, ...] and dvt [dv, ...] at their tile's first column (leading dimension
// ld_t).
template <typename T>
void tile_dkdv_16(int64_t d, int64_t dv, int64_t nk, int64_t rows, int64_t cols, const Bwd16Buffers<T>& w,
                  float* dkt, float* dvt, int64_t ld_t) {
  for (int64_t c0 = 0; c0 < nk; c0 += kTileKeys) {
    const int64_t n = std::min(kTileKeys, nk - c0);
    pack_pairs(w.p16 + c0, cols, rows, w.packed);
    brgemm(dv, n, rows, w.dot, rows, w.packed, true, dvt + c0, ld_t);
    pack_pairs(w.ds16 + c0, cols, rows, w.packed);
    brgemm(d, n, rows, w.qt, rows, w.packed, true, dkt + c0, ld_t);
  }
  at::native::cpublas::brgemm_release(true);
}

// dq [mq, d] += dS K for the tile of keys [j0, j0 + nk) (j0 a multiple of kTileKeys) of key/value
// head (b, hk): dS rounded in w.ds16 (cols wide), K's rows from their packed chunks, the last one
// packed again from k_rows (the head's first key row, rows ld_k apart) where it holds keys past
// the tile's end.
template <typename T>
void tile_dq_16(const AttnProblem& pb, const PackedKV<T>& kv, int64_t bkv, const T* k_rows, int64_t ld_k, int64_t j0,
                int64_t nk, int64_t mq, int64_t cols, const Bwd16Buffers<T>& w, float* dq) {
  const int64_t d = pb.d;
  // The whole chunks as one product per feature column (K = their keys; PackedKV's kr), then a
  // last chunk that holds keys past the tile's end, packed again with those rows zero.
  const int64_t whole = std::min(nk / kTileKeys * kTileKeys, pb.k_len - j0);
  const int64_t last = whole < nk ? std::min(kTileKeys, pb.k_len - j0 - whole) : 0;
  const bool partial = whole < nk && nk - whole < last;
  const int64_t run = partial ? whole : (nk + kTileKeys - 1) / kTileKeys * kTileKeys;
  if (run > 0) {
    for (int64_t f = 0; f < kv.kr_cols; ++f) {
      brgemm(mq, std::min(kTileCols, d - f * kTileCols), run, w.ds16, cols, kv.kr(bkv, j0 / kTileKeys, f), true,
             dq + f * kTileCols, d);
    }
  }
  if (partial) {
    pack_value_chunk(k_rows + (j0 + whole) * ld_k, ld_k, 0, nk - whole, d, w.stage, w.edge);
    for (int64_t f = 0; f < kv.kr_cols; ++f) {
      brgemm(mq, std::min(kTileCols, d - f * kTileCols), kTileKeys, w.ds16 + whole, cols,
             w.edge + f * kTileKeys * kTileCols, true, dq + f * kTileCols, d);
    }
  }
  at::native::cpublas::brgemm_release(true);
}

// out rows [0, n) (rows out_ld apart) = the transposed accumulator acc_t [cols, ...] (leading
// dimension ld_t) times factor, then `then` (from_float), rounded once: kStoreRows rows at a time
// through row ([kStoreRows, cols] floats), with AVX-512 gathered by 16 x 16 transpositions
// (transpose16_epi32), else element by element.
template <typename U>
void store_transposed(const float* acc_t, int64_t ld_t, int64_t n, int64_t cols, float factor, float then, U* out,
                      int64_t out_ld, float* row) {
  for (int64_t j0 = 0; j0 < n; j0 += kStoreRows) {
    const int64_t rows = std::min(kStoreRows, n - j0);
#if defined(CPU_CAPABILITY_AVX512)
    const __mmask16 keys = first_lanes(rows);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t width = std::min<int64_t>(16, cols - c0);
      __m512i r[16];
      for (int64_t c = 0; c < 16; ++c) {  // columns past cols read as zero, and are not stored
        r[c] = c < width ? _mm512_maskz_loadu_epi32(keys, acc_t + (c0 + c) * ld_t + j0) : _mm512_setzero_si512();
      }
      transpose16_epi32(r);
      const __mmask16 stored = first_lanes(width);
      for (int64_t t = 0; t < rows; ++t) _mm512_mask_storeu_epi32(row + t * cols + c0, stored, r[t]);
    }
#else
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t c = 0; c < cols; ++c) row[t * cols + c] = acc_t[c * ld_t + j0 + t];
    }
#endif
    for (int64_t t = 0; t < rows; ++t) from_float(row + t * cols, factor, out + (j0 + t) * out_ld, cols, then);
  }
}

// dV^T += dO^T P and dK^T += Q^T dS for the tile of query block (b, h, i0.., mq rows) on the tile
// unit: the block's Q and dO transposed, and P (s) and dS (ds), [mq, nk] float32 at leading
// dimension ld, rounded into w (cols wide), then tile_dkdv_16 into dkt/dvt (leading dimension ld_t).
template <typename T>
void dkdv_products_16(const AttnProblem& pb, const BwdNative<T>& nat, int64_t b, int64_t h, int64_t i0, int64_t mq,
                      const float* s, const float* ds, int64_t ld, int64_t nk, int64_t cols, const Bwd16Buffers<T>& w,
                      float* dkt, float* dvt, int64_t ld_t) {
  const int64_t rows = Bwd16Buffers<T>::even(mq);
  transpose_rows(nat.q_rows(b, h, i0), nat.ldq, mq, pb.d, rows, w.qt);
  transpose_rows(nat.dout_rows(b, h, i0), nat.lddo, mq, pb.dv, rows, w.dot);
  round_tile(s, ld, mq, nk, rows, cols, w.p16);
  round_tile(ds, ld, mq, nk, rows, cols, w.ds16);
  tile_dkdv_16(pb.d, pb.dv, nk, rows, cols, w, dkt, dvt, ld_t);
}

// dK and dV of n keys from the transposed float32 accumulators dkt [d, ...] and dvt [dv, ...]
// (leading dimension ld_t): unscaled into a split group's slots part_dk/part_dv (rows d / dv
// apart) where given, else into the outputs' rows (dk_ld / dv_ld apart), dK times dropout's
// 1 / (1 - p) and then the scale, dV times 1 / (1 - p).
template <typename T>
void store_dkdv_transposed(const AttnProblem& pb, const float* dkt, const float* dvt, int64_t ld_t, int64_t n,
                           float* part_dk, float* part_dv, T* dk_out, int64_t dk_ld, T* dv_out, int64_t dv_ld,
                           float* row) {
  const int64_t d = pb.d, dv = pb.dv;
  if (part_dk != nullptr) {
    store_transposed(dkt, ld_t, n, d, 1.f, 1.f, part_dk, std::max<int64_t>(d, 1), row);
    store_transposed(dvt, ld_t, n, dv, 1.f, 1.f, part_dv, std::max<int64_t>(dv, 1), row);
  } else {
    store_transposed(dkt, ld_t, n, d, pb.inv_keep, pb.scale, dk_out, dk_ld, row);
    store_transposed(dvt, ld_t, n, dv, pb.inv_keep, 1.f, dv_out, dv_ld, row);
  }
}

// One [mq, nk] tile of the backward (queries i0.., keys j0.., leading dimension ld): s = P =
// exp(S - lse) (times corr when not null) and dp = dO V^T, dropped as P was in the forward when
// drop_dp, by the dropout factors, which go to `factors` (leading dimension ld) for P's drop
// where not null. The products on the float32 operands q, k, v, dout, or on the 16-bit ones where
// nat.tile(j0).
template <typename T>
void tile_p_dp(const AttnProblem& pb, const BwdNative<T>& nat, int64_t bh, int64_t i0, int64_t mq, int64_t j0,
               int64_t nk, const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v, int64_t ldv,
               const float* dout, int64_t lddo, const float* lse, const float* corr, bool drop_dp, float* s,
               float* dp, int64_t ld, float* factors = nullptr) {
  const int64_t b = bh / pb.heads, h = bh % pb.heads;
  const bool native = nat.tile(j0);
  if (native) {
    const bool raw = unmasked_tile(pb, i0, j0, nk);
    masked_scores_16(pb, *nat.kv, b, h, i0, mq, j0, nk, nat.q_rows(b, h, i0), nat.ldq, s, ld, raw);
    probabilities<true>(s, mq, nk, ld, lse, corr, raw ? pb.scale : 1.f);
  } else {
    masked_scores(pb, b, h, i0, mq, j0, nk, q, ldq, k, ldk, s, ld);
    probabilities(s, mq, nk, ld, lse, corr);
  }
  if (native) {
    const int64_t bkv = b * pb.kv_heads + pb.kv(h), c0 = j0 / kTileKeys;
    products_by_key_chunk(mq, nk, pb.dv, nat.dout_rows(b, h, i0), nat.lddo,
                          [&](int64_t c) { return nat.kv->v(bkv, c0 + c, 0); }, dp, ld);
    at::native::cpublas::brgemm_release(true);
  } else {
    gemm(false, true, mq, nk, pb.dv, 1.f, dout, lddo, v, ldv, 0.f, dp, ld);
  }
  if (drop_dp && pb.dropout) {
    for (int64_t r = 0; r < mq; ++r) {
      if (factors == nullptr) {
        apply_dropout(dp + r * ld, nk, pb.seed, pb.counter(bh, i0 + r, j0), pb.dropout_p, 1.f);
        continue;
      }
      dropout_factors(factors + r * ld, nk, pb.seed, pb.counter(bh, i0 + r, j0), pb.dropout_p, 1.f);
      scale_by(dp + r * ld, factors + r * ld, nk);
    }
  }
}

// The walk of the statistics and dQ tasks over the key tiles that query block [i0, i0 + mq) of
// head bh sees (causal: up to its last query), block_k keys at a time: the block's Q and dO rows
// are loaded once, each tile's K/V rows in turn, and visit(j0, nk, k, ldk) finds tile_p_dp's P
// and dP in s and dp ([mq, nk], leading dimension block_k). The buffers come from carve. Returns
// the end of the keys walked (causal: the end of the key block holding the block's last query).
// A tile is a whole key block even where causality masks its tail: the dK/dV pass forms the same
// [mq, nk] tiles with the same GEMMs, so the statistics (and dQ) see the very S and dP that dK/dV
// see, and a row whose P is one-hot gets a dS of exactly zero in every pass, as in the plain
// softmax backward (a tile cut at the causal edge is a GEMM of another shape, whose sums BLAS may
// round differently).
template <typename T, typename Visit>
int64_t for_each_key_tile(const AttnProblem& pb, const BwdTensors& bt, const BwdNative<T>& nat, const T* q_ptr,
                          const T* k_ptr, const T* v_ptr, const T* do_ptr, int64_t bh, int64_t i0, int64_t mq,
                          int64_t block_k, const float* corr, bool drop_dp, Carver& carve, float* s, float* dp,
                          float* factors, const Visit& visit) {
  const int64_t b = bh / pb.heads, h = bh % pb.heads;
  const int64_t d = pb.d, dv = pb.dv;
  float* qbuf = carve.take(mq * d);
  float* dobuf = carve.take(mq * dv);
  float* kbuf = carve.take(block_k * d);
  float* vbuf = carve.take(block_k * dv);
  const T* kb = k_ptr + b * pb.k_s[0] + pb.kv(h) * pb.k_s[1];
  const T* vb = v_ptr + b * pb.v_s[0] + pb.kv(h) * pb.v_s[1];
  // Q and dO are widened for the first widened tile (a 16-bit one reads them in place).
  std::pair<const float*, int64_t> q = kNotWidened, dout = kNotWidened;
  const float* lse = bt.lse + bh * pb.q_len + i0;

  const int64_t k_end = pb.key_end(i0, mq);
  int64_t j0 = 0;
  for (; j0 < k_end; j0 += block_k) {
    const int64_t nk = std::min(block_k, pb.k_len - j0);
    if (!pb.keys.sees(b, h, i0, mq, j0, nk, k_end)) continue;  // the dK/dV pass skips it too
    // K (dQ's product needs it too) and V only for a widened tile: a 16-bit one reads the packed
    // K^T, V^T and K rows (BwdNative, tile_dq_16).
    const bool widened = !nat.tile(j0);
    if (widened && q.first == nullptr) {
      q = rows_as_float(q_ptr + b * pb.q_s[0] + h * pb.q_s[1], pb.q_s[2], i0, mq, d, qbuf);
      dout = rows_as_float(do_ptr + b * bt.do_s[0] + h * bt.do_s[1], bt.do_s[2], i0, mq, dv, dobuf);
    }
    auto [k, ldk] = widened ? rows_as_float(kb, pb.k_s[2], j0, nk, d, kbuf) : kNotWidened;
    auto [v, ldv] = widened ? rows_as_float(vb, pb.v_s[2], j0, nk, dv, vbuf) : kNotWidened;
    tile_p_dp(pb, nat, bh, i0, mq, j0, nk, q.first, q.second, k, ldk, v, ldv, dout.first, dout.second, lse, corr,
              drop_dp, s, dp, block_k, factors);
    visit(j0, nk, k, ldk);
  }
  return std::min(j0, pb.k_len);
}

// Adds, per row r of the [mq, nk] tiles p and dp (leading dimension ld), sum_j p to sums[r] and
// sum_j p * dp to sums[mq + r]: the former a float32 vector sum over each chunk of kBwdK keys,
// added in double, the latter (the statistics' delta) a WideDot, each product exact and summed in
// float64: a row whose P is peaked has delta ~ dP at its largest P, and dS = P (dP - delta) keeps
// only their difference, so the sum's rounding in float32 (several ulps of |delta|, from the
// lanes' partial sums and their reduction) is the error dS then carries: at 2 queries x 22 keys,
// head dim 80, scale 0.69, float32 dQ reached 6x the plain implementation's error (delta summed
// in float32 as torch's softmax backward sums it); summed so, the rounding of delta to float32 is
// what is left.
void row_sums(const float* p, const float* dp, int64_t mq, int64_t nk, int64_t ld, double* sums) {
  for (int64_t r = 0; r < mq; ++r) {
    const float* prow = p + r * ld;
    const float* dprow = dp + r * ld;
    for (int64_t j0 = 0; j0 < nk; j0 += kBwdK) {
      const int64_t end = std::min(nk, j0 + kBwdK);
      fVec ps(0.f);
      WideDot pdp;
      int64_t j = j0;
      for (; j + kLanes <= end; j += kLanes) {
        const fVec pv = fVec::loadu(prow + j);
        ps += pv;
        pdp.add(pv, fVec::loadu(dprow + j));
      }
      if (j < end) {
        const fVec pv = fVec::loadu(prow + j, end - j);
        ps += pv;
        pdp.add(pv, fVec::loadu(dprow + j, end - j));
      }
      sums[r] += reduce_sum(ps);
      sums[mq + r] += pdp.sum();
    }
  }
}

// Row r's (corr, delta) from row_sums' sums (mq rows): 1 / sum_j P_ij and sum_j P_ij dP_ij / sum_j
// P_ij; both 0 for a row that sees no key.
std::pair<float, float> corr_and_delta(const double* sums, int64_t mq, int64_t r) {
  const double c = sums[r];
  if (!(c > 0.0)) return {0.f, 0.f};
  return {static_cast<float>(1.0 / c), static_cast<float>(sums[mq + r] / c)};
}

// Row statistics of one (bh, query block) task: corr_i = 1 / sum_j exp(s_ij - lse_i) and
// delta_i = sum_j P_ij dP_ij with P_ij = exp(s_ij - lse_i) * corr_i and dP = dO V^T (dropped as P
// was). In exact arithmetic corr = 1 and delta = rowsum(dO * O) (times 1 - p with dropout);
// computed from the very P and dP the gradient passes use, they make dS = P (dP - delta) cancel
// as the plain softmax backward does: the float32 log-sum-exp is off by up to half an ulp of
// |lse| (a common relative error of the whole row of P, 5e-7 at |lse| ~ 8), and rowsum(dO * O)
// carries the forward's rounding instead of this P's, and dS amplifies either by |dP| (see the
// header comment).
template <typename T>
void attn_bwd_stats_task(const AttnProblem& pb, const BwdTensors& bt, const BwdNative<T>& nat, const T* q_ptr,
                         const T* k_ptr, const T* v_ptr, const T* do_ptr, int64_t bh, int64_t i0, int64_t mq,
                         int64_t block_k, float* scratch) {
  Carver carve{scratch};
  float* s = carve.take(mq * block_k);
  float* dp = carve.take(mq * block_k);
  double* sums = reinterpret_cast<double*>(carve.take(4 * mq));  // [mq] sum p, then [mq] sum p * dp
  std::fill(sums, sums + 2 * mq, 0.0);
  for_each_key_tile(pb, bt, nat, q_ptr, k_ptr, v_ptr, do_ptr, bh, i0, mq, block_k, nullptr, true, carve, s, dp, nullptr,
                    [&](int64_t, int64_t nk, const float*, int64_t) { row_sums(s, dp, mq, nk, block_k, sums); });
  for (int64_t r = 0; r < mq; ++r) {
    std::tie(bt.corr[bh * pb.q_len + i0 + r], bt.delta[bh * pb.q_len + i0 + r]) = corr_and_delta(sums, mq, r);
  }
}

// dK, dV of one (batch, key/value head, key block) task, accumulated over the query blocks of
// the query heads [h_begin, h_end) that read the key/value head (all of its group, or one
// head without grouping): the tiles of the statistics pass (the same query blocks, the same
// [mq, nk] GEMMs, P and dP at leading dimension block_k), so that dS cancels exactly where the
// statistics say it does (see for_each_key_tile). A grouped head's gradient is summed over its
// query heads in float32 and rounded once; with part_dk/part_dv (a group split across tasks:
// GroupSplit) the float32 sums go to the rows [j0, j0 + nk) of those [k_len, d] / [k_len, dv]
// slots instead, unscaled, for reduce_group_parts.
template <typename T>
void attn_bwd_dkdv_task(const AttnProblem& pb, const BwdTensors& bt, const BwdNative<T>& nat, const T* q_ptr,
                        const T* k_ptr, const T* v_ptr, const T* do_ptr, int64_t bkv, int64_t h_begin,
                        int64_t h_end, int64_t j0, int64_t nk, int64_t block_q, int64_t block_k, float* scratch,
                        float* part_dk, float* part_dv, T* dk_out, T* dv_out) {
  const int64_t b = bkv / pb.kv_heads, hk = bkv % pb.kv_heads;
  const int64_t d = pb.d, dv = pb.dv;
  // A 16-bit tile (BwdNative): every product on the tile unit (Bwd16Buffers), Q and dO read in
  // place, dK^T and dV^T accumulated in scratch ([d, nk], [dv, nk]) and stored transposed.
  const bool native = nat.tile(j0);
  Carver carve{scratch};
  float* kbuf = carve.take(nk * d);
  float* vbuf = carve.take(nk * dv);
  float* qbuf = carve.take(block_q * d);
  float* dobuf = carve.take(block_q * dv);
  float* s = carve.take(block_q * block_k);
  float* dp = carve.take(block_q * block_k);
  float* factors = pb.dropout ? carve.take(block_q * block_k) : nullptr;  // tile_p_dp's, for P's drop
  float* dk = part_dk != nullptr && !native ? part_dk + j0 * d : carve.take(nk * d);
  float* dvacc = part_dv != nullptr && !native ? part_dv + j0 * dv : carve.take(nk * dv);
  const int64_t cols = chunk_cols(nk);
  const Bwd16Buffers<T> w = native ? Bwd16Buffers<T>(carve, pb, block_q, cols) : Bwd16Buffers<T>();

  // K and V serve S and dP alone here: not widened where those are 16-bit products.
  auto [k, ldk] =
      native ? kNotWidened : rows_as_float(k_ptr + b * pb.k_s[0] + hk * pb.k_s[1], pb.k_s[2], j0, nk, d, kbuf);
  auto [v, ldv] =
      native ? kNotWidened : rows_as_float(v_ptr + b * pb.v_s[0] + hk * pb.v_s[1], pb.v_s[2], j0, nk, dv, vbuf);
  std::fill(dk, dk + nk * d, 0.f);
  std::fill(dvacc, dvacc + nk * dv, 0.f);
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t bh = b * pb.heads + h;
    const T* qb = q_ptr + b * pb.q_s[0] + h * pb.q_s[1];
    const T* dob = do_ptr + b * bt.do_s[0] + h * bt.do_s[1];
    const float* lse = bt.lse + bh * pb.q_len;
    const float* corr = bt.corr + bh * pb.q_len;
    const float* delta = bt.delta + bh * pb.q_len;
    // Causal: the query blocks before the one holding the block's first key see none of it.
    for (int64_t i0 = pb.causal ? j0 / block_q * block_q : 0; i0 < pb.q_len; i0 += block_q) {
      const int64_t mq = std::min(block_q, pb.q_len - i0);
      // A tile the other passes skip (for_each_key_tile): P = 0 there, so dK and dV get nothing.
      if (!pb.keys.sees(b, h, i0, mq, j0, nk, pb.key_end(i0, mq))) continue;
      auto [q, ldq] = native ? kNotWidened : rows_as_float(qb, pb.q_s[2], i0, mq, d, qbuf);
      auto [dout, lddo] = native ? kNotWidened : rows_as_float(dob, bt.do_s[2], i0, mq, dv, dobuf);
      tile_p_dp(pb, nat, bh, i0, mq, j0, nk, q, ldq, k, ldk, v, ldv, dout, lddo, lse + i0, corr + i0, true, s, dp,
                block_k, factors);
      score_gradient(mq, nk, s, dp, block_k, delta + i0, factors);
      if (native) {
        dkdv_products_16(pb, nat, b, h, i0, mq, s, dp, block_k, nk, cols, w, dk, dvacc, nk);
      } else {
        gemm(true, false, nk, dv, mq, 1.f, s, block_k, dout, lddo, 1.f, dvacc, dv);
        gemm(true, false, nk, d, mq, 1.f, dp, block_k, q, ldq, 1.f, dk, d);
      }
    }
  }
  if (native) {  // dk, dvacc are [d, nk], [dv, nk]
    const bool split = part_dk != nullptr;
    store_dkdv_transposed(pb, dk, dvacc, nk, nk, split ? part_dk + j0 * d : nullptr,
                          split ? part_dv + j0 * dv : nullptr,
                          split ? nullptr : dk_out + b * bt.dk_s[0] + hk * bt.dk_s[1] + j0 * bt.dk_s[2], bt.dk_s[2],
                          split ? nullptr : dv_out + b * bt.dv_s[0] + hk * bt.dv_s[1] + j0 * bt.dv_s[2], bt.dv_s[2],
                          w.row);
    return;
  }
  if (part_dk != nullptr) return;
  T* dkb = dk_out + b * bt.dk_s[0] + hk * bt.dk_s[1];
  T* dvb = dv_out + b * bt.dv_s[0] + hk * bt.dv_s[1];
  for (int64_t t = 0; t < nk; ++t) {
    from_float(dk + t * d, pb.inv_keep, dkb + (j0 + t) * bt.dk_s[2], d, pb.scale);
    from_float(dvacc + t * dv, pb.inv_keep, dvb + (j0 + t) * bt.dv_s[2], dv);
  }
}

// dQ (and grad_scores) of one (bh, query block) task, accumulated over the key blocks.
template <typename T>
void attn_bwd_dq_task(const AttnProblem& pb, const BwdTensors& bt, const BwdNative<T>& nat, const T* q_ptr,
                      const T* k_ptr, const T* v_ptr, const T* do_ptr, int64_t bh, int64_t i0, int64_t mq,
                      int64_t block_k, float* scratch, T* dq_out) {
  const int64_t b = bh / pb.heads, h = bh % pb.heads;
  const int64_t d = pb.d, bkv = b * pb.kv_heads + pb.kv(h);
  Carver carve{scratch};
  float* s = carve.take(mq * block_k);
  float* dp = carve.take(mq * block_k);
  float* dq = carve.take(mq * d);
  float* factors = pb.dropout ? carve.take(mq * block_k) : nullptr;  // tile_p_dp's, for P's drop
  std::fill(dq, dq + mq * d, 0.f);
  const float* corr = bt.corr + bh * pb.q_len + i0;
  const float* delta = bt.delta + bh * pb.q_len + i0;
  float* dscores = bt.dscores != nullptr ? bt.dscores + (bh * pb.q_len + i0) * pb.k_len : nullptr;
  const int64_t cols = chunk_cols(block_k);
  const Bwd16Buffers<T> w = nat.kv != nullptr ? Bwd16Buffers<T>(carve, pb, mq, cols) : Bwd16Buffers<T>();
  const T* k_rows = k_ptr + b * pb.k_s[0] + pb.kv(h) * pb.k_s[1];

  const auto visit = [&](int64_t j0, int64_t nk, const float* k, int64_t ldk) {
    score_gradient(mq, nk, s, dp, block_k, delta, factors);
    if (dscores != nullptr) {
      for (int64_t r = 0; r < mq; ++r) from_float(dp + r * block_k, pb.inv_keep, dscores + r * pb.k_len + j0, nk);
    }
    if (nat.tile(j0)) {
      round_tile(dp, block_k, mq, nk, mq, cols, w.ds16);
      tile_dq_16(pb, *nat.kv, bkv, k_rows, pb.k_s[2], j0, nk, mq, cols, w, dq);
    } else {
      gemm(false, false, mq, d, nk, 1.f, dp, block_k, k, ldk, 1.f, dq, d);
    }
  };
  const int64_t k_end = for_each_key_tile(pb, bt, nat, q_ptr, k_ptr, v_ptr, do_ptr, bh, i0, mq, block_k, corr, true,
                                          carve, s, dp, factors, visit);
  // Causal: the key blocks after the one holding the block's last query were not walked.
  if (dscores != nullptr && k_end < pb.k_len) {
    for (int64_t r = 0; r < mq; ++r) std::fill(dscores + r * pb.k_len + k_end, dscores + (r + 1) * pb.k_len, 0.f);
  }
  T* dqb = dq_out + b * bt.dq_s[0] + h * bt.dq_s[1];
  for (int64_t r = 0; r < mq; ++r) from_float(dq + r * d, pb.inv_keep, dqb + (i0 + r) * bt.dq_s[2], d, pb.scale);
}

// dQ, dK, dV (and grad_scores) of one whole head, query blocks outer: a block's scores against
// every key it sees are formed at once, S = Q_blk K^T and dP = dO_blk V^T ([block_q, k_len] each,
// in the task's scratch), so the row statistics come from the very P and dP the gradients use
// before any gradient is formed, with no pass of their own: corr = 1 / sum_j P_ij renormalises
// P = exp(s - lse) and delta = sum_j P_ij dP_ij (both in double across the row). Then
// dS = P (dP - delta), dQ_blk = dS K (complete: written out at once), and dK += dS^T Q_blk,
// dV += P^T dO_blk into float32 head accumulators ([k_len, head_dim]; the dK/dV outputs
// themselves for float32 with a BLAS-compatible stride). Five GEMMs per tile, each as wide as the
// whole key range. Scratch O(block_q x k_len + k_len x head_dim) per thread; used when there are
// enough heads to keep every thread busy. A task owns a key/value head (bkv: batch * kv_heads + its
// index) and walks the query heads [h_begin, h_end) that read it (its whole group, or one head
// without grouping), whose dK/dV it sums in the float32 accumulators; with part_dk/part_dv (a
// group split across tasks: GroupSplit) those are the task's [k_len, d] / [k_len, dv] slots,
// left unscaled for reduce_group_parts.
template <typename T>
void attn_bwd_head_task(const AttnProblem& pb, const BwdTensors& bt, const BwdNative<T>& call_nat, const T* q_ptr,
                        const T* k_ptr, const T* v_ptr, const T* do_ptr, int64_t bkv, int64_t h_begin,
                        int64_t h_end, int64_t block_q, float* scratch, bool copy_k, bool copy_v, bool dkdv_in_place,
                        float* part_dk, float* part_dv, T* dq_out, T* dk_out, T* dv_out) {
  const int64_t b = bkv / pb.kv_heads, hk = bkv % pb.kv_heads;
  const int64_t d = pb.d, dv = pb.dv, k_len = pb.k_len;
  // With 16-bit products (BwdNative) the dK/dV accumulators are transposed ([d, k_len], [dv,
  // k_len]; Bwd16Buffers) for every tile, and K and V are widened only where a tile may start off
  // a chunk (a boolean mask's key ranges).
  const bool t16 = call_nat.kv != nullptr;
  const bool widen_kv = !t16 || pb.keys.active;
  Carver carve{scratch};
  // K and V packed for the 16-bit products: this task's head alone, into its scratch, where the
  // call packed none (call_nat.kv a layout without storage; attention_bwd_cpu).
  BwdNative<T> nat = call_nat;
  PackedKV<T> own;
  if (t16 && call_nat.kv->k_packed == nullptr) {
    own = PackedKV<T>(k_len, d, dv, /*backward=*/true, bkv, 1);
    own.place(carve.take_as<T>(own.elements()));
    nat.kv = &own;
  }
  float* kbuf = carve.take(copy_k && widen_kv ? k_len * d : 0);  // rows_as_float copies exactly when copy_k
  float* vbuf = carve.take(copy_v && widen_kv ? k_len * dv : 0);
  float* qbuf = carve.take(block_q * d);
  float* dobuf = carve.take(block_q * dv);
  float* s = carve.take(block_q * k_len);
  float* dp = carve.take(block_q * k_len);
  float* dq = carve.take(block_q * d);
  float* factors = pb.dropout ? carve.take(block_q * k_len) : nullptr;  // tile_p_dp's, for P's drop
  double* sums = reinterpret_cast<double*>(carve.take(4 * block_q));  // [mq] sum p, then [mq] sum p * dp
  T* dkb = dk_out + b * bt.dk_s[0] + hk * bt.dk_s[1];
  T* dvb = dv_out + b * bt.dv_s[0] + hk * bt.dv_s[1];
  float* dk_acc;
  float* dv_acc;
  int64_t ld_dk, ld_dv;
  if (t16) {
    dk_acc = carve.take(d * k_len);
    dv_acc = carve.take(dv * k_len);
    ld_dk = ld_dv = k_len;
  } else if (part_dk != nullptr) {
    dk_acc = part_dk;
    dv_acc = part_dv;
    ld_dk = std::max<int64_t>(d, 1);
    ld_dv = std::max<int64_t>(dv, 1);
  } else if (dkdv_in_place) {  // T is float here
    dk_acc = reinterpret_cast<float*>(dkb);
    dv_acc = reinterpret_cast<float*>(dvb);
    ld_dk = bt.dk_s[2];
    ld_dv = bt.dv_s[2];
  } else {
    dk_acc = carve.take(k_len * d);
    dv_acc = carve.take(k_len * dv);
    ld_dk = std::max<int64_t>(d, 1);
    ld_dv = std::max<int64_t>(dv, 1);
  }
  const Bwd16Buffers<T> w = t16 ? Bwd16Buffers<T>(carve, pb, block_q, chunk_cols(k_len)) : Bwd16Buffers<T>();
  if (nat.kv == &own) {
    for (int64_t c = 0; c < own.chunks; ++c) pack_key_chunk(pb, own, k_ptr, v_ptr, true, bkv, c, w.stage);
  }
  if (t16) {
    std::fill(dk_acc, dk_acc + d * k_len, 0.f);
    std::fill(dv_acc, dv_acc + dv * k_len, 0.f);
  } else {
    for (int64_t j = 0; j < k_len; ++j) {
      std::fill(dk_acc + j * ld_dk, dk_acc + j * ld_dk + d, 0.f);
      std::fill(dv_acc + j * ld_dv, dv_acc + j * ld_dv + dv, 0.f);
    }
  }

  const T* k_rows = k_ptr + b * pb.k_s[0] + hk * pb.k_s[1];
  auto [k, ldk] = widen_kv ? rows_as_float(k_rows, pb.k_s[2], 0, k_len, d, kbuf) : kNotWidened;
  auto [v, ldv] =
      widen_kv ? rows_as_float(v_ptr + b * pb.v_s[0] + hk * pb.v_s[1], pb.v_s[2], 0, k_len, dv, vbuf) : kNotWidened;
  for (int64_t h = h_begin; h < h_end; ++h) {
    const int64_t bh = b * pb.heads + h;
    const T* qb = q_ptr + b * pb.q_s[0] + h * pb.q_s[1];
    const T* dob = do_ptr + b * bt.do_s[0] + h * bt.do_s[1];
    T* dqb = dq_out + b * bt.dq_s[0] + h * bt.dq_s[1];
    const float* lse = bt.lse + bh * pb.q_len;
    float* dscores = bt.dscores != nullptr ? bt.dscores + bh * pb.q_len * k_len : nullptr;

    for (int64_t i0 = 0; i0 < pb.q_len; i0 += block_q) {
      const int64_t mq = std::min(block_q, pb.q_len - i0);
      // Causal: the block's last query sees keys [0, i0 + mq); the others are masked in S. A
      // boolean mask's range of keys the block sees (KeySpans) cuts it to [j0, j0 + nk).
      const auto [j0, k_end] = pb.keys.range(b, h, i0, mq, pb.key_end(i0, mq));
      const int64_t nk = std::max<int64_t>(k_end - j0, 0);
      if (dscores != nullptr && nk < k_len) {  // zeros outside [j0, k_end), everywhere when nk == 0
        const int64_t seen_begin = nk ? j0 : k_len, seen_end = nk ? k_end : k_len;
        for (int64_t r = 0; r < mq; ++r) {
          float* row = dscores + (i0 + r) * k_len;
          std::fill(row, row + seen_begin, 0.f);
          std::fill(row + seen_end, row + k_len, 0.f);
        }
      }
      if (nk == 0) {
        for (int64_t r = 0; r < mq; ++r) std::fill(dqb + (i0 + r) * bt.dq_s[2], dqb + (i0 + r) * bt.dq_s[2] + d, T(0));
        continue;
      }
      const bool native = nat.tile(j0);
      auto [q, ldq] = native ? kNotWidened : rows_as_float(qb, pb.q_s[2], i0, mq, d, qbuf);
      auto [dout, lddo] = native ? kNotWidened : rows_as_float(dob, bt.do_s[2], i0, mq, dv, dobuf);
      const float* kt = native ? nullptr : k + j0 * ldk;
      const float* vt = native ? nullptr : v + j0 * ldv;
      tile_p_dp(pb, nat, bh, i0, mq, j0, nk, q, ldq, kt, ldk, vt, ldv, dout, lddo, lse + i0, nullptr, true, s, dp, nk,
                factors);
      std::fill(sums, sums + 2 * mq, 0.0);
      row_sums(s, dp, mq, nk, nk, sums);
      for (int64_t r = 0; r < mq; ++r) {
        float* prow = s + r * nk;
        float* dprow = dp + r * nk;
        const auto [corr, delta] = corr_and_delta(sums, mq, r);
        const fVec cv(corr), dl(delta);
        // P *= corr; dS = P (dP - delta) over dP (already dropped); P then dropped for dV.
        int64_t j = 0;
        for (; j + kLanes <= nk; j += kLanes) {
          const fVec pv = fVec::loadu(prow + j) * cv;
          pv.store(prow + j);
          (pv * (fVec::loadu(dprow + j) - dl)).store(dprow + j);
        }
        if (j < nk) {
          const fVec pv = fVec::loadu(prow + j, nk - j) * cv;
          pv.store(prow + j, nk - j);
          (pv * (fVec::loadu(dprow + j, nk - j) - dl)).store(dprow + j, nk - j);
        }
        if (pb.dropout) scale_by(prow, factors + r * nk, nk);
        if (dscores != nullptr) from_float(dprow, pb.inv_keep, dscores + (i0 + r) * k_len + j0, nk);
      }
      if (native) {
        const int64_t cols = chunk_cols(nk);
        dkdv_products_16(pb, nat, b, h, i0, mq, s, dp, nk, nk, cols, w, dk_acc + j0, dv_acc + j0, k_len);
        std::fill(dq, dq + mq * d, 0.f);
        tile_dq_16(pb, *nat.kv, bkv, k_rows, pb.k_s[2], j0, nk, mq, cols, w, dq);
      } else {
        if (t16) {  // transposed accumulators: dV^T += dO^T P, dK^T += Q^T dS
          gemm(true, false, dv, nk, mq, 1.f, dout, lddo, s, nk, 1.f, dv_acc + j0, ld_dv);
          gemm(true, false, d, nk, mq, 1.f, q, ldq, dp, nk, 1.f, dk_acc + j0, ld_dk);
        } else {
          gemm(true, false, nk, dv, mq, 1.f, s, nk, dout, lddo, 1.f, dv_acc + j0 * ld_dv, ld_dv);
          gemm(true, false, nk, d, mq, 1.f, dp, nk, q, ldq, 1.f, dk_acc + j0 * ld_dk, ld_dk);
        }
        gemm(false, false, mq, d, nk, 1.f, dp, nk, kt, ldk, 0.f, dq, std::max<int64_t>(d, 1));
      }
      for (int64_t r = 0; r < mq; ++r) from_float(dq + r * d, pb.inv_keep, dqb + (i0 + r) * bt.dq_s[2], d, pb.scale);
    }
  }
  if (t16) {
    store_dkdv_transposed(pb, dk_acc, dv_acc, k_len, k_len, part_dk, part_dv, dkb, bt.dk_s[2], dvb, bt.dv_s[2], w.row);
    return;
  }
  if (part_dk != nullptr) return;
  for (int64_t j = 0; j < k_len; ++j) {
    from_float(dk_acc + j * ld_dk, pb.inv_keep, dkb + j * bt.dk_s[2], d, pb.scale);
    from_float(dv_acc + j * ld_dv, pb.inv_keep, dvb + j * bt.dv_s[2], dv);  // in place where dkdv_in_place
  }
}

// Grouped-query backward with fewer dK/dV tasks than threads (`units`: the key/value heads, or in
// the per-block passes their key blocks): each group's query heads are split into `splits` chunks
// of `chunk` heads (the last one shorter), one task each, so that the threads stay busy; a chunk
// sums its dK/dV in a float32 slot of its own ([slots, k_len, d] and [slots, k_len, dv], slot =
// bkv * splits + chunk index), and reduce_group_parts adds a head's slots in order and rounds once.
// Without grouping, or with units enough: one chunk, the whole group, and no slots.
struct GroupSplit {
  int64_t splits, chunk;
  GroupSplit(const AttnProblem& pb, int64_t units, int64_t threads) {
    const int64_t per_unit = (threads + units - 1) / std::max<int64_t>(units, 1);
    const int64_t wanted = std::min(pb.group, std::max<int64_t>(1, per_unit));
    chunk = (pb.group + wanted - 1) / wanted;
    splits = (pb.group + chunk - 1) / chunk;  // no empty chunk
  }
  // The query heads of slot `slot`'s chunk: [begin, end).
  std::pair<int64_t, int64_t> heads(const AttnProblem& pb, int64_t slot) const {
    const int64_t hk = slot / splits % pb.kv_heads;
    const int64_t begin = hk * pb.group + slot % splits * chunk;
    return {begin, std::min(begin + chunk, (hk + 1) * pb.group)};
  }
};

// dK = sum of the slots / (1 - p) * scale, dV = sum of the slots / (1 - p), per key row, rounded
// once into the outputs: each key/value head's later slots are added into its first, in slot order.
template <typename T>
void reduce_group_parts(const AttnProblem& pb, const BwdTensors& bt, int64_t splits, float* part_dk, float* part_dv,
                        T* dk_out, T* dv_out) {
  const int64_t d = pb.d, dv = pb.dv, k_len = pb.k_len;
  at::parallel_for(0, pb.batch * pb.kv_heads * k_len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bkv = r / k_len, j = r % k_len;
      const int64_t b = bkv / pb.kv_heads, hk = bkv % pb.kv_heads;
      for (auto [part, cols, then, out, st] :
           {std::tuple<float*, int64_t, float, T*, const int64_t*>{part_dk, d, pb.scale, dk_out, bt.dk_s},
            {part_dv, dv, 1.f, dv_out, bt.dv_s}}) {
        float* sum = part + (bkv * splits * k_len + j) * cols;
        for (int64_t sp = 1; sp < splits; ++sp) {
          const float* src = sum + sp * k_len * cols;
          for (int64_t c = 0; c < cols; ++c) sum[c] += src[c];
        }
        from_float(sum, pb.inv_keep, out + b * st[0] + hk * st[1] + j * st[2], cols, then);
      }
    }
  });
}

void check_like_output(const at::Tensor& t, const char* name, const at::Tensor& query, int64_t dv) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == query.size(0) && t.size(1) == query.size(1) && t.size(2) == query.size(2) &&
                  t.size(3) == dv,
              name, " must have shape [", query.size(0), ", ", query.size(1), ", ", query.size(2), ", ", dv, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have dtype ", query.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride along its last dim, got strides ",
              t.strides());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& lse, double scale, bool is_causal,
    double dropout_p, const std::optional<at::Tensor>& seed, bool mask_needs_grad) {
  const AttnProblem pb = make_problem(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  check_like_output(grad_out, "grad_out", query, pb.dv);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == pb.batch && lse.size(1) == pb.heads && lse.size(2) == pb.q_len,
              "lse must have shape [", pb.batch, ", ", pb.heads, ", ", pb.q_len, "], got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous() && lse.device().is_cpu(), "lse must be a contiguous CPU tensor");
  TORCH_CHECK(!mask_needs_grad || (attn_mask.has_value() && attn_mask->defined()),
              "mask_needs_grad is true but attn_mask is None");

  // Gradients take the layout of their inputs (what the registered fake kernel, empty_like,
  // promises); the kernels write them through their strides.
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk = at::empty_like(key);
  at::Tensor dv = at::empty_like(value);
  at::Tensor dscores = mask_needs_grad
                           ? at::empty({pb.batch, pb.heads, pb.q_len, pb.k_len}, query.options().dtype(at::kFloat))
                           : at::empty({0}, query.options());
  const int64_t bh_count = pb.bh();
  // No query head (grouped, key/value may still have some): nothing reads key/value.
  if (bh_count == 0) return {dq, dk.zero_(), dv.zero_(), dscores};
  const int64_t kv_count = pb.batch * pb.kv_heads;

  at::Tensor stats = at::empty({2, bh_count * pb.q_len}, query.options().dtype(at::kFloat));
  BwdTensors bt{};
  for (int i = 0; i < 3; ++i) {
    bt.do_s[i] = grad_out.stride(i);
    bt.dq_s[i] = dq.stride(i);
    bt.dk_s[i] = dk.stride(i);
    bt.dv_s[i] = dv.stride(i);
  }
  bt.lse = lse.const_data_ptr<float>();
  bt.corr = stats.mutable_data_ptr<float>();
  bt.delta = bt.corr + bh_count * pb.q_len;
  bt.dscores = mask_needs_grad ? dscores.mutable_data_ptr<float>() : nullptr;

  // A (key/value head, chunk of its query heads) per task (5 GEMMs per tile, statistics included)
  // when those tasks alone keep the threads evenly busy: ceil(tasks / threads) tasks of chunk heads
  // at cost 5 against heads / threads of the three passes' 9 (statistics 2, dK/dV 4, dQ 3).
  // Without grouping a chunk is one head and a task one head.
  const int64_t threads = at::get_num_threads();
  const GroupSplit head_split(pb, kv_count, threads);
  const int64_t head_slots = kv_count * head_split.splits;
  const bool per_head = (head_slots + threads - 1) / threads * threads * head_split.chunk * 5 <= 9 * bh_count;
  // The per-block passes' dK/dV tasks are (slot, key block) pairs: a group is split there only when
  // the key/value heads' key blocks alone are too few for the threads.
  const GroupSplit split = per_head ? head_split : GroupSplit(pb, kv_count * ((pb.k_len + kBwdK - 1) / kBwdK), threads);
  const int64_t slots = kv_count * split.splits;
  const int64_t block_q =
      std::max<int64_t>(1, std::min(per_head ? kBwdHeadQ : query_block(kBwdQ, bh_count, pb.q_len), pb.q_len));
  const int64_t block_k = std::max<int64_t>(1, std::min(query_block(kBwdK, slots, pb.k_len), pb.k_len));
  // A split group's float32 dK/dV slots (GroupSplit), summed into dK/dV at the end.
  at::Tensor parts = split.splits > 1
                         ? at::empty({slots * pb.k_len * (pb.d + pb.dv)}, query.options().dtype(at::kFloat))
                         : at::Tensor();
  float* part_dk = parts.defined() ? parts.mutable_data_ptr<float>() : nullptr;
  float* part_dv = parts.defined() ? part_dk + slots * pb.k_len * pb.d : nullptr;
  const auto slot_parts = [&](int64_t slot) -> std::pair<float*, float*> {
    if (part_dk == nullptr) return {nullptr, nullptr};
    return {part_dk + slot * pb.k_len * pb.d, part_dv + slot * pb.k_len * pb.dv};
  };
  const int64_t nq = (pb.q_len + block_q - 1) / block_q;
  const int64_t nk = (pb.k_len + block_k - 1) / block_k;
  // P and dP tiles, and the dropout factors (tile_p_dp's, for P's drop) with dropout.
  const int64_t tile = Carver::round_up(block_q * block_k);
  const int64_t tiles = (pb.dropout ? 3 : 2) * tile;
  const int64_t scratch_dkdv = Carver::round_up(block_k * pb.d) * 2 + Carver::round_up(block_k * pb.dv) * 2 +
                               Carver::round_up(block_q * pb.d) + Carver::round_up(block_q * pb.dv) + tiles;
  const int64_t scratch_dq = Carver::round_up(block_q * pb.d) * 2 + Carver::round_up(block_q * pb.dv) +
                             Carver::round_up(block_k * pb.d) + Carver::round_up(block_k * pb.dv) + tiles +
                             Carver::round_up(4 * block_q);

  AT_DISPATCH_V2(query.scalar_type(), "attention_bwd_cpu", AT_WRAP([&] {
    const scalar_t* qp = query.const_data_ptr<scalar_t>();
    const scalar_t* kp = key.const_data_ptr<scalar_t>();
    const scalar_t* vp = value.const_data_ptr<scalar_t>();
    const scalar_t* dop = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
    scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
    scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
    // 16-bit products (BwdNative): Q and dO rows read in place (in_place_ld).
    BwdNative<scalar_t> nat;
    PackedKV<scalar_t> kv;
    const int64_t ldq16 = in_place_ld(pb.q_len, pb.q_s[2], pb.d), lddo16 = in_place_ld(pb.q_len, bt.do_s[2], pb.dv);
    if (native_products(query.scalar_type(), pb.d) && pb.dv % 2 == 0 && pb.k_len > 0 && ldq16 > 0 && lddo16 > 0) {
      // The per-head tasks pack their own head (attn_bwd_head_task): K and V are then never
      // packed whole (at 2048 keys, 12 heads of 64, 9 MiB of bfloat16 less at the backward's peak).
      kv = per_head ? PackedKV<scalar_t>(pb.k_len, pb.d, pb.dv, /*backward=*/true, 0, 1)
                    : pack_keys(pb, kp, vp, /*backward=*/true);
      nat.kv = &kv;
      nat.q = qp;
      nat.dout = dop;
      for (int i = 0; i < 3; ++i) {
        nat.q_s[i] = pb.q_s[i];
        nat.do_s[i] = bt.do_s[i];
      }
      nat.ldq = ldq16;
      nat.lddo = lddo16;
    }
    if (per_head) {
      constexpr bool kFloat = std::is_same_v<scalar_t, float>;
      const auto blas_ld = [](int64_t stride, int64_t cols) {
        return stride >= std::max<int64_t>(cols, 1) && stride <= kBlasMax;
      };
      const bool in_place =
          kFloat && split.splits == 1 && blas_ld(dk.stride(2), pb.d) && blas_ld(dv.stride(2), pb.dv);
      const bool copy_k = !(kFloat && blas_ld(pb.k_s[2], pb.d));
      const bool copy_v = !(kFloat && blas_ld(pb.v_s[2], pb.dv));
      const int64_t scratch_head =
          Carver::round_up(copy_k ? pb.k_len * pb.d : 0) + Carver::round_up(copy_v ? pb.k_len * pb.dv : 0) +
          Carver::round_up(block_q * pb.d) * 2 + Carver::round_up(block_q * pb.dv) +
          Carver::round_up(block_q * pb.k_len) * (pb.dropout ? 3 : 2) + Carver::round_up(4 * block_q) +
          (in_place || (parts.defined() && nat.kv == nullptr)
               ? 0
               : Carver::round_up(pb.k_len * pb.d) + Carver::round_up(pb.k_len * pb.dv)) +
          (nat.kv != nullptr ? Bwd16Buffers<scalar_t>::floats(pb, block_q, chunk_cols(pb.k_len)) +
                                   Carver::floats_for<scalar_t>(kv.elements())
                             : 0);
      run_tasks(slots, scratch_head, [&](int64_t slot, float* buf) {
        const auto [h_begin, h_end] = split.heads(pb, slot);
        const auto [pdk, pdv] = slot_parts(slot);
        attn_bwd_head_task<scalar_t>(pb, bt, nat, qp, kp, vp, dop, slot / split.splits, h_begin, h_end, block_q, buf,
                                     copy_k, copy_v, in_place, pdk, pdv, dqp, dkp, dvp);
      });
      if (parts.defined()) reduce_group_parts(pb, bt, split.splits, part_dk, part_dv, dkp, dvp);
      return;
    }
    const int64_t scratch_16 =
        nat.kv != nullptr ? Bwd16Buffers<scalar_t>::floats(pb, block_q, chunk_cols(block_k)) : 0;
    // Pass 0: the row statistics (corr, delta) per query block.
    run_tasks(bh_count * nq, scratch_dq, [&](int64_t task, float* buf) {
      const int64_t bh = pb.causal ? task % bh_count : task / nq;
      const int64_t qi = pb.causal ? nq - 1 - task / bh_count : task % nq;
      const int64_t i0 = qi * block_q;
      attn_bwd_stats_task<scalar_t>(pb, bt, nat, qp, kp, vp, dop, bh, i0, std::min(block_q, pb.q_len - i0), block_k,
                                    buf);
    });
    // Pass 1: dK, dV per (key/value head, chunk of its query heads, key block). Causal: the first
    // key blocks are seen by the most queries.
    run_tasks(slots * nk, scratch_dkdv + scratch_16, [&](int64_t task, float* buf) {
      const int64_t slot = pb.causal ? task % slots : task / nk;
      const int64_t kj = pb.causal ? task / slots : task % nk;
      const int64_t j0 = kj * block_k;
      const auto [h_begin, h_end] = split.heads(pb, slot);
      const auto [pdk, pdv] = slot_parts(slot);
      attn_bwd_dkdv_task<scalar_t>(pb, bt, nat, qp, kp, vp, dop, slot / split.splits, h_begin, h_end, j0,
                                   std::min(block_k, pb.k_len - j0), block_q, block_k, buf, pdk, pdv, dkp, dvp);
    });
    if (parts.defined()) reduce_group_parts(pb, bt, split.splits, part_dk, part_dv, dkp, dvp);
    // Pass 2: dQ (and grad_scores) per query block.
    run_tasks(bh_count * nq, scratch_dq + scratch_16, [&](int64_t task, float* buf) {
      const int64_t bh = pb.causal ? task % bh_count : task / nq;
      const int64_t qi = pb.causal ? nq - 1 - task / bh_count : task % nq;
      const int64_t i0 = qi * block_q;
      attn_bwd_dq_task<scalar_t>(pb, bt, nat, qp, kp, vp, dop, bh, i0, std::min(block_q, pb.q_len - i0), block_k, buf,
                                 dqp);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {dq, dk, dv, dscores};
}

// ---------------------------------------------------------------------------------------------
// Softmax

template <typename T>
void softmax_fwd_rows(const at::Tensor& input, const MaskView& mask, float scale, bool causal, int64_t begin,
                      int64_t end, float* work_buf, T* out) {
  const int64_t dim_b = input.size(1), dim_m = input.size(2), n = input.size(3);
  const int64_t sa = input.stride(0), sb = input.stride(1), sm = input.stride(2), sn = input.stride(3);
  const T* x = input.const_data_ptr<T>();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t i = row % dim_m, ab = row / dim_m, a = ab / dim_b, b = ab % dim_b;
    const T* xr = x + a * sa + b * sb + i * sm;
    T* yr = out + row * n;
    float* w = std::is_same_v<T, float> ? reinterpret_cast<float*>(yr) : work_buf;
    if (sn == 1) {
      to_float(xr, w, n);
    } else {
      for (int64_t j = 0; j < n; ++j) w[j] = static_cast<float>(xr[j * sn]);
    }
    scale_row(w, n, scale);
    if (mask.kind != MaskKind::kNone) apply_mask(w, n, mask, mask.row(a, b, i), 0);
    if (causal) apply_causal(w, n, i, 0);
    const float mx = row_max(w, n);
    const float total = exp_shift_sum(w, n, mx == -kInf ? 0.f : mx);
    from_float(w, total == 0.f ? 0.f : 1.f / total, yr, n);
  }
}

at::Tensor softmax_fwd_cpu(const at::Tensor& input, const std::optional<at::Tensor>& mask, double scale,
                           bool is_causal) {
  TORCH_CHECK(input.dim() == 4, "input must be 4-D [A, B, M, N], got ", input.dim(), " dimensions");
  TORCH_CHECK(input.device().is_cpu(), "input must be a CPU tensor, got ", input.device());
  TORCH_CHECK(is_supported_float(input.scalar_type()), "input must be float32, float16 or bfloat16, got ",
              input.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->device().is_cpu(), "mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(is_mask_dtype(mask->scalar_type()), "mask must be bool, float32, float16, bfloat16 or float64, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->sizes() == input.sizes(), "mask must be expanded to the input's shape ", input.sizes(),
                ", got ", mask->sizes());
  }
  at::Tensor out = at::empty(input.sizes(), input.options());
  const int64_t n = input.size(3);
  const int64_t rows = input.size(0) * input.size(1) * input.size(2);
  if (rows == 0 || n == 0) return out;
  const MaskView mv = make_mask_view(mask);
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  AT_DISPATCH_V2(input.scalar_type(), "softmax_fwd_cpu", AT_WRAP([&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      at::Tensor work;
      float* wp = nullptr;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        work = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
        wp = work.mutable_data_ptr<float>();
      }
      softmax_fwd_rows<scalar_t>(input, mv, static_cast<float>(scale), is_causal, begin, end, wp, op);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

// The softmax backward's row term sum_j y_j dy_j / sum_j y_j: the dot of the saved probabilities with
// dy, over their own sum (segments as the row sums above; 0 for a row without weight, one fully
// masked). Divided by the sum, dy_k - term = sum_j y_j (dy_k - dy_j) / sum_j y_j exactly, so where a
// row puts (nearly) all its weight on one element the difference no longer cancels the stored
// probabilities' rounding into it: their sum misses 1 by it, which dy_k - sum_j y_j dy_j takes at dy's
// scale (float16: 5e-4 |dy| where the true difference is (1 - y_k) |dy|, 50x the reference's error on
// peaked rows), and which this term divides out. Float32 gains the same way, at its own rounding.
template <typename T>
float softmax_row_term(const T* y, const T* dy, int64_t n) {
  namespace cr = cpu_rows;
  constexpr int P = cr::kParts<T>;
  constexpr int C = cr::kChainsFor<P>;
  cr::RowSum<C, P> dot, total;
  cr::for_each_block<cr::kBlock<T>, C>(
      n,
      [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
        fVec yv[P], dyv[P];
        cr::load_block<P>(y + j, len, yv);
        cr::load_block<P>(dy + j, len, dyv);
        for (int k = 0; k < P; ++k) {
          dot.acc[c][k] = at::vec::fmadd(yv[k], dyv[k], dot.acc[c][k]);
          total.acc[c][k] += yv[k];
        }
      },
      [&] {
        dot.end_segment();
        total.end_segment();
      });
  return total.total > 0.0 ? static_cast<float>(dot.total / total.total) : 0.f;
}

// Rows [begin, end) of dx = scale * y * (dy - term), in two passes over y and dy (the term, then the
// gradient) read as T and widened in registers, with no row buffer; dscores (float32, when not
// null) gets y * (dy - term) unscaled.
template <typename T>
void softmax_bwd_rows(const T* dy, const T* y, int64_t n, float scale, int64_t begin, int64_t end, T* dx,
                      float* dscores) {
  namespace cr = cpu_rows;
  constexpr int P = cr::kParts<T>;
  const fVec f(scale);
  for (int64_t row = begin; row < end; ++row) {
    const T* yr = y + row * n;
    const T* dyr = dy + row * n;
    T* dxr = dx + row * n;
    float* dsr = dscores == nullptr ? nullptr : dscores + row * n;
    const fVec term(softmax_row_term(yr, dyr, n));
    cr::for_each_block<cr::kBlock<T>>(n, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
      fVec yv[P], dyv[P], g[P], gx[P];
      cr::load_block<P>(yr + j, len, yv);
      cr::load_block<P>(dyr + j, len, dyv);
      for (int k = 0; k < P; ++k) {
        g[k] = yv[k] * (dyv[k] - term);
        gx[k] = g[k] * f;
      }
      cr::store_block<P>(dxr + j, len, gx);
      if (dsr != nullptr) cr::store_block<P>(dsr + j, len, g);
    });
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& output,
                                                   double scale, bool mask_needs_grad) {
  TORCH_CHECK(output.dim() >= 1, "output must have at least 1 dimension");
  TORCH_CHECK(output.device().is_cpu(), "output must be a CPU tensor, got ", output.device());
  TORCH_CHECK(is_supported_float(output.scalar_type()), "output must be float32, float16 or bfloat16, got ",
              output.scalar_type());
  TORCH_CHECK(grad_out.sizes() == output.sizes(), "grad_out must have the shape of output ", output.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == output.scalar_type(), "grad_out must have dtype ", output.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device().is_cpu(), "grad_out must be a CPU tensor, got ", grad_out.device());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  // Rows are read contiguously; a strided argument is copied first (the op's own backward always
  // passes contiguous tensors).
  const at::Tensor y = output.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  at::Tensor dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  // The scores' gradient (the mask's, before any broadcast is summed) stays float32, as the
  // attention's: a float32 mask on 16-bit scores gets float32-accurate gradients.
  at::Tensor dscores = mask_needs_grad ? at::empty(y.sizes(), y.options().dtype(at::kFloat))
                                        : at::empty({0}, y.options());
  const int64_t n = y.size(-1);
  const int64_t rows = n == 0 ? 0 : y.numel() / n;
  if (rows == 0) return {dx, dscores};
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  AT_DISPATCH_V2(y.scalar_type(), "softmax_bwd_cpu", AT_WRAP([&] {
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    float* dsp = mask_needs_grad ? dscores.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      softmax_bwd_rows<scalar_t>(dyp, yp, n, static_cast<float>(scale), begin, end, dxp, dsp);
    });
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {dx, dscores};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("attention_fwd", &fused_attn::attention_fwd_cpu);
  m.impl("attention_bwd", &fused_attn::attention_bwd_cpu);
  m.impl("softmax_fwd", &fused_attn::softmax_fwd_cpu);
  m.impl("softmax_bwd", &fused_attn::softmax_bwd_cpu);
}
