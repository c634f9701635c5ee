// Row helpers shared by the CPU kernels of row-wise ops (csrc/cpu): vector loads and stores that
// widen fp16/bf16 to float32 and round back once, block visitors with independent accumulator
// chains, row sums cascaded through a double, column sums in per-chunk float64 partial buffers
// reduced in a fixed order, and the dropout keep-mask of the shared Philox
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
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>

#include "fused_attn/checks.h"
#include "fused_attn/philox.h"

namespace fused_attn {
namespace cpu_rows {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = fVec::size();

// Elements below which a task is not worth handing to another thread (ATen's GRAIN_SIZE).
constexpr int64_t kGrainElems = 32768;

// Software prefetch for passes whose arithmetic per element is long (the GELU and its gradient):
// a vector of such a pass fills the out-of-order window with dozens of instructions, so few of its
// loads are in flight at once, and over a buffer that is not in cache (a GEMM's result beyond the
// last level, 25 MB at 2048 x 3072 float32) the pass waited on memory: linear_gelu's float32 pass
// at 2048 x 768 -> 3072 took 9.8-10.0 ms on one core of an AVX-512 Xeon (1.6 ns an element,
// against 0.77 in cache). Asking for the line kPrefetchBytes ahead of each load: 3.5-4.0 ms (4.0-4.7
// -> 1.8-2.9 ms on two, linear_gelu 30.2-30.7 -> 26.8-28.1 ms); 512 bytes ahead gave about half
// of that, 2 and 8 KiB the same. A prefetch past the end of a buffer is harmless: it does not fault.
constexpr int64_t kPrefetchBytes = 4096;

template <typename T>
C10_ALWAYS_INLINE void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// A block is what one vector load of scalar_t covers: a single float vector for float32, two
// for fp16/bf16, whose Vectorized holds twice as many (half-width) lanes.
template <typename scalar_t>
constexpr int kParts = at::vec::is_reduced_floating_point_v<scalar_t> ? 2 : 1;
template <typename scalar_t>
constexpr int64_t kBlock = kParts<scalar_t> * kLanes;
static_assert(at::vec::Vectorized<at::Half>::size() == 2 * kLanes &&
                  at::vec::Vectorized<at::BFloat16>::size() == 2 * kLanes,
              "an fp16/bf16 vector must widen to exactly two float vectors");

// Blocks that draw dropout: float vectors enough for one batch of Philox counter groups
// (philox::kBatchElements elements, drawn as independent chains whose latencies overlap: a block
// of fewer groups waits on its chains) and a whole number of fp16/bf16 vectors (two float
// vectors), whatever the dtype, so every dtype shares one loop.
constexpr int kDropParts = static_cast<int>(std::max<int64_t>(2, philox::kBatchElements / kLanes));
constexpr int64_t kDropBlock = kDropParts * kLanes;
static_assert(kDropBlock % philox::kBatchElements == 0 && kDropParts % 2 == 0,
              "a dropout block must hold a whole batch of Philox counters and whole fp16/bf16 vectors");

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

// A row's statistics, as the LayerNorm forward saves them for its backward.
struct RowStats {
  float mean, rstd;
};

// The second and third passes of a LayerNorm forward over one row xr (held in L1/L2 by the
// first pass, which gave its mean m, rounded to float; inv_n = 1 / hidden, hidden > 0): the
// variance from deviations d = x - m, not E[x^2] - E[x]^2, which cancels catastrophically when
// |mean| >> std; their sum takes the rounding of m itself out of the variance (the corrected
// two-pass algorithm, var = (sum d^2 - (sum d)^2 / n) / n) and out of the mean, which becomes
// m + sum d / n. Then out = (x - mean) * rstd * w + b. Refining the mean matters where the
// variance is tiny: in a constant row every d is the rounding error of m, the variance is 0 and
// rstd 1 / sqrt(eps) (1e6 at BERT's eps of 1e-12), so (x - m) * rstd would be far from 0; with
// the refined mean, x - mean is 0 and the row normalises to the bias, as in torch. Returns the
// refined mean and rstd. Blocks of P float vectors (B elements, C accumulator chains), as the
// caller's first pass.
template <int P, int64_t B, int C, typename scalar_t>
C10_ALWAYS_INLINE RowStats normalize_row(const scalar_t* xr, int64_t hidden, float m, double inv_n, double eps,
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
  const float mean = static_cast<float>(static_cast<double>(m) + dev.total * inv_n);

  const fVec rsv(rs), meanv(mean);
  for_each_block<B>(hidden, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
    fVec xv[P], wv[P], bv[P], ov[P];
    load_block(xr + j, len, xv);
    load_block(w + j, len, wv);
    load_block(b + j, len, bv);
    for (int k = 0; k < P; ++k) ov[k] = at::vec::fmadd((xv[k] - meanv) * rsv, wv[k], bv[k]);
    store_block(outr + j, len, ov);
  });
  return {mean, rs};
}

// Column sums (grad_weight, grad_bias, ...) are accumulated per chunk of rows, in float64. The
// chunk count is a function of the shape alone (never of the thread count), so the sums, added
// in chunk order, are the same bits on any machine with the same vector ISA: at most kMaxChunks
// chunks, each of at least kMinChunkRows rows and kGrainElems elements, which bounds the partial
// buffers ([chunks, padded_cols(cols)] float64) to an eighth of the data read.
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

// A chunk's row of partial sums holds whole blocks of any kernel's (a multiple of kColumnPad
// columns), so a block that runs past the last column adds its padding lanes there, unmasked.
constexpr int64_t kColumnPad = 128;  // AVX-512 dropout blocks are 128 wide
inline int64_t padded_cols(int64_t cols) {
  return (cols + kColumnPad - 1) / kColumnPad * kColumnPad;
}

// The partials of one column sum, [nchunks, padded_cols(cols)] float64 zeros on like's device, or
// an undefined tensor when the sum is not wanted.
inline at::Tensor column_partials(bool wanted, int64_t nchunks, int64_t cols, const at::Tensor& like) {
  return wanted ? at::zeros({nchunks, padded_cols(cols)}, like.options().dtype(at::kDouble)) : at::Tensor();
}

// Chunk c's row of partials (null stays null).
inline double* chunk_partials(double* partials, int64_t chunk, int64_t cols) {
  return partials == nullptr ? nullptr : partials + chunk * padded_cols(cols);
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
static_assert(kLanes == 8, "AVX2 float vectors hold 8 lanes");
using dHalf = __m256d;  // half a float vector's lanes, widened to float64
struct Widened {
  dHalf lo, hi;  // a float vector's low half and high half
};
// v's lanes widened to float64.
C10_ALWAYS_INLINE Widened widened(const fVec& v) {
  const __m256 x = v;
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))};
}
C10_ALWAYS_INLINE dHalf load_half(const double* p) { return _mm256_loadu_pd(p); }
C10_ALWAYS_INLINE void store_half(double* p, dHalf v) { _mm256_storeu_pd(p, v); }
C10_ALWAYS_INLINE dHalf add_halves(dHalf a, dHalf b) { return _mm256_add_pd(a, b); }
C10_ALWAYS_INLINE dHalf fmadd_halves(dHalf a, dHalf b, dHalf c) { return _mm256_fmadd_pd(a, b, c); }
C10_ALWAYS_INLINE dHalf zero_half() { return _mm256_setzero_pd(); }
#define FUSED_ATTN_WIDE_HALVES 1
#elif defined(CPU_CAPABILITY_AVX512) && !defined(_MSC_VER)
static_assert(kLanes == 16, "AVX-512 float vectors hold 16 lanes");
using dHalf = __m512d;
struct Widened {
  dHalf lo, hi;
};
C10_ALWAYS_INLINE Widened widened(const fVec& v) {
  const __m512 x = v;
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(x)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1))};
}
C10_ALWAYS_INLINE dHalf load_half(const double* p) { return _mm512_loadu_pd(p); }
C10_ALWAYS_INLINE void store_half(double* p, dHalf v) { _mm512_storeu_pd(p, v); }
C10_ALWAYS_INLINE dHalf add_halves(dHalf a, dHalf b) { return _mm512_add_pd(a, b); }
C10_ALWAYS_INLINE dHalf fmadd_halves(dHalf a, dHalf b, dHalf c) { return _mm512_fmadd_pd(a, b, c); }
C10_ALWAYS_INLINE dHalf zero_half() { return _mm512_setzero_pd(); }
#define FUSED_ATTN_WIDE_HALVES 1
#endif

