// llama.cuh: the Llama model on the GPU: weights (one bf16 allocation, fused q|k|v and gate|up
// layouts), activation buffers, cuBLASLt matmuls, and the forward kernels: embedding, RMSNorm,
// RoPE (rotate-half, Llama 3.1 scaling) fused with the q/k/v split, SwiGLU, and the LM head with a
// cross-entropy chunked over the vocabulary (never B x T x V logits at once).
//
// The forward is written layer by layer with explicit pieces (llama_layer_qkv, llama_layer_finish) so
// that stage 1 can run the teacher attention and the hybrid attention between them; the CPU oracle of
// every piece is reference/llama_ref.h.
#pragma once
#include <unistd.h>

#include <map>
#include <string>
#include <tuple>
#include <type_traits>

#include "attention.cuh"
#include "cuda_common.cuh"
#include "model_file.h"
#include "reference/llama_ref.h"

// ------------------------------------------------------------------------------------------------
// cuBLASLt matmul. Row-major thinking: out (N, O) = x (N, I) · W^T with W (O, I) (a linear layer), or
// variants via the trans flags. cuBLAS is column-major, so we compute out^T = W · x^T.

// One matmul problem's cuBLASLt objects, made on its first call and reused: creating and destroying four
// descriptors per call (224 calls per 8B forward) is host time the GPU waits for at small shapes.
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo;
};

// Descriptors of C (col-major m x n, ldc, c_type) = op(A) op(B), A and B bf16, fp32 compute.
inline LtPlan lt_plan_create(bool trans_a, bool trans_b, int m, int n, int k, int lda, int ldb, cudaDataType_t c_type,
                             int ldc) {
  LtPlan p;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, CUDA_R_16BF, trans_a ? k : m, trans_a ? m : k, lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_16BF, trans_b ? n : k, trans_b ? k : n, ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lc, c_type, m, n, ldc));
  return p;
}
inline void lt_plan_destroy(LtPlan& p) {
  cublasLtMatrixLayoutDestroy(p.la);
  cublasLtMatrixLayoutDestroy(p.lb);
  cublasLtMatrixLayoutDestroy(p.lc);
  cublasLtMatmulDescDestroy(p.op);
  p = LtPlan();
}
// cuBLASLt's heuristic candidates for a plan, best first, within `workspace_bytes`; returns how many.
inline int lt_candidates(cublasLtHandle_t lt, const LtPlan& p, size_t workspace_bytes,
                         cublasLtMatmulHeuristicResult_t* res, int max) {
  cublasLtMatmulPreference_t pref;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                    sizeof workspace_bytes));
  int found = 0;
  CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, p.op, p.la, p.lb, p.lc, p.lc, pref, max, res, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  return found;
}

struct Blas {
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 64ull << 20;
  // Plans per problem (transposes, sizes, strides, output type, accumulate or not).
  std::map<std::tuple<int, int, int, int, int, int, int, int, int, int>, LtPlan> plans;
  // Tuning (off unless init asks): on a problem's first call, time cuBLASLt's first few candidate
  // algorithms and keep the fastest. The choice is what makes results differ in the last bits, so it is
  // remembered in `tune_cache` (per GPU model and cuBLASLt version): a later process on this machine, a
  // --resume for instance, reuses it and computes bit for bit what the first one did.
  bool tune = false;
  std::string tune_cache, device_tag;
  std::map<std::string, int> tuned;  // problem key -> chosen candidate index
  void init(bool tune_matmuls = false, const std::string& cache_path = "") {
    CUBLAS_CHECK(cublasLtCreate(&lt));
    workspace = cuda_alloc<char>(workspace_bytes);
    tune = tune_matmuls;
    tune_cache = cache_path;
    if (tune) {
      int dev;
      cudaDeviceProp prop;
      CUDA_CHECK(cudaGetDevice(&dev));
      CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
      device_tag = std::string(prop.name) + "/cublasLt" + std::to_string(cublasLtGetVersion());
      for (char& c : device_tag)
        if (c == ' ') c = '_';
      if (!tune_cache.empty())
        if (FILE* f = fopen(tune_cache.c_str(), "r")) {  // a missing cache is simply empty
          char key[512];
          int idx;
          while (fscanf(f, "%511s %d", key, &idx) == 2) tuned[key] = idx;
          fclose(f);
        }
    }
  }
  // Rewrite the cache (temporary name, then rename: a kill never leaves half a file). Failing to write
  // it only costs reproducibility across processes, so it warns rather than stops.
  void save_tuning() {
    if (tune_cache.empty()) return;
    const std::string tmp = tune_cache + ".tmp" + std::to_string((long long)getpid());
    FILE* f = fopen(tmp.c_str(), "w");
    if (!f) { fprintf(stderr, "warning: cannot write the matmul tuning cache '%s'\n", tmp.c_str()); return; }
    for (const auto& kv : tuned) fprintf(f, "%s %d\n", kv.first.c_str(), kv.second);
    if (fclose(f) != 0 || rename(tmp.c_str(), tune_cache.c_str()) != 0)
      fprintf(stderr, "warning: cannot write the matmul tuning cache '%s'\n", tune_cache.c_str());
  }
  void destroy() {
    for (auto& kv : plans) lt_plan_destroy(kv.second);
    plans.clear();
    if (lt) cublasLtDestroy(lt);
    cuda_free(workspace);
    lt = nullptr; workspace = nullptr;
  }
};

