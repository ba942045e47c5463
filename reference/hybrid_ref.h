// reference/hybrid_ref.h: CPU oracle for the LoLCATs hybrid attention (../shared/LOLCATS.md §1):
// the direct O(T^2) formula, its hand-derived backward, the stage-1 MSE and its gradient, and the
// identity initialisation of the feature maps. Plain loops, templated on the scalar type (double for
// finite-difference checks, float for model-level references). Every GPU kernel is checked against this.
//
// Per batch b, query head h (kv head h / (H / Hkv)), on post-RoPE q (B,T,H,d), k, v (B,T,Hkv,d):
//   phi_q(x) = [softmax(x Wq_h), softmax(-x Wq_h)] (2f entries, each clamped at >= 1e-12), phi_k with Wk_h
//   gamma_h  = sigmoid(w_h)
//   window(i): keys j <= i in the softmax part; linear(i): keys j <= i in the linear part (see below)
//   s_ij = q_i . k_j / sqrt(d);  m_i = max_{j in window(i)} s_ij
//   A_ij = gamma_h exp(s_ij - m_i) (window),  B_ij = phi_q(q_i) . phi_k(k_j) (linear)
//   y_i  = (sum_j A_ij v_j + sum_j B_ij v_j) / (sum_j A_ij + sum_j B_ij)   (no rescaling, no epsilon)
// Geometry, window w: terrace = chunks of w anchored at position 0; a query in chunk c sees chunk c-1 and
// the causal part of chunk c through softmax, chunks <= c-2 through the linear part. sliding = softmax
// over i-w < j <= i, linear over j <= i-w. Sinks: the first `sinks` positions are always softmax keys.
//
// Backward (derived by hand; y = num/den):
//   g_i = dy_i / den_i,  delta_i = dy_i . y_i / den_i
//   dA_ij = g_i . v_j - delta_i (window),  dB_ij = g_i . v_j - delta_i (linear)
//   dv_j += A_ij g_i + B_ij g_i
//   window: ds_ij = A_ij dA_ij, plus, because m_i is a real function of the scores here (the linear term is
//     not divided by exp(m_i)), at the arg max j*: ds_ij* += dm_i = -sum_j A_ij dA_ij.
//     dq_i += sum_j ds_ij k_j / sqrt(d), dk_j += ds_ij q_i / sqrt(d);
//     dw_h += (1 - gamma_h) sum_ij A_ij dA_ij  (d gamma / d w = gamma (1 - gamma), dA/dgamma = A/gamma)
//   linear: dphi_q_i += sum_j dB_ij phi_k_j, dphi_k_j += sum_i dB_ij phi_q_i
//   feature map, p = softmax(u), u = x W: du = p (dp - p.dp) for the + half, minus the same for the - half
//     (dp = dphi where p >= 1e-12, else 0); dx = W du, dW += x du^T.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ref {

enum HybridRefGeometry { HYBRID_REF_TERRACE = 0, HYBRID_REF_SLIDING = 1 };

struct HybridDims {
  int B = 1, T = 1, H = 1, Hkv = 1, d = 1, f = 1;
  int window = 64;                        // softmax window w (the chunk size for terrace)
  int geometry = HYBRID_REF_TERRACE;      // HYBRID_REF_TERRACE or HYBRID_REF_SLIDING
  int sinks = 0;                          // first `sinks` positions always in the softmax part
};

constexpr double kHedgehogClamp = 1e-12;  // the reference clamps feature values at this floor

// Which part of query i's attention key j belongs to: 0 none (j > i), 1 softmax window, 2 linear.
inline int hybrid_key_region(const HybridDims& p, int i, int j) {
  if (j > i) return 0;
  if (j < p.sinks) return 1;
  if (p.geometry == HYBRID_REF_TERRACE) return (j / p.window >= i / p.window - 1) ? 1 : 2;
  return (j > i - p.window) ? 1 : 2;
}