// p[0, P * kLanes) += v, widened to float64.
template <int P>
C10_ALWAYS_INLINE void add_widened(double* p, const fVec (&v)[P]) {
  for (int k = 0; k < P; ++k) {
    double* q = p + k * kLanes;
#ifdef FUSED_ATTN_WIDE_HALVES
    const auto [lo, hi] = widened(v[k]);
    store_half(q, add_halves(load_half(q), lo));
    store_half(q + kLanes / 2, add_halves(load_half(q + kLanes / 2), hi));
#else
    alignas(64) float t[kLanes];
    v[k].store(t);
    for (int64_t i = 0; i < kLanes; ++i) q[i] += static_cast<double>(t[i]);
#endif
  }
}

// sum_i a_i b_i over pairs of float vectors, each product exact in float64 (24-bit significands
// multiply into 48 bits) and summed there.
struct WideDot {
#ifdef FUSED_ATTN_WIDE_HALVES
  dHalf lo = zero_half(), hi = zero_half();
  C10_ALWAYS_INLINE void add(const fVec& a, const fVec& b) {
    const auto [a_lo, a_hi] = widened(a);
    const auto [b_lo, b_hi] = widened(b);
    lo = fmadd_halves(a_lo, b_lo, lo);
    hi = fmadd_halves(a_hi, b_hi, hi);
  }
  double sum() const {
    alignas(64) double t[kLanes / 2];
    store_half(t, add_halves(lo, hi));
    double total = 0.0;
    for (int64_t i = 0; i < kLanes / 2; ++i) total += t[i];
    return total;
  }
#else
  double total = 0.0;
  void add(const fVec& a, const fVec& b) {
    alignas(64) float x[kLanes], y[kLanes];
    a.store(x);
    b.store(y);
    for (int64_t i = 0; i < kLanes; ++i) total += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  }
  double sum() const { return total; }
#endif
};

