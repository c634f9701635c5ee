// Row helpers shared by the CPU kernels of row-wise ops (csrc/cpu): vector loads and stores that
// widen fp16/bf16 to float32 and round back once, block visitors with independent accumulator
// chains, row sums cascaded through a double, Kahan-compensated column sums in per-chunk float32
// partial buffers reduced in a fixed order, and the dropout keep-mask of the shared Philox
// stream (fused_attn/philox.h) for a block of a row.
//
// Everything here is inline, in fused_attn::cpu_rows, compiled for one vector ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/full.h>
#include <c10/macros/Macros.h>

#include "fused_attn/philox.h"

namespace fused_attn {
namespace cpu_rows {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();

// Elements below which a task is not worth handing to another thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrainElems = 32768;

// A block is what one vector load of scalar_t covers: a single float vector for float32, two
// for fp16/bf16, whose Vectorized holds twice as many (half-width) lanes.
template <typename scalar_t>
constexpr int kParts = at::vec::is_reduced_floating_point_v<scalar_t> ? 2 : 1;
template <typename scalar_t>
constexpr int64_t kBlock = kParts<scalar_t> * kLanes;
static_assert(at::vec::Vectorized<at::Half>::size() == 2 * kLanes &&
                  at::vec::Vectorized<at::BFloat16>::size() == 2 * kLanes,
              "an fp16/bf16 vector must widen to exactly two float vectors");

// Blocks that draw dropout: float vectors enough for a whole number of Philox lane groups
// (philox::kLanes counters) and of fp16/bf16 vectors (two float vectors), whatever the dtype, so
// every dtype shares one loop.
constexpr int kDropParts = static_cast<int>(std::max<int64_t>(2, philox::kLanes / kLanes));
constexpr int64_t kDropBlock = kDropParts * kLanes;
static_assert(kDropBlock % philox::kLanes == 0 && kDropParts % 2 == 0,
              "a dropout block must hold whole Philox lane groups and whole fp16/bf16 vectors");

// Independent accumulator chains per reduction: an add/FMA takes several cycles, so a single
// chain would leave the FP units idle waiting on its own result.
constexpr int kChains = 4;
template <int P>
constexpr int kChainsFor = std::max(1, kChains / P);

// Row reductions fold their float vector partial sums into a double at the end of every
// kSegment elements (a two-level cascade: a 16K-wide row sums about as accurately as a 1K one).
constexpr int64_t kSegment = 1024;

// Loads the first n elements of a block as float; lanes past n read as zero. n may be <= 0 or
// larger than the block, so callers pass "elements left in the row".
template <int P>
C10_ALWAYS_INLINE void load_block(const float* src, int64_t n, fVec (&v)[P]) {
  for (int k = 0; k < P; ++k) {
    v[k] = fVec::loadu(src + k * kLanes, std::clamp<int64_t>(n - k * kLanes, 0, kLanes));
  }
}

template <int P, typename T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>, int> = 0>
C10_ALWAYS_INLINE void load_block(const T* src, int64_t n, fVec (&v)[P]) {
  static_assert(P % 2 == 0, "an fp16/bf16 block is a whole number of fp16/bf16 vectors");
  constexpr int64_t width = 2 * kLanes;
  for (int k = 0; k < P; k += 2) {
    const int64_t left = std::clamp<int64_t>(n - k * kLanes, 0, width);
    std::tie(v[k], v[k + 1]) =
        at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src + k * kLanes, left));
  }
}

// Stores the first n elements of a block, rounding to T once; nothing past n is written.
template <int P>
C10_ALWAYS_INLINE void store_block(float* dst, int64_t n, const fVec (&v)[P]) {
  for (int k = 0; k < P; ++k) {
    const int64_t left = std::clamp<int64_t>(n - k * kLanes, 0, kLanes);
    if (left > 0) v[k].store(dst + k * kLanes, left);
  }
}

template <int P, typename T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>, int> = 0>
C10_ALWAYS_INLINE void store_block(T* dst, int64_t n, const fVec (&v)[P]) {
  static_assert(P % 2 == 0, "an fp16/bf16 block is a whole number of fp16/bf16 vectors");
  constexpr int64_t width = 2 * kLanes;
  for (int k = 0; k < P; k += 2) {
    const int64_t left = std::clamp<int64_t>(n - k * kLanes, 0, width);
    if (left > 0) at::vec::convert_from_float<T>(v[k], v[k + 1]).store(dst + k * kLanes, left);
  }
}

// v rounded to T and back: the value a store to T and a reload would give (identity for float).
template <typename T, int P>
C10_ALWAYS_INLINE void round_block(fVec (&v)[P]) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    for (int k = 0; k < P; k += 2) {
      std::tie(v[k], v[k + 1]) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[k], v[k + 1]));
    }
  }
}

