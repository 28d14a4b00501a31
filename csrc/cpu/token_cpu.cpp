// One token (decode) through a frozen linear layer and its PEFT term, fp32, in one call: the LoRA and sparse-diff
// forwards of peftkern/ops/lora and peftkern/ops/sparse (their README.md has the math) where x is a single row.
// Why: at decode sizes a torch op costs ~2-3 us of dispatch before its arithmetic and such a layer needs three to
// five of them; this is one ctypes call (peftkern/_native.py). Single-threaded: the torch paths take larger weights.
// Sums run in a fixed order on any x86-64 (16 partial sums a dot product, no FMA contraction): the same bits from
// every clone below (token.h).
#include "token.h"

namespace {

using peftkern::token::dot;

// y [out] = W x + bias; W [out, in] row-major, or stored [in, out] (a transformers Conv1D's weight) when in_major.
PK_INLINE void base(const float* x, const float* w, bool in_major, const float* bias, int64_t in, int64_t out,
                    float* y) {
  if (in_major) {
    for (int64_t o = 0; o < out; ++o) y[o] = 0.f;
    for (int64_t i = 0; i < in; ++i) {
      const float xi = x[i];
      const float* row = w + i * out;
      for (int64_t o = 0; o < out; ++o) y[o] += xi * row[o];
    }
  } else {
    for (int64_t o = 0; o < out; ++o) y[o] = dot(w + o * in, x, in);
  }
  if (bias != nullptr)
    for (int64_t o = 0; o < out; ++o) y[o] += bias[o];
}

}  // namespace

extern "C" {

// LoRA: h [r] = A x; y [out] = (W x + bias) + scaling * (B (h * rank_scale)). A [r, in], B [out, r] row-major;
// bias, rank_scale and h (not wanted) may be null.
PK_CLONES int pk_lora_token_f32(const float* x, const float* w, int w_in_major, const float* bias, const float* a,
                                const float* b, const float* rank_scale, float scaling, int64_t in, int64_t out,
                                int64_t r, float* y, float* h) {
  if (in < 0 || out < 0 || r < 1) return 1;
  const std::vector<float> he = peftkern::token::shrink(x, a, rank_scale, in, r, h);
  base(x, w, w_in_major != 0, bias, in, out, y);
  peftkern::token::expand(b, he.data(), scaling, out, r, y);
  return 0;
}

// Sparse diff: y [out] = (W x + bias) + sum over row o's entries e of values[e] x[cols[e]], entries e in
// [row_bounds[o], row_bounds[o + 1]) in index order. bias may be null.
PK_CLONES int pk_sparse_token_f32(const float* x, const float* w, int w_in_major, const float* bias,
                                  const int32_t* row_bounds, const int32_t* cols, const float* values, int64_t in,
                                  int64_t out, float* y) {
  if (in < 0 || out < 0) return 1;
  base(x, w, w_in_major != 0, bias, in, out, y);
  for (int64_t o = 0; o < out; ++o) {
    float acc = y[o];
    for (int32_t e = row_bounds[o]; e < row_bounds[o + 1]; ++e) acc += values[e] * x[cols[e]];
    y[o] = acc;
  }
  return 0;
}

}  // extern "C"
