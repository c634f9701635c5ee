// CUDA kernels of fused_attn::attention_fwd / attention_bwd and softmax_fwd / softmax_bwd (schemas and
// the conventions every backend shares in csrc/ops.cpp; csrc/cpu/attention.cpp and the Triton kernels in
// fused_attn/kernels/triton are their semantic twins).
//
// Attention is FlashAttention-2 on tensor cores (mma.sync.m16n8k16, fp16/bf16 operands, fp32
// accumulation, inline PTX; sm80 and newer). fp32 inputs are not served here: the policy sends them to
// the Triton kernels (fused_attn/ops/attention.py declares this backend fp16/bf16 only, sm >= 8.0).
//
// Tiling. Every kernel runs 4 warps (128 threads) and every warp owns 16-row strips of its block's
// tile, one or two (see block_strips), so all row statistics (max, sum, delta) live in the registers of
// the 4 lanes of a quad that hold a row's mma fragments and are reduced with two shuffles, never
// through shared memory.
//  * forward: one block per (batch*head, 128 queries: two strips per warp, which read each K and V
//    fragment once for both; 64 where the queries are few, and above head dim 128). Q [128 x D] sits in
//    shared memory; K and V are streamed through shared memory a key tile at a time (64 keys for
//    D <= 64, 32 above: 25-70 KB of shared memory per block up to D = 128). Causal: a warp skips the
//    products of a key tile wholly past its last row (the block's other warps may need it). S = Q K^T and
//    O += P V are warp-level products on tensor cores: A operands come from shared memory by ldmatrix
//    (Q; up to D = 64 loaded once and kept in registers for all key tiles) or straight from the S
//    accumulators re-packed to fp16/bf16 (P, the FA2 register reuse), B operands by ldmatrix (.trans
//    for V). Online softmax in fp32 registers in log2 units (log2(e) folded
//    into the scale, exp2), the running row sum kept per lane and reduced over the quad once at the end.
//    Writes O and the row statistics [B, H, 2, Lq]: the row max (log2 units; +inf for a row that sees
//    no key, whose output is 0) and log2 of the row sum, kept apart so that the backward forms
//    P = exp2((s - max) - log2(sum)) with s - max exact: a single log-sum-exp max + log2(sum) loses
//    log2(sum) once |max| is large (keys that all carry a bias of -1e9: |max| ~ 1.44e9, float spacing
//    128), and the backward's P would be 1 instead of 1 / Lk.
//  * backward, three kernels: row statistics, then dK/dV, then dQ. The statistics kernel is the dQ
//    kernel without its dQ product (a template flag): from the very S and dP the gradient kernels form,
//    corr = 1 / sum_j P_ij and delta = sum_j P_ij dP_ij / sum_j P_ij (in exact arithmetic 1 and
//    rowsum(dO * O)), and the gradient kernels take P * corr, so that dS = P (dP - delta) cancels as in
//    the plain softmax backward. rowsum(dO * O) would carry the rounding of the stored 16-bit output
//    instead of this P's: with peaked rows (the true dQ near 0) the Triton kernels' dQ and dK reached
//    2-6x the plain error that way, and 0.01 where the truth and the plain backward are exactly 0.
//    Cost: 9 tile products instead of 7. dK/dV with one block per (batch*head, 128 or 64 keys: two
//    strips of 16 keys per warp, or one, chosen as the forward's up to D = 64; 64 above), streaming
//    query tiles (64 queries for D <= 64, 32 above; half that with two strips) and forming S^T = K Q^T,
//    dP^T = V dO^T directly transposed so that dV += P^T dO and dK += dS^T Q reuse the accumulators as
//    A operands (K and V fragments kept in registers where they fit beside dK and dV: one strip up to
//    D = 64, two up to 32); dQ (and the statistics) with one block per (batch*head, 128 or 64 queries, likewise)
//    streaming key tiles as the forward does (32 keys with two strips per warp; Q and dO fragments kept
//    in registers up to D = 64, as the forward's Q), dQ += dS K, and, when a floating mask needs its
//    gradient, dS written to grad_scores (float32, zero-initialised so causally skipped tiles read 0).
//    dQ is a separate pass rather than fp32 atomics from the dK/dV kernel: it recomputes Q K^T and
//    dO V^T once more (2 tile products more), but every gradient is written by exactly one
//    block in a fixed order, so results are bitwise deterministic (the tests demand equal gradients
//    from equal calls), need no zero-initialised fp32 dQ buffer and no conversion pass, and the dQ
//    pass is also where grad_scores is formed.
//  * head dims: kernels are instantiated for padded head dims 32, 64, 96, 128 and 256; any head dim up
//    to 256 (query/key D and value Dv may differ) runs in the smallest that holds max(D, Dv), the
//    columns past D / Dv loaded as zeros and never stored. Accumulators wider than 128 columns would
//    not fit in registers, so for 256 the grid has a second dimension of two column halves of the
//    output (O, dK/dV, dQ): each half recomputes the scores, which are identical bits in both (the
//    forward launches the second half only when the value head dim reaches past 128).
//
// Shared memory. Row-major tiles with rows padded by 8 elements (16 bytes): the row pitch is then an odd
// number of 16-byte units for every head dim here, which puts the 8 rows an ldmatrix phase reads into 8
// distinct 16-byte bank groups (conflict-free), and every row stays 16-byte aligned for cp.async.
// Forward: Q [BM][D+8] (BM 128 or 64), K [2][BN][D+8], V [2][BN][Dc+8] (Dc: the column half of V a
// block needs). dK/dV: K, V [BN][D+8] (BN 128 or 64), Q, dO [2][BM][D+8]. dQ: Q, dO [BM][D+8], K, V
// [2][BN][D+8].
// Up to D = 128 no kernel needs more than 70 KB; at D = 256 the backward takes 135 KB: fine on sm80
// and sm90, beyond the 99 KB of sm86/sm89, where the launcher refuses with a message naming the
// triton backend.
//
// Pipeline. Double buffering with cp.async (16-byte copies, zero-filling rows past the sequence end
// and columns past the head dim): the copy of tile t + 1 is issued before tile t is computed, one
// commit group per tile, cp.async.wait_group 1 plus a barrier before use and a barrier after it
// before the buffer is refilled. Inputs whose rows are not 16-byte aligned (head dim not a multiple
// of 8, odd strides, offset views) take the same path with plain element copies instead.
//
// Masks are read from global memory through their [B, H, Lq, Lk] strides (zero = broadcast), bool (True
// = attend) or any floating dtype (added to the scores). Causal is top-left (query i sees keys j <= i):
// key tiles past a query tile's last row are never visited (and query tiles before a key tile's first
// key, in the dK/dV kernel); only the tiles that straddle the diagonal, cross a sequence end, or have a
// mask pay the per-element pass. A bool mask that is the same for every query of a head (a key padding
// mask, [B, 1, 1, Lk] or [B, H, 1, Lk]) is scanned once per call by key_span_kernel for each head's first
// and last visible key; the forward and dQ kernels walk only the key tiles between them and the dK/dV
// kernel's blocks of keys outside them store zeros without loading anything, so a padded batch costs
// what its sequences' lengths cost (the cpu and triton backends do the same).
//
// Grouped-query attention (key/value with fewer heads than query, a divisor of its heads): every
// kernel reads key/value head h / kv_group for query head h in place. The dK/dV kernel keeps its
// grid over query heads (the parallelism of ungrouped attention, whatever the group size) and
// stores each query head's dK/dV into [B, H, Lk, D] buffers that the launcher sums over each group,
// as FlashAttention-2 does.
//
// Dropout regenerates the shared Philox4x32-10 stream (fused_attn/philox.h) per element, element
// (bh * Lq + i) * Lk + j, so the forward, both backward kernels and every other backend draw the same
// keep-mask from the seed: the row sum takes the undropped P, P V takes P * keep (0 or 1) and O the
// 1 / (1 - p) in float32 (folded into P before its fp16 cast it would overflow for p > 1 - 1/65504); the
// backward drops dP where P was dropped (delta then is in the same unscaled units) and dV takes the kept
// P; the 1 / (1 - p) is applied at the stores of dV, dK, dQ and grad_scores, so dS = P (dP - delta), the
// fp16/bf16 operand of the dK and dQ products, stays at the scale of dO V^T (scaled, it would overflow
// fp16 for p near 1 where the gradients do not). Where a thread's accumulator holds two adjacent keys of
// a query (the forward's and the dQ kernel's tiles), one Philox evaluation gives both keys' words when
// their elements share a counter (kept_pair: always for an even Lk); the dK/dV kernel's transposed tiles
// hold no such pairs and draw per element.
//
// Limits: sm80+, fp16/bf16, head dims up to 256, sequence lengths below 2^31, batch*heads*tiles below
// 2^31 blocks.
//
// Softmax (softmax(input * scale + mask) over the last dim, any strides, mask through its strides):
// fp32 math on scores in natural units (the row max subtracted before exp2's factor log2(e)), a warp
// per row for rows of up to 1024 elements (4 rows per 128-thread block), a 512-thread block per row
// above; rows of up to 32 (warp) or 8 (block) elements per thread stay in registers, longer ones are
// re-read for each pass (max, sum, write) instead of being cached. The backward is
// dx = scale * y * (dy - sum(y * dy) / sum(y)) with the same row mapping (the row term over the saved
// probabilities' own sum, 0 for a row without weight: see softmax_row_term in csrc/cpu/attention.cpp);
// every sum is a fixed butterfly, so both are deterministic.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "fused_attn/checks.h"
#include "fused_attn/cuda_utils.cuh"
#include "fused_attn/layout.h"
#include "fused_attn/philox.h"

// The tensor-core, ldmatrix and cp.async instructions need sm80; device code for older targets (only
// built when TORCH_CUDA_ARCH_LIST asks for them) compiles to a trap, and the launcher refuses them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FUSED_ATTN_SM80 1
#else
#define FUSED_ATTN_SM80 0
#endif