// Identity initialisation W = [I_f ; 0] per head: W[h][i][j] = (i == j). W is (H, d, f). For d < f only
// the first d columns get their diagonal one (the remaining columns start at zero).
template <typename S>
void hybrid_identity_init(S* W, int H, int d, int f) {
  for (int h = 0; h < H; h++)
    for (int i = 0; i < d; i++)
      for (int j = 0; j < f; j++) W[((size_t)h * d + i) * f + j] = (i == j) ? S(1) : S(0);
}

// Hedgehog feature map of one vector x (d) with W (d, f): phi (2f) and the two unclamped softmaxes
// p (2f, + half then - half) that the backward needs.
template <typename S>
void hedgehog_map(S* phi, S* p, const S* x, const S* W, int d, int f) {
  std::vector<S> u(f, S(0));
  for (int c = 0; c < d; c++)
    for (int j = 0; j < f; j++) u[j] += x[c] * W[(size_t)c * f + j];
  S umax = u[0], umin = u[0];
  for (int j = 1; j < f; j++) { umax = std::max(umax, u[j]); umin = std::min(umin, u[j]); }
  S sp = 0, sm = 0;
  for (int j = 0; j < f; j++) {
    p[j] = std::exp(u[j] - umax);
    p[f + j] = std::exp(umin - u[j]);
    sp += p[j];
    sm += p[f + j];
  }
  for (int j = 0; j < f; j++) { p[j] /= sp; p[f + j] /= sm; }
  for (int j = 0; j < 2 * f; j++) phi[j] = std::max(p[j], S(kHedgehogClamp));
}

// Backward of hedgehog_map: given dphi (2f), accumulate dx (d) and dW (d, f).
template <typename S>
void hedgehog_map_backward(S* dx, S* dW, const S* dphi, const S* p, const S* x, const S* W, int d, int f) {
  S dot_p = 0, dot_m = 0;
  std::vector<S> dp(2 * f);
  for (int j = 0; j < 2 * f; j++) dp[j] = (p[j] >= S(kHedgehogClamp)) ? dphi[j] : S(0);
  for (int j = 0; j < f; j++) { dot_p += p[j] * dp[j]; dot_m += p[f + j] * dp[f + j]; }
  std::vector<S> du(f);
  for (int j = 0; j < f; j++) du[j] = p[j] * (dp[j] - dot_p) - p[f + j] * (dp[f + j] - dot_m);
  for (int c = 0; c < d; c++)
    for (int j = 0; j < f; j++) {
      if (dx) dx[c] += W[(size_t)c * f + j] * du[j];
      dW[(size_t)c * f + j] += x[c] * du[j];
    }
}

