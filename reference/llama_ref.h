// reference/llama_ref.h: the CPU oracle of the Llama forward pass: embedding, RMSNorm, RoPE
// (rotate-half layout, Llama 3.1 frequency scaling), GQA causal softmax attention, SwiGLU MLP, final
// norm, LM head and next-token cross-entropy. fp32 (or double) plain loops, OpenMP over rows.
// Every GPU kernel of the forward pass is tested against these functions; the stage-1 reference uses
// the per-layer pieces (llama_layer_qkv, llama_layer_finish) directly.
// Optionally (a mask of Bf16Point) the activations are rounded to bf16 where the CUDA forward stores them
// in bf16: the same math with the GPU's storage precision, for the error budget (dev/bf16_budget.cu) and
// for comparing whole multi-layer steps, where the frozen model's bf16 drift would otherwise dominate.
#pragma once
#include <cmath>
#include <vector>

#include "model_file.h"
#include "reference/attention_ref.h"

namespace ref {

// Inverse RoPE frequencies (head_dim/2 of them), with Llama 3.1 scaling when the header asks for it.
// Computed in double; Hugging Face computes them in fp32, which differs by < 1e-7 relative.
inline std::vector<double> rope_inv_freq(const ModelHeader& h) {
  const int half = h.head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; i++) inv[i] = 1.0 / std::pow((double)h.rope_theta, (2.0 * i) / h.head_dim);
  if (h.rope_scaling == ROPE_LLAMA3) {
    const double orig = h.rope_original_max_pos, factor = h.rope_factor;
    const double lo = h.rope_low_freq_factor, hi = h.rope_high_freq_factor;
    const double low_wavelen = orig / lo, high_wavelen = orig / hi;
    for (int i = 0; i < half; i++) {
      const double wavelen = 2.0 * M_PI / inv[i];
      if (wavelen < high_wavelen) continue;                       // high frequency: unchanged
      if (wavelen > low_wavelen) { inv[i] /= factor; continue; }  // low frequency: slowed by factor
      const double smooth = (orig / wavelen - lo) / (hi - lo);    // in between: interpolate
      inv[i] = (1.0 - smooth) * inv[i] / factor + smooth * inv[i];
    }
  }
  return inv;
}

// cos/sin tables (T, head_dim/2) for positions 0..T-1.
inline void rope_tables(const ModelHeader& h, int T, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  std::vector<double> inv = rope_inv_freq(h);
  const int half = h.head_dim / 2;
  cos_t.resize((size_t)T * half);
  sin_t.resize((size_t)T * half);
  for (int t = 0; t < T; t++)
    for (int i = 0; i < half; i++) {
      const double a = (double)t * inv[i];
      cos_t[(size_t)t * half + i] = (float)std::cos(a);
      sin_t[(size_t)t * half + i] = (float)std::sin(a);
    }
}

// out (N, D) = rmsnorm(x (N, D)) * w (D)
template <typename S>
void rmsnorm(S* out, const S* x, const float* w, int N, int D, float eps) {
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const S* xn = x + (size_t)n * D;
    double ss = 0;
    for (int i = 0; i < D; i++) ss += (double)xn[i] * xn[i];
    const S r = (S)(1.0 / std::sqrt(ss / D + eps));
    for (int i = 0; i < D; i++) out[(size_t)n * D + i] = xn[i] * r * (S)w[i];
  }
}

// out (N, O) = x (N, I) · W^T, W (O, I) as PyTorch stores linear weights.
template <typename S, typename W>
void matmul(S* out, const S* x, const W* w, int N, int I, int O) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int n = 0; n < N; n++)
    for (int o = 0; o < O; o++) {
      const S* xn = x + (size_t)n * I;
      const W* wo = w + (size_t)o * I;
      S acc = 0;
      for (int i = 0; i < I; i++) acc += xn[i] * (S)wo[i];
      out[(size_t)n * O + o] = acc;
    }
}

// Rotate-half RoPE in place on x (B, T, heads, hd): pairs (i, i + hd/2) rotate by angle t·inv_freq[i].
template <typename S>
void rope_apply(S* x, int B, int T, int heads, int hd, const float* cos_t, const float* sin_t) {
  const int half = hd / 2;
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int h = 0; h < heads; h++) {
        S* v = x + (((size_t)b * T + t) * heads + h) * hd;
        for (int i = 0; i < half; i++) {
          const S c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
          const S a = v[i], bb = v[i + half];
          v[i] = a * c - bb * s;
          v[i + half] = bb * c + a * s;
        }
      }
}