// Time `found` candidate algorithms of a plan on the real inputs (into a scratch output, so an
// accumulating product leaves C alone) and return the index of the fastest; candidate 0 (the heuristic's
// first choice) is kept unless another beats it by 2 %, so noise does not decide.
inline int lt_tune(Blas& blas, const LtPlan& p, const cublasLtMatmulHeuristicResult_t* res, int found, const bf16* A,
                   const bf16* B, size_t c_bytes, float alpha, float beta, cudaStream_t stream) {
  void* scratch = cuda_alloc<char>(c_bytes);
  CUDA_CHECK(cudaMemsetAsync(scratch, 0, c_bytes, stream));
  GpuTimer timer;
  int best = 0;
  float best_ms = 0;
  for (int c = 0; c < found; c++) {
    auto run = [&] {
      CUBLAS_CHECK(cublasLtMatmul(blas.lt, p.op, &alpha, A, p.la, B, p.lb, &beta, scratch, p.lc, scratch, p.lc,
                                  &res[c].algo, blas.workspace, blas.workspace_bytes, stream));
    };
    run();
    float ms = INFINITY;
    for (int r = 0; r < 3; r++) {
      timer.start(stream);
      run();
      ms = std::min(ms, timer.stop_ms(stream));
    }
    if (c == 0 || ms < best_ms * 0.98f) { best = c; best_ms = ms; }
  }
  cuda_free(scratch);
  return best;
}

// C (col-major m x n, ldc) = alpha * op(A) op(B) + beta * C. A, B bf16; C of type c_type (bf16 or fp32).
// The algorithm is fixed per problem at its first call: cuBLASLt's first heuristic choice, or with
// tuning the fastest of its first candidates (remembered across processes, see Blas).
inline void lt_matmul(Blas& blas, bool trans_a, bool trans_b, int m, int n, int k, const bf16* A, int lda,
                      const bf16* B, int ldb, void* C, cudaDataType_t c_type, int ldc, float alpha, float beta,
                      cudaStream_t stream) {
  auto key = std::make_tuple((int)trans_a, (int)trans_b, m, n, k, lda, ldb, ldc, (int)c_type, beta != 0.f ? 1 : 0);
  auto it = blas.plans.find(key);
  if (it == blas.plans.end()) {
    LtPlan p = lt_plan_create(trans_a, trans_b, m, n, k, lda, ldb, c_type, ldc);
    constexpr int MAX_CANDIDATES = 8;
    cublasLtMatmulHeuristicResult_t res[MAX_CANDIDATES];
    const int found = lt_candidates(blas.lt, p, blas.workspace_bytes, res, blas.tune ? MAX_CANDIDATES : 1);
    if (found == 0) fatal("cuBLASLt found no algorithm for a %dx%dx%d matmul", m, n, k);
    int pick = 0;
    if (blas.tune && found > 1) {
      char name[256];
      snprintf(name, sizeof name, "%s/%d,%d,%d,%d,%d,%d,%d,%d,%d,%d", blas.device_tag.c_str(), (int)trans_a,
               (int)trans_b, m, n, k, lda, ldb, ldc, (int)c_type, beta != 0.f ? 1 : 0);
      auto t = blas.tuned.find(name);
      if (t != blas.tuned.end() && t->second < found) {
        pick = t->second;
      } else {
        const size_t c_bytes = (size_t)ldc * n * (c_type == CUDA_R_32F ? 4 : 2);
        pick = lt_tune(blas, p, res, found, A, B, c_bytes, alpha, beta, stream);
        blas.tuned[name] = pick;
        blas.save_tuning();
      }
    }
    p.algo = res[pick].algo;
    it = blas.plans.emplace(key, p).first;
  }
  const LtPlan& p = it->second;
  CUBLAS_CHECK(cublasLtMatmul(blas.lt, p.op, &alpha, A, p.la, B, p.lb, &beta, C, p.lc, C, p.lc, &p.algo, blas.workspace,
                              blas.workspace_bytes, stream));
}

// out (N, O) [+]= x (N, I) · W^T, W (O, I) row-major; ldo = row stride of out (>= O).
inline void linear_forward(Blas& blas, void* out, cudaDataType_t out_type, int ldo, const bf16* x, const bf16* W,
                           int N, int I, int O, bool accumulate, cudaStream_t s) {
  lt_matmul(blas, true, false, O, N, I, W, I, x, I, out, out_type, ldo, 1.f, accumulate ? 1.f : 0.f, s);
}

// ------------------------------------------------------------------------------------------------
// Weights on the GPU.

struct LlamaLayerWeights {
  bf16* attn_norm;  // (D)
  bf16* wqkv;       // (Q + 2 KV, D): rows of wq, then wk, then wv (one GEMM for all three)
  bf16* wo;         // (D, Q)
  bf16* ffn_norm;   // (D)
  bf16* w_gate_up;  // (2F, D): rows of w_gate, then w_up
  bf16* w_down;     // (D, F)
};

