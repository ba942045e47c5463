// test/test_optim.cpp: CPU checks of reference/optim_ref.h: the AdamW reference against a two-step
// example worked out by hand from PyTorch's AdamW formula, the gradient norm and clip coefficient,
// ReduceLROnPlateau on scripted loss sequences (the lr PyTorch gives after every evaluation, derived
// in the comments), the cosine schedule's endpoints, and schedule state surviving a byte copy.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "reference/optim_ref.h"

namespace {

// The worked example. Two parameters, lr 0.1, weight decay 0.01, betas (0.9, 0.999), eps 1e-8.
//   p0 = [1, -2];  step 1 grads g1 = [0.5, 0];  step 2 grads g2 = [-0.25, 3].
// PyTorch AdamW (step t): p *= 1 - lr*wd; m = m + (1-b1)(g-m); v = b2 v + (1-b2) g^2;
//   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
//
// Element 0.
//  t=1: p = 1 * (1 - 0.001) = 0.999;  m = 0.1 * 0.5 = 0.05;  v = 0.001 * 0.25 = 0.00025;
//       1 - b1 = 0.1, 1 - b2 = 0.001; step size 0.1 / 0.1 = 1; denom = sqrt(0.00025)/sqrt(0.001) + 1e-8
//       = 0.5 + 1e-8;  p = 0.999 - 0.05 / (0.5 + 1e-8) = 0.999 - 0.099999998 = 0.899000002.
//  t=2: p = 0.899000002 * 0.999 = 0.898101001998;  m = 0.05 + 0.1 (-0.25 - 0.05) = 0.02;
//       v = 0.00025 * 0.999 + 0.001 * 0.0625 = 0.00031225;  1 - b1^2 = 0.19, 1 - b2^2 = 0.001999;
//       denom = sqrt(0.00031225 / 0.001999) + 1e-8 = 0.3952265... ;
//       p = 0.898101001998 - (0.1 / 0.19) * 0.02 / 0.3952265... = 0.8714672987058...
// Element 1 (zero gradient at t=1: only the decoupled decay acts, the moments stay 0).
//  t=1: p = -2 * 0.999 = -1.998;  m = v = 0;  update 0 / (0 + 1e-8) = 0.
//  t=2: p = -1.998 * 0.999 = -1.996002;  m = 0.1 * 3 = 0.3;  v = 0.001 * 9 = 0.009;
//       denom = sqrt(0.009 / 0.001999) + 1e-8 = 2.1218509... ;
//       p = -1.996002 - (0.1 / 0.19) * 0.3 / 2.1218509... = -2.0704156820...
const double kP1[2] = {0.899000002, -1.998};
const double kM1[2] = {0.05, 0.0};
const double kV1[2] = {0.00025, 0.0};
const double kP2[2] = {0.8714672987058463, -2.0704156820059967};
const double kM2[2] = {0.02, 0.3};
const double kV2[2] = {0.00031225, 0.009};

AdamWHyper example_hyper() {
  AdamWHyper h;
  h.beta1 = 0.9;
  h.beta2 = 0.999;
  h.eps = 1e-8;
  h.weight_decay = 0.01;
  return h;
}

double rel(double got, double want) { return std::fabs(got - want) / std::max(std::fabs(want), 1e-30); }

}  // namespace

// The closed-form values above. In double the only differences are the roundings of the decimal
// constants and of a dozen operations: 1e-12 relative is far above them and far below any formula
// mistake (a missing bias correction or decay changes the result in the 3rd digit).
TEST(OptimRef, AdamWTwoStepsMatchHandComputed) {
  const AdamWHyper h = example_hyper();
  double p[2] = {1.0, -2.0}, m[2] = {0, 0}, v[2] = {0, 0};
  const double g1[2] = {0.5, 0.0}, g2[2] = {-0.25, 3.0};
  ref::adamw_step<double>(p, m, v, g1, 2, h, 0.1, 1);
  for (int i = 0; i < 2; i++) {
    EXPECT_LE(std::fabs(p[i] - kP1[i]), 1e-12 * std::fabs(kP1[i])) << i;
    EXPECT_LE(std::fabs(m[i] - kM1[i]), 1e-12 * std::fabs(kM1[i])) << i;  // exactly 0 for element 1
    EXPECT_LE(std::fabs(v[i] - kV1[i]), 1e-12 * std::fabs(kV1[i])) << i;
  }
  ref::adamw_step<double>(p, m, v, g2, 2, h, 0.1, 2);
  for (int i = 0; i < 2; i++) {
    EXPECT_LE(rel(p[i], kP2[i]), 1e-12) << i;
    EXPECT_LE(rel(m[i], kM2[i]), 1e-12) << i;
    EXPECT_LE(rel(v[i], kV2[i]), 1e-12) << i;
  }
}