template <typename S>
inline S silu(S x) { return x / (S(1) + std::exp(-x)); }

// Where the CUDA forward (llama.cuh) stores activations in bf16. The residual stream is fp32 there and
// here. Not modelled: the attention probabilities the flash kernel rounds inside its tiles.
enum Bf16Point : unsigned {
  BF16_XN = 1,       // norm outputs (attention and MLP inputs)
  BF16_QKV = 2,      // the fused q|k|v projection
  BF16_ROPE = 4,     // q, k after RoPE (v is copied as is)
  BF16_ATT = 8,      // the attention output before o_proj
  BF16_GATE_UP = 16, // the gate|up projection
  BF16_HMLP = 32,    // silu(gate) * up
  BF16_FINAL = 64,   // the final norm output (LM head input)
  BF16_ALL = 127,
};
inline void round_bf16_if(std::vector<float>& v, bool on) {
  if (on)
    for (float& x : v) x = round_bf16(x);
}

// Per-layer activations of the reference forward, kept for stage-1 references and debugging.
struct LayerQKV {
  std::vector<float> xn;     // (B, T, D)  attn_norm(x)
  std::vector<float> q;      // (B, T, H, hd)  post-RoPE
  std::vector<float> k;      // (B, T, Hkv, hd) post-RoPE
  std::vector<float> v;      // (B, T, Hkv, hd)
};

// The attention input side of layer l: norm, projections, RoPE.
inline void llama_layer_qkv(const HostModel& m, int l, const float* x, int B, int T, const std::vector<float>& cos_t,
                            const std::vector<float>& sin_t, LayerQKV& out, unsigned bf16_points = 0) {
  const ModelHeader& h = m.h;
  const int N = B * T, D = h.dim, H = h.n_heads, KV = h.n_kv_heads, hd = h.head_dim;
  HostModel::Layer L = m.layer(l);
  out.xn.resize((size_t)N * D);
  out.q.resize((size_t)N * H * hd);
  out.k.resize((size_t)N * KV * hd);
  out.v.resize((size_t)N * KV * hd);
  rmsnorm(out.xn.data(), x, L.attn_norm, N, D, h.norm_eps);
  round_bf16_if(out.xn, bf16_points & BF16_XN);
  matmul(out.q.data(), out.xn.data(), L.wq, N, D, H * hd);
  matmul(out.k.data(), out.xn.data(), L.wk, N, D, KV * hd);
  matmul(out.v.data(), out.xn.data(), L.wv, N, D, KV * hd);
  for (auto* t : {&out.q, &out.k, &out.v}) round_bf16_if(*t, bf16_points & BF16_QKV);
  rope_apply(out.q.data(), B, T, H, hd, cos_t.data(), sin_t.data());
  rope_apply(out.k.data(), B, T, KV, hd, cos_t.data(), sin_t.data());
  for (auto* t : {&out.q, &out.k}) round_bf16_if(*t, bf16_points & BF16_ROPE);
}

// The rest of layer l given the per-head attention output att (B, T, H, hd): x += o_proj(att);
// x += down(silu(gate(norm(x))) * up(norm(x))). Updates x (B, T, D) in place. (att is taken as given:
// the caller rounds it for BF16_ATT.)
inline void llama_layer_finish(const HostModel& m, int l, const float* att, float* x, int B, int T,
                               unsigned bf16_points = 0) {
  const ModelHeader& h = m.h;
  const int N = B * T, D = h.dim, Q = h.n_heads * h.head_dim, F = h.ffn_dim;
  HostModel::Layer L = m.layer(l);
  std::vector<float> tmp((size_t)N * D), xn((size_t)N * D), g((size_t)N * F), u((size_t)N * F);
  matmul(tmp.data(), att, L.wo, N, Q, D);
  for (size_t i = 0; i < tmp.size(); i++) x[i] += tmp[i];
  rmsnorm(xn.data(), x, L.ffn_norm, N, D, h.norm_eps);
  round_bf16_if(xn, bf16_points & BF16_XN);
  matmul(g.data(), xn.data(), L.w_gate, N, D, F);
  matmul(u.data(), xn.data(), L.w_up, N, D, F);
  round_bf16_if(g, bf16_points & BF16_GATE_UP);
  round_bf16_if(u, bf16_points & BF16_GATE_UP);
  for (size_t i = 0; i < g.size(); i++) g[i] = silu(g[i]) * u[i];
  round_bf16_if(g, bf16_points & BF16_HMLP);
  matmul(tmp.data(), g.data(), L.w_down, N, F, D);
  for (size_t i = 0; i < tmp.size(); i++) x[i] += tmp[i];
}