struct LlamaModel {
  ModelHeader h;
  bf16* memory = nullptr;  // the one allocation holding every tensor below
  size_t num_elements = 0;
  bf16* embed = nullptr;   // (V, D)
  std::vector<LlamaLayerWeights> layers;
  bf16* final_norm = nullptr;  // (D)
  bf16* lm_head = nullptr;     // (V, D), == embed when tied
  float* rope_cos = nullptr;   // (max_T, hd/2)
  float* rope_sin = nullptr;
  int rope_T = 0;

  int D() const { return h.dim; }
  int Q() const { return h.n_heads * h.head_dim; }
  int KV() const { return h.n_kv_heads * h.head_dim; }
  int F() const { return h.ffn_dim; }
  int V() const { return h.vocab_size; }
  // Matmul parameters (for FLOP counts): per layer and LM head.
  double layer_matmul_params() const { return (double)D() * (Q() + 2 * KV()) + (double)Q() * D() + 3.0 * D() * F(); }
};

// Lay out the single allocation; the order matches neither the file nor anything external, only this.
inline void llama_assign_pointers(LlamaModel& m) {
  const ModelHeader& h = m.h;
  size_t D = h.dim, Q = (size_t)h.n_heads * h.head_dim, KV = (size_t)h.n_kv_heads * h.head_dim, F = h.ffn_dim,
         V = h.vocab_size;
  size_t per_layer = D + (Q + 2 * KV) * D + D * Q + D + 2 * F * D + D * F;
  m.num_elements = V * D + h.n_layers * per_layer + D + (h.tied_embeddings ? 0 : V * D);
  m.memory = cuda_alloc<bf16>(m.num_elements);
  bf16* p = m.memory;
  m.embed = p; p += V * D;
  m.layers.resize(h.n_layers);
  for (auto& L : m.layers) {
    L.attn_norm = p; p += D;
    L.wqkv = p; p += (Q + 2 * KV) * D;
    L.wo = p; p += D * Q;
    L.ffn_norm = p; p += D;
    L.w_gate_up = p; p += 2 * F * D;
    L.w_down = p; p += D * F;
  }
  m.final_norm = p; p += D;
  m.lm_head = h.tied_embeddings ? m.embed : p;
}

inline void llama_init_rope(LlamaModel& m, int T) {
  std::vector<float> c, s;
  ref::rope_tables(m.h, T, c, s);
  m.rope_cos = cuda_alloc<float>(c.size());
  m.rope_sin = cuda_alloc<float>(s.size());
  CUDA_CHECK(cudaMemcpy(m.rope_cos, c.data(), c.size() * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(m.rope_sin, s.data(), s.size() * 4, cudaMemcpyHostToDevice));
  m.rope_T = T;
}

// Load a model file (fp32 or bf16) into the GPU layout. Streams tensor by tensor through a host
// buffer, so host memory stays at one tensor, not the whole model.
inline LlamaModel llama_load(const std::string& path, int rope_T) {
  FILE* f = open_or_die(path, "rb");
  LlamaModel m;
  m.h = read_model_header(f, path, nullptr);
  llama_assign_pointers(m);
  const ModelHeader& h = m.h;
  const size_t esz = dtype_size(h.dtype);
  std::vector<uint16_t> staging;
  std::vector<unsigned char> raw;
  // Read `count` elements from the file into device memory at dst (converting fp32 -> bf16).
  auto read_tensor = [&](bf16* dst, size_t count, const char* what) {
    raw.resize(count * esz);
    read_or_die(raw.data(), raw.size(), f, path, what);
    staging.resize(count);
    if (h.dtype == DTYPE_BF16) {
      memcpy(staging.data(), raw.data(), count * 2);
      for (size_t i = 0; i < count; i++)
        if ((staging[i] & 0x7f80) == 0x7f80) fatal("model file '%s' holds a non-finite value in %s", path.c_str(), what);
    } else {
      const float* src = (const float*)raw.data();
      for (size_t i = 0; i < count; i++) {
        if (!std::isfinite(src[i])) fatal("model file '%s' holds a non-finite value in %s", path.c_str(), what);
        staging[i] = float_to_bf16(src[i]);
      }
    }
    CUDA_CHECK(cudaMemcpy(dst, staging.data(), count * 2, cudaMemcpyHostToDevice));
  };
  size_t D = h.dim, Q = (size_t)h.n_heads * h.head_dim, KV = (size_t)h.n_kv_heads * h.head_dim, F = h.ffn_dim,
         V = h.vocab_size;
  read_tensor(m.embed, V * D, "tok_embeddings");
  for (auto& L : m.layers) {
    read_tensor(L.attn_norm, D, "attn_norm");
    read_tensor(L.wqkv, Q * D, "wq");
    read_tensor(L.wqkv + Q * D, KV * D, "wk");
    read_tensor(L.wqkv + (Q + KV) * D, KV * D, "wv");
    read_tensor(L.wo, D * Q, "wo");
    read_tensor(L.ffn_norm, D, "ffn_norm");
    read_tensor(L.w_gate_up, F * D, "w_gate");
    read_tensor(L.w_gate_up + F * D, F * D, "w_up");
    read_tensor(L.w_down, D * F, "w_down");
  }
  read_tensor(m.final_norm, D, "final_norm");
  if (!h.tied_embeddings) read_tensor(m.lm_head, V * D, "lm_head");
  fclose(f);
  llama_init_rope(m, std::min<int>(rope_T, h.max_seq_len));
  return m;
}

// Deterministic pseudo-random normal values from (seed, index): no state, any launch shape.
__device__ inline float hash_normal(uint64_t seed, uint64_t i) {
  auto mix = [](uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
  };
  uint64_t a = mix(seed * 0x9E3779B97F4A7C15ull + 2 * i), b = mix(seed * 0x9E3779B97F4A7C15ull + 2 * i + 1);
  float u1 = ((a >> 40) + 1.f) * (1.f / 16777217.f), u2 = (b >> 40) * (1.f / 16777216.f);
  return sqrtf(-2.f * __logf(u1)) * __cosf(6.2831853f * u2);
}
static __global__ void fill_normal_kernel(bf16* p, size_t n, float stddev, uint64_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(stddev * hash_normal(seed, i));
}
static __global__ void fill_const_kernel(bf16* p, size_t n, float v) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(v);
}

