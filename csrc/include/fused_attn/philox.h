// The dropout random stream every backend shares (see csrc/ops.cpp): Philox4x32-10 as
// triton.language.randint4x computes it, all four output words used, so that a C++ kernel and a
// Triton kernel given the same seed drop the same elements.
//
// Element e of a call's stream (a 64-bit index: for attention e = (bh * q_len + i) * k_len + j)
// takes word e % 4 of Philox counter c = e / 4: 10 Philox rounds on the state
// (c & 0xffffffff, c >> 32, 0, 0) with the key (seed & 0xffffffff, seed >> 32), bumping the key by
// the Weyl constants after every round; the four words of the final state (in that order) are
// the elements 4c .. 4c + 3. A word, read as int32 w, maps to [0, 1) as
// float(w < 0 ? -w - 1 : w) * 4.6566127342e-10f (int -> float rounded to nearest, then one float
// multiply; the constant is the largest that keeps INT32_MAX * scale below 1 in float). The
// element is kept when that value is >= dropout_p (compared in float, as Triton does with a float
// kernel argument). One evaluation of Philox gives four consecutive elements: dropout costs a
// quarter of what a stream of one word per counter (triton.language.rand's) costs on a CPU.
//
// Header-only and usable from host and device code (__host__ __device__ under nvcc). The scalar
// functions here are the definition; CPU kernels draw runs of consecutive elements with
// `uniforms` (8 counters per AVX-512 or AVX2 vector when the compiler targets them, a plain loop
// otherwise; all give the scalar functions' bits).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

#ifdef __CUDACC__
#define FUSED_ATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_ATTN_HOST_DEVICE inline
#endif

namespace fused_attn {
namespace philox {

// Round multipliers and key increments of Philox4x32 (Salmon et al., 2011), as in
// triton/language/random.py.
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;
// int32 -> [0, 1) scale of triton.language.random.uint_to_uniform_float.
constexpr float kUniformScale = 4.6566127342e-10f;
// Elements per counter: the four output words.
constexpr int kWords = 4;

FUSED_ATTN_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four output words (c0, c1, c2, c3) of Philox4x32-10 for `counter` under `seed`.
FUSED_ATTN_HOST_DEVICE void counter_words(uint64_t seed, uint64_t counter, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                          uint32_t& c3) {
  c0 = static_cast<uint32_t>(counter);
  c1 = static_cast<uint32_t>(counter >> 32);
  c2 = 0;
  c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mulhi(kRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mulhi(kRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kRoundB * prev_c2;
    c3 = kRoundA * prev_c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// Word `which` (0..3) of a counter's words, selected without indexing (an array indexed at run
// time would put the words in local memory on a GPU).
FUSED_ATTN_HOST_DEVICE uint32_t select_word(uint32_t which, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  return which == 0 ? c0 : which == 1 ? c1 : which == 2 ? c2 : c3;
}

// The word of element `element` of the stream of `seed`: word element % 4 of counter element / 4.
FUSED_ATTN_HOST_DEVICE uint32_t element_word(uint64_t seed, uint64_t element) {
  uint32_t c0, c1, c2, c3;
  counter_words(seed, element >> 2, c0, c1, c2, c3);
  return select_word(static_cast<uint32_t>(element & 3u), c0, c1, c2, c3);
}

// The word as a float in [0, 1), as triton.language.rand maps it.
FUSED_ATTN_HOST_DEVICE float to_uniform(uint32_t word) {
  const int32_t w = static_cast<int32_t>(word);
  const int32_t folded = w < 0 ? ~w : w;  // ~w == -w - 1, without the overflow of -INT32_MIN
  return static_cast<float>(folded) * kUniformScale;
}

FUSED_ATTN_HOST_DEVICE float uniform(uint64_t seed, uint64_t element) {
  return to_uniform(element_word(seed, element));
}

// Whether dropout keeps element `element` of the stream of `seed` at drop probability p.
FUSED_ATTN_HOST_DEVICE bool keep(uint64_t seed, uint64_t element, float p) {
  return uniform(seed, element) >= p;
}

// keep[j] = keep(seed, first + j, p) for j in [0, N): one evaluation of the rounds per counter the
// run touches (N / 4 of them for a run that starts at a multiple of 4), not one per element. For a
// GPU thread's run of consecutive elements.
template <int N>
FUSED_ATTN_HOST_DEVICE void keep_run(uint64_t seed, uint64_t first, float p, bool (&keep)[N]) {
  uint32_t w0, w1, w2, w3;
  counter_words(seed, first >> 2, w0, w1, w2, w3);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int j = 0; j < N; ++j) {
    const uint64_t e = first + static_cast<uint64_t>(j);
    const uint32_t which = static_cast<uint32_t>(e & 3u);
    if (j > 0 && which == 0) counter_words(seed, e >> 2, w0, w1, w2, w3);
    keep[j] = to_uniform(select_word(which, w0, w1, w2, w3)) >= p;
  }
}

// Every backend takes dropout_p as a float32 p (as torch's CUDA dropout does) and divides what it
// keeps by the keep rate 1 - p (exact in float for p >= 0.5), so the expected value of an element
// is itself. A dropout_p that rounds to 1 (over 1 - 2^-25) keeps nothing: the divisor is then 1 and
// the scale 0, so dropped elements give 0 (NaN stays NaN), not 0 / 0.
FUSED_ATTN_HOST_DEVICE float keep_divisor(float p) { return p < 1.f ? 1.f - p : 1.f; }
FUSED_ATTN_HOST_DEVICE float keep_scale(float p) { return p < 1.f ? 1.f / (1.f - p) : 0.f; }

#ifndef __CUDACC__
#ifdef __AVX2__
namespace detail {

#ifdef __AVX512F__
// AVX-512: each 32-bit word of a counter's state sits in the low half of a 64-bit lane (8 counters
// per vector), so one vpmuludq gives a product's high and low words at once, and a 32-bit swap
// within each lane (vpshufd, another port than the multiplies) brings the high word down; the
// upper halves hold leftovers that no multiply reads and the final blend drops. A round is two
// multiplies, two swaps and two three-way XORs (vpternlogq) per vector: a quarter fewer cycles
// than 16 counters per vector with the products' halves shifted and blended back into 32-bit lanes,
// whose shifts shared the one port that multiplies.
template <int G>
inline void wide_rounds(__m512i (&c0)[G], __m512i (&c1)[G], __m512i (&c2)[G], __m512i (&c3)[G], uint32_t k0,
                        uint32_t k1) {
  const __m512i round_a = _mm512_set1_epi64(kRoundA), round_b = _mm512_set1_epi64(kRoundB);
  for (int g = 0; g < G; ++g) c2[g] = c3[g] = _mm512_setzero_si512();
  for (int round = 0; round < kRounds; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      const __m512i prod_b = _mm512_mul_epu32(c2[g], round_b), prod_a = _mm512_mul_epu32(c0[g], round_a);
      // 0x96: a ^ b ^ c. The swapped product's low half is its high word.
      c0[g] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(prod_b, _MM_PERM_CDAB), c1[g], key0, 0x96);
      c2[g] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(prod_a, _MM_PERM_CDAB), c3[g], key1, 0x96);
      c1[g] = prod_b;
      c3[g] = prod_a;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// to_uniform of a vector's words, lane by lane: w < 0 ? ~w : w (xor with the sign mask), to float,
// times the scale; returned as integer bits.
inline __m512i uniform_bits(__m512i w) {
  const __m512i folded = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kUniformScale)));
}

// out[4 t + k] = the uniform of word k of counter t, for the 8 counters of wide-lane w0..w3: each
// counter's words paired into 64-bit lanes ([w0 w1], [w2 w3]), then the pairs interleaved.
inline void store_wide(__m512i w0, __m512i w1, __m512i w2, __m512i w3, float* out) {
  const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, w0, _mm512_slli_epi64(w1, 32));
  const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, w2, _mm512_slli_epi64(w3, 32));
  const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i last = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  _mm512_storeu_si512(out, uniform_bits(_mm512_permutex2var_epi64(w01, first, w23)));      // counters 0..3
  _mm512_storeu_si512(out + 16, uniform_bits(_mm512_permutex2var_epi64(w01, last, w23)));  // 4..7
}
#else
// AVX2: 32-bit integer lanes, 8 counters per vector (64-bit lanes, as AVX-512 takes them, are no
// faster here: without three-way XORs their extra instructions cancel the saved shifts).