inline double sigmoid_ref(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Forward. y (B,T,H,d); q (B,T,H,d); k, v (B,T,Hkv,d); Wq, Wk (H,d,f); wlogit (H): gamma_h = sigmoid(wlogit_h).
template <typename S>
void hybrid_attention_forward(S* y, const S* q, const S* k, const S* v, const S* Wq, const S* Wk,
                              const S* wlogit, const HybridDims& p) {
  const int B = p.B, T = p.T, H = p.H, Hkv = p.Hkv, d = p.d, f = p.f, group = H / Hkv;
  const S scale = S(1) / std::sqrt(S(d));
  std::vector<S> phik((size_t)T * 2 * f), phiq(2 * f), pbuf(2 * f), s(T);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      const int hk = h / group;
      const S gamma = S(sigmoid_ref((double)wlogit[h]));
      const S* Wqh = Wq + (size_t)h * d * f;
      const S* Wkh = Wk + (size_t)h * d * f;
      for (int j = 0; j < T; j++)
        hedgehog_map(&phik[(size_t)j * 2 * f], pbuf.data(), k + (((size_t)b * T + j) * Hkv + hk) * d, Wkh, d, f);
      for (int i = 0; i < T; i++) {
        const S* qi = q + (((size_t)b * T + i) * H + h) * d;
        hedgehog_map(phiq.data(), pbuf.data(), qi, Wqh, d, f);
        S m = -INFINITY;
        for (int j = 0; j <= i; j++) {
          if (hybrid_key_region(p, i, j) != 1) continue;
          const S* kj = k + (((size_t)b * T + j) * Hkv + hk) * d;
          S acc = 0;
          for (int c = 0; c < d; c++) acc += qi[c] * kj[c];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        S den = 0;
        S* yi = y + (((size_t)b * T + i) * H + h) * d;
        for (int c = 0; c < d; c++) yi[c] = 0;
        for (int j = 0; j <= i; j++) {
          const int region = hybrid_key_region(p, i, j);
          S wgt;
          if (region == 1) {
            wgt = gamma * std::exp(s[j] - m);
          } else {
            wgt = 0;
            for (int e = 0; e < 2 * f; e++) wgt += phiq[e] * phik[(size_t)j * 2 * f + e];
          }
          den += wgt;
          const S* vj = v + (((size_t)b * T + j) * Hkv + hk) * d;
          for (int c = 0; c < d; c++) yi[c] += wgt * vj[c];
        }
        for (int c = 0; c < d; c++) yi[c] /= den;
      }
    }
}

// Backward. Given dy (B,T,H,d): writes dq, dk, dv (each may be null: then skipped) and ACCUMULATES (+=)
// into dWq, dWk (H,d,f) and dw (H), the way the GPU API does (gradient accumulation over micro-batches).
template <typename S>
void hybrid_attention_backward(S* dq, S* dk, S* dv, S* dWq, S* dWk, S* dw, const S* dy, const S* q, const S* k,
                               const S* v, const S* Wq, const S* Wk, const S* wlogit, const HybridDims& p) {
  const int B = p.B, T = p.T, H = p.H, Hkv = p.Hkv, d = p.d, f = p.f, group = H / Hkv;
  const S scale = S(1) / std::sqrt(S(d));
  if (dq) std::fill(dq, dq + (size_t)B * T * H * d, S(0));
  if (dk) std::fill(dk, dk + (size_t)B * T * Hkv * d, S(0));
  if (dv) std::fill(dv, dv + (size_t)B * T * Hkv * d, S(0));
  const size_t F2 = 2 * (size_t)f;
  std::vector<S> phik(T * F2), pk(T * F2), dphik(T * F2), phiq(F2), pq(F2), dphiq(F2);
  std::vector<S> s(T), wgt(T), y(d), g(d), dqi(d);
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++) {
      const int hk = h / group;
      const S gamma = S(sigmoid_ref((double)wlogit[h]));
      const S* Wqh = Wq + (size_t)h * d * f;
      const S* Wkh = Wk + (size_t)h * d * f;
      auto krow = [&](int j) { return k + (((size_t)b * T + j) * Hkv + hk) * d; };
      auto vrow = [&](int j) { return v + (((size_t)b * T + j) * Hkv + hk) * d; };
      for (int j = 0; j < T; j++) hedgehog_map(&phik[j * F2], &pk[j * F2], krow(j), Wkh, d, f);
      std::fill(dphik.begin(), dphik.end(), S(0));
      for (int i = 0; i < T; i++) {
        const S* qi = q + (((size_t)b * T + i) * H + h) * d;
        const S* dyi = dy + (((size_t)b * T + i) * H + h) * d;
        hedgehog_map(phiq.data(), pq.data(), qi, Wqh, d, f);
        // Recompute the forward row: scores, max (and its arg max), weights, output.
        S m = -INFINITY;
        int jmax = -1;
        for (int j = 0; j <= i; j++) {
          if (hybrid_key_region(p, i, j) != 1) continue;
          S acc = 0;
          for (int c = 0; c < d; c++) acc += qi[c] * krow(j)[c];
          s[j] = acc * scale;
          if (s[j] > m) { m = s[j]; jmax = j; }
        }
        S den = 0;
        std::fill(y.begin(), y.end(), S(0));
        for (int j = 0; j <= i; j++) {
          if (hybrid_key_region(p, i, j) == 1) {
            wgt[j] = gamma * std::exp(s[j] - m);
          } else {
            wgt[j] = 0;
            for (size_t e = 0; e < F2; e++) wgt[j] += phiq[e] * phik[j * F2 + e];
          }
          den += wgt[j];
          for (int c = 0; c < d; c++) y[c] += wgt[j] * vrow(j)[c];
        }
        S delta = 0;
        for (int c = 0; c < d; c++) {
          y[c] /= den;
          g[c] = dyi[c] / den;
          delta += dyi[c] * y[c];
        }
        delta /= den;
        // Row backward.
        std::fill(dqi.begin(), dqi.end(), S(0));
        std::fill(dphiq.begin(), dphiq.end(), S(0));
        S sum_AdA = 0;
        for (int j = 0; j <= i; j++) {
          const int region = hybrid_key_region(p, i, j);
          S gv = 0;
          for (int c = 0; c < d; c++) gv += g[c] * vrow(j)[c];
          const S dwgt = gv - delta;  // dA_ij or dB_ij
          if (dv)
            for (int c = 0; c < d; c++) dv[(((size_t)b * T + j) * Hkv + hk) * d + c] += wgt[j] * g[c];
          if (region == 1) {
            const S ds = wgt[j] * dwgt;
            sum_AdA += ds;
            for (int c = 0; c < d; c++) dqi[c] += ds * scale * krow(j)[c];
            if (dk)
              for (int c = 0; c < d; c++) dk[(((size_t)b * T + j) * Hkv + hk) * d + c] += ds * scale * qi[c];
          } else {
            for (size_t e = 0; e < F2; e++) {
              dphiq[e] += dwgt * phik[j * F2 + e];
              dphik[j * F2 + e] += dwgt * phiq[e];
            }
          }
        }
        // The max: s_ij* moved by dm_i = -sum_j A dA.
        const S dm = -sum_AdA;
        for (int c = 0; c < d; c++) dqi[c] += dm * scale * krow(jmax)[c];
        if (dk)
          for (int c = 0; c < d; c++) dk[(((size_t)b * T + jmax) * Hkv + hk) * d + c] += dm * scale * qi[c];
        dw[h] += (S(1) - gamma) * sum_AdA;
        hedgehog_map_backward(dqi.data(), dWq + (size_t)h * d * f, dphiq.data(), pq.data(), qi, Wqh, d, f);
        if (dq)
          for (int c = 0; c < d; c++) dq[(((size_t)b * T + i) * H + h) * d + c] += dqi[c];
      }
      // Key feature maps: dphi_k accumulated over all queries of this head.
      std::vector<S> dkj(d);
      for (int j = 0; j < T; j++) {
        std::fill(dkj.begin(), dkj.end(), S(0));
        hedgehog_map_backward(dkj.data(), dWk + (size_t)h * d * f, &dphik[j * F2], &pk[j * F2], krow(j), Wkh, d, f);
        if (dk)
          for (int c = 0; c < d; c++) dk[(((size_t)b * T + j) * Hkv + hk) * d + c] += dkj[c];
      }
    }
}

// Stage-1 loss of one layer: returns MSE = mean over the n elements of (y_pred - y_true)^2 and, when dy
// is not null, writes dy = grad_scale * dMSE/dy_pred = grad_scale * 2 (y_pred - y_true) / n
// (grad_scale is the caller's loss factor, e.g. 1000 / n_layers).
template <typename S>
S hybrid_stage1_mse(S* dy, const S* y_pred, const S* y_true, size_t n, S grad_scale) {
  double sum = 0;
  for (size_t i = 0; i < n; i++) {
    const double e = (double)y_pred[i] - (double)y_true[i];
    sum += e * e;
    if (dy) dy[i] = S(grad_scale * S(2) * S(e) / S(n));
  }
  return S(sum / (double)n);
}

}  // namespace ref
