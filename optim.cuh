// optim.cuh: the optimizer on the GPU. AdamW (PyTorch's torch.optim.AdamW semantics) over one flat
// buffer of trained parameters, with fp32 master weights and fp32 moments; each step updates the
// master copy and writes the bf16 copy the model's kernels read, in the same kernel. Also: a zero-grad
// helper for the fp32 gradient-accumulation buffer, a deterministic global gradient norm (for
// clipping and logging), and the NaN/Inf check of the gradients.
//
// Usage, per optimizer step (the learning rate comes from an LrSchedule, reference/optim_ref.h):
//   adamw_zero_grad(&opt);                         // before the first micro-batch
//   ... backward kernels accumulate (+=) into opt.grad, one micro-batch after another ...
//   GradNormResult r = adamw_grad_norm(&opt, 1.f / accum_steps);   // synchronises; r.nonfinite, r.norm
//   if (r.nonfinite) stop the run;
//   adamw_step(&opt, lr_schedule_lr(sched, opt.step), 1.f / accum_steps, model_bf16_params);
//
// The trained parameters live in ONE contiguous buffer (the caller points its per-layer tensors into
// it): one launch updates them all, the global norm is one reduction, and a checkpoint is three
// arrays. Gradient accumulation: the caller sums micro-batch gradients into opt.grad and passes
// grad_scale = 1 / accum_steps, so the step sees the mean, as PyTorch does with loss / accum_steps.
//
// Determinism: the norm is a two-pass reduction with a grid that depends on n only, fixed per-thread
// order and a fixed shared-memory tree; no floating-point atomics anywhere, so the same gradients give
// the same bits on every run (and the step, being elementwise, is deterministic too).
#pragma once
#include "cuda_common.cuh"
#include "reference/optim_ref.h"

// Written by the norm's second pass into device memory; the step kernel reads clip_coef from there,
// so clipping needs no host round trip.
struct GradNormResult {
  float sumsq;      // sum over all elements of (grad * grad_scale)^2, fp32
  float norm;       // sqrt(sumsq)
  float clip_coef;  // min(1, max_grad_norm / (norm + 1e-6)); 1 when clipping is off
  int nonfinite;    // number of NaN/Inf elements of grad * grad_scale; 0 = all finite
};

constexpr int kNormThreads = 512;     // threads per block, both passes
constexpr int kNormMaxBlocks = 1024;  // first-pass blocks at most (the second pass folds them)
constexpr int kAdamWThreads = 256;

struct AdamW {
  size_t n = 0;            // number of trained parameters
  AdamWHyper hyper;
  int64_t step = 0;        // optimizer steps taken (PyTorch's state['step'])
  float* master = nullptr; // (n) fp32 master weights
  float* m = nullptr;      // (n) first moment, fp32
  float* v = nullptr;      // (n) second moment, fp32
  float* grad = nullptr;   // (n) fp32 gradient accumulation buffer (backward kernels add into it)
  // Scratch of the norm: per-block partial sums of the first pass and the final result.
  float* norm_partial_sumsq = nullptr;  // (kNormMaxBlocks)
  int* norm_partial_nonfinite = nullptr;// (kNormMaxBlocks)
  GradNormResult* norm_result = nullptr;// (1)
  // The step kernel may reuse norm_result only if it was computed for the current gradients with
  // the same scale; zero_grad and step invalidate it.
  bool norm_fresh = false;
  float norm_scale = 0.f;
};

// ---- kernels ------------------------------------------------------------------------------------
// `static`: this header is included by several translation units linked into one test binary.

// Fixed-order tree reduction of kNormThreads floats and ints in shared memory; thread 0 gets totals.
static __device__ void block_reduce_sum(float* s_sum, int* s_bad) {
  for (int stride = kNormThreads / 2; stride > 0; stride >>= 1) {
    __syncthreads();
    if (threadIdx.x < stride) {
      s_sum[threadIdx.x] += s_sum[threadIdx.x + stride];
      s_bad[threadIdx.x] += s_bad[threadIdx.x + stride];
    }
  }
  __syncthreads();
}

