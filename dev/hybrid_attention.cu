/*
Kernel lab for the LoLCATs hybrid attention (hybrid_attention.cuh): every version validated against the
CPU reference (reference/hybrid_ref.h, fp64) on fresh random inputs, then timed at Llama 3 8B shapes
(H = 32 query heads, 8 kv heads, d = 128, f = 64, B*T = 8192 tokens; B = 1 beyond T = 8192).

  make -C dev hybrid_attention
  dev/build/hybrid_attention            # all versions
  dev/build/hybrid_attention 2          # one version
  dev/build/hybrid_attention 2 3 --quick  # versions 2 and 3, T = 1024 and 4096 only
  dev/build/hybrid_attention 3 --quick --no-wgmma  # version 3 without warpgroup MMA (as on GPUs before Hopper)
  dev/build/hybrid_attention 3 --once 1024  # two stage-1 and two full passes at T = 1024, nothing else (for
                                            # a profiler: skip the first pass's kernels with --launch-skip)

version 1: plain CUDA-core kernels (HYBRID_IMPL_PLAIN): feature maps and per-chunk states materialised in
           global memory, one warp per query / key row. Simple, linear in T, slow.
version 2: tensor-core kernels (HYBRID_IMPL_TENSOR_V2): mma.sync bf16/f16/tf32, a thread block of 4 warps
           walks a segment of 16 chunks keeping the 128 x d state in shared memory; feature maps fused;
           stage-1 loss fused.
version 3: (HYBRID_IMPL_TENSOR) d = 128: the forward and the backward's state kernels with 8 warps per block
           and the fp32 state in registers (mma accumulators, 16 state rows a warp); the full backward adds
           stateless window kernels (a block per chunk and kv head looping over the GQA group: dq per query
           chunk; dk, dv per key chunk with the next (head, query chunk)'s tiles and row statistics arriving
           by cp.async while one computes) and a second state walk for dv = phi_k R (R^T by head-dim rows).
           On Hopper the forward's window scores and state products, the backward's state kernels and the two
           backward window kernels use warpgroup MMA (wgmma), and the key-side kernel forms dv's linear part
           itself (no second walk); --no-wgmma runs the mma.sync code instead (what other GPUs run).

Reported per T: forward alone, forward + the fused stage-1 loss, the stage-1 backward (dWq, dWk, dw), the
full backward (also dq, dk, dv; `saved` has room for the feature maps, so version 3 keeps them, and a last line
gives the full pass without that room, the maps recomputed); ms, microseconds per 1K tokens, TFLOP/s of the chunked algorithm's matrix
work (counted below) and GB/s of the compulsory traffic (inputs read once, outputs written once).
*/
#include <omp.h>

#include <algorithm>
#include <string>

#include "attention.cuh"
#include "reference/hybrid_ref.h"

HybridImpl impl_of(int version) {
  return version == 1 ? HYBRID_IMPL_PLAIN : version == 2 ? HYBRID_IMPL_TENSOR_V2 : HYBRID_IMPL_TENSOR;
}

