// The CUDA launchers' index math: grid sizes, which CTA and thread handle which element, an element's packed byte,
// nibble and quantization block, the GEMV's (row, output feature) per warp. One source for two compilers: nvcc
// builds it into the kernels (nf4.cu, sparse.cu), the host compiler into the CPU library (csrc/cpu/cuda_index.cpp),
// whose tracer lets the tests run this very code over whole grids without a GPU. Plain C++ with no CUDA header.
// Offsets are 64-bit from the first product: blockIdx.x * blockDim.x passes 2^31 at 2^23 CTAs of 256 threads.
// Blocksizes are powers of two, passed as their log2: an element's block is a shift, not a division.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PK_HD __host__ __device__ __forceinline__
#define PK_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define PK_HD inline
#define PK_HD_TEMPLATE
#endif

namespace peftkern {
namespace index {

constexpr int kThreads = 256;          // threads per CTA, every launcher
constexpr int kWarp = 32;
constexpr int kNestedBlocksize = 256;  // double quantization's blocks of absmax: one CTA each
static_assert(kNestedBlocksize == kThreads, "nf4_quantize_absmax_kernel quantizes one nested block per CTA");
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x's limit

PK_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// log2 of a power of two >= 2 (a pair of nibbles never straddles two blocks), -1 for anything else.
PK_HD int log2_blocksize(int64_t blocksize) {
  if (blocksize < 2 || (blocksize & (blocksize - 1))) return -1;
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize) ++shift;
  return shift;
}

// What a launcher launches: its grid, none (0) where it refuses the problem, and the blocksizes' shifts.
struct Launch {
  int64_t grid;
  int log2_bs, log2_nested;
};

PK_HD Launch checked(Launch l) { return l.grid >= 1 && l.grid <= kMaxGrid ? l : Launch{0, -1, -1}; }

// The thread's index over the whole grid; block and thread as blockIdx.x and threadIdx.x give them.
PK_HD int64_t global_thread(uint32_t block, uint32_t thread) { return int64_t(block) * kThreads + thread; }

PK_HD int64_t packed_byte(int64_t i) { return i >> 1; }
PK_HD int nibble_shift(int64_t i) { return (i & 1) ? 0 : 4; }  // the even element of a byte in its high nibble
PK_HD int nibble(uint8_t byte, int64_t i) { return (byte >> nibble_shift(i)) & 0xF; }
PK_HD uint8_t pack_pair(int q_even, int q_odd) { return uint8_t((q_even << 4) | q_odd); }
PK_HD int64_t block_of(int64_t i, int log2_size) { return i >> log2_size; }  // element -> quantization block

// ---- nf4_quantize_kernel: one CTA per quantization block [begin, end).
struct Span {
  int64_t begin, end;
};

PK_HD Launch quantize_launch(int64_t n, int64_t blocksize) {
  const int s = log2_blocksize(blocksize);
  return n > 0 && s > 0 ? checked({block_of(n + blocksize - 1, s), s, -1}) : Launch{0, -1, -1};
}

PK_HD Span quantize_span(uint32_t block, int64_t n, int log2_bs) {
  const int64_t begin = int64_t(block) << log2_bs, end = begin + (int64_t(1) << log2_bs);
  return {begin, end < n ? end : n};
}

// The absmax pass: thread t reads begin + t, + kThreads, ...
PK_HD_TEMPLATE template <class F>
PK_HD void quantize_scan(Span s, uint32_t thread, F&& visit) {
  for (int64_t i = s.begin + thread; i < s.end; i += kThreads) visit(i);
}

// The packing pass: thread t packs the pairs (i, i + 1) from begin + 2t, + 2 kThreads, ... into byte i / 2; an odd
// n's last element pairs with a pad (i + 1 == n). Blocks start even, so only the last block can end odd.
PK_HD_TEMPLATE template <class F>
PK_HD void quantize_pairs(Span s, uint32_t thread, F&& visit) {
  for (int64_t i = s.begin + 2 * int64_t(thread); i < s.end; i += 2 * kThreads) visit(i);
}

// ---- nf4_quantize_absmax_kernel: one CTA per nested block, one thread per absmax.
PK_HD Launch quantize_absmax_launch(int64_t blocks) {
  return blocks > 0 ? checked({cdiv(blocks, kThreads), -1, -1}) : Launch{0, -1, -1};
}

// ---- nf4_dequantize_kernel: thread t decodes packed byte t, elements 2t and 2t + 1 (those < n).
// nested: absmax double-quantized in blocks of nested_blocksize (ignored otherwise).
PK_HD Launch dequantize_launch(int64_t n, int64_t blocksize, bool nested, int64_t nested_blocksize) {
  const int s = log2_blocksize(blocksize), s2 = nested ? log2_blocksize(nested_blocksize) : -1;
  return n > 0 && s > 0 && (!nested || s2 > 0) ? checked({cdiv(cdiv(n, 2), kThreads), s, s2}) : Launch{0, -1, -1};
}

PK_HD_TEMPLATE template <class F>
PK_HD void dequantize_thread(uint32_t block, uint32_t thread, int64_t n, F&& visit) {
  const int64_t t = global_thread(block, thread);
  for (int64_t i = 2 * t; i < 2 * t + 2 && i < n; ++i) visit(t, i);
}

// ---- nf4_gemv_kernel: warp w computes out[m, c], w = m C + c; its lane l sums k = l, l + 32, ... < K.
struct GemvWarp {
  int64_t m, c;
  int lane;
};

PK_HD Launch gemv_launch(int64_t M, int64_t C, int64_t K, int64_t blocksize) {
  const int s = log2_blocksize(blocksize);
  return M > 0 && C > 0 && K > 0 && s > 0 ? checked({cdiv(M * C * kWarp, kThreads), s, -1}) : Launch{0, -1, -1};
}

// false for the threads of the last CTA past the M C warps.
PK_HD bool gemv_warp(uint32_t block, uint32_t thread, int64_t M, int64_t C, GemvWarp* w) {
  const int64_t warp = global_thread(block, thread) / kWarp;
  if (warp >= M * C) return false;
  *w = {warp / C, warp % C, int(thread % kWarp)};
  return true;
}

// visit(k, i): i = c K + k, the flat index of W[c, k] in the packed weight.
PK_HD_TEMPLATE template <class F>
PK_HD void gemv_lane(const GemvWarp& w, int64_t K, F&& visit) {
  for (int64_t k = w.lane; k < K; k += kWarp) visit(k, w.c * K + k);
}

PK_HD int64_t gemv_x_offset(const GemvWarp& w, int64_t stride_xm, int64_t k) { return w.m * stride_xm + k; }
PK_HD int64_t gemv_out_offset(const GemvWarp& w, int64_t C) { return w.m * C + w.c; }

// ---- sparse_scatter_add_kernel / sparse_gather_kernel: one thread per (index, value) entry.
PK_HD Launch sparse_launch(int64_t nnz) { return nnz > 0 ? checked({cdiv(nnz, kThreads), -1, -1}) : Launch{0, -1, -1}; }

}  // namespace index
}  // namespace peftkern