namespace fused_attn {
namespace {

using cuda_utils::kFullWarpMask;
using cuda_utils::kWarpSize;

constexpr float kLog2e = 1.4426950408889634f;

// The score scale in the kernels' log2 units, scale * log2(e), saturated at float's largest finite
// value where the scale itself is finite in float: a scale beyond 2.36e38 would otherwise reach the
// kernels as inf, and a zero score times it as NaN, where the cpu backend (which scales by the scale
// itself) gives the limit softmax. A scale that float cannot hold stays inf, as on every backend.
float scale_log2(double scale) {
  const float s = static_cast<float>(scale);
  const float v = s * kLog2e;
  return std::isinf(v) && std::isfinite(s) ? std::copysign(std::numeric_limits<float>::max(), v) : v;
}
// Finite float-mask values are clamped to +-kMaskBound here: times log2(e) they stay below FLT_MAX
// (+-inf stays, NaN stays NaN), so a row masked with finfo.min alone averages its values as PyTorch
// does, and a bias above 2.36e38 picks its key instead of turning the row into inf - inf = NaN.
constexpr float kMaskBound = 2.35e38f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Element types: 16-bit storage moved as raw bits; conversions and the mma flavour per dtype.

template <typename T>
struct Elem;

template <>
struct Elem<at::Half> {
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
  // Two floats as one register of an mma operand: lo in the low half (the lower column).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(from_float(lo)) | (static_cast<uint32_t>(from_float(hi)) << 16);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
    cuda_emu::mma_m16n8k16(d, a, b0, b1, /*bf16=*/false);
#elif FUSED_ATTN_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

template <>
struct Elem<at::BFloat16> {
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(from_float(lo)) | (static_cast<uint32_t>(from_float(hi)) << 16);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
    cuda_emu::mma_m16n8k16(d, a, b0, b1, /*bf16=*/true);
#elif FUSED_ATTN_SM80
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

// Loads element `i` of a fp16/bf16/fp32 array as float (softmax: any of the three).
template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return p[i];
  } else {
    return Elem<T>::to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, int64_t i, float x) {
  if constexpr (std::is_same_v<T, float>) {
    p[i] = x;
  } else {
    reinterpret_cast<uint16_t*>(p)[i] = Elem<T>::from_float(x);
  }
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers: shared-memory matrix loads, asynchronous copies. Every inline PTX instruction of the
// kernels is in one of these wrappers (and Elem<T>::mma): compiled with FUSED_ATTN_CUDA_EMULATION they
// call the host emulator of tests/cuda_emu instead, which runs these kernels on a CPU in the tests.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8, and receives
// element (l / 4, 2 * (l % 4) + {0, 1}) of each matrix in r[0..3] (.trans: element (2 * (l % 4) + {0, 1},
// l / 4), i.e. of the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  cuda_emu::ldmatrix_x4(r, addr, /*trans=*/false);
#elif FUSED_ATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  r[0] = r[1] = r[2] = r[3] = addr;
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  cuda_emu::ldmatrix_x4(r, addr, /*trans=*/true);
#elif FUSED_ATTN_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  r[0] = r[1] = r[2] = r[3] = addr;
  __trap();
#endif
}

// 16 bytes global -> shared, bypassing L1; valid == false writes 16 zero bytes (src is not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  cuda_emu::cp_async_16(dst, src, valid ? 16 : 0);
#elif FUSED_ATTN_SM80
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  (void)dst;
  (void)src;
  (void)valid;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  cuda_emu::cp_async_commit();
#elif FUSED_ATTN_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most one commit group (the most recent) is still in flight.
__device__ __forceinline__ void cp_async_wait_all_but_one() {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  cuda_emu::cp_async_wait(1);
#elif FUSED_ATTN_SM80
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp-level tile products. A warp computes a 16-row strip; acc[nb][0..3] is the m16n8 accumulator
// of columns [8 nb, 8 nb + 8): lane l holds rows l / 4 (elements 0, 1) and l / 4 + 8 (2, 3), columns
// 2 * (l % 4) + {0, 1}.

// The A fragments of MT 16-row strips (rows 16 mt .. 16 mt + 15 of a shared row-major tile at a_base,
// pitch a_pitch bytes, kK columns), a[mt][k] the k-th 16 columns: matrices (rows 0-7, k 0-7), (rows
// 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
template <int MT, int kK>
__device__ __forceinline__ void load_a_strips(uint32_t (&a)[MT][kK / 16][4], uint32_t a_base, int a_pitch) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const uint32_t a_addr = a_base + (lane & 15) * a_pitch + (lane >> 4) * 16;
#pragma unroll
  for (int k = 0; k < kK / 16; ++k) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt][k], a_addr + mt * 16 * a_pitch + k * 32);
  }
}

// acc[mt] += A_mt B^T for MT strips of 16 rows, A_mt's fragments in registers (load_a_strips); B: NB * 8
// rows of a shared row-major tile at b_base ([n][k], pitch b_pitch), kK columns. Each B fragment is loaded
// once for all MT strips: a warp that owns two strips reads the streamed tile from shared memory half as
// often per product.
template <typename T, int MT, int NB, int kK>
__device__ __forceinline__ void strips_gemm_abt(float (&acc)[MT][NB][4], const uint32_t (&a)[MT][kK / 16][4],
                                                uint32_t b_base, int b_pitch) {
  static_assert(NB % 2 == 0 && kK % 16 == 0, "tile shapes must be whole mma steps");
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
  const uint32_t b_addr = b_base + ((lane & 7) + ((lane >> 4) << 3)) * b_pitch + ((lane >> 3) & 1) * 16;
#pragma unroll
  for (int k = 0; k < kK / 16; ++k) {
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b[4];
      ldmatrix_x4(b, b_addr + nb * 8 * b_pitch + k * 32);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Elem<T>::mma(acc[mt][nb], a[mt][k], b[0], b[1]);
        Elem<T>::mma(acc[mt][nb + 1], a[mt][k], b[2], b[3]);
      }
    }
  }
}

// strips_gemm_abt with A_mt read from a shared row-major tile at a_base (pitch a_pitch bytes), one k-step's
// fragments at a time: the same products in the same order.
template <typename T, int MT, int NB, int kK>
__device__ __forceinline__ void strips_gemm_abt(float (&acc)[MT][NB][4], uint32_t a_base, int a_pitch,
                                                uint32_t b_base, int b_pitch) {
#pragma unroll
  for (int k = 0; k < kK / 16; ++k) {
    uint32_t a[MT][1][4];
    load_a_strips<MT, 16>(a, a_base + k * 32, a_pitch);
    strips_gemm_abt<T, MT, NB, 16>(acc, a, b_base + k * 32, b_pitch);
  }
}

template <int NB>
__device__ __forceinline__ void zero(float (&acc)[NB][4]) {
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nb][e] = 0.f;
  }
}

// The A operand of a warp's own strips (rows 16 mt .. of a shared row-major tile at `base`, pitch `pitch`
// bytes, kK columns) in the products of a loop over streamed tiles: with kHeld its fragments are loaded
// once (load(), after the tile has landed) and kept in registers for every product, else re-read from
// shared memory at each. The same products in the same order either way.
template <int MT, int kK, bool kHeld>
struct StripsA {
  uint32_t base;
  int pitch;
  uint32_t frag[kHeld ? MT : 1][kHeld ? kK / 16 : 1][4];  // set by load()

  __device__ __forceinline__ StripsA(uint32_t base_, int pitch_) : base(base_), pitch(pitch_) {}

  __device__ __forceinline__ void load() {
    if constexpr (kHeld) load_a_strips<MT, kK>(frag, base, pitch);
  }
};

// S = A B^T for a warp's strips (A held or re-read, see StripsA) against NB * 8 rows of a streamed tile at
// b_base (pitch b_pitch bytes), into acc (zeroed first).
template <typename T, int MT, int NB, int kK, bool kHeld>
__device__ __forceinline__ void strips_product(float (&acc)[MT][NB][4], const StripsA<MT, kK, kHeld>& a,
                                               uint32_t b_base, int b_pitch) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero(acc[mt]);
  if constexpr (kHeld) {
    strips_gemm_abt<T, MT, NB, kK>(acc, a.frag, b_base, b_pitch);
  } else {
    strips_gemm_abt<T, MT, NB, kK>(acc, a.base, a.pitch, b_base, b_pitch);
  }
}

// acc[mt] += A_mt B for MT strips. A_mt: KB k-steps of register fragments (see to_a_fragments); B: a
// shared row-major tile at b_base ([k][n], pitch b_pitch), KB * 16 rows, NB * 8 columns, read transposed
// by ldmatrix.trans once for all MT strips.
template <typename T, int MT, int NB, int KB>
__device__ __forceinline__ void strips_gemm_ab(float (&acc)[MT][NB][4], const uint32_t (&a)[MT][KB][4],
                                               uint32_t b_base, int b_pitch) {
  static_assert(NB % 2 == 0, "tile shapes must be whole mma steps");
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
  const uint32_t b_addr = b_base + ((lane & 7) + (((lane >> 3) & 1) << 3)) * b_pitch + (lane >> 4) * 16;
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr + kb * 16 * b_pitch + nb * 16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        Elem<T>::mma(acc[mt][nb], a[mt][kb], b[0], b[1]);
        Elem<T>::mma(acc[mt][nb + 1], a[mt][kb], b[2], b[3]);
      }
    }
  }
}

// The 16 x (8 NB) accumulator rounded to T as A operands of NB / 2 k-steps: columns 16 kb .. 16 kb + 15
// are accumulator blocks 2 kb and 2 kb + 1, whose lane layout is exactly the A fragment's.
template <typename T, int NB>
__device__ __forceinline__ void to_a_fragments(const float (&acc)[NB][4], uint32_t (&a)[NB / 2][4]) {
#pragma unroll
  for (int kb = 0; kb < NB / 2; ++kb) {
    a[kb][0] = Elem<T>::pack(acc[2 * kb][0], acc[2 * kb][1]);
    a[kb][1] = Elem<T>::pack(acc[2 * kb][2], acc[2 * kb][3]);
    a[kb][2] = Elem<T>::pack(acc[2 * kb + 1][0], acc[2 * kb + 1][1]);
    a[kb][3] = Elem<T>::pack(acc[2 * kb + 1][2], acc[2 * kb + 1][3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description shared by the attention kernels.

enum MaskKind : int { kMaskNone = 0, kMaskBool, kMaskFloat, kMaskHalf, kMaskBFloat16, kMaskDouble };

struct MaskArgs {
  const void* data = nullptr;
  int kind = kMaskNone;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // strides (elements) of the mask expanded to 4-D
};

// Score `s` (log2 units) masked by mask element `offset`: -inf where a bool mask hides the key (whatever
// `s` is, so a NaN or inf score there is dropped, as on the other backends); a floating mask is added
// (times log2(e)), its finite values clamped to +-kMaskBound.
__device__ __forceinline__ float clamp_bias(float v) {
  return fabsf(v) > kMaskBound && fabsf(v) != kInf ? copysignf(kMaskBound, v) : v;
}

// Floating mask element `offset` as float, unscaled (natural units).
__device__ __forceinline__ float float_bias(const MaskArgs& m, int64_t offset) {
  switch (m.kind) {
    case kMaskFloat: return static_cast<const float*>(m.data)[offset];
    case kMaskHalf: return __half2float(static_cast<const __half*>(m.data)[offset]);
    case kMaskBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(m.data)[offset]);
    case kMaskDouble: return static_cast<float>(static_cast<const double*>(m.data)[offset]);
    default: return 0.f;
  }
}

__device__ __forceinline__ float apply_mask(float s, const MaskArgs& m, int64_t offset) {
  if (m.kind == kMaskBool) return static_cast<const uint8_t*>(m.data)[offset] != 0 ? s : -kInf;
  return m.kind == kMaskNone ? s : s + clamp_bias(float_bias(m, offset)) * kLog2e;
}

struct AttnParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  int64_t q_s[3], k_s[3], v_s[3];  // strides (elements) of batch, head, row
  MaskArgs mask;
  int heads, q_len, k_len, d, dv;
  int kv_group;   // query heads per key/value head: query head h reads key/value head h / kv_group
  int num_tiles;  // tiles of the sequence a block owns a tile of (queries, or keys for dK/dV)
  float scale;       // natural-log units
  float scale_log2;  // scale * log2(e)
  bool causal;
  bool vec;  // every row of Q, K, V (and dO) 16-byte aligned: cp.async path
  // [B * H] of (first key seen, one past the last key seen) of a bool mask that is the same for every
  // query of a head (key_span_kernel; first >= last: none), or null: the kernels walk only those keys.
  const int2* key_span;
  bool dropout;
  float dropout_p, inv_keep;
  cuda_utils::DropoutSeed seed;  // read once per tile that drops (DropoutSeed::load)
};

struct FwdParams : AttnParams {
  uint16_t* out;  // [B, H, Lq, Dv] in the query's layout (fused_attn/layout.h), unit stride along Dv
  int64_t o_s[3];
  float* stats;   // [B * H, 2, Lq]: row max (log2 units), log2 of the row sum
};

struct BwdParams : AttnParams {
  const uint16_t* dout;
  int64_t do_s[3];
  const float* stats;  // [B * H, 2, Lq], as the forward wrote them
  float* corr;         // [B * H * Lq], 1 / sum_j P_ij (0 for a row that sees no key): the statistics kernel's
  float* delta;        // [B * H * Lq], sum_j P_ij dP_ij with P renormalised by corr
  uint16_t* dq;
  uint16_t* dk;
  uint16_t* dv_out;
  int64_t dq_s[3], dk_s[3], dv_s[3];
  float* dscores;  // [B, H, Lq, Lk] or null
};

constexpr int kThreads = 128;  // 4 warps, 16 rows each
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowsPerBlock = 16 * kWarps;
// Rows per block of the kernels whose warps own `strips` 16-row strips of a sequence (queries in the
// forward, the statistics and dQ kernels; keys in dK/dV; see block_strips).
constexpr int block_rows(int strips) { return kRowsPerBlock * strips; }

// Output columns a block accumulates: the whole padded head dim up to 128, else halves of it.
constexpr int out_cols(int head_dim) { return head_dim > 128 ? 128 : head_dim; }
// Streamed tile length (keys in the forward and dQ, queries in dK/dV): at most 70 KB of shared memory
// per block up to head dim 128.
constexpr int stream_rows(int head_dim) { return head_dim <= 64 ? 64 : 32; }

// Copies rows [row0, row0 + kRows) x columns [col0, col0 + kCols) of a row-major matrix (row pitch
// `ld` elements) to shared rows of kPitch elements; rows >= nrows and columns >= ncols read as zero.
template <int kRows, int kCols, int kPitch>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* gmem, int64_t ld, int row0, int nrows,
                                          int col0, int ncols, bool vec) {
  if (vec) {
    constexpr int kChunks = kCols / 8;
    for (int idx = static_cast<int>(threadIdx.x); idx < kRows * kChunks; idx += kThreads) {
      const int r = idx / kChunks;
      const int c = (idx % kChunks) * 8;
      // The vector path needs ncols % 8 == 0, so a chunk is wholly inside or wholly outside.
      const bool valid = row0 + r < nrows && col0 + c < ncols;
      const uint16_t* src = valid ? gmem + static_cast<int64_t>(row0 + r) * ld + col0 + c : gmem;
      cp_async_16(smem_addr(smem + r * kPitch + c), src, valid);
    }
  } else {
    for (int idx = static_cast<int>(threadIdx.x); idx < kRows * kCols; idx += kThreads) {
      const int r = idx / kCols;
      const int c = idx % kCols;
      const bool valid = row0 + r < nrows && col0 + c < ncols;
      smem[r * kPitch + c] = valid ? gmem[static_cast<int64_t>(row0 + r) * ld + col0 + c] : uint16_t{0};
    }
  }
}

// Calls f(x, i, j) for every element x of a warp's 16 x (8 NB) accumulator tile whose rows start at
// row0 and columns at col0, with (i, j) its (query, key): rows are queries (rows_are_queries) or keys
// (the dK/dV kernel's transposed tiles).
template <int NB, typename F>
__device__ __forceinline__ void for_each_element(float (&acc)[NB][4], int row0, int col0, bool rows_are_queries,
                                                 const F& f) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + (lane >> 2) + (e >> 1) * 8;
      const int c = col0 + nb * 8 + (lane & 3) * 2 + (e & 1);
      f(acc[nb][e], rows_are_queries ? r : c, rows_are_queries ? c : r, nb, e);
    }
  }
}

