// test/test_attention_ref.cpp: the CPU reference of the teacher's causal softmax attention
// (reference/attention_ref.h): its backward against central finite differences of its forward, in
// double, with GQA; and the logsumexp it reports against a direct computation.
#include <gtest/gtest.h>

#include "reference/attention_ref.h"
#include "test/test_util.h"

namespace {

// L = sum(out * g) for a fixed random g: dL/dx is exactly what the backward computes with dout = g.
double loss(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
            const std::vector<double>& g, int B, int T, int H, int Hkv, int d) {
  std::vector<double> out(q.size());
  ref::softmax_attention_forward<double>(out.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, d);
  double L = 0;
  for (size_t i = 0; i < out.size(); i++) L += out[i] * g[i];
  return L;
}

TEST(AttentionRef, BackwardMatchesFiniteDifferences) {
  struct Shape { int B, T, H, Hkv, d; };
  for (const Shape s : {Shape{1, 6, 2, 2, 4}, Shape{2, 5, 4, 1, 3}, Shape{1, 7, 6, 2, 8}}) {
    const size_t nq = (size_t)s.B * s.T * s.H * s.d, nkv = (size_t)s.B * s.T * s.Hkv * s.d;
    Rng rng(17 + s.T * 31 + s.H);
    std::vector<double> q(nq), k(nkv), v(nkv), g(nq);
    for (auto& x : q) x = 1.5 * rng.normal();
    for (auto& x : k) x = rng.normal();
    for (auto& x : v) x = rng.normal();
    for (auto& x : g) x = rng.normal();
    std::vector<double> dq(nq), dk(nkv), dv(nkv);
    ref::softmax_attention_backward<double>(dq.data(), dk.data(), dv.data(), g.data(), q.data(), k.data(), v.data(),
                                            s.B, s.T, s.H, s.Hkv, s.d);
    // Central differences: truncation error ~eps^2 = 1e-10 and rounding ~1e-16 / eps = 1e-11, relative
    // to gradients of order 1, so 1e-5 (the project's bar for fp64 checks) has ample margin.
    const double eps = 1e-5;
    auto numeric = [&](std::vector<double>& x) {
      std::vector<double> grad(x.size());
      for (size_t i = 0; i < x.size(); i++) {
        const double x0 = x[i];
        x[i] = x0 + eps;
        const double lp = loss(q, k, v, g, s.B, s.T, s.H, s.Hkv, s.d);
        x[i] = x0 - eps;
        const double lm = loss(q, k, v, g, s.B, s.T, s.H, s.Hkv, s.d);
        x[i] = x0;
        grad[i] = (lp - lm) / (2 * eps);
      }
      return grad;
    };
    SCOPED_TRACE(::testing::Message() << "B=" << s.B << " T=" << s.T << " H=" << s.H << " Hkv=" << s.Hkv << " d=" << s.d);
    EXPECT_LE(rel_error(dq, numeric(q)), 1e-5);
    EXPECT_LE(rel_error(dk, numeric(k)), 1e-5);
    EXPECT_LE(rel_error(dv, numeric(v)), 1e-5);
  }
}

TEST(AttentionRef, LogSumExp) {
  const int B = 2, T = 9, H = 4, Hkv = 2, d = 5;
  const size_t nq = (size_t)B * T * H * d, nkv = (size_t)B * T * Hkv * d;
  Rng rng(5);
  std::vector<double> q(nq), k(nkv), v(nkv), out(nq), lse((size_t)B * H * T);
  for (auto& x : q) x = 3 * rng.normal();
  for (auto& x : k) x = rng.normal();
  for (auto& x : v) x = rng.normal();
  ref::softmax_attention_forward<double>(out.data(), q.data(), k.data(), v.data(), B, T, H, Hkv, d, lse.data());
  for (int b = 0; b < B; b++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < T; i++) {
        double sum = 0;  // direct sum without the max shift: fine at these magnitudes
        for (int j = 0; j <= i; j++) {
          double dot = 0;
          for (int c = 0; c < d; c++)
            dot += q[(((size_t)b * T + i) * H + h) * d + c] * k[(((size_t)b * T + j) * Hkv + h / (H / Hkv)) * d + c];
          sum += std::exp(dot / std::sqrt((double)d));
        }
        EXPECT_NEAR(lse[((size_t)b * H + h) * T + i], std::log(sum), 1e-12);
      }
}

}  // namespace
