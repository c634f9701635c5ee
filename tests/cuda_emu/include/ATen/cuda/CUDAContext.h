// The emulator's stand-in for ATen/cuda/CUDAContext.h (tests/cuda_emu/cuda_emu.h): one emulated device
// (an H100's properties unless set_device says otherwise) whose properties the kernels' launchers read,
// and a null stream.
#pragma once

#include <driver_types.h>

#include <cstdio>
#include <cstring>

#include "../../../cuda_emu.h"

namespace at::cuda {

inline const cudaDeviceProp* getDeviceProperties(int /*device*/) {
  static thread_local cudaDeviceProp prop;
  std::memset(&prop, 0, sizeof(prop));
  std::snprintf(prop.name, sizeof(prop.name), "emulated sm%d%d", ::cuda_emu::capability_major,
                ::cuda_emu::capability_minor);
  prop.major = ::cuda_emu::capability_major;
  prop.minor = ::cuda_emu::capability_minor;
  prop.multiProcessorCount = ::cuda_emu::multiprocessors;
  prop.sharedMemPerBlock = 48 * 1024;
  prop.sharedMemPerBlockOptin = ::cuda_emu::shared_memory_per_block;
  prop.maxThreadsPerBlock = 1024;
  prop.warpSize = 32;
  return &prop;
}

inline const cudaDeviceProp* getCurrentDeviceProperties() { return getDeviceProperties(0); }

struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};

inline EmulatedStream getCurrentCUDAStream(int /*device*/ = -1) { return {}; }

}  // namespace at::cuda

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel /*kernel*/, cudaFuncAttribute /*attr*/, int /*value*/) {
  return cudaSuccess;
}
