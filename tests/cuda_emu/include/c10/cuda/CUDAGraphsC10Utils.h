// The emulator's stand-in for c10/cuda/CUDAGraphsC10Utils.h: the capture status of the one stream,
// set by the tests (set_capturing).
#pragma once

#include "../../../cuda_emu.h"

namespace c10::cuda {

enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };

inline CaptureStatus currentStreamCaptureStatusMayInitCtx() {
  return ::cuda_emu::capturing ? CaptureStatus::Active : CaptureStatus::None;
}

}  // namespace c10::cuda
