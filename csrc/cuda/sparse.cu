// Sparse diff merge (scatter-add) and gather on CUDA, extern "C" launchers called through ctypes
// (peftkern/ops/sparse/cuda_impl.py). Indices are unique: one writer per element, no atomics.
#include <cstdint>
#include <cuda_runtime.h>

#include "common.cuh"
#include "index_math.cuh"

namespace {

namespace idx = peftkern::index;
using idx::kThreads;

// flat[i_e] = dtype(fp32(flat[i_e]) + fp32(alpha * v_e)), i = indices: the product rounded before the add, as torch
// does.
__global__ void sparse_scatter_add_kernel(void* flat, int dtype, const int64_t* indices, const float* values,
                                          int64_t nnz, float alpha) {
  const int64_t e = idx::global_thread(blockIdx.x, threadIdx.x);
  if (e >= nnz) return;
  const int64_t i = indices[e];
  peftkern::store_from_float(flat, dtype, i,
                             __fadd_rn(peftkern::load_as_float(flat, dtype, i), __fmul_rn(alpha, values[e])));
}

// out[e] = flat[indices[e]] (same dtype; element_bytes 2 or 4).
__global__ void sparse_gather_kernel(const void* flat, int element_bytes, const int64_t* indices, int64_t nnz,
                                     void* out) {
  const int64_t e = idx::global_thread(blockIdx.x, threadIdx.x);
  if (e >= nnz) return;
  if (element_bytes == 4) static_cast<uint32_t*>(out)[e] = static_cast<const uint32_t*>(flat)[indices[e]];
  else static_cast<uint16_t*>(out)[e] = static_cast<const uint16_t*>(flat)[indices[e]];
}

}  // namespace

extern "C" {

int pk_sparse_scatter_add_cuda(void* flat, int dtype, const int64_t* indices, const float* values, int64_t nnz,
                               float alpha, cudaStream_t stream) {
  if (nnz < 0 || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;
  const idx::Launch l = idx::sparse_launch(nnz);
  if (!l.grid) return cudaErrorInvalidValue;
  sparse_scatter_add_kernel<<<l.grid, kThreads, 0, stream>>>(flat, dtype, indices, values, nnz, alpha);
  return cudaGetLastError();
}

int pk_sparse_gather_cuda(const void* flat, int element_bytes, const int64_t* indices, int64_t nnz, void* out,
                          cudaStream_t stream) {
  if (nnz < 0 || (element_bytes != 2 && element_bytes != 4)) return cudaErrorInvalidValue;
  if (nnz == 0) return cudaSuccess;
  const idx::Launch l = idx::sparse_launch(nnz);
  if (!l.grid) return cudaErrorInvalidValue;
  sparse_gather_kernel<<<l.grid, kThreads, 0, stream>>>(flat, element_bytes, indices, nnz, out);
  return cudaGetLastError();
}

}  // extern "C"
