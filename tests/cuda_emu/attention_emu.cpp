// csrc/cuda/attention.cu compiled for the host emulator (tests/cuda_emu/cuda_emu.h) and registered as the
// fused_attn_emu ops, with the CUDA kernels' schemas, on CPU tensors: attention_fwd, attention_bwd,
// softmax_fwd, softmax_bwd, configure(multiprocessors, copies_at_wait, schedule_seed),
// set_device(major, minor, shared_memory_per_block) (the emulated device's properties), set_capturing(flag)
// (whether the stream is being captured into a CUDA graph),
// take_counters() (ldmatrix phases, their extra wavefronts, tensor-core products so far), and self_test(case):
// kernels with the faults the emulator reports (0 divergent warp, 1 deadlock, 2 shared memory out of range,
// 3 a shared-memory race).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"
// The kernels' source as tests/cuda_emu/emu_build.py rewrote it (<<<...>>> launches, extern __shared__).
#include "attention_emulated.inc"

namespace {

void configure(int64_t multiprocessors, bool copies_at_wait, int64_t schedule_seed) {
  TORCH_CHECK(multiprocessors > 0, "multiprocessors must be positive, got ", multiprocessors);
  cuda_emu::multiprocessors = static_cast<int>(multiprocessors);
  cuda_emu::copies_at_wait = copies_at_wait;
  cuda_emu::schedule_seed = static_cast<uint64_t>(schedule_seed);
}

__global__ void faulty_kernel(int fault, int* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (fault == 0) {  // half the lanes at a shuffle, the other half at a tensor-core product
    if (t % 2 == 0) {
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    } else {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      const uint32_t a[4] = {0, 0, 0, 0};
      cuda_emu::mma_m16n8k16(d, a, 0, 0, false);
    }
  } else if (fault == 1) {  // a barrier half the block never reaches
    if (t % 2 == 0) {
      __syncthreads();
    } else {
      out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
    }
  } else if (fault == 2) {  // rows past the dynamic shared memory
    uint32_t r[4];
    cuda_emu::ldmatrix_x4(r, 1024 + 16 * static_cast<uint32_t>(t), false);
    out[t] = static_cast<int>(r[0]);
  } else {  // warp 0 copies rows in, warp 1 reads them after warp 0's wait but with no barrier
    static const uint16_t source[8 * 64] = {};
    if (t < 32) {
      cuda_emu::cp_async_16(16 * static_cast<uint32_t>(t), source + 8 * t, 16);
      cuda_emu::cp_async_commit();
      cuda_emu::cp_async_wait(0);
    } else if (t < 64) {
      uint32_t r[4];
      cuda_emu::ldmatrix_x4(r, 16 * static_cast<uint32_t>(t - 32), false);
      out[t] = static_cast<int>(r[0]);
    }
  }
}

void set_device(int64_t major, int64_t minor, int64_t shared_memory_per_block) {
  cuda_emu::capability_major = static_cast<int>(major);
  cuda_emu::capability_minor = static_cast<int>(minor);
  cuda_emu::shared_memory_per_block = static_cast<size_t>(shared_memory_per_block);
}

void set_capturing(bool capturing) { cuda_emu::capturing = capturing; }

// (ldmatrix phases, extra wavefronts their bank conflicts cost, tensor-core products) since the last call.
std::tuple<int64_t, int64_t, int64_t> take_counters() {
  const std::tuple<int64_t, int64_t, int64_t> counts{cuda_emu::ldmatrix_phases, cuda_emu::ldmatrix_extra_wavefronts,
                                                     cuda_emu::mma_count};
  cuda_emu::ldmatrix_phases = cuda_emu::ldmatrix_extra_wavefronts = cuda_emu::mma_count = 0;
  return counts;
}

void self_test(int64_t fault) {
  at::Tensor out = at::zeros({128}, at::kInt);
  ::cuda_emu::launch(faulty_kernel, 1u, 128u, 1024)(static_cast<int>(fault), out.mutable_data_ptr<int>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_attn_emu, m) {
  m.def("attention_fwd", &fused_attn::attention_fwd_cuda);
  m.def("attention_bwd", &fused_attn::attention_bwd_cuda);
  m.def("softmax_fwd", &fused_attn::softmax_fwd_cuda);
  m.def("softmax_bwd", &fused_attn::softmax_bwd_cuda);
  m.def("configure", &configure);
  m.def("set_device", &set_device);
  m.def("set_capturing", &set_capturing);
  m.def("self_test", &self_test);
  m.def("take_counters", &take_counters);
}