// The fp32 instantiation (what the GPU kernel is compared with) gives the same numbers to fp32
// accuracy: a few roundings of 6e-8 each, bounded by 1e-6.
TEST(OptimRef, AdamWFloatMatchesHandComputed) {
  const AdamWHyper h = example_hyper();
  float p[2] = {1.f, -2.f}, m[2] = {0, 0}, v[2] = {0, 0};
  const float g1[2] = {0.5f, 0.f}, g2[2] = {-0.25f, 3.f};
  ref::adamw_step<float>(p, m, v, g1, 2, h, 0.1, 1);
  ref::adamw_step<float>(p, m, v, g2, 2, h, 0.1, 2);
  for (int i = 0; i < 2; i++) {
    ASSERT_TRUE(std::isfinite(p[i]));
    EXPECT_LE(rel(p[i], kP2[i]), 1e-6) << i;
    EXPECT_LE(rel(m[i], kM2[i]), 1e-6) << i;
    EXPECT_LE(rel(v[i], kV2[i]), 1e-6) << i;
  }
}

// grad_scale and clip_coef multiply the gradient before anything else: a step on g with scale s
// equals a step on s*g.
TEST(OptimRef, AdamWGradScaleIsAPlainMultiplier) {
  Rng rng(3);
  const int n = 257;
  std::vector<double> p(n), g(n), gs(n);
  for (int i = 0; i < n; i++) { p[i] = rng.normal(); g[i] = rng.normal(); gs[i] = g[i] * 0.125 * 0.5; }
  std::vector<double> pa = p, pb = p, ma(n, 0), va(n, 0), mb(n, 0), vb(n, 0);
  AdamWHyper h = example_hyper();
  for (int t = 1; t <= 3; t++) {
    ref::adamw_step<double>(pa.data(), ma.data(), va.data(), g.data(), n, h, 1e-2, t, 0.125, 0.5);
    ref::adamw_step<double>(pb.data(), mb.data(), vb.data(), gs.data(), n, h, 1e-2, t);
  }
  for (int i = 0; i < n; i++) EXPECT_LE(rel(pa[i], pb[i]), 1e-14) << i;
}

TEST(OptimRef, GradNormAndClipCoefficient) {
  const float g[3] = {3.f, 0.f, -4.f};
  EXPECT_EQ(ref::grad_sumsq(g, 3), 25.0);
  EXPECT_EQ(ref::grad_sumsq(g, 3, 2.0), 100.0);
  // torch.nn.utils.clip_grad_norm_(max_norm=1) on a norm-5 gradient scales by 1 / (5 + 1e-6).
  EXPECT_DOUBLE_EQ(ref::clip_coefficient(5.0, 1.0), 1.0 / (5.0 + 1e-6));
  EXPECT_EQ(ref::clip_coefficient(0.5, 1.0), 1.0);  // below the threshold: untouched
  EXPECT_EQ(ref::clip_coefficient(5.0, 0.0), 1.0);  // clipping off
}