// S column sums of one chunk of rows, added row by row while a backward pass walks each row
// once, in memory order (the order backward_rows uses for rows shorter than kGroupedFromBytes).
//
// The sums cascade, so that float32 rounding never spans more than kFanIn terms: a row's shares
// are added to a float32 buffer (level 1); every kFanIn rows that buffer is added to a second
// (level 2); every kFanIn level-1 sums, level 2 is added into the chunk's float64 partials
// (parts[s], a row of column_partials; null for a sum not wanted). A level's first add stores
// instead of adding, so no buffer is ever cleared. Buffers are block-interleaved (for the block
// at column j, the S sums' B floats are adjacent at S * j) so that a row's update touches one
// contiguous stretch. Measured on the LayerNorm backward at 4096 x 768 against a flat float32
// buffer folded every 32 rows: about as fast (1.1-1.25 ms against 1.13), and as accurate as
// torch's cascaded sums where the flat one was not (32-term float32 sums of the bias gradient
// erred 15x more than torch's); adding every row in float64 directly ran 1.5x slower.
template <int S, int64_t B>
class ColumnSums {
 public:
  static constexpr int P = static_cast<int>(B / kLanes);
  static constexpr int64_t kFanIn = 8;
  static_assert(kColumnPad % B == 0, "blocks must tile the padded partial rows");

  ColumnSums(int64_t cols, const std::array<double*, S>& parts)
      : cols_(cols), parts_(parts), level1_(static_cast<size_t>(S * padded_cols(cols))), level2_(level1_.size()) {}
  ColumnSums(const ColumnSums&) = delete;
  ColumnSums& operator=(const ColumnSums&) = delete;

  bool wanted(int s) const { return parts_[s] != nullptr; }