// ---- problem on the device ----
struct Problem {
  HybridAttnParams p;
  size_t nq, nk, nW;
  bf16 *q, *k, *v, *Wq, *Wk, *y_true, *y, *dy, *dq, *dk, *dv;
  float *w, *dWq, *dWk, *dw, *mse;
  void *saved_mem, *ws;
  HybridAttnSaved saved;
  std::vector<float> hq, hk, hv, hWq, hWk, hw, hyt, hdy;  // host copies (bf16-rounded)
  Problem(const HybridAttnParams& prm, uint64_t seed, bool keep_host) : p(prm) {
    nq = (size_t)p.B * p.T * p.H * p.d; nk = (size_t)p.B * p.T * p.Hkv * p.d; nW = (size_t)p.H * p.d * p.f;
    Rng rng(seed);
    auto randn = [&](size_t n, double sc) {
      std::vector<float> x(n);
      for (auto& e : x) e = round_bf16((float)(sc * rng.normal()));
      return x;
    };
    hq = randn(nq, 1.0); hk = randn(nk, 1.0); hv = randn(nk, 1.0);
    hWq = randn(nW, 0.5); hWk = randn(nW, 0.5); hyt = randn(nq, 0.3); hdy = randn(nq, 1e-3);
    hw.resize(p.H);
    for (auto& e : hw) e = (float)(-2.0 + 2.5 * rng.uniform());
    q = cuda_alloc<bf16>(nq); k = cuda_alloc<bf16>(nk); v = cuda_alloc<bf16>(nk);
    Wq = cuda_alloc<bf16>(nW); Wk = cuda_alloc<bf16>(nW); y_true = cuda_alloc<bf16>(nq);
    y = cuda_alloc<bf16>(nq); dy = cuda_alloc<bf16>(nq); dq = cuda_alloc<bf16>(nq);
    dk = cuda_alloc<bf16>(nk); dv = cuda_alloc<bf16>(nk);
    w = cuda_alloc<float>(p.H); dWq = cuda_alloc<float>(nW); dWk = cuda_alloc<float>(nW); dw = cuda_alloc<float>(p.H);
    mse = cuda_alloc<float>(1);
    upload_bf16(q, hq.data(), nq); upload_bf16(k, hk.data(), nk); upload_bf16(v, hv.data(), nk);
    upload_bf16(Wq, hWq.data(), nW); upload_bf16(Wk, hWk.data(), nW); upload_bf16(y_true, hyt.data(), nq);
    upload_bf16(dy, hdy.data(), nq);
    CUDA_CHECK(cudaMemcpy(w, hw.data(), p.H * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(dWq, 0, nW * 4)); CUDA_CHECK(cudaMemset(dWk, 0, nW * 4));
    CUDA_CHECK(cudaMemset(dw, 0, p.H * 4)); CUDA_CHECK(cudaMemset(mse, 0, 4));
    saved_mem = cuda_alloc<char>(hybrid_saved_bytes(p, true, true));
    saved = hybrid_saved_carve(saved_mem, p, true, true);
    ws = cuda_alloc<char>(hybrid_workspace_bytes(p));
    if (!keep_host) { hq = hk = hv = hyt = hdy = std::vector<float>(); }
  }
  ~Problem() {
    for (void* x : {(void*)q, (void*)k, (void*)v, (void*)Wq, (void*)Wk, (void*)y_true, (void*)y, (void*)dy, (void*)dq,
                    (void*)dk, (void*)dv, (void*)w, (void*)dWq, (void*)dWk, (void*)dw, (void*)mse, saved_mem, ws})
      cuda_free(x);
  }
  HybridAttnWeights wts() const { return HybridAttnWeights{Wq, Wk, w}; }
  void forward(bool fused) {
    HybridStage1Loss loss{y_true, 1000.0f / 32, mse};
    hybrid_attention_forward(p, q, k, v, wts(), y, saved, ws, fused ? &loss : nullptr, 0);
  }
  void backward_stage1() {  // after forward(true)
    HybridAttnGrads g{dWq, dWk, dw, nullptr, nullptr, nullptr};
    hybrid_attention_backward(p, q, k, v, wts(), nullptr, nullptr, saved, ws, g, 0);
  }
  void backward_full() {  // after forward(false)
    HybridAttnGrads g{dWq, dWk, dw, dq, dk, dv};
    hybrid_attention_backward(p, q, k, v, wts(), y, dy, saved, ws, g, 0);
  }
  // Stage 2's backward: the maps and window factors are frozen, so only dq, dk, dv; without dw, y_lo (which
  // only sharpens dw) is not needed either.
  void backward_input_grads() {  // after forward(false) with y_lo dropped
    HybridAttnGrads g{nullptr, nullptr, nullptr, dq, dk, dv};
    hybrid_attention_backward(p, q, k, v, wts(), y, dy, saved, ws, g, 0);
  }
  // `saved` without room for the feature maps: the full backward then recomputes them (version 3)
  void drop_maps() { saved.phi_q = nullptr; saved.phi_k = nullptr; }
  void drop_ylo() { saved.y_lo = nullptr; }
};

// ---- validation against the fp64 reference ----
double rel(const std::vector<float>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < b.size(); i++) {
    if (!std::isfinite(a[i])) return INFINITY;
    n += (a[i] - b[i]) * (a[i] - b[i]);
    d += b[i] * b[i];
  }
  return std::sqrt(n / std::max(d, 1e-300));
}