// A preset shape with random weights, made on the GPU (speed work needs no weights file):
// matrices N(0, 0.02), norms 1.
inline LlamaModel llama_random(const ModelHeader& h, int rope_T, uint64_t seed) {
  LlamaModel m;
  m.h = h;
  llama_assign_pointers(m);
  fill_normal_kernel<<<4096, 256>>>(m.memory, m.num_elements, 0.02f, seed);
  CUDA_LAUNCH_CHECK();
  const size_t D = h.dim;
  for (auto& L : m.layers) {
    fill_const_kernel<<<ceil_div(D, 256), 256>>>(L.attn_norm, D, 1.f);
    fill_const_kernel<<<ceil_div(D, 256), 256>>>(L.ffn_norm, D, 1.f);
  }
  fill_const_kernel<<<ceil_div(D, 256), 256>>>(m.final_norm, D, 1.f);
  CUDA_LAUNCH_CHECK();
  CUDA_CHECK(cudaDeviceSynchronize());
  llama_init_rope(m, std::min<int>(rope_T, h.max_seq_len));
  return m;
}

inline void llama_free(LlamaModel& m) {
  cuda_free(m.memory);
  cuda_free(m.rope_cos);
  cuda_free(m.rope_sin);
  m.memory = nullptr; m.rope_cos = m.rope_sin = nullptr;
}

// ------------------------------------------------------------------------------------------------
// Activations of a forward pass over B x T tokens. Inference and stage 1 need only one layer's worth
// (each layer overwrites the last); stage 2 will keep per-layer inputs of the norms, the attention
// and the MLP for its backward, and will extend this struct rather than replace it.

struct LlamaActs {
  int B = 0, T = 0, vocab_chunk = 0;
  bf16* memory = nullptr;
  float* x;    // (B, T, D) residual stream, fp32 (the CPU reference's precision; bf16 here cost ~1% on logits)
  bf16* xn;    // (B, T, D) normed input of attention / MLP
  bf16* qkv;   // (B, T, Q + 2 KV) fused projection output
  bf16* q;     // (B, T, H, hd) post-RoPE
  bf16* k;     // (B, T, Hkv, hd) post-RoPE
  bf16* v;     // (B, T, Hkv, hd)
  bf16* att;   // (B, T, H, hd) attention output, before o_proj
  bf16* gu;    // (B, T, 2F) gate | up
  bf16* hmlp;  // (B, T, F) silu(gate) * up
  float* fmem = nullptr;
  float* logits;      // (2, B*T, vocab_chunk) two vocabulary chunks of logits: the LM head's matmul fills
                      // one while the cross-entropy pass reads the other (on `side`)
  float* run_max;     // (B*T) running max over the chunks seen
  float* run_sum;     // (B*T) running sum of exp(logit - run_max)
  float* tgt_logit;   // (B*T) logit of the target token
  float* nll;         // (B*T) per-position negative log-likelihood (0 where no target)
  int* tokens;        // (B, T)
  int* targets;       // (B, T) next token, -1 where there is none or it is masked
  cudaStream_t side = nullptr;                  // the cross-entropy passes of the LM head
  cudaEvent_t logits_ready[2], logits_free[2], side_done;
};

