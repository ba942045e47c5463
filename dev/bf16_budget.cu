/*
Error budget of bf16 activations (host-only analysis, no GPU): where does the CUDA forward's logits error
on a small real model come from? The CPU oracle's pieces (reference/llama_ref.h, attention_ref.h) run in
fp32 on bf16-rounded weights, with the activations rounded to bf16 at a chosen subset of the points where
the CUDA forward stores them in bf16; each row prints the logits' relative L2 error against no rounding.

  make -C dev bf16_budget && dev/build/bf16_budget build/fixtures/stories260k.bin

Same tokens as test/gpu_llama.cu's stories260K case (Rng(7), B = 2, T = 256). The CUDA forward also
rounds the attention probabilities (inside the flash kernel); that point is not modelled here.
*/
#include "reference/attention_ref.h"
#include "reference/llama_ref.h"
#include "test/test_util.h"

enum Point { XN = 1, QKV = 2, ROPE = 4, ATT = 8, GATE_UP = 16, HMLP = 32, FINAL = 64, ALL = 127 };

static void round_if(std::vector<float>& v, bool on) {
  if (on)
    for (float& x : v) x = round_bf16(x);
}

// Logits (N, V) of the forward with bf16 rounding at the points in `mask`.
static std::vector<float> forward(const HostModel& m, const std::vector<int>& tokens, int B, int T, unsigned mask) {
  const ModelHeader& h = m.h;
  const int N = B * T, D = h.dim, H = h.n_heads, KV = h.n_kv_heads, hd = h.head_dim, F = h.ffn_dim;
  std::vector<float> cos_t, sin_t;
  ref::rope_tables(h, T, cos_t, sin_t);
  std::vector<float> x((size_t)N * D), xn(x.size()), q((size_t)N * H * hd), k((size_t)N * KV * hd), v(k.size()),
      att(q.size()), tmp(x.size()), g((size_t)N * F), u(g.size());
  ref::embed_tokens(m, tokens.data(), N, x.data());
  for (uint32_t l = 0; l < h.n_layers; l++) {
    HostModel::Layer L = m.layer(l);
    ref::rmsnorm(xn.data(), x.data(), L.attn_norm, N, D, h.norm_eps);
    round_if(xn, mask & XN);
    ref::matmul(q.data(), xn.data(), L.wq, N, D, H * hd);
    ref::matmul(k.data(), xn.data(), L.wk, N, D, KV * hd);
    ref::matmul(v.data(), xn.data(), L.wv, N, D, KV * hd);
    for (auto* t : {&q, &k, &v}) round_if(*t, mask & QKV);
    ref::rope_apply(q.data(), B, T, H, hd, cos_t.data(), sin_t.data());
    ref::rope_apply(k.data(), B, T, KV, hd, cos_t.data(), sin_t.data());
    for (auto* t : {&q, &k}) round_if(*t, mask & ROPE);
    ref::softmax_attention_forward(att.data(), q.data(), k.data(), v.data(), B, T, H, KV, hd);
    round_if(att, mask & ATT);
    ref::matmul(tmp.data(), att.data(), L.wo, N, H * hd, D);
    for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
    ref::rmsnorm(xn.data(), x.data(), L.ffn_norm, N, D, h.norm_eps);
    round_if(xn, mask & XN);
    ref::matmul(g.data(), xn.data(), L.w_gate, N, D, F);
    ref::matmul(u.data(), xn.data(), L.w_up, N, D, F);
    round_if(g, mask & GATE_UP);
    round_if(u, mask & GATE_UP);
    for (size_t i = 0; i < g.size(); i++) g[i] = ref::silu(g[i]) * u[i];
    round_if(g, mask & HMLP);
    ref::matmul(tmp.data(), g.data(), L.w_down, N, F, D);
    for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
  }
  std::vector<float> logits((size_t)N * h.vocab_size);
  ref::rmsnorm(xn.data(), x.data(), m.fnorm(), N, D, h.norm_eps);
  round_if(xn, mask & FINAL);
  ref::matmul(logits.data(), xn.data(), m.lm(), N, D, h.vocab_size);
  return logits;
}

int main(int argc, char** argv) {
  if (argc < 2) fatal("usage: bf16_budget MODEL.bin");
  HostModel m = load_host_model(argv[1]);
  for (float& w : m.data) w = round_bf16(w);  // the GPU's weights
  const int B = 2, T = std::min<int>(256, m.h.max_seq_len);
  Rng rng(7);
  std::vector<int> tokens((size_t)B * T);
  for (int& t : tokens) t = (int)(rng.next() % m.h.vocab_size);
  const std::vector<float> exact = forward(m, tokens, B, T, 0);
  const struct { const char* name; unsigned mask; } rows[] = {
      {"norm outputs (xn)", XN},       {"q|k|v projection", QKV},     {"q, k after RoPE", ROPE},
      {"attention output", ATT},       {"gate|up projection", GATE_UP}, {"silu(gate) * up", HMLP},
      {"final norm output", FINAL},    {"all of the above", ALL},
  };
  printf("logits rel. L2 error vs fp32 activations, bf16 rounding at:\n");
  for (const auto& r : rows) printf("  %-22s %.2e\n", r.name, rel_error(forward(m, tokens, B, T, r.mask), exact));
  return 0;
}
