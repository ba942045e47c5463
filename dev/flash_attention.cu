// dev/flash_attention.cu: kernel lab for the teacher's causal softmax attention (attention.cuh).
// Forward versions: a naive kernel (one thread per query row, global memory, two passes), the generic
// kernel of attention.cuh, several tile shapes of its tensor-core (mma.sync) flash kernel, and the
// Hopper wgmma kernel of attention_hopper.cuh (d = 128: 2 or 3 k/v stages; serial or overlapped s and
// p v MMAs within a warpgroup; p v as one n128 MMA or two n64; the first consumer's diagonal tile at
// 128 keys or 64; * marks one ptxas serializes, info C7511). Backward versions:
// the generic and the tensor-core kernels. Each is validated against reference/attention_ref.h on
// fresh random inputs, then timed at Llama 3 8B attention shapes (32 query heads, 8 kv heads, d = 128;
// also d = 64) with B * T = 8192.
//   make -C dev flash_attention && ./dev/build/flash_attention [--quick]
// TFLOP/s counts the causal FLOPs only: forward 2 matmuls * 2 FLOP * B * H * T^2 * d / 2; backward
// 2.5 times that (5 matmuls, as usually counted; our kernels recompute s and p, 7 in all).
// GB/s counts each input read once and each output written once (the minimum traffic).
// dev/flash_attention_sdpa.py times PyTorch's SDPA at the same shapes.
#include <functional>
#include <string>

#include "attention.cuh"
#include "reference/attention_ref.h"

using namespace attention_detail;

// Version 0: one thread per (b, h, i); pass 1 finds the max score, pass 2 sums exp and accumulates v.
__global__ void attention_naive_kernel(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                       int H, int Hkv, int d, float scale) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)B * H * T) return;
  const int i = idx % T, h = (idx / T) % H, b = idx / ((long long)T * H);
  const int hk = h / (H / Hkv);
  const bf16* qi = q + (((size_t)b * T + i) * H + h) * d;
  float m = -INFINITY;
  for (int j = 0; j <= i; j++) {
    const bf16* kj = k + (((size_t)b * T + j) * Hkv + hk) * d;
    float s = 0.f;
    for (int c = 0; c < d; c++) s += __bfloat162float(qi[c]) * __bfloat162float(kj[c]);
    m = fmaxf(m, s * scale);
  }
  float acc[128];
  for (int c = 0; c < d; c++) acc[c] = 0.f;
  float l = 0.f;
  for (int j = 0; j <= i; j++) {
    const bf16* kj = k + (((size_t)b * T + j) * Hkv + hk) * d;
    const bf16* vj = v + (((size_t)b * T + j) * Hkv + hk) * d;
    float s = 0.f;
    for (int c = 0; c < d; c++) s += __bfloat162float(qi[c]) * __bfloat162float(kj[c]);
    const float p = expf(s * scale - m);
    l += p;
    for (int c = 0; c < d; c++) acc[c] += p * __bfloat162float(vj[c]);
  }
  bf16* oi = out + (((size_t)b * T + i) * H + h) * d;
  for (int c = 0; c < d; c++) oi[c] = __float2bfloat16(acc[c] / l);
  if (lse) lse[((size_t)b * H + h) * T + i] = m + logf(l);
}

void attention_naive(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int Hkv,
                     int d, cudaStream_t s) {
  const long long n = (long long)B * H * T;
  attention_naive_kernel<<<ceil_div(n, 128), 128, 0, s>>>(out, lse, q, k, v, B, T, H, Hkv, d, 1.f / sqrtf((float)d));
  CUDA_LAUNCH_CHECK();
}

typedef void (*AttentionFn)(bf16*, float*, const bf16*, const bf16*, const bf16*, int, int, int, int, int,
                            cudaStream_t);

struct Version {
  const char* name;
  int d;  // 0: any head size
  AttentionFn fn;
  bool slow;  // timed at the shortest sequence only
};

template <class Tile>
void flash_version(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int Hkv,
                   int d, cudaStream_t s) {
  if (d != Tile::D) fatal("tile for d=%d called with d=%d", Tile::D, d);
  launch_flash_forward<Tile>(out, lse, q, k, v, B, T, H, Hkv, s);
}

