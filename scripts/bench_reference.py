#!/usr/bin/env python3
"""bench_reference.py: our own PyTorch implementation of the published LoLCATs method, the yardstick that
lolcats.cu is measured against. It needs torch (2.11) and, for `forward` and `selfcheck`, transformers (5.x):
both exist on the GPU machine only; this file never runs in CI.

The method is written the way the published code computes it: the hybrid attention as full T x T fp32
matrices with autograd (see ../shared/LOLCATS.md section 1 for the formulas), the teacher attention with no
grad, the stage-1 loss 1000 x mean over layers of the per-layer MSE before o_proj. The Llama pieces (RMSNorm,
rotate-half RoPE with the model's theta and Llama 3.1 scaling, SwiGLU) compute what Hugging Face computes.

Subcommands (each prints a table, then one final line of JSON):
  forward    HF LlamaForCausalLM at Llama 3 8B shapes, random weights, bf16, sdpa attention: forward on B x T
             tokens with the mean next-token cross-entropy (logits included), no grad.
  attention  At 8B shapes (H 32, Hkv 8, d 128, f 64), B*T = --tokens (8192) for T in --seq-lens
             (1024, 4096, 16384, 32768; B = max(1, tokens // T)): fwd + bwd (gradients for q, k, v and the
             feature maps) of (a) SDPA causal attention, bf16, flash backend with enable_gqa, and the cuDNN
             backend with repeated K/V, and (b) the published quadratic fp32 hybrid formulation. Sizes that run
             out of memory print OOM.
  stage1     One stage-1 training step at 8B shapes, random weights, for each of --configs (default
             8x1024 and 2x4096): per layer q/k/v projections + RoPE, the teacher's causal attention (no grad,
             SDPA flash: the fastest faithful form; the reference computes the same softmax as eager
             T x T matrices, bf16 with an fp32 softmax), the quadratic hybrid attention with grad, the MSE;
             the teacher's output continues through o_proj and the MLP (the last layer's MLP is skipped: nothing
             reads it; the reference also runs the LM head, whose logits no loss uses); backward reaches the
             feature maps and window factors only; then the AdamW step.
             --backward total (the reference: one backward of the summed loss, every layer's T x T
             activations alive at once), per-layer (each layer's loss backpropagated at once: same gradients,
             one layer's activations), or auto (total, falling back to per-layer on OOM; the table says which).
  train      A real stage-1 run from a lolcats model file (.bin, model_file.h) on token shards
             (<prefix>_{train,val}_NNNN.bin): AdamW (lr 1e-2, wd 0, betas 0.9/0.999, eps 1e-8), constant lr
             unless --schedule says otherwise, fp32 feature maps and window factors, bf16 model. The data order
             is dataloader.h's exactly (the same Fisher-Yates from the same seed, B rows per micro-batch),
             so ours and this run see the same batches. Writes the JSON-lines log described below.
  selfcheck  Small correctness checks on the GPU: our Llama forward vs transformers' (fp32, GQA, Llama 3.1
             RoPE scaling) through a .bin written and read back by this script; the vectorised hybrid
             attention vs a direct per-query loop of the LOLCATS.md formulas (both geometries).
`--small` swaps the 8B shapes for a 2-layer, hidden-256 model (H 4, Hkv 2, d 64) and short sequences, for a
quick smoke test.

FLOP counting (stated in every JSON line as "flops"): matrix-multiply FLOPs only, 2 per multiply-add.
  forward: 2 x tokens x (the layers' linear weights + the LM head) + causal attention 2 x B x H x T^2 x d per
    layer (QK^T and PV, each over the causal half of T x T).
  attention: SDPA fwd 2 B H T^2 d (causal half), bwd 2.5 x fwd (the usual flash-attention convention);
    quadratic: what it executes: fwd 2 B H T^2 (d + 2f + d) on full T x T plus the feature maps 4 B H T d f,
    bwd 2 x fwd.
  stage1: frozen projections and MLP forward; teacher causal attention 2 B H T^2 d; quadratic hybrid
    forward (full T x T) and the products its backward needs (to the feature maps only: 2 B H T^2 (4f + d)).
Peak memory is torch.cuda.max_memory_allocated over the timed steps (allocator reserve not included).

Log file of `train` (and of train_lolcats, which writes the same keys): JSON lines, one object per line.
  Every line has "step": the number of optimizer steps completed when the line was written.
  train line: "loss"  stage-1 loss of the step: 1000 x mean over layers of the per-layer MSE, averaged over
                      the step's micro-batches
              "lr"    learning rate this step used
              "tokens_per_s"  tokens of the step / its wall time
              optional: "tokens" (cumulative), "grad_norm", "layer_mse_min", "layer_mse_max", "worst_layer",
              "elapsed_s"
  eval line:  "val_loss"  1000 x mean over layers of the per-layer MSE over the validation sequences (the MSE
                          of a layer = squared error summed over every val sequence / element count)
              optional: "val_layer_mse" (list, per layer, without the 1000), "best_val_loss"
  The first line may be {"run": {...}} (configuration; no "step"). Readers skip lines that lack the key
  they plot and ignore keys they do not know. An eval line with step 0 is the identity-initialised maps.

Every failure on bad input is one line "error: ..." on stderr and exit status 1.
"""
import argparse
import gc
import json
import math
import os
import re
import statistics
import struct
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # only --help works without torch
    torch = None
    F = None


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------------------
# Shapes.

# name: (vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, rope_theta)
SHAPES = {
    "llama3_8b": dict(vocab=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336,
                      theta=500000.0, eps=1e-5),
    "small": dict(vocab=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512,
                  theta=10000.0, eps=1e-5),
}
FEATURE_DIM = 64
WINDOW = 64
WINDOW_LOGIT_INIT = math.log(0.1 / 0.9)  # sigmoid(w) = 0.1: logit(0.1) = -2.1972245773
GIB = 1024.0 ** 3


class Cfg:
    """Model hyperparameters (names as in model_file.h's ModelHeader)."""

    def __init__(self, vocab, dim, n_layers, n_heads, n_kv_heads, head_dim, ffn, theta, eps,
                 rope_scaling=None, tied=False):
        self.vocab, self.dim, self.n_layers = vocab, dim, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim, self.ffn = n_heads, n_kv_heads, head_dim, ffn
        self.theta, self.eps = theta, eps
        self.rope_scaling = rope_scaling  # None or dict(factor, low_freq_factor, high_freq_factor, original_max_pos)
        self.tied = tied

    def linear_params_per_layer(self):
        D, Q, KV, Fd = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.ffn
        return D * Q + 2 * D * KV + Q * D + 3 * D * Fd


def shape_cfg(small):
    return Cfg(**SHAPES["small" if small else "llama3_8b"])


# ---------------------------------------------------------------------------------------------------------
# The Llama pieces, as Hugging Face computes them.

