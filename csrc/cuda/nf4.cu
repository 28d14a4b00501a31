// NF4 quantize / dequantize / GEMV on CUDA (peftkern/ops/nf4/README.md has the math), bit-exact with bitsandbytes.
// extern "C" launchers taking raw pointers, sizes and a cudaStream_t, called through ctypes (peftkern/_native.py);
// no torch headers. dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Launchers return a cudaError_t.
#include <cstdint>
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

using peftkern::load_as_float;
using peftkern::store_from_float;

constexpr int kThreads = 256;

__device__ __forceinline__ float round_to(float v, int dtype) {  // fp32 -> dtype -> fp32, nearest even
  if (dtype == 1) return __half2float(__float2half_rn(v));
  if (dtype == 2) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

__device__ __forceinline__ float block_max(float v, float* shared) {  // max over the CTA (kThreads threads)
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32)
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_absmax(const uint8_t* qabsmax, const float* absmax, const float* absmax2,
                                              const float* code8, const float* offset, int64_t nested, int64_t j) {
  if (absmax) return absmax[j];
  return __fadd_rn(__fmul_rn(code8[qabsmax[j]], absmax2[j / nested]), *offset);  // two roundings, as bitsandbytes
}

// One CTA per quantization block: absmax (NaN if the block holds NaN or Inf), then codes packed two per byte.
__global__ void nf4_quantize_kernel(const void* w, int dtype, int64_t n, int64_t blocksize, const float* code,
                                    uint8_t* packed, float* absmax) {
  __shared__ float shared[kThreads / 32];
  __shared__ float mids[15];
  if (threadIdx.x < 15) mids[threadIdx.x] = (code[threadIdx.x] + code[threadIdx.x + 1]) / 2.0f;
  const int64_t start = int64_t(blockIdx.x) * blocksize;
  const int64_t end = min(start + blocksize, n);
  float am = 0.0f, bad = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const float a = fabsf(load_as_float(w, dtype, i));
    bad = isfinite(a) ? bad : 1.0f;
    am = fmaxf(am, a);
  }
  am = block_max(am, shared);
  bad = block_max(bad, shared);
  if (threadIdx.x == 0) absmax[blockIdx.x] = bad > 0.0f ? __int_as_float(0x7fc00000) : am;
  const float inv = __frcp_rn(fmaxf(am, 1e-38f));
  const int64_t pairs_end = min(end + (end & 1), n + (n & 1));
  for (int64_t i = start + 2 * threadIdx.x; i < pairs_end; i += 2 * kThreads) {
    int q[2];
    for (int t = 0; t < 2; ++t) {
      float s = i + t < n ? __fmul_rn(load_as_float(w, dtype, i + t), inv) : 0.0f;
      s = fminf(fmaxf(s, -1.0f), 1.0f);
      int idx = 0;
      for (int k = 0; k < 15; ++k) idx += s > mids[k];  // midpoints strictly below: ties go to the lower code
      q[t] = idx;
    }
    packed[i / 2] = uint8_t((q[0] << 4) | q[1]);
  }
}

// One CTA of 256 threads per nested block: nearest code8 entry of (absmax - offset) / absmax2, ties to even.
__global__ void nf4_quantize_absmax_kernel(const float* absmax, int64_t blocks, const float* offset,
                                           const float* code8, uint8_t* q, float* absmax2) {
  __shared__ float shared[kThreads / 32];
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const float a = i < blocks ? __fsub_rn(absmax[i], *offset) : 0.0f;
  const float am2 = block_max(fabsf(a), shared);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = am2;
  if (i >= blocks) return;
  const float s = fminf(fmaxf(__fmul_rn(a, __frcp_rn(fmaxf(am2, 1e-38f))), -1.0f), 1.0f);
  int j = 0;  // the last code8[j] <= s (0 below code8[0])
  for (int step = 128; step > 0; step >>= 1)
    if (code8[j + step] <= s) j += step;
  j = min(j, 254);
  const float d_lo = s - code8[j], d_hi = code8[j + 1] - s;
  q[i] = uint8_t(d_hi < d_lo ? j + 1 : (d_lo < d_hi ? j : j + (j & 1)));
}