inline LlamaActs llama_acts_alloc(const LlamaModel& m, int B, int T, int vocab_chunk = 16384) {
  LlamaActs a;
  a.B = B; a.T = T;
  a.vocab_chunk = std::min<int>(vocab_chunk, m.V());
  size_t N = (size_t)B * T, D = m.D(), Q = m.Q(), KV = m.KV(), F = m.F();
  size_t total = N * (D + (Q + 2 * KV) + Q + 2 * KV + Q + 2 * F + F);
  a.memory = cuda_alloc<bf16>(total);
  bf16* p = a.memory;
  a.xn = p; p += N * D;
  a.qkv = p; p += N * (Q + 2 * KV);
  a.q = p; p += N * Q;
  a.k = p; p += N * KV;
  a.v = p; p += N * KV;
  a.att = p; p += N * Q;
  a.gu = p; p += N * 2 * F;
  a.hmlp = p; p += N * F;
  a.fmem = cuda_alloc<float>(N * D + 2 * N * a.vocab_chunk + 4 * N);
  a.x = a.fmem;
  a.logits = a.x + N * D;
  a.run_max = a.logits + 2 * N * a.vocab_chunk;
  a.run_sum = a.run_max + N;
  a.tgt_logit = a.run_sum + N;
  a.nll = a.tgt_logit + N;
  a.tokens = cuda_alloc<int>(2 * N);
  a.targets = a.tokens + N;
  CUDA_CHECK(cudaStreamCreateWithFlags(&a.side, cudaStreamNonBlocking));
  for (int i = 0; i < 2; i++) {
    CUDA_CHECK(cudaEventCreateWithFlags(&a.logits_ready[i], cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&a.logits_free[i], cudaEventDisableTiming));
  }
  CUDA_CHECK(cudaEventCreateWithFlags(&a.side_done, cudaEventDisableTiming));
  return a;
}
inline void llama_acts_free(LlamaActs& a) {
  cuda_free(a.memory);
  cuda_free(a.fmem);
  cuda_free(a.tokens);
  if (a.side) {
    for (int i = 0; i < 2; i++) {
      CUDA_CHECK(cudaEventDestroy(a.logits_ready[i]));
      CUDA_CHECK(cudaEventDestroy(a.logits_free[i]));
    }
    CUDA_CHECK(cudaEventDestroy(a.side_done));
    CUDA_CHECK(cudaStreamDestroy(a.side));
  }
  a.memory = nullptr; a.fmem = nullptr; a.tokens = nullptr; a.side = nullptr;
}

// ------------------------------------------------------------------------------------------------
// Kernels.

// x (N, D) fp32 = embed[tokens]; 16-byte loads of 8 bf16, two 16-byte stores.
static __global__ void embedding_kernel(float* __restrict__ x, const int* __restrict__ tokens,
                                        const bf16* __restrict__ embed, int N, int D) {
  const int vec = D / 8;  // D is a multiple of 8 (checked at launch)
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)N * vec;
       i += (long long)gridDim.x * blockDim.x) {
    int n = (int)(i / vec), c = (int)(i % vec);
    int4 pack = reinterpret_cast<const int4*>(embed + (size_t)tokens[n] * D)[c];
    const bf16* e = reinterpret_cast<const bf16*>(&pack);
    float4* dst = reinterpret_cast<float4*>(x + (size_t)n * D + (size_t)c * 8);
    dst[0] = make_float4(__bfloat162float(e[0]), __bfloat162float(e[1]), __bfloat162float(e[2]), __bfloat162float(e[3]));
    dst[1] = make_float4(__bfloat162float(e[4]), __bfloat162float(e[5]), __bfloat162float(e[6]), __bfloat162float(e[7]));
  }
}

// out (N, D) bf16 = x * rsqrt(mean(x^2) + eps) * w, x fp32. One block per row; each thread holds G groups
// of 8 consecutive elements in registers, so x is read from memory once.
template <int G>
static __global__ void rmsnorm_kernel(bf16* __restrict__ out, const float* __restrict__ x, const bf16* __restrict__ w,
                                      int D, float eps) {
  const size_t row = blockIdx.x;
  const float* xr = x + row * D;
  float v[G][8];
  float ss = 0.f;
#pragma unroll
  for (int g = 0; g < G; g++) {
    const int c = (g * blockDim.x + threadIdx.x) * 8;
    if (c < D) {
      const float4 a = *reinterpret_cast<const float4*>(xr + c), b = *reinterpret_cast<const float4*>(xr + c + 4);
      v[g][0] = a.x; v[g][1] = a.y; v[g][2] = a.z; v[g][3] = a.w; v[g][4] = b.x; v[g][5] = b.y; v[g][6] = b.z; v[g][7] = b.w;
#pragma unroll
      for (int e = 0; e < 8; e++) ss += v[g][e] * v[g][e];
    }
  }
  __shared__ float red[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.f;
  for (int i = 0; i < blockDim.x / 32; i++) ss += red[i];  // every thread, same order: same r everywhere
  const float r = rsqrtf(ss / D + eps);
#pragma unroll
  for (int g = 0; g < G; g++) {
    const int c = (g * blockDim.x + threadIdx.x) * 8;
    if (c < D) {
      int4 wpack = *reinterpret_cast<const int4*>(w + c), opack;
      const bf16* we = reinterpret_cast<const bf16*>(&wpack);
      bf16* oe = reinterpret_cast<bf16*>(&opack);
#pragma unroll
      for (int e = 0; e < 8; e++) oe[e] = __float2bfloat16(v[g][e] * r * __bfloat162float(we[e]));
      *reinterpret_cast<int4*>(out + row * D + c) = opack;
    }
  }
}

// Split the fused projection qkv (B, T, Q + 2 KV) into q (B, T, H, hd), k, v (B, T, Hkv, hd), applying
// rotate-half RoPE to q and k. Grid (N, .): one token per blockIdx.x; a thread takes VEC consecutive
// rotation pairs (p .. p+VEC-1 with their partners p+half ..), so loads and stores are VEC wide.
template <int VEC>
static __global__ void rope_split_kernel(bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                         const bf16* __restrict__ qkv, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, int T, int H, int Hkv, int hd) {
  using Pack = typename std::conditional<VEC == 4, uint2, bf16>::type;  // VEC bf16
  const int half = hd / 2, heads = H + 2 * Hkv, groups = half / VEC;
  const int n = blockIdx.x, t = n % T;
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= heads * groups) return;
  const int head = j / groups, p = (j % groups) * VEC;
  const bf16* src = qkv + (size_t)n * heads * hd + (size_t)head * hd;
  Pack lo = *reinterpret_cast<const Pack*>(src + p), hi = *reinterpret_cast<const Pack*>(src + p + half);
  bf16* dst;
  if (head < H) dst = q + ((size_t)n * H + head) * hd;
  else if (head < H + Hkv) dst = k + ((size_t)n * Hkv + (head - H)) * hd;
  else dst = v + ((size_t)n * Hkv + (head - H - Hkv)) * hd;
  if (head < H + Hkv) {
    bf16* a = reinterpret_cast<bf16*>(&lo);
    bf16* b = reinterpret_cast<bf16*>(&hi);
    const float* c = cos_t + (size_t)t * half + p;
    const float* s = sin_t + (size_t)t * half + p;
#pragma unroll
    for (int e = 0; e < VEC; e++) {
      const float x = __bfloat162float(a[e]), y = __bfloat162float(b[e]);
      a[e] = __float2bfloat16(x * c[e] - y * s[e]);
      b[e] = __float2bfloat16(y * c[e] + x * s[e]);
    }
  }
  *reinterpret_cast<Pack*>(dst + p) = lo;
  *reinterpret_cast<Pack*>(dst + p + half) = hi;
}

