// reference/optim_ref.h: the optimizer's CPU oracle and the learning-rate schedules.
//  - ref::adamw_step: one AdamW step with PyTorch's torch.optim.AdamW semantics (decoupled weight
//    decay, bias correction), plain loops, templated on the scalar type. The CUDA kernel in optim.cuh
//    is checked against it.
//  - ref::grad_sumsq / ref::clip_coefficient: the global gradient norm and PyTorch's
//    clip_grad_norm_ coefficient.
//  - AdamWHyper, adamw_coefficients: the hyperparameters and the per-step scalars (bias corrections)
//    derived from them on the host, shared by the reference and the CUDA step so both use one formula.
//  - LrSchedule: constant, cosine with linear warmup, and reduce-on-plateau exactly as PyTorch's
//    ReduceLROnPlateau(mode='min', threshold_mode='rel'). Host-only and used by the CPU and the CUDA
//    trainer alike: this is the one copy of the schedule logic. The struct is POD (fixed layout, no
//    pointers) so a checkpoint stores it with one write and a resume continues it exactly.
// No CUDA in this file: it must compile with the host compiler alone.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

// ---- AdamW hyperparameters -----------------------------------------------------------------------

// Defaults are torch.optim.AdamW's, except weight decay (LoLCATs trains with 0; PyTorch's default is
// 1e-2). Stored in double, as PyTorch holds them (Python floats): the per-step scalars are derived in
// double and only then rounded to fp32 for the kernel, so 1 - beta1 is 0.1, not 1 - 0.9f.
// The learning rate is not here: it comes from the schedule at every step.
struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 0.0;  // global-norm clipping threshold; 0 = off (the LoLCATs 8B code does not clip)
};
static_assert(std::is_trivially_copyable<AdamWHyper>::value && sizeof(AdamWHyper) == 40, "AdamWHyper is stored raw");