// Calls f(x0, x1, i, j) for every pair of adjacent elements of a warp's 16 x (8 NB) accumulator tile
// whose rows (queries) start at row0 and columns (keys) at col0: x0 at (i, j), x1 at (i, j + 1), j even
// when col0 is.
template <int NB, typename F>
__device__ __forceinline__ void for_each_pair(float (&acc)[NB][4], int row0, int col0, const F& f) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      f(acc[nb][2 * half], acc[nb][2 * half + 1], row0 + (lane >> 2) + half * 8, col0 + nb * 8 + (lane & 3) * 2);
    }
  }
}

// Scores of a tile in log2 units, masked in place: -inf outside the sequences, where causality hides
// the key, or where a bool mask does; a floating mask is added (times log2(e)).
template <int NB>
__device__ __forceinline__ void mask_tile(float (&s)[NB][4], const AttnParams& p, int64_t mask_base, int row0,
                                          int col0, bool rows_are_queries) {
  for_each_element(s, row0, col0, rows_are_queries, [&](float& x, int i, int j, int, int) {
    if (i >= p.q_len || j >= p.k_len || (p.causal && j > i)) {
      x = -kInf;
    } else if (p.mask.kind != kMaskNone) {
      x = apply_mask(x, p.mask, mask_base + i * p.mask.s2 + j * p.mask.s3);
    }
  });
}

// A tile product's score in log2 units, rounded on its own (__fmul_rn is never contracted): a product
// the compiler fused into the next subtraction (an FMA, the product unrounded) where a tile takes the
// unmasked path, but not where the per-element mask pass stands between them, would make a score's
// bits depend on which tiles need that pass, and so on the tiling (the one or two strips per warp).
__device__ __forceinline__ float scaled_score(float qk, const AttnParams& p) { return __fmul_rn(qk, p.scale_log2); }

// The scores of a warp's MT strips of 16 rows against a streamed tile (NB * 8 rows at b_base, pitch
// b_pitch bytes): S = A B^T in log2 units (scaled_score), masked (mask_tile) where the tile needs it. The
// strips' rows start at row0: queries, the tile's rows keys from col0 (rows_are_queries), or the reverse
// (dK/dV's transposed scores).
template <typename T, int MT, int NB, int kK, bool kHeld>
__device__ __forceinline__ void strip_scores(float (&s)[MT][NB][4], const StripsA<MT, kK, kHeld>& a, uint32_t b_base,
                                             int b_pitch, const AttnParams& p, bool masked, int64_t mask_base,
                                             int row0, int col0, bool rows_are_queries) {
  strips_product<T, MT, NB, kK>(s, a, b_base, b_pitch);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][nb][e] = scaled_score(s[mt][nb][e], p);
    }
    if (masked) mask_tile(s[mt], p, mask_base, row0 + 16 * mt, col0, rows_are_queries);
  }
}

// The forward's statistics of query i of head bh, in log2 units: (row max, log2 of the row sum). A query
// past the end gives (+inf, 0), so its P = exp2((s - max) - log2 sum) is 0 whatever the (zero-filled) scores.
__device__ __forceinline__ float2 row_stats(const BwdParams& p, int64_t bh, int i) {
  if (i >= p.q_len) return make_float2(kInf, 0.f);
  const float* stats = p.stats + bh * 2 * p.q_len;
  return make_float2(stats[i], stats[static_cast<int64_t>(p.q_len) + i]);
}

// A probability recomputed in the backward, exp2((s - max) - log2(sum)), at most 1: the backward's
// tile products may round a score an ulp above the forward's row max, which at |s| ~ 1e30 would be
// exp2 of ~1e23 (inf, then NaN gradients) where P is 1. A NaN exponent stays NaN.
__device__ __forceinline__ float recomputed_p(float x) { return exp2f(x > 0.f ? 0.f : x); }

// Whether the shared stream keeps element (i, j) of head bh, as 1 or 0: a factor to multiply by, so a NaN
// that dropout drops stays NaN. P takes this 0/1 before its cast to fp16/bf16 and the 1 / (1 - p) of the kept
// elements is applied in float32, to O (and in the backward to the gradients) once: P / (1 - p) would overflow
// fp16 for p > 1 - 1/65504.
__device__ __forceinline__ float kept(const AttnParams& p, uint64_t seed, int64_t bh, int64_t i, int64_t j) {
  const uint64_t counter = static_cast<uint64_t>((bh * p.q_len + i) * p.k_len + j);
  return philox::keep(seed, counter, p.dropout_p) ? 1.f : 0.f;
}

// kept() of the keys j and j + 1 of query i (j even: a thread's two adjacent accumulator columns), with
// one evaluation of the Philox rounds where their stream elements share a counter (philox::keep_run:
// always for an even k_len).
__device__ __forceinline__ float2 kept_pair(const AttnParams& p, uint64_t seed, int64_t bh, int64_t i, int64_t j) {
  bool keep[2];
  philox::keep_run(seed, static_cast<uint64_t>((bh * p.q_len + i) * p.k_len + j), p.dropout_p, keep);
  return make_float2(keep[0] ? 1.f : 0.f, keep[1] ? 1.f : 0.f);
}

// The key tiles [t_lo, t_hi) of kN keys a query block of head bh walks, keys below `n_end` (the causal
// limit or the sequence end): all of them, or those holding a key of the head's span (AttnParams::key_span).
template <int kN>
__device__ __forceinline__ int2 key_tiles(const AttnParams& p, int64_t bh, int n_end) {
  int lo = 0, hi = n_end;
  if (p.key_span != nullptr) {
    const int2 span = p.key_span[bh];
    lo = span.x;
    hi = min(hi, span.y);
  }
  if (lo >= hi) return make_int2(0, 0);
  return make_int2(lo / kN, (hi + kN - 1) / kN);
}

// Whether a tile of rows [m0, m0 + bm) of queries x [n0, n0 + bn) of keys needs the per-element pass.
__device__ __forceinline__ bool tile_needs_mask(const AttnParams& p, int m0, int bm, int n0, int bn) {
  return p.mask.kind != kMaskNone || m0 + bm > p.q_len || n0 + bn > p.k_len || (p.causal && n0 + bn - 1 > m0);
}

// Stores columns c, c + 1 of a row (row_ptr: the row's first element) where c < ncols: one 32-bit
// store when both are inside and aligned, else element by element.
template <typename T>
__device__ __forceinline__ void store_pair(uint16_t* row_ptr, int c, int ncols, float x0, float x1) {
  uint16_t* ptr = row_ptr + c;
  if (c + 1 < ncols && (reinterpret_cast<uintptr_t>(ptr) & 3) == 0) {
    *reinterpret_cast<uint32_t*>(ptr) = Elem<T>::pack(x0, x1);
  } else {
    if (c < ncols) ptr[0] = Elem<T>::from_float(x0);
    if (c + 1 < ncols) ptr[1] = Elem<T>::from_float(x1);
  }
}