def rms_norm(x, weight, eps):
    """LlamaRMSNorm: normalise in fp32, round back to the input dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(cfg, device):
    """Inverse frequencies (head_dim / 2,) fp32: theta^(-2i/d), with Llama 3.1 scaling when configured
    (wavelengths longer than original/low_freq_factor divided by factor, shorter than original/high_freq_factor
    kept, a linear blend in between)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).to(torch.float) / d))
    s = cfg.rope_scaling
    if s:
        factor, low, high, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_pos"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > orig / low, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) * ~(wavelen > orig / low)
        inv = torch.where(medium, blended, scaled)
    return inv


def rope_tables(cfg, T, dtype, device):
    """cos, sin (T, head_dim) in the model dtype: angles pos * inv_freq in fp32, duplicated for both halves."""
    inv = rope_inv_freq(cfg, device)
    pos = torch.arange(T, device=device, dtype=torch.int64).float()
    ang = pos[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x (B, heads, T, d): x cos + rotate_half(x) sin, in x's dtype."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def repeat_kv(x, n_rep):
    """(B, Hkv, T, d) -> (B, Hkv * n_rep, T, d): query head h reads kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, Hkv, T, d = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, T, d).reshape(B, Hkv * n_rep, T, d)


def attention_inputs(x, L, cfg, cos, sin):
    """Pre-norm, q/k/v projections, RoPE. x (B, T, D) -> q (B, H, T, d), k, v (B, Hkv, T, d)."""
    B, T, _ = x.shape
    h = rms_norm(x, L["attn_norm"], cfg.eps)
    q = F.linear(h, L["wq"]).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = F.linear(h, L["wk"]).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = F.linear(h, L["wv"]).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def teacher_attention(q, k, v):
    """Causal softmax attention (the teacher), SDPA; GQA without materialising repeated K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def layer_rest(x, y, L, cfg):
    """Attention output y (B, H, T, d) -> o_proj, residual, post-norm SwiGLU MLP, residual."""
    B, H, T, d = y.shape
    x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * d), L["wo"])
    h = rms_norm(x, L["ffn_norm"], cfg.eps)
    return x + F.linear(F.silu(F.linear(h, L["w_gate"])) * F.linear(h, L["w_up"]), L["w_down"])


def llama_logits(tokens, W, cfg):
    """Full forward of our functional model (used by selfcheck against transformers)."""
    T = tokens.shape[1]
    x = W["embed"][tokens]
    cos, sin = rope_tables(cfg, T, x.dtype, x.device)
    for L in W["layers"]:
        q, k, v = attention_inputs(x, L, cfg, cos, sin)
        x = layer_rest(x, teacher_attention(q, k, v), L, cfg)
    return F.linear(rms_norm(x, W["final_norm"], cfg.eps), W["lm_head"])


# ---------------------------------------------------------------------------------------------------------
# The LoLCATs hybrid attention, quadratic form (the published training formulation).

def hedgehog(x, w):
    """Hedgehog feature map per query head: x (B, H, T, d), w (H, d, f) fp32 ->
    concat(softmax(x w), softmax(-x w)) over the f entries, (B, H, T, 2f) fp32, clamped at 1e-12."""
    z = torch.einsum("bhtd,hdf->bhtf", x.float(), w)
    return torch.cat((torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)), dim=-1).clamp(min=1e-12)


