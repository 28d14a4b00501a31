// What the one-token (decode) kernels share (token_cpu.cpp, nf4_cpu.cpp): fp16 / bf16 conversions, a dot product summed
// in a fixed order, the LoRA term and the output's rounding. Sums run 16 partial sums a dot product with no FMA
// contraction (-ffp-contract=off), so every clone (AVX-512, AVX2, SSE2) and every x86-64 gives the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)  // ifunc: ELF and glibc
#define PK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_CLONES
#endif
#define PK_INLINE __attribute__((always_inline)) inline  // inlined into each clone, so compiled for its target

namespace peftkern::token {

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t b = float_to_bits(f);
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t float_to_fp16(float f) {  // round to nearest even (finite inputs; overflow gives inf)
  uint32_t b = float_to_bits(f), sign = (b >> 16) & 0x8000u;
  uint32_t a = b & 0x7FFFFFFFu;
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, the count of 2^-24 steps rounded to nearest even
    return uint16_t(sign | uint32_t(std::nearbyint(bits_to_float(a) * 16777216.0f)));  // the scale is exact
  }
  uint32_t r = a + 0x0FFFu + ((a >> 13) & 1u);  // round the 13 dropped mantissa bits
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16 (peftkern's _CPU_DTYPES).
inline float load(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == 1 ? fp16_to_float(h) : bf16_to_float(h);
}

// v rounded to dtype and back (NaN kept), and v stored in dtype.
inline float round_to(int dtype, float v) {
  if (dtype == 0 || v != v) return v;
  return dtype == 1 ? fp16_to_float(float_to_fp16(v)) : bf16_to_float(float_to_bf16(v));
}

inline void store(void* p, int dtype, int64_t i, float v) {
  if (dtype == 0) {
    static_cast<float*>(p)[i] = v;
    return;
  }
  const uint16_t nan = dtype == 1 ? 0x7E00u : 0x7FC0u;
  static_cast<uint16_t*>(p)[i] = v != v ? nan : (dtype == 1 ? float_to_fp16(v) : float_to_bf16(v));
}

// p [n] in dtype as fp32: p itself for fp32, else converted into buf.
inline const float* as_f32(const void* p, int dtype, int64_t n, std::vector<float>& buf) {
  if (dtype == 0) return static_cast<const float*>(p);
  buf.resize(n);
  for (int64_t i = 0; i < n; ++i) buf[i] = load(p, dtype, i);
  return buf.data();
}

constexpr int kLanes = 16;

PK_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// he [r] = (A x) * rank_scale, A [r, in] row-major; h = A x where h is not null; rank_scale may be null.
PK_INLINE std::vector<float> shrink(const float* x, const float* a, const float* rank_scale, int64_t in, int64_t r,
                                    float* h) {
  std::vector<float> he(r);
  for (int64_t k = 0; k < r; ++k) {
    const float hk = dot(a + k * in, x, in);
    if (h != nullptr) h[k] = hk;
    he[k] = rank_scale != nullptr ? hk * rank_scale[k] : hk;
  }
  return he;
}

// y [out] in dtype = round((round(base + bias) + scaling * B he)): the base GEMV's fp32 sums, rounded to x's dtype
// with its bias as a GEMM in that dtype rounds them, then the fp32 LoRA term (he null: none), rounded once.
// B [out, r] fp32 row-major; bias in dtype, may be null.
PK_INLINE void finish_row(int64_t o, float base, const void* bias, const float* b, const float* he, float scaling,
                          int64_t r, int dtype, void* y) {
  float v = round_to(dtype, bias != nullptr ? base + load(bias, dtype, o) : base);
  if (he != nullptr) v += scaling * dot(b + o * r, he, r);
  store(y, dtype, o, v);
}

PK_INLINE void finish(const float* base, const void* bias, const float* b, const float* he, float scaling, int64_t out,
                      int64_t r, int dtype, void* y) {
  for (int64_t o = 0; o < out; ++o) finish_row(o, base[o], bias, b, he, scaling, r, dtype, y);
}

}  // namespace peftkern::token