// (hi, lo) 32-bit halves of the products x[t] * k (vpmuludq multiplies the even 32-bit lanes;
// the odd lanes are shifted down for a second multiply, and the halves blended back in place).
inline void mul_hi_lo(__m256i x, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, k);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Philox4x32-10 of G vectors of counters, in place: c0 and c1 hold the counters' low and high
// words, and on return c0..c3 the four output words. The vectors are independent chains,
// interleaved so that one's multiplies cover the other's latency.
template <int G>
inline void rounds(__m256i (&c0)[G], __m256i (&c1)[G], __m256i (&c2)[G], __m256i (&c3)[G], uint32_t k0,
                   uint32_t k1) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  for (int g = 0; g < G; ++g) c2[g] = c3[g] = _mm256_setzero_si256();
  for (int round = 0; round < kRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < G; ++g) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(c2[g], round_b, hi_b, lo_b);
      mul_hi_lo(c0[g], round_a, hi_a, lo_a);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), key0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), key1);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// to_uniform of a vector's words, lane by lane: w < 0 ? ~w : w (xor with the sign mask), to float,
// times the scale; returned as integer bits for the transpose.
inline __m256i uniform_bits(__m256i w) {
  const __m256i folded = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale)));
}

// out[4 t + k] = the uniform of word k of counter t, for the 8 counters of w0..w3 (word k of
// counter t in lane t of wk): a 4 x 8 transpose into element order.
inline void store_elements(__m256i w0, __m256i w1, __m256i w2, __m256i w3, float* out) {
  const __m256i a = uniform_bits(w0), b = uniform_bits(w1), c = uniform_bits(w2), d = uniform_bits(w3);
  // ab_lo: words 0, 1 of counters 0, 1 | 4, 5; ab_hi: of counters 2, 3 | 6, 7 (cd_* words 2, 3).
  const __m256i ab_lo = _mm256_unpacklo_epi32(a, b), ab_hi = _mm256_unpackhi_epi32(a, b);
  const __m256i cd_lo = _mm256_unpacklo_epi32(c, d), cd_hi = _mm256_unpackhi_epi32(c, d);
  const __m256i t04 = _mm256_unpacklo_epi64(ab_lo, cd_lo), t15 = _mm256_unpackhi_epi64(ab_lo, cd_lo);
  const __m256i t26 = _mm256_unpacklo_epi64(ab_hi, cd_hi), t37 = _mm256_unpackhi_epi64(ab_hi, cd_hi);
  auto* dst = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(t04, t15, 0x20));  // counters 0, 1
  _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(t26, t37, 0x20));  // 2, 3
  _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(t04, t15, 0x31));  // 4, 5
  _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(t26, t37, 0x31));  // 6, 7
}

