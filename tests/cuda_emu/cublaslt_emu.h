// The part of cuBLASLt that csrc/cuda/ffn.cu calls, for the host emulator (tests/cuda_emu/cuda_emu.h), as
// the cuBLASLt documentation defines it: column-major matrices described by (type, rows, cols, ld), D =
// epilogue(op(A) op(B)) with float32 accumulation, the epilogues DEFAULT, BIAS (a vector of D's rows added
// to every column), GELU_AUX / GELU_AUX_BIAS (the pre-activation, bias included, written to the auxiliary
// matrix with its own leading dimension, D = gelu of it: cuBLASLt's GELU is the tanh form), DGELU /
// DGELU_BGRAD (D = product * gelu'(aux), and its row sums as the bias gradient). Products are summed in
// double and rounded once, the epilogue runs in float32 and D is rounded once to its type.
//
// Arguments the library would refuse are refused here too: operand shapes that do not make op(A) [m x k]
// times op(B) [k x n] into D [m x n], a leading dimension below the rows, an epilogue without the pointer
// it needs, an auxiliary leading dimension that is not a multiple of 8 or is below the rows (errors, see
// validate), mixed types and unknown epilogues or attributes (CUBLAS_STATUS_NOT_SUPPORTED), an attribute
// value of the wrong size. So a layout mistake in ffn.cu (row- versus column-major, a swapped leading
// dimension) fails the tests instead of computing something else.
#pragma once

#include <cublasLt.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"  // half_bits_to_float

namespace cuda_emu::lt {

struct MatmulDesc {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  int32_t trans_a = CUBLAS_OP_N;
  int32_t trans_b = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  void* aux = nullptr;
  int64_t aux_ld = 0;
};

struct Layout {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};

inline float load(const void* p, cudaDataType_t t, int64_t i) {
  if (t == CUDA_R_16F || t == CUDA_R_16BF) {
    return half_bits_to_float(static_cast<const uint16_t*>(p)[i], /*bf16=*/t == CUDA_R_16BF);
  }
  return static_cast<const float*>(p)[i];
}

inline void store(void* p, cudaDataType_t t, int64_t i, float v) {
  switch (t) {
    case CUDA_R_16F: static_cast<uint16_t*>(p)[i] = __half_as_ushort(__float2half_rn(v)); break;
    case CUDA_R_16BF: static_cast<uint16_t*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v)); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

inline float gelu_tanh(float x) {
  return 0.5f * x * (1.f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x)));
}

inline float gelu_tanh_grad(float x) {
  const float t = std::tanh(0.7978845608f * (x + 0.044715f * x * x * x));
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * 0.7978845608f * (1.f + 3.f * 0.044715f * x * x);
}

