// test/gpu_stage1.cu: one stage-1 micro-batch on the GPU (stage1.cuh: frozen model in bf16, teacher
// flash attention, hybrid attention with the fused MSE and its backward) against the CPU reference
// (reference/stage1_ref.h) on the tiny Hugging Face fixture models: the loss, every layer's MSE, and
// every feature-map and window-factor gradient.
#include <gtest/gtest.h>

#include "stage1.cuh"
#include "test/test_util.h"

namespace {

void check_stage1_step(const std::string& name, int geometry, int sinks) {
  const std::string path = build_dir() + "/fixtures/" + name + ".bin";
  if (!file_exists(path)) GTEST_SKIP() << path << " not built (run `make fixtures`)";
  const int B = 2, T = 200;  // four 64-token chunks, the last one partial: every region is exercised
  HostModel hm = load_host_model(path);
  for (float& w : hm.data) w = round_bf16(w);  // the GPU's weights are bf16: compare the arithmetic only
  Blas blas;
  blas.init();
  LlamaModel m = llama_load(path, T);
  LlamaActs a = llama_acts_alloc(m, B, T, 1);
  Stage1Config cfg;
  cfg.geometry = geometry;
  cfg.sinks = sinks;
  Stage1 s = stage1_create(cfg, m, B, T);
  std::vector<float> params = ref::stage1_perturbed_params(s.L, m.h.n_heads, m.h.head_dim, cfg.feature_dim, 21);
  adamw_set_params(&s.opt, params.data());
  adamw_write_bf16(&s.opt, s.params_bf16);
  adamw_zero_grad(&s.opt);
  Rng rng(22);
  std::vector<int> toks((size_t)B * T);
  for (int& t : toks) t = (int)(rng.next() % m.V());
  CUDA_CHECK(cudaMemcpy(a.tokens, toks.data(), toks.size() * 4, cudaMemcpyHostToDevice));
  // Each layer's own inputs as the GPU saw them (q, k, v and the teacher output, bf16), for a per-layer
  // check that leaves out the frozen model's drift between the GPU and the CPU (see below).
  const int H = m.h.n_heads, KV = m.h.n_kv_heads, d = m.h.head_dim, N = B * T;
  std::vector<std::vector<float>> lq(s.L), lk(s.L), lv(s.L), lyt(s.L);
  stage1_micro_batch(s, blas, m, a, true, 0, [&](int l) {
    lq[l] = download_bf16(a.q, (size_t)N * H * d);
    lk[l] = download_bf16(a.k, (size_t)N * KV * d);
    lv[l] = download_bf16(a.v, (size_t)N * KV * d);
    lyt[l] = download_bf16(a.att, (size_t)N * H * d);
  });
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> gpu_mse = stage1_take_layer_mse(s, 1, 0);
  std::vector<float> gpu_grad = download_f32(s.opt.grad, s.opt.n);

  ref::HybridDims dims;
  dims.f = cfg.feature_dim;
  dims.window = cfg.window;
  dims.geometry = geometry == HYBRID_SLIDING ? ref::HYBRID_REF_SLIDING : ref::HYBRID_REF_TERRACE;
  dims.sinks = sinks;
  const double gpu_loss = stage1_loss_of(gpu_mse, cfg.mse_factor);
  // The whole step against two oracles. (1) The issue's bound, 1e-2 on the loss, every layer's MSE and
  // every gradient tensor, against the oracle with the GPU's storage precision: the frozen model's
  // activations rounded to bf16 where llama.cuh stores them (ref::BF16_ALL). What remains is the
  // arithmetic (summation orders, the flash kernel's rounded probabilities, the hybrid kernels' f16/tf32
  // products). (2) The fp32 oracle: layer 0 at 1e-2; deeper layers see a hidden state with the bf16
  // drift, which the feature-map gradients amplify (measured up to 1.4e-2 at layer 2): 2e-2 there.
  for (const unsigned points : {(unsigned)ref::BF16_ALL, 0u}) {
    std::vector<float> ref_grad(params.size(), 0.f);
    ref::Stage1RefResult r =
        ref::stage1_forward_backward(hm, params, toks.data(), B, T, dims, cfg.mse_factor, &ref_grad, points);
    const char* oracle = points ? "bf16-storage oracle" : "fp32 oracle";
    EXPECT_NEAR(gpu_loss, r.loss, 1e-2 * std::fabs(r.loss)) << name << " " << oracle;
    double worst = 0;
    for (int l = 0; l < s.L; l++) {
      EXPECT_NEAR(gpu_mse[l], r.layer_mse[l], 1e-2 * r.layer_mse[l]) << name << " layer " << l << " " << oracle;
      const size_t base = s.per_layer * l;
      const char* tensor[3] = {"dWq", "dWk", "dw"};
      const size_t begin[3] = {0, s.hdf, 2 * s.hdf}, end[3] = {s.hdf, 2 * s.hdf, s.per_layer};
      for (int t = 0; t < 3; t++) {
        std::vector<float> g(gpu_grad.begin() + base + begin[t], gpu_grad.begin() + base + end[t]);
        std::vector<float> want(ref_grad.begin() + base + begin[t], ref_grad.begin() + base + end[t]);
        const double rel = rel_error(g, want);
        worst = std::max(worst, rel);
        EXPECT_LE(rel, points || l == 0 ? 1e-2 : 2e-2) << name << " layer " << l << " " << tensor[t] << " " << oracle;
      }
    }
    printf("  %s geometry %d sinks %d, %s: loss gpu %.6f ref %.6f, worst gradient rel err %.2e\n", name.c_str(),
           geometry, sinks, oracle, gpu_loss, r.loss, worst);
  }

  // Per layer on the GPU's own inputs: the oracle (reference/stage1_ref.h, stage1_layer) on the same bf16
  // q, k, v and teacher output. This is the stage-1 step's own arithmetic (hybrid forward, fused MSE,
  // backward), every layer at the issue's 1e-2.
  ref::HybridDims p = dims;
  p.B = B; p.T = T; p.H = H; p.Hkv = KV; p.d = d;
  double worst = 0;
  for (int l = 0; l < s.L; l++) {
    std::vector<float> g_l(s.per_layer, 0.f);
    const std::vector<double> qd(lq[l].begin(), lq[l].end()), kd(lk[l].begin(), lk[l].end()),
        vd(lv[l].begin(), lv[l].end()), yt(lyt[l].begin(), lyt[l].end());
    const double mse = ref::stage1_layer(p, params.data() + s.per_layer * l, qd, kd, vd, yt, cfg.mse_factor / s.L, g_l.data());
    EXPECT_NEAR(gpu_mse[l], mse, 1e-2 * mse) << name << " layer " << l << " (own inputs)";
    const size_t base = s.per_layer * l;
    const size_t begin[3] = {0, s.hdf, 2 * s.hdf}, end[3] = {s.hdf, 2 * s.hdf, 2 * s.hdf + (size_t)H};
    for (int t = 0; t < 3; t++) {
      std::vector<float> g(gpu_grad.begin() + base + begin[t], gpu_grad.begin() + base + end[t]);
      std::vector<float> want(g_l.begin() + begin[t], g_l.begin() + end[t]);
      const double rel = rel_error(g, want);
      worst = std::max(worst, rel);
      EXPECT_LE(rel, 1e-2) << name << " layer " << l << " tensor " << t << " (own inputs)";
    }
  }
  printf("  %s: per-layer gradients on the GPU's own inputs, worst rel err %.2e\n", name.c_str(), worst);
  stage1_destroy(s);
  llama_acts_free(a);
  llama_free(m);
  blas.destroy();
}

}  // namespace