template <int STAGES, bool PV_SPLIT, bool OVERLAP, bool DIAG_HALF>
void wgmma_version(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int Hkv,
                   int d, cudaStream_t s) {
  if (d != 128) fatal("wgmma kernel called with d=%d", d);
  attention_hopper::launch_flash_forward_wgmma<STAGES, PV_SPLIT, OVERLAP, DIAG_HALF>(out, lse, q, k, v, B, T, H, Hkv, s);
}

static const Version versions[] = {
    {"naive (thread per row)", 0, attention_naive, true},
    {"generic (fp32 FMA)", 0, attention_generic, true},
    {"flash 128x64, 4 warps x 32 rows", 128, flash_version<FlashTile<128, 4, 2, 64, false, 2>>, false},
    {"flash 128x64, 8 warps x 16 rows, q in regs", 128, flash_version<FlashTile<128, 8, 1, 64, true, 1>>, false},
    {"flash 64x64, 4 warps x 16 rows, q in regs", 128, flash_version<FlashTile<128, 4, 1, 64, true, 2>>, false},
    {"flash 128x32, 4 warps x 32 rows", 128, flash_version<FlashTile<128, 4, 2, 32, false, 2>>, false},
    {"flash 128x64, 4 warps x 32 rows", 64, flash_version<FlashTile<64, 4, 2, 64, false, 2>>, false},
    {"flash 64x64, 4 warps x 16 rows, q in regs", 64, flash_version<FlashTile<64, 4, 1, 64, true, 4>>, false},
    {"flash 128x64, 8 warps x 16 rows, q in regs", 64, flash_version<FlashTile<64, 8, 1, 64, true, 1>>, false},
    {"wgmma 128x128, 2 stages, serial", 128, wgmma_version<2, false, false, false>, false},
    {"wgmma 128x128, 2 stages, serial, pv 2 x n64", 128, wgmma_version<2, true, false, false>, false},
    {"wgmma 128x128, 3 stages, serial", 128, wgmma_version<3, false, false, false>, false},
    {"wgmma 128x128, 3 stages, serial, diag half", 128, wgmma_version<3, false, false, true>, false},
    {"wgmma 128x128, 2 stages, overlap", 128, wgmma_version<2, false, true, false>, false},
    {"wgmma 128x128, 3 stages, overlap", 128, wgmma_version<3, false, true, false>, false},
    {"wgmma 128x128, 3 stages, overlap, pv 2 x n64", 128, wgmma_version<3, true, true, false>, false},
    {"wgmma 128x128, 3 stages, overlap, diag half*", 128, wgmma_version<3, false, true, true>, false},
    {"dispatch (softmax_attention_forward)", 0, softmax_attention_forward, false},
};

// Fills x with pseudo-random values of standard deviation `std` (uniform, from a hash of the index):
// benchmark inputs at T = 16K are 10^8 numbers, too many for the host RNG.
__global__ void fill_random_kernel(bf16* x, size_t n, uint64_t seed, float std) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint64_t h = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    h ^= h >> 31, h *= 0xBF58476D1CE4E5B9ull, h ^= h >> 29;
    const float u = (float)(h >> 40) * (1.f / 16777216.f);  // [0, 1)
    x[i] = __float2bfloat16((2.f * u - 1.f) * 1.7320508f * std);
  }
}

