// reference/stage1_ref.h: the CPU oracle of one stage-1 (attention transfer) micro-batch: per layer,
// the teacher's softmax attention and the hybrid attention on the same q, k, v, the MSE between their
// per-head outputs (before o_proj), and the gradients of the feature maps and window factors. The
// teacher's output continues to the next layer, so no gradient crosses layers (../shared/LOLCATS.md §2).
//
// Trained parameters, one flat vector, per layer l at offset l * stage1_params_per_layer():
//   Wq (H, d, f) | Wk (H, d, f) | w (H) | zero padding to a multiple of 64 entries
// gamma_h = sigmoid(w_h), w_h initialised to logit(0.1). The padding keeps every layer's block 128-byte
// aligned in bf16 and fp32 (the kernels load the maps with 16-byte vectors); it is never read, its
// gradient is 0, so AdamW leaves it at 0. The GPU trainer uses the same layout (one AdamW buffer).
#pragma once
#include "reference/hybrid_ref.h"
#include "reference/llama_ref.h"

namespace ref {

constexpr double kWindowFactorInit = -2.1972245773362196;  // logit(0.1)

inline size_t stage1_params_per_layer(int H, int d, int f) { return (2 * (size_t)H * d * f + H + 63) / 64 * 64; }

// Identity-initialised feature maps and gamma = 0.1 for every layer.
inline std::vector<float> stage1_init_params(int L, int H, int d, int f) {
  const size_t per = stage1_params_per_layer(H, d, f);
  std::vector<float> p(per * L, 0.f);
  for (int l = 0; l < L; l++) {
    float* base = p.data() + per * l;
    hybrid_identity_init(base, H, d, f);
    hybrid_identity_init(base + (size_t)H * d * f, H, d, f);
    for (int h = 0; h < H; h++) base[2 * (size_t)H * d * f + h] = (float)kWindowFactorInit;
  }
  return p;
}

// Parameters away from the identity init (tests and error budgets): every entry of the maps moved by
// 0.3 N(0, 1) and rounded to bf16 (what the kernels read; the window logits stay fp32, as the kernels
// read them), so every gradient entry is exercised and a comparison sees only the activations' rounding.
inline std::vector<float> stage1_perturbed_params(int L, int H, int d, int f, uint64_t seed) {
  std::vector<float> p = stage1_init_params(L, H, d, f);
  const size_t per = stage1_params_per_layer(H, d, f), hdf = (size_t)H * d * f;
  Rng rng(seed);
  for (size_t i = 0; i < p.size(); i++) {
    const size_t j = i % per;
    if (j >= 2 * hdf + H) continue;  // layout padding: never read
    p[i] += (float)(0.3 * rng.normal());
    if (j < 2 * hdf) p[i] = round_bf16(p[i]);
  }
  return p;
}

struct Stage1RefResult {
  std::vector<double> layer_mse;  // (L) MSE of each layer
  double loss = 0;                // mse_factor * mean over layers
};

// One layer of stage 1 given its attention inputs: the hybrid attention on q (N, H, d), k, v (N, Hkv, d)
// with the layer's parameters `pl` (stage1_params_per_layer layout), the MSE against y_true (N, H, d)
// times `scale`, and, if grad_l is non-null, dloss/dparams ACCUMULATED into grad_l. Returns the MSE.
// p must carry the full shape (B, T, H, Hkv, d). All in double (the oracle).
inline double stage1_layer(const HybridDims& p, const float* pl, const std::vector<double>& qd,
                           const std::vector<double>& kd, const std::vector<double>& vd, const std::vector<double>& yt,
                           double scale, float* grad_l) {
  const int H = p.H;
  const size_t hdf = (size_t)H * p.d * p.f;
  std::vector<double> Wq(hdf), Wk(hdf), w(H), y(yt.size()), dy(yt.size());
  for (size_t i = 0; i < hdf; i++) { Wq[i] = pl[i]; Wk[i] = pl[hdf + i]; }
  for (int i = 0; i < H; i++) w[i] = pl[2 * hdf + i];
  hybrid_attention_forward(y.data(), qd.data(), kd.data(), vd.data(), Wq.data(), Wk.data(), w.data(), p);
  const double mse = hybrid_stage1_mse(grad_l ? dy.data() : (double*)nullptr, y.data(), yt.data(), y.size(), scale);
  if (grad_l) {
    std::vector<double> dWq(hdf, 0.0), dWk(hdf, 0.0), dw(H, 0.0);
    hybrid_attention_backward<double>(nullptr, nullptr, nullptr, dWq.data(), dWk.data(), dw.data(), dy.data(),
                                      qd.data(), kd.data(), vd.data(), Wq.data(), Wk.data(), w.data(), p);
    for (size_t i = 0; i < hdf; i++) { grad_l[i] += (float)dWq[i]; grad_l[hdf + i] += (float)dWk[i]; }
    for (int i = 0; i < H; i++) grad_l[2 * hdf + i] += (float)dw[i];
  }
  return mse;
}

// One micro-batch of stage 1 on tokens (B, T). If grad is non-null it ACCUMULATES (+=) dloss/dparams.
// All math in double for the hybrid part (the oracle), the frozen model in fp32; bf16_points (Bf16Point)
// rounds the frozen model's activations where the GPU stores them in bf16 (q, k, v and the teacher
// output included: the hybrid's inputs are then exactly representable in bf16, as on the GPU).
inline Stage1RefResult stage1_forward_backward(const HostModel& m, const std::vector<float>& params, const int* tokens,
                                               int B, int T, const HybridDims& dims_in, double mse_factor,
                                               std::vector<float>* grad, unsigned bf16_points = 0) {
  const ModelHeader& h = m.h;
  const int L = h.n_layers, H = h.n_heads, KV = h.n_kv_heads, d = h.head_dim, N = B * T;
  HybridDims p = dims_in;
  p.B = B; p.T = T; p.H = H; p.Hkv = KV; p.d = d;
  const size_t per = stage1_params_per_layer(H, d, p.f);
  std::vector<float> x((size_t)N * h.dim), y_true((size_t)N * H * d), cos_t, sin_t;
  rope_tables(h, T, cos_t, sin_t);
  embed_tokens(m, tokens, N, x.data());
  Stage1RefResult r;
  LayerQKV a;
  std::vector<double> qd, kd, vd, yt;
  const double scale = mse_factor / L;
  for (int l = 0; l < L; l++) {
    llama_layer_qkv(m, l, x.data(), B, T, cos_t, sin_t, a, bf16_points);
    softmax_attention_forward(y_true.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H, KV, d);
    round_bf16_if(y_true, bf16_points & BF16_ATT);
    qd.assign(a.q.begin(), a.q.end());
    kd.assign(a.k.begin(), a.k.end());
    vd.assign(a.v.begin(), a.v.end());
    yt.assign(y_true.begin(), y_true.end());
    const double mse = stage1_layer(p, params.data() + per * l, qd, kd, vd, yt, scale, grad ? grad->data() + per * l : nullptr);
    r.layer_mse.push_back(mse);
    r.loss += scale * mse;
    // The teacher's output goes on: the next layer sees the original model's hidden state.
    if (l + 1 < L) llama_layer_finish(m, l, y_true.data(), x.data(), B, T, bf16_points);
  }
  return r;
}

}  // namespace ref