bool validate(int version, const HybridAttnParams& base) {
  HybridAttnParams p = base;
  p.impl = impl_of(version);
  Problem P(p, 1234 + version * 7 + p.T, true);
  const int group = p.H / p.Hkv;
  // Reference, one (b, h) slice per thread: y, and the gradients for upstream gradient dy.
  std::vector<double> y(P.nq), dq(P.nq), dk(P.nk, 0), dv(P.nk, 0), dWq(P.nW, 0), dWk(P.nW, 0), dw(p.H, 0);
  std::vector<std::vector<double>> sdk(p.B * p.H), sdv(p.B * p.H), sdWq(p.B * p.H), sdWk(p.B * p.H), sdw(p.B * p.H);
#pragma omp parallel for schedule(dynamic)
  for (int bh = 0; bh < p.B * p.H; bh++) {
    const int b = bh / p.H, h = bh % p.H, hk = h / group;
    const size_t n = (size_t)p.T * p.d;
    std::vector<double> q(n), k(n), v(n), g(n), yy(n), gq(n), Wq(P.hWq.begin() + (size_t)h * p.d * p.f,
                                                                   P.hWq.begin() + (size_t)(h + 1) * p.d * p.f),
        Wk(P.hWk.begin() + (size_t)h * p.d * p.f, P.hWk.begin() + (size_t)(h + 1) * p.d * p.f), w(1, P.hw[h]);
    for (int t = 0; t < p.T; t++)
      for (int e = 0; e < p.d; e++) {
        q[(size_t)t * p.d + e] = P.hq[(((size_t)b * p.T + t) * p.H + h) * p.d + e];
        k[(size_t)t * p.d + e] = P.hk[(((size_t)b * p.T + t) * p.Hkv + hk) * p.d + e];
        v[(size_t)t * p.d + e] = P.hv[(((size_t)b * p.T + t) * p.Hkv + hk) * p.d + e];
        g[(size_t)t * p.d + e] = P.hdy[(((size_t)b * p.T + t) * p.H + h) * p.d + e];
      }
    ref::HybridDims rd;
    rd.B = 1; rd.T = p.T; rd.H = 1; rd.Hkv = 1; rd.d = p.d; rd.f = p.f; rd.window = 64; rd.geometry = p.geometry; rd.sinks = p.sinks;
    ref::hybrid_attention_forward(yy.data(), q.data(), k.data(), v.data(), Wq.data(), Wk.data(), w.data(), rd);
    sdk[bh].resize(n); sdv[bh].resize(n); sdWq[bh].assign(Wq.size(), 0); sdWk[bh].assign(Wq.size(), 0); sdw[bh].assign(1, 0);
    ref::hybrid_attention_backward(gq.data(), sdk[bh].data(), sdv[bh].data(), sdWq[bh].data(), sdWk[bh].data(), sdw[bh].data(),
                                   g.data(), q.data(), k.data(), v.data(), Wq.data(), Wk.data(), w.data(), rd);
    for (int t = 0; t < p.T; t++)
      for (int e = 0; e < p.d; e++) {
        y[(((size_t)b * p.T + t) * p.H + h) * p.d + e] = yy[(size_t)t * p.d + e];
        dq[(((size_t)b * p.T + t) * p.H + h) * p.d + e] = gq[(size_t)t * p.d + e];
      }
  }
  for (int bh = 0; bh < p.B * p.H; bh++) {
    const int b = bh / p.H, h = bh % p.H, hk = h / group;
    for (int t = 0; t < p.T; t++)
      for (int e = 0; e < p.d; e++) {
        dk[(((size_t)b * p.T + t) * p.Hkv + hk) * p.d + e] += sdk[bh][(size_t)t * p.d + e];
        dv[(((size_t)b * p.T + t) * p.Hkv + hk) * p.d + e] += sdv[bh][(size_t)t * p.d + e];
      }
    for (size_t e = 0; e < sdWq[bh].size(); e++) {
      dWq[(size_t)h * p.d * p.f + e] += sdWq[bh][e];
      dWk[(size_t)h * p.d * p.f + e] += sdWk[bh][e];
    }
    dw[h] += sdw[bh][0];
  }
  CUDA_CHECK(cudaMemset(P.y, 0xff, P.nq * 2));  // poisoned: unwritten outputs show up as NaN
  CUDA_CHECK(cudaMemset(P.dq, 0xff, P.nq * 2));
  CUDA_CHECK(cudaMemset(P.dk, 0xff, P.nk * 2));
  CUDA_CHECK(cudaMemset(P.dv, 0xff, P.nk * 2));
  P.forward(false);
  P.backward_full();
  CUDA_CHECK(cudaDeviceSynchronize());
  const double e_y = rel(download_bf16(P.y, P.nq), y), e_dq = rel(download_bf16(P.dq, P.nq), dq),
               e_dk = rel(download_bf16(P.dk, P.nk), dk), e_dv = rel(download_bf16(P.dv, P.nk), dv),
               e_wq = rel(download_f32(P.dWq, P.nW), dWq), e_wk = rel(download_f32(P.dWk, P.nW), dWk),
               e_w = rel(download_f32(P.dw, p.H), dw);
  const bool ok = e_y <= 2e-3 && std::max({e_dq, e_dk, e_dv, e_wq, e_wk, e_w}) <= 1e-2;
  printf("v%d validate T=%-5d %-7s sinks=%d H=%d Hkv=%d d=%d: y %.1e dq %.1e dk %.1e dv %.1e dWq %.1e dWk %.1e dw %.1e  %s\n",
         version, p.T, p.geometry == HYBRID_TERRACE ? "terrace" : "sliding", p.sinks, p.H, p.Hkv, p.d, e_y, e_dq, e_dk,
         e_dv, e_wq, e_wk, e_w, ok ? "ok" : "FAILED");
  return ok;
}

