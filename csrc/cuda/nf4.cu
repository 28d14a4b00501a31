// NF4 quantize / dequantize / GEMV on CUDA (peftkern/ops/nf4/README.md has the math), bit-exact with bitsandbytes.
// extern "C" launchers taking raw pointers, sizes and a cudaStream_t, called through ctypes (peftkern/_native.py);
// no torch headers. dtype codes: 0 = float32, 1 = float16, 2 = bfloat16. Launchers return a cudaError_t.
#include <cstdint>
#include <cuda_runtime.h>

#include "common.cuh"
#include "index_math.cuh"

namespace {

namespace idx = peftkern::index;
using idx::kThreads;
using peftkern::load_as_float;
using peftkern::store_from_float;

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
                                              const float* code8, const float* offset, int log2_nested, int64_t j) {
  if (absmax) return absmax[j];
  // two roundings, as bitsandbytes
  return __fadd_rn(__fmul_rn(code8[qabsmax[j]], absmax2[idx::block_of(j, log2_nested)]), *offset);
}

// One CTA per quantization block: absmax (NaN if the block holds NaN or Inf), then codes packed two per byte.
__global__ void nf4_quantize_kernel(const void* w, int dtype, int64_t n, int log2_bs, const float* code,
                                    uint8_t* packed, float* absmax) {
  __shared__ float shared[kThreads / 32];
  __shared__ float mids[15];
  if (threadIdx.x < 15) mids[threadIdx.x] = (code[threadIdx.x] + code[threadIdx.x + 1]) / 2.0f;
  const idx::Span span = idx::quantize_span(blockIdx.x, n, log2_bs);
  float am = 0.0f, bad = 0.0f;
  idx::quantize_scan(span, threadIdx.x, [&](int64_t i) {
    const float a = fabsf(load_as_float(w, dtype, i));
    bad = isfinite(a) ? bad : 1.0f;
    am = fmaxf(am, a);
  });
  am = block_max(am, shared);
  bad = block_max(bad, shared);
  if (threadIdx.x == 0) absmax[blockIdx.x] = bad > 0.0f ? __int_as_float(0x7fc00000) : am;
  const float inv = __frcp_rn(fmaxf(am, 1e-38f));
  idx::quantize_pairs(span, threadIdx.x, [&](int64_t i) {
    int q[2];
    for (int t = 0; t < 2; ++t) {
      float s = i + t < n ? __fmul_rn(load_as_float(w, dtype, i + t), inv) : 0.0f;
      s = fminf(fmaxf(s, -1.0f), 1.0f);
      int below = 0;
      for (int k = 0; k < 15; ++k) below += s > mids[k];  // midpoints strictly below: ties go to the lower code
      q[t] = below;
    }
    packed[idx::packed_byte(i)] = idx::pack_pair(q[0], q[1]);
  });
}

// One CTA of 256 threads per nested block: nearest code8 entry of (absmax - offset) / absmax2, ties to even.
__global__ void nf4_quantize_absmax_kernel(const float* absmax, int64_t blocks, const float* offset,
                                           const float* code8, uint8_t* q, float* absmax2) {
  __shared__ float shared[kThreads / 32];
  const int64_t i = idx::global_thread(blockIdx.x, threadIdx.x);
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
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const float* absmax, const uint8_t* qabsmax,
                                      const float* absmax2, const float* code8, const float* offset, int log2_nested,
                                      const float* code, int64_t n, int log2_bs, void* __restrict__ out, int dtype) {
  idx::dequantize_thread(blockIdx.x, threadIdx.x, n, [&](int64_t t, int64_t i) {
    const float am = block_absmax(qabsmax, absmax, absmax2, code8, offset, log2_nested, idx::block_of(i, log2_bs));
    store_from_float(out, dtype, i, __fmul_rn(code[idx::nibble(packed[t], i)], am));
  });
}

// Decode-time forward, one warp per (row m, output feature c): out[m, c] = sum_k x[m, k] W[c, k] (+ bias), W's values
// rounded as the torch path does (to W's dtype, then x's).
__global__ void nf4_gemv_kernel(const void* x, int x_dtype, int64_t M, int64_t stride_xm, const uint8_t* packed,
                                const float* absmax, const float* code, int log2_bs, int64_t C, int64_t K,
                                int w_dtype, const void* bias, void* out) {
  idx::GemvWarp warp;
  if (!idx::gemv_warp(blockIdx.x, threadIdx.x, M, C, &warp)) return;  // whole warps: M C warps end at a warp
  float acc = 0.0f;
  idx::gemv_lane(warp, K, [&](int64_t k, int64_t i) {
    const float w = __fmul_rn(code[idx::nibble(packed[idx::packed_byte(i)], i)], absmax[idx::block_of(i, log2_bs)]);
    acc += round_to(round_to(w, w_dtype), x_dtype) * load_as_float(x, x_dtype, idx::gemv_x_offset(warp, stride_xm, k));
  });
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (warp.lane == 0) {
    if (bias) acc += load_as_float(bias, x_dtype, warp.c);
    store_from_float(out, x_dtype, idx::gemv_out_offset(warp, C), acc);
  }
}

}  // namespace

extern "C" {

int pk_nf4_quantize_cuda(const void* w, int dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                         float* absmax, cudaStream_t stream) {
  const idx::Launch l = idx::quantize_launch(n, blocksize);
  if (!l.grid || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  nf4_quantize_kernel<<<l.grid, kThreads, 0, stream>>>(w, dtype, n, l.log2_bs, code, packed, absmax);
  return cudaGetLastError();
}

int pk_nf4_quantize_absmax_cuda(const float* absmax, int64_t blocks, const float* offset, const float* code8,
                                uint8_t* q, float* absmax2, cudaStream_t stream) {
  const idx::Launch l = idx::quantize_absmax_launch(blocks);
  if (!l.grid) return cudaErrorInvalidValue;
  nf4_quantize_absmax_kernel<<<l.grid, kThreads, 0, stream>>>(absmax, blocks, offset, code8, q, absmax2);
  return cudaGetLastError();
}

int pk_nf4_dequantize_cuda(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                           const float* code8, const float* offset, int64_t nested_blocksize, const float* code,
                           int64_t n, int64_t blocksize, void* out, int dtype, cudaStream_t stream) {
  const idx::Launch l = idx::dequantize_launch(n, blocksize, !absmax, nested_blocksize);
  if (!l.grid || dtype < 0 || dtype > 2) return cudaErrorInvalidValue;
  if (!absmax && (!qabsmax || !absmax2 || !code8 || !offset)) return cudaErrorInvalidValue;
  nf4_dequantize_kernel<<<l.grid, kThreads, 0, stream>>>(packed, absmax, qabsmax, absmax2, code8, offset,
                                                         l.log2_nested, code, n, l.log2_bs, out, dtype);
  return cudaGetLastError();
}

int pk_nf4_gemv_cuda(const void* x, int x_dtype, int64_t M, int64_t stride_xm, const uint8_t* packed,
                     const float* absmax, const float* code, int64_t blocksize, int64_t C, int64_t K, int w_dtype,
                     const void* bias, void* out, cudaStream_t stream) {
  const idx::Launch l = idx::gemv_launch(M, C, K, blocksize);
  if (!l.grid) return cudaErrorInvalidValue;
  nf4_gemv_kernel<<<l.grid, kThreads, 0, stream>>>(x, x_dtype, M, stride_xm, packed, absmax, code, l.log2_bs, C, K,
                                                   w_dtype, bias, out);
  return cudaGetLastError();
}

}  // extern "C"