// hmlp (N, F) = silu(gate) * up from gu (N, 2F). Grid (N, .): one row per blockIdx.x, VEC columns a
// thread (8, i.e. 16-byte loads and stores, when F is a multiple of 8; else 1).
template <int VEC>
static __global__ void swiglu_kernel(bf16* __restrict__ hmlp, const bf16* __restrict__ gu, int F) {
  using Pack = typename std::conditional<VEC == 8, int4, bf16>::type;  // VEC bf16
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
  if (c >= F) return;
  const size_t n = blockIdx.x;
  const Pack gp = *reinterpret_cast<const Pack*>(gu + n * 2 * F + c);
  const Pack up = *reinterpret_cast<const Pack*>(gu + n * 2 * F + F + c);
  const bf16* g = reinterpret_cast<const bf16*>(&gp);
  const bf16* u = reinterpret_cast<const bf16*>(&up);
  Pack outp;
  bf16* o = reinterpret_cast<bf16*>(&outp);
#pragma unroll
  for (int e = 0; e < VEC; e++) {
    const float x = __bfloat162float(g[e]);
    o[e] = __float2bfloat16(x / (1.f + __expf(-x)) * __bfloat162float(u[e]));
  }
  *reinterpret_cast<Pack*>(hmlp + n * F + c) = outp;
}

// One vocabulary chunk [v0, v0 + Vc) of logits (N, Vc): fold it into each row's running max / sum of
// exponentials (online softmax), and pick up the target logit if the target falls in this chunk. One
// block per row; each thread keeps its own running (max, sum) so the logits are read once, then the
// block merges the pairs.
__device__ __forceinline__ void online_lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * __expf(m - x) + 1.f;  // exp(-inf) = 0 on the first element
    m = x;
  } else {
    s += __expf(x - m);
  }
}
__device__ __forceinline__ void online_lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}
static __global__ void ce_chunk_kernel(const float* __restrict__ logits, int Vc, int v0, const int* __restrict__ targets,
                                       float* run_max, float* run_sum, float* tgt_logit, int first_chunk) {
  const int row = blockIdx.x;
  const float* lr = logits + (size_t)row * Vc;
  __shared__ float red_m[32], red_s[32];
  float m = -INFINITY, se = 0.f;
  if (Vc % 4 == 0) {  // rows 16-byte aligned
    const float4* l4 = reinterpret_cast<const float4*>(lr);
    for (int i = threadIdx.x; i < Vc / 4; i += blockDim.x) {
      const float4 x = l4[i];
      online_lse_add(m, se, x.x); online_lse_add(m, se, x.y); online_lse_add(m, se, x.z); online_lse_add(m, se, x.w);
    }
  } else {
    for (int i = threadIdx.x; i < Vc; i += blockDim.x) online_lse_add(m, se, lr[i]);
  }
  for (int o = 16; o > 0; o >>= 1)
    online_lse_merge(m, se, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, se, o));
  if (threadIdx.x % 32 == 0) { red_m[threadIdx.x / 32] = m; red_s[threadIdx.x / 32] = se; }
  __syncthreads();
  if (threadIdx.x == 0) {
    m = red_m[0]; se = red_s[0];
    for (int w = 1; w < blockDim.x / 32; w++) online_lse_merge(m, se, red_m[w], red_s[w]);
    if (first_chunk) {
      run_max[row] = m;
      run_sum[row] = se;
    } else {
      float rm = run_max[row], rs = run_sum[row];
      online_lse_merge(rm, rs, m, se);
      run_max[row] = rm;
      run_sum[row] = rs;
    }
    const int t = targets[row];
    if (t >= v0 && t < v0 + Vc) tgt_logit[row] = lr[t - v0];
  }
}

