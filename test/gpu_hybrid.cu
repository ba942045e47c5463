// test/gpu_hybrid.cu: the hybrid attention kernels (hybrid_attention.cuh) against the double CPU reference
// (reference/hybrid_ref.h) on fresh random inputs: forward, the stage-1 fused loss and its backward (dWq,
// dWk, dw), and the full backward (dq, dk, dv too), for T in {64, 100, 1024, 4096}, both geometries, sinks 0
// and 4, GQA 1 and 4, d 64 and 128 (the tensor-core path) plus odd shapes (the plain path); determinism,
// gradient accumulation and bad input.
//
// Tolerances (relative L2 error against fp64 on the same bf16-rounded inputs):
//  - forward 2e-3: storing y in bf16 alone costs ~1.7e-3 (rms relative rounding of bf16); the kernels add
//    ~3e-4 (f16 probabilities and features, tf32 state products, fp32 accumulation).
//  - gradients 1e-2: bf16 operands in the backward products (~2e-3 each) plus the forward's error.
//  - dw when no key reaches the linear part (terrace T <= 128, sliding T <= 64): exactly 0 in exact
//    arithmetic (gamma cancels), so its error is measured against 1e-3 * sum_i |dy_i| |y_i|, the scale of
//    the per-row terms (sum_j A_ij dA_ij = dy_i . (y^A_i - y_i) denA_i / den_i) whose rounding remains.
#include <gtest/gtest.h>
#include <omp.h>

#include "attention.cuh"
#include "reference/hybrid_ref.h"
#include "test/test_util.h"

