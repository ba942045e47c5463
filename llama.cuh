// llama.cuh: the Llama model on the GPU: weights (one bf16 allocation, fused q|k|v and gate|up
// layouts), activation buffers, cuBLASLt matmuls, and the forward kernels: embedding, RMSNorm,
// RoPE (rotate-half, Llama 3.1 scaling) fused with the q/k/v split, SwiGLU, and the LM head with a
// cross-entropy chunked over the vocabulary (never B x T x V logits at once).
//
// The forward is written layer by layer with explicit pieces (llama_layer_qkv, llama_layer_finish) so
// that stage 1 can run the teacher attention and the hybrid attention between them; the CPU oracle of
// every piece is reference/llama_ref.h.
#pragma once
#include <map>
#include <tuple>

#include "attention.cuh"
#include "cuda_common.cuh"
#include "model_file.h"
#include "reference/llama_ref.h"

// ------------------------------------------------------------------------------------------------
// cuBLASLt matmul. Row-major thinking: out (N, O) = x (N, I) · W^T with W (O, I) (a linear layer), or
// variants via the trans flags. cuBLAS is column-major, so we compute out^T = W · x^T.

struct Blas {
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 64ull << 20;
  // Heuristic results cached per problem: the first call of a shape asks, the rest reuse.
  std::map<std::tuple<int, int, int, int, int, int, int, int, int, int>, cublasLtMatmulAlgo_t> algos;
  void init() {
    CUBLAS_CHECK(cublasLtCreate(&lt));
    workspace = cuda_alloc<char>(workspace_bytes);
  }
  void destroy() {
    if (lt) cublasLtDestroy(lt);
    cuda_free(workspace);
    lt = nullptr; workspace = nullptr;
  }
};

