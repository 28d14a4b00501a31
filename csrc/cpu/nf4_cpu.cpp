// NF4 quantize / dequantize on the CPU (peftkern/ops/nf4/README.md has the math), bit-exact with bitsandbytes.
// Plain C++ with OpenMP over blocks, extern "C" entry points called through ctypes (peftkern/_cpu_lib.py).
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "token.h"

namespace {

using namespace peftkern::token;  // the fp16 / bf16 conversions

template <int DT> inline float load(const void* p, int64_t i) {
  if (DT == 0) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return DT == 1 ? fp16_to_float(h) : bf16_to_float(h);
}

constexpr int64_t kMaxBlock = 4096;

// One block of at most kMaxBlock elements: its absmax, and its codes packed two per byte.
template <int DT>
void quantize_block(const void* w, int64_t start, int64_t len, const float* mids, uint8_t* packed,
                    float* absmax_out) {
  float x[kMaxBlock];
  uint8_t q[kMaxBlock + 1];
  float am = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < len; ++i) {
    x[i] = load<DT>(w, start + i);
    const float a = std::fabs(x[i]);
    finite &= a <= 3.4028234663852886e38f;  // false for Inf and NaN
    am = a > am ? a : am;
  }
  *absmax_out = finite ? am : NAN;  // the caller refuses a weight with a non-finite absmax
  const float inv = 1.0f / (am > 1e-38f ? am : 1e-38f);
  const int64_t padded = len + (len & 1);  // only the last block of an odd n is odd: its pad codes 0.0
  for (int64_t i = 0; i < padded; ++i) {
    float v = i < len ? x[i] * inv : 0.0f;
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    int idx = 0;
    for (int k = 0; k < 15; ++k) idx += v > mids[k];  // midpoints strictly below: ties go to the lower code
    q[i] = uint8_t(idx);
  }
  for (int64_t t = 0; t < padded / 2; ++t) packed[start / 2 + t] = uint8_t((q[2 * t] << 4) | q[2 * t + 1]);
}

template <int DT>
void quantize_all(const void* w, int64_t n, int64_t blocksize, const float* mids, uint8_t* packed, float* absmax) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t start = j * blocksize, len = start + blocksize < n ? blocksize : n - start;
    quantize_block<DT>(w, start, len, mids, packed, absmax + j);
  }
}

// The fp32 absmax of block j: stored, or decoded from the double-quantized state in two roundings.
struct BlockScale {
  const float* absmax;  // null with double quantization
  const uint8_t* qabsmax;
  const float* absmax2;
  const float* code8;
  float offset;
  int64_t nested_blocksize;

  float operator()(int64_t j) const {
    if (absmax) return absmax[j];
    volatile float scaled = code8[qabsmax[j]] * absmax2[j / nested_blocksize];  // rounded before the offset is added
    return scaled + offset;
  }
};

// 16-bit outputs of packed bytes [t0, t1) from a 16-entry table: two outputs per byte, element 2t in the low half.
void lookup16_scalar(const uint8_t* packed, int64_t t0, int64_t t1, const uint16_t* table, uint16_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t b = packed[t];
    const uint32_t pair = uint32_t(table[b >> 4]) | (uint32_t(table[b & 0xF]) << 16);
    std::memcpy(out + 2 * t, &pair, 4);
  }
}