namespace {

struct Case {
  int B, T, H, Hkv, d, f, geometry, sinks, seg_chunks;
  int impl = HYBRID_IMPL_AUTO;  // HYBRID_IMPL_TENSOR_V2: the version-2 kernels (d = 128 takes version 3 otherwise)
  HybridAttnParams params() const {
    HybridAttnParams p;
    p.B = B; p.T = T; p.H = H; p.Hkv = Hkv; p.d = d; p.f = f; p.geometry = geometry; p.sinks = sinks;
    p.seg_chunks = seg_chunks;
    p.impl = impl;
    return p;
  }
  std::string name() const {
    char buf[160];
    snprintf(buf, sizeof buf, "B=%d T=%d H=%d Hkv=%d d=%d f=%d %s sinks=%d seg=%d%s", B, T, H, Hkv, d, f,
             geometry == HYBRID_TERRACE ? "terrace" : "sliding", sinks, seg_chunks,
             impl == HYBRID_IMPL_TENSOR_V2 ? " v2" : "");
    return buf;
  }
  bool has_linear_region() const { return geometry == HYBRID_TERRACE ? T > 128 : T > 64; }
};

constexpr float kGradScale = 1000.0f / 32;  // the stage-1 loss factor of a 32-layer model

// Host copies of one problem: bf16 values and the same values in double for the reference.
struct Problem {
  Case c;
  std::vector<float> q, k, v, Wq, Wk, w, y_true;  // all bf16-rounded (w is fp32 on the GPU too)
  // reference results
  std::vector<double> y, dy, dq, dk, dv, dWq, dWk, dw;
  double mse = 0, dyy_scale = 0;  // dyy_scale: sum over rows of |dy_i| |y_i|
};

std::vector<float> bf16_randn(size_t n, double scale, Rng& rng) {
  std::vector<float> x(n);
  for (auto& e : x) e = round_bf16((float)(scale * rng.normal()));
  return x;
}

Problem make_problem(const Case& c, uint64_t seed) {
  Rng rng(seed);
  Problem P;
  P.c = c;
  const size_t nq = (size_t)c.B * c.T * c.H * c.d, nk = (size_t)c.B * c.T * c.Hkv * c.d, nW = (size_t)c.H * c.d * c.f;
  P.q = bf16_randn(nq, 1.0, rng);
  P.k = bf16_randn(nk, 1.0, rng);
  P.v = bf16_randn(nk, 1.0, rng);
  P.Wq = bf16_randn(nW, 0.5, rng);  // trained-looking maps (not the identity) so every weight matters
  P.Wk = bf16_randn(nW, 0.5, rng);
  P.y_true = bf16_randn(nq, 0.3, rng);
  P.w.resize(c.H);
  for (auto& e : P.w) e = (float)(-2.0 + 2.5 * rng.uniform());
  return P;
}

// The reference, one (b, h) slice per task, all tasks of all problems in one parallel loop (the CPU, not the
// GPU, bounds this test): forward, then dy = scale * dMSE/dy rounded to bf16, then the backward.
void run_reference(std::vector<Problem>& probs) {
  struct Task { int p, b, h; };
  std::vector<Task> tasks;
  for (int i = 0; i < (int)probs.size(); i++)
    for (int b = 0; b < probs[i].c.B; b++)
      for (int h = 0; h < probs[i].c.H; h++) tasks.push_back({i, b, h});
  for (auto& P : probs) {
    const Case& c = P.c;
    const size_t nq = (size_t)c.B * c.T * c.H * c.d, nk = (size_t)c.B * c.T * c.Hkv * c.d, nW = (size_t)c.H * c.d * c.f;
    P.y.assign(nq, 0); P.dy.assign(nq, 0); P.dq.assign(nq, 0); P.dk.assign(nk, 0); P.dv.assign(nk, 0);
    P.dWq.assign(nW, 0); P.dWk.assign(nW, 0); P.dw.assign(c.H, 0);
  }
  struct Slice {
    std::vector<double> q, k, v, Wq, Wk, w, y, dy, dq, dk, dv, dWq, dWk, dw;
  };
  std::vector<Slice> slices(tasks.size());
  auto gather = [&](const Task& tk, Slice& s) {
    const Case& c = probs[tk.p].c;
    const Problem& P = probs[tk.p];
    const int hk = tk.h / (c.H / c.Hkv);
    s.q.resize((size_t)c.T * c.d); s.k.resize(s.q.size()); s.v.resize(s.q.size());
    for (int t = 0; t < c.T; t++)
      for (int e = 0; e < c.d; e++) {
        s.q[(size_t)t * c.d + e] = P.q[(((size_t)tk.b * c.T + t) * c.H + tk.h) * c.d + e];
        s.k[(size_t)t * c.d + e] = P.k[(((size_t)tk.b * c.T + t) * c.Hkv + hk) * c.d + e];
        s.v[(size_t)t * c.d + e] = P.v[(((size_t)tk.b * c.T + t) * c.Hkv + hk) * c.d + e];
      }
    s.Wq.assign(P.Wq.begin() + (size_t)tk.h * c.d * c.f, P.Wq.begin() + (size_t)(tk.h + 1) * c.d * c.f);
    s.Wk.assign(P.Wk.begin() + (size_t)tk.h * c.d * c.f, P.Wk.begin() + (size_t)(tk.h + 1) * c.d * c.f);
    s.w.assign(1, P.w[tk.h]);
  };
  auto dims = [&](const Case& c) {
    ref::HybridDims p;
    p.B = 1; p.T = c.T; p.H = 1; p.Hkv = 1; p.d = c.d; p.f = c.f; p.window = 64; p.geometry = c.geometry; p.sinks = c.sinks;
    return p;
  };
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < (int)tasks.size(); i++) {
    Slice& s = slices[i];
    gather(tasks[i], s);
    s.y.resize(s.q.size());
    ref::hybrid_attention_forward(s.y.data(), s.q.data(), s.k.data(), s.v.data(), s.Wq.data(), s.Wk.data(), s.w.data(),
                                  dims(probs[tasks[i].p].c));
  }
  for (size_t i = 0; i < tasks.size(); i++) {  // scatter y
    const Case& c = probs[tasks[i].p].c;
    for (int t = 0; t < c.T; t++)
      for (int e = 0; e < c.d; e++)
        probs[tasks[i].p].y[(((size_t)tasks[i].b * c.T + t) * c.H + tasks[i].h) * c.d + e] = slices[i].y[(size_t)t * c.d + e];
  }
  for (auto& P : probs) {  // the stage-1 loss on the reference output; dy rounded as the GPU stores it
    std::vector<double> yt(P.y_true.begin(), P.y_true.end());
    P.mse = ref::hybrid_stage1_mse(P.dy.data(), P.y.data(), yt.data(), P.y.size(), (double)kGradScale);
    for (auto& e : P.dy) e = round_bf16((float)e);
    P.dyy_scale = 0;
    for (size_t r = 0; r < P.y.size() / P.c.d; r++) {
      double n1 = 0, n2 = 0;
      for (int e = 0; e < P.c.d; e++) { n1 += P.dy[r * P.c.d + e] * P.dy[r * P.c.d + e]; n2 += P.y[r * P.c.d + e] * P.y[r * P.c.d + e]; }
      P.dyy_scale += std::sqrt(n1 * n2);
    }
  }
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < (int)tasks.size(); i++) {
    Slice& s = slices[i];
    const Case& c = probs[tasks[i].p].c;
    s.dy.resize(s.q.size());
    for (int t = 0; t < c.T; t++)
      for (int e = 0; e < c.d; e++)
        s.dy[(size_t)t * c.d + e] = probs[tasks[i].p].dy[(((size_t)tasks[i].b * c.T + t) * c.H + tasks[i].h) * c.d + e];
    s.dq.resize(s.q.size()); s.dk.resize(s.q.size()); s.dv.resize(s.q.size());
    s.dWq.assign(s.Wq.size(), 0); s.dWk.assign(s.Wk.size(), 0); s.dw.assign(1, 0);
    ref::hybrid_attention_backward(s.dq.data(), s.dk.data(), s.dv.data(), s.dWq.data(), s.dWk.data(), s.dw.data(),
                                   s.dy.data(), s.q.data(), s.k.data(), s.v.data(), s.Wq.data(), s.Wk.data(), s.w.data(),
                                   dims(c));
  }
  for (size_t i = 0; i < tasks.size(); i++) {  // scatter / sum the slices (kv heads gather their query heads)
    Problem& P = probs[tasks[i].p];
    const Case& c = P.c;
    const Slice& s = slices[i];
    const int b = tasks[i].b, h = tasks[i].h, hk = h / (c.H / c.Hkv);
    for (int t = 0; t < c.T; t++)
      for (int e = 0; e < c.d; e++) {
        P.dq[(((size_t)b * c.T + t) * c.H + h) * c.d + e] = s.dq[(size_t)t * c.d + e];
        P.dk[(((size_t)b * c.T + t) * c.Hkv + hk) * c.d + e] += s.dk[(size_t)t * c.d + e];
        P.dv[(((size_t)b * c.T + t) * c.Hkv + hk) * c.d + e] += s.dv[(size_t)t * c.d + e];
      }
    for (size_t e = 0; e < s.dWq.size(); e++) {
      P.dWq[(size_t)h * c.d * c.f + e] += s.dWq[e];
      P.dWk[(size_t)h * c.d * c.f + e] += s.dWk[e];
    }
    P.dw[h] += s.dw[0];
  }
}

