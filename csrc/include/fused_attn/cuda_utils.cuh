// Device helpers shared by the CUDA kernels: 16-byte vector access to global memory and
// deterministic warp/block sums; and the dropout seed as the kernels take it.
//
// The sums use a fixed xor-butterfly order, so for a given launch configuration they are bitwise
// reproducible from run to run, and every lane of a warp (every thread of a block) ends up with the
// same bits; kernels can then use the total without a separate broadcast step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>

#include "fused_attn/checks.h"

namespace fused_attn::cuda_utils {

// The key of a call's dropout stream as the CUDA kernels take it. fused_attn's ops draw the seed on
// the inputs' device (fused_attn/ops/_random.py), and a kernel loads it from device memory when it runs:
// a CUDA graph captured around the call (torch.cuda.graph, torch.compile's mode="reduce-overhead")
// replays the draw, which torch's generator makes anew at every replay, and the kernels read each
// replay's seed, the backward the one its forward read. A seed on the CPU (a direct op call) is passed
// by value; captured, that value would be frozen into every replay, so it is refused then.
struct DropoutSeed {
  const int64_t* device = nullptr;  // the seed in device memory, or null: `value`
  uint64_t value = 0;
  __device__ __forceinline__ uint64_t load() const {
    return device != nullptr ? static_cast<uint64_t>(*device) : value;
  }
};

// `seed` (checked_seed, on like's device or on the CPU) as the kernels of `op` take it.
inline DropoutSeed kernel_seed(const std::optional<at::Tensor>& seed, const at::Tensor& like, const char* op) {
  const at::Tensor& given = checked_seed(seed);
  check_seed_device(given, like);
  DropoutSeed s;
  if (given.device() == like.device()) {
    s.device = given.const_data_ptr<int64_t>();
    return s;
  }
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, op,
              ": a CPU seed while a CUDA graph is being captured: every replay would drop the elements of the "
              "capture; give the seed on the inputs' device (fused_attn's ops draw it there)");
  s.value = static_cast<uint64_t>(given.item<int64_t>());
  return s;
}

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// Elements of T per 16-byte (128-bit) global memory access, the widest single load/store.
template <typename T>
constexpr int vec16_width() {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
  return static_cast<int>(16 / sizeof(T));
}

// Over-aligned so that a whole vector is moved by one LDG/STG.128 (or narrower, for N * sizeof(T) < 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
};

// Inverted dropout of one value, (v * keep) / keep_prob with keep 0 or 1, in IEEE float arithmetic even
// under --use_fast_math (whose flush-to-zero would turn subnormal kept values into 0): the bits of the
// CPU and Triton kernels. A multiply, not a select, so a dropped NaN or inf gives NaN.
__device__ __forceinline__ float dropout_value(float v, bool keep, float keep_prob) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  return (v * (keep ? 1.f : 0.f)) / keep_prob;
#else
  float kept, out;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(kept) : "f"(v), "f"(keep ? 1.f : 0.f));
  asm("div.rn.f32 %0, %1, %2;" : "=f"(out) : "f"(kept), "f"(keep_prob));
  return out;
#endif
}

// a + b in IEEE float arithmetic even under --use_fast_math, which would flush subnormal operands and
// sums to zero: for plain sums the kernels return (Add & Norm's pre-norm sum and residual gradient),
// which then carry the CPU and Triton kernels' bits for subnormal values too.
__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  return a + b;
#else
  float out;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(out) : "f"(a), "f"(b));
  return out;
#endif
}

// a * b + c in IEEE float arithmetic even under --use_fast_math: a square whose value is subnormal (a
// deviation below 1e-19) is kept, not flushed to zero (LayerNorm's sum of squared deviations).
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
#if defined(FUSED_ATTN_CUDA_EMULATION)
  return std::fma(a, b, c);
#else
  float out;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(out) : "f"(a), "f"(b), "f"(c));
  return out;
#endif
}

// Host-side test deciding whether a pointer may take the vector path; nullptr counts as aligned so that
// absent optional operands do not force the scalar path.
inline bool is_aligned(const void* ptr, std::size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(ptr) % alignment == 0;
}

// Loads N consecutive elements and widens them to float. `p` must be aligned to sizeof(T) * N.
template <int N, typename T>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[N]) {
  const AlignedVector<T, N> v = *reinterpret_cast<const AlignedVector<T, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<float>(v.val[j]);
}

// Narrows N floats to T and stores them. `p` must be aligned to sizeof(T) * N.
template <int N, typename T>
__device__ __forceinline__ void store_from_float(T* p, const float (&in)[N]) {
  AlignedVector<T, N> v;
#pragma unroll
  for (int j = 0; j < N; ++j) v.val[j] = static_cast<T>(in[j]);
  *reinterpret_cast<AlignedVector<T, N>*>(p) = v;
}

// Sum over the 32 lanes of a fully active warp; every lane returns the same value.
__device__ __forceinline__ float warp_allreduce_sum(float v) {
#pragma unroll
  // add_rn: subnormal partial sums are kept (a flush to zero would lose a row of tiny squares).
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = add_rn(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  return v;
}

// Sums each of v[0..N) over a 1-D block whose size is a multiple of 32 (at most 1024); every thread
// receives the totals. `smem` must hold kWarpSize * N floats reserved for this function. All threads
// of the block must call it (it contains barriers).
template <int N>
__device__ __forceinline__ void block_allreduce_sum(float (&v)[N], float* smem) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[i * kWarpSize + warp] = v[i];
  }
  __syncthreads();
  // Each warp reduces the per-warp partials itself, in the same order, instead of warp 0 reducing
  // and broadcasting through shared memory: one barrier fewer, identical bits everywhere.
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_allreduce_sum(lane < num_warps ? smem[i * kWarpSize + lane] : 0.f);
  // Keeps a warp that returns early from overwriting `smem` in its next call while slower warps are
  // still reading this call's partials.
  __syncthreads();
}

}  // namespace fused_attn::cuda_utils