#if defined(__x86_64__)
// The same with SSSE3 byte shuffles: the table split into its low and high bytes, 32 outputs per 16 packed bytes.
__attribute__((target("ssse3"))) void lookup16_ssse3(const uint8_t* packed, int64_t t0, int64_t t1,
                                                     const uint16_t* table, uint16_t* out) {
  alignas(16) uint8_t lo_bytes[16], hi_bytes[16];
  for (int k = 0; k < 16; ++k) lo_bytes[k] = uint8_t(table[k]), hi_bytes[k] = uint8_t(table[k] >> 8);
  const __m128i lo_t = _mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes));
  const __m128i hi_t = _mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  int64_t t = t0;
  for (; t + 16 <= t1; t += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + t));
    const __m128i even = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);  // high nibbles: elements 2t
    const __m128i odd = _mm_and_si128(b, nibble);                       // low nibbles: elements 2t + 1
    const __m128i idx[2] = {_mm_unpacklo_epi8(even, odd), _mm_unpackhi_epi8(even, odd)};  // element order
    for (int h = 0; h < 2; ++h) {
      const __m128i lo = _mm_shuffle_epi8(lo_t, idx[h]), hi = _mm_shuffle_epi8(hi_t, idx[h]);
      __m128i* dst = reinterpret_cast<__m128i*>(out + 2 * t + 16 * h);
      _mm_storeu_si128(dst, _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi8(lo, hi));
    }
  }
  if (t < t1) lookup16_scalar(packed, t, t1, table, out);
}

// AVX2: the same shuffles on 32 packed bytes (64 outputs) per step; vpshufb works per 128-bit lane, so the table is
// broadcast to both lanes and the interleaves keep lane order (fixed up by the final permutes).
__attribute__((target("avx2"))) void lookup16_avx2(const uint8_t* packed, int64_t t0, int64_t t1,
                                                   const uint16_t* table, uint16_t* out) {
  alignas(16) uint8_t lo_bytes[16], hi_bytes[16];
  for (int k = 0; k < 16; ++k) lo_bytes[k] = uint8_t(table[k]), hi_bytes[k] = uint8_t(table[k] >> 8);
  const __m256i lo_t = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo_bytes)));
  const __m256i hi_t = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi_bytes)));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  int64_t t = t0;
  for (; t + 32 <= t1; t += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + t));
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    const __m256i odd = _mm256_and_si256(b, nibble);
    // per lane: idx_a = elements of bytes 0..7 of the lane, idx_b = bytes 8..15
    const __m256i idx_a = _mm256_unpacklo_epi8(even, odd), idx_b = _mm256_unpackhi_epi8(even, odd);
    const __m256i idx[2] = {idx_a, idx_b};
    __m256i v[4];
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_shuffle_epi8(lo_t, idx[h]), hi = _mm256_shuffle_epi8(hi_t, idx[h]);
      v[2 * h] = _mm256_unpacklo_epi8(lo, hi);      // lane L: outputs of bytes 8L+0..3 (h=0) / 8L+8..11 (h=1)
      v[2 * h + 1] = _mm256_unpackhi_epi8(lo, hi);  // lane L: bytes 8L+4..7 / 8L+12..15
    }
    // v[0] = (bytes 0-3 | 16-19), v[1] = (4-7 | 20-23), v[2] = (8-11 | 24-27), v[3] = (12-15 | 28-31)
    __m256i* dst = reinterpret_cast<__m256i*>(out + 2 * t);
    _mm256_storeu_si256(dst, _mm256_permute2x128_si256(v[0], v[1], 0x20));      // bytes 0-7
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(v[2], v[3], 0x20));  // bytes 8-15
    _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(v[0], v[1], 0x31));  // bytes 16-23
    _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(v[2], v[3], 0x31));  // bytes 24-31
  }
  if (t < t1) lookup16_ssse3(packed, t, t1, table, out);
}
#endif

// fp32 outputs of packed bytes [t0, t1) from a 16-entry table, element 2t first: out[2 (t - t0)] onwards.
void lookup32_scalar(const uint8_t* packed, int64_t t0, int64_t t1, const float* table, float* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t b = packed[t];
    out[2 * (t - t0)] = table[b >> 4];
    out[2 * (t - t0) + 1] = table[b & 0xF];
  }
}

