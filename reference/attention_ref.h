// reference/attention_ref.h: CPU oracle for attention. Plain loops, templated on the scalar type
// (double for finite-difference checks, float for model-level references).
// Tensor layout everywhere in the project: q, out (B, T, H, d); k, v (B, T, Hkv, d), row-major,
// i.e. exactly what the q/k/v projections produce; query head h reads kv head h / (H / Hkv).
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

namespace ref {

// Causal softmax attention (the teacher): out_i = sum_{j<=i} softmax_j(q_i.k_j / sqrt(d)) v_j.
// lse (B, H, T), optional: log sum_{j<=i} exp(q_i.k_j / sqrt(d)), what the backward needs.
template <typename S>
void softmax_attention_forward(S* out, const S* q, const S* k, const S* v, int B, int T, int H, int Hkv, int d,
                               S* lse = nullptr) {
  const int group = H / Hkv;
  const S scale = S(1) / std::sqrt(S(d));
  std::vector<S> s(T);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      const int hk = h / group;
      for (int i = 0; i < T; i++) {
        const S* qi = q + (((size_t)b * T + i) * H + h) * d;
        S m = -INFINITY;
        for (int j = 0; j <= i; j++) {
          const S* kj = k + (((size_t)b * T + j) * Hkv + hk) * d;
          S acc = 0;
          for (int c = 0; c < d; c++) acc += qi[c] * kj[c];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        S denom = 0;
        for (int j = 0; j <= i; j++) { s[j] = std::exp(s[j] - m); denom += s[j]; }
        if (lse) lse[((size_t)b * H + h) * T + i] = m + std::log(denom);
        S* oi = out + (((size_t)b * T + i) * H + h) * d;
        for (int c = 0; c < d; c++) oi[c] = 0;
        for (int j = 0; j <= i; j++) {
          const S* vj = v + (((size_t)b * T + j) * Hkv + hk) * d;
          const S p = s[j] / denom;
          for (int c = 0; c < d; c++) oi[c] += p * vj[c];
        }
      }
    }
}

}  // namespace ref