  // sum s += v over the block at column j (a multiple of B). Lanes past the last column may hold
  // anything: they land in padding.
  C10_ALWAYS_INLINE void add(int64_t j, int s, const fVec (&v)[P]) {
    float* p = level1_.data() + S * j + s * B;
    for (int k = 0; k < P; ++k) {
      const fVec sum = rows_ == 0 ? v[k] : fVec::loadu(p + k * kLanes) + v[k];
      sum.store(p + k * kLanes);
    }
  }

  // sum s += a * b (one rounding, as an FMA).
  C10_ALWAYS_INLINE void add_product(int64_t j, int s, const fVec (&a)[P], const fVec (&b)[P]) {
    float* p = level1_.data() + S * j + s * B;
    for (int k = 0; k < P; ++k) {
      const fVec sum = rows_ == 0 ? a[k] * b[k] : at::vec::fmadd(a[k], b[k], fVec::loadu(p + k * kLanes));
      sum.store(p + k * kLanes);
    }
  }

  // Call after each row, whose adds covered every block of every wanted sum.
  C10_ALWAYS_INLINE void end_row() {
    if (++rows_ == kFanIn) fold_level1();
  }

  // Call after the last row: adds what the buffers hold into the partials.
  void finish() {
    if (rows_ > 0) fold_level1();
    if (folds_ > 0) fold_level2();
  }

 private:
  void fold_level1() {
    for (int s = 0; s < S; ++s) {
      if (parts_[s] == nullptr) continue;
      for (int64_t j = 0; j < cols_; j += B) {
        const float* src = level1_.data() + S * j + s * B;
        float* dst = level2_.data() + S * j + s * B;
        for (int k = 0; k < P; ++k) {
          const fVec v = fVec::loadu(src + k * kLanes);
          (folds_ == 0 ? v : fVec::loadu(dst + k * kLanes) + v).store(dst + k * kLanes);
        }
      }
    }
    rows_ = 0;
    if (++folds_ == kFanIn) fold_level2();
  }

  void fold_level2() {
    for (int s = 0; s < S; ++s) {
      double* part = parts_[s];
      if (part == nullptr) continue;
      for (int64_t j = 0; j < cols_; j += B) {
        const float* src = level2_.data() + S * j + s * B;
        fVec v[P];
        for (int k = 0; k < P; ++k) v[k] = fVec::loadu(src + k * kLanes);
        add_widened(part + j, v);
      }
    }
    folds_ = 0;
  }

  int64_t cols_;
  std::array<double*, S> parts_;
  std::vector<float> level1_, level2_;
  int64_t rows_ = 0;   // rows in level 1
  int64_t folds_ = 0;  // level-1 sums in level 2
};

// Where a backward pass's body adds a block's shares of the column sums: the row-at-a-time
// order's ColumnSums at the block's column, or the grouped order's registers.
template <int S, int64_t B>
struct BufferedSink {
  static constexpr int P = static_cast<int>(B / kLanes);
  ColumnSums<S, B>& sums;
  int64_t j;
  std::array<bool, S> want;

  bool wanted(int s) const { return want[s]; }
  C10_ALWAYS_INLINE void add(int s, const fVec (&v)[P]) { sums.add(j, s, v); }
  C10_ALWAYS_INLINE void add_product(int s, const fVec (&a)[P], const fVec (&b)[P]) { sums.add_product(j, s, a, b); }
};

template <int S, int64_t B>
struct RegisterSink {
  static constexpr int P = static_cast<int>(B / kLanes);
  std::array<bool, S> want;
  fVec acc[S][P];

  C10_ALWAYS_INLINE explicit RegisterSink(const std::array<bool, S>& w) : want(w) {
    for (auto& sum : acc) {
      for (auto& v : sum) v = fVec(0.f);
    }
  }
  bool wanted(int s) const { return want[s]; }
  C10_ALWAYS_INLINE void add(int s, const fVec (&v)[P]) {
    for (int k = 0; k < P; ++k) acc[s][k] += v[k];
  }
  C10_ALWAYS_INLINE void add_product(int s, const fVec (&a)[P], const fVec (&b)[P]) {
    for (int k = 0; k < P; ++k) acc[s][k] = at::vec::fmadd(a[k], b[k], acc[s][k]);
  }
};

// Rows of kGroupedFromBytes and more are visited kGroupRows at a time (see backward_rows).
constexpr int64_t kGroupedFromBytes = 8192;
constexpr int64_t kGroupRows = 4;