#if defined(__x86_64__)
// AVX2: 4 bytes (8 outputs) a step; each byte's two nibbles in adjacent 32-bit lanes, looked up in the table's two
// 8-entry halves and blended on the index's bit 3.
__attribute__((target("avx2"))) void lookup32_avx2(const uint8_t* packed, int64_t t0, int64_t t1, const float* table,
                                                   float* out) {
  const __m256 lo_t = _mm256_loadu_ps(table), hi_t = _mm256_loadu_ps(table + 8);
  const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4), nibble = _mm256_set1_epi32(0xF);
  int64_t t = t0;
  for (; t + 4 <= t1; t += 4) {
    int32_t word;
    std::memcpy(&word, packed + t, 4);
    const __m128i b = _mm_cvtsi32_si128(word);
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts),
                                         nibble);
    const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_t, idx), _mm256_permutevar8x32_ps(hi_t, idx),
                                      _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    _mm256_storeu_ps(out + 2 * (t - t0), v);
  }
  lookup32_scalar(packed, t, t1, table, out + 2 * (t - t0));
}

// AVX-512: 8 bytes (16 outputs) a step, one 16-entry permute.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own avx512fintrin.h (_mm512_undefined_*)
__attribute__((target("avx512f"))) void lookup32_avx512(const uint8_t* packed, int64_t t0, int64_t t1,
                                                        const float* table, float* out) {
  const __m512 tab = _mm512_loadu_ps(table);
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i nibble = _mm512_set1_epi32(0xF);
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + t));
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts),
                                         nibble);
    _mm512_storeu_ps(out + 2 * (t - t0), _mm512_permutexvar_ps(idx, tab));
  }
  lookup32_scalar(packed, t, t1, table, out + 2 * (t - t0));
}

// dot(the decoded row, x) for a row of `in` elements starting at element e0, in % 16 == 0 (so every 16 elements from
// e0 lie in one block), the weight's dtype fp32 or bf16 and x's fp32 or the same: the values of decode_run and the
// sums of token::dot, 16 elements at a time straight from the packed bytes (no row buffer, one table a block).
__attribute__((target("avx512f"))) float row_dot_avx512(const uint8_t* packed, const BlockScale& scale,
                                                        const float* code, int64_t blocksize, int dtype, int64_t e0,
                                                        int64_t in, const float* x) {
  const __m512 codes = _mm512_loadu_ps(code);
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i nibble = _mm512_set1_epi32(0xF), round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i high = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  __m512 acc = _mm512_setzero_ps(), table = codes;
  int64_t j = e0 / blocksize, next = e0;  // next: the first element of the block after the table's
  for (int64_t i = 0; i < in; i += 16) {
    if (e0 + i >= next) {
      j = (e0 + i) / blocksize;
      next = (j + 1) * blocksize;
      table = _mm512_mul_ps(codes, _mm512_set1_ps(scale(j)));
      if (dtype == 2) {  // to bf16 and back: float_to_bf16's round to nearest even on the bits
        const __m512i bits = _mm512_castps_si512(table);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
        table = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(bits, round), lsb), high));
      }
    }
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + ((e0 + i) >> 1)));
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts),
                                         nibble);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_loadu_ps(x + i)));
  }
  float lanes[16];
  _mm512_storeu_ps(lanes, acc);
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}
#pragma GCC diagnostic pop
#endif

using Lookup32 = void (*)(const uint8_t*, int64_t, int64_t, const float*, float*);

// The widest lookup32 this CPU runs (the same outputs from each).
Lookup32 lookup32() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return lookup32_avx512;
  if (__builtin_cpu_supports("avx2")) return lookup32_avx2;
#endif
  return lookup32_scalar;
}

// out [n] 16-bit: each block's 16 possible values computed once, then looked up.
void dequantize_16bit(const uint8_t* packed, const BlockScale& scale, const float* code, int64_t n, int64_t blocksize,
                      uint16_t* out, int dtype) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#if defined(__x86_64__)
  const bool avx2 = __builtin_cpu_supports("avx2"), ssse3 = __builtin_cpu_supports("ssse3");