// Writes a warp's 16-row accumulator strip, times `factor` and then times `then`, to rows row0..
// (< nrows) of a strided matrix, columns col0.. (< ncols). Two factors one after the other, not
// their product, which overflows where both are finite (dK, dQ: the dropout's 1 / (1 - p), then a
// huge scale) and would turn a zero gradient into 0 x inf = NaN.
template <typename T, int NB>
__device__ __forceinline__ void store_strip(const float (&acc)[NB][4], uint16_t* base, int64_t ld, int row0,
                                            int nrows, int col0, int ncols, float factor, float then = 1.f) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + (lane >> 2) + half * 8;
    if (r >= nrows) continue;
    uint16_t* row_ptr = base + static_cast<int64_t>(r) * ld;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      store_pair<T>(row_ptr, col0 + nb * 8 + (lane & 3) * 2, ncols, acc[nb][2 * half] * factor * then,
                    acc[nb][2 * half + 1] * factor * then);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullWarpMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullWarpMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullWarpMask, x, 1);
  return x + __shfl_xor_sync(kFullWarpMask, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <int kD, int kMT>
constexpr int fwd_smem_bytes() {
  constexpr int kN = stream_rows(kD);
  return 2 * (block_rows(kMT) * (kD + 8) + 2 * kN * (kD + 8) + 2 * kN * (out_cols(kD) + 8));
}

template <typename T, int kD, int kMT>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const FwdParams p) {
  constexpr int kM = block_rows(kMT);
  constexpr int kN = stream_rows(kD);
  constexpr int kOut = out_cols(kD);
  constexpr int kPitch = kD + 8;
  constexpr int kVPitch = kOut + 8;
  extern __shared__ uint4 smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* s_k = s_q + kM * kPitch;
  uint16_t* s_v = s_k + 2 * kN * kPitch;

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  // Causal: the last query tiles see the most keys; launched first.
  const int tile = p.num_tiles - 1 - static_cast<int>(blockIdx.x % p.num_tiles);
  const int64_t bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int col0 = static_cast<int>(blockIdx.y) * kOut;
  const int m0 = tile * kM;

  const uint16_t* qg = p.q + b * p.q_s[0] + h * p.q_s[1];
  const uint16_t* kg = p.k + b * p.k_s[0] + (h / p.kv_group) * p.k_s[1];
  const uint16_t* vg = p.v + b * p.v_s[0] + (h / p.kv_group) * p.v_s[1];
  const int64_t mask_base = b * p.mask.s0 + h * p.mask.s1;

  const int2 tiles = key_tiles<kN>(p, bh, p.causal ? min(p.k_len, m0 + kM) : p.k_len);

  // With no key tile (a padding mask that hides every key) nothing is loaded: the rows are empty.
  if (tiles.x < tiles.y) {
    load_tile<kM, kD, kPitch>(s_q, qg, p.q_s[2], m0, p.q_len, 0, p.d, p.vec);
    load_tile<kN, kD, kPitch>(s_k, kg, p.k_s[2], tiles.x * kN, p.k_len, 0, p.d, p.vec);
    load_tile<kN, kOut, kVPitch>(s_v, vg, p.v_s[2], tiles.x * kN, p.k_len, col0, p.dv, p.vec);
  }
  cp_async_commit();

  // This warp's strips: rows warp_row0 + 16 mt + (lane / 4) + 8 half.
  float o[kMT][kOut / 8][4];
  float row_max[kMT][2], row_sum[kMT][2];  // row_sum: this lane's share; summed over the quad at the end
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    zero(o[mt]);
    row_max[mt][0] = row_max[mt][1] = -kInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const int warp_row0 = m0 + warp * 16 * kMT;
  // Up to head dim 64 the strips' Q fragments stay in registers across the key tiles.
  StripsA<kMT, kD, kD <= 64> qa{smem_addr(s_q + warp * 16 * kMT * kPitch), kPitch * 2};

  for (int t = tiles.x; t < tiles.y; ++t) {
    const int stage = (t - tiles.x) & 1;
    const int n0 = t * kN;
    if (t + 1 < tiles.y) {
      load_tile<kN, kD, kPitch>(s_k + (stage ^ 1) * kN * kPitch, kg, p.k_s[2], n0 + kN, p.k_len, 0, p.d, p.vec);
      load_tile<kN, kOut, kVPitch>(s_v + (stage ^ 1) * kN * kVPitch, vg, p.v_s[2], n0 + kN, p.k_len, col0, p.dv,
                                   p.vec);
    }
    cp_async_commit();
    cp_async_wait_all_but_one();
    __syncthreads();
    if (t == tiles.x) qa.load();  // Q came with the first key tile

    // Causal: a key tile wholly past this warp's last row would only add probabilities of exactly 0
    // (its rows' max and sums stay as they are), so the warp skips its products; the block's other
    // warps, whose rows reach the tile, still need it loaded and the barriers kept.
    if (!p.causal || n0 <= warp_row0 + 16 * kMT - 1) {
      float s[kMT][kN / 8][4];
      strip_scores<T>(s, qa, smem_addr(s_k + stage * kN * kPitch), kPitch * 2, p, tile_needs_mask(p, m0, kM, n0, kN),
                      mask_base, warp_row0, n0, true);
      uint32_t pa[kMT][kN / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        // Online softmax: rescale what was accumulated by exp2(old max - new max).
        float shift[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float mx = row_max[mt][half];
#pragma unroll
          for (int nb = 0; nb < kN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * half], s[mt][nb][2 * half + 1]));
          mx = quad_max(mx);
          // A row with no visible key so far keeps max -inf; shifting by 0 makes exp2 give 0, not NaN.
          shift[half] = mx == -kInf ? 0.f : mx;
          const float alpha = exp2f(row_max[mt][half] - shift[half]);
          row_max[mt][half] = mx;
          row_sum[mt][half] *= alpha;
#pragma unroll
          for (int nb = 0; nb < kOut / 8; ++nb) {
            o[mt][nb][2 * half] *= alpha;
            o[mt][nb][2 * half + 1] *= alpha;
          }
        }
#pragma unroll
        for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nb][e] = exp2f(s[mt][nb][e] - shift[e >> 1]);
            row_sum[mt][e >> 1] += s[mt][nb][e];
          }
        }
        if (p.dropout) {
          const uint64_t seed = p.seed.load();
          for_each_pair(s[mt], warp_row0 + 16 * mt, n0, [&](float& x0, float& x1, int i, int j) {
            const float2 keep = kept_pair(p, seed, bh, i, j);
            x0 *= keep.x;
            x1 *= keep.y;
          });
        }
        to_a_fragments<T>(s[mt], pa[mt]);
      }
      strips_gemm_ab<T, kMT, kOut / 8, kN / 16>(o, pa, smem_addr(s_v + stage * kN * kVPitch), kVPitch * 2);
    }
    __syncthreads();  // the next iteration refills the other buffer of this stage's pair
  }

  uint16_t* out = p.out + (bh / p.heads) * p.o_s[0] + (bh % p.heads) * p.o_s[1];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int strip_row0 = warp_row0 + 16 * mt;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = quad_sum(row_sum[mt][half]);
      const bool empty = l == 0.f;
      const float inv = empty ? 0.f : __fdiv_rn(p.inv_keep, l);
#pragma unroll
      for (int nb = 0; nb < kOut / 8; ++nb) {
        o[mt][nb][2 * half] *= inv;
        o[mt][nb][2 * half + 1] *= inv;
      }
      const int i = strip_row0 + (lane >> 2) + half * 8;
      if (blockIdx.y == 0 && (lane & 3) == 0 && i < p.q_len) {
        float* stats = p.stats + bh * 2 * p.q_len;
        stats[i] = empty ? kInf : row_max[mt][half];
        stats[static_cast<int64_t>(p.q_len) + i] = empty ? 0.f : log2f(l);
      }
    }
    store_strip<T>(o[mt], out, p.o_s[2], strip_row0, p.q_len, col0, p.dv, 1.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// Rows per streamed tile of the backward kernels whose warps own kStrips 16-row strips (keys in the
// statistics and dQ kernels, queries in dK/dV): stream_rows with one strip per warp, half of it with two,
// so that the two strips' score and dP tiles take the registers one strip's took.
template <int kD, int kStrips>
constexpr int strip_stream_rows() { return kStrips == 1 ? stream_rows(kD) : stream_rows(kD) / 2; }

template <int kD, int kNT>
constexpr int bwd_dkdv_smem_bytes() {
  constexpr int kM = strip_stream_rows<kD, kNT>();
  return 2 * (2 * block_rows(kNT) * (kD + 8) + 4 * kM * (kD + 8));
}

// dK, dV of one (batch*head, 64 or 128 keys: kNT strips of 16 keys per warp) block, accumulated over the
// query tiles. Two strips read each Q and dO fragment from shared memory once for both, halving those
// reads per tile product as in the forward; the queries are then streamed 32 at a time. A key's sums take
// their terms (16-query mma steps) in the same order either way, and a warp skips, under causality, only
// query tiles wholly before its first key, whose terms are exact zeros, so the results are the same bits.
template <typename T, int kD, int kNT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(const BwdParams p) {
  constexpr int kN = block_rows(kNT);  // keys per block
  constexpr int kM = strip_stream_rows<kD, kNT>();  // queries per streamed tile
  constexpr int kOut = out_cols(kD);
  constexpr int kPitch = kD + 8;
  extern __shared__ uint4 smem_raw[];
  uint16_t* s_k = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* s_v = s_k + kN * kPitch;
  uint16_t* s_q = s_v + kN * kPitch;   // [2][kM][kPitch]
  uint16_t* s_do = s_q + 2 * kM * kPitch;  // [2][kM][kPitch]

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int tile = static_cast<int>(blockIdx.x % p.num_tiles);
  const int64_t bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int col0 = static_cast<int>(blockIdx.y) * kOut;
  const int n0 = tile * kN;

  const uint16_t* qg = p.q + b * p.q_s[0] + h * p.q_s[1];
  const uint16_t* kg = p.k + b * p.k_s[0] + (h / p.kv_group) * p.k_s[1];
  const uint16_t* vg = p.v + b * p.v_s[0] + (h / p.kv_group) * p.v_s[1];
  const uint16_t* dog = p.dout + b * p.do_s[0] + h * p.do_s[1];
  const int64_t mask_base = b * p.mask.s0 + h * p.mask.s1;
  const float* delta = p.delta + bh * p.q_len;
  const float* corr = p.corr + bh * p.q_len;

  // Causal: queries before the block's first key see none of it. Keys outside the head's span
  // (AttnParams::key_span) are seen by no query.
  const int m_begin = p.causal ? (n0 / kM) * kM : 0;
  bool seen = m_begin < p.q_len;
  if (p.key_span != nullptr) {
    const int2 span = p.key_span[bh];
    seen = seen && n0 < span.y && n0 + kN > span.x;
  }
  const int m_tiles = seen ? (p.q_len - m_begin + kM - 1) / kM : 0;

  // With no query tile (causal, keys past the last query; keys no query sees) nothing is loaded and
  // zeros are stored.
  if (m_tiles > 0) {
    load_tile<kN, kD, kPitch>(s_k, kg, p.k_s[2], n0, p.k_len, 0, p.d, p.vec);
    load_tile<kN, kD, kPitch>(s_v, vg, p.v_s[2], n0, p.k_len, 0, p.dv, p.vec);
    load_tile<kM, kD, kPitch>(s_q, qg, p.q_s[2], m_begin, p.q_len, 0, p.d, p.vec);
    load_tile<kM, kD, kPitch>(s_do, dog, p.do_s[2], m_begin, p.q_len, 0, p.dv, p.vec);
  }
  cp_async_commit();

  // This warp's strips: keys warp_key0 + 16 nt + (lane / 4) + 8 half.
  float dk[kNT][kOut / 8][4], dv[kNT][kOut / 8][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    zero(dk[nt]);
    zero(dv[nt]);
  }
  const int warp_key0 = n0 + warp * 16 * kNT;
  // The strips' K and V fragments stay in registers across the query tiles where they fit beside the dK
  // and dV accumulators: one strip up to head dim 64, two up to 32 (two at 64 spill hundreds of bytes).
  constexpr bool kHeld = kD * kNT <= 64;
  StripsA<kNT, kD, kHeld> ka{smem_addr(s_k + warp * 16 * kNT * kPitch), kPitch * 2};
  StripsA<kNT, kD, kHeld> va{smem_addr(s_v + warp * 16 * kNT * kPitch), kPitch * 2};

  for (int t = 0; t < m_tiles; ++t) {
    const int stage = t & 1;
    const int m0 = m_begin + t * kM;
    if (t + 1 < m_tiles) {
      load_tile<kM, kD, kPitch>(s_q + (stage ^ 1) * kM * kPitch, qg, p.q_s[2], m0 + kM, p.q_len, 0, p.d, p.vec);
      load_tile<kM, kD, kPitch>(s_do + (stage ^ 1) * kM * kPitch, dog, p.do_s[2], m0 + kM, p.q_len, 0, p.dv, p.vec);
    }
    cp_async_commit();
    cp_async_wait_all_but_one();
    __syncthreads();
    const uint16_t* q_tile = s_q + stage * kM * kPitch;
    const uint16_t* do_tile = s_do + stage * kM * kPitch;
    if (t == 0) {  // K and V came with the first query tile
      ka.load();
      va.load();
    }

    // Causal: a query tile wholly before this warp's first key has P = 0 for all the warp's keys, so the
    // warp skips its products; the block's other warps, whose keys it reaches, still need it loaded and
    // the barriers kept.
    if (!p.causal || m0 + kM - 1 >= warp_key0) {
      // P^T = exp2((S^T - max) - log2(sum)) * corr: rows keys, columns queries.
      float pt[kNT][kM / 8][4];
      strip_scores<T>(pt, ka, smem_addr(q_tile), kPitch * 2, p, tile_needs_mask(p, m0, kM, n0, kN), mask_base,
                      warp_key0, m0, false);
      // A column's (query's) statistics, the same for every strip.
      float dlt[kM / 8][2];
#pragma unroll
      for (int nb = 0; nb < kM / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = m0 + nb * 8 + (lane & 3) * 2 + e;
          const float2 st = row_stats(p, bh, i);
          const float c = i < p.q_len ? corr[i] : 0.f;
          dlt[nb][e] = i < p.q_len ? delta[i] : 0.f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            pt[nt][nb][e] = recomputed_p((pt[nt][nb][e] - st.x) - st.y) * c;
            pt[nt][nb][e + 2] = recomputed_p((pt[nt][nb][e + 2] - st.x) - st.y) * c;
          }
        }
      }

      // dP^T = V dO^T.
      float dpt[kNT][kM / 8][4];
      strips_product<T, kNT, kM / 8, kD>(dpt, va, smem_addr(do_tile), kPitch * 2);

      // dS^T = P^T (dP^T - delta), formed in dP^T's registers. With dropout, dP takes the keep-mask first,
      // dS the undropped P, and dV the kept P (1 / (1 - p) applied at the stores).
      uint32_t frag[kNT][kM / 16][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        if (p.dropout) {
          const uint64_t seed = p.seed.load();
          for_each_element(dpt[nt], warp_key0 + 16 * nt, m0, false, [&](float& x, int i, int j, int nb, int e) {
            const float keep = kept(p, seed, bh, i, j);
            x = pt[nt][nb][e] * (x * keep - dlt[nb][e & 1]);
            pt[nt][nb][e] *= keep;
          });
        } else {
#pragma unroll
          for (int nb = 0; nb < kM / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) dpt[nt][nb][e] = pt[nt][nb][e] * (dpt[nt][nb][e] - dlt[nb][e & 1]);
          }
        }
        to_a_fragments<T>(pt[nt], frag[nt]);
      }
      strips_gemm_ab<T, kNT, kOut / 8, kM / 16>(dv, frag, smem_addr(do_tile + col0), kPitch * 2);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) to_a_fragments<T>(dpt[nt], frag[nt]);
      strips_gemm_ab<T, kNT, kOut / 8, kM / 16>(dk, frag, smem_addr(q_tile + col0), kPitch * 2);
    }
    __syncthreads();
  }