// The pass of a row-wise backward over rows [begin, end) of width cols that writes each row's
// gradients and adds its shares of S column sums into this chunk's float64 partials (parts[s],
// rows of column_partials; null for a sum not wanted). consts = row_setup(r) runs once per row
// before its blocks (a first pass over the row, e.g. for its LayerNorm constants); then
// body(r, j, len, consts, sink) handles the block of row r at column j, adding to the sums with
// sink.add(s, v) / sink.add_product(s, a, b) where sink.wanted(s).
// The order of the visit depends on the row's length in bytes (measured on the LayerNorm, Add & Norm
// and linear_gelu backwards against the other order and torch's kernel, in one process each):
//  * rows shorter than kGroupedFromBytes one at a time, in memory order, their shares buffered by
//    ColumnSums: at 4096 x 768 float32 (3 KiB rows) the grouped order ran the LayerNorm backward
//    1.3-1.4x slower than this (1.8x torch's time, against 1.3x), the linear_gelu bias pass
//    1.3x; at bfloat16 768 and 1024 wide, 1.3-1.5x and 1.2-1.3x (2-core EPYC with AVX-512);
//  * longer rows in groups of kGroupRows, block by block across the group, their shares summed in
//    registers and added to the partials once per group, for the rows whose buffers no longer fit
//    the caches beside them. Where that starts depends on the CPU: at 4096 x 1024 float32 (4 KiB
//    rows) the row order ran the LayerNorm backward 1.1x slower and Add & Norm's (three sums)
//    1.2-1.3x on the EPYC with AVX-512, but 0.9x and 0.95x the grouped order's time on a 2-core
//    EPYC without it (interleaved with torch's kernel: 0.98-1.2x its speed against 0.86-1.0x, Add
//    & Norm 0.90-1.1x against 0.83-1.0x), the kind of machine the package's CPU figures come from;
//    the threshold sits above BERT-large's 1024 float32 columns for it.
// A pass that adds to no sum (grad_input alone: frozen LayerNorm parameters) takes the row order at
// any width, grouping having nothing to keep in registers.
template <typename scalar_t, int S, int64_t B, typename Setup, typename Body>
C10_ALWAYS_INLINE void backward_rows(int64_t cols, int64_t begin, int64_t end, const std::array<double*, S>& parts,
                                     const Setup& row_setup, const Body& body) {
  // Inlined into the kernel, with flags and constants handed over by value: the vector stores in
  // a body may alias any memory, so values it reached through memory (the captures of a lambda
  // passed to a function that is not inlined) would be reloaded after every store.
  std::array<bool, S> want;
  bool any_sum = false;
  for (int s = 0; s < S; ++s) {
    want[s] = parts[s] != nullptr;
    any_sum = any_sum || want[s];
  }
  if (cols * static_cast<int64_t>(sizeof(scalar_t)) < kGroupedFromBytes || !any_sum) {
    ColumnSums<S, B> sums(cols, parts);
    for (int64_t r = begin; r < end; ++r) {
      const auto consts = row_setup(r);
      for_each_block<B>(cols, [&, consts](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
        BufferedSink<S, B> sink{sums, j, want};
        body(r, j, len, consts, sink);
      });
      sums.end_row();
    }
    sums.finish();
    return;
  }
  using Consts = decltype(row_setup(begin));
  for (int64_t first = begin; first < end; first += kGroupRows) {
    const int64_t rows = std::min(kGroupRows, end - first);
    Consts consts[kGroupRows];
    for (int64_t q = 0; q < rows; ++q) consts[q] = row_setup(first + q);
    for_each_block<B>(cols, [&](int64_t j, int64_t len, int) C10_ALWAYS_INLINE_ATTRIBUTE {
      RegisterSink<S, B> sink(want);
      for (int64_t q = 0; q < rows; ++q) body(first + q, j, len, consts[q], sink);
      for (int s = 0; s < S; ++s) {
        if (want[s]) add_widened(parts[s] + j, sink.acc[s]);
      }
    });
  }
}