#endif
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < blocks; ++j) {
    const float am = scale(j);
    uint16_t table[16];
    for (int k = 0; k < 16; ++k) {
      const float v = code[k] * am;
      table[k] = dtype == 1 ? float_to_fp16(v) : float_to_bf16(v);
    }
    const int64_t start = j * blocksize, end = start + blocksize < n ? start + blocksize : n;
#if defined(__x86_64__)
    if (avx2) lookup16_avx2(packed, start / 2, end / 2, table, out);
    else if (ssse3) lookup16_ssse3(packed, start / 2, end / 2, table, out);
    else lookup16_scalar(packed, start / 2, end / 2, table, out);
#else
    lookup16_scalar(packed, start / 2, end / 2, table, out);
#endif
    if (end & 1) out[end - 1] = table[packed[end / 2] >> 4];
  }
}

void dequantize_fp32(const uint8_t* packed, const BlockScale& scale, const float* code, int64_t n, int64_t blocksize,
                     float* out) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < blocks; ++j) {
    const float am = scale(j);
    float table[16];
    for (int k = 0; k < 16; ++k) table[k] = code[k] * am;
    const int64_t start = j * blocksize, end = start + blocksize < n ? start + blocksize : n;
    for (int64_t t = start / 2; t < end / 2; ++t) {
      const uint8_t b = packed[t];
      out[2 * t] = table[b >> 4];
      out[2 * t + 1] = table[b & 0xF];
    }
    if (end & 1) out[end - 1] = table[packed[end / 2] >> 4];
  }
}

// A fresh multi-MiB output costs more in page faults than in decoding: ask Linux for 2 MiB pages where the range
// allows (advice only; a no-op elsewhere or where transparent huge pages are off).
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20, a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (a + huge - 1) & ~(huge - 1), last = (a + uintptr_t(bytes)) & ~(huge - 1);
  if (bytes >= int64_t(8) << 20 && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

// w [n] fp32: elements [e0, e0 + n) of the weight, each fp32(dtype(fp32(code[q] * absmax_j))) (the values the
// dequantized weight holds), cast to x's dtype xdtype as the torch path casts that weight, read back in fp32.
PK_INLINE void decode_run(const uint8_t* packed, const BlockScale& scale, const float* code, int64_t blocksize,
                          int dtype, int xdtype, Lookup32 lookup, int64_t e0, int64_t n, float* w) {
  for (int64_t e = e0, end = e0 + n; e < end;) {
    const int64_t j = e / blocksize, stop = (j + 1) * blocksize < end ? (j + 1) * blocksize : end;
    const float am = scale(j);
    float table[16];
    for (int k = 0; k < 16; ++k) table[k] = code[k] * am;
    if (dtype == 1)
      for (int k = 0; k < 16; ++k) table[k] = fp16_to_float(float_to_fp16(table[k]));
    else if (dtype == 2)
      for (int k = 0; k < 16; ++k) table[k] = bf16_to_float(float_to_bf16(table[k]));
    if (xdtype != 0 && xdtype != dtype)
      for (int k = 0; k < 16; ++k) table[k] = round_to(xdtype, table[k]);
    if (e & 1) w[e - e0] = table[packed[e >> 1] & 0xF], ++e;
    const int64_t pairs = (stop - e) / 2;
    lookup(packed, e >> 1, (e >> 1) + pairs, table, w + (e - e0));
    e += 2 * pairs;
    if (e < stop) w[e - e0] = table[packed[e >> 1] >> 4], ++e;
  }
}

}  // namespace