def window_masks(T, window, geometry, device):
    """Boolean (T, T) masks (softmax part, linear part) for query i (rows) and key j (columns).
    terrace: chunks of `window` anchored at position 0; query in chunk c takes softmax over chunk c - 1 and the
    causal part of chunk c, linear over chunks <= c - 2. sliding: softmax over i - window < j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    causal = j <= i
    if geometry == "terrace":
        win = causal & (j // window >= i // window - 1)
    else:
        win = causal & (j > i - window)
    return win, causal & ~win


def init_feature_maps(cfg, device, f=FEATURE_DIM):
    """W_q, W_k (n_layers, H, d, f) = [I_f; 0] per head, window logits (n_layers, H) = logit(0.1); fp32."""
    eye = torch.zeros(cfg.head_dim, f, device=device)
    eye[:min(cfg.head_dim, f), :min(cfg.head_dim, f)] = torch.eye(min(cfg.head_dim, f), device=device)
    wq = eye.expand(cfg.n_layers, cfg.n_heads, cfg.head_dim, f).clone().requires_grad_(True)
    wk = eye.expand(cfg.n_layers, cfg.n_heads, cfg.head_dim, f).clone().requires_grad_(True)
    wl = torch.full((cfg.n_layers, cfg.n_heads), WINDOW_LOGIT_INIT, device=device, requires_grad=True)
    return wq, wk, wl


def hybrid_attention_quadratic(q, k, v, wq, wk, window_logit, masks):
    """The hybrid attention as full T x T fp32 matrices (O(T^2) memory), autograd for the backward.
    q (B, H, T, d); k, v (B, Hkv, T, d) any dtype; wq, wk (H, d, f) fp32; window_logit (H,).
      s = q k^T / sqrt(d);  m = max of s over the window keys;  A = sigmoid(w) exp(s - m) on the window;
      Bl = phi_q(q) phi_k(k)^T on the linear region;  y = (A v + Bl v) / (rowsum A + rowsum Bl).
    The linear part is not rescaled by exp(-m), as in the reference. Returns y (B, H, T, d) fp32."""
    H, d = q.shape[1], q.shape[-1]
    k = repeat_kv(k, H // k.shape[1])
    v = repeat_kv(v, H // v.shape[1])
    win, lin = masks
    fq, fk = hedgehog(q, wq), hedgehog(k, wk)  # key maps after the GQA repeat: one per query head
    s = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * d ** -0.5
    s = s.masked_fill(~win, -1e8)
    a_win = torch.sigmoid(window_logit).view(1, H, 1, 1) * torch.exp(s - s.amax(dim=-1, keepdim=True))
    a_lin = torch.einsum("bhif,bhjf->bhij", fq, fk).masked_fill(~lin, 0.0)
    num = torch.einsum("bhij,bhjd->bhid", a_win + a_lin, v.float())
    return num / (a_win.sum(dim=-1, keepdim=True) + a_lin.sum(dim=-1, keepdim=True))


def hybrid_attention_loop(q, k, v, wq, wk, window_logit, window, geometry):
    """Direct per-query evaluation of the LOLCATS.md formulas in float64 (selfcheck oracle; small sizes only)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, d = q.shape
    k, v = repeat_kv(k, H // k.shape[1]), repeat_kv(v, H // v.shape[1])
    y = torch.zeros_like(q)

    def phi(x, w):
        z = x @ w.double()
        return torch.cat((torch.softmax(z, -1), torch.softmax(-z, -1)), -1).clamp(min=1e-12)
    for b in range(B):
        for h in range(H):
            gamma = torch.sigmoid(window_logit[h].double())
            for i in range(T):
                if geometry == "terrace":
                    in_win = [j for j in range(i + 1) if j // window >= i // window - 1]
                else:
                    in_win = [j for j in range(i + 1) if j > i - window]
                in_lin = [j for j in range(i + 1) if j not in in_win]
                s = (k[b, h, in_win] @ q[b, h, i]) / math.sqrt(d)
                a = gamma * torch.exp(s - s.max())
                num, den = a @ v[b, h, in_win], a.sum()
                if in_lin:
                    bl = phi(k[b, h, in_lin], wk[h]) @ phi(q[b, h, i], wq[h])
                    num, den = num + bl @ v[b, h, in_lin], den + bl.sum()
                y[b, h, i] = num / den
    return y


# ---------------------------------------------------------------------------------------------------------
# Stage 1.

def stage1_forward_backward(x, layers, cfg, fmaps, masks, cos, sin, loss_scale, backward, train=True):
    """One stage-1 micro-batch: every layer's teacher (no grad) and hybrid attention on the same q, k, v, the
    per-layer MSE before o_proj, the teacher's output passed on. Backpropagates 1000 * mean_l(MSE_l) * loss_scale
    into the feature maps when train ('total': one backward of the summed loss; 'per-layer': each layer's
    share at once, same gradients, one layer's activations alive). Returns the per-layer MSEs (list of floats)."""
    wq, wk, wl = fmaps
    n = len(layers)
    per_layer = []
    for l, L in enumerate(layers):
        with torch.no_grad():
            q, k, v = attention_inputs(x, L, cfg, cos, sin)
            y_true = teacher_attention(q, k, v)
        if train:
            y_pred = hybrid_attention_quadratic(q, k, v, wq[l], wk[l], wl[l], masks)
            mse = F.mse_loss(y_pred, y_true.float())
            if backward == "per-layer":
                (mse * (1000.0 / n * loss_scale)).backward()
                mse = mse.detach()
        else:
            with torch.no_grad():
                y_pred = hybrid_attention_quadratic(q, k, v, wq[l], wk[l], wl[l], masks)
                mse = F.mse_loss(y_pred, y_true.float())
        per_layer.append(mse)
        del q, k, v, y_pred
        if l + 1 < n:  # the last layer's output feeds nothing in stage 1
            with torch.no_grad():
                x = layer_rest(x, y_true, L, cfg)
        del y_true
    if train and backward == "total":
        (torch.stack(per_layer).sum() * (1000.0 / n * loss_scale)).backward()
    return [float(m) for m in torch.stack([m.detach() for m in per_layer]).tolist()]


def stage1_flops(cfg, B, T, f=FEATURE_DIM, skip_last_rest=True):
    """Executed matmul FLOPs of one stage-1 micro-batch (see the module docstring)."""
    N, H, d, D = B * T, cfg.n_heads, cfg.head_dim, cfg.dim
    Q, KV = H * d, cfg.n_kv_heads * d
    qkv = 2 * N * (D * Q + 2 * D * KV)
    rest = 2 * N * (Q * D + 3 * D * cfg.ffn)
    teacher = 2 * B * H * T * T * d
    hyb_fwd = 2 * B * H * T * T * (d + 2 * f + d) + 4 * B * H * T * d * f
    hyb_bwd = 2 * B * H * T * T * (4 * f + d) + 8 * B * H * T * d * f
    L = cfg.n_layers
    return L * (qkv + teacher + hyb_fwd + hyb_bwd) + (L - 1 if skip_last_rest else L) * rest


def adamw_for(params, args):
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             weight_decay=args.weight_decay)


# ---------------------------------------------------------------------------------------------------------
# Timing and memory.

def cuda_time_ms(fn, warmup, iters):
    """Median of `iters` CUDA-event timings of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def try_or_oom(fn):
    """fn() or None when CUDA runs out of memory (memory is released either way)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        pass
    free_memory()
    return None


def peak_gib():
    return torch.cuda.max_memory_allocated() / GIB


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def print_table(header, rows):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    for n, r in enumerate(cols):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def fmt(x, spec):
    return "OOM" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------------------
# Random weights at given shapes (frozen, bf16).

def random_layers(cfg, dtype, device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    D, Q, KV, Fd = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn

    def lin(o, i):  # normal(0, 0.02): transformers' initializer_range
        return (torch.randn(o, i, device=device, dtype=torch.float32, generator=g) * 0.02).to(dtype)
    layers = []
    for _ in range(cfg.n_layers):
        layers.append(dict(attn_norm=torch.ones(D, device=device, dtype=dtype), wq=lin(Q, D), wk=lin(KV, D),
                           wv=lin(KV, D), wo=lin(D, Q), ffn_norm=torch.ones(D, device=device, dtype=dtype),
                           w_gate=lin(Fd, D), w_up=lin(Fd, D), w_down=lin(D, Fd)))
    return layers


# ---------------------------------------------------------------------------------------------------------
# lolcats model file (.bin, model_file.h) and token shards (dataloader.h).

MODEL_MAGIC = b"LOLCMDL1"
MODEL_HEADER = struct.Struct("<8s12I4fIfii168x")
SHARD_MAGIC = b"LOLCTOK1"
SHARD_HEADER = struct.Struct("<8sIIQIiiI24x")
assert MODEL_HEADER.size == 256 and SHARD_HEADER.size == 64


def read_model_bin(path, dtype, device):
    """Load a lolcats .bin into (Cfg, weights dict) on device in `dtype` (bf16 files are widened exactly)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(MODEL_HEADER.size)
    except OSError as e:
        die(f"cannot read model file '{path}' ({e.strerror})")
    if len(raw) < MODEL_HEADER.size:
        die(f"'{path}' is too small to be a model file ({size} bytes)")
    (magic, version, fdtype, vocab, n_layers, dim, n_heads, n_kv, head_dim, ffn, max_seq, tied, rope_scaling,
     theta, r_factor, r_low, r_high, r_orig, eps, bos, eos) = MODEL_HEADER.unpack(raw)
    if magic != MODEL_MAGIC:
        die(f"'{path}' is not a lolcats model file (bad magic)")
    if version != 1 or fdtype not in (0, 1) or rope_scaling not in (0, 1):
        die(f"model file '{path}': unsupported version {version} / dtype {fdtype} / rope_scaling {rope_scaling}")
    if min(vocab, n_layers, dim, n_heads, n_kv, head_dim, ffn) == 0 or n_heads % n_kv:
        die(f"model file '{path}': inconsistent dimensions in the header")
    scaling = None
    if rope_scaling == 1:
        scaling = dict(factor=r_factor, low_freq_factor=r_low, high_freq_factor=r_high, original_max_pos=r_orig)
    cfg = Cfg(vocab, dim, n_layers, n_heads, n_kv, head_dim, ffn, float(theta), float(eps), scaling, bool(tied))
    cfg.max_seq_len, cfg.bos_id, cfg.eos_id = max_seq, bos, eos
    D, Q, KV = dim, n_heads * head_dim, n_kv * head_dim
    layout = [("embed", (vocab, D))]
    for l in range(n_layers):
        layout += [((l, "attn_norm"), (D,)), ((l, "wq"), (Q, D)), ((l, "wk"), (KV, D)), ((l, "wv"), (KV, D)),
                   ((l, "wo"), (D, Q)), ((l, "ffn_norm"), (D,)), ((l, "w_gate"), (ffn, D)),
                   ((l, "w_up"), (ffn, D)), ((l, "w_down"), (D, ffn))]
    layout.append(("final_norm", (D,)))
    if not tied:
        layout.append(("lm_head", (vocab, D)))
    esize = 2 if fdtype == 1 else 4
    n_elem = sum(int(np.prod(s)) for _, s in layout)
    if size != MODEL_HEADER.size + n_elem * esize:
        die(f"model file '{path}' has {size} bytes but its header implies {MODEL_HEADER.size + n_elem * esize}")
    mm = np.memmap(path, dtype="<u2" if fdtype == 1 else "<f4", mode="r", offset=MODEL_HEADER.size, shape=(n_elem,))
    W = {"layers": [dict() for _ in range(n_layers)]}
    off = 0
    for name, shape in layout:
        n = int(np.prod(shape))
        arr = np.array(mm[off:off + n])  # a writable copy
        off += n
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if fdtype == 1 else torch.from_numpy(arr)
        t = t.to(device).reshape(shape)
        if not torch.isfinite(t).all():
            die(f"model file '{path}' holds a non-finite weight in {name}")
        t = t.to(dtype)
        if isinstance(name, tuple):
            W["layers"][name[0]][name[1]] = t
        else:
            W[name] = t
    if tied:
        W["lm_head"] = W["embed"]
    return cfg, W


def write_model_bin(path, cfg, W):
    """Write weights (fp32) as a lolcats .bin (selfcheck's round trip)."""
    s = cfg.rope_scaling or {}
    head = MODEL_HEADER.pack(MODEL_MAGIC, 1, 0, cfg.vocab, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads,
                             cfg.head_dim, cfg.ffn, 4096, int(cfg.tied), 1 if cfg.rope_scaling else 0, cfg.theta,
                             s.get("factor", 0.0), s.get("low_freq_factor", 0.0), s.get("high_freq_factor", 0.0),
                             int(s.get("original_max_pos", 0)), cfg.eps, -1, -1)
    order = [W["embed"]]
    for L in W["layers"]:
        order += [L[k] for k in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")]
    order.append(W["final_norm"])
    if not cfg.tied:
        order.append(W["lm_head"])
    with open(path, "wb") as f:
        f.write(head)
        for t in order:
            f.write(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes())


class Shards:
    """One split's sequences, numbered in shard order, exactly as dataloader.h numbers them."""

    def __init__(self, directory, split, prefix, T):
        if not os.path.isdir(directory):
            die(f"data directory '{directory}' does not exist")
        pat = re.compile(r"^(.*)_" + split + r"_(\d{4})\.bin$")
        found = {}
        for name in os.listdir(directory):
            m = pat.match(name)
            if m and (not prefix or m.group(1) == prefix):
                found.setdefault(m.group(1), []).append((int(m.group(2)), name))
        if not found:
            die(f"no {split} shards (*_{split}_NNNN.bin) in '{directory}'" + (f" with prefix '{prefix}'" if prefix else ""))
        if len(found) > 1:
            die(f"several shard prefixes in '{directory}' ({', '.join(sorted(found))}): pick one with --prefix")
        files = sorted(next(iter(found.values())))
        if [i for i, _ in files] != list(range(len(files))):
            die(f"{split} shards in '{directory}' are not numbered 0000.. without gaps")
        self.tokens, self.starts = [], []
        self.vocab = self.seq_len = None
        for s, (_, name) in enumerate(files):
            path = os.path.join(directory, name)
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(SHARD_HEADER.size)
            if len(raw) < SHARD_HEADER.size:
                die(f"shard '{path}' is truncated")
            magic, version, vocab, n_tok, flags, _bos, _eos, seq_len = SHARD_HEADER.unpack(raw)
            if magic != SHARD_MAGIC or version != 1:
                die(f"'{path}' is not a token shard (bad magic or version)")
            if size != 64 + 4 * n_tok + (n_tok if flags & 1 else 0):
                die(f"shard '{path}' has {size} bytes, its header implies {64 + 4 * n_tok + (n_tok if flags & 1 else 0)}")
            if seq_len and n_tok % seq_len:
                die(f"shard '{path}' is corrupt: {n_tok} tokens is not a whole number of {seq_len}-token sequences")
            if self.vocab is None:
                self.vocab, self.seq_len = vocab, seq_len
            elif (vocab, seq_len) != (self.vocab, self.seq_len):
                die(f"shards disagree on vocab_size or seq_len ('{path}')")
            self.tokens.append(np.memmap(path, dtype="<u4", mode="r", offset=64, shape=(n_tok,)))
        if self.seq_len:
            if T and T != self.seq_len:
                die(f"shards in '{directory}' hold {self.seq_len}-token sequences, but T = {T} was asked for")
            T = self.seq_len
        elif T < 2:
            die(f"shards in '{directory}' are plain streams (seq_len 0): give --seq-len >= 2")
        self.T = T
        for s, toks in enumerate(self.tokens):
            for off in range(0, len(toks) - T + 1, T):
                self.starts.append((s, off))
        if not self.starts:
            die(f"{split} shards in '{directory}' hold no complete {T}-token sequence")
        self.n = len(self.starts)

    def rows(self, seq_ids):
        return np.stack([np.asarray(self.tokens[s][o:o + self.T]) for s, o in (self.starts[i] for i in seq_ids)])


MASK64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class _Rng:
    """common.h's Rng (xorshift64*), for the loader's permutation."""

    def __init__(self, seed):
        self.s = (seed * 0x9E3779B97F4A7C15 + 0x1234567) & MASK64 or 1

    def next(self):
        s = self.s
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.s = s
        return (s * 2685821657736338717) & MASK64


class Stream:
    """dataloader.h's endless stream: epoch e is a Fisher-Yates permutation seeded by
    splitmix64(seed ^ splitmix64(e)) (identity without shuffle); each call takes the next B sequences."""

    def __init__(self, shards, seed, shuffle):
        self.shards, self.seed, self.shuffle = shards, seed, shuffle
        self.next_pos, self.perm_epoch, self.perm = 0, None, None

    def _seq(self, g):
        n = self.shards.n
        if not self.shuffle:
            return g % n
        e = g // n
        if e != self.perm_epoch:
            perm = list(range(n))
            rng = _Rng(_splitmix64(self.seed ^ _splitmix64(e)))
            for i in range(n - 1, 0, -1):
                j = rng.next() % (i + 1)
                perm[i], perm[j] = perm[j], perm[i]
            self.perm, self.perm_epoch = perm, e
        return self.perm[g % n]

    def next(self, B):
        ids = [self._seq(self.next_pos + b) for b in range(B)]
        self.next_pos += B
        return self.shards.rows(ids)


# ---------------------------------------------------------------------------------------------------------
# Subcommands.

def cmd_forward(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = shape_cfg(args.small)
    B, T = args.batch, args.seq_len
    hf_cfg = LlamaConfig(vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, max_position_embeddings=8192,
                         rms_norm_eps=c.eps, rope_parameters={"rope_type": "default", "rope_theta": c.theta},
                         tie_word_embeddings=False, use_cache=False)
    use_sdpa(hf_cfg)
    t0 = time.perf_counter()
    model = build_hf_model(LlamaForCausalLM, hf_cfg, torch.bfloat16)
    init_s = time.perf_counter() - t0
    ids = torch.randint(0, c.vocab, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(args.seed))
    losses = []

    def step():
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, use_cache=False)
        losses.append(out.loss)
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(step, args.warmup, args.iters)
    loss = float(losses[-1])
    tokens = B * T
    flops = 2 * tokens * (c.n_layers * c.linear_params_per_layer() + c.vocab * c.dim) \
        + c.n_layers * 2 * B * c.n_heads * T * T * c.head_dim
    tok_s = tokens / (ms / 1e3)
    tflops = flops / (ms / 1e3) / 1e12
    print(f"# forward: HF LlamaForCausalLM ({'small' if args.small else 'Llama 3 8B'} shapes, random weights, bf16, "
          f"attn {attn_impl(model)}), B={B} T={T}, init {init_s:.1f} s, {device_name()}")
    print_table(["B", "T", "ms", "tokens/s", "TFLOP/s", "peak GiB", "loss"],
                [[B, T, f"{ms:.2f}", f"{tok_s:,.0f}", f"{tflops:.1f}", f"{peak_gib():.2f}", f"{loss:.4f}"]])
    print(json.dumps(dict(bench="forward", shapes="small" if args.small else "llama3_8b", B=B, T=T, ms=ms,
                          tokens_per_s=tok_s, tflops=tflops, peak_mem_gib=peak_gib(), loss=loss,
                          attn=attn_impl(model), device=device_name(),
                          flops="2*tokens*(layer linear weights + lm_head) + causal attention 2*B*H*T^2*d per layer")))


def use_sdpa(hf_cfg):
    """attn_implementation = "sdpa" (transformers' default when available; set explicitly where the API lets us)."""
    try:
        hf_cfg._attn_implementation = "sdpa"
    except (AttributeError, ValueError, TypeError):
        pass


def attn_impl(model):
    return str(getattr(model.config, "_attn_implementation", "unknown"))


def build_hf_model(cls, hf_cfg, dtype):
    """Instantiate a transformers model with random init directly on the GPU in `dtype`."""
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # parameters are created in dtype (bf16 8B: 16 GB, not 32 GB first)
    except (TypeError, RuntimeError):
        pass
    try:
        with torch.device("cuda"):
            model = cls(hf_cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def attention_one_size(c, B, T, args):
    """(ms, peak GiB) of fwd+bwd for SDPA flash, SDPA cuDNN and the quadratic hybrid at one (B, T); None = OOM
    (or, for cuDNN, no kernel for this shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, Hkv, d = c.n_heads, c.n_kv_heads, c.head_dim
    gen = torch.Generator("cuda").manual_seed(args.seed + T)

    def make(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True)
    q, k, v = make(B, H, T, d), make(B, Hkv, T, d), make(B, Hkv, T, d)
    dout = torch.randn(B, H, T, d, device="cuda", generator=gen).to(torch.bfloat16)

    def sdpa_flash():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(dout)

    def sdpa_cudnn():
        q.grad = k.grad = v.grad = None
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv), is_causal=True)
        out.backward(dout)

    def timed(fn):
        free_memory()
        torch.cuda.reset_peak_memory_stats()
        ms = try_or_oom(lambda: cuda_time_ms(fn, args.warmup, args.iters))
        return ms, (peak_gib() if ms is not None else None)
    out = {"flash": timed(sdpa_flash)}
    try:
        out["cudnn"] = timed(sdpa_cudnn)
    except RuntimeError as e:  # no cuDNN attention kernel for this shape or build
        print(f"# T={T}: SDPA cuDNN backend unavailable ({str(e).splitlines()[0][:100]})")
        out["cudnn"] = (None, None)
    out["quadratic"] = (None, None)
    try:
        masks = window_masks(T, WINDOW, args.geometry, "cuda")
        wq, wk, wl = [p[0].detach().clone().requires_grad_(True) for p in init_feature_maps(c, "cuda")]
        dout32 = dout.float()

        def quadratic():
            q.grad = k.grad = v.grad = wq.grad = wk.grad = wl.grad = None
            hybrid_attention_quadratic(q, k, v, wq, wk, wl, masks).backward(dout32)
        out["quadratic"] = timed(quadratic)
    except torch.OutOfMemoryError:
        pass
    return out


def cmd_attention(args):
    c = shape_cfg(args.small)
    H, Hkv, d, f = c.n_heads, c.n_kv_heads, c.head_dim, FEATURE_DIM
    seq_lens = args.seq_lens or ([128, 256, 512] if args.small else [1024, 4096, 16384, 32768])
    tokens = args.tokens or (1024 if args.small else 8192)
    rows, results = [], []
    for T in seq_lens:
        B = max(1, tokens // T)
        try:
            got = attention_one_size(c, B, T, args)
        except torch.OutOfMemoryError:  # even the inputs do not fit
            got = {"flash": (None, None), "cudnn": (None, None), "quadratic": (None, None)}
        free_memory()
        (flash_ms, flash_mem), (cudnn_ms, cudnn_mem), (quad_ms, quad_mem) = got["flash"], got["cudnn"], got["quadratic"]
        sdpa_fl = 7 * B * H * T * T * d
        quad_fl = 3 * (2 * B * H * T * T * (2 * d + 2 * f) + 4 * B * H * T * d * f)
        ratio = quad_ms / flash_ms if quad_ms and flash_ms else None
        per_tok = {}
        for name, ms in (("flash", flash_ms), ("cudnn", cudnn_ms), ("quadratic", quad_ms)):
            per_tok[name] = ms * 1e3 / (B * T) if ms else None
        rows.append([T, B, fmt(flash_ms, ".3f"), fmt(cudnn_ms, ".3f"), fmt(quad_ms, ".3f"), fmt(ratio, ".1f"),
                     fmt(per_tok["flash"], ".4f"), fmt(per_tok["quadratic"], ".4f"),
                     fmt(sdpa_fl / flash_ms / 1e9 if flash_ms else None, ".1f"),
                     fmt(quad_fl / quad_ms / 1e9 if quad_ms else None, ".1f"), fmt(quad_mem, ".1f")])
        results.append(dict(T=T, B=B, sdpa_flash_ms=flash_ms, sdpa_cudnn_ms=cudnn_ms, quadratic_ms=quad_ms,
                            ratio_quadratic_over_flash=ratio, sdpa_flash_peak_gib=flash_mem,
                            sdpa_cudnn_peak_gib=cudnn_mem, quadratic_peak_gib=quad_mem,
                            sdpa_flash_tflops=sdpa_fl / flash_ms / 1e9 if flash_ms else None,
                            quadratic_tflops=quad_fl / quad_ms / 1e9 if quad_ms else None,
                            tokens_per_s_flash=B * T / (flash_ms / 1e3) if flash_ms else None,
                            tokens_per_s_quadratic=B * T / (quad_ms / 1e3) if quad_ms else None,
                            us_per_token_flash=per_tok["flash"], us_per_token_quadratic=per_tok["quadratic"]))
    print(f"# attention fwd+bwd, H={H} Hkv={Hkv} d={d} f={f}, window {WINDOW} ({args.geometry}), "
          f"B*T={tokens}, {device_name()}; ms = median of {args.iters}; OOM = out of memory")
    print("# flash: SDPA flash backend, enable_gqa, bf16; cudnn: SDPA cuDNN backend, repeat_kv, bf16; "
          "quadratic: published fp32 T x T formulation, autograd (grads for q, k, v, W_q, W_k, w)")
    print_table(["T", "B", "flash ms", "cudnn ms", "quadratic ms", "quad/flash", "flash us/tok", "quad us/tok",
                 "flash TFLOP/s", "quad TFLOP/s", "quad GiB"], rows)
    print(json.dumps(dict(bench="attention", shapes="small" if args.small else "llama3_8b", H=H, Hkv=Hkv, d=d, f=f,
                          window=WINDOW, geometry=args.geometry, tokens=tokens, device=device_name(), rows=results,
                          flops="sdpa: 7*B*H*T^2*d (causal fwd 2BHT^2d, bwd 2.5x); quadratic: executed "
                                "3*(2*B*H*T^2*(2d+2f) + 4*B*H*T*d*f)")))


def stage1_timed(c, layers, B, T, mode, args):
    """(median ms, peak GiB, last loss) of full stage-1 steps (forward, backward, AdamW) at (B, T)."""
    gen = torch.Generator("cuda").manual_seed(args.seed + T)
    x0 = torch.randn(B, T, c.dim, device="cuda", generator=gen).to(torch.bfloat16)  # stands in for embeddings
    fmaps = init_feature_maps(c, "cuda")
    opt = adamw_for(list(fmaps), args)
    masks = window_masks(T, WINDOW, args.geometry, "cuda")
    cos, sin = rope_tables(c, T, torch.bfloat16, "cuda")
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        losses.append(stage1_forward_backward(x0, layers, c, fmaps, masks, cos, sin, 1.0, mode))
        opt.step()
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(step, args.warmup, args.iters)
    return ms, peak_gib(), 1000 * sum(losses[-1]) / len(losses[-1])


def cmd_stage1(args):
    c = shape_cfg(args.small)
    configs = args.configs or (["2x256", "1x512"] if args.small else ["8x1024", "2x4096"])
    t0 = time.perf_counter()
    layers = random_layers(c, torch.bfloat16, "cuda", args.seed)
    print(f"# random {'small' if args.small else 'Llama 3 8B'} layers in {time.perf_counter() - t0:.1f} s, "
          f"{sum(t.numel() for L in layers for t in L.values()) / 1e9:.2f}B parameters, {device_name()}")
    rows, results = [], []
    for spec in configs:
        try:
            B, T = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            die(f"--configs takes BxT entries like 8x1024, not '{spec}'")
        modes = ["total", "per-layer"] if args.backward == "auto" else [args.backward]
        got = None
        for mode in modes:
            got = try_or_oom(lambda: stage1_timed(c, layers, B, T, mode, args))
            free_memory()
            if got:
                break
        flops = stage1_flops(c, B, T)
        if got:
            ms, mem, loss = got
            tok_s = B * T / (ms / 1e3)
            rows.append([B, T, mode, f"{ms:.1f}", f"{tok_s:,.0f}", f"{flops / (ms / 1e3) / 1e12:.1f}", f"{mem:.1f}",
                         f"{loss:.4f}"])
            results.append(dict(B=B, T=T, backward=mode, ms=ms, tokens_per_s=tok_s,
                                tflops=flops / (ms / 1e3) / 1e12, peak_mem_gib=mem, loss=loss))
        else:
            rows.append([B, T, "/".join(modes), "OOM", "OOM", "OOM", "OOM", "-"])
            results.append(dict(B=B, T=T, backward="/".join(modes), oom=True))
    print(f"# stage-1 step (forward all layers, backward to the feature maps, AdamW), window {WINDOW} "
          f"({args.geometry}), teacher SDPA flash; ms = median of {args.iters} after {args.warmup} warm-up")
    print_table(["B", "T", "backward", "ms/step", "tokens/s", "TFLOP/s", "peak GiB", "loss"], rows)
    print(json.dumps(dict(bench="stage1", shapes="small" if args.small else "llama3_8b", geometry=args.geometry,
                          device=device_name(), rows=results,
                          flops="executed matmuls: frozen q/k/v/o/MLP forward (last layer's o/MLP skipped), "
                                "teacher causal 2*B*H*T^2*d, quadratic hybrid fwd 2*B*H*T^2*(2d+2f) + maps, "
                                "bwd to the maps 2*B*H*T^2*(4f+d) + maps")))


def evaluate(val, W, cfg, fmaps, masks, cos, sin, batch, max_batches):
    """1000 x mean over layers of each layer's MSE over the val sequences (squared errors summed over all
    sequences / element count), and the per-layer MSEs."""
    n_seq = val.n if max_batches <= 0 else min(val.n, max_batches * batch)
    sse = np.zeros(cfg.n_layers)
    count = 0
    for start in range(0, n_seq, batch):
        ids = list(range(start, min(start + batch, n_seq)))
        tokens = torch.from_numpy(val.rows(ids).astype(np.int64)).cuda()
        x = W["embed"][tokens]
        per_layer = stage1_forward_backward(x, W["layers"], cfg, fmaps, masks, cos, sin, 1.0, "total", train=False)
        n_el = len(ids) * val.T * cfg.n_heads * cfg.head_dim
        sse += np.array(per_layer) * n_el
        count += n_el
    mse = sse / count
    return 1000.0 * float(mse.mean()), mse.tolist()


def cmd_train(args):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(args.seed)
    cfg, W = read_model_bin(args.model, dtype, "cuda")
    train = Shards(args.data, "train", args.prefix, args.seq_len)
    val = Shards(args.data, "val", args.prefix, args.seq_len)
    for split in (train, val):
        if split.vocab > cfg.vocab:
            die(f"shards in '{args.data}' have vocab_size {split.vocab}, larger than the model's {cfg.vocab}")
    T = train.T
    if val.T != T:
        die(f"train and val shards hold sequences of different lengths ({T} vs {val.T})")
    linear_from = 2 * args.window if args.geometry == "terrace" else args.window  # first query with a linear part
    if T <= linear_from:
        print(f"# warning: T = {T} leaves no key in the linear region ({args.geometry} window {args.window} needs "
              f"T > {linear_from}): the hybrid equals softmax attention and stage 1 has nothing to learn")
    stream = Stream(train, args.seed, not args.no_shuffle)
    fmaps = init_feature_maps(cfg, "cuda", args.feature_dim)
    opt = adamw_for(list(fmaps), args)
    if args.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=10, threshold=1e-4,
                                                           threshold_mode="rel", cooldown=0, min_lr=args.min_lr)
    elif args.schedule == "cosine":  # the same formula as LrSchedule (reference/optim_ref.h), as a multiplier
        base, lo, wu, total = args.lr, args.min_lr, args.warmup, args.steps

        def mult(s):
            if s < wu:
                return (s + 1) / wu
            p = min(1.0, (s - wu) / max(1, total - wu)) if total > wu else 0.0
            return (lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * p))) / base
        sched = torch.optim.lr_scheduler.LambdaLR(opt, mult)
    else:
        sched = None
    masks = window_masks(T, args.window, args.geometry, "cuda")
    cos, sin = rope_tables(cfg, T, dtype, "cuda")
    log = open(args.log, "w") if args.log else None

    def emit(obj):
        if log:
            log.write(json.dumps(obj) + "\n")
            log.flush()
    emit(dict(run=dict(impl="bench_reference.py", model=args.model, data=args.data, T=T, batch=args.batch,
                       accum=args.accum, steps=args.steps, lr=args.lr, schedule=args.schedule,
                       weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, geometry=args.geometry,
                       window=args.window, feature_dim=args.feature_dim, dtype=args.dtype,
                       shuffle=not args.no_shuffle, train_sequences=train.n, val_sequences=val.n,
                       backward=args.backward, device=device_name())))
    print(f"# stage 1 (PyTorch reference): {args.model}: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads}/"
          f"{cfg.n_kv_heads} heads of {cfg.head_dim}; {train.n} train / {val.n} val sequences of {T}; "
          f"B={args.batch} x accum {args.accum}, lr {args.lr} ({args.schedule}), {device_name()}")

    def run_eval(step):
        v, per_layer = evaluate(val, W, cfg, fmaps, masks, cos, sin, args.batch, args.val_batches)
        best = min(v, run_eval.best)
        run_eval.best = best
        emit(dict(step=step, val_loss=v, val_layer_mse=per_layer, best_val_loss=best))
        print(f"step {step:6d} | val_loss {v:.6f} (best {best:.6f})")
        return v
    run_eval.best = math.inf
    initial = run_eval(0)
    torch.cuda.reset_peak_memory_stats()
    tokens_done, speeds, t_start = 0, [], time.perf_counter()
    last_val = initial
    for step in range(1, args.steps + 1):
        lr = opt.param_groups[0]["lr"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        layer_sum = np.zeros(cfg.n_layers)
        for _ in range(args.accum):
            tokens = torch.from_numpy(stream.next(args.batch).astype(np.int64)).cuda()
            x = W["embed"][tokens]
            per_layer = np.array(stage1_forward_backward(x, W["layers"], cfg, fmaps, masks, cos, sin,
                                                         1.0 / args.accum, args.backward))
            if not np.all(np.isfinite(per_layer)):
                bad = int(np.flatnonzero(~np.isfinite(per_layer))[0])
                die(f"non-finite loss in layer {bad} at step {step}")
            layer_sum += per_layer
        gnorm = float(torch.nn.utils.clip_grad_norm_(list(fmaps), args.clip if args.clip > 0 else math.inf))
        if not math.isfinite(gnorm):
            die(f"non-finite gradient at step {step}")
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            sched.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n_tok = args.batch * args.accum * T
        tokens_done += n_tok
        speeds.append(n_tok / dt)
        layer_mse = layer_sum / args.accum
        loss = 1000.0 * float(layer_mse.mean())
        emit(dict(step=step, loss=loss, lr=lr, tokens_per_s=n_tok / dt, tokens=tokens_done, grad_norm=gnorm,
                  layer_mse_min=float(layer_mse.min()), layer_mse_max=float(layer_mse.max()),
                  worst_layer=int(layer_mse.argmax()), elapsed_s=time.perf_counter() - t_start))
        if step % args.print_every == 0 or step == 1 or step == args.steps:
            print(f"step {step:6d} | loss {loss:.6f} | lr {lr:.3e} | grad norm {gnorm:.4e} | {n_tok / dt:,.0f} tok/s")
        if step % args.eval_every == 0 or step == args.steps:
            last_val = run_eval(step)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(last_val)
    if log:
        log.close()
    if args.save:
        torch.save(dict(wq=fmaps[0].detach().cpu(), wk=fmaps[1].detach().cpu(), window_logit=fmaps[2].detach().cpu()),
                   args.save)
    print(json.dumps(dict(bench="train", model=args.model, T=T, batch=args.batch, accum=args.accum, steps=args.steps,
                          initial_val_loss=initial, final_val_loss=last_val, best_val_loss=run_eval.best,
                          reduction=initial / last_val if last_val > 0 else None,
                          tokens_per_s=statistics.median(speeds) if speeds else None, peak_mem_gib=peak_gib(),
                          device=device_name(), log=args.log)))


def cmd_selfcheck(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    ok = True
    # 1. Our functional Llama (through a .bin round trip) vs transformers, fp32, GQA, Llama 3.1 RoPE scaling.
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_pos=64)
    c = Cfg(vocab=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256, theta=10000.0, eps=1e-5,
            rope_scaling=scaling)
    hf_cfg = LlamaConfig(vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn, num_hidden_layers=c.n_layers,
                         num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                         max_position_embeddings=4096, rms_norm_eps=c.eps, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": c.theta, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}, use_cache=False)
    use_sdpa(hf_cfg)
    torch.manual_seed(args.seed)
    model = build_hf_model(LlamaForCausalLM, hf_cfg, torch.float32)
    with torch.no_grad():  # non-trivial norm weights (HF initialises them to 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    sd = model.state_dict()
    W = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
         "lm_head": sd["lm_head.weight"], "layers": []}
    for l in range(c.n_layers):
        p = f"model.layers.{l}."
        W["layers"].append(dict(attn_norm=sd[p + "input_layernorm.weight"], wq=sd[p + "self_attn.q_proj.weight"],
                                wk=sd[p + "self_attn.k_proj.weight"], wv=sd[p + "self_attn.v_proj.weight"],
                                wo=sd[p + "self_attn.o_proj.weight"], ffn_norm=sd[p + "post_attention_layernorm.weight"],
                                w_gate=sd[p + "mlp.gate_proj.weight"], w_up=sd[p + "mlp.up_proj.weight"],
                                w_down=sd[p + "mlp.down_proj.weight"]))
    path = os.path.join(args.tmp, "selfcheck_model.bin")
    os.makedirs(args.tmp, exist_ok=True)
    write_model_bin(path, c, W)
    c2, W2 = read_model_bin(path, torch.float32, "cuda")
    tokens = torch.randint(0, c.vocab, (2, 200), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=tokens, use_cache=False).logits.float()
        ours = llama_logits(tokens, W2, c2).float()
    err = float((ours - ref).abs().max() / ref.abs().max())
    good = err <= 1e-4
    ok &= good
    print(f"llama forward (fp32, .bin round trip, llama3 rope, T=200 > original context 64) vs transformers: "
          f"max |diff| / max |ref| = {err:.2e} ({'ok' if good else 'FAIL'}, tolerance 1e-4)")
    # 2. Vectorised hybrid attention vs the per-query loop, both geometries, GQA 2, T not a multiple of the window.
    g = torch.Generator("cuda").manual_seed(args.seed)
    B, H, Hkv, T, d, f, w = 1, 4, 2, 37, 16, 8, 8
    q = torch.randn(B, H, T, d, device="cuda", generator=g)
    k = torch.randn(B, Hkv, T, d, device="cuda", generator=g)
    v = torch.randn(B, Hkv, T, d, device="cuda", generator=g)
    wq = torch.randn(H, d, f, device="cuda", generator=g) * 0.3
    wk = torch.randn(H, d, f, device="cuda", generator=g) * 0.3
    wl = torch.randn(H, device="cuda", generator=g)
    for geometry in ("terrace", "sliding"):
        fast = hybrid_attention_quadratic(q, k, v, wq, wk, wl, window_masks(T, w, geometry, "cuda"))
        slow = hybrid_attention_loop(q, k, v, wq, wk, wl, w, geometry)
        err = float((fast.double() - slow).abs().max() / slow.abs().max())
        good = err <= 1e-5
        ok &= good
        print(f"hybrid attention ({geometry}, window {w}, T={T}) vs per-query loop: rel err {err:.2e} "
              f"({'ok' if good else 'FAIL'}, tolerance 1e-5: fp32 vs fp64)")
    print(json.dumps(dict(bench="selfcheck", ok=bool(ok))))
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, warmup=2, iters=5):
        p.add_argument("--small", action="store_true", help="tiny shapes for a smoke test")
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
        p.add_argument("--iters", type=int, default=iters, help="timed steps (the median is reported)")
        p.add_argument("--geometry", choices=["terrace", "sliding"], default="terrace")
        p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls (PyTorch's default: off)")

    def optim(p):
        p.add_argument("--lr", type=float, default=1e-2)
        p.add_argument("--beta1", type=float, default=0.9)
        p.add_argument("--beta2", type=float, default=0.999)
        p.add_argument("--eps", type=float, default=1e-8)
        p.add_argument("--weight-decay", type=float, default=0.0)

    p = sub.add_parser("forward", help="HF LlamaForCausalLM forward + CE loss")
    common(p)
    p.add_argument("--batch", "-B", type=int, default=8)
    p.add_argument("--seq-len", "-T", type=int, default=1024)

    p = sub.add_parser("attention", help="SDPA vs quadratic hybrid attention, fwd+bwd")
    common(p)
    p.add_argument("--tokens", type=int, default=0, help="B*T per size (default 8192; --small 1024)")
    p.add_argument("--seq-lens", type=int, nargs="+", help="T values (default 1024 4096 16384 32768)")

    p = sub.add_parser("stage1", help="stage-1 training step at 8B shapes, random weights")
    common(p, warmup=1, iters=3)
    optim(p)
    p.add_argument("--configs", nargs="+", help="BxT entries (default 8x1024 2x4096)")
    p.add_argument("--backward", choices=["auto", "total", "per-layer"], default="auto")

    p = sub.add_parser("train", help="stage-1 training run from a .bin model on token shards")
    p.add_argument("--model", "-m", required=True, help="lolcats model file (.bin)")
    p.add_argument("--data", "-i", required=True, help="directory of token shards")
    p.add_argument("--prefix", default="", help="shard prefix (default: the directory's only one)")
    p.add_argument("--seq-len", "-T", type=int, default=0, help="T (default: the shards' seq_len)")
    p.add_argument("--batch", "-B", type=int, default=1)
    p.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=100)
    optim(p)
    p.add_argument("--schedule", choices=["constant", "cosine", "plateau"], default="constant")
    p.add_argument("--warmup", type=int, default=0, help="cosine warmup steps")
    p.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor / plateau min_lr")
    p.add_argument("--clip", type=float, default=0.0, help="global-norm clipping, 0 = off")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=0, help="val batches per eval, 0 = the whole val split")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234, help="data order seed (dataloader.h's)")
    p.add_argument("--no-shuffle", action="store_true", help="train sequences in file order")
    p.add_argument("--geometry", choices=["terrace", "sliding"], default="terrace")
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--feature-dim", type=int, default=FEATURE_DIM)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="frozen model compute dtype")
    p.add_argument("--backward", choices=["total", "per-layer"], default="total")
    p.add_argument("--log", default="", help="JSON-lines log file")
    p.add_argument("--save", default="", help="write the trained maps (torch.save) here")
    p.add_argument("--tf32", action="store_true")

    p = sub.add_parser("selfcheck", help="our Llama forward vs transformers; hybrid attention vs a direct loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default="/tmp/bench_reference", help="scratch directory")
    p.add_argument("--tf32", action="store_true")

    args = ap.parse_args(argv)
    for name in ("batch", "accum", "steps", "eval_every", "print_every", "iters"):
        if getattr(args, name, 1) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if torch is None:
        die("PyTorch is not installed here (bench_reference.py runs on the GPU machine)")
    if not torch.cuda.is_available():
        die("no CUDA device visible to PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    {"forward": cmd_forward, "attention": cmd_attention, "stage1": cmd_stage1, "train": cmd_train,
     "selfcheck": cmd_selfcheck}[args.cmd](args)


if __name__ == "__main__":
    main()
