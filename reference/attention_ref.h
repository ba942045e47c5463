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

// Its gradients for an upstream gradient dout (B, T, H, d): dq (B, T, H, d), dk, dv (B, T, Hkv, d).
// With p_ij the softmax weights and dp_ij = dout_i . v_j:
//   dv_j = sum_{i>=j} p_ij dout_i,   ds_ij = p_ij (dp_ij - sum_l p_il dp_il),
//   dq_i = scale sum_{j<=i} ds_ij k_j,   dk_j = scale sum_{i>=j} ds_ij q_i,
// dk and dv summed over the H / Hkv query heads that share a kv head. Outputs are overwritten.
template <typename S>
void softmax_attention_backward(S* dq, S* dk, S* dv, const S* dout, const S* q, const S* k, const S* v, int B, int T,
                                int H, int Hkv, int d) {
  const int group = H / Hkv;
  const S scale = S(1) / std::sqrt(S(d));
  std::fill(dq, dq + (size_t)B * T * H * d, S(0));
  std::fill(dk, dk + (size_t)B * T * Hkv * d, S(0));
  std::fill(dv, dv + (size_t)B * T * Hkv * d, S(0));
  std::vector<S> p(T), dp(T);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      const int hk = h / group;
      for (int i = 0; i < T; i++) {
        const size_t qi_off = (((size_t)b * T + i) * H + h) * d;
        const S* qi = q + qi_off;
        const S* doi = dout + qi_off;
        S m = -INFINITY;
        for (int j = 0; j <= i; j++) {
          const S* kj = k + (((size_t)b * T + j) * Hkv + hk) * d;
          S acc = 0;
          for (int c = 0; c < d; c++) acc += qi[c] * kj[c];
          p[j] = acc * scale;
          m = std::max(m, p[j]);
        }
        S denom = 0;
        for (int j = 0; j <= i; j++) { p[j] = std::exp(p[j] - m); denom += p[j]; }
        S delta = 0;  // sum_j p_ij dp_ij
        for (int j = 0; j <= i; j++) {
          p[j] /= denom;
          const S* vj = v + (((size_t)b * T + j) * Hkv + hk) * d;
          S acc = 0;
          for (int c = 0; c < d; c++) acc += doi[c] * vj[c];
          dp[j] = acc;
          delta += p[j] * acc;
        }
        S* dqi = dq + qi_off;
        for (int j = 0; j <= i; j++) {
          const size_t kv_off = (((size_t)b * T + j) * Hkv + hk) * d;
          const S ds = p[j] * (dp[j] - delta);
          for (int c = 0; c < d; c++) {
            dqi[c] += scale * ds * k[kv_off + c];
            dk[kv_off + c] += scale * ds * qi[c];
            dv[kv_off + c] += p[j] * doi[c];
          }
        }
      }
    }
}

}  // namespace ref