// One thread per packed byte: two outputs.
__global__ void nf4_dequantize_kernel(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                                      const float* absmax2, const float* code8, const float* offset, int64_t nested,
                                      const float* code, int64_t n, int64_t blocksize, void* out, int dtype) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (2 * t >= n) return;
  const uint8_t b = packed[t];
  for (int h = 0; h < 2 && 2 * t + h < n; ++h) {
    const int64_t i = 2 * t + h;
    const float am = block_absmax(qabsmax, absmax, absmax2, code8, offset, nested, i / blocksize);
    store_from_float(out, dtype, i, __fmul_rn(code[h == 0 ? b >> 4 : b & 0xF], am));
  }
}

// Decode-time forward, one warp per (row m, output feature c): out[m, c] = sum_k x[m, k] W[c, k] (+ bias), W's values
// rounded as the torch path does (to W's dtype, then x's).
__global__ void nf4_gemv_kernel(const void* x, int x_dtype, int64_t M, int64_t stride_xm, const uint8_t* packed,
                                const float* absmax, const float* code, int64_t blocksize, int64_t C, int64_t K,
                                int w_dtype, const void* bias, void* out) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= M * C) return;
  const int64_t m = warp / C, c = warp % C;
  float acc = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t i = c * K + k;
    const uint8_t b = packed[i >> 1];
    const float w = __fmul_rn(code[(i & 1) ? b & 0xF : b >> 4], absmax[i / blocksize]);
    acc += round_to(round_to(w, w_dtype), x_dtype) * load_as_float(x, x_dtype, m * stride_xm + k);
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if (bias) acc += load_as_float(bias, x_dtype, c);
    store_from_float(out, x_dtype, m * C + c, acc);
  }
}

}  // namespace

extern "C" {

int pk_nf4_quantize_cuda(const void* w, int dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                         float* absmax, cudaStream_t stream) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1) || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  nf4_quantize_kernel<<<blocks, kThreads, 0, stream>>>(w, dtype, n, blocksize, code, packed, absmax);
  return cudaGetLastError();
}

int pk_nf4_quantize_absmax_cuda(const float* absmax, int64_t blocks, const float* offset, const float* code8,
                                uint8_t* q, float* absmax2, cudaStream_t stream) {
  if (blocks <= 0) return cudaErrorInvalidValue;
  nf4_quantize_absmax_kernel<<<(blocks + kThreads - 1) / kThreads, kThreads, 0, stream>>>(absmax, blocks, offset,
                                                                                          code8, q, absmax2);
  return cudaGetLastError();
}

int pk_nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                           const float* code8, const float* offset, int64_t nested_blocksize, const float* code,
                           int64_t n, int64_t blocksize, void* out, int dtype, cudaStream_t stream) {
  if (n <= 0 || blocksize <= 0 || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  if (!absmax && (!qabsmax || !absmax2 || !code8 || !offset || nested_blocksize <= 0)) return cudaErrorInvalidValue;
  const int64_t bytes = (n + 1) / 2;
  nf4_dequantize_kernel<<<(bytes + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      packed, absmax, qabsmax, absmax2, code8, offset, nested_blocksize, code, n, blocksize, out, dtype);
  return cudaGetLastError();
}

int pk_nf4_gemv_cuda(const void* x, int x_dtype, int64_t M, int64_t stride_xm, const uint8_t* packed,
                     const float* absmax, const float* code, int64_t blocksize, int64_t C, int64_t K, int w_dtype,
                     const void* bias, void* out, cudaStream_t stream) {
  if (M <= 0 || C <= 0 || K <= 0 || blocksize <= 0) return cudaErrorInvalidValue;
  const int64_t warps = M * C;
  nf4_gemv_kernel<<<(warps * 32 + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      x, x_dtype, M, stride_xm, packed, absmax, code, blocksize, C, K, w_dtype, bias, out);
  return cudaGetLastError();
}

}  // extern "C"