#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int strip_key0 = warp_key0 + 16 * nt;
    store_strip<T>(dk[nt], p.dk + b * p.dk_s[0] + h * p.dk_s[1], p.dk_s[2], strip_key0, p.k_len, col0, p.d,
                   p.inv_keep, p.scale);
    store_strip<T>(dv[nt], p.dv_out + b * p.dv_s[0] + h * p.dv_s[1], p.dv_s[2], strip_key0, p.k_len, col0, p.dv,
                   p.inv_keep);
  }
}

template <int kD, int kMT>
constexpr int bwd_dq_smem_bytes() {
  constexpr int kN = strip_stream_rows<kD, kMT>();
  return 2 * (2 * block_rows(kMT) * (kD + 8) + 4 * kN * (kD + 8));
}

// dQ (and grad_scores) of one (batch*head, 64 or 128 queries: kMT strips of 16 rows per warp, as the
// forward's) block, accumulated over the key tiles; with kStats, the row statistics (corr, delta) of the
// block's queries instead (see the header). Two strips halve the shared-memory reads of K and V per tile
// product, as in the forward; the keys are then streamed 32 at a time, and every sum (over a row's keys,
// and dQ's over the key tiles' mma steps) takes its terms in the same order as with one strip, so the
// results are the same bits.
template <typename T, int kD, bool kStats, int kMT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(const BwdParams p) {
  constexpr int kM = block_rows(kMT);
  constexpr int kN = strip_stream_rows<kD, kMT>();
  constexpr int kOut = out_cols(kD);
  constexpr int kPitch = kD + 8;
  extern __shared__ uint4 smem_raw[];
  uint16_t* s_q = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* s_do = s_q + kM * kPitch;
  uint16_t* s_k = s_do + kM * kPitch;      // [2][kN][kPitch]
  uint16_t* s_v = s_k + 2 * kN * kPitch;   // [2][kN][kPitch]

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int tile = p.num_tiles - 1 - static_cast<int>(blockIdx.x % p.num_tiles);
  const int64_t bh = blockIdx.x / p.num_tiles;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int col0 = static_cast<int>(blockIdx.y) * kOut;
  const int m0 = tile * kM;

  const uint16_t* qg = p.q + b * p.q_s[0] + h * p.q_s[1];
  const uint16_t* kg = p.k + b * p.k_s[0] + (h / p.kv_group) * p.k_s[1];
  const uint16_t* vg = p.v + b * p.v_s[0] + (h / p.kv_group) * p.v_s[1];
  const uint16_t* dog = p.dout + b * p.do_s[0] + h * p.do_s[1];
  const int64_t mask_base = b * p.mask.s0 + h * p.mask.s1;
  float* dscores =
      (!kStats && p.dscores != nullptr && blockIdx.y == 0) ? p.dscores + bh * p.q_len * p.k_len : nullptr;

  const int2 tiles = key_tiles<kN>(p, bh, p.causal ? min(p.k_len, m0 + kM) : p.k_len);

  // With no key tile nothing is loaded: dQ is 0, corr and delta 0 (and grad_scores keeps its zeros).
  if (tiles.x < tiles.y) {
    load_tile<kM, kD, kPitch>(s_q, qg, p.q_s[2], m0, p.q_len, 0, p.d, p.vec);
    load_tile<kM, kD, kPitch>(s_do, dog, p.do_s[2], m0, p.q_len, 0, p.dv, p.vec);
    load_tile<kN, kD, kPitch>(s_k, kg, p.k_s[2], tiles.x * kN, p.k_len, 0, p.d, p.vec);
    load_tile<kN, kD, kPitch>(s_v, vg, p.v_s[2], tiles.x * kN, p.k_len, 0, p.dv, p.vec);
  }
  cp_async_commit();

  // This warp's strips: rows warp_row0 + 16 mt + (lane / 4) + 8 half.
  const int warp_row0 = m0 + warp * 16 * kMT;
  float2 st[kMT][2];  // row max, log2 of the row sum
  float dlt[kMT][2], cr[kMT][2];
  float dq[kMT][kOut / 8][4];
  float p_sum[kMT][2], pdp_sum[kMT][2];  // this lane's share (kStats)
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = warp_row0 + 16 * mt + (lane >> 2) + half * 8;
      st[mt][half] = row_stats(p, bh, i);
      dlt[mt][half] = 0.f;
      cr[mt][half] = 1.f;
      if constexpr (!kStats) {
        dlt[mt][half] = i < p.q_len ? p.delta[bh * p.q_len + i] : 0.f;
        cr[mt][half] = i < p.q_len ? p.corr[bh * p.q_len + i] : 0.f;
      }
      p_sum[mt][half] = pdp_sum[mt][half] = 0.f;
    }
    zero(dq[mt]);
  }
  // Up to head dim 64 the strips' Q and dO fragments stay in registers across the key tiles: of each tile
  // only K and V are read from shared memory (with two strips, 24 ldmatrix of 40 per warp in the dQ kernel,
  // 16 of 32 in the statistics kernel).
  StripsA<kMT, kD, kD <= 64> qa{smem_addr(s_q + warp * 16 * kMT * kPitch), kPitch * 2};
  StripsA<kMT, kD, kD <= 64> doa{smem_addr(s_do + warp * 16 * kMT * kPitch), kPitch * 2};

  for (int t = tiles.x; t < tiles.y; ++t) {
    const int stage = (t - tiles.x) & 1;
    const int n0 = t * kN;
    if (t + 1 < tiles.y) {
      load_tile<kN, kD, kPitch>(s_k + (stage ^ 1) * kN * kPitch, kg, p.k_s[2], n0 + kN, p.k_len, 0, p.d, p.vec);
      load_tile<kN, kD, kPitch>(s_v + (stage ^ 1) * kN * kPitch, vg, p.v_s[2], n0 + kN, p.k_len, 0, p.dv, p.vec);
    }
    cp_async_commit();
    cp_async_wait_all_but_one();
    __syncthreads();
    const uint16_t* k_tile = s_k + stage * kN * kPitch;
    const uint16_t* v_tile = s_v + stage * kN * kPitch;
    if (t == tiles.x) {  // Q and dO came with the first key tile
      qa.load();
      doa.load();
    }

    // Causal: a key tile wholly past this warp's last row has P = 0 for all its rows (dS 0, nothing to
    // add to the sums or to dQ; grad_scores keeps its zeros there), so the warp skips it, as the forward.
    if (!p.causal || n0 <= warp_row0 + 16 * kMT - 1) {
      float ps[kMT][kN / 8][4];
      strip_scores<T>(ps, qa, smem_addr(k_tile), kPitch * 2, p, tile_needs_mask(p, m0, kM, n0, kN), mask_base,
                      warp_row0, n0, true);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            ps[mt][nb][e] =
                recomputed_p((ps[mt][nb][e] - st[mt][e >> 1].x) - st[mt][e >> 1].y) * cr[mt][e >> 1];
          }
        }
      }

      float dp[kMT][kN / 8][4];
      strips_product<T, kMT, kN / 8, kD>(dp, doa, smem_addr(v_tile), kPitch * 2);
      uint32_t frag[kMT][kN / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int strip_row0 = warp_row0 + 16 * mt;
        if (p.dropout) {
          const uint64_t seed = p.seed.load();
          for_each_pair(dp[mt], strip_row0, n0, [&](float& x0, float& x1, int i, int j) {
            const float2 keep = kept_pair(p, seed, bh, i, j);
            x0 *= keep.x;
            x1 *= keep.y;
          });
        }
        if constexpr (kStats) {
#pragma unroll
          for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              p_sum[mt][e >> 1] += ps[mt][nb][e];
              pdp_sum[mt][e >> 1] += ps[mt][nb][e] * dp[mt][nb][e];
            }
          }
        } else {
          // dS = P (dP - delta), in place of P.
#pragma unroll
          for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) ps[mt][nb][e] *= dp[mt][nb][e] - dlt[mt][e >> 1];
          }
          if (dscores != nullptr) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int i = strip_row0 + (lane >> 2) + half * 8;
              if (i >= p.q_len) continue;
              float* row = dscores + static_cast<int64_t>(i) * p.k_len;
#pragma unroll
              for (int nb = 0; nb < kN / 8; ++nb) {
                const int j = n0 + nb * 8 + (lane & 3) * 2;
                float* ptr = row + j;
                const float x0 = ps[mt][nb][2 * half] * p.inv_keep, x1 = ps[mt][nb][2 * half + 1] * p.inv_keep;
                if (j + 1 < p.k_len && (reinterpret_cast<uintptr_t>(ptr) & 7) == 0) {
                  *reinterpret_cast<float2*>(ptr) = make_float2(x0, x1);
                } else {
                  if (j < p.k_len) ptr[0] = x0;
                  if (j + 1 < p.k_len) ptr[1] = x1;
                }
              }
            }
          }
          to_a_fragments<T>(ps[mt], frag[mt]);
        }
      }
      if constexpr (!kStats) {
        strips_gemm_ab<T, kMT, kOut / 8, kN / 16>(dq, frag, smem_addr(k_tile + col0), kPitch * 2);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    const int strip_row0 = warp_row0 + 16 * mt;
    if constexpr (kStats) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float l = quad_sum(p_sum[mt][half]);
        const float pdp = quad_sum(pdp_sum[mt][half]);
        const int i = strip_row0 + (lane >> 2) + half * 8;
        if ((lane & 3) == 0 && i < p.q_len) {
          // Correctly rounded: under --use_fast_math a / is approximate (2 ulp), and dS = P corr (dP - delta)
          // cancels at the scale of delta, which would pass such errors into dQ and dK.
          p.corr[bh * p.q_len + i] = l > 0.f ? __fdiv_rn(1.f, l) : 0.f;
          p.delta[bh * p.q_len + i] = l > 0.f ? __fdiv_rn(pdp, l) : 0.f;
        }
      }
    } else {
      store_strip<T>(dq[mt], p.dq + b * p.dq_s[0] + h * p.dq_s[1], p.dq_s[2], strip_row0, p.q_len, col0, p.d,
                     p.inv_keep, p.scale);
    }
  }
}

