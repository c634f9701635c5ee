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
// uniform_lanes, written as plain loops over lanes that compilers vectorise (a 32x32->64-bit
// multiply per lane is what vpmuludq does).
#pragma once

#include <cstdint>

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

// out[t] = uniform(seed, counter + t) for t in [0, kLanes): one lane per counter, every round
// applied to all lanes before the next, so that the loops vectorise.
constexpr int kLanes = 16;
inline void uniform_lanes(uint64_t seed, uint64_t counter, float* out) {
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int t = 0; t < kLanes; ++t) {
    const uint64_t e = counter + static_cast<uint64_t>(t);
    c0[t] = static_cast<uint32_t>(e);
    c1[t] = static_cast<uint32_t>(e >> 32);
    c2[t] = 0;
    c3[t] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kRounds; ++round) {
    for (int t = 0; t < kLanes; ++t) {
      const uint64_t b = static_cast<uint64_t>(kRoundB) * c2[t];
      const uint64_t a = static_cast<uint64_t>(kRoundA) * c0[t];
      c0[t] = static_cast<uint32_t>(b >> 32) ^ c1[t] ^ k0;
      c2[t] = static_cast<uint32_t>(a >> 32) ^ c3[t] ^ k1;
      c1[t] = static_cast<uint32_t>(b);
      c3[t] = static_cast<uint32_t>(a);
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  for (int t = 0; t < kLanes; ++t) out[t] = to_uniform(c0[t]);
}

}  // namespace philox
}  // namespace fused_attn