// Pass 1: block b sums (g * scale)^2 over a fixed grid-stride subset, in a fixed order.
static __global__ void __launch_bounds__(kNormThreads)
grad_norm_partials_kernel(const float* grad, size_t n, float grad_scale, float* partial_sumsq, int* partial_nonfinite) {
  __shared__ float s_sum[kNormThreads];
  __shared__ int s_bad[kNormThreads];
  float acc = 0.f;
  int bad = 0;
  const size_t stride = (size_t)gridDim.x * kNormThreads;
  for (size_t i = (size_t)blockIdx.x * kNormThreads + threadIdx.x; i < n; i += stride) {
    const float g = grad[i] * grad_scale;
    bad += isfinite(g) ? 0 : 1;
    acc += g * g;
  }
  s_sum[threadIdx.x] = acc;
  s_bad[threadIdx.x] = bad;
  block_reduce_sum(s_sum, s_bad);
  if (threadIdx.x == 0) {
    partial_sumsq[blockIdx.x] = s_sum[0];
    partial_nonfinite[blockIdx.x] = s_bad[0];
  }
}

// Pass 2: one block folds the partials (thread t takes t, t + kNormThreads, ... in order), then the tree.
static __global__ void __launch_bounds__(kNormThreads)
grad_norm_finalize_kernel(const float* partial_sumsq, const int* partial_nonfinite, int num_partials,
                          float max_grad_norm, GradNormResult* out) {
  __shared__ float s_sum[kNormThreads];
  __shared__ int s_bad[kNormThreads];
  float acc = 0.f;
  int bad = 0;
  for (int i = threadIdx.x; i < num_partials; i += kNormThreads) {
    acc += partial_sumsq[i];
    bad += partial_nonfinite[i];
  }
  s_sum[threadIdx.x] = acc;
  s_bad[threadIdx.x] = bad;
  block_reduce_sum(s_sum, s_bad);
  if (threadIdx.x == 0) {
    GradNormResult r;
    r.sumsq = s_sum[0];
    r.norm = sqrtf(r.sumsq);
    r.clip_coef = 1.f;
    if (max_grad_norm > 0.f) {  // torch.nn.utils.clip_grad_norm_: clamp(max_norm / (norm + 1e-6), max=1)
      const float coef = max_grad_norm / (r.norm + 1e-6f);
      r.clip_coef = coef < 1.f ? coef : 1.f;
    }
    r.nonfinite = s_bad[0];
    *out = r;
  }
}

// The AdamW step, elementwise, in PyTorch's order of operations (see ref::adamw_step). Reads the
// clip coefficient from the norm result when clipping is on (clip == nullptr: no clipping).
// Writes the updated fp32 master, both moments and, when out_bf16 is given, the bf16 copy.
static __global__ void __launch_bounds__(kAdamWThreads)
adamw_step_kernel(float* master, float* m, float* v, const float* grad, bf16* out_bf16, size_t n, float grad_scale,
                  const GradNormResult* clip, float decay_factor, float one_minus_beta1, float beta2,
                  float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt, float eps) {
  const float clip_coef = clip ? clip->clip_coef : 1.f;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = grad[i] * grad_scale * clip_coef;
    float p = master[i] * decay_factor;
    float mi = m[i];
    mi = mi + one_minus_beta1 * (g - mi);
    const float vi = v[i] * beta2 + one_minus_beta2 * g * g;
    const float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
    p = p + neg_step_size * (mi / denom);
    master[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (out_bf16) out_bf16[i] = __float2bfloat16_rn(p);
  }
}

static __global__ void f32_to_bf16_kernel(const float* src, bf16* dst, size_t n) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
}

// ---- host API -----------------------------------------------------------------------------------