struct DeviceInputs {
  int B, T, H, Hkv, d;
  size_t nq, nkv;
  bf16 *q, *k, *v, *out, *dout, *dq, *dk, *dv;
  float *lse, *delta;
  std::vector<float> hq, hk, hv, hdout;  // bf16-rounded host copies (validation only)
  DeviceInputs(int B_, int T_, int H_, int Hkv_, int d_, uint64_t seed, bool host_copies)
      : B(B_), T(T_), H(H_), Hkv(Hkv_), d(d_) {
    nq = (size_t)B * T * H * d, nkv = (size_t)B * T * Hkv * d;
    q = cuda_alloc<bf16>(nq), k = cuda_alloc<bf16>(nkv), v = cuda_alloc<bf16>(nkv), out = cuda_alloc<bf16>(nq);
    dout = cuda_alloc<bf16>(nq), dq = cuda_alloc<bf16>(nq), dk = cuda_alloc<bf16>(nkv), dv = cuda_alloc<bf16>(nkv);
    lse = cuda_alloc<float>((size_t)B * H * T), delta = cuda_alloc<float>((size_t)B * H * T);
    if (host_copies) {
      Rng rng(seed);
      hq.resize(nq), hk.resize(nkv), hv.resize(nkv), hdout.resize(nq);
      for (auto& x : hq) x = round_bf16((float)(2.0 * rng.normal()));
      for (auto& x : hk) x = round_bf16((float)rng.normal());
      for (auto& x : hv) x = round_bf16((float)rng.normal());
      for (auto& x : hdout) x = round_bf16((float)rng.normal());
      upload_bf16(q, hq.data(), nq), upload_bf16(k, hk.data(), nkv), upload_bf16(v, hv.data(), nkv);
      upload_bf16(dout, hdout.data(), nq);
    } else {
      fill_random_kernel<<<1024, 256>>>(q, nq, seed, 2.f);
      fill_random_kernel<<<1024, 256>>>(k, nkv, seed + 1, 1.f);
      fill_random_kernel<<<1024, 256>>>(v, nkv, seed + 2, 1.f);
      fill_random_kernel<<<1024, 256>>>(dout, nq, seed + 3, 1.f);
      CUDA_LAUNCH_CHECK();
    }
  }
  ~DeviceInputs() {
    for (void* p : {(void*)q, (void*)k, (void*)v, (void*)out, (void*)dout, (void*)dq, (void*)dk, (void*)dv,
                    (void*)lse, (void*)delta})
      cuda_free(p);
  }
};