static __global__ void ce_finish_kernel(float* nll, const float* run_max, const float* run_sum, const float* tgt_logit,
                                 const int* targets, int N) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) nll[i] = targets[i] >= 0 ? logf(run_sum[i]) + run_max[i] - tgt_logit[i] : 0.f;
}

// ------------------------------------------------------------------------------------------------
// Forward pieces.

inline void rmsnorm_forward(bf16* out, const float* x, const bf16* w, int N, int D, float eps, cudaStream_t s) {
  if (D % 8) fatal("hidden size %d is not a multiple of 8", D);
  if (D > 4 * 8 * 1024) fatal("hidden size %d is larger than the RMSNorm kernel supports (32768)", D);
  // G groups of 8 per thread: 4 for wide rows (D = 4096 -> 128 threads), fewer threads never below a warp
  const int G = D >= 4096 ? 4 : D >= 1024 ? 2 : 1;
  const int threads = std::max(32, ceil_div(ceil_div(D, 8 * G), 32) * 32);
  if (G == 4) rmsnorm_kernel<4><<<N, threads, 0, s>>>(out, x, w, D, eps);
  else if (G == 2) rmsnorm_kernel<2><<<N, threads, 0, s>>>(out, x, w, D, eps);
  else rmsnorm_kernel<1><<<N, threads, 0, s>>>(out, x, w, D, eps);
  CUDA_LAUNCH_CHECK();
}

inline void llama_embed(const LlamaModel& m, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T;
  if (m.D() % 8) fatal("hidden size %d is not a multiple of 8", m.D());
  embedding_kernel<<<std::min(ceil_div((long long)N * m.D() / 8, 256), 65535), 256, 0, s>>>(a.x, a.tokens, m.embed,
                                                                                            N, m.D());
  CUDA_LAUNCH_CHECK();
}

// q, k, v of a.qkv with RoPE (rope_split_kernel).
inline void llama_rope_split(const LlamaModel& m, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T, H = m.h.n_heads, Hkv = m.h.n_kv_heads, hd = m.h.head_dim, heads = H + 2 * Hkv;
  if ((hd / 2) % 4 == 0) {
    rope_split_kernel<4><<<dim3(N, ceil_div(heads * hd / 8, 128)), 128, 0, s>>>(a.q, a.k, a.v, a.qkv, m.rope_cos,
                                                                                m.rope_sin, a.T, H, Hkv, hd);
  } else {
    rope_split_kernel<1><<<dim3(N, ceil_div(heads * hd / 2, 128)), 128, 0, s>>>(a.q, a.k, a.v, a.qkv, m.rope_cos,
                                                                                m.rope_sin, a.T, H, Hkv, hd);
  }
  CUDA_LAUNCH_CHECK();
}

// a.hmlp = silu(gate) * up of a.gu (swiglu_kernel).
inline void llama_swiglu(LlamaActs& a, int F, cudaStream_t s) {
  if (F % 8 == 0) swiglu_kernel<8><<<dim3(a.B * a.T, ceil_div(F / 8, 128)), 128, 0, s>>>(a.hmlp, a.gu, F);
  else swiglu_kernel<1><<<dim3(a.B * a.T, ceil_div(F, 128)), 128, 0, s>>>(a.hmlp, a.gu, F);
  CUDA_LAUNCH_CHECK();
}

// Layer l up to the attention inputs: xn = norm(x); q, k, v = split(xn · Wqkv^T) with RoPE.
inline void llama_layer_qkv(Blas& blas, const LlamaModel& m, int l, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T;
  const LlamaLayerWeights& L = m.layers[l];
  rmsnorm_forward(a.xn, a.x, L.attn_norm, N, m.D(), m.h.norm_eps, s);
  const int O = m.Q() + 2 * m.KV();
  linear_forward(blas, a.qkv, CUDA_R_16BF, O, a.xn, L.wqkv, N, m.D(), O, false, s);
  llama_rope_split(m, a, s);
}

// Layer l after the attention: x += att · Wo^T; x += down(swiglu(norm(x) · Wgu^T)).
inline void llama_layer_finish(Blas& blas, const LlamaModel& m, int l, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T, D = m.D(), F = m.F();
  const LlamaLayerWeights& L = m.layers[l];
  linear_forward(blas, a.x, CUDA_R_32F, D, a.att, L.wo, N, m.Q(), D, true, s);
  rmsnorm_forward(a.xn, a.x, L.ffn_norm, N, D, m.h.norm_eps, s);
  linear_forward(blas, a.gu, CUDA_R_16BF, 2 * F, a.xn, L.w_gate_up, N, D, 2 * F, false, s);
  llama_swiglu(a, F, s);
  linear_forward(blas, a.x, CUDA_R_32F, D, a.hmlp, L.w_down, N, F, D, true, s);
}