inline void embed_tokens(const HostModel& m, const int* tokens, int N, float* x) {
  const int D = m.h.dim;
  for (int n = 0; n < N; n++) {
    if (tokens[n] < 0 || tokens[n] >= (int)m.h.vocab_size) fatal("token id %d outside the vocabulary", tokens[n]);
    memcpy(x + (size_t)n * D, m.embed() + (size_t)tokens[n] * D, D * sizeof(float));
  }
}

// Final norm + LM head: logits (N, V).
inline void lm_head(const HostModel& m, const float* x, int N, float* logits, unsigned bf16_points = 0) {
  std::vector<float> xn((size_t)N * m.h.dim);
  rmsnorm(xn.data(), x, m.fnorm(), N, m.h.dim, m.h.norm_eps);
  round_bf16_if(xn, bf16_points & BF16_FINAL);
  matmul(logits, xn.data(), m.lm(), N, m.h.dim, m.h.vocab_size);
}

// Mean next-token cross-entropy of logits (B, T, V) against tokens shifted by one, over the
// B*(T-1) positions that have a target (and, if mask is given, whose target mask is 1).
// Returns the summed NLL in *nll_sum and the count in *count when they are non-null.
inline double next_token_loss(const float* logits, const int* tokens, const unsigned char* target_mask, int B, int T,
                              int V, double* nll_sum = nullptr, long long* count = nullptr) {
  double total = 0;
  long long cnt = 0;
  for (int b = 0; b < B; b++)
    for (int t = 0; t + 1 < T; t++) {
      if (target_mask && !target_mask[(size_t)b * T + t + 1]) continue;
      const float* lg = logits + ((size_t)b * T + t) * V;
      double mx = -INFINITY;
      for (int i = 0; i < V; i++) mx = std::max(mx, (double)lg[i]);
      double se = 0;
      for (int i = 0; i < V; i++) se += std::exp((double)lg[i] - mx);
      total += std::log(se) + mx - lg[tokens[(size_t)b * T + t + 1]];
      cnt++;
    }
  if (nll_sum) *nll_sum = total;
  if (count) *count = cnt;
  return cnt ? total / cnt : 0.0;
}

// Whole forward: logits (B, T, V) for tokens (B, T). Returns the mean next-token loss.
inline double llama_forward(const HostModel& m, const int* tokens, int B, int T, std::vector<float>& logits,
                            unsigned bf16_points = 0) {
  const ModelHeader& h = m.h;
  if (T > (int)h.max_seq_len) fatal("sequence length %d exceeds the model's maximum %u", T, h.max_seq_len);
  const int N = B * T;
  std::vector<float> x((size_t)N * h.dim), att((size_t)N * h.n_heads * h.head_dim), cos_t, sin_t;
  rope_tables(h, T, cos_t, sin_t);
  embed_tokens(m, tokens, N, x.data());
  LayerQKV a;
  for (uint32_t l = 0; l < h.n_layers; l++) {
    llama_layer_qkv(m, l, x.data(), B, T, cos_t, sin_t, a, bf16_points);
    softmax_attention_forward(att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, h.n_heads, h.n_kv_heads, h.head_dim);
    round_bf16_if(att, bf16_points & BF16_ATT);
    llama_layer_finish(m, l, att.data(), x.data(), B, T, bf16_points);
  }
  logits.resize((size_t)N * h.vocab_size);
  lm_head(m, x.data(), N, logits.data(), bf16_points);
  return next_token_loss(logits.data(), tokens, nullptr, B, T, h.vocab_size);
}

}  // namespace ref