// For each (partials, out) of `sums` whose partials are not null: out = the column sums of the
// chunks' partials ([nchunks, padded_cols(cols)] float64), added in chunk order and rounded to
// scalar_t once. All of them in one parallel region, which runs inline when the reduction is
// small (the usual case: it reads nchunks doubles per column), since every region costs a
// wake-up of the pool and, on a busy machine, a wait for the slowest thread.
template <typename scalar_t, size_t N>
void sum_partials(const std::array<std::pair<const double*, scalar_t*>, N>& sums, int64_t nchunks, int64_t cols) {
  int64_t live = 0;
  for (const auto& entry : sums) live += entry.first != nullptr;
  if (live == 0) return;
  const int64_t stride = padded_cols(cols);
  const int64_t grain = std::max<int64_t>(kColumnPad, 4 * kGrainElems / (nchunks * live));
  at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    // Chunk by chunk over a stretch of columns (contiguous, so the adds vectorise), in chunk order.
    constexpr int64_t kStretch = 256;
    double total[kStretch];
    for (const auto& [part, out] : sums) {
      if (part == nullptr) continue;
      for (int64_t first = begin; first < end; first += kStretch) {
        const int64_t n = std::min(kStretch, end - first);
        std::copy(part + first, part + first + n, total);
        for (int64_t chunk = 1; chunk < nchunks; ++chunk) {
          const double* row = part + chunk * stride + first;
          for (int64_t c = 0; c < n; ++c) total[c] += row[c];
        }
        for (int64_t c = 0; c < n; ++c) out[first + c] = static_cast<scalar_t>(static_cast<float>(total[c]));
      }
    }
  });
}