// First-pass grid: a function of n alone, so the reduction order (and the bits) never depend on the GPU.
inline int grad_norm_num_blocks(size_t n) {
  const size_t blocks = (n + kNormThreads - 1) / kNormThreads;
  return (int)(blocks < (size_t)kNormMaxBlocks ? (blocks ? blocks : 1) : kNormMaxBlocks);
}
inline int elementwise_num_blocks(size_t n, int threads) {
  const size_t blocks = (n + threads - 1) / threads;
  return (int)(blocks < 65536 ? (blocks ? blocks : 1) : 65536);
}

// Allocate the optimizer for n parameters; master starts at zero (set it with adamw_set_params),
// moments and gradients at zero, step 0.
inline void adamw_create(AdamW* opt, size_t n, const AdamWHyper& hyper) {
  if (n == 0) fatal("optimizer: no trained parameters");
  if (!(hyper.beta1 >= 0 && hyper.beta1 < 1) || !(hyper.beta2 >= 0 && hyper.beta2 < 1))
    fatal("optimizer: betas must be in [0, 1) (got %g, %g)", hyper.beta1, hyper.beta2);
  if (!(hyper.eps > 0)) fatal("optimizer: eps must be positive (got %g)", hyper.eps);
  if (!(hyper.weight_decay >= 0)) fatal("optimizer: weight decay must be non-negative (got %g)", hyper.weight_decay);
  if (!(hyper.max_grad_norm >= 0)) fatal("optimizer: the clipping norm must be non-negative, 0 = off (got %g)", hyper.max_grad_norm);
  *opt = AdamW();
  opt->n = n;
  opt->hyper = hyper;
  opt->master = cuda_alloc<float>(n);
  opt->m = cuda_alloc<float>(n);
  opt->v = cuda_alloc<float>(n);
  opt->grad = cuda_alloc<float>(n);
  opt->norm_partial_sumsq = cuda_alloc<float>(kNormMaxBlocks);
  opt->norm_partial_nonfinite = cuda_alloc<int>(kNormMaxBlocks);
  opt->norm_result = cuda_alloc<GradNormResult>(1);
  CUDA_CHECK(cudaMemset(opt->master, 0, n * sizeof(float)));
  CUDA_CHECK(cudaMemset(opt->m, 0, n * sizeof(float)));
  CUDA_CHECK(cudaMemset(opt->v, 0, n * sizeof(float)));
  CUDA_CHECK(cudaMemset(opt->grad, 0, n * sizeof(float)));
}

inline void adamw_destroy(AdamW* opt) {
  cuda_free(opt->master);
  cuda_free(opt->m);
  cuda_free(opt->v);
  cuda_free(opt->grad);
  cuda_free(opt->norm_partial_sumsq);
  cuda_free(opt->norm_partial_nonfinite);
  cuda_free(opt->norm_result);
  *opt = AdamW();
}

// Upload initial fp32 parameters (host, n values) into the master copy.
inline void adamw_set_params(AdamW* opt, const float* host_params) {
  CUDA_CHECK(cudaMemcpy(opt->master, host_params, opt->n * sizeof(float), cudaMemcpyHostToDevice));
}

// Write the bf16 copy of the master weights (after set_params or a resume; steps do it themselves).
inline void adamw_write_bf16(const AdamW* opt, bf16* out_bf16, cudaStream_t stream = 0) {
  f32_to_bf16_kernel<<<elementwise_num_blocks(opt->n, kAdamWThreads), kAdamWThreads, 0, stream>>>(opt->master, out_bf16, opt->n);
  CUDA_LAUNCH_CHECK();
}

inline void adamw_zero_grad(AdamW* opt, cudaStream_t stream = 0) {
  CUDA_CHECK(cudaMemsetAsync(opt->grad, 0, opt->n * sizeof(float), stream));
  opt->norm_fresh = false;
}

