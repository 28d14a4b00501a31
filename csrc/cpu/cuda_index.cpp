// The CUDA launchers' index math (csrc/cuda/index_math.cuh) compiled by the host compiler, behind two extern "C"
// entry points the tests call through ctypes (tests/test_cuda_index.py): the launch a launcher makes of a problem,
// and a trace of the accesses of CTAs [first, last) of its grid, made by the kernels' own mapping functions. No data
// is touched, so the tests check grids of any size (past 2^31 elements) on a CPU without a GPU.
#include <cstdint>

#include "../cuda/index_math.cuh"

namespace {

namespace idx = peftkern::index;

enum Kernel { kQuantizeScan, kQuantizePairs, kQuantizeAbsmax, kDequantize, kGemv, kSparse };

// The problem p of each kernel: quantize scan / pairs [n, blocksize]; quantize absmax [blocks]; dequantize [n,
// blocksize, nested_blocksize] (0: absmax not double-quantized); gemv [M, C, K, blocksize, stride_xm]; sparse [nnz].
idx::Launch launch(int kernel, const int64_t* p) {
  switch (kernel) {
    case kQuantizeScan:
    case kQuantizePairs: return idx::quantize_launch(p[0], p[1]);
    case kQuantizeAbsmax: return idx::quantize_absmax_launch(p[0]);
    case kDequantize: return idx::dequantize_launch(p[0], p[1], p[2] != 0, p[2]);
    case kGemv: return idx::gemv_launch(p[0], p[1], p[2], p[3]);
    case kSparse: return idx::sparse_launch(p[0]);
    default: return {0, -1, -1};
  }
}

// block, thread, element, byte, nibble shift, scale, x offset / nested scale, out offset, code
constexpr int kFields = 9;

struct Recorder {
  int64_t* records;
  int64_t capacity, count;
  uint32_t block, thread;

  void operator()(int64_t element, int64_t byte = -1, int64_t shift = -1, int64_t scale = -1, int64_t a = -1,
                  int64_t b = -1, int64_t code = -1) {
    if (count < capacity) {
      const int64_t r[kFields] = {block, thread, element, byte, shift, scale, a, b, code};
      for (int f = 0; f < kFields; ++f) records[count * kFields + f] = r[f];
    }
    ++count;
  }
};

// The accesses of one thread, as its kernel makes them (csrc/cuda/nf4.cu, sparse.cu). With packed codes given, the
// code the dequantize / GEMV kernels read at an element, and the byte the quantize kernel packs of a pair's codes.
void trace_thread(int kernel, const int64_t* p, const idx::Launch& l, const uint8_t* packed, Recorder& rec) {
  const uint32_t block = rec.block, thread = rec.thread;
  switch (kernel) {
    case kQuantizeScan:
      idx::quantize_scan(idx::quantize_span(block, p[0], l.log2_bs), thread,
                         [&](int64_t i) { rec(i, -1, -1, idx::block_of(i, l.log2_bs)); });
      break;
    case kQuantizePairs:
      idx::quantize_pairs(idx::quantize_span(block, p[0], l.log2_bs), thread, [&](int64_t i) {
        const int64_t byte = idx::packed_byte(i);
        const int64_t code = packed ? idx::pack_pair(idx::nibble(packed[byte], i), idx::nibble(packed[byte], i + 1))
                                    : -1;
        rec(i, byte, idx::nibble_shift(i), idx::block_of(i, l.log2_bs), -1, -1, code);
      });
      break;
    case kQuantizeAbsmax: {
      const int64_t i = idx::global_thread(block, thread);
      if (i < p[0]) rec(i, -1, -1, -1, block);
      break;
    }
    case kDequantize:
      idx::dequantize_thread(block, thread, p[0], [&](int64_t t, int64_t i) {
        const int64_t scale = idx::block_of(i, l.log2_bs);
        rec(i, t, idx::nibble_shift(i), scale, p[2] ? idx::block_of(scale, l.log2_nested) : -1, -1,
            packed ? idx::nibble(packed[t], i) : -1);
      });
      break;
    case kGemv: {
      idx::GemvWarp w;
      if (!idx::gemv_warp(block, thread, p[0], p[1], &w)) break;
      idx::gemv_lane(w, p[2], [&](int64_t k, int64_t i) {
        const int64_t byte = idx::packed_byte(i);
        rec(i, byte, idx::nibble_shift(i), idx::block_of(i, l.log2_bs), idx::gemv_x_offset(w, p[4], k),
            idx::gemv_out_offset(w, p[1]), packed ? idx::nibble(packed[byte], i) : -1);
      });
      break;
    }
    case kSparse: {
      const int64_t e = idx::global_thread(block, thread);
      if (e < p[0]) rec(e);
      break;
    }
  }
}

}  // namespace

extern "C" {

// The grid the launcher of `kernel` launches for problem p (0: it refuses the problem), and the shifts it passes.
int64_t pk_cuda_index_launch(int kernel, const int64_t* p, int* log2_bs, int* log2_nested) {
  const idx::Launch l = launch(kernel, p);
  *log2_bs = l.log2_bs;
  *log2_nested = l.log2_nested;
  return l.grid;
}

// Records (kFields int64 each, at most capacity) of every access of the threads of CTAs [first, last); returns their
// count (more than capacity: call again with room for them), or -1 where the launcher refuses the problem or the
// CTAs are not in its grid. packed: the NF4 codes of the problem, or null.
int64_t pk_cuda_index_trace(int kernel, const int64_t* p, uint32_t first, uint32_t last, const uint8_t* packed,
                            int64_t* records, int64_t capacity) {
  const idx::Launch l = launch(kernel, p);
  if (!l.grid || first > last || last > l.grid) return -1;
  Recorder rec{records, capacity, 0, 0, 0};
  for (uint32_t block = first; block < last; ++block)
    for (uint32_t thread = 0; thread < uint32_t(idx::kThreads); ++thread) {
      rec.block = block, rec.thread = thread;
      trace_thread(kernel, p, l, packed, rec);
    }
  return rec.count;
}

}  // extern "C"
