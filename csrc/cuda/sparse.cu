// Sparse diff merge (scatter-add) and gather on CUDA, extern "C" launchers called through ctypes
// (peftkern/ops/sparse/cuda_impl.py). Indices are unique: one writer per element, no atomics.
#include <cstdint>
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 256;

// flat[idx_e] = dtype(fp32(flat[idx_e]) + fp32(alpha * v_e)): the product rounded before the add, as torch does.
__global__ void sparse_scatter_add_kernel(void* flat, int dtype, const int64_t* idx, const float* values,
                                          int64_t nnz, float alpha) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= nnz) return;
  const int64_t i = idx[e];
  peftkern::store_from_float(flat, dtype, i,
                             __fadd_rn(peftkern::load_as_float(flat, dtype, i), __fmul_rn(alpha, values[e])));
}

// out[e] = flat[idx_e] (same dtype; element_bytes 2 or 4).
__global__ void sparse_gather_kernel(const void* flat, int element_bytes, const int64_t* idx, int64_t nnz,
                                     void* out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= nnz) return;
  if (element_bytes == 4) static_cast<uint32_t*>(out)[e] = static_cast<const uint32_t*>(flat)[idx[e]];
  else static_cast<uint16_t*>(out)[e] = static_cast<const uint16_t*>(flat)[idx[e]];
}

}  // namespace

extern "C" {

int pk_sparse_scatter_add_cuda(void* flat, int dtype, const int64_t* idx, const float* values, int64_t nnz,
                               float alpha, cudaStream_t stream) {
  if (nnz < 0 || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;
  sparse_scatter_add_kernel<<<(nnz + kThreads - 1) / kThreads, kThreads, 0, stream>>>(flat, dtype, idx, values,
                                                                                     nnz, alpha);
  return cudaGetLastError();
}

int pk_sparse_gather_cuda(const void* flat, int element_bytes, const int64_t* idx, int64_t nnz, void* out,
                          cudaStream_t stream) {
  if (nnz < 0 || (element_bytes != 2 && element_bytes != 4)) return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;
  sparse_gather_kernel<<<(nnz + kThreads - 1) / kThreads, kThreads, 0, stream>>>(flat, element_bytes, idx, nnz,
                                                                                out);
  return cudaGetLastError();
}

}  // extern "C"