extern "C" {

// One token x [in] through an NF4 weight [out, in] (its state as pk_nf4_dequantize_cpu takes it, the weight's dtype
// as dtype) and a LoRA term (a null: none): y [out] = round(round(deq(W) x + bias) + scaling * B ((A x) *
// rank_scale)) (token.h's finish), h = A x where h is not null. x, bias and y in xdtype (0 fp32, 1 fp16, 2 bf16), the
// adapters fp32. The same sums, in the same order, as pk_lora_token over the dequantized weight cast to x's dtype;
// each row is decoded next to its dot product (no dequantized weight: 1/8 of its bytes are read). Rows are split over
// `threads` OpenMP threads from 2^18 elements. Returns 0 on success.
PK_CLONES int pk_nf4_token(const void* x, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                           const float* absmax2, const float* code8, float offset, int64_t nested_blocksize,
                           const float* code, int64_t blocksize, int dtype, int xdtype, const void* bias,
                           const float* a, const float* b, const float* rank_scale, float scaling, int64_t in,
                           int64_t out, int64_t r, int threads, void* y, float* h) {
  if (in < 0 || out < 0 || blocksize <= 0 || (blocksize & 1) || dtype < 0 || dtype > 2 || xdtype < 0 || xdtype > 2 ||
      (a && r < 1))
    return 1;
  if (!absmax && (!qabsmax || !absmax2 || !code8 || nested_blocksize <= 0)) return 1;
  const BlockScale scale{absmax, qabsmax, absmax2, code8, offset, nested_blocksize};
  std::vector<float> xbuf;
  const float* xf = as_f32(x, xdtype, in, xbuf);
  const std::vector<float> he = a ? shrink(xf, a, rank_scale, in, r, h) : std::vector<float>();
  const Lookup32 lookup = lookup32();
#if defined(__x86_64__)
  const bool fused = __builtin_cpu_supports("avx512f") && in % 16 == 0 && (dtype == 0 || dtype == 2) &&
                     (xdtype == 0 || xdtype == dtype);
#else
  const bool fused = false;
#endif
#pragma omp parallel num_threads(threads) if (threads > 1 && in * out >= (int64_t(1) << 18))
  {
    std::vector<float> w(fused ? 0 : in);
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
      float base;
#if defined(__x86_64__)
      if (fused) {
        base = row_dot_avx512(packed, scale, code, blocksize, dtype, o * in, in, xf);
      } else
#endif
      {
        decode_run(packed, scale, code, blocksize, dtype, xdtype, lookup, o * in, in, w.data());
        base = dot(w.data(), xf, in);
      }
      finish_row(o, base, bias, b, a ? he.data() : nullptr, scaling, r, xdtype, y);
    }
  }
  return 0;
}

// packed [ceil(n/2)] (high nibble first, an odd n pads code 7), absmax [ceil(n/blocksize)]; returns 0 on success.
int pk_nf4_quantize_cpu(const void* w, int dtype, int64_t n, int64_t blocksize, const float* code, uint8_t* packed,
                        float* absmax) {
  if (n <= 0 || blocksize <= 0 || blocksize > kMaxBlock || (blocksize & 1) || dtype < 0 || dtype > 2) return 1;
  float mids[15];
  for (int k = 0; k < 15; ++k) mids[k] = (code[k] + code[k + 1]) / 2.0f;
  if (dtype == 0) quantize_all<0>(w, n, blocksize, mids, packed, absmax);
  else if (dtype == 1) quantize_all<1>(w, n, blocksize, mids, packed, absmax);
  else quantize_all<2>(w, n, blocksize, mids, packed, absmax);
  return 0;
}

// out [n] in dtype = dtype(fp32(code[q_i] * absmax_j)), j = i / blocksize; absmax_j is absmax[j], or with absmax
// null fp32(code8[qabsmax[j]] * absmax2[j / nested_blocksize]) + offset. Returns 0 on success.
int pk_nf4_dequantize_cpu(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                          const float* code8, float offset, int64_t nested_blocksize, const float* code, int64_t n,
                          int64_t blocksize, void* out, int dtype) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1) || dtype < 0 || dtype > 2) return 1;
  if (!absmax && (!qabsmax || !absmax2 || !code8 || nested_blocksize <= 0)) return 1;
  const BlockScale scale{absmax, qabsmax, absmax2, code8, offset, nested_blocksize};
  advise_huge_pages(out, n * (dtype == 0 ? 4 : 2));
  if (dtype == 0) dequantize_fp32(packed, scale, code, n, blocksize, static_cast<float*>(out));
  else dequantize_16bit(packed, scale, code, n, blocksize, static_cast<uint16_t*>(out), dtype);
  return 0;
}

}  // extern "C"
