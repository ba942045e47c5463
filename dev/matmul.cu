/*
Kernel lab for the model's matmuls (llama.cuh, lt_matmul): how fast cuBLASLt runs each linear layer of a
Llama 3 8B forward at B*T = 8192 tokens, with the algorithm lt_matmul uses (cuBLASLt's first heuristic)
against every other candidate the heuristic offers. It answers one question: would timing candidates
(autotuning) beat the first heuristic, and by how much.

  make -C dev matmul
  dev/build/matmul            # N = 8192
  dev/build/matmul 16384      # another token count
  dev/build/matmul 8192 --sustained   # each candidate timed after ~0.3 s of back-to-back launches, i.e.
                                      # at the card's power limit, where a training step runs

Validation: each candidate's output is compared with the first heuristic's (same inputs): they may differ
in rounding only (max abs difference printed, relative to the output's max).
*/
#include <string>

#include "llama.cuh"

struct Shape {
  const char* name;
  int out, in;          // linear layer: out (N, out) = x (N, in) W^T
  cudaDataType_t type;  // output type
  bool accumulate;      // beta = 1 (residual adds into the fp32 stream)
};

int main(int argc, char** argv) {
  int N = 8192;
  bool sustained = false;
  for (int i = 1; i < argc; i++) {
    if (std::string(argv[i]) == "--sustained") sustained = true;
    else if ((N = atoi(argv[i])) < 1) fatal("usage: matmul [N tokens >= 1] [--sustained]; got '%s'", argv[i]);
  }
  const int D = 4096, F = 14336, Q = 4096, KV = 1024;  // Llama 3 8B (vocab 128256: the head runs in chunks of 16384)
  const Shape shapes[] = {
      {"qkv", Q + 2 * KV, D, CUDA_R_16BF, false},  {"o (+=, fp32 out)", D, Q, CUDA_R_32F, true},
      {"gate|up", 2 * F, D, CUDA_R_16BF, false},   {"down (+=, fp32 out)", D, F, CUDA_R_32F, true},
      {"head chunk", 16384, D, CUDA_R_32F, false}, {"o (bf16 out)", D, Q, CUDA_R_16BF, false},
  };
  Blas blas;
  blas.init();
  size_t max_w = 0, max_x = 0, max_o = 0;
  for (const Shape& s : shapes) {
    max_w = std::max(max_w, (size_t)s.out * s.in);
    max_x = std::max(max_x, (size_t)N * s.in);
    max_o = std::max(max_o, (size_t)N * s.out);
  }
  bf16* W = cuda_alloc<bf16>(max_w);
  bf16* X = cuda_alloc<bf16>(max_x);
  float* out = cuda_alloc<float>(max_o);  // big enough for either output type
  float* ref = cuda_alloc<float>(max_o);
  fill_normal_kernel<<<4096, 256>>>(W, max_w, 0.02f, 1);
  fill_normal_kernel<<<4096, 256>>>(X, max_x, 1.0f, 2);
  CUDA_LAUNCH_CHECK();
  GpuTimer timer;
  printf("N = %d tokens; TFLOP/s per candidate (median of 20 after 3 warm-ups%s); * = lt_matmul's choice\n", N,
         sustained ? " and ~0.3 s of back-to-back launches" : "");
  for (const Shape& s : shapes) {
    const int m = s.out, n = N, k = s.in;
    const float alpha = 1.f, beta = s.accumulate ? 1.f : 0.f;
    LtPlan p = lt_plan_create(true, false, m, n, k, k, k, s.type, m);  // as linear_forward calls lt_matmul
    cublasLtMatmulHeuristicResult_t res[16];
    const int found = lt_candidates(blas.lt, p, blas.workspace_bytes, res, 16);
    const double flops = 2.0 * m * n * k;
    const size_t out_bytes = (size_t)m * n * (s.type == CUDA_R_32F ? 4 : 2);
    printf("%-22s %6d x %5d x %5d:", s.name, n, m, k);
    for (int c = 0; c < found; c++) {
      auto launch = [&] {
        CUBLAS_CHECK(cublasLtMatmul(blas.lt, p.op, &alpha, W, p.la, X, p.lb, &beta, out, p.lc, out, p.lc, &res[c].algo,
                                    blas.workspace, blas.workspace_bytes, 0));
      };
      CUDA_CHECK(cudaMemset(out, 0, out_bytes));
      launch();
      // compare with candidate 0's output (both from a zeroed accumulator, one launch)
      if (c == 0) CUDA_CHECK(cudaMemcpy(ref, out, out_bytes, cudaMemcpyDeviceToDevice));
      double maxdiff = 0, maxref = 0;
      {
        const size_t cnt = std::min<size_t>((size_t)m * n, 1 << 20);  // a prefix is enough to catch a wrong algorithm
        std::vector<float> a(cnt), b(cnt);
        if (s.type == CUDA_R_32F) {
          CUDA_CHECK(cudaMemcpy(a.data(), out, cnt * 4, cudaMemcpyDeviceToHost));
          CUDA_CHECK(cudaMemcpy(b.data(), ref, cnt * 4, cudaMemcpyDeviceToHost));
        } else {
          std::vector<uint16_t> ha(cnt), hb(cnt);
          CUDA_CHECK(cudaMemcpy(ha.data(), out, cnt * 2, cudaMemcpyDeviceToHost));
          CUDA_CHECK(cudaMemcpy(hb.data(), ref, cnt * 2, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < cnt; i++) { a[i] = bf16_to_float(ha[i]); b[i] = bf16_to_float(hb[i]); }
        }
        for (size_t i = 0; i < cnt; i++) {
          maxdiff = std::max(maxdiff, (double)fabsf(a[i] - b[i]));
          maxref = std::max(maxref, (double)fabsf(b[i]));
        }
      }
      for (int w = 0; w < 3; w++) launch();
      if (sustained) {  // heat up: ~0.3 s of this candidate back to back
        timer.start();
        launch();
        const float one = timer.stop_ms();
        for (int w = 0; w < (int)(300.f / std::max(one, 0.01f)); w++) launch();
      }
      std::vector<float> ms;
      for (int r = 0; r < 20; r++) {
        timer.start();
        launch();
        ms.push_back(timer.stop_ms());
      }
      std::sort(ms.begin(), ms.end());
      printf(" %s%.0f", c == 0 ? "*" : "", flops / (ms[10] / 1e3) / 1e12);
      if (maxdiff > 1e-2 * maxref) printf("(WRONG %.2g)", maxdiff / maxref);
    }
    printf("\n");
    lt_plan_destroy(p);
  }
  cuda_free(W); cuda_free(X); cuda_free(out); cuda_free(ref);
  blas.destroy();
  return 0;
}