// The scalars of step number `step` (1-based: the first update is step 1, as PyTorch's state['step']
// after its increment). PyTorch computes these on the host in double and hands them to its
// elementwise kernels as fp32 scalars; we do the same.
struct AdamWCoefficients {
  double decay_factor;      // 1 - lr * weight_decay          (param.mul_ before the update)
  double one_minus_beta1;   // lerp weight for the first moment
  double one_minus_beta2;   // addcmul value for the second moment
  double step_size;         // lr / (1 - beta1^step)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};
inline AdamWCoefficients adamw_coefficients(const AdamWHyper& h, double lr, int64_t step) {
  AdamWCoefficients c;
  const double b1 = h.beta1, b2 = h.beta2;
  c.decay_factor = 1.0 - lr * h.weight_decay;
  c.one_minus_beta1 = 1.0 - b1;
  c.one_minus_beta2 = 1.0 - b2;
  c.step_size = lr / (1.0 - std::pow(b1, (double)step));
  c.bias_correction2_sqrt = std::sqrt(1.0 - std::pow(b2, (double)step));
  return c;
}

namespace ref {

// One AdamW step over n parameters, in place, PyTorch's order of operations:
//   g  = grad * grad_scale * clip_coef      (grad_scale: 1/accum_steps for an accumulated sum)
//   p *= 1 - lr * wd                         (decoupled weight decay, before the update)
//   m  = m + (1 - b1) * (g - m)              (torch.lerp with weight 1 - b1)
//   v  = v * b2 + (1 - b2) * g * g
//   p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// `step` is the 1-based number of this update. With S = float every scalar is rounded to float first,
// as PyTorch's fp32 kernels do; with S = double the whole step runs in double.
template <typename S>
void adamw_step(S* param, S* m, S* v, const S* grad, size_t n, const AdamWHyper& h, double lr, int64_t step,
                S grad_scale = S(1), S clip_coef = S(1)) {
  const AdamWCoefficients c = adamw_coefficients(h, lr, step);
  const S decay = (S)c.decay_factor, w1 = (S)c.one_minus_beta1, b2 = (S)h.beta2, w2 = (S)c.one_minus_beta2;
  const S neg_step = -(S)c.step_size, bc2_sqrt = (S)c.bias_correction2_sqrt, eps = (S)h.eps;
  for (size_t i = 0; i < n; i++) {
    const S g = grad[i] * grad_scale * clip_coef;
    S p = param[i] * decay;
    const S mi = m[i] + w1 * (g - m[i]);
    const S vi = v[i] * b2 + w2 * g * g;
    const S denom = std::sqrt(vi) / bc2_sqrt + eps;
    p = p + neg_step * (mi / denom);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
  }
}

// Sum of squares of the scaled gradient, accumulated in double whatever S is (the oracle for the
// fp32 two-pass GPU reduction).
template <typename S>
double grad_sumsq(const S* grad, size_t n, double grad_scale = 1.0) {
  double acc = 0;
  for (size_t i = 0; i < n; i++) {
    const double g = (double)grad[i] * grad_scale;
    acc += g * g;
  }
  return acc;
}

// torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), clamped to at most 1.
// max_norm <= 0 means clipping is off (coefficient 1).
inline double clip_coefficient(double total_norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  const double coef = max_norm / (total_norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

}  // namespace ref

// ---- learning-rate schedules (host only, shared) -------------------------------------------------

enum LrScheduleKind : uint32_t { LR_CONSTANT = 0, LR_COSINE = 1, LR_PLATEAU = 2 };

// Everything a schedule needs, configuration and state, in one POD with a fixed layout (every field
// naturally aligned, no implicit padding), so checkpoints write it raw and resume continues exactly.
struct LrSchedule {
  // -- configuration
  uint32_t kind;           // LrScheduleKind
  uint32_t warmup_steps;   // cosine: linear warmup length in optimizer steps
  uint64_t total_steps;    // cosine: the step at which lr reaches min_lr (held there afterwards)
  double base_lr;          // the lr before any decay (the optimizer's lr)
  double min_lr;           // cosine floor; plateau floor (PyTorch's min_lr)
  double factor;           // plateau: lr *= factor on a plateau
  double threshold;        // plateau: relative improvement needed (threshold_mode='rel', mode='min')
  double eps;              // plateau: a reduction smaller than this is skipped (PyTorch's eps=1e-8)
  int32_t patience;        // plateau: evaluations without improvement tolerated
  int32_t cooldown;        // plateau: evaluations to wait after a reduction
  // -- plateau state (PyTorch's attribute names in brackets)
  double lr;               // current lr [param_group['lr']]
  double best;             // best metric so far [best]; +inf before the first evaluation
  int32_t num_bad_evals;   // [num_bad_epochs]
  int32_t cooldown_counter;// [cooldown_counter]
  int64_t num_evals;       // number of lr_schedule_on_eval calls [last_epoch]
  uint8_t reserved[32];    // zero; room for fields without changing the size
};
static_assert(std::is_trivially_copyable<LrSchedule>::value && std::is_standard_layout<LrSchedule>::value,
              "LrSchedule is stored raw in checkpoints");
static_assert(sizeof(LrSchedule) == 128, "LrSchedule layout changed: bump the checkpoint version");

inline LrSchedule lr_schedule_blank(uint32_t kind, double base_lr) {
  LrSchedule s;
  memset(&s, 0, sizeof s);
  s.kind = kind;
  s.base_lr = base_lr;
  s.lr = base_lr;
  s.best = std::numeric_limits<double>::infinity();
  return s;
}

inline LrSchedule lr_schedule_constant(double lr) { return lr_schedule_blank(LR_CONSTANT, lr); }

// Linear warmup from base_lr / warmup_steps up to base_lr over the first warmup_steps steps (step s
// gets base_lr * (s + 1) / warmup_steps, so the first update is not wasted on lr = 0), then a half
// cosine from base_lr at step warmup_steps down to min_lr at step total_steps, then min_lr.
inline LrSchedule lr_schedule_cosine(double base_lr, double min_lr, uint32_t warmup_steps, uint64_t total_steps) {
  LrSchedule s = lr_schedule_blank(LR_COSINE, base_lr);
  s.min_lr = min_lr;
  s.warmup_steps = warmup_steps;
  s.total_steps = total_steps;
  return s;
}

// PyTorch's ReduceLROnPlateau(optimizer, mode='min', factor, patience, threshold,
// threshold_mode='rel', cooldown, min_lr, eps=1e-8). The defaults are the ones LoLCATs trains with.
inline LrSchedule lr_schedule_plateau(double base_lr, double factor = 0.1, int32_t patience = 10,
                                      double threshold = 1e-4, int32_t cooldown = 0, double min_lr = 1e-5) {
  LrSchedule s = lr_schedule_blank(LR_PLATEAU, base_lr);
  s.factor = factor;
  s.patience = patience;
  s.threshold = threshold;
  s.cooldown = cooldown;
  s.min_lr = min_lr;
  s.eps = 1e-8;
  return s;
}

// Empty when the schedule is usable, else what is wrong (for flags and for loaded checkpoints).
inline std::string lr_schedule_validate(const LrSchedule& s) {
  if (s.kind > LR_PLATEAU) return "unknown lr schedule kind " + std::to_string(s.kind);
  if (!(s.base_lr > 0) || !std::isfinite(s.base_lr)) return "the learning rate must be positive and finite";
  if (!(s.min_lr >= 0) || !std::isfinite(s.min_lr)) return "min_lr must be non-negative and finite";
  if (s.kind == LR_COSINE && s.total_steps < s.warmup_steps)
    return "cosine schedule: total steps must be at least the warmup steps";
  if (s.kind == LR_PLATEAU) {
    if (!(s.factor > 0 && s.factor < 1)) return "plateau schedule: factor must be in (0, 1)";
    if (s.patience < 0 || s.cooldown < 0) return "plateau schedule: patience and cooldown must be non-negative";
    if (!(s.threshold >= 0 && s.threshold < 1)) return "plateau schedule: threshold must be in [0, 1)";
  }
  return "";
}

// The lr of optimizer step `step` (0-based: the first update uses lr_schedule_lr(s, 0)).
inline double lr_schedule_lr(const LrSchedule& s, uint64_t step) {
  switch (s.kind) {
    case LR_COSINE: {
      if (step < s.warmup_steps) return s.base_lr * (double)(step + 1) / (double)s.warmup_steps;
      if (s.total_steps <= s.warmup_steps) return s.base_lr;
      double progress = (double)(step - s.warmup_steps) / (double)(s.total_steps - s.warmup_steps);
      if (progress > 1.0) progress = 1.0;
      return s.min_lr + 0.5 * (s.base_lr - s.min_lr) * (1.0 + std::cos(3.14159265358979323846 * progress));
    }
    case LR_PLATEAU: return s.lr;
    default: return s.base_lr;
  }
}

// Feed one validation loss to the schedule (call after every evaluation). Only the plateau schedule
// reacts; returns true when it lowered the lr. Mirrors ReduceLROnPlateau.step(metrics) line for line:
// a NaN metric is never "better", so it counts as a bad evaluation.
inline bool lr_schedule_on_eval(LrSchedule& s, double metric) {
  if (s.kind != LR_PLATEAU) return false;
  s.num_evals += 1;
  if (metric < s.best * (1.0 - s.threshold)) {  // is_better, mode='min', threshold_mode='rel'
    s.best = metric;
    s.num_bad_evals = 0;
  } else {
    s.num_bad_evals += 1;
  }
  if (s.cooldown_counter > 0) {  // in cooldown: bad evaluations do not count
    s.cooldown_counter -= 1;
    s.num_bad_evals = 0;
  }
  bool reduced = false;
  if (s.num_bad_evals > s.patience) {
    const double old_lr = s.lr;
    double new_lr = old_lr * s.factor;
    if (new_lr < s.min_lr) new_lr = s.min_lr;
    if (old_lr - new_lr > s.eps) {
      s.lr = new_lr;
      reduced = true;
    }
    s.cooldown_counter = s.cooldown;
    s.num_bad_evals = 0;
  }
  return reduced;
}

inline const char* lr_schedule_name(uint32_t kind) {
  switch (kind) {
    case LR_CONSTANT: return "constant";
    case LR_COSINE: return "cosine";
    case LR_PLATEAU: return "plateau";
    default: return "unknown";
  }
}