// ---- work and traffic model (per (b, h) and 64-row chunk; terrace, no sinks) ----
// Forward: phi_q and phi_k (2 x 2*64*d*64), q k^T and p v on 2 key tiles (4 x 2*64*64*d), phi_q S (2*64*128*d),
// the state update (2*128*64*d). Backward, stage 1: phi_q, phi_k twice, dy S^T, v R^T (2 x 2*64*d*128),
// the state and R updates (2 x 2*128*64*d), dW (2 x 2*64*d*64). Full backward adds the window (recompute s,
// dP, dq on 2 tiles in the query pass; s, dP, dk, dv on 2 tiles in the key pass: 14 x 2*64*64*d), du W^T (2 x
// 2*64*64*d) and phi_k R (2*64*128*d).
double flops_forward(const HybridAttnParams& p) {
  const double chunks = (double)p.B * p.H * ceil_div(p.T, 64), d = p.d;
  return chunks * (2 * 2 * 64 * d * 64 + 4 * 2 * 64 * 64 * d + 2 * 64 * 128 * d + 2 * 128 * 64 * d);
}
double flops_backward(const HybridAttnParams& p, bool full, bool weight_grads = true) {  // stage 2: no dW
  const double chunks = (double)p.B * p.H * ceil_div(p.T, 64), d = p.d;
  double f = 3 * 2 * 64 * d * 64 + 2 * 2 * 64 * d * 128 + 2 * 2 * 128 * 64 * d + (weight_grads ? 2 * 2 * 64 * d * 64 : 0);
  if (full) f += 14 * 2 * 64 * 64 * d + 2 * 2 * 64 * 64 * d + 2 * 64 * 128 * d;
  return chunks * f;
}
double bytes_forward(const HybridAttnParams& p, bool fused) {
  const double q = (double)p.B * p.T * p.H * p.d * 2, kv = (double)p.B * p.T * p.Hkv * p.d * 2, rows = (double)p.B * p.T * p.H;
  return q + 2 * kv + q + rows * 12 + (fused ? 2 * q + rows * 8 : 0);  // q, k, v in; y, stats out; y_true in, dy out
}
double bytes_backward(const HybridAttnParams& p, bool full) {
  const double q = (double)p.B * p.T * p.H * p.d * 2, kv = (double)p.B * p.T * p.Hkv * p.d * 2, rows = (double)p.B * p.T * p.H;
  return q + 2 * kv + q + rows * 16 + (full ? q + 2 * kv : 0);  // q, k, v, dy, stats in; dq, dk, dv out
}