// ReduceLROnPlateau(mode='min', factor=0.1, patience=10, threshold=1e-4, threshold_mode='rel',
// cooldown=0, min_lr=1e-5, eps=1e-8) on optimizer lr 1e-2, as LoLCATs configures it. The lr after
// each evaluation, worked out from PyTorch's step():
//   is_better(a, best) = a < best * (1 - 1e-4); otherwise num_bad += 1; when num_bad > patience (10):
//   new = max(old * 0.1, min_lr), applied only if old - new > 1e-8, and num_bad = 0.
//   eval 1        1.0      better than best=+inf           best 1.0, bad 0     lr 1e-2
//   eval 2        0.99995  not < 1.0*0.9999 = 0.9999       bad 1               lr 1e-2
//   evals 3-11    1.0 x9                                   bad 2..10           lr 1e-2 (10 is not > 10)
//   eval 12       1.0                                      bad 11 > 10: reduce lr 1e-2*0.1, bad 0
//   eval 13       0.5      better                          best 0.5            lr 1e-3
//   eval 14       0.4999   < 0.5*0.9999 = 0.49995: better  best 0.4999         lr 1e-3
//   evals 15-24   NaN x10  NaN is never better             bad 1..10           lr 1e-3
//   eval 25       0.6      worse                           bad 11: reduce      lr 1e-3*0.1
//   evals 26-35   2.0 x10                                  bad 1..10           lr 1e-4
//   eval 36       2.0                                      bad 11: reduce to max(1e-5, 1e-5); old-new
//                                                          = 9e-5 > 1e-8       lr 1e-5
//   evals 37-47   2.0 x11  at 47 bad 11: new = max(1e-6, 1e-5) = 1e-5, old - new = 0: no change, bad 0
//   eval 48       0.1      better                          best 0.1            lr 1e-5
// The reduced values are written as the same double multiplications Python performs
// (0.01 * 0.1, then * 0.1, ...), so the comparison is exact.
TEST(OptimSchedule, PlateauMatchesPyTorchSequence) {
  const double lr0 = 1e-2, lr1 = lr0 * 0.1, lr2 = lr1 * 0.1, lr3 = std::max(lr2 * 0.1, 1e-5);
  std::vector<double> metric, want;
  auto add = [&](int count, double m, double lr) { for (int i = 0; i < count; i++) { metric.push_back(m); want.push_back(lr); } };
  add(1, 1.0, lr0);
  add(1, 0.99995, lr0);
  add(9, 1.0, lr0);
  add(1, 1.0, lr1);
  add(1, 0.5, lr1);
  add(1, 0.4999, lr1);
  add(10, NAN, lr1);
  add(1, 0.6, lr2);
  add(10, 2.0, lr2);
  add(1, 2.0, lr3);
  add(11, 2.0, lr3);
  add(1, 0.1, lr3);
  ASSERT_EQ(metric.size(), 48u);
  LrSchedule s = lr_schedule_plateau(1e-2);
  ASSERT_EQ(lr_schedule_validate(s), "");
  EXPECT_EQ(lr_schedule_lr(s, 0), 1e-2);
  int reductions = 0;
  for (size_t e = 0; e < metric.size(); e++) {
    reductions += lr_schedule_on_eval(s, metric[e]) ? 1 : 0;
    EXPECT_EQ(lr_schedule_lr(s, 12345), want[e]) << "after evaluation " << e + 1;
  }
  EXPECT_EQ(reductions, 3);
  EXPECT_EQ(s.best, 0.1);
  EXPECT_EQ(s.num_evals, 48);
  EXPECT_EQ(s.num_bad_evals, 0);
  // The exact double values PyTorch prints for these groups.
  EXPECT_EQ(lr1, 0.001);
  EXPECT_EQ(lr3, 1e-05);
}

// Cooldown and a non-default factor, patience 1, threshold 0, cooldown 2, factor 0.5, lr 1.0, on a
// metric that never improves after the first evaluation:
//   eval 1: best 1, lr 1.     eval 2: bad 1 (not > 1), lr 1.     eval 3: bad 2 > 1: lr 0.5, cooldown 2.
//   eval 4: bad 1, in cooldown: counter 1, bad reset 0; lr 0.5.  eval 5: bad 1, counter 0, bad 0; lr 0.5.
//   eval 6: bad 1 (no cooldown left), lr 0.5.   eval 7: bad 2 > 1: lr 0.25, cooldown 2.
TEST(OptimSchedule, PlateauCooldown) {
  LrSchedule s = lr_schedule_plateau(1.0, 0.5, 1, 0.0, 2, 0.0);
  const double want[7] = {1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25};
  for (int e = 0; e < 7; e++) {
    lr_schedule_on_eval(s, 1.0);
    EXPECT_EQ(lr_schedule_lr(s, 0), want[e]) << "after evaluation " << e + 1;
  }
}