// The key span of head bh of a bool mask that is the same for every query of a head (its mask row
// through the strides): (first key seen, one past the last; (k_len, 0) if none), one block per head.
__global__ void __launch_bounds__(kThreads) key_span_kernel(const AttnParams p, int2* spans) {
  __shared__ int s_first[kWarps], s_last[kWarps];
  const int64_t bh = blockIdx.x;
  const uint8_t* row =
      static_cast<const uint8_t*>(p.mask.data) + (bh / p.heads) * p.mask.s0 + (bh % p.heads) * p.mask.s1;
  int first = p.k_len, last = 0;
#pragma unroll 4
  for (int j = static_cast<int>(threadIdx.x); j < p.k_len; j += kThreads) {
    if (row[j * p.mask.s3] != 0) {
      first = min(first, j);
      last = j + 1;  // increasing along this thread's keys
    }
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    first = min(first, __shfl_xor_sync(kFullWarpMask, first, offset));
    last = max(last, __shfl_xor_sync(kFullWarpMask, last, offset));
  }
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
    s_first[warp] = first;
    s_last[warp] = last;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      first = min(first, s_first[w]);
      last = max(last, s_last[w]);
    }
    spans[bh] = make_int2(first, last);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention launchers

// Padded head dims with instantiated kernels; a head dim runs in the smallest that holds it.
constexpr int kHeadDims[] = {32, 64, 96, 128, 256};
constexpr int kMaxHeadDim = 256;
// The longest sequence or softmax row the kernels take: 2^31 less 1024, so that int tile counts
// ((len + tile - 1) / tile) and loop counters cannot wrap (fused_attn.backends.MAX_EXTENT, the
// policy's bound, is lower: it also covers the Triton kernels' longer loop steps).
constexpr int64_t kMaxExtent = (int64_t{1} << 31) - 1024;

int padded_head_dim(int64_t head_dim) {
  for (int d : kHeadDims) {
    if (head_dim <= d) return d;
  }
  return 0;
}

template <typename F>
void dispatch_head_dim(int padded, const F& f) {
  switch (padded) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 96: f(std::integral_constant<int, 96>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: TORCH_CHECK(false, "internal error: no attention kernel for padded head dim ", padded);
  }
}

// Raises the kernel's dynamic shared memory limit to `bytes` (a kernel's own constant), after checking
// that the device has it: once per kernel and device, since the attribute stays set and the driver call
// would otherwise cost every launch host time (see the README's "Host time per call").
template <typename Kernel>
void prepare_smem(Kernel kernel, int bytes, int head_dim) {
  static std::mutex lock;
  static std::set<std::pair<const void*, int>> prepared;
  const int device = c10::cuda::current_device();
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  const std::lock_guard<std::mutex> guard(lock);
  if (prepared.count(key) != 0) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(bytes) <= prop->sharedMemPerBlockOptin, "attention (cuda backend) at head dim ",
              head_dim, " needs ", bytes, " bytes of shared memory per block, but ", prop->name, " offers ",
              prop->sharedMemPerBlockOptin, "; use backend='triton' for this head dim on this GPU");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  prepared.insert(key);
}

void check_device_capability(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.device().index());
  TORCH_CHECK(prop->major >= 8, "attention (cuda backend) needs compute capability 8.0 or newer (tensor-core "
              "mma.sync and cp.async), got ", prop->major, ".", prop->minor, " on ", prop->name,
              "; use backend='triton'");
}

void check_qkv(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{query, "query"}, {key, "key"}, {value, "value"}}) {
    TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, heads, seq, head_dim], got ", t.dim(), " dimensions");
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
    TORCH_CHECK(t.device() == query.device(), name, " must be on ", query.device(), " like query, got ", t.device());
    TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have dtype ", query.scalar_type(),
                " like query, got ", t.scalar_type());
    TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride along head_dim, got strides ",
                t.strides());
  }
  TORCH_CHECK(query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16,
              "attention (cuda backend) takes float16 or bfloat16 inputs (tensor cores), got ", query.scalar_type(),
              "; use backend='triton' or 'auto' for float32");
  check_kv_heads(query, key, value);  // grouped-query: fewer key/value heads allowed
  TORCH_CHECK(key.size(3) == query.size(3), "key head_dim ", key.size(3), " must equal query head_dim ", query.size(3));
  TORCH_CHECK(value.size(2) == key.size(2), "value length ", value.size(2), " must equal key length ", key.size(2));
  TORCH_CHECK(query.size(3) <= kMaxHeadDim && value.size(3) <= kMaxHeadDim,
              "attention (cuda backend) serves head dims up to ", kMaxHeadDim, ", got head_dim ", query.size(3),
              " and value head_dim ", value.size(3), "; use backend='triton' or 'reference'");
  // Tile counts and loop counters are int: a length within a tile of 2^31 would wrap them
  // (the Python side's bound, fused_attn.backends.MAX_EXTENT, is lower: see kMaxExtent).
  TORCH_CHECK(query.size(2) <= kMaxExtent && key.size(2) <= kMaxExtent && query.size(1) <= kMaxExtent,
              "attention (cuda backend) takes sequence lengths and heads up to ", kMaxExtent, ", got q_len ",
              query.size(2), ", k_len ", key.size(2), ", heads ", query.size(1));
}

MaskArgs make_mask(const std::optional<at::Tensor>& attn_mask, const at::Tensor& query, int64_t k_len) {
  MaskArgs m;
  if (!attn_mask.has_value() || !attn_mask->defined()) return m;
  const at::Tensor& t = *attn_mask;
  TORCH_CHECK(t.device() == query.device(), "attn_mask must be on ", query.device(), " like query, got ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == query.size(0) && t.size(1) == query.size(1) &&
                  t.size(2) == query.size(2) && t.size(3) == k_len,
              "attn_mask must be expanded to [batch, heads, q_len, k_len] = [", query.size(0), ", ", query.size(1),
              ", ", query.size(2), ", ", k_len, "], got ", t.sizes());
  switch (t.scalar_type()) {
    case at::kBool: m.kind = kMaskBool; break;
    case at::kFloat: m.kind = kMaskFloat; break;
    case at::kHalf: m.kind = kMaskHalf; break;
    case at::kBFloat16: m.kind = kMaskBFloat16; break;
    case at::kDouble: m.kind = kMaskDouble; break;
    default: TORCH_CHECK(false, "attn_mask must be bool or floating (float16/bfloat16/float32/float64), got ",
                         t.scalar_type());
  }
  m.data = t.const_data_ptr();
  m.s0 = t.stride(0);
  m.s1 = t.stride(1);
  m.s2 = t.stride(2);
  m.s3 = t.stride(3);
  return m;
}

// A 16-bit tensor's rows are 16-byte aligned for cp.async: aligned base, batch/head/row strides and
// row length multiples of 8 elements.
bool rows_aligned(const at::Tensor& t, int64_t cols) {
  return cuda_utils::is_aligned(t.const_data_ptr(), 16) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
         t.stride(2) % 8 == 0 && cols % 8 == 0;
}

void fill_strides(const at::Tensor& t, int64_t (&s)[3]) {
  for (int i = 0; i < 3; ++i) s[i] = t.stride(i);
}

AttnParams make_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const std::optional<at::Tensor>& attn_mask, double scale, bool is_causal, double dropout_p,
                       const std::optional<at::Tensor>& seed) {
  check_qkv(query, key, value);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_dropout_p(dropout_p);
  AttnParams p{};
  p.q = static_cast<const uint16_t*>(query.const_data_ptr());
  p.k = static_cast<const uint16_t*>(key.const_data_ptr());
  p.v = static_cast<const uint16_t*>(value.const_data_ptr());
  fill_strides(query, p.q_s);
  fill_strides(key, p.k_s);
  fill_strides(value, p.v_s);
  p.mask = make_mask(attn_mask, query, key.size(2));
  p.heads = static_cast<int>(query.size(1));
  p.kv_group = key.size(1) > 0 ? std::max(1, static_cast<int>(query.size(1) / key.size(1))) : 1;
  p.q_len = static_cast<int>(query.size(2));
  p.k_len = static_cast<int>(key.size(2));
  p.d = static_cast<int>(query.size(3));
  p.dv = static_cast<int>(value.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = scale_log2(scale);
  p.causal = is_causal;
  p.vec = rows_aligned(query, p.d) && rows_aligned(key, p.d) && rows_aligned(value, p.dv);
  p.dropout = dropout_p > 0.0;
  p.dropout_p = static_cast<float>(dropout_p);
  p.inv_keep = p.dropout ? philox::keep_scale(p.dropout_p) : 1.f;
  if (p.dropout) p.seed = cuda_utils::kernel_seed(seed, query, "fused_attn::attention");
  return p;
}

// Blocks of a 1-D grid over (batch*head, tile); checked against the grid limit.
unsigned int grid_blocks(int64_t bh, int64_t tiles) {
  const int64_t blocks = bh * tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "attention (cuda backend): batch * heads * tiles = ",
              blocks, " exceeds the 2^31 - 1 grid limit; split the batch");
  return static_cast<unsigned int>(blocks);
}