// C (col-major m x n, ldc) = alpha * op(A) op(B) + beta * C. A, B bf16; C of type c_type (bf16 or fp32).
inline void lt_matmul(Blas& blas, bool trans_a, bool trans_b, int m, int n, int k, const bf16* A, int lda,
                      const bf16* B, int ldb, void* C, cudaDataType_t c_type, int ldc, float alpha, float beta,
                      cudaStream_t stream) {
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, trans_a ? k : m, trans_a ? m : k, lda));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, trans_b ? n : k, trans_b ? k : n, ldb));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, c_type, m, n, ldc));
  auto key = std::make_tuple((int)trans_a, (int)trans_b, m, n, k, lda, ldb, ldc, (int)c_type, beta != 0.f ? 1 : 0);
  auto it = blas.algos.find(key);
  if (it == blas.algos.end()) {
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &blas.workspace_bytes, sizeof blas.workspace_bytes));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(blas.lt, op, la, lb, lc, lc, pref, 1, &res, &found));
    cublasLtMatmulPreferenceDestroy(pref);
    if (found == 0) fatal("cuBLASLt found no algorithm for a %dx%dx%d matmul", m, n, k);
    it = blas.algos.emplace(key, res.algo).first;
  }
  CUBLAS_CHECK(cublasLtMatmul(blas.lt, op, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &it->second, blas.workspace,
                              blas.workspace_bytes, stream));
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(op);
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
  float* logits;      // (B*T, vocab_chunk) one vocabulary chunk of logits
  float* run_max;     // (B*T) running max over the chunks seen
  float* run_sum;     // (B*T) running sum of exp(logit - run_max)
  float* tgt_logit;   // (B*T) logit of the target token
  float* nll;         // (B*T) per-position negative log-likelihood (0 where no target)
  int* tokens;        // (B, T)
  int* targets;       // (B, T) next token, -1 where there is none or it is masked
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
  a.fmem = cuda_alloc<float>(N * D + N * a.vocab_chunk + 4 * N);
  a.x = a.fmem;
  a.logits = a.x + N * D;
  a.run_max = a.logits + N * a.vocab_chunk;
  a.run_sum = a.run_max + N;
  a.tgt_logit = a.run_sum + N;
  a.nll = a.tgt_logit + N;
  a.tokens = cuda_alloc<int>(2 * N);
  a.targets = a.tokens + N;
  return a;
}
inline void llama_acts_free(LlamaActs& a) {
  cuda_free(a.memory);
  cuda_free(a.fmem);
  cuda_free(a.tokens);
  a.memory = nullptr; a.fmem = nullptr; a.tokens = nullptr;
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

// out (N, D) bf16 = x * rsqrt(mean(x^2) + eps) * w, x fp32. One warp per row, 8 elements per access.
static __global__ void rmsnorm_kernel(bf16* __restrict__ out, const float* __restrict__ x, const bf16* __restrict__ w,
                                      int N, int D, float eps) {
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * warps + threadIdx.x / 32;
  if (row >= N) return;
  const float* xr = x + (size_t)row * D;
  bf16* outr = out + (size_t)row * D;
  float ss = 0.f;
  for (int c = lane * 8; c < D; c += 32 * 8) {
    const float4 a = *reinterpret_cast<const float4*>(xr + c), b = *reinterpret_cast<const float4*>(xr + c + 4);
    ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w + b.x * b.x + b.y * b.y + b.z * b.z + b.w * b.w;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  const float r = rsqrtf(ss / D + eps);
  for (int c = lane * 8; c < D; c += 32 * 8) {
    const float4 a = *reinterpret_cast<const float4*>(xr + c), b = *reinterpret_cast<const float4*>(xr + c + 4);
    const float e[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    int4 wpack = *reinterpret_cast<const int4*>(w + c), opack;
    const bf16* we = reinterpret_cast<const bf16*>(&wpack);
    bf16* oe = reinterpret_cast<bf16*>(&opack);
#pragma unroll
    for (int j = 0; j < 8; j++) oe[j] = __float2bfloat16(e[j] * r * __bfloat162float(we[j]));
    *reinterpret_cast<int4*>(outr + c) = opack;
  }
}

// Split the fused projection qkv (B, T, Q + 2 KV) into q (B, T, H, hd), k, v (B, T, Hkv, hd), applying
// rotate-half RoPE to q and k. One thread per rotation pair (or per v element pair).
static __global__ void rope_split_kernel(bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
                                  const bf16* __restrict__ qkv, const float* __restrict__ cos_t,
                                  const float* __restrict__ sin_t, int N, int T, int H, int Hkv, int hd) {
  const int half = hd / 2, heads = H + 2 * Hkv, row_len = heads * hd;
  const long long total = (long long)N * heads * half;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const int p = (int)(i % half);
    const int head = (int)((i / half) % heads);
    const int n = (int)(i / ((long long)half * heads));
    const int t = n % T;
    const bf16* src = qkv + (size_t)n * row_len + (size_t)head * hd;
    float a = __bfloat162float(src[p]), b = __bfloat162float(src[p + half]);
    bf16* dst;
    if (head < H) {
      dst = q + ((size_t)n * H + head) * hd;
    } else if (head < H + Hkv) {
      dst = k + ((size_t)n * Hkv + (head - H)) * hd;
    } else {
      dst = v + ((size_t)n * Hkv + (head - H - Hkv)) * hd;
      dst[p] = src[p];
      dst[p + half] = src[p + half];
      continue;
    }
    const float c = cos_t[(size_t)t * half + p], s = sin_t[(size_t)t * half + p];
    dst[p] = __float2bfloat16(a * c - b * s);
    dst[p + half] = __float2bfloat16(b * c + a * s);
  }
}

// hmlp (N, F) = silu(gate) * up from gu (N, 2F).
static __global__ void swiglu_kernel(bf16* __restrict__ hmlp, const bf16* __restrict__ gu, int N, int F) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)N * F;
       i += (long long)gridDim.x * blockDim.x) {
    const long long n = i / F, c = i % F;
    const float g = __bfloat162float(gu[n * 2 * F + c]), u = __bfloat162float(gu[n * 2 * F + F + c]);
    hmlp[i] = __float2bfloat16(g / (1.f + __expf(-g)) * u);
  }
}

// One vocabulary chunk [v0, v0 + Vc) of logits (N, Vc): fold it into each row's running max / sum of
// exponentials (online softmax), and pick up the target logit if the target falls in this chunk.
static __global__ void ce_chunk_kernel(const float* __restrict__ logits, int Vc, int v0, const int* __restrict__ targets,
                                float* run_max, float* run_sum, float* tgt_logit, int first_chunk) {
  const int row = blockIdx.x;
  const float* lr = logits + (size_t)row * Vc;
  __shared__ float red[32];
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < Vc; i += blockDim.x) mx = fmaxf(mx, lr[i]);
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    float m2 = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) m2 = fmaxf(m2, __shfl_xor_sync(0xffffffff, m2, o));
    if (threadIdx.x == 0) red[0] = m2;
  }
  __syncthreads();
  mx = red[0];
  __syncthreads();
  float se = 0.f;
  for (int i = threadIdx.x; i < Vc; i += blockDim.x) se += __expf(lr[i] - mx);
  for (int o = 16; o > 0; o >>= 1) se += __shfl_xor_sync(0xffffffff, se, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = se;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < blockDim.x / 32; w++) total += red[w];
    if (first_chunk) {
      run_max[row] = mx;
      run_sum[row] = total;
    } else {
      const float m_old = run_max[row], m_new = fmaxf(m_old, mx);
      run_sum[row] = run_sum[row] * __expf(m_old - m_new) + total * __expf(mx - m_new);
      run_max[row] = m_new;
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
  rmsnorm_kernel<<<ceil_div(N, 8), 256, 0, s>>>(out, x, w, N, D, eps);
  CUDA_LAUNCH_CHECK();
}

