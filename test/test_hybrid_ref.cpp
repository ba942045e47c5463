// test/test_hybrid_ref.cpp: the CPU reference of the hybrid attention (reference/hybrid_ref.h) against
// independent oracles: central finite differences for all six gradients (fp64), softmax attention when no
// key reaches the linear part, plain linear attention when the window factor vanishes, the region rules,
// the identity-initialised feature map, and the stage-1 MSE gradient.
#include <gtest/gtest.h>

#include <functional>

#include "common.h"
#include "reference/attention_ref.h"
#include "reference/hybrid_ref.h"
#include "test/test_util.h"

namespace {

using ref::HybridDims;

struct HybridInputs {
  std::vector<double> q, k, v, Wq, Wk, w, dy;
};

HybridInputs random_inputs(const HybridDims& p, uint64_t seed) {
  Rng rng(seed);
  HybridInputs in;
  auto fill = [&](std::vector<double>& x, size_t n, double scale) {
    x.resize(n);
    for (auto& e : x) e = scale * rng.normal();
  };
  fill(in.q, (size_t)p.B * p.T * p.H * p.d, 1.0);
  fill(in.k, (size_t)p.B * p.T * p.Hkv * p.d, 1.0);
  fill(in.v, (size_t)p.B * p.T * p.Hkv * p.d, 1.0);
  fill(in.Wq, (size_t)p.H * p.d * p.f, 0.7);  // random maps, not the identity: exercise every weight
  fill(in.Wk, (size_t)p.H * p.d * p.f, 0.7);
  in.w.resize(p.H);
  for (auto& e : in.w) e = -2.0 + 2.5 * rng.uniform();  // gamma in about (0.12, 0.62)
  fill(in.dy, (size_t)p.B * p.T * p.H * p.d, 1.0);
  return in;
}

// L = sum(dy * y): its gradient is what hybrid_attention_backward returns for upstream gradient dy.
double loss_of(const HybridInputs& in, const HybridDims& p) {
  std::vector<double> y(in.dy.size());
  ref::hybrid_attention_forward(y.data(), in.q.data(), in.k.data(), in.v.data(), in.Wq.data(), in.Wk.data(),
                                in.w.data(), p);
  double L = 0;
  for (size_t i = 0; i < y.size(); i++) L += in.dy[i] * y[i];
  return L;
}

// Checks one gradient tensor against central differences of L on `n_check` of its elements (all of
// them when n_check >= size). Step 1e-5 on O(1) inputs: truncation ~1e-10 and round-off ~1e-10 relative,
// far under the 1e-5 bound; the max over the window is piecewise smooth, and random inputs keep the
// top two scores of a row ~0.1 apart, so a step never switches the arg max.
void check_gradient(const char* name, HybridInputs in, std::vector<double>* param_of(HybridInputs&),
                    const std::vector<double>& analytic, const HybridDims& p, size_t n_check, uint64_t seed) {
  std::vector<double>& x = *param_of(in);
  ASSERT_EQ(x.size(), analytic.size()) << name;
  std::vector<size_t> idx;
  if (n_check >= x.size()) {
    for (size_t i = 0; i < x.size(); i++) idx.push_back(i);
  } else {
    Rng rng(seed);
    for (size_t i = 0; i < n_check; i++) idx.push_back((size_t)(rng.uniform() * x.size()));
  }
  const double h = 1e-5;
  std::vector<double> fd, an;
  for (size_t i : idx) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double Lp = loss_of(in, p);
    x[i] = x0 - h;
    const double Lm = loss_of(in, p);
    x[i] = x0;
    fd.push_back((Lp - Lm) / (2 * h));
    an.push_back(analytic[i]);
  }
  const double err = rel_error(an, fd);
  EXPECT_LE(err, 1e-5) << name << " rel error " << err << " (T=" << p.T << " window=" << p.window
                       << " geometry=" << p.geometry << " sinks=" << p.sinks << " H/Hkv=" << p.H / p.Hkv << ")";
}