// A bool mask that is the same for every query of a head (a key padding mask: zero query stride, or a
// single query) gets its key spans (AttnParams::key_span), so that every kernel walks only the key tiles
// holding a key the mask lets be seen, as the cpu and triton kernels do: a padded tail (or head) costs
// nothing, like the tiles above the causal diagonal, where the whole mask would have every tile visited
// and masked element by element. Returns the spans' buffer (kept alive by the caller), or an undefined
// tensor when the mask is another kind.
at::Tensor key_spans(AttnParams& p, int64_t bh, const at::Tensor& query, cudaStream_t stream) {
  if (p.mask.kind != kMaskBool || (p.mask.s2 != 0 && p.q_len != 1)) return {};
  at::Tensor spans = at::empty({bh, 2}, query.options().dtype(at::kInt));
  int2* out = reinterpret_cast<int2*>(spans.mutable_data_ptr<int>());
  key_span_kernel<<<grid_blocks(bh, 1), kThreads, 0, stream>>>(p, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  p.key_span = out;
  return spans;
}

// Two 16-row strips per warp (128 rows per block) up to this padded head dim in the forward, and up to
// kMaxTwoStripBwdHeadDim in the backward's kernels; above them the output accumulators (up to 128
// columns, two of them in dK/dV) twice over would not fit the registers beside the score tiles.
constexpr int kMaxTwoStripHeadDim = 128;
constexpr int kMaxTwoStripBwdHeadDim = 64;

// The 16-row strips per warp, 1 or 2, of a kernel whose blocks own rows of a sequence `len` long (queries
// in the forward, the statistics and dQ kernels; keys in dK/dV). Two halve the shared-memory reads of the
// streamed tiles per tile product: with one, a warp reads the whole streamed tiles for each 16 rows, 2.25x
// the bytes per product of FlashAttention-2's 32 rows per warp, and at long sequences the forward ran at
// 0.70-0.76x its speed on an H200, as shared memory's bandwidth (128 bytes per clock per multiprocessor)
// predicts for that traffic against the tensor cores' rate. One strip where the rows are few (a block of
// 128 rows would mostly compute padding, as in decoding) or 128-row blocks would leave multiprocessors
// idle. FUSED_ATTN_CUDA_BLOCK_ROWS=64 or 128 pins the choice (128 only up to those head dims), e.g. to
// time both; the results are the same bits either way (the same products per row, in the same order).
int block_strips(int padded, int64_t bh, int len) {
  static const int pinned = [] {
    const char* env = std::getenv("FUSED_ATTN_CUDA_BLOCK_ROWS");
    if (env == nullptr || *env == '\0') return 0;
    const std::string value(env);
    TORCH_CHECK(value == "64" || value == "128", "FUSED_ATTN_CUDA_BLOCK_ROWS must be 64 or 128, got '", value, "'");
    return value == "64" ? 1 : 2;
  }();
  if (padded > kMaxTwoStripHeadDim) return 1;
  if (pinned != 0) return pinned;
  if (len <= block_rows(1)) return 1;
  const int64_t blocks = bh * ((len + block_rows(2) - 1) / block_rows(2));
  return blocks >= at::cuda::getCurrentDeviceProperties()->multiProcessorCount ? 2 : 1;
}

// launch(std::integral_constant<int, kMT>) with kMT = `strips` (1 or 2); a kernel of two strips is
// instantiated only for padded head dims up to kMaxD. The callers size their grids from `strips`,
// so two strips asked of a wider head dim are an error, never a one-strip launch on that grid.
template <int kD, int kMaxD, typename F>
void dispatch_strips(int strips, const F& launch) {
  if constexpr (kD <= kMaxD) {
    if (strips == 2) {
      launch(std::integral_constant<int, 2>{});
      return;
    }
  }
  TORCH_CHECK(strips == 1, "fused_attn: internal error: ", strips, " query strips per warp asked of padded head dim ",
              kD, " (at most ", kMaxD, " takes two)");
  launch(std::integral_constant<int, 1>{});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& query, const at::Tensor& key,
                                                      const at::Tensor& value,
                                                      const std::optional<at::Tensor>& attn_mask, double scale,
                                                      bool is_causal, double dropout_p,
                                                      const std::optional<at::Tensor>& seed) {
  FwdParams p{};
  static_cast<AttnParams&>(p) = make_params(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch = query.size(0), bh = batch * p.heads;
  at::Tensor out = empty_in_query_layout(query, p.dv);
  // The row statistics (see the header): [B, H, 2, Lq], the op's second output.
  at::Tensor stats = at::empty({batch, p.heads, 2, p.q_len}, query.options().dtype(at::kFloat));
  if (bh == 0 || p.q_len == 0) return {out, stats};
  if (p.k_len == 0) {
    // No key at all: every row is fully masked.
    out.zero_();
    stats.select(2, 0).fill_(std::numeric_limits<float>::infinity());
    stats.select(2, 1).zero_();
    return {out, stats};
  }
  check_device_capability(query);
  p.out = static_cast<uint16_t*>(out.mutable_data_ptr());
  fill_strides(out, p.o_s);
  p.stats = stats.mutable_data_ptr<float>();
  const int padded = padded_head_dim(std::max(p.d, p.dv));
  const int strips = block_strips(padded, bh, p.q_len);
  p.num_tiles = (p.q_len + block_rows(strips) - 1) / block_rows(strips);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor spans = key_spans(p, bh, query, stream);
  AT_DISPATCH_V2(query.scalar_type(), "attention_fwd_cuda", AT_WRAP([&] {
    dispatch_head_dim(padded, [&](auto head_dim) {
      constexpr int kD = decltype(head_dim)::value;
      const auto launch = [&](auto mt) {
        constexpr int kMT = decltype(mt)::value;
        constexpr int kSmem = fwd_smem_bytes<kD, kMT>();
        const auto kernel = attn_fwd_kernel<scalar_t, kD, kMT>;
        prepare_smem(kernel, kSmem, kD);
        // Output column halves (head dim 256): only as many as the value head dim fills; a half past
        // it would recompute the scores and store nothing.
        const int halves = std::max(1, (p.dv + out_cols(kD) - 1) / out_cols(kD));
        const dim3 grid(grid_blocks(bh, p.num_tiles), halves);
        kernel<<<grid, kThreads, kSmem, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dispatch_strips<kD, kMaxTwoStripHeadDim>(strips, launch);
    });
  }), at::kHalf, at::kBFloat16);
  return {out, stats};
}

void check_like_output(const at::Tensor& t, const char* name, const at::Tensor& query, int64_t dv) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == query.size(0) && t.size(1) == query.size(1) &&
                  t.size(2) == query.size(2) && t.size(3) == dv,
              name, " must have shape [", query.size(0), ", ", query.size(1), ", ", query.size(2), ", ", dv,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == query.scalar_type(), name, " must have dtype ", query.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), name, " must be on ", query.device(), ", got ", t.device());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have a unit stride along its last dim, got strides ",
              t.strides());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& lse, double scale, bool is_causal,
    double dropout_p, const std::optional<at::Tensor>& seed, bool mask_needs_grad) {
  BwdParams p{};
  static_cast<AttnParams&>(p) = make_params(query, key, value, attn_mask, scale, is_causal, dropout_p, seed);
  check_like_output(grad_out, "grad_out", query, p.dv);
  // lse: this backend's forward writes row statistics [B, H, 2, Lq] there (see the header).
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == query.size(0) && lse.size(1) == p.heads && lse.size(2) == 2 &&
                  lse.size(3) == p.q_len,
              "lse must have shape [", query.size(0), ", ", p.heads, ", 2, ", p.q_len,
              "] (the cuda forward's row statistics), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.is_contiguous() && lse.device() == query.device(), "lse must be a contiguous tensor on ",
              query.device());
  TORCH_CHECK(!mask_needs_grad || (attn_mask.has_value() && attn_mask->defined()),
              "mask_needs_grad is true but attn_mask is None");

  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t batch = query.size(0), bh = batch * p.heads;
  // Gradients take the layout of their inputs (what the registered fake kernel, empty_like, promises).
  at::Tensor dq = at::empty_like(query);
  at::Tensor dk = at::empty_like(key);
  at::Tensor dv = at::empty_like(value);
  at::Tensor dscores = mask_needs_grad
                           ? at::zeros({batch, p.heads, p.q_len, p.k_len}, query.options().dtype(at::kFloat))
                           : at::empty({0}, query.options());
  if (bh == 0) return {dq, dk.zero_(), dv.zero_(), dscores};  // grouped: key/value may have heads
  if (p.q_len == 0 || p.k_len == 0) {
    // Sums over no queries (dK, dV) or no keys (dQ).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dscores};
  }
  check_device_capability(query);
  for (const at::Tensor* t : {&dq, &dk, &dv}) {
    TORCH_CHECK(t->size(-1) <= 1 || t->stride(-1) == 1, "internal error: a gradient buffer has strides ",
                t->strides());
  }
  p.dout = static_cast<const uint16_t*>(grad_out.const_data_ptr());
  fill_strides(grad_out, p.do_s);
  p.vec = p.vec && rows_aligned(grad_out, p.dv);
  p.stats = lse.const_data_ptr<float>();
  at::Tensor row_terms = at::empty({2, bh * p.q_len}, query.options().dtype(at::kFloat));
  p.corr = row_terms.mutable_data_ptr<float>();
  p.delta = p.corr + bh * p.q_len;
  // Grouped-query attention: the dK/dV kernel's blocks own a key tile of a query head (reading its
  // key/value head in place) and store into [B, H, Lk, D] buffers in the storage dtype, summed over
  // each group below by at::sum (accumulating in float32, so each query head's share is rounded
  // once by its store and the sum once more), as FlashAttention-2 does; without grouping, dK and dV.
  const bool grouped = p.kv_group > 1;
  const at::Tensor dk_heads = grouped ? at::empty({batch, p.heads, p.k_len, p.d}, key.options()) : dk;
  const at::Tensor dv_heads = grouped ? at::empty({batch, p.heads, p.k_len, p.dv}, value.options()) : dv;
  p.dq = static_cast<uint16_t*>(dq.mutable_data_ptr());
  p.dk = static_cast<uint16_t*>(dk_heads.mutable_data_ptr());
  p.dv_out = static_cast<uint16_t*>(dv_heads.mutable_data_ptr());
  fill_strides(dq, p.dq_s);
  fill_strides(dk_heads, p.dk_s);
  fill_strides(dv_heads, p.dv_s);
  p.dscores = mask_needs_grad ? dscores.mutable_data_ptr<float>() : nullptr;

  const int padded = padded_head_dim(std::max(p.d, p.dv));
  // The rows per block of the statistics and dQ kernels (queries) and of dK/dV (keys): as the forward's
  // (block_strips), up to kMaxTwoStripBwdHeadDim.
  const bool two_strips = padded <= kMaxTwoStripBwdHeadDim;
  const int dq_strips = two_strips ? block_strips(padded, bh, p.q_len) : 1;
  const int dkdv_strips = two_strips ? block_strips(padded, bh, p.k_len) : 1;
  const int q_tiles = (p.q_len + block_rows(dq_strips) - 1) / block_rows(dq_strips);
  const int k_tiles = (p.k_len + block_rows(dkdv_strips) - 1) / block_rows(dkdv_strips);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor spans = key_spans(p, bh, query, stream);
  AT_DISPATCH_V2(query.scalar_type(), "attention_bwd_cuda", AT_WRAP([&] {
    dispatch_head_dim(padded, [&](auto head_dim) {
      constexpr int kD = decltype(head_dim)::value;
      const unsigned int chunks = kD / out_cols(kD);
      BwdParams pq = p;
      pq.num_tiles = q_tiles;
      // The statistics kernel (kStats) or the dQ kernel, with dq_strips strips per warp.
      const auto launch_dq = [&](auto stats, unsigned int column_chunks) {
        constexpr bool kStats = decltype(stats)::value;
        const auto launch = [&](auto mt) {
          constexpr int kMT = decltype(mt)::value;
          constexpr int kSmem = bwd_dq_smem_bytes<kD, kMT>();
          const auto kernel = attn_bwd_dq_kernel<scalar_t, kD, kStats, kMT>;
          prepare_smem(kernel, kSmem, kD);
          kernel<<<dim3(grid_blocks(bh, q_tiles), column_chunks), kThreads, kSmem, stream>>>(pq);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        dispatch_strips<kD, kMaxTwoStripBwdHeadDim>(dq_strips, launch);
      };
      launch_dq(std::true_type{}, 1);
      {
        BwdParams pk = p;
        pk.num_tiles = k_tiles;
        const auto launch = [&](auto nt) {
          constexpr int kNT = decltype(nt)::value;
          constexpr int kSmem = bwd_dkdv_smem_bytes<kD, kNT>();
          const auto kernel = attn_bwd_dkdv_kernel<scalar_t, kD, kNT>;
          prepare_smem(kernel, kSmem, kD);
          kernel<<<dim3(grid_blocks(bh, k_tiles), chunks), kThreads, kSmem, stream>>>(pk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        dispatch_strips<kD, kMaxTwoStripBwdHeadDim>(dkdv_strips, launch);
      }
      // dQ has the query head dim's columns: a half past them (head dim 256 padded for the value's
      // alone) would recompute the scores and store nothing, grad_scores being the first half's.
      launch_dq(std::false_type{}, static_cast<unsigned int>(std::max(1, (p.d + out_cols(kD) - 1) / out_cols(kD))));
    });
  }), at::kHalf, at::kBFloat16);
  if (grouped) {
    const int64_t kv_heads = key.size(1);
    dk.copy_(dk_heads.unflatten(1, {kv_heads, p.kv_group}).sum(2));
    dv.copy_(dv_heads.unflatten(1, {kv_heads, p.kv_group}).sum(2));
  }
  return {dq, dk, dv, dscores};
}

// ---------------------------------------------------------------------------------------------
// Softmax

// Rows of up to kWarpMaxCols elements take a warp each (4 per block); longer rows a block of
// kBlockRowThreads threads. Elements per thread kept in registers: kSmallCols / kWarpSize for rows of up
// to kSmallCols, kWarpMaxCols / kWarpSize for the other warp rows, kBlockCache for a block's.
constexpr int kWarpMaxCols = 1024;
constexpr int kSmallCols = 128;
constexpr int kBlockRowThreads = 512;
constexpr int kBlockCache = 8;

struct SoftmaxFwdParams {
  const void* x;
  int64_t x_s[4];
  MaskArgs mask;
  int64_t rows, dim_b, dim_m;
  int n;
  float scale;  // natural units (see softmax_score)
  bool causal;
  void* y;
};

// Reduction over the kGroup threads that share a row: a warp by shuffles, a whole block (one row
// per block) through `red` (kGroup / 32 floats). Every thread of the group gets the result.
template <int kGroup, bool kMax>
__device__ __forceinline__ float group_reduce(float v, float* red) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullWarpMask, v, offset);
    v = kMax ? fmaxf(v, other) : v + other;
  }
  if constexpr (kGroup > kWarpSize) {
    constexpr int kGroupWarps = kGroup / kWarpSize;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < kGroupWarps ? red[lane] : (kMax ? -kInf : 0.f);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullWarpMask, v, offset);
      v = kMax ? fmaxf(v, other) : v + other;
    }
    __syncthreads();  // `red` is reused by the next reduction
  }
  return v;
}

