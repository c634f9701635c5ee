// The dropout random stream every backend shares (see csrc/ops.cpp): Philox4x32-10 exactly as
// triton.language.rand computes it, so that a C++ kernel and a Triton kernel given the same seed
// drop the same elements.
//
// Element e of a call's stream (a 64-bit counter: for attention e = (bh * q_len + i) * k_len + j)
// runs 10 Philox rounds on the state (e & 0xffffffff, e >> 32, 0, 0) with the key
// (seed & 0xffffffff, seed >> 32), bumping the key by the Weyl constants after every round. Only
// the first output word is used: read as int32 w, it maps to [0, 1) as
// float(w < 0 ? -w - 1 : w) * 4.6566127342e-10f (int -> float rounded to nearest, then one float
// multiply; the constant is the largest that keeps INT32_MAX * scale below 1 in float). The
// element is kept when that value is >= dropout_p (compared in float, as Triton does with a float
// kernel argument).
//
// Header-only and usable from host and device code (__host__ __device__ under nvcc). The scalar
// functions here are the definition; CPU kernels evaluate 16 consecutive counters at once with
// uniform_lanes (explicit AVX2 when the compiler targets it, a plain loop over lanes otherwise;
// both give the scalar functions' bits).
#pragma once

#include <cstdint>

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

FUSED_ATTN_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The first output word of Philox4x32-10 for `counter` under `seed`.
FUSED_ATTN_HOST_DEVICE uint32_t first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
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
  return c0;
}

// The word as a float in [0, 1), as triton.language.rand maps it.
FUSED_ATTN_HOST_DEVICE float to_uniform(uint32_t word) {
  const int32_t w = static_cast<int32_t>(word);
  const int32_t folded = w < 0 ? ~w : w;  // ~w == -w - 1, without the overflow of -INT32_MIN
  return static_cast<float>(folded) * kUniformScale;
}

FUSED_ATTN_HOST_DEVICE float uniform(uint64_t seed, uint64_t counter) {
  return to_uniform(first_word(seed, counter));
}

// Whether dropout keeps element `counter` of the stream of `seed` at drop probability p.
FUSED_ATTN_HOST_DEVICE bool keep(uint64_t seed, uint64_t counter, float p) {
  return uniform(seed, counter) >= p;
}

// Every backend takes dropout_p as a float32 p (as torch's CUDA dropout does) and divides what it
// keeps by the keep rate 1 - p (exact in float for p >= 0.5), so the expected value of an element
// is itself. A dropout_p that rounds to 1 (over 1 - 2^-25) keeps nothing: the divisor is then 1 and
// the scale 0, so dropped elements give 0 (NaN stays NaN), not 0 / 0.
FUSED_ATTN_HOST_DEVICE float keep_divisor(float p) { return p < 1.f ? 1.f - p : 1.f; }
FUSED_ATTN_HOST_DEVICE float keep_scale(float p) { return p < 1.f ? 1.f / (1.f - p) : 0.f; }

#if defined(__AVX2__) && !defined(__CUDACC__)
namespace detail {

// (hi, lo) 32-bit halves of the 8 products x[t] * k (vpmuludq multiplies the even 32-bit lanes;
// the odd lanes are shifted down for a second multiply, and the halves blended back in place).
inline void mul_hi_lo(__m256i x, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, k);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Philox4x32-10 first words of the 2 x 8 counters (c0[g], c1[g]) with key (k0, k1), in place in
// c0; AVX2 (compilers do not vectorise the widening multiplies of the plain loop). The two groups
// are independent chains, interleaved so that one's multiplies cover the other's latency.
inline void first_words16(__m256i (&c0)[2], __m256i (&c1)[2], uint32_t k0, uint32_t k1) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  const __m256i key_a = _mm256_set1_epi32(static_cast<int>(kKeyA));
  const __m256i key_b = _mm256_set1_epi32(static_cast<int>(kKeyB));
  __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
  __m256i c2[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  __m256i c3[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int round = 0; round < kRounds; ++round) {
    for (int g = 0; g < 2; ++g) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mul_hi_lo(c2[g], round_b, hi_b, lo_b);
      mul_hi_lo(c0[g], round_a, hi_a, lo_a);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), key0);
      c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), key1);
      c1[g] = lo_b;
      c3[g] = lo_a;
    }
    key0 = _mm256_add_epi32(key0, key_a);
    key1 = _mm256_add_epi32(key1, key_b);
  }
}

}  // namespace detail
#endif

// out[t] = uniform(seed, counter + t) for t in [0, kLanes): one lane per counter, every round
// applied to all lanes before the next (explicit AVX2 where the compiler targets it).
constexpr int kLanes = 16;
inline void uniform_lanes(uint64_t seed, uint64_t counter, float* out) {
  uint32_t c0[kLanes], c1[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    const uint64_t e = counter + static_cast<uint64_t>(t);
    c0[t] = static_cast<uint32_t>(e);
    c1[t] = static_cast<uint32_t>(e >> 32);
  }
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX2__) && !defined(__CUDACC__)
  static_assert(kLanes == 16, "two groups of 8 AVX2 lanes");
  __m256i w[2], hi[2];
  for (int g = 0; g < 2; ++g) {
    w[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 8 * g));
    hi[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 8 * g));
  }
  detail::first_words16(w, hi, k0, k1);
  const __m256 scale = _mm256_set1_ps(kUniformScale);
  for (int g = 0; g < 2; ++g) {
    // to_uniform: w < 0 ? ~w : w (xor with the sign mask), to float, times the scale.
    const __m256i folded = _mm256_xor_si256(w[g], _mm256_srai_epi32(w[g], 31));
    _mm256_storeu_ps(out + 8 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(folded), scale));
  }
#else
  uint32_t c2[kLanes] = {}, c3[kLanes] = {};
  uint32_t key0 = k0, key1 = k1;
  for (int round = 0; round < kRounds; ++round) {
    for (int t = 0; t < kLanes; ++t) {
      const uint64_t b = static_cast<uint64_t>(kRoundB) * c2[t];
      const uint64_t a = static_cast<uint64_t>(kRoundA) * c0[t];
      c0[t] = static_cast<uint32_t>(b >> 32) ^ c1[t] ^ key0;
      c2[t] = static_cast<uint32_t>(a >> 32) ^ c3[t] ^ key1;
      c1[t] = static_cast<uint32_t>(b);
      c3[t] = static_cast<uint32_t>(a);
    }
    key0 += kKeyA;
    key1 += kKeyB;
  }
  for (int t = 0; t < kLanes; ++t) out[t] = to_uniform(c0[t]);
#endif
}

}  // namespace philox
}  // namespace fused_attn