// Device buffers of one problem.
struct GpuProblem {
  HybridAttnParams p;
  size_t nq, nk, nW;
  bf16 *q, *k, *v, *Wq, *Wk, *y_true, *y, *dy, *dq, *dk, *dv;
  float *w, *dWq, *dWk, *dw, *mse;
  void *saved_mem, *ws;
  HybridAttnSaved saved;
  explicit GpuProblem(const Problem& P) : p(P.c.params()) {
    nq = (size_t)p.B * p.T * p.H * p.d; nk = (size_t)p.B * p.T * p.Hkv * p.d; nW = (size_t)p.H * p.d * p.f;
    q = cuda_alloc<bf16>(nq); k = cuda_alloc<bf16>(nk); v = cuda_alloc<bf16>(nk);
    Wq = cuda_alloc<bf16>(nW); Wk = cuda_alloc<bf16>(nW); y_true = cuda_alloc<bf16>(nq);
    y = cuda_alloc<bf16>(nq); dy = cuda_alloc<bf16>(nq); dq = cuda_alloc<bf16>(nq);
    dk = cuda_alloc<bf16>(nk); dv = cuda_alloc<bf16>(nk);
    w = cuda_alloc<float>(p.H); dWq = cuda_alloc<float>(nW); dWk = cuda_alloc<float>(nW); dw = cuda_alloc<float>(p.H);
    mse = cuda_alloc<float>(1);
    upload_bf16(q, P.q.data(), nq); upload_bf16(k, P.k.data(), nk); upload_bf16(v, P.v.data(), nk);
    upload_bf16(Wq, P.Wq.data(), nW); upload_bf16(Wk, P.Wk.data(), nW); upload_bf16(y_true, P.y_true.data(), nq);
    CUDA_CHECK(cudaMemcpy(w, P.w.data(), p.H * 4, cudaMemcpyHostToDevice));
    saved_mem = cuda_alloc<char>(hybrid_saved_bytes(p, true, true));
    saved = hybrid_saved_carve(saved_mem, p, true, true);
    ws = cuda_alloc<char>(hybrid_workspace_bytes(p));
  }
  ~GpuProblem() {
    for (void* x : {(void*)q, (void*)k, (void*)v, (void*)Wq, (void*)Wk, (void*)y_true, (void*)y, (void*)dy, (void*)dq,
                    (void*)dk, (void*)dv, (void*)w, (void*)dWq, (void*)dWk, (void*)dw, (void*)mse, saved_mem, ws})
      cuda_free(x);
  }
  HybridAttnWeights weights() const { return HybridAttnWeights{Wq, Wk, w}; }
  // Outputs start poisoned (NaN): an element the kernels do not write fails the comparison.
  void poison() {
    CUDA_CHECK(cudaMemset(y, 0xff, nq * 2));
    CUDA_CHECK(cudaMemset(dq, 0xff, nq * 2));
    CUDA_CHECK(cudaMemset(dk, 0xff, nk * 2));
    CUDA_CHECK(cudaMemset(dv, 0xff, nk * 2));
    CUDA_CHECK(cudaMemset(dWq, 0, nW * 4));  // accumulated (+=): HybridGpu.Stage1DeterministicAndAccumulates
    CUDA_CHECK(cudaMemset(dWk, 0, nW * 4));
    CUDA_CHECK(cudaMemset(dw, 0, p.H * 4));
    CUDA_CHECK(cudaMemset(mse, 0, 4));
  }
  std::vector<float> grad(const float* x, size_t n) { return download_f32(x, n); }
};