// Masked, scaled score x * scale + mask of element j of a row, in natural units as the cpu kernel and
// the reference form it: log2 units before the row max is subtracted would round every score at its
// own magnitude (1e-3 absolute at |score| ~ 1e4: softmax(x + 1e4) 2000x less accurate than torch's).
// The callers take exp2((s - max) * log2(e)).
template <typename T>
__device__ __forceinline__ float softmax_score(const SoftmaxFwdParams& p, const T* xr, int64_t mask_row, int64_t i,
                                               int j) {
  if (p.causal && j > i) return -kInf;
  const float s = load_float(xr, j * p.x_s[3]) * p.scale;
  const int64_t offset = mask_row + j * p.mask.s3;
  if (p.mask.kind == kMaskBool) return apply_mask(s, p.mask, offset);  // s or -inf, in any units
  return p.mask.kind == kMaskNone ? s : s + float_bias(p.mask, offset);
}

template <typename T, int kGroup, int kCache>
__global__ void __launch_bounds__(kGroup == kWarpSize ? 128 : kGroup) softmax_fwd_kernel(const SoftmaxFwdParams p) {
  constexpr int kBlock = kGroup == kWarpSize ? 128 : kGroup;
  constexpr int kRowsPerBlk = kBlock / kGroup;
  __shared__ float red[kGroup / kWarpSize];
  const int sub = static_cast<int>(threadIdx.x) % kGroup;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlk + threadIdx.x / kGroup; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlk) {
    const int64_t i = row % p.dim_m, ab = row / p.dim_m;
    const int64_t a = ab / p.dim_b, bb = ab % p.dim_b;
    const T* xr = x + a * p.x_s[0] + bb * p.x_s[1] + i * p.x_s[2];
    const int64_t mask_row = a * p.mask.s0 + bb * p.mask.s1 + i * p.mask.s2;
    float cache[kCache > 0 ? kCache : 1];
    float mx = -kInf;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int j = sub + c * kGroup;
        cache[c] = j < p.n ? softmax_score(p, xr, mask_row, i, j) : -kInf;
        mx = fmaxf(mx, cache[c]);
      }
    } else {
      for (int j = sub; j < p.n; j += kGroup) mx = fmaxf(mx, softmax_score(p, xr, mask_row, i, j));
    }
    mx = group_reduce<kGroup, true>(mx, red);
    // A fully masked row: shift by 0 so that every exp2 is exactly 0 and the row comes out 0.
    const float shift = mx == -kInf ? 0.f : mx;
    float sum = 0.f;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        cache[c] = exp2f((cache[c] - shift) * kLog2e);
        sum += cache[c];
      }
    } else {
      for (int j = sub; j < p.n; j += kGroup) sum += exp2f((softmax_score(p, xr, mask_row, i, j) - shift) * kLog2e);
    }
    const float total = group_reduce<kGroup, false>(sum, red);
    const float denom = total == 0.f ? 1.f : total;
    T* yr = y + row * p.n;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int j = sub + c * kGroup;
        if (j < p.n) store_float(yr, j, __fdiv_rn(cache[c], denom));
      }
    } else {
      for (int j = sub; j < p.n; j += kGroup) {
        store_float(yr, j, __fdiv_rn(exp2f((softmax_score(p, xr, mask_row, i, j) - shift) * kLog2e), denom));
      }
    }
  }
}

struct SoftmaxBwdParams {
  const void* dy;
  const void* y;
  void* dx;
  float* dscores;  // null unless requested (float32 whatever T: the scores' gradient, as the attention's)
  int64_t rows;
  int n;
  float scale;
};

template <typename T, int kGroup, int kCache>
__global__ void __launch_bounds__(kGroup == kWarpSize ? 128 : kGroup) softmax_bwd_kernel(const SoftmaxBwdParams p) {
  constexpr int kBlock = kGroup == kWarpSize ? 128 : kGroup;
  constexpr int kRowsPerBlk = kBlock / kGroup;
  __shared__ float red[kGroup / kWarpSize];
  const int sub = static_cast<int>(threadIdx.x) % kGroup;
  const T* dy = static_cast<const T*>(p.dy);
  const T* y = static_cast<const T*>(p.y);
  T* dx = static_cast<T*>(p.dx);
  float* dscores = p.dscores;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlk + threadIdx.x / kGroup; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlk) {
    const int64_t base = row * p.n;
    float cy[kCache > 0 ? kCache : 1], cdy[kCache > 0 ? kCache : 1];
    float dot = 0.f, total = 0.f;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int j = sub + c * kGroup;
        cy[c] = j < p.n ? load_float(y, base + j) : 0.f;
        cdy[c] = j < p.n ? load_float(dy, base + j) : 0.f;
        dot += cy[c] * cdy[c];
        total += cy[c];
      }
    } else {
      for (int j = sub; j < p.n; j += kGroup) {
        const float yv = load_float(y, base + j);
        dot += yv * load_float(dy, base + j);
        total += yv;
      }
    }
    dot = group_reduce<kGroup, false>(dot, red);
    total = group_reduce<kGroup, false>(total, red);
    // The row term over the probabilities' own sum (0 for a row without weight): where a row puts
    // nearly all its weight on one element, dy - sum(y dy) would cancel the stored probabilities'
    // rounding into it at dy's scale (their sum misses 1 by it), which the division removes
    // (softmax_row_term in csrc/cpu/attention.cpp says more).
    dot = total > 0.f ? __fdiv_rn(dot, total) : 0.f;
    auto emit = [&](int j, float yv, float dyv) {
      const float g = yv * (dyv - dot);
      store_float(dx, base + j, g * p.scale);
      if (dscores != nullptr) dscores[base + j] = g;
    };
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int j = sub + c * kGroup;
        if (j < p.n) emit(j, cy[c], cdy[c]);
      }
    } else {
      for (int j = sub; j < p.n; j += kGroup) emit(j, load_float(y, base + j), load_float(dy, base + j));
    }
  }
}

// Runs kernel<T, group, cache> for a row length n: the variant whose register cache holds the row,
// else the streaming block-per-row one.
template <template <typename, int, int> class Launch, typename T, typename Params>
void launch_softmax(const Params& p, int64_t rows, int n, cudaStream_t stream) {
  auto blocks = [&](int rows_per_block) {
    return static_cast<unsigned int>(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1 << 20));
  };
  if (n <= kSmallCols) {
    Launch<T, kWarpSize, kSmallCols / kWarpSize>::run(p, blocks(128 / kWarpSize), 128, stream);
  } else if (n <= kWarpMaxCols) {
    Launch<T, kWarpSize, kWarpMaxCols / kWarpSize>::run(p, blocks(128 / kWarpSize), 128, stream);
  } else if (n <= kBlockRowThreads * kBlockCache) {
    Launch<T, kBlockRowThreads, kBlockCache>::run(p, blocks(1), kBlockRowThreads, stream);
  } else {
    Launch<T, kBlockRowThreads, 0>::run(p, blocks(1), kBlockRowThreads, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kGroup, int kCache>
struct SoftmaxFwdLaunch {
  static void run(const SoftmaxFwdParams& p, unsigned int blocks, int threads, cudaStream_t stream) {
    softmax_fwd_kernel<T, kGroup, kCache><<<blocks, threads, 0, stream>>>(p);
  }
};

template <typename T, int kGroup, int kCache>
struct SoftmaxBwdLaunch {
  static void run(const SoftmaxBwdParams& p, unsigned int blocks, int threads, cudaStream_t stream) {
    softmax_bwd_kernel<T, kGroup, kCache><<<blocks, threads, 0, stream>>>(p);
  }
};

at::Tensor softmax_fwd_cuda(const at::Tensor& input, const std::optional<at::Tensor>& mask, double scale,
                            bool is_causal) {
  TORCH_CHECK(input.dim() == 4, "input must be 4-D [A, B, M, N], got ", input.dim(), " dimensions");
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(is_supported_float(input.scalar_type()), "input must be float32, float16 or bfloat16, got ",
              input.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(input.size(3) <= kMaxExtent, "softmax rows must be at most ", kMaxExtent, " long, got ",
              input.size(3));
  SoftmaxFwdParams p{};
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->device() == input.device(), "mask must be on ", input.device(), " like input, got ",
                mask->device());
    TORCH_CHECK(mask->sizes() == input.sizes(), "mask must be expanded to the input's shape ", input.sizes(),
                ", got ", mask->sizes());
    switch (mask->scalar_type()) {
      case at::kBool: p.mask.kind = kMaskBool; break;
      case at::kFloat: p.mask.kind = kMaskFloat; break;
      case at::kHalf: p.mask.kind = kMaskHalf; break;
      case at::kBFloat16: p.mask.kind = kMaskBFloat16; break;
      case at::kDouble: p.mask.kind = kMaskDouble; break;
      default: TORCH_CHECK(false, "mask must be bool or floating, got ", mask->scalar_type());
    }
    p.mask.data = mask->const_data_ptr();
    p.mask.s0 = mask->stride(0);
    p.mask.s1 = mask->stride(1);
    p.mask.s2 = mask->stride(2);
    p.mask.s3 = mask->stride(3);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  const int64_t n = input.size(3);
  const int64_t rows = input.size(0) * input.size(1) * input.size(2);
  if (rows == 0 || n == 0) return out;
  p.x = input.const_data_ptr();
  for (int i = 0; i < 4; ++i) p.x_s[i] = input.stride(i);
  p.rows = rows;
  p.dim_b = input.size(1);
  p.dim_m = input.size(2);
  p.n = static_cast<int>(n);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.y = out.mutable_data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(input.scalar_type(), "softmax_fwd_cuda", AT_WRAP([&] {
    launch_softmax<SoftmaxFwdLaunch, scalar_t>(p, rows, p.n, stream);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& output,
                                                    double scale, bool mask_needs_grad) {
  TORCH_CHECK(output.dim() >= 1, "output must have at least 1 dimension");
  TORCH_CHECK(output.is_cuda(), "output must be a CUDA tensor, got ", output.device());
  TORCH_CHECK(is_supported_float(output.scalar_type()), "output must be float32, float16 or bfloat16, got ",
              output.scalar_type());
  TORCH_CHECK(grad_out.sizes() == output.sizes(), "grad_out must have the shape of output ", output.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == output.scalar_type(), "grad_out must have dtype ", output.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == output.device(), "grad_out must be on ", output.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(output.size(-1) <= kMaxExtent, "softmax rows must be at most ", kMaxExtent, " long, got ",
              output.size(-1));
  const c10::cuda::CUDAGuard guard(output.device());
  // Rows are read contiguously; a strided argument is copied first (the op's own backward always
  // passes contiguous tensors).
  const at::Tensor y = output.contiguous();
  const at::Tensor dy = grad_out.contiguous();
  at::Tensor dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  at::Tensor dscores = mask_needs_grad ? at::empty(y.sizes(), y.options().dtype(at::kFloat))
                                        : at::empty({0}, y.options());
  const int64_t n = y.size(-1);
  const int64_t rows = n == 0 ? 0 : y.numel() / n;
  if (rows == 0) return {dx, dscores};
  SoftmaxBwdParams p{};
  p.dy = dy.const_data_ptr();
  p.y = y.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.dscores = mask_needs_grad ? dscores.mutable_data_ptr<float>() : nullptr;
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.scale = static_cast<float>(scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(y.scalar_type(), "softmax_bwd_cuda", AT_WRAP([&] {
    launch_softmax<SoftmaxBwdLaunch, scalar_t>(p, rows, p.n, stream);
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {dx, dscores};
}

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("attention_fwd", &fused_attn::attention_fwd_cuda);
  m.impl("attention_bwd", &fused_attn::attention_bwd_cuda);
  m.impl("softmax_fwd", &fused_attn::softmax_fwd_cuda);
  m.impl("softmax_bwd", &fused_attn::softmax_bwd_cuda);
}
