// cuda_common.cuh: what every CUDA translation unit needs: checked CUDA/cuBLAS calls, the bf16
// type, launch-error checks, device buffers with one allocation each, and a simple event timer.
#pragma once
#include <algorithm>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.h"

typedef __nv_bfloat16 bf16;

#define CUDA_CHECK(call)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (call);                                                                    \
    if (err_ != cudaSuccess) fatal("CUDA error %s at %s:%d: %s", cudaGetErrorName(err_), __FILE__, \
                                   __LINE__, cudaGetErrorString(err_));                           \
  } while (0)

#define CUBLAS_CHECK(call)                                                                         \
  do {                                                                                             \
    cublasStatus_t st_ = (call);                                                                   \
    if (st_ != CUBLAS_STATUS_SUCCESS) fatal("cuBLAS error %d (%s) at %s:%d", (int)st_,              \
                                            cublasGetStatusString(st_), __FILE__, __LINE__);       \
  } while (0)

// After every launch: catches bad configurations at once (asynchronous faults surface at the next sync).
#define CUDA_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

template <typename T>
T* cuda_alloc(size_t count) {
  T* p = nullptr;
  if (count) CUDA_CHECK(cudaMalloc(&p, count * sizeof(T)));
  return p;
}
inline void cuda_free(void* p) { if (p) CUDA_CHECK(cudaFree(p)); }

// Host <-> device copies of fp32 data stored as bf16 on the device.
inline void upload_bf16(bf16* dst, const float* src, size_t n) {
  std::vector<uint16_t> tmp(n);
  for (size_t i = 0; i < n; i++) tmp[i] = float_to_bf16(src[i]);
  CUDA_CHECK(cudaMemcpy(dst, tmp.data(), n * 2, cudaMemcpyHostToDevice));
}
inline std::vector<float> download_bf16(const bf16* src, size_t n) {
  std::vector<uint16_t> tmp(n);
  CUDA_CHECK(cudaMemcpy(tmp.data(), src, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t i = 0; i < n; i++) out[i] = bf16_to_float(tmp[i]);
  return out;
}
inline std::vector<float> download_f32(const float* src, size_t n) {
  std::vector<float> out(n);
  CUDA_CHECK(cudaMemcpy(out.data(), src, n * 4, cudaMemcpyDeviceToHost));
  return out;
}

struct GpuTimer {
  cudaEvent_t a, b;
  GpuTimer() { CUDA_CHECK(cudaEventCreate(&a)); CUDA_CHECK(cudaEventCreate(&b)); }
  ~GpuTimer() { cudaEventDestroy(a); cudaEventDestroy(b); }
  void start(cudaStream_t s = 0) { CUDA_CHECK(cudaEventRecord(a, s)); }
  float stop_ms(cudaStream_t s = 0) {
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
};

// GPU memory in use on the device (cudaMemGetInfo: this process's allocations, the CUDA context and
// library workspaces), the largest value seen by any call so far. The trainer allocates its buffers up
// front, so sampling once per step catches the peak.
inline double peak_memory_gib() {
  static double peak = 0.0;
  size_t free_b, total_b;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  peak = std::max(peak, (double)(total_b - free_b) / (1024.0 * 1024.0 * 1024.0));
  return peak;
}