struct Errors {
  double y, mse, dWq, dWk, dw, dq = 0, dk = 0, dv = 0;
};

double dw_error(const std::vector<float>& got, const Problem& P) {
  double num = 0, den = 0;
  for (int h = 0; h < P.c.H; h++) {
    if (!std::isfinite(got[h])) return INFINITY;
    num += (got[h] - P.dw[h]) * (got[h] - P.dw[h]);
    den += P.dw[h] * P.dw[h];
  }
  den = std::sqrt(den);
  if (!P.c.has_linear_region()) den = std::max(den, 1e-3 * P.dyy_scale);
  return std::sqrt(num) / den;
}

// Stage 1: forward with the fused loss, backward without dy. Then the full backward: forward (saving y_lo),
// backward with dy (the reference's bf16 dy) and every gradient, twice: with room for the feature maps in
// `saved` (version 3 keeps them), and without (the backward recomputes them). Last, stage 2's backward: the
// maps and window factors frozen, so dq, dk, dv only, and no y_lo (delta from the bf16 output).
struct GpuErrors {
  Errors stage1, full, full_recomputed, input_grads;
};
GpuErrors run_gpu(const Problem& P) {
  GpuProblem G(P);
  Errors s1{}, s2{}, s3{}, s4{};
  G.poison();
  HybridStage1Loss loss{G.y_true, kGradScale, G.mse};
  hybrid_attention_forward(G.p, G.q, G.k, G.v, G.weights(), G.y, G.saved, G.ws, &loss, 0);
  HybridAttnGrads g1{G.dWq, G.dWk, G.dw, nullptr, nullptr, nullptr};
  hybrid_attention_backward(G.p, G.q, G.k, G.v, G.weights(), nullptr, nullptr, G.saved, G.ws, g1, 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  s1.y = rel_error(download_bf16(G.y, G.nq), P.y);
  float mse;
  CUDA_CHECK(cudaMemcpy(&mse, G.mse, 4, cudaMemcpyDeviceToHost));
  s1.mse = std::isfinite(mse) ? std::fabs(mse - P.mse) / P.mse : INFINITY;
  s1.dWq = rel_error(G.grad(G.dWq, G.nW), P.dWq);
  s1.dWk = rel_error(G.grad(G.dWk, G.nW), P.dWk);
  s1.dw = dw_error(G.grad(G.dw, G.p.H), P);

  std::vector<float> dyf(P.dy.begin(), P.dy.end());
  upload_bf16(G.dy, dyf.data(), G.nq);
  HybridAttnSaved no_maps = G.saved;
  no_maps.phi_q = nullptr;
  no_maps.phi_k = nullptr;
  for (const HybridAttnSaved* sv : {&G.saved, &no_maps}) {
    G.poison();
    hybrid_attention_forward(G.p, G.q, G.k, G.v, G.weights(), G.y, *sv, G.ws, nullptr, 0);
    HybridAttnGrads g2{G.dWq, G.dWk, G.dw, G.dq, G.dk, G.dv};
    hybrid_attention_backward(G.p, G.q, G.k, G.v, G.weights(), G.y, G.dy, *sv, G.ws, g2, 0);
    CUDA_CHECK(cudaDeviceSynchronize());
    Errors& e = sv == &G.saved ? s2 : s3;
    e.y = rel_error(download_bf16(G.y, G.nq), P.y);
    e.mse = 0;
    e.dWq = rel_error(G.grad(G.dWq, G.nW), P.dWq);
    e.dWk = rel_error(G.grad(G.dWk, G.nW), P.dWk);
    e.dw = dw_error(G.grad(G.dw, G.p.H), P);
    e.dq = rel_error(download_bf16(G.dq, G.nq), P.dq);
    e.dk = rel_error(download_bf16(G.dk, G.nk), P.dk);
    e.dv = rel_error(download_bf16(G.dv, G.nk), P.dv);
  }
  HybridAttnSaved no_ylo = G.saved;
  no_ylo.y_lo = nullptr;
  G.poison();
  hybrid_attention_forward(G.p, G.q, G.k, G.v, G.weights(), G.y, no_ylo, G.ws, nullptr, 0);
  HybridAttnGrads g4{nullptr, nullptr, nullptr, G.dq, G.dk, G.dv};
  hybrid_attention_backward(G.p, G.q, G.k, G.v, G.weights(), G.y, G.dy, no_ylo, G.ws, g4, 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  s4.y = rel_error(download_bf16(G.y, G.nq), P.y);
  s4.dq = rel_error(download_bf16(G.dq, G.nq), P.dq);
  s4.dk = rel_error(download_bf16(G.dk, G.nk), P.dk);
  s4.dv = rel_error(download_bf16(G.dv, G.nk), P.dv);
  return {s1, s2, s3, s4};
}

void check(const Problem& P, const Errors& e, bool full, const char* what = nullptr, bool weights = true) {
  const std::string n = P.c.name() + (what ? what : full ? " [full backward]" : " [stage 1]");
  EXPECT_LE(e.y, 2e-3) << n << ": forward";
  if (!full) EXPECT_LE(e.mse, 1e-3) << n << ": mse";
  if (weights) {
    EXPECT_LE(e.dWq, 1e-2) << n << ": dWq";
    EXPECT_LE(e.dWk, 1e-2) << n << ": dWk";
    EXPECT_LE(e.dw, 1e-2) << n << ": dw";
  }
  if (full) {
    EXPECT_LE(e.dq, 1e-2) << n << ": dq";
    EXPECT_LE(e.dk, 1e-2) << n << ": dk";
    EXPECT_LE(e.dv, 1e-2) << n << ": dv";
  }
  if (weights) printf("  %-72s y %.1e mse %.1e dWq %.1e dWk %.1e dw %.1e", n.c_str(), e.y, e.mse, e.dWq, e.dWk, e.dw);
  else printf("  %-72s y %.1e", n.c_str(), e.y);
  if (full) printf(" dq %.1e dk %.1e dv %.1e", e.dq, e.dk, e.dv);
  printf("\n");
}

void run_cases(const std::vector<Case>& cases, uint64_t seed) {
  std::vector<Problem> probs;
  for (size_t i = 0; i < cases.size(); i++) probs.push_back(make_problem(cases[i], seed + i));
  run_reference(probs);
  for (auto& P : probs) {
    const GpuErrors e = run_gpu(P);
    check(P, e.stage1, false);
    check(P, e.full, true);
    check(P, e.full_recomputed, true, " [full, maps recomputed]");
    check(P, e.input_grads, true, " [input grads only, no y_lo]", false);
  }
}

// The full product of geometry x sinks x GQA x head dim at one T (the tensor-core path: f = 64).
std::vector<Case> product(int T, int B, int seg_chunks_odd) {
  std::vector<Case> cases;
  for (int geometry : {HYBRID_TERRACE, HYBRID_SLIDING})
    for (int sinks : {0, 4})
      for (int group : {1, 4})
        for (int d : {64, 128}) {
          // GQA 1: 2 heads (1 at T = 4096); GQA 4: 4 query heads on one kv head. The sink cases take the
          // given segment length (an odd one exercises segment prefixes that do not divide the chunks).
          const int H = group == 1 ? (T >= 4096 ? 1 : 2) : 4, Hkv = H / group;
          cases.push_back({B, T, H, Hkv, d, 64, geometry, sinks, sinks ? seg_chunks_odd : 0});
        }
  return cases;
}

}  // namespace

TEST(HybridGpu, MatchesReferenceT64) { run_cases(product(64, 2, 0), 1000); }
TEST(HybridGpu, MatchesReferenceT100) { run_cases(product(100, 2, 0), 2000); }
TEST(HybridGpu, MatchesReferenceT1024) { run_cases(product(1024, 1, 5), 3000); }
// The sink cases at T = 4096 take 32-chunk segments (two of them, prefixes summed in four 8-chunk parts).
TEST(HybridGpu, MatchesReferenceT4096) { run_cases(product(4096, 1, 32), 4000); }
// GQA groups larger than the 8 heads whose key maps du_weights_kernel holds at once (Llama 3.1 405B: 128 query
// heads on 8 kv heads): dk's feature-map part is then summed in pieces.
TEST(HybridGpu, MatchesReferenceGroup16) {
  run_cases({{1, 100, 16, 1, 128, 64, HYBRID_TERRACE, 0, 0}, {1, 200, 32, 2, 128, 64, HYBRID_SLIDING, 4, 0}}, 4500);
}

// d = 128 runs the version-3 kernels above; the version-2 ones stay available (HYBRID_IMPL_TENSOR_V2, the
// kernel lab's comparison) and must stay correct: the d = 128 cases of T = 1024 on them.
TEST(HybridGpu, Version2MatchesReferenceT1024) {
  std::vector<Case> cases;
  for (Case c : product(1024, 1, 5))
    if (c.d == 128) {
      c.impl = HYBRID_IMPL_TENSOR_V2;
      cases.push_back(c);
    }
  run_cases(cases, 7000);
}

// On Hopper the version-3 kernels issue their main products as warpgroup MMA (every case above: the forward's
// window scores, p V and state products, the full backward's window kernels); the mma.sync code, which other
// GPUs run, must stay correct: the d = 128 cases of T = 100 and T = 1024 on it.
TEST(HybridGpu, MmaSyncPathMatchesReference) {
  std::vector<Case> cases;
  for (int T : {100, 1024})
    for (Case c : product(T, 1, 5))
      if (c.d == 128) cases.push_back(c);
  hybrid_detail::wgmma_off = true;
  run_cases(cases, 7500);
  hybrid_detail::wgmma_off = false;
}

// Shapes off the tensor-core path (d not 64/128, or f < 64) run the plain kernels; same function.
TEST(HybridGpu, PlainPathMatchesReference) {
  std::vector<Case> cases = {
      {2, 300, 4, 2, 32, 16, HYBRID_TERRACE, 0, 0}, {1, 200, 2, 1, 16, 8, HYBRID_SLIDING, 3, 0},
      {1, 150, 2, 2, 8, 5, HYBRID_SLIDING, 0, 0},   {1, 260, 4, 1, 128, 32, HYBRID_TERRACE, 2, 0},
      {1, 190, 2, 2, 64, 48, HYBRID_SLIDING, 4, 0},
  };
  run_cases(cases, 5000);
}

// Stage 1 must be reproducible bit for bit (the trainer's --resume relies on it): two identical backward
// passes give identical dWq, dWk, dw, and the accumulating buffers double.
TEST(HybridGpu, Stage1DeterministicAndAccumulates) {
  Case c{2, 1100, 4, 1, 128, 64, HYBRID_TERRACE, 0, 5};
  Problem P = make_problem(c, 6000);
  GpuProblem G(P);
  HybridStage1Loss loss{G.y_true, kGradScale, G.mse};
  std::vector<std::vector<float>> runs;
  for (int rep = 0; rep < 2; rep++) {
    CUDA_CHECK(cudaMemset(G.dWq, 0, G.nW * 4));
    CUDA_CHECK(cudaMemset(G.dWk, 0, G.nW * 4));
    CUDA_CHECK(cudaMemset(G.dw, 0, G.p.H * 4));
    CUDA_CHECK(cudaMemset(G.mse, 0, 4));
    HybridAttnGrads g{G.dWq, G.dWk, G.dw, nullptr, nullptr, nullptr};
    for (int acc = 0; acc < 2; acc++) {  // two micro-batches into the same buffers
      hybrid_attention_forward(G.p, G.q, G.k, G.v, G.weights(), G.y, G.saved, G.ws, &loss, 0);
      hybrid_attention_backward(G.p, G.q, G.k, G.v, G.weights(), nullptr, nullptr, G.saved, G.ws, g, 0);
      if (acc == 0) runs.push_back(download_f32(G.dWq, G.nW));
    }
    std::vector<float> all = download_f32(G.dWq, G.nW), wk = download_f32(G.dWk, G.nW), dw = download_f32(G.dw, G.p.H);
    all.insert(all.end(), wk.begin(), wk.end());
    all.insert(all.end(), dw.begin(), dw.end());
    float mse;
    CUDA_CHECK(cudaMemcpy(&mse, G.mse, 4, cudaMemcpyDeviceToHost));
    all.push_back(mse);
    runs.push_back(all);
  }
  ASSERT_EQ(runs[1].size(), runs[3].size());
  EXPECT_EQ(0, memcmp(runs[1].data(), runs[3].data(), runs[1].size() * 4)) << "stage-1 gradients differ between runs";
  // Accumulation: after two identical micro-batches dWq is twice the first one's.
  std::vector<double> twice(runs[0].begin(), runs[0].end());
  for (auto& e : twice) e *= 2;
  std::vector<float> acc(runs[1].begin(), runs[1].begin() + G.nW);
  EXPECT_LE(rel_error(acc, twice), 1e-6);
}

TEST(HybridGpu, BadInputIsOneLineError) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";  // the CUDA runtime has threads: re-exec, not fork
  HybridAttnParams p;
  p.window = 32;
  EXPECT_EXIT(hybrid_check_params(p), ::testing::ExitedWithCode(1), "error: hybrid attention: window 32 not supported");
  p = HybridAttnParams();
  p.H = 6; p.Hkv = 4;
  EXPECT_EXIT(hybrid_check_params(p), ::testing::ExitedWithCode(1), "error: hybrid attention: H=6 is not a multiple of Hkv=4");
  p = HybridAttnParams();
  p.sinks = 17;
  EXPECT_EXIT(hybrid_check_params(p), ::testing::ExitedWithCode(1), "error: hybrid attention: 17 sinks not in 0..16");
  // Weight gradients: both or neither (stage 2 asks for none), and stage 1 (no dy) needs them.
  p = HybridAttnParams();
  float dummy = 0.0f;
  const HybridAttnGrads only_q{&dummy, nullptr, nullptr, nullptr, nullptr, nullptr}, none{};
  EXPECT_EXIT(hybrid_attention_backward(p, nullptr, nullptr, nullptr, HybridAttnWeights{}, nullptr, nullptr, HybridAttnSaved{},
                                        nullptr, only_q, 0),
              ::testing::ExitedWithCode(1), "error: hybrid attention backward: give both dWq and dWk, or neither");
  EXPECT_EXIT(hybrid_attention_backward(p, nullptr, nullptr, nullptr, HybridAttnWeights{}, nullptr, nullptr, HybridAttnSaved{},
                                        nullptr, none, 0),
              ::testing::ExitedWithCode(1), "error: hybrid attention backward: the stage-1 backward needs dWq and dWk");
}