// The checks the library makes before running anything (also those of the heuristic query). An argument
// the library would answer CUBLAS_STATUS_INVALID_VALUE is thrown here as an error naming it: ffn.cu
// treats that status as its own bug and falls back to ATen with a warning given once per process, which
// would let every later call with the same mistake pass unnoticed.
inline cublasStatus_t validate(const MatmulDesc& op, const Layout& a, const Layout& b, const Layout& c,
                               const Layout& d) {
  auto invalid = [](const std::string& why) -> cublasStatus_t {
    throw std::runtime_error("cuBLASLt (emulated) would return CUBLAS_STATUS_INVALID_VALUE: " + why);
  };
  if (op.compute != CUBLAS_COMPUTE_32F || op.scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (a.type != d.type || b.type != d.type || c.type != d.type) return CUBLAS_STATUS_NOT_SUPPORTED;
  for (const Layout* l : {&a, &b, &c, &d}) {
    if (l->ld < static_cast<int64_t>(l->rows) || l->ld < 1) {
      return invalid("a leading dimension " + std::to_string(l->ld) + " below the " + std::to_string(l->rows) +
                     " rows of its matrix");
    }
  }
  const uint64_t m = d.rows, n = d.cols;
  const uint64_t a_m = op.trans_a == CUBLAS_OP_N ? a.rows : a.cols, a_k = op.trans_a == CUBLAS_OP_N ? a.cols : a.rows;
  const uint64_t b_k = op.trans_b == CUBLAS_OP_N ? b.rows : b.cols, b_n = op.trans_b == CUBLAS_OP_N ? b.cols : b.rows;
  if (a_m != m || b_n != n || a_k != b_k || c.rows != m || c.cols != n) {
    return invalid("op(A) [" + std::to_string(a_m) + " x " + std::to_string(a_k) + "] times op(B) [" +
                   std::to_string(b_k) + " x " + std::to_string(b_n) + "] does not make D [" + std::to_string(m) +
                   " x " + std::to_string(n) + "]");
  }
  const uint32_t e = op.epilogue;
  const bool needs_bias = e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
                          e == CUBLASLT_EPILOGUE_DGELU_BGRAD;
  const bool needs_aux = e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
                         e == CUBLASLT_EPILOGUE_DGELU || e == CUBLASLT_EPILOGUE_DGELU_BGRAD;
  if (e != CUBLASLT_EPILOGUE_DEFAULT && !needs_bias && !needs_aux) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (needs_bias && op.bias == nullptr) return invalid("a bias epilogue without BIAS_POINTER");
  if (needs_aux && (op.aux == nullptr || op.aux_ld % 8 != 0 || op.aux_ld < static_cast<int64_t>(m))) {
    return invalid(std::string("an auxiliary matrix ") + (op.aux == nullptr ? "without a pointer" : "with a pointer") +
                   " and leading dimension " + std::to_string(op.aux_ld) + " (a multiple of 8, at least " +
                   std::to_string(m) + ")");
  }
  return CUBLAS_STATUS_SUCCESS;
}

template <typename V>
cublasStatus_t set(V& field, const void* buf, size_t size) {
  if (size != sizeof(V)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(&field, buf, sizeof(V));
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace cuda_emu::lt

namespace at::cuda {
inline cublasLtHandle_t getCurrentCUDABlasLtHandle() {
  static int handle;
  return reinterpret_cast<cublasLtHandle_t>(&handle);
}
inline size_t getCUDABlasLtWorkspaceSize() { return 1 << 20; }
inline void* getCUDABlasLtWorkspace() {
  static std::vector<char> workspace(getCUDABlasLtWorkspaceSize());
  return workspace.data();
}
}  // namespace at::cuda

extern "C" {

const char* cublasLtGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS (emulated)";
  }
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* desc, cublasComputeType_t compute,
                                               cudaDataType_t scale) {
  *desc = reinterpret_cast<cublasLtMatmulDesc_t>(new cuda_emu::lt::MatmulDesc{compute, scale});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
  delete reinterpret_cast<cuda_emu::lt::MatmulDesc*>(desc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                                     const void* buf, size_t size) {
  auto& d = *reinterpret_cast<cuda_emu::lt::MatmulDesc*>(desc);
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return cuda_emu::lt::set(d.trans_a, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return cuda_emu::lt::set(d.trans_b, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return cuda_emu::lt::set(d.epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return cuda_emu::lt::set(d.bias, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: return cuda_emu::lt::set(d.aux, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: return cuda_emu::lt::set(d.aux_ld, buf, size);
    default: return CUBLAS_STATUS_NOT_SUPPORTED;  // not emulated: a new attribute in ffn.cu shows here
  }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* layout, cudaDataType type, uint64_t rows,
                                                 uint64_t cols, int64_t ld) {
  *layout = reinterpret_cast<cublasLtMatrixLayout_t>(new cuda_emu::lt::Layout{type, rows, cols, ld});
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
  delete reinterpret_cast<cuda_emu::lt::Layout*>(layout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* pref) {
  *pref = reinterpret_cast<cublasLtMatmulPreference_t>(new int(0));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  delete reinterpret_cast<int*>(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void*,
                                                    size_t size) {
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      return size == sizeof(uint64_t) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return size == sizeof(uint32_t) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t, int requested,
                                              cublasLtMatmulHeuristicResult_t results[], int* returned) {
  using cuda_emu::lt::Layout;
  *returned = 0;
  if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
  const cublasStatus_t status = cuda_emu::lt::validate(
      *reinterpret_cast<cuda_emu::lt::MatmulDesc*>(op), *reinterpret_cast<Layout*>(a), *reinterpret_cast<Layout*>(b),
      *reinterpret_cast<Layout*>(c), *reinterpret_cast<Layout*>(d));
  if (status != CUBLAS_STATUS_SUCCESS) return status;
  std::memset(&results[0], 0, sizeof(results[0]));
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  *returned = 1;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                                     cublasLtMatrixLayout_t a_desc, const void* B, cublasLtMatrixLayout_t b_desc,
                                     const void* beta, const void* C, cublasLtMatrixLayout_t c_desc, void* D,
                                     cublasLtMatrixLayout_t d_desc, const cublasLtMatmulAlgo_t* algo, void*, size_t,
                                     cudaStream_t) {
  using namespace cuda_emu::lt;
  const MatmulDesc& op = *reinterpret_cast<MatmulDesc*>(desc);
  const Layout& a = *reinterpret_cast<Layout*>(a_desc);
  const Layout& b = *reinterpret_cast<Layout*>(b_desc);
  const Layout& c = *reinterpret_cast<Layout*>(c_desc);
  const Layout& d = *reinterpret_cast<Layout*>(d_desc);
  if (algo == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (const cublasStatus_t status = validate(op, a, b, c, d); status != CUBLAS_STATUS_SUCCESS) return status;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  const int64_t m = static_cast<int64_t>(d.rows), n = static_cast<int64_t>(d.cols);
  const int64_t k = static_cast<int64_t>(op.trans_a == CUBLAS_OP_N ? a.cols : a.rows);
  auto elem_a = [&](int64_t i, int64_t p) {  // op(A)[i, p]
    return op.trans_a == CUBLAS_OP_N ? load(A, a.type, i + p * a.ld) : load(A, a.type, p + i * a.ld);
  };
  auto elem_b = [&](int64_t p, int64_t j) {  // op(B)[p, j]
    return op.trans_b == CUBLAS_OP_N ? load(B, b.type, p + j * b.ld) : load(B, b.type, j + p * b.ld);
  };
  const uint32_t e = op.epilogue;
  std::vector<double> bias_grad(static_cast<size_t>(m), 0.0);
  std::vector<float> result(static_cast<size_t>(m * n));
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      double s = 0.0;
      for (int64_t p = 0; p < k; ++p) s += static_cast<double>(elem_a(i, p)) * elem_b(p, j);
      float v = al * static_cast<float>(s);
      if (be != 0.f) v += be * load(C, c.type, i + j * c.ld);
      if (e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) v += load(op.bias, d.type, i);
      if (e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) {
        store(op.aux, d.type, i + j * op.aux_ld, v);
        v = gelu_tanh(v);
      }
      if (e == CUBLASLT_EPILOGUE_DGELU || e == CUBLASLT_EPILOGUE_DGELU_BGRAD) {
        v *= gelu_tanh_grad(load(op.aux, d.type, i + j * op.aux_ld));
        bias_grad[static_cast<size_t>(i)] += v;
      }
      result[static_cast<size_t>(i + j * m)] = v;
    }
  }
  // D may be C: written after every element of C was read.
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) store(D, d.type, i + j * d.ld, result[static_cast<size_t>(i + j * m)]);
  }
  if (e == CUBLASLT_EPILOGUE_DGELU_BGRAD) {
    for (int64_t i = 0; i < m; ++i) {
      store(const_cast<void*>(op.bias), d.type, i, static_cast<float>(bias_grad[static_cast<size_t>(i)]));
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