void check_all_gradients(const HybridDims& p, size_t n_check, uint64_t seed) {
  HybridInputs in = random_inputs(p, seed);
  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size());
  // dW buffers start non-zero: the backward must ACCUMULATE into them.
  std::vector<double> dWq(in.Wq.size(), 0.25), dWk(in.Wk.size(), -0.5), dw(in.w.size(), 1.0);
  ref::hybrid_attention_backward(dq.data(), dk.data(), dv.data(), dWq.data(), dWk.data(), dw.data(), in.dy.data(),
                                 in.q.data(), in.k.data(), in.v.data(), in.Wq.data(), in.Wk.data(), in.w.data(), p);
  for (auto& e : dWq) e -= 0.25;
  for (auto& e : dWk) e += 0.5;
  for (auto& e : dw) e -= 1.0;
  check_gradient("dq", in, [](HybridInputs& x) { return &x.q; }, dq, p, n_check, seed + 1);
  check_gradient("dk", in, [](HybridInputs& x) { return &x.k; }, dk, p, n_check, seed + 2);
  check_gradient("dv", in, [](HybridInputs& x) { return &x.v; }, dv, p, n_check, seed + 3);
  check_gradient("dWq", in, [](HybridInputs& x) { return &x.Wq; }, dWq, p, n_check, seed + 4);
  check_gradient("dWk", in, [](HybridInputs& x) { return &x.Wk; }, dWk, p, n_check, seed + 5);
  check_gradient("dw", in, [](HybridInputs& x) { return &x.w; }, dw, p, n_check, seed + 6);
}

HybridDims dims(int B, int T, int H, int Hkv, int d, int f, int window, int geometry, int sinks) {
  HybridDims p;
  p.B = B; p.T = T; p.H = H; p.Hkv = Hkv; p.d = d; p.f = f;
  p.window = window; p.geometry = geometry; p.sinks = sinks;
  return p;
}

}  // namespace

// Small T and window 4: T = 19 leaves a partial last chunk; every element of every gradient is checked.
TEST(HybridRef, GradientsMatchFiniteDifferencesSmall) {
  uint64_t seed = 100;
  for (int geometry : {ref::HYBRID_REF_TERRACE, ref::HYBRID_REF_SLIDING})
    for (int sinks : {0, 2})
      for (int group : {1, 2}) {
        HybridDims p = dims(2, 19, 2, 2 / group, 4, 3, 4, geometry, sinks);
        check_all_gradients(p, SIZE_MAX, seed++);
      }
}

// The real window (64) at T = 130: three chunks, the last with 2 positions, so both parts and the chunk
// boundaries are exercised; 40 random elements per gradient tensor (every element of the small ones).
TEST(HybridRef, GradientsMatchFiniteDifferencesWindow64) {
  uint64_t seed = 200;
  for (int geometry : {ref::HYBRID_REF_TERRACE, ref::HYBRID_REF_SLIDING})
    for (int sinks : {0, 2})
      for (int group : {1, 2}) {
        HybridDims p = dims(1, 130, 2, 2 / group, 8, 4, 64, geometry, sinks);
        check_all_gradients(p, 40, seed++);
      }
}

// The region rules, spelled out for window 4.
TEST(HybridRef, RegionRules) {
  HybridDims t = dims(1, 19, 1, 1, 4, 2, 4, ref::HYBRID_REF_TERRACE, 0);
  // Query 9 is in chunk 2: chunk 1 (4..7) and 8..9 softmax, chunk 0 linear, 10.. invisible.
  for (int j = 0; j < 19; j++) EXPECT_EQ(ref::hybrid_key_region(t, 9, j), j > 9 ? 0 : j >= 4 ? 1 : 2) << j;
  // Query 4 (first of chunk 1) sees chunk 0 through softmax: 5 window keys, no linear ones.
  for (int j = 0; j <= 4; j++) EXPECT_EQ(ref::hybrid_key_region(t, 4, j), 1);
  HybridDims s = dims(1, 19, 1, 1, 4, 2, 4, ref::HYBRID_REF_SLIDING, 0);
  // Sliding: query 9 has softmax keys 6..9 and linear keys 0..5.
  for (int j = 0; j <= 9; j++) EXPECT_EQ(ref::hybrid_key_region(s, 9, j), j >= 6 ? 1 : 2) << j;
  // Sinks move the first positions to the softmax part for every query.
  s.sinks = 2;
  t.sinks = 2;
  for (int j = 0; j <= 9; j++) EXPECT_EQ(ref::hybrid_key_region(s, 9, j), (j >= 6 || j < 2) ? 1 : 2) << j;
  for (int j = 0; j <= 9; j++) EXPECT_EQ(ref::hybrid_key_region(t, 9, j), (j >= 4 || j < 2) ? 1 : 2) << j;
}