// v with lanes [n, kLanes) zeroed; n may lie outside [0, kLanes].
C10_ALWAYS_INLINE fVec keep_first(const fVec& v, int64_t n) {
  return fVec::set(fVec(0.f), v, std::clamp<int64_t>(n, 0, kLanes));
}

// Visits [0, n) as body(offset, len, chain), calling end_segment() after every kSegment
// elements and at the end. Full blocks go out `chains` at a time with distinct chain indices so
// that a reduction can keep that many accumulators in flight; the remaining blocks (the last
// one possibly partial, len < block) use chain 0. For full blocks len is the compile-time block
// size, so the masked-load paths fold away (when the body is inlined: callers force it).
template <int64_t block, int chains, typename Body, typename EndSegment>
C10_ALWAYS_INLINE void for_each_block(int64_t n, const Body& body, const EndSegment& end_segment) {
  static_assert(kSegment % (chains * block) == 0, "segments must hold whole strides");
  for (int64_t segment = 0; segment < n; segment += kSegment) {
    const int64_t end = std::min(n, segment + kSegment);
    int64_t j = segment;
    for (; j + chains * block <= end; j += chains * block) {
      for (int c = 0; c < chains; ++c) body(j + c * block, block, c);
    }
    for (; j < end; j += block) body(j, std::min(block, end - j), 0);
    end_segment();
  }
}

// The same visit for the passes that reduce nothing.
template <int64_t block, typename Body>
C10_ALWAYS_INLINE void for_each_block(int64_t n, const Body& body) {
  for_each_block<block, 1>(n, body, [] {});
}

// a * b rounded to float, as an FMA with +0: a plain multiply may be contracted by the compiler
// into the add or subtract that consumes it, skipping its rounding (see layer_norm.cpp: the
// backward must subtract mean(g) from exactly the rounded g it averaged).
C10_ALWAYS_INLINE fVec rounded_product(const fVec& a, const fVec& b) {
  return at::vec::fmadd(a, b, fVec(0.f));
}

// One step of Kahan summation, s += x, keeping the rounding error of the add in c.
C10_ALWAYS_INLINE void kahan_step(fVec& s, fVec& c, const fVec& x) {
  const fVec y = x - c;
  const fVec t = s + y;
  c = (t - s) - y;
  s = t;
}

// Adds x to the compensated column sums sum[0, len) / comp[0, len) of one block.
template <int P>
C10_ALWAYS_INLINE void kahan_add_block(float* sum, float* comp, int64_t len, const fVec (&x)[P]) {
  fVec s[P], c[P];
  load_block(sum, len, s);
  load_block(comp, len, c);
  for (int k = 0; k < P; ++k) kahan_step(s[k], c[k], x[k]);
  store_block(sum, len, s);
  store_block(comp, len, c);
}

// Sum of one row quantity: within a segment, `chains` independent chains of P float vectors;
// end_segment() folds them into the double `total`.
template <int chains, int P>
struct RowSum {
  fVec acc[chains][P];
  double total = 0.0;

  C10_ALWAYS_INLINE RowSum() { clear(); }

  C10_ALWAYS_INLINE void end_segment() {
    fVec sum(0.f);
    for (const auto& chain : acc) {
      for (const auto& v : chain) sum += v;
    }
    total += at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, sum);
    clear();
  }

 private:
  C10_ALWAYS_INLINE void clear() {
    for (auto& chain : acc) {
      for (auto& v : chain) v = fVec(0.f);
    }
  }
};

// The biased variance from the corrected two-pass sums (sum of deviations d and of d^2 over n
// elements, inv_n = 1 / n). Rounding can take it slightly below 0, so it is clamped there, but a
// NaN (a row holding NaN or +-inf) must stay NaN so that the row normalises to NaN as in torch:
// std::max(0.0, NaN) would return 0 and turn such a row into +-inf.
C10_ALWAYS_INLINE double two_pass_variance(double sum_sq, double sum_dev, double inv_n) {
  const double var = (sum_sq - sum_dev * sum_dev * inv_n) * inv_n;
  return var < 0.0 ? 0.0 : var;
}

