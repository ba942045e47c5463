/*
Error budget of bf16 activations (host-only analysis, no GPU): where does the CUDA forward's logits error
on a small real model come from? The CPU oracle (ref::llama_forward, reference/llama_ref.h) runs in fp32
on bf16-rounded weights, with the activations rounded to bf16 at a chosen subset of the points where the
CUDA forward stores them in bf16 (ref::Bf16Point); each row prints the logits' relative L2 error against
no rounding.

  make -C dev bf16_budget && dev/build/bf16_budget build/fixtures/stories260k.bin
  dev/build/bf16_budget build/fixtures/hf_gqa_untied.bin --stage1

--stage1: the same for one stage-1 step (reference/stage1_ref.h) with test/gpu_stage1.cu's inputs (B = 2,
T = 200, parameters stage1_perturbed_params(seed 21), tokens Rng(22), terrace): each row prints the worst
feature-map / window-factor gradient rel. error over the layers, and the loss's, against no rounding.

Same tokens as test/gpu_llama.cu's stories260K case (Rng(7), B = 2, T = 256). The CUDA forward also
rounds the attention probabilities (inside the flash kernel); that point is not modelled here.
*/
#include <cstring>

#include "reference/attention_ref.h"
#include "reference/llama_ref.h"
#include "reference/stage1_ref.h"
#include "test/test_util.h"

static const struct { const char* name; unsigned mask; } kRows[] = {
    {"norm outputs (xn)", ref::BF16_XN},          {"q|k|v projection", ref::BF16_QKV},
    {"q, k after RoPE", ref::BF16_ROPE},          {"attention output", ref::BF16_ATT},
    {"gate|up projection", ref::BF16_GATE_UP},    {"silu(gate) * up", ref::BF16_HMLP},
    {"final norm output", ref::BF16_FINAL},       {"all of the above", ref::BF16_ALL},
};

static void stage1_budget(const HostModel& m) {
  const int B = 2, T = 200, L = m.h.n_layers, H = m.h.n_heads, d = m.h.head_dim, f = 64;
  const std::vector<float> params = ref::stage1_perturbed_params(L, H, d, f, 21);
  Rng rng(22);
  std::vector<int> tokens((size_t)B * T);
  for (int& t : tokens) t = (int)(rng.next() % m.h.vocab_size);
  ref::HybridDims dims;
  dims.f = f;
  auto run = [&](unsigned points, std::vector<float>& grad) {
    grad.assign(params.size(), 0.f);
    return ref::stage1_forward_backward(m, params, tokens.data(), B, T, dims, 1000.0, &grad, points).loss;
  };
  std::vector<float> exact_grad, grad;
  const double exact_loss = run(0, exact_grad);
  const size_t per = ref::stage1_params_per_layer(H, d, f);
  printf("stage-1 step (%d layers): worst gradient rel. L2 error over the layers, loss rel. error; bf16 at:\n", L);
  for (const auto& r : kRows) {
    const double loss = run(r.mask, grad);
    double worst = 0;
    int worst_layer = 0;
    for (int l = 0; l < L; l++) {
      const std::vector<float> g(grad.begin() + per * l, grad.begin() + per * (l + 1));
      const std::vector<float> e(exact_grad.begin() + per * l, exact_grad.begin() + per * (l + 1));
      const double rel = rel_error(g, e);
      if (rel > worst) { worst = rel; worst_layer = l; }
    }
    printf("  %-22s %.2e (layer %d)  loss %.2e\n", r.name, worst, worst_layer, std::fabs(loss - exact_loss) / exact_loss);
  }
}

int main(int argc, char** argv) {
  if (argc < 2 || (argc > 2 && strcmp(argv[2], "--stage1") != 0)) fatal("usage: bf16_budget MODEL.bin [--stage1]");
  HostModel m = load_host_model(argv[1]);
  for (float& w : m.data) w = round_bf16(w);  // the GPU's weights
  if (argc > 2) {
    stage1_budget(m);
    return 0;
  }
  const int B = 2, T = std::min<int>(256, m.h.max_seq_len);
  Rng rng(7);
  std::vector<int> tokens((size_t)B * T);
  for (int& t : tokens) t = (int)(rng.next() % m.h.vocab_size);
  auto logits = [&](unsigned points) {
    std::vector<float> out;
    ref::llama_forward(m, tokens.data(), B, T, out, points);
    return out;
  };
  const std::vector<float> exact = logits(0);
  printf("logits rel. L2 error vs fp32 activations, bf16 rounding at:\n");
  for (const auto& r : kRows) printf("  %-22s %.2e\n", r.name, rel_error(logits(r.mask), exact));
  return 0;
}