// When no key of any query reaches the linear part, the output is plain causal softmax attention and the
// window factor cancels (terrace: T <= 2w; sliding: T <= w).
TEST(HybridRef, EqualsSoftmaxAttentionWithoutLinearPart) {
  for (int geometry : {ref::HYBRID_REF_TERRACE, ref::HYBRID_REF_SLIDING}) {
    const int T = geometry == ref::HYBRID_REF_TERRACE ? 128 : 64;
    HybridDims p = dims(2, T, 4, 2, 16, 8, 64, geometry, 0);
    HybridInputs in = random_inputs(p, 7 + geometry);
    std::vector<double> y(in.dy.size()), y_soft(in.dy.size());
    ref::hybrid_attention_forward(y.data(), in.q.data(), in.k.data(), in.v.data(), in.Wq.data(), in.Wk.data(),
                                  in.w.data(), p);
    ref::softmax_attention_forward(y_soft.data(), in.q.data(), in.k.data(), in.v.data(), p.B, p.T, p.H, p.Hkv, p.d);
    EXPECT_LE(rel_error(y, y_soft), 1e-13) << "geometry " << geometry;
  }
}

// With gamma ~ 1e-26 the window contributes nothing measurable wherever a linear key exists, so those rows
// are plain linear attention over the linear region with the Hedgehog maps; rows with no linear key stay
// softmax attention (gamma cancels). The oracle is written out here directly.
TEST(HybridRef, EqualsLinearAttentionWhenWindowVanishes) {
  for (int geometry : {ref::HYBRID_REF_TERRACE, ref::HYBRID_REF_SLIDING}) {
    HybridDims p = dims(1, 150, 2, 1, 8, 4, 32, geometry, 3);
    HybridInputs in = random_inputs(p, 11 + geometry);
    for (auto& e : in.w) e = -60.0;
    std::vector<double> y(in.dy.size());
    ref::hybrid_attention_forward(y.data(), in.q.data(), in.k.data(), in.v.data(), in.Wq.data(), in.Wk.data(),
                                  in.w.data(), p);
    std::vector<double> expect, got;
    for (int h = 0; h < p.H; h++)
      for (int i = 0; i < p.T; i++) {
        // Oracle: phi(x) = [softmax(xW), softmax(-xW)] computed here from scratch.
        auto phi = [&](const double* x, const double* W) {
          std::vector<double> u(p.f, 0.0), out(2 * p.f);
          for (int c = 0; c < p.d; c++)
            for (int e = 0; e < p.f; e++) u[e] += x[c] * W[c * p.f + e];
          double sp = 0, sm = 0;
          for (int e = 0; e < p.f; e++) { sp += std::exp(u[e]); sm += std::exp(-u[e]); }
          for (int e = 0; e < p.f; e++) { out[e] = std::exp(u[e]) / sp; out[p.f + e] = std::exp(-u[e]) / sm; }
          return out;
        };
        const double* qi = &in.q[((size_t)i * p.H + h) * p.d];
        std::vector<double> fq = phi(qi, &in.Wq[(size_t)h * p.d * p.f]);
        std::vector<double> num(p.d, 0.0);
        double den = 0;
        int n_linear = 0;
        for (int j = 0; j <= i; j++) {
          const bool linear = j >= p.sinks && (geometry == ref::HYBRID_REF_TERRACE ? j / p.window <= i / p.window - 2
                                                                                    : j <= i - p.window);
          if (!linear) continue;
          n_linear++;
          std::vector<double> fk = phi(&in.k[(size_t)j * p.d], &in.Wk[(size_t)h * p.d * p.f]);
          double wgt = 0;
          for (int e = 0; e < 2 * p.f; e++) wgt += fq[e] * fk[e];
          den += wgt;
          for (int c = 0; c < p.d; c++) num[c] += wgt * in.v[(size_t)j * p.d + c];
        }
        if (n_linear == 0) continue;
        for (int c = 0; c < p.d; c++) {
          expect.push_back(num[c] / den);
          got.push_back(y[((size_t)i * p.H + h) * p.d + c]);
        }
      }
    ASSERT_GT(expect.size(), 0u);
    EXPECT_LE(rel_error(got, expect), 1e-12) << "geometry " << geometry;
  }
}