template <class F>
float time_ms(F fn, int reps) {
  fn();  // warm-up
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> t;
  GpuTimer timer;
  for (int r = 0; r < reps; r++) {
    timer.start();
    fn();
    t.push_back(timer.stop_ms());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void benchmark(int version, int T) {
  HybridAttnParams p;
  p.B = std::max(1, 8192 / T); p.T = T; p.H = 32; p.Hkv = 8; p.d = 128; p.f = 64;
  p.geometry = HYBRID_TERRACE;
  p.impl = impl_of(version);
  Problem P(p, 99, false);
  const int reps = version == 1 ? 2 : 10;
  const float fwd = time_ms([&] { P.forward(false); }, reps);
  const float fwd_loss = time_ms([&] { P.forward(true); }, reps);
  P.forward(true);
  const float bwd1 = time_ms([&] { P.backward_stage1(); }, reps);
  P.forward(false);
  const float bwd2 = time_ms([&] { P.backward_full(); }, reps);
  CUDA_CHECK(cudaDeviceSynchronize());
  const double tokens = (double)p.B * p.T;
  auto line = [&](const char* what, float ms, double fl, double by) {
    printf("v%d T=%-6d B=%d %-22s %8.3f ms %8.2f us/1Ktok %7.1f TFLOP/s %7.1f GB/s\n", version, T, p.B, what, ms,
           ms * 1e3 / (tokens / 1000), fl / (ms * 1e-3) / 1e12, by / (ms * 1e-3) / 1e9);
  };
  line("forward", fwd, flops_forward(p), bytes_forward(p, false));
  line("forward+stage1 loss", fwd_loss, flops_forward(p), bytes_forward(p, true));
  line("backward stage 1", bwd1, flops_backward(p, false), bytes_backward(p, false));
  line("backward full", bwd2, flops_backward(p, true), bytes_backward(p, true));
  line("fwd+bwd stage 1", fwd_loss + bwd1, flops_forward(p) + flops_backward(p, false),
       bytes_forward(p, true) + bytes_backward(p, false));
  line("fwd+bwd full", fwd + bwd2, flops_forward(p) + flops_backward(p, true),
       bytes_forward(p, false) + bytes_backward(p, true));
  // A variant of the full pass: forward (no loss) then `backward`, with `saved` as the variant leaves it.
  auto full_variant = [&](const char* what, auto backward, bool weight_grads) {
    const float f = time_ms([&] { P.forward(false); }, reps);
    P.forward(false);
    const float b = time_ms(backward, reps);
    line(what, f + b, flops_forward(p) + flops_backward(p, true, weight_grads), bytes_forward(p, false) + bytes_backward(p, true));
  };
  if (version == 3) {
    const HybridAttnSaved keep = P.saved;
    P.drop_ylo();  // stage 2's pass: input gradients only (maps and window factors frozen), no y_lo
    full_variant("fwd+bwd input grads only", [&] { P.backward_input_grads(); }, false);
    P.saved = keep;
    P.drop_maps();  // the full pass without room for the feature maps in `saved`
    full_variant("fwd+bwd full, maps recomputed", [&] { P.backward_full(); }, true);
  }
  printf("v%d T=%-6d peak memory %.2f GiB (workspace %.1f MiB, saved %.1f MiB; without dy, y_lo and the maps %.1f)\n",
         version, T, peak_memory_gib(), hybrid_workspace_bytes(p) / 1048576.0, hybrid_saved_bytes(p, true, true) / 1048576.0,
         hybrid_saved_bytes(p, false, false) / 1048576.0);
}

// ---- where the time goes: an event after every stage of the API calls (hybrid_detail::profile_hook) ----
struct StageLog {
  std::string prefix;
  std::vector<std::pair<std::string, cudaEvent_t>> events;
};
StageLog* g_stages = nullptr;
void record_stage(const char* stage, cudaStream_t stream) {
  cudaEvent_t e;
  CUDA_CHECK(cudaEventCreate(&e));
  CUDA_CHECK(cudaEventRecord(e, stream));
  g_stages->events.push_back({g_stages->prefix + stage, e});
}
void profile_stages(int version, int T) {
  HybridAttnParams p;
  p.B = std::max(1, 8192 / T); p.T = T; p.H = 32; p.Hkv = 8; p.d = 128; p.f = 64; p.impl = impl_of(version);
  Problem P(p, 7, false);
  P.forward(true); P.backward_stage1(); P.forward(false); P.backward_full();  // warm-up
  CUDA_CHECK(cudaDeviceSynchronize());
  const int reps = 5;
  std::vector<std::string> names;
  std::vector<double> total;
  for (int r = 0; r < reps; r++) {
    StageLog log;
    g_stages = &log;
    hybrid_detail::profile_hook = record_stage;
    log.prefix = "start";
    record_stage("", 0);
    log.prefix = "stage 1 | ";
    P.forward(true);
    P.backward_stage1();
    log.prefix = "full    | ";
    P.forward(false);
    P.backward_full();
    hybrid_detail::profile_hook = nullptr;
    CUDA_CHECK(cudaDeviceSynchronize());
    for (size_t i = 1; i < log.events.size(); i++) {
      float ms;
      CUDA_CHECK(cudaEventElapsedTime(&ms, log.events[i - 1].second, log.events[i].second));
      if (r == 0) { names.push_back(log.events[i].first); total.push_back(0); }
      total[i - 1] += ms;
    }
    for (auto& e : log.events) CUDA_CHECK(cudaEventDestroy(e.second));
  }
  for (size_t i = 0; i < names.size(); i++)
    printf("v%d T=%-6d B=%d stage %-40s %8.3f ms\n", version, T, p.B, names[i].c_str(), total[i] / reps);
}

// --once T: at the benchmark shape, each asked version runs a stage-1 pass and a full pass twice (the first
// time as a warm-up a profiler skips); no validation, no timing.
void run_once(int version, int T) {
  HybridAttnParams p;
  p.B = std::max(1, 8192 / T); p.T = T; p.H = 32; p.Hkv = 8; p.d = 128; p.f = 64; p.impl = impl_of(version);
  Problem P(p, 5, false);
  for (int r = 0; r < 2; r++) { P.forward(true); P.backward_stage1(); P.forward(false); P.backward_full(); }
  CUDA_CHECK(cudaDeviceSynchronize());
  printf("v%d T=%d: two stage-1 and two full passes done\n", version, T);
}

int main(int argc, char** argv) {
  constexpr int NV = 3;  // versions
  bool want[NV + 1] = {false}, any = false, quick = false;
  int once_T = 0;
  for (int i = 1; i < argc; i++) {
    if (std::string(argv[i]) == "--quick") quick = true;
    else if (std::string(argv[i]) == "--no-wgmma") hybrid_detail::wgmma_off = true;
    else if (std::string(argv[i]) == "--once") {
      if (i + 1 >= argc || (once_T = atoi(argv[i + 1])) < 1) fatal("--once needs a sequence length T >= 1");
      i++;
    }
    else {
      const int v = atoi(argv[i]);
      if (v < 1 || v > NV) fatal("unknown version %s (1..%d)", argv[i], NV);
      want[v] = any = true;
    }
  }
  auto skip = [&](int v) { return any && !want[v]; };
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  if (once_T > 0) {
    for (int version = 1; version <= NV; version++)
      if (!skip(version)) run_once(version, once_T);
    return 0;
  }
  bool ok = true;
  for (int version = 1; version <= NV; version++) {
    if (skip(version)) continue;
    HybridAttnParams p;
    p.B = 1; p.H = 4; p.Hkv = 1; p.d = 128; p.f = 64;
    for (int T : {300, 1024})
      for (int geometry : {HYBRID_TERRACE, HYBRID_SLIDING}) {
        p.T = T; p.geometry = geometry; p.sinks = geometry == HYBRID_SLIDING ? 4 : 0; p.seg_chunks = T == 1024 ? 5 : 0;
        ok = validate(version, p) && ok;
      }
  }
  for (int version = 1; version <= NV; version++) {
    if (skip(version)) continue;
    for (int T : {1024, 4096, 16384, 32768}) {
      if ((quick || version == 1) && T > 4096) continue;  // the plain kernels: enough to see the gap
      benchmark(version, T);
    }
  }
  for (int version = 2; version <= NV; version++)
    if (!skip(version))
      for (int T : {1024, 4096, 32768})
        if (!quick || T <= 4096) profile_stages(version, T);
  printf("%s\n", ok ? "all versions valid" : "VALIDATION FAILED");
  return ok ? 0 : 1;
}