TEST(GpuStage1, TerraceMatchesReferenceGqa) { check_stage1_step("hf_gqa_untied", HYBRID_TERRACE, 0); }
TEST(GpuStage1, SlidingWithSinksMatchesReference) { check_stage1_step("hf_tied_ropescaled", HYBRID_SLIDING, 4); }
TEST(GpuStage1, TerraceMatchesReferenceMha) { check_stage1_step("hf_mha", HYBRID_TERRACE, 0); }

// The hybrid attention on a second stream (Stage1Config::overlap, the default) computes the same bits
// as running everything on one stream: same kernels, same inputs, only the scheduling differs.
TEST(GpuStage1, OverlapGivesTheSameBits) {
  const std::string path = build_dir() + "/fixtures/hf_gqa_untied.bin";
  if (!file_exists(path)) GTEST_SKIP() << path << " not built (run `make fixtures`)";
  const int B = 2, T = 200;
  Blas blas;
  blas.init();
  LlamaModel m = llama_load(path, T);
  LlamaActs a = llama_acts_alloc(m, B, T, 1);
  Rng rng(23);
  std::vector<int> toks((size_t)B * T);
  for (int& t : toks) t = (int)(rng.next() % m.V());
  CUDA_CHECK(cudaMemcpy(a.tokens, toks.data(), toks.size() * 4, cudaMemcpyHostToDevice));
  std::vector<float> grads[2];
  std::vector<double> mse[2];
  for (int overlap = 0; overlap < 2; overlap++) {
    Stage1Config cfg;
    cfg.overlap = overlap != 0;
    Stage1 s = stage1_create(cfg, m, B, T);
    std::vector<float> params = ref::stage1_perturbed_params(s.L, m.h.n_heads, m.h.head_dim, cfg.feature_dim, 24);
    adamw_set_params(&s.opt, params.data());
    adamw_write_bf16(&s.opt, s.params_bf16);
    adamw_zero_grad(&s.opt);
    for (int rep = 0; rep < 2; rep++) stage1_micro_batch(s, blas, m, a, true, 0);  // accumulates twice
    CUDA_CHECK(cudaDeviceSynchronize());
    mse[overlap] = stage1_take_layer_mse(s, 2, 0);
    grads[overlap] = download_f32(s.opt.grad, s.opt.n);
    stage1_destroy(s);
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  EXPECT_EQ(0, memcmp(grads[0].data(), grads[1].data(), grads[0].size() * 4)) << "gradients differ with overlap";
  EXPECT_EQ(mse[0], mse[1]);
  for (float g : grads[1]) ASSERT_TRUE(std::isfinite(g));
  llama_acts_free(a);
  llama_free(m);
  blas.destroy();
}