// Counters counter + lane + offset (lanes 0..7): low and high words, the carry of the low add by
// an unsigned compare (both sides' sign bits flipped for the signed one AVX2 has). Built in
// registers: scalar stores read back as one vector would stall the load.
inline void counter_vector(uint64_t counter, uint32_t offset, __m256i& lo, __m256i& hi) {
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter)));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  lo = _mm256_add_epi32(base_lo, _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(offset))));
  const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, sign), _mm256_xor_si256(lo, sign));
  const __m256i base_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(counter >> 32)));
  hi = _mm256_sub_epi32(base_hi, carry);  // carry is -1 where the low word wrapped
}
#endif  // __AVX512F__

}  // namespace detail
#endif  // __AVX2__

// Counters per group of the CPU draw (one vector of them) and the elements they give; the draw
// runs fastest kBatchGroups groups at a time (independent chains, whose latencies overlap).
constexpr int kGroupCounters = 8;
constexpr int kGroupElements = kWords * kGroupCounters;
#ifdef __AVX512F__
constexpr int kBatchGroups = 4;
#else
constexpr int kBatchGroups = 2;
#endif
constexpr int kBatchElements = kBatchGroups * kGroupElements;

// out[t] = uniform(seed, 4 * counter + t) for t in [0, kGroupElements G): the words of G groups of
// kGroupCounters consecutive counters from `counter`, in element order.
template <int G>
__attribute__((always_inline)) inline void counter_uniforms(uint64_t seed, uint64_t counter, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX512F__)
  __m512i c0[G], c1[G], c2[G], c3[G];
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int g = 0; g < G; ++g) {
    c0[g] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(counter + g * kGroupCounters)), lane);
    c1[g] = _mm512_srli_epi64(c0[g], 32);  // c0's upper half is its high word: no multiply reads it
  }
  detail::wide_rounds<G>(c0, c1, c2, c3, k0, k1);
  for (int g = 0; g < G; ++g) detail::store_wide(c0[g], c1[g], c2[g], c3[g], out + g * kGroupElements);
#elif defined(__AVX2__)
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) detail::counter_vector(counter, g * kGroupCounters, c0[g], c1[g]);
  detail::rounds<G>(c0, c1, c2, c3, k0, k1);
  for (int g = 0; g < G; ++g) detail::store_elements(c0[g], c1[g], c2[g], c3[g], out + g * kGroupElements);
#else
  (void)k0;
  (void)k1;
  for (int t = 0; t < G * kGroupCounters; ++t) {
    uint32_t w[kWords];
    counter_words(seed, counter + static_cast<uint64_t>(t), w[0], w[1], w[2], w[3]);
    for (int k = 0; k < kWords; ++k) out[kWords * t + k] = to_uniform(w[k]);
  }
#endif
}

// out[t] = uniform(seed, first + t) for t in [0, n): whole counters drawn kBatchGroups groups at a
// time, then a group at a time; the groups that straddle the run's ends through a buffer.
__attribute__((always_inline)) inline void uniforms(uint64_t seed, uint64_t first, int64_t n, float* out) {
  uint64_t counter = first / kWords;
  int64_t pos = -static_cast<int64_t>(first % kWords);  // where counter's first word lands in out
  while (pos < n) {
    if (pos >= 0 && n - pos >= kBatchElements) {
      counter_uniforms<kBatchGroups>(seed, counter, out + pos);
      counter += kBatchGroups * kGroupCounters;
      pos += kBatchElements;
      continue;
    }
    if (pos >= 0 && n - pos >= kGroupElements) {
      counter_uniforms<1>(seed, counter, out + pos);
    } else {
      alignas(64) float part[kGroupElements];
      counter_uniforms<1>(seed, counter, part);
      const int64_t lo = std::max<int64_t>(pos, 0), hi = std::min<int64_t>(n, pos + kGroupElements);
      std::memcpy(out + lo, part + (lo - pos), static_cast<size_t>(hi - lo) * sizeof(float));
    }
    counter += kGroupCounters;
    pos += kGroupElements;
  }
}
#endif  // __CUDACC__

}  // namespace philox
}  // namespace fused_attn