inline void llama_embed(const LlamaModel& m, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T;
  if (m.D() % 8) fatal("hidden size %d is not a multiple of 8", m.D());
  embedding_kernel<<<std::min(ceil_div((long long)N * m.D() / 8, 256), 65535), 256, 0, s>>>(a.x, a.tokens, m.embed,
                                                                                            N, m.D());
  CUDA_LAUNCH_CHECK();
}

// Layer l up to the attention inputs: xn = norm(x); q, k, v = split(xn · Wqkv^T) with RoPE.
inline void llama_layer_qkv(Blas& blas, const LlamaModel& m, int l, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T;
  const LlamaLayerWeights& L = m.layers[l];
  rmsnorm_forward(a.xn, a.x, L.attn_norm, N, m.D(), m.h.norm_eps, s);
  const int O = m.Q() + 2 * m.KV();
  linear_forward(blas, a.qkv, CUDA_R_16BF, O, a.xn, L.wqkv, N, m.D(), O, false, s);
  const long long pairs = (long long)N * (m.h.n_heads + 2 * m.h.n_kv_heads) * (m.h.head_dim / 2);
  rope_split_kernel<<<std::min(ceil_div(pairs, 256), 65535 * 4), 256, 0, s>>>(
      a.q, a.k, a.v, a.qkv, m.rope_cos, m.rope_sin, N, a.T, m.h.n_heads, m.h.n_kv_heads, m.h.head_dim);
  CUDA_LAUNCH_CHECK();
}

// Layer l after the attention: x += att · Wo^T; x += down(swiglu(norm(x) · Wgu^T)).
inline void llama_layer_finish(Blas& blas, const LlamaModel& m, int l, LlamaActs& a, cudaStream_t s) {
  const int N = a.B * a.T, D = m.D(), F = m.F();
  const LlamaLayerWeights& L = m.layers[l];
  linear_forward(blas, a.x, CUDA_R_32F, D, a.att, L.wo, N, m.Q(), D, true, s);
  rmsnorm_forward(a.xn, a.x, L.ffn_norm, N, D, m.h.norm_eps, s);
  linear_forward(blas, a.gu, CUDA_R_16BF, 2 * F, a.xn, L.w_gate_up, N, D, 2 * F, false, s);
  swiglu_kernel<<<std::min(ceil_div((long long)N * F, 256), 65535 * 4), 256, 0, s>>>(a.hmlp, a.gu, N, F);
  CUDA_LAUNCH_CHECK();
  linear_forward(blas, a.x, CUDA_R_32F, D, a.hmlp, L.w_down, N, F, D, true, s);
}

// Final norm, LM head and cross-entropy, chunked over the vocabulary: per-position NLL into a.nll.
// If logits_out is non-null (tests, small models only) every chunk is also copied there as (N, V).
inline void llama_head_loss(Blas& blas, const LlamaModel& m, LlamaActs& a, cudaStream_t s, float* logits_out = nullptr) {
  const int N = a.B * a.T, D = m.D(), V = m.V();
  rmsnorm_forward(a.xn, a.x, m.final_norm, N, D, m.h.norm_eps, s);
  for (int v0 = 0; v0 < V; v0 += a.vocab_chunk) {
    const int Vc = std::min(a.vocab_chunk, V - v0);
    linear_forward(blas, a.logits, CUDA_R_32F, Vc, a.xn, m.lm_head + (size_t)v0 * D, N, D, Vc, false, s);
    ce_chunk_kernel<<<N, 256, 0, s>>>(a.logits, Vc, v0, a.targets, a.run_max, a.run_sum, a.tgt_logit, v0 == 0);
    CUDA_LAUNCH_CHECK();
    if (logits_out)
      CUDA_CHECK(cudaMemcpy2DAsync(logits_out + v0, (size_t)V * 4, a.logits, (size_t)Vc * 4, (size_t)Vc * 4, N,
                                   cudaMemcpyDeviceToDevice, s));
  }
  ce_finish_kernel<<<ceil_div(N, 256), 256, 0, s>>>(a.nll, a.run_max, a.run_sum, a.tgt_logit, a.targets, N);
  CUDA_LAUNCH_CHECK();
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
