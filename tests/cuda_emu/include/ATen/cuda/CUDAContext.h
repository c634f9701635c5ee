// The emulator's stand-in for ATen/cuda/CUDAContext.h (tests/cuda_emu/cuda_emu.h): one emulated sm90
// device whose properties the kernels' launchers read, and a null stream.
#pragma once

#include <driver_types.h>

#include <cstring>

#include "../../../cuda_emu.h"

namespace at::cuda {

inline const cudaDeviceProp* getDeviceProperties(int /*device*/) {
  static thread_local cudaDeviceProp prop;
  std::memset(&prop, 0, sizeof(prop));
  std::strncpy(prop.name, "emulated sm90", sizeof(prop.name) - 1);
  prop.major = 9;
  prop.minor = 0;
  prop.multiProcessorCount = ::cuda_emu::multiprocessors;
  prop.sharedMemPerBlock = 48 * 1024;
  prop.sharedMemPerBlockOptin = 227 * 1024;
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
