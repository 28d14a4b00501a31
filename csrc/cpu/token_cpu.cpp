// One token (decode) through a frozen linear layer and its PEFT term in one call: the LoRA and sparse-diff
// forwards of peftkern/ops/lora and peftkern/ops/sparse (their README.md has the math) where x is a single row.
// Why: at decode sizes a torch op costs ~2-3 us of dispatch before its arithmetic and such a layer needs three to
// five of them; this is one ctypes call (peftkern/_native.py). Single-threaded: the torch paths take larger weights.
// Sums run in a fixed order on any x86-64 (16 partial sums a dot product, no FMA contraction): the same bits from
// every clone below (token.h).
#include "token.h"

namespace {

using namespace peftkern::token;

// acc [out] = W x in fp32 sums: W [out, in] row-major, or stored [in, out] (a transformers Conv1D's weight) when
// in_major, in dtype (rows of a half weight converted one at a time); x fp32.
PK_INLINE void base(const float* x, const void* w, bool in_major, int dtype, int64_t in, int64_t out, float* acc) {
  if (in_major) {
    for (int64_t o = 0; o < out; ++o) acc[o] = 0.f;
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      if (dtype == 0) {
        const float* row = static_cast<const float*>(w) + i * out;
        for (int64_t o = 0; o < out; ++o) acc[o] += xi * row[o];
      } else {
        for (int64_t o = 0; o < out; ++o) acc[o] += xi * load(w, dtype, i * out + o);
      }
    }
    return;
  }
  std::vector<float> row;
  for (int64_t o = 0; o < out; ++o) {
    const float* wo = dtype == 0 ? static_cast<const float*>(w) + o * in : nullptr;
    if (wo == nullptr) {
      row.resize(in);
      for (int64_t i = 0; i < in; ++i) row[i] = load(w, dtype, o * in + i);
      wo = row.data();
    }
    acc[o] = dot(wo, x, in);
  }
}

}  // namespace

extern "C" {

// LoRA: h [r] = A x; y [out] = round(round(W x + bias) + scaling * (B (h * rank_scale))) (token.h's finish). x, W,
// bias and y in dtype (0 fp32, 1 fp16, 2 bf16); A [r, in], B [out, r], rank_scale and h fp32 (PEFT keeps adapters in
// fp32 over a half base); bias, rank_scale and h (not wanted) may be null.
PK_CLONES int pk_lora_token(const void* x, const void* w, int w_in_major, const void* bias, int dtype, const float* a,
                            const float* b, const float* rank_scale, float scaling, int64_t in, int64_t out,
                            int64_t r, void* y, float* h) {
  if (in < 0 || out < 0 || r < 1 || dtype < 0 || dtype > 2) return 1;
  std::vector<float> xbuf, buf(dtype == 0 ? 0 : out);
  float* acc = dtype == 0 ? static_cast<float*>(y) : buf.data();  // fp32: the sums in y itself, rounded in place
  const float* xf = as_f32(x, dtype, in, xbuf);
  const std::vector<float> he = shrink(xf, a, rank_scale, in, r, h);
  base(xf, w, w_in_major != 0, dtype, in, out, acc);
  finish(acc, bias, b, he.data(), scaling, out, r, dtype, y);
  return 0;
}

// Sparse diff: y [out] = round(round(W x + bias) + sum over row o's entries e of values[e] x[cols[e]]), entries e in
// [row_bounds[o], row_bounds[o + 1]) in index order, the sum in fp32 (the torch gather's roundings). x, W, bias and y
// in dtype (0 fp32, 1 fp16, 2 bf16), values fp32; bias may be null.
PK_CLONES int pk_sparse_token(const void* x, const void* w, int w_in_major, const void* bias, int dtype,
                              const int32_t* row_bounds, const int32_t* cols, const float* values, int64_t in,
                              int64_t out, void* y) {
  if (in < 0 || out < 0 || dtype < 0 || dtype > 2) return 1;
  std::vector<float> xbuf, buf(dtype == 0 ? 0 : out);
  float* acc = dtype == 0 ? static_cast<float*>(y) : buf.data();  // fp32: the sums in y itself, rounded in place
  const float* xf = as_f32(x, dtype, in, xbuf);
  base(xf, w, w_in_major != 0, dtype, in, out, acc);
  for (int64_t o = 0; o < out; ++o) {
    float v = round_to(dtype, bias != nullptr ? acc[o] + load(bias, dtype, o) : acc[o]);
    for (int32_t e = row_bounds[o]; e < row_bounds[o + 1]; ++e) v += values[e] * xf[cols[e]];
    store(y, dtype, o, v);
  }
  return 0;
}

}  // extern "C"