// The second and third passes of a LayerNorm forward over one row xr (held in L1/L2 by the
// first pass, which gave its mean m; inv_n = 1 / hidden, or 0 for an empty row,
// whose variance is then 0): the variance from deviations d = x - m, not E[x^2] - E[x]^2,
// which cancels catastrophically when |mean| >> std; their sum takes the rounding of m itself
// out of the variance (the corrected two-pass algorithm, var = (sum d^2 - (sum d)^2 / n) / n).
// Then out = (x - m) * rstd * w + b. Returns rstd.
// Blocks of P float vectors (B elements, C accumulator chains), as the caller's first pass.
template <int P, int64_t B, int C, typename scalar_t>
C10_ALWAYS_INLINE float normalize_row(const scalar_t* xr, int64_t hidden, float m, double inv_n, double eps,
                                      const float* w, const float* b, scalar_t* outr) {
  const fVec mv(m);
  RowSum<C, P> dev, sq;
  for_each_block<B, C>(
      hidden,
      [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
        fVec xv[P];
        load_block(xr + j, len, xv);
        for (int k = 0; k < P; ++k) {
          fVec d = xv[k] - mv;
          if (len < B) d = keep_first(d, len - k * kLanes);  // padding would add -m and m^2
          dev.acc[c][k] += d;
          sq.acc[c][k] = at::vec::fmadd(d, d, sq.acc[c][k]);
        }
      },
      [&] {
        dev.end_segment();
        sq.end_segment();
      });
  const double var = two_pass_variance(sq.total, dev.total, inv_n);
  const float rs = static_cast<float>(1.0 / std::sqrt(var + eps));

  const fVec rsv(rs);
  for_each_block<B>(hidden, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
    fVec xv[P], wv[P], bv[P], ov[P];
    load_block(xr + j, len, xv);
    load_block(w + j, len, wv);
    load_block(b + j, len, bv);
    for (int k = 0; k < P; ++k) ov[k] = at::vec::fmadd((xv[k] - mv) * rsv, wv[k], bv[k]);
    store_block(outr + j, len, ov);
  });
  return rs;
}

// Column sums are accumulated per chunk of rows. The chunk count is a function of the shape
// alone (never of the thread count), so the sums, added in chunk order, are the same bits on
// any machine with the same vector ISA: at most kMaxChunks chunks, each of at least
// kMinChunkRows rows and kGrainElems elements, which bounds the partial buffers
// ([chunks, 2, cols] float32: sums, then Kahan compensations) to a 16th of the data read.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 16;

inline int64_t num_row_chunks(int64_t rows, int64_t cols) {
  const int64_t by_rows = rows / kMinChunkRows;
  const int64_t by_elems = rows * std::max<int64_t>(cols, 1) / kGrainElems;
  return std::clamp<int64_t>(std::min(by_rows, by_elems), 1, kMaxChunks);
}

// Rows [begin, end) of chunk c of num_row_chunks(rows, cols) chunks.
inline std::pair<int64_t, int64_t> chunk_rows(int64_t chunk, int64_t nchunks, int64_t rows) {
  return {chunk * rows / nchunks, (chunk + 1) * rows / nchunks};
}

// For each (part, out) of `sums` whose part is not null: out = the column sums of the chunks'
// compensated partials part ([nchunks, 2, cols]), added in chunk order, still compensated, and
// rounded to scalar_t once. All of them in one parallel region, which runs inline when the
// reduction is small (the usual case: it reads 2 * nchunks floats per column), since every
// region costs a wake-up of the pool and, on a busy machine, a wait for the slowest thread.
template <typename scalar_t, size_t N>
void sum_partials(const std::array<std::pair<const float*, scalar_t*>, N>& sums, int64_t nchunks, int64_t cols) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  int64_t live = 0;
  for (const auto& entry : sums) live += entry.first != nullptr;
  if (live == 0) return;
  const int64_t grain = std::max<int64_t>(B, 8 * kGrainElems / (2 * nchunks * live));
  at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    for (const auto& [part, out] : sums) {
      if (part == nullptr) continue;
      for_each_block<B>(end - begin, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
        fVec s[P], c[P], chunk_s[P], chunk_c[P];
        load_block(part + begin + j, len, s);
        load_block(part + cols + begin + j, len, c);
        for (int64_t chunk = 1; chunk < nchunks; ++chunk) {
          const float* chunk_sums = part + 2 * chunk * cols + begin + j;
          load_block(chunk_sums, len, chunk_s);
          load_block(chunk_sums + cols, len, chunk_c);
          for (int k = 0; k < P; ++k) {
            kahan_step(s[k], c[k], chunk_s[k]);
            c[k] += chunk_c[k];  // both compensations are tiny; their sum loses nothing that matters
          }
        }
        for (int k = 0; k < P; ++k) s[k] = s[k] - c[k];
        store_block(out + begin + j, len, s);
      });
    }
  });
}

// weight/bias as float32 (read once per row, so widened once per call rather than per row); a
// missing one becomes its identity so the kernels need no separate affine-free variant.
inline at::Tensor affine_as_float(const std::optional<at::Tensor>& param, const at::Tensor& like, int64_t n,
                                  float identity) {
  if (param.has_value() && param->defined()) return param->to(at::kFloat);
  return at::full({n}, identity, like.options().dtype(at::kFloat));
}

