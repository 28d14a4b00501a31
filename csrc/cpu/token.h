// What the one-token (decode) kernels share (token_cpu.cpp, nf4_cpu.cpp): a dot product summed in a fixed order and
// the LoRA term. Sums run 16 partial sums a dot product with no FMA contraction (-ffp-contract=off), so every clone
// (AVX-512, AVX2, SSE2) and every x86-64 gives the same bits.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)  // ifunc: ELF and glibc
#define PK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PK_CLONES
#endif
#define PK_INLINE __attribute__((always_inline)) inline  // inlined into each clone, so compiled for its target

namespace peftkern::token {

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

// y [out] += scaling * B he, B [out, r] row-major.
PK_INLINE void expand(const float* b, const float* he, float scaling, int64_t out, int64_t r, float* y) {
  for (int64_t o = 0; o < out; ++o) y[o] += scaling * dot(b + o * r, he, r);
}

}  // namespace peftkern::token