// Cosine with linear warmup: base 1e-3, min 1e-5, 10 warmup steps, floor reached at step 110.
TEST(OptimSchedule, CosineEndpoints) {
  const LrSchedule s = lr_schedule_cosine(1e-3, 1e-5, 10, 110);
  ASSERT_EQ(lr_schedule_validate(s), "");
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 0), 1e-4);          // first update: base / warmup, not 0
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 4), 5e-4);
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 9), 1e-3);          // end of warmup
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 10), 1e-3);         // cosine starts at the peak
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 60), (1e-3 + 1e-5) / 2);  // half way: the mean of the ends
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 110), 1e-5);        // the floor
  EXPECT_DOUBLE_EQ(lr_schedule_lr(s, 100000), 1e-5);     // and it stays there
  double prev = INFINITY;
  for (uint64_t t = 10; t <= 110; t++) {
    const double lr = lr_schedule_lr(s, t);
    EXPECT_LE(lr, prev) << t;
    prev = lr;
  }
  const LrSchedule no_warmup = lr_schedule_cosine(2e-3, 0.0, 0, 50);
  EXPECT_DOUBLE_EQ(lr_schedule_lr(no_warmup, 0), 2e-3);
  EXPECT_NEAR(lr_schedule_lr(no_warmup, 50), 0.0, 1e-18);
  // Evaluations do not touch a cosine or constant schedule.
  LrSchedule c = lr_schedule_constant(3e-4);
  EXPECT_FALSE(lr_schedule_on_eval(c, 1.0));
  EXPECT_EQ(lr_schedule_lr(c, 0), 3e-4);
  EXPECT_EQ(lr_schedule_lr(c, 999999), 3e-4);
}

// A checkpoint writes the struct's bytes; a resumed copy continues exactly like the original.
TEST(OptimSchedule, StateSurvivesByteCopy) {
  LrSchedule a = lr_schedule_plateau(1e-2, 0.1, 2);
  Rng rng(11);
  for (int e = 0; e < 9; e++) lr_schedule_on_eval(a, 1.0 + 0.1 * rng.uniform());
  unsigned char bytes[sizeof(LrSchedule)];
  memcpy(bytes, &a, sizeof a);
  LrSchedule b;
  memcpy(&b, bytes, sizeof b);
  for (int e = 0; e < 20; e++) {
    const double metric = 1.0 + 0.1 * rng.uniform();
    EXPECT_EQ(lr_schedule_on_eval(a, metric), lr_schedule_on_eval(b, metric));
    EXPECT_EQ(lr_schedule_lr(a, e), lr_schedule_lr(b, e));
  }
  EXPECT_EQ(memcmp(&a, &b, sizeof a), 0);
  EXPECT_LT(lr_schedule_lr(a, 0), 1e-2);  // the sequence did reduce, so state mattered
}

TEST(OptimSchedule, ValidateRejectsNonsense) {
  EXPECT_NE(lr_schedule_validate(lr_schedule_constant(0.0)), "");
  EXPECT_NE(lr_schedule_validate(lr_schedule_constant(NAN)), "");
  EXPECT_NE(lr_schedule_validate(lr_schedule_cosine(1e-3, 0, 100, 10)), "");
  EXPECT_NE(lr_schedule_validate(lr_schedule_plateau(1e-3, 1.5)), "");
  LrSchedule bad = lr_schedule_constant(1e-3);
  bad.kind = 7;
  EXPECT_NE(lr_schedule_validate(bad), "");
  EXPECT_STREQ(lr_schedule_name(LR_PLATEAU), "plateau");
}