// Launch the two-pass norm of grad * grad_scale into opt->norm_result (device); no synchronisation.
inline void adamw_grad_norm_launch(AdamW* opt, float grad_scale, cudaStream_t stream = 0) {
  const int blocks = grad_norm_num_blocks(opt->n);
  grad_norm_partials_kernel<<<blocks, kNormThreads, 0, stream>>>(opt->grad, opt->n, grad_scale, opt->norm_partial_sumsq,
                                                                 opt->norm_partial_nonfinite);
  CUDA_LAUNCH_CHECK();
  grad_norm_finalize_kernel<<<1, kNormThreads, 0, stream>>>(opt->norm_partial_sumsq, opt->norm_partial_nonfinite, blocks,
                                                           (float)opt->hyper.max_grad_norm, opt->norm_result);
  CUDA_LAUNCH_CHECK();
  opt->norm_fresh = true;
  opt->norm_scale = grad_scale;
}

// The global gradient norm, the clip coefficient and the NaN/Inf count, on the host (synchronises).
inline GradNormResult adamw_grad_norm(AdamW* opt, float grad_scale, cudaStream_t stream = 0) {
  adamw_grad_norm_launch(opt, grad_scale, stream);
  GradNormResult r;
  CUDA_CHECK(cudaMemcpyAsync(&r, opt->norm_result, sizeof r, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  return r;
}

// True when every element of the gradient buffer (times grad_scale) is finite (synchronises).
inline bool adamw_grads_finite(AdamW* opt, float grad_scale = 1.f, cudaStream_t stream = 0) {
  return adamw_grad_norm(opt, grad_scale, stream).nonfinite == 0;
}

// One AdamW update with learning rate lr on the mean gradient opt->grad * grad_scale, clipped to
// hyper.max_grad_norm when that is > 0 (the norm is computed here unless adamw_grad_norm already did
// it for these gradients and this scale). Writes the bf16 copy when out_bf16 is given. Asynchronous.
inline void adamw_step(AdamW* opt, float lr, float grad_scale, bf16* out_bf16 = nullptr, cudaStream_t stream = 0) {
  const GradNormResult* clip = nullptr;
  if (opt->hyper.max_grad_norm > 0) {
    if (!opt->norm_fresh || opt->norm_scale != grad_scale) adamw_grad_norm_launch(opt, grad_scale, stream);
    clip = opt->norm_result;
  }
  opt->step += 1;
  const AdamWCoefficients c = adamw_coefficients(opt->hyper, lr, opt->step);
  adamw_step_kernel<<<elementwise_num_blocks(opt->n, kAdamWThreads), kAdamWThreads, 0, stream>>>(
      opt->master, opt->m, opt->v, opt->grad, out_bf16, opt->n, grad_scale, clip, (float)c.decay_factor,
      (float)c.one_minus_beta1, (float)opt->hyper.beta2, (float)c.one_minus_beta2, (float)-c.step_size,
      (float)c.bias_correction2_sqrt, (float)opt->hyper.eps);
  CUDA_LAUNCH_CHECK();
  opt->norm_fresh = false;
}

// Checkpoint support: the optimizer state is step, hyper and these three (n) fp32 arrays.
inline void adamw_download_state(const AdamW* opt, std::vector<float>* master, std::vector<float>* m, std::vector<float>* v) {
  *master = download_f32(opt->master, opt->n);
  *m = download_f32(opt->m, opt->n);
  *v = download_f32(opt->v, opt->n);
}
inline void adamw_upload_state(AdamW* opt, int64_t step, const float* master, const float* m, const float* v) {
  if (step < 0) fatal("optimizer state: negative step count %lld", (long long)step);
  CUDA_CHECK(cudaMemcpy(opt->master, master, opt->n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(opt->m, m, opt->n * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(opt->v, v, opt->n * sizeof(float), cudaMemcpyHostToDevice));
  opt->step = step;
  opt->norm_fresh = false;
}