// Relative L2 error of the output and max abs error of the logsumexp, against the fp32 CPU reference.
bool validate(const Version& ver, int d) {
  const int B = 2, T = 300, H = 8, Hkv = 2;  // T not a multiple of any tile
  DeviceInputs in(B, T, H, Hkv, d, 1234 + d, true);
  std::vector<float> ref_out(in.nq), ref_lse((size_t)B * H * T);
  ref::softmax_attention_forward<float>(ref_out.data(), in.hq.data(), in.hk.data(), in.hv.data(), B, T, H, Hkv, d,
                                        ref_lse.data());
  CUDA_CHECK(cudaMemset(in.out, 0xff, in.nq * sizeof(bf16)));
  CUDA_CHECK(cudaMemset(in.lse, 0xff, (size_t)B * H * T * sizeof(float)));
  ver.fn(in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> out = download_bf16(in.out, in.nq), lse = download_f32(in.lse, ref_lse.size());
  double diff2 = 0, ref2 = 0, lse_err = 0;
  for (size_t i = 0; i < in.nq; i++) {
    const double dl = (double)out[i] - ref_out[i];
    diff2 += dl * dl, ref2 += (double)ref_out[i] * ref_out[i];
  }
  for (size_t i = 0; i < lse.size(); i++) lse_err = std::max(lse_err, (double)std::fabs(lse[i] - ref_lse[i]));
  const double rel = std::sqrt(diff2 / ref2);
  const bool ok = rel <= 1e-2 && lse_err <= 1e-3;  // NaN fails both comparisons
  printf("  d=%3d  %-46s rel.err %.2e  lse err %.2e  %s\n", d, ver.name, rel, lse_err, ok ? "ok" : "FAIL");
  return ok;
}

void benchmark(const Version& ver, DeviceInputs& in) {
  const int B = in.B, T = in.T, H = in.H, Hkv = in.Hkv, d = in.d;
  const int warmup = ver.slow ? 1 : 3, iters = ver.slow ? 3 : 20;
  for (int i = 0; i < warmup; i++) ver.fn(in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  GpuTimer timer;
  timer.start();
  for (int i = 0; i < iters; i++) ver.fn(in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  const double ms = timer.stop_ms() / iters;
  const double flops = 2.0 * 2.0 * B * H * (double)T * T * d / 2.0;
  const double bytes = 2.0 * (2 * in.nq + 2 * in.nkv);
  printf("  d=%3d T=%5d B=%d  %-46s %8.3f ms  %6.1f TFLOP/s  %7.1f GB/s\n", d, T, B, ver.name, ms,
         flops / ms * 1e-9, bytes / ms * 1e-6);
}

// ---- backward ----
typedef void (*BackwardFn)(bf16*, bf16*, bf16*, float*, const bf16*, const bf16*, const float*, const bf16*,
                           const bf16*, const bf16*, int, int, int, int, int, cudaStream_t);
struct BackwardVersion {
  const char* name;
  BackwardFn fn;
  bool slow;
};
static const BackwardVersion backward_versions[] = {
    {"backward generic (fp32 FMA)", attention_generic_backward, true},
    {"backward dispatch (tensor cores at 64/128)", softmax_attention_backward, false},
};

bool validate_backward(const BackwardVersion& ver, int d) {
  const int B = 2, T = 300, H = 8, Hkv = 2;
  DeviceInputs in(B, T, H, Hkv, d, 4321 + d, true);
  std::vector<float> rq(in.nq), rk(in.nkv), rv(in.nkv);
  ref::softmax_attention_backward<float>(rq.data(), rk.data(), rv.data(), in.hdout.data(), in.hq.data(), in.hk.data(),
                                         in.hv.data(), B, T, H, Hkv, d);
  softmax_attention_forward(in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  ver.fn(in.dq, in.dk, in.dv, in.delta, in.dout, in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  auto rel = [](const std::vector<float>& a, const std::vector<float>& r) {
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < r.size(); i++) d2 += ((double)a[i] - r[i]) * ((double)a[i] - r[i]), r2 += (double)r[i] * r[i];
    return std::sqrt(d2 / r2);
  };
  const double eq = rel(download_bf16(in.dq, in.nq), rq), ek = rel(download_bf16(in.dk, in.nkv), rk);
  const double ev = rel(download_bf16(in.dv, in.nkv), rv);
  const bool ok = eq <= 1e-2 && ek <= 1e-2 && ev <= 1e-2;  // NaN fails
  printf("  d=%3d  %-46s dq %.2e  dk %.2e  dv %.2e  %s\n", d, ver.name, eq, ek, ev, ok ? "ok" : "FAIL");
  return ok;
}

void benchmark_backward(const BackwardVersion& ver, DeviceInputs& in) {
  const int B = in.B, T = in.T, H = in.H, Hkv = in.Hkv, d = in.d;
  softmax_attention_forward(in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0);
  const int warmup = ver.slow ? 1 : 3, iters = ver.slow ? 3 : 20;
  auto run = [&] { ver.fn(in.dq, in.dk, in.dv, in.delta, in.dout, in.out, in.lse, in.q, in.k, in.v, B, T, H, Hkv, d, 0); };
  for (int i = 0; i < warmup; i++) run();
  GpuTimer timer;
  timer.start();
  for (int i = 0; i < iters; i++) run();
  const double ms = timer.stop_ms() / iters;
  const double flops = 2.5 * 2.0 * 2.0 * B * H * (double)T * T * d / 2.0;
  const double bytes = 2.0 * (4 * in.nq + 4 * in.nkv) + 8.0 * B * H * T;
  printf("  d=%3d T=%5d B=%d  %-46s %8.3f ms  %6.1f TFLOP/s  %7.1f GB/s\n", d, T, B, ver.name, ms,
         flops / ms * 1e-9, bytes / ms * 1e-6);
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

  printf("validation (B=2, T=300, H=8, Hkv=2; rel. L2 error of out vs fp32 CPU reference, max abs lse error)\n");
  bool all_ok = true;
  for (int d : {64, 128})
    for (const Version& ver : versions)
      if (ver.d == 0 || ver.d == d) all_ok &= validate(ver, d);
  printf("backward validation (same shape; rel. L2 errors of dq, dk, dv vs fp32 CPU reference)\n");
  for (int d : {64, 128})
    for (const BackwardVersion& ver : backward_versions) all_ok &= validate_backward(ver, d);

  printf("benchmark (H=32, Hkv=8, B*T=8192; causal FLOPs)\n");
  const int H = 32, Hkv = 8;
  for (int d : {128, 64})
    for (int T : {1024, 4096, 16384}) {
      if (quick && T > 1024) continue;
      DeviceInputs in(std::max(1, 8192 / T), T, H, Hkv, d, 99 + T + d, false);
      for (const Version& ver : versions)
        if ((ver.d == 0 || ver.d == d) && (!ver.slow || T == 1024)) benchmark(ver, in);
      for (const BackwardVersion& ver : backward_versions)
        if (!ver.slow || T == 1024) benchmark_backward(ver, in);
    }
  printf(all_ok ? "all versions valid\n" : "VALIDATION FAILED\n");
  return all_ok ? 0 : 1;
}