// grad_weight and grad_bias of a norm from their chunks' partials (null: not wanted), written in the
// parameters' dtype (checks.h's affine_dtype: float where param_dtype is float32, else scalar_t).
template <typename scalar_t>
void sum_param_partials(at::ScalarType param_dtype, const double* dw_part, const at::Tensor& dw, const double* db_part,
                        const at::Tensor& db, int64_t nchunks, int64_t cols) {
  with_param_type<scalar_t>(param_dtype, [&](auto* tag) {
    using param_t = std::remove_pointer_t<decltype(tag)>;
    using Sum = std::pair<const double*, param_t*>;
    sum_partials(std::array<Sum, 2>{Sum{dw_part, dw_part != nullptr ? dw.mutable_data_ptr<param_t>() : nullptr},
                                    Sum{db_part, db_part != nullptr ? db.mutable_data_ptr<param_t>() : nullptr}},
                 nchunks, cols);
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
// c2 = mean(g * xhat) - a * mean(g) and c1 = mean(g) - a * c2. The sums are of d = x - mean,
// with rstd applied once to the double totals (xhat = d * rstd): one multiply per element fewer
// than summing xhat, and one rounding fewer. hidden must be > 0.
template <typename scalar_t>
std::pair<float, float> layer_norm_grad_constants(const scalar_t* dyr, const scalar_t* xr, const float* w,
                                                  int64_t hidden, float mean, float rstd) {
  constexpr int P = kParts<scalar_t>;
  constexpr int64_t B = kBlock<scalar_t>;
  // Three sums in flight already; more chains would spill accumulators to the stack (3 x 4
  // vectors of 16 registers), which measured slower.
  constexpr int C = std::max(1, 2 / P);
  const fVec mv(mean);
  RowSum<C, P> g_sum, gd_sum, d_sum;
  for_each_block<B, C>(
      hidden,
      [&](int64_t j, int64_t len, int c) C10_ALWAYS_INLINE_ATTRIBUTE {
        fVec dyv[P], xv[P], wv[P];
        load_block(dyr + j, len, dyv);  // zero past the row, so g adds nothing there
        load_block(xr + j, len, xv);
        load_block(w + j, len, wv);
        for (int k = 0; k < P; ++k) {
          fVec d = xv[k] - mv;
          if (len < B) d = keep_first(d, len - k * kLanes);
          const fVec g = rounded_product(dyv[k], wv[k]);
          g_sum.acc[c][k] += g;
          gd_sum.acc[c][k] = at::vec::fmadd(g, d, gd_sum.acc[c][k]);
          d_sum.acc[c][k] += d;
        }
      },
      [&] {
        g_sum.end_segment();
        gd_sum.end_segment();
        d_sum.end_segment();
      });
  const double inv_n = 1.0 / static_cast<double>(hidden);
  const double rs = static_cast<double>(rstd);
  const double a = d_sum.total * inv_n * rs;
  const double g_mean = g_sum.total * inv_n;
  const double c2 = gd_sum.total * inv_n * rs - a * g_mean;
  return {static_cast<float>(g_mean - a * c2), static_cast<float>(c2)};
}

// The per-row constants of a LayerNorm backward, broadcast: the saved mean and rstd and, when
// grad_input is wanted, layer_norm_grad_constants' c1 and c2 (zero otherwise).
struct LayerNormRow {
  fVec mean, rstd, c1, c2;
};

template <typename scalar_t>
C10_ALWAYS_INLINE LayerNormRow layer_norm_row(const scalar_t* dy, const scalar_t* x, const float* mean,
                                              const float* rstd, const float* w, int64_t hidden, int64_t r,
                                              bool grad_input) {
  LayerNormRow row{fVec(mean[r]), fVec(rstd[r]), fVec(0.f), fVec(0.f)};
  if (grad_input) {
    const auto [c1, c2] = layer_norm_grad_constants(dy + r * hidden, x + r * hidden, w, hidden, mean[r], rstd[r]);
    row.c1 = fVec(c1);
    row.c2 = fVec(c2);
  }
  return row;
}

// One block of a LayerNorm backward, at column j of a row (offset: the block's first element):
// adds the row's shares dy * xhat and dy to sums 0 and 1 where wanted and, when grad_input, sets
// d to the gradient reaching the normalised values, (dy * w - (xhat * c2 + c1)) * rstd. Lanes past
// the row read as zero from dy, so they add nothing to the sums; d holds garbage there.
template <int P, typename scalar_t, typename Sink>
C10_ALWAYS_INLINE void layer_norm_grad_block(const scalar_t* dy, const scalar_t* x, const float* w, int64_t offset,
                                             int64_t j, int64_t len, const LayerNormRow& row, Sink& sums,
                                             bool grad_input, fVec (&d)[P]) {
  fVec dyv[P], xv[P], xhat[P];
  load_block(dy + offset, len, dyv);
  load_block(x + offset, len, xv);
  for (int k = 0; k < P; ++k) xhat[k] = (xv[k] - row.mean) * row.rstd;
  if (sums.wanted(0)) sums.add_product(0, dyv, xhat);
  if (sums.wanted(1)) sums.add(1, dyv);
  if (!grad_input) return;
  fVec wv[P];
  load_block(w + j, len, wv);
  for (int k = 0; k < P; ++k) {
    d[k] = (rounded_product(dyv[k], wv[k]) - at::vec::fmadd(xhat[k], row.c2, row.c1)) * row.rstd;
  }
}

// Dropout of one kDropBlock block of a row: h[k] = (h[k] * keep) / keep_prob with keep 1 or 0,
// where element t of the block is element `counter + t` of the stream of `seed` and is kept when
// its uniform is >= p. `p` and `keep_prob` (1 - p, rounded to float as the Triton kernels compute
// it) are broadcast vectors; the division (not a multiply by the reciprocal) is also theirs. A
// multiply, not a select: a dropped NaN or inf gives NaN, as torch's dropout (x * mask / (1 - p))
// does, so dropout never hides a non-finite value that the unfused model would show.
C10_ALWAYS_INLINE void dropout_block(uint64_t seed, uint64_t counter, const fVec& p, const fVec& keep_prob,
                                     fVec (&h)[kDropParts]) {
  alignas(64) float u[kDropBlock];
  philox::uniforms(seed, counter, kDropBlock, u);
  const fVec zero(0.f), one(1.f);
  for (int k = 0; k < kDropParts; ++k) {
    const fVec keep = fVec::blendv(zero, one, fVec::loadu(u + k * kLanes) >= p);
    h[k] = (h[k] * keep) / keep_prob;
  }
}

}  // namespace cpu_rows
}  // namespace fused_attn
