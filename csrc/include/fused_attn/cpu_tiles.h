// Where the CPU kernels multiply 16-bit values on the CPU's tile unit (AMX), the one place that
// decides it: the attention kernels (csrc/cpu/attention.cpp) and the query that `fused-attn info`
// prints (csrc/fast.cpp, cpu_tile_dtypes).
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>

namespace fused_attn {

// Whether products of `type` run on the tile unit: where oneDNN's brgemm micro-kernels take it
// packed for the unit (torch's cpublas::could_pack: bfloat16 on AMX-BF16 CPUs, float16 on
// AMX-FP16 ones; never with oneDNN turned off, torch.backends.mkldnn.enabled = False). float32
// never: its products stay with the BLAS sgemm.
inline bool cpu_tile_products(at::ScalarType type) {
  return type != at::kFloat && at::native::cpublas::could_pack(type);
}

}  // namespace fused_attn