// Identity init: W = [I_f ; 0], so phi(x) = [softmax(x_0..f-1), softmax(-x_0..f-1)].
TEST(HybridRef, IdentityInitFeatureMap) {
  const int H = 2, d = 12, f = 8;
  std::vector<double> W((size_t)H * d * f, 7.0);
  ref::hybrid_identity_init(W.data(), H, d, f);
  Rng rng(3);
  std::vector<double> x(d), phi(2 * f), pbuf(2 * f);
  for (auto& e : x) e = rng.normal();
  ref::hedgehog_map(phi.data(), pbuf.data(), x.data(), &W[(size_t)d * f], d, f);
  double sp = 0, sm = 0;
  for (int j = 0; j < f; j++) { sp += std::exp(x[j]); sm += std::exp(-x[j]); }
  for (int j = 0; j < f; j++) {
    EXPECT_NEAR(phi[j], std::exp(x[j]) / sp, 1e-15);
    EXPECT_NEAR(phi[f + j], std::exp(-x[j]) / sm, 1e-15);
  }
  // d < f: only the diagonal of the first d columns is one.
  std::vector<double> Ws((size_t)4 * 6);
  ref::hybrid_identity_init(Ws.data(), 1, 4, 6);
  for (int i = 0; i < 4; i++)
    for (int j = 0; j < 6; j++) EXPECT_EQ(Ws[i * 6 + j], i == j ? 1.0 : 0.0);
}

// The stage-1 loss helper: the MSE value and dy = scale * dMSE/dy_pred against central differences.
TEST(HybridRef, Stage1MseAndGradient) {
  Rng rng(5);
  const size_t n = 37;
  std::vector<double> yp(n), yt(n), dy(n);
  for (size_t i = 0; i < n; i++) { yp[i] = rng.normal(); yt[i] = rng.normal(); }
  const double scale = 1000.0 / 32;
  const double mse = ref::hybrid_stage1_mse(dy.data(), yp.data(), yt.data(), n, scale);
  double expect = 0;
  for (size_t i = 0; i < n; i++) expect += (yp[i] - yt[i]) * (yp[i] - yt[i]);
  EXPECT_NEAR(mse, expect / n, 1e-14);
  std::vector<double> fd(n);
  for (size_t i = 0; i < n; i++) {
    const double h = 1e-6, x0 = yp[i];
    yp[i] = x0 + h;
    const double Lp = scale * ref::hybrid_stage1_mse<double>(nullptr, yp.data(), yt.data(), n, 1.0);
    yp[i] = x0 - h;
    const double Lm = scale * ref::hybrid_stage1_mse<double>(nullptr, yp.data(), yt.data(), n, 1.0);
    yp[i] = x0;
    fd[i] = (Lp - Lm) / (2 * h);
  }
  EXPECT_LE(rel_error(dy, fd), 1e-7);
}

// The float instantiation computes the same function (model-level references use it).
TEST(HybridRef, FloatMatchesDouble) {
  HybridDims p = dims(1, 100, 2, 1, 16, 8, 16, ref::HYBRID_REF_SLIDING, 1);
  HybridInputs in = random_inputs(p, 21);
  std::vector<double> y(in.dy.size());
  ref::hybrid_attention_forward(y.data(), in.q.data(), in.k.data(), in.v.data(), in.Wq.data(), in.Wk.data(),
                                in.w.data(), p);
  auto to_f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  std::vector<float> qf = to_f(in.q), kf = to_f(in.k), vf = to_f(in.v), Wqf = to_f(in.Wq), Wkf = to_f(in.Wk),
                     wf = to_f(in.w), yf(y.size());
  ref::hybrid_attention_forward(yf.data(), qf.data(), kf.data(), vf.data(), Wqf.data(), Wkf.data(), wf.data(), p);
  EXPECT_LE(rel_error(yf, y), 1e-5);
}