// The per-row constants of the LayerNorm backward, dx = rstd * (g - c1 - xhat * c2) with
// g = dy * w, from one pass over the row (loads only). Mathematically c1 = mean(g) and
// c2 = mean(g * xhat); they are taken with xhat - mean(xhat) for xhat, because the saved mean is
// rounded to float, which shifts every xhat by an offset the formula does not project out and
// that a large rstd would amplify. Re-centring by a = mean(xhat) costs only the constants:
// c2 = mean(g * xhat) - a * mean(g) and c1 = mean(g) - a * c2. hidden must be > 0.
template <typename scalar_t>
std::pair<float, float> layer_norm_grad_constants(const scalar_t* dyr, const scalar_t* xr, const float* w,
                                                  int64_t hidden, float mean, float rstd) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  constexpr int C = kChainsFor<P>;
  const fVec mv(mean), rsv(rstd);
  RowSum<C, P> g_sum, gx_sum, xhat_sum;
  for_each_block<B, C>(
      hidden,
      [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
        fVec dyv[P], xv[P], wv[P];
        load_block(dyr + j, len, dyv);  // zero past the row, so g adds nothing there
        load_block(xr + j, len, xv);
        load_block(w + j, len, wv);
        for (int k = 0; k < P; ++k) {
          fVec xhat = (xv[k] - mv) * rsv;
          if (len < B) xhat = keep_first(xhat, len - k * kLanes);
          const fVec g = rounded_product(dyv[k], wv[k]);
          g_sum.acc[c][k] += g;
          gx_sum.acc[c][k] = at::vec::fmadd(g, xhat, gx_sum.acc[c][k]);
          xhat_sum.acc[c][k] += xhat;
        }
      },
      [&] {
        g_sum.end_segment();
        gx_sum.end_segment();
        xhat_sum.end_segment();
      });
  const double inv_n = 1.0 / static_cast<double>(hidden);
  const double a = xhat_sum.total * inv_n;
  const double g_mean = g_sum.total * inv_n;
  const double c2 = gx_sum.total * inv_n - a * g_mean;
  return {static_cast<float>(g_mean - a * c2), static_cast<float>(c2)};
}

// Rows a LayerNorm backward handles together in its second pass: their parameter-gradient shares
// are added in registers and folded into the compensated partials once per group (a compensated
// update per row would cost four loads and four stores per element on top of the gradient's).
constexpr int64_t kRowGroup = 4;

// The per-row constants of the rows [first, first + rows) (rows <= kRowGroup) of a LayerNorm
// backward, broadcast to vectors: the saved mean and rstd, and, when `grad_input` (some input
// gradient is wanted), layer_norm_grad_constants' c1 and c2 (zero otherwise). Their pass over each
// row loads only, streaming it into cache for the second pass, which stores.
struct RowGroup {
  fVec mean[kRowGroup], rstd[kRowGroup], c1[kRowGroup], c2[kRowGroup];

  template <typename scalar_t>
  C10_ALWAYS_INLINE RowGroup(const scalar_t* dy, const scalar_t* x, const float* mean_in, const float* rstd_in,
                             const float* w, int64_t hidden, int64_t first, int64_t rows, bool grad_input) {
    for (int64_t q = 0; q < rows; ++q) {
      const int64_t r = first + q;
      mean[q] = fVec(mean_in[r]);
      rstd[q] = fVec(rstd_in[r]);
      c1[q] = c2[q] = fVec(0.f);
      if (grad_input) {
        const auto [k1, k2] = layer_norm_grad_constants(dy + r * hidden, x + r * hidden, w, hidden, mean_in[r],
                                                        rstd_in[r]);
        c1[q] = fVec(k1);
        c2[q] = fVec(k2);
      }
    }
  }
};

// Dropout of one kDropBlock block of a row: h[k] = (h[k] * keep) / keep_prob with keep 1 or 0,
// where element t of the block is element `counter + t` of the stream of `seed` and is kept when
// its uniform is >= p. `p` and `keep_prob` (1 - p, rounded to float as the Triton kernels compute
// it) are broadcast vectors; the division (not a multiply by the reciprocal) is also theirs. A
// multiply, not a select: a dropped NaN or inf gives NaN, as torch's dropout (x * mask / (1 - p))
// does, so dropout never hides a non-finite value that the unfused model would show.
C10_ALWAYS_INLINE void dropout_block(uint64_t seed, uint64_t counter, const fVec& p, const fVec& keep_prob,
                                     fVec (&h)[kDropParts]) {
  alignas(64) float u[kDropBlock];
  for (int64_t i = 0; i < kDropBlock; i += philox::kLanes) {
    philox::uniform_lanes(seed, counter + static_cast<uint64_t>(i), u + i);
  }
  const fVec zero(0.f), one(1.f);
  for (int k = 0; k < kDropParts; ++k) {
    const fVec keep = fVec::blendv(zero, one, fVec::loadu(u + k * kLanes) >= p);
    h[k] = (h[k] * keep) / keep_prob;
  }
}

}  // namespace cpu_rows
}  // namespace fused_attn