// Final norm, LM head and cross-entropy, chunked over the vocabulary: per-position NLL into a.nll.
// The matmul of chunk i+1 (compute-bound, stream s) overlaps the cross-entropy pass of chunk i
// (memory-bound, stream a.side) through two logits buffers; the passes run in chunk order on one stream,
// so the running max / sum are folded in a fixed order. s waits for the side stream at the end.
// If logits_out is non-null (tests, small models only) every chunk is also copied there as (N, V).
inline void llama_head_loss(Blas& blas, const LlamaModel& m, LlamaActs& a, cudaStream_t s, float* logits_out = nullptr) {
  const int N = a.B * a.T, D = m.D(), V = m.V();
  rmsnorm_forward(a.xn, a.x, m.final_norm, N, D, m.h.norm_eps, s);
  for (int v0 = 0, i = 0; v0 < V; v0 += a.vocab_chunk, i++) {
    const int Vc = std::min(a.vocab_chunk, V - v0), buf = i % 2;
    float* logits = a.logits + (size_t)buf * N * a.vocab_chunk;
    if (i >= 2) CUDA_CHECK(cudaStreamWaitEvent(s, a.logits_free[buf], 0));  // chunk i-2's pass has read it
    linear_forward(blas, logits, CUDA_R_32F, Vc, a.xn, m.lm_head + (size_t)v0 * D, N, D, Vc, false, s);
    CUDA_CHECK(cudaEventRecord(a.logits_ready[buf], s));
    CUDA_CHECK(cudaStreamWaitEvent(a.side, a.logits_ready[buf], 0));
    ce_chunk_kernel<<<N, 256, 0, a.side>>>(logits, Vc, v0, a.targets, a.run_max, a.run_sum, a.tgt_logit, v0 == 0);
    CUDA_LAUNCH_CHECK();
    if (logits_out)
      CUDA_CHECK(cudaMemcpy2DAsync(logits_out + v0, (size_t)V * 4, logits, (size_t)Vc * 4, (size_t)Vc * 4, N,
                                   cudaMemcpyDeviceToDevice, a.side));
    CUDA_CHECK(cudaEventRecord(a.logits_free[buf], a.side));
  }
  ce_finish_kernel<<<ceil_div(N, 256), 256, 0, a.side>>>(a.nll, a.run_max, a.run_sum, a.tgt_logit, a.targets, N);
  CUDA_LAUNCH_CHECK();
  CUDA_CHECK(cudaEventRecord(a.side_done, a.side));
  CUDA_CHECK(cudaStreamWaitEvent(s, a.side_done, 0));
}

// Upload tokens (B, T) and derive next-token targets; target_mask (B, T), optional, marks tokens whose
// prediction counts (mask of the target position). Validates ids against the vocabulary.
inline void llama_set_tokens(const LlamaModel& m, LlamaActs& a, const int* tokens, const unsigned char* target_mask,
                             cudaStream_t s) {
  const int B = a.B, T = a.T;
  std::vector<int> tgt((size_t)B * T);
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++) {
      int tok = tokens[(size_t)b * T + t];
      if (tok < 0 || tok >= m.V()) fatal("token id %d outside the model's vocabulary of %d", tok, m.V());
      bool has = t + 1 < T && (!target_mask || target_mask[(size_t)b * T + t + 1]);
      tgt[(size_t)b * T + t] = has ? tokens[(size_t)b * T + t + 1] : -1;
    }
  CUDA_CHECK(cudaMemcpyAsync(a.tokens, tokens, (size_t)B * T * 4, cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaMemcpyAsync(a.targets, tgt.data(), (size_t)B * T * 4, cudaMemcpyHostToDevice, s));
  CUDA_CHECK(cudaStreamSynchronize(s));  // tgt is a local vector
}

// The whole forward with the teacher's softmax attention; per-position NLL in a.nll.
inline void llama_forward(Blas& blas, const LlamaModel& m, LlamaActs& a, cudaStream_t s, float* logits_out = nullptr) {
  if (a.T > m.rope_T) fatal("sequence length %d exceeds the model's maximum %d", a.T, m.rope_T);
  llama_embed(m, a, s);
  for (uint32_t l = 0; l < m.h.n_layers; l++) {
    llama_layer_qkv(blas, m, l, a, s);
    softmax_attention_forward(a.att, nullptr, a.q, a.k, a.v, a.B, a.T, m.h.n_heads, m.h.n_kv_heads, m.h.head_dim, s);
    llama_layer_finish(blas, m, l, a, s);
  }
  llama_head_loss(blas, m, a, s, logits_out);
}

// Sum of a.nll and the number of positions with a target (host side; small).
inline double llama_nll_sum(const LlamaActs& a, long long* count) {
  const size_t N = (size_t)a.B * a.T;
  std::vector<float> nll = download_f32(a.nll, N);
  std::vector<int> tgt(N);
  CUDA_CHECK(cudaMemcpy(tgt.data(), a.targets, N * 4, cudaMemcpyDeviceToHost));
  double sum = 0;
  long long cnt = 0;
  for (size_t i = 0; i < N; i++)
    if (tgt[i] >= 0) { sum += nll[i]; cnt++; }
  if (count) *count = cnt;
  return sum;
}

// Forward FLOPs for B x T tokens (matmuls + causal attention + LM head), for MFU / TFLOP/s reports.
inline double llama_forward_flops(const LlamaModel& m, int B, int T, bool with_head = true) {
  const double N = (double)B * T;
  double f = 2.0 * N * m.layer_matmul_params() * m.h.n_layers;
  f += m.h.n_layers * 2.0 * 2.0 * B * m.h.n_heads * ((double)T * (T + 1) / 2) * m.h.head_dim;  // QK^T and PV, causal
  if (with_head) f += 2.0 * N * m.D() * m.V();
  return f;
}
