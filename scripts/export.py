#!/usr/bin/env python3
"""export.py: convert Llama-family checkpoints into the lolcats model file (.bin, see model_file.h).

    export.py hf CHECKPOINT_DIR OUT.bin [--dtype fp32|bf16] [--quiet]
        Hugging Face directory: config.json + model.safetensors or sharded model-*.safetensors with
        model.safetensors.index.json. LlamaForCausalLM (Llama 2/3/3.1/3.2, SmolLM2) and MistralForCausalLM.
        HF q/k rows already use the rotate-half RoPE layout: copied as they are.
    export.py gguf FILE.gguf OUT.bin [--dtype fp32|bf16] [--hf-out DIR] [--quiet]
        llama.cpp GGUF, architecture "llama"; tensors dequantized to fp32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
        Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K). llama.cpp stores q/k rows interleaved per head
        (its converter permuted each head's rows); they are permuted back to rotate-half.
    export.py llama2c FILE.bin OUT.bin [--dtype fp32|bf16] [--hf-out DIR] [--quiet]
        llama.c checkpoint (7 int32 header + fp32 weights); interleaved-pair RoPE, theta 10000, eps 1e-5;
        q/k rows permuted to rotate-half.

--dtype (default bf16): storage type of every tensor in OUT.bin; bf16 rounds to nearest even.
--hf-out DIR: also write DIR/config.json (LlamaForCausalLM) + DIR/model.safetensors (fp32) holding the same
    weights as OUT.bin before any bf16 rounding (same q/k layout, i.e. HF's), so transformers can compute the
    same model.

The q/k permutation. For one head of size hd (half = hd / 2), an interleaved layout keeps the RoPE pair p
(rotated by frequency p) in rows 2p and 2p+1; rotate-half keeps it in rows p and p + half. So rotate-half
row r of head h is interleaved row h*hd + 2*(r % half) + r // half.

Tensors are streamed in row chunks, so a 70B checkpoint never sits in memory. Output goes to OUT.tmp and is
renamed into place at the end. Every failure is one line "error: ..." on stderr and exit status 1.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import GGUFError, GGUFFile, GGML_TYPES, _DEQUANT  # noqa: E402
from safetensors_io import Checkpoint, SafetensorsError, SafetensorsWriter, f32_to_bf16_bits, to_f32  # noqa: E402

MODEL_MAGIC = b"LOLCMDL1"
MODEL_VERSION = 1
DTYPE_F32, DTYPE_BF16 = 0, 1
ROPE_NONE, ROPE_LLAMA3 = 0, 1
CHUNK_ELEMENTS = 1 << 24   # rows are streamed in chunks of about this many values (64 MB as fp32)


class ExportError(Exception):
    """A bad input; its message becomes the one-line error."""


# ---------------------------------------------------------------------------------------------------
# Model description shared by every source.

class ModelSpec:
    """Header fields (names as in model_file.h's ModelHeader)."""

    def __init__(self, **kw):
        self.vocab_size = kw["vocab_size"]
        self.n_layers = kw["n_layers"]
        self.dim = kw["dim"]
        self.n_heads = kw["n_heads"]
        self.n_kv_heads = kw["n_kv_heads"]
        self.head_dim = kw["head_dim"]
        self.ffn_dim = kw["ffn_dim"]
        self.max_seq_len = kw["max_seq_len"]
        self.tied_embeddings = bool(kw["tied_embeddings"])
        self.rope_theta = float(kw["rope_theta"])
        self.rope_scaling = kw.get("rope_scaling")  # None or dict(factor, low_freq_factor, high_freq_factor,
        #                                             original_max_position_embeddings)
        self.norm_eps = float(kw["norm_eps"])
        self.bos_id = -1 if kw.get("bos_id") is None else int(kw["bos_id"])
        self.eos_id = -1 if kw.get("eos_id") is None else int(kw["eos_id"])

    def validate(self):
        """The same checks as validate_header() in model_file.h, so a file we write always loads."""
        dims = dict(vocab_size=self.vocab_size, n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim,
                    max_seq_len=self.max_seq_len)
        limits = dict(vocab_size=1 << 24, n_layers=1024, dim=1 << 16, n_heads=1024, n_kv_heads=1 << 31,
                      head_dim=1024, ffn_dim=1 << 20, max_seq_len=1 << 24)
        for k, v in dims.items():
            if not isinstance(v, int) or v <= 0:
                raise ExportError(f"model config: {k} = {v!r} must be a positive integer")
            if v > limits[k]:
                raise ExportError(f"model config: {k} = {v} is implausibly large")
        if self.n_heads % self.n_kv_heads:
            raise ExportError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ExportError(f"head_dim {self.head_dim} must be even for RoPE")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ExportError("rope_theta and the norm epsilon must be positive")
        if self.rope_scaling is not None:
            s = self.rope_scaling
            if not (s["factor"] > 0 and s["high_freq_factor"] > s["low_freq_factor"]
                    and s["original_max_position_embeddings"] > 0):
                raise ExportError(f"inconsistent Llama 3.1 rope scaling fields {s}")
        for name, v in (("bos", self.bos_id), ("eos", self.eos_id)):
            if v >= self.vocab_size or v < -1:
                raise ExportError(f"{name} id {v} is outside the vocabulary of {self.vocab_size}")

    def header_bytes(self, dtype):
        s = self.rope_scaling or {}
        head = struct.pack(
            "<8s12I4fIfii", MODEL_MAGIC, MODEL_VERSION, dtype, self.vocab_size, self.n_layers, self.dim,
            self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim, self.max_seq_len, int(self.tied_embeddings),
            ROPE_LLAMA3 if self.rope_scaling else ROPE_NONE, self.rope_theta, s.get("factor", 0.0),
            s.get("low_freq_factor", 0.0), s.get("high_freq_factor", 0.0),
            int(s.get("original_max_position_embeddings", 0)), self.norm_eps, self.bos_id, self.eos_id)
        assert len(head) == 88
        return head + bytes(256 - len(head))

    def tensor_layout(self):
        """[(our name, HF name, shape)] in model_file.h order."""
        D, Q, KV, F = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.ffn_dim
        out = [("tok_embeddings", "model.embed_tokens.weight", (self.vocab_size, D))]
        for l in range(self.n_layers):
            p = f"model.layers.{l}."
            out += [(f"layers.{l}.attn_norm", p + "input_layernorm.weight", (D,)),
                    (f"layers.{l}.wq", p + "self_attn.q_proj.weight", (Q, D)),
                    (f"layers.{l}.wk", p + "self_attn.k_proj.weight", (KV, D)),
                    (f"layers.{l}.wv", p + "self_attn.v_proj.weight", (KV, D)),
                    (f"layers.{l}.wo", p + "self_attn.o_proj.weight", (D, Q)),
                    (f"layers.{l}.ffn_norm", p + "post_attention_layernorm.weight", (D,)),
                    (f"layers.{l}.w_gate", p + "mlp.gate_proj.weight", (F, D)),
                    (f"layers.{l}.w_up", p + "mlp.up_proj.weight", (F, D)),
                    (f"layers.{l}.w_down", p + "mlp.down_proj.weight", (D, F))]
        out.append(("final_norm", "model.norm.weight", (D,)))
        if not self.tied_embeddings:
            out.append(("lm_head", "lm_head.weight", (self.vocab_size, D)))
        return out

    def n_elements(self):
        return sum(int(np.prod(s)) for _, _, s in self.tensor_layout())

    def hf_config(self):
        """config.json of the equivalent transformers LlamaForCausalLM (legacy and v5 RoPE keys both)."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        rope_scaling = None
        if self.rope_scaling:
            rope_scaling = {"rope_type": "llama3", **self.rope_scaling}
            rope_parameters = {**rope_scaling, "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.dim, "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tied_embeddings, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_id if self.bos_id >= 0 else None,
            "eos_token_id": self.eos_id if self.eos_id >= 0 else None,
            "torch_dtype": "float32", "dtype": "float32",
        }

    def summary(self):
        rope = f"theta {self.rope_theta:g}"
        if self.rope_scaling:
            s = self.rope_scaling
            rope += (f" + llama3 scaling (factor {s['factor']:g}, low {s['low_freq_factor']:g}, high "
                     f"{s['high_freq_factor']:g}, original {s['original_max_position_embeddings']})")
        return (f"vocab {self.vocab_size}, {self.n_layers} layers, dim {self.dim}, {self.n_heads} heads / "
                f"{self.n_kv_heads} kv heads of {self.head_dim}, ffn {self.ffn_dim}, max seq {self.max_seq_len}, "
                f"{'tied' if self.tied_embeddings else 'untied'} embeddings, rope {rope}, eps {self.norm_eps:g}, "
                f"bos {self.bos_id}, eos {self.eos_id}")


def interleaved_to_rotate_half(rows, head_dim):
    """(n_heads_in_chunk * head_dim, in) interleaved q/k rows -> rotate-half rows (see the file header)."""
    n_in = rows.shape[1]
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim // 2, 2, n_in).swapaxes(1, 2).reshape(heads * head_dim, n_in)


class TensorSource:
    """How to produce one tensor in row chunks: read(r0, r1) -> float32 (r1 - r0, cols) array, or uint16
    bf16 bits when raw_bf16 is set (the source already stores bf16 and nothing needs converting)."""

    def __init__(self, rows, cols, read, row_align=1, raw_bf16=False):
        self.rows, self.cols, self.read, self.row_align, self.raw_bf16 = rows, cols, read, row_align, raw_bf16


def _check_finite(chunk, name, is_bf16_bits):
    if is_bf16_bits:
        bad = ((chunk & np.uint16(0x7F80)) == np.uint16(0x7F80)).any()
    else:
        bad = not np.isfinite(chunk).all()
    if bad:
        raise ExportError(f"tensor '{name}' holds a non-finite value (NaN or inf)")


def write_model(spec, sources, out_path, dtype, hf_out=None):
    """Write OUT.bin (and optionally an HF checkpoint) from `sources`: our name -> TensorSource."""
    spec.validate()
    layout = spec.tensor_layout()
    for name, _, shape in layout:
        src = sources[name]
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        if (src.rows, src.cols) != (rows, cols):
            raise ExportError(f"tensor '{name}' has shape ({src.rows}, {src.cols}) but the config implies "
                              f"({rows}, {cols})")
    target = DTYPE_BF16 if dtype == "bf16" else DTYPE_F32
    tmp = out_path + ".tmp"
    hf = None
    if hf_out:
        os.makedirs(hf_out, exist_ok=True)
        with open(os.path.join(hf_out, "config.json.tmp"), "w") as f:
            json.dump(spec.hf_config(), f, indent=2)
        hf = SafetensorsWriter(os.path.join(hf_out, "model.safetensors"),
                               [(hf_name, "F32", shape) for _, hf_name, shape in layout],
                               metadata={"format": "pt"})
    try:
        with open(tmp, "wb") as f:
            f.write(spec.header_bytes(target))
            for name, hf_name, _ in layout:
                src = sources[name]
                step = max(src.row_align, CHUNK_ELEMENTS // max(src.cols, 1) // src.row_align * src.row_align)
                for r0 in range(0, src.rows, step):
                    r1 = min(src.rows, r0 + step)
                    chunk = src.read(r0, r1)
                    is_bits = chunk.dtype == np.uint16
                    _check_finite(chunk, name, is_bits)
                    if hf is not None:
                        hf.write(hf_name, to_f32(chunk, "BF16") if is_bits else chunk)
                    if target == DTYPE_BF16:
                        data = chunk if is_bits else f32_to_bf16_bits(chunk)
                    else:
                        data = to_f32(chunk, "BF16") if is_bits else np.ascontiguousarray(chunk, np.float32)
                    f.write(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes())
            expect = 256 + spec.n_elements() * (2 if target == DTYPE_BF16 else 4)
            if f.tell() != expect:
                raise ExportError(f"internal: wrote {f.tell()} bytes, expected {expect}")
        if hf is not None:
            hf.close()
            os.replace(os.path.join(hf_out, "config.json.tmp"), os.path.join(hf_out, "config.json"))
        os.replace(tmp, out_path)
    except BaseException:
        for p in (tmp, os.path.join(hf_out, "config.json.tmp") if hf_out else None,
                  os.path.join(hf_out, "model.safetensors.tmp") if hf_out else None):
            if p and os.path.exists(p):
                os.remove(p)
        raise


# ---------------------------------------------------------------------------------------------------
# Hugging Face checkpoints.

def _hf_rope(cfg):
    """(theta, llama3 scaling dict or None) from a config.json, transformers v4 or v5 style."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if "rope_theta" in params:
        theta = params["rope_theta"]
    else:
        theta = cfg.get("rope_theta", 10000.0)
    # v5 keeps everything in rope_parameters; v4 in rope_scaling. rope_scaling wins, as in transformers.
    rp = scaling or params
    rtype = rp.get("rope_type", rp.get("type", "default")) if rp else "default"
    if rtype in ("default", None):
        return float(theta), None
    if rtype != "llama3":
        raise ExportError(f"unsupported rope scaling type '{rtype}' (only Llama 3.1 'llama3' is supported)")
    try:
        s = {"factor": float(rp["factor"]), "low_freq_factor": float(rp["low_freq_factor"]),
             "high_freq_factor": float(rp["high_freq_factor"]),
             "original_max_position_embeddings": int(rp["original_max_position_embeddings"])}
    except KeyError as e:
        raise ExportError(f"llama3 rope scaling in config.json lacks {e}")
    return float(theta), s


def _first_id(v):
    if isinstance(v, list):
        return v[0] if v else None
    return v


def hf_source(ckpt_dir, warn):
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isdir(ckpt_dir):
        raise ExportError(f"'{ckpt_dir}' is not a directory")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ExportError(f"cannot read '{cfg_path}' ({e.strerror})")
    except ValueError as e:
        raise ExportError(f"'{cfg_path}' is not valid JSON ({e})")
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    known = {"LlamaForCausalLM", "MistralForCausalLM"}
    if not (set(archs) & known or (not archs and model_type in ("llama", "mistral"))):
        raise ExportError(f"unsupported architecture {archs or model_type!r} (supported: {', '.join(sorted(known))})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"unsupported hidden_act '{cfg['hidden_act']}' (only silu / SwiGLU)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ExportError("checkpoints with attention or MLP biases are not supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ExportError("partial rotary embeddings are not supported")
    if cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        warn(f"sliding_window {cfg['sliding_window']} is ignored: the exported model uses full causal attention")
    try:
        heads = cfg["num_attention_heads"]
        theta, scaling = _hf_rope(cfg)
        spec = ModelSpec(
            vocab_size=cfg["vocab_size"], n_layers=cfg["num_hidden_layers"], dim=cfg["hidden_size"],
            n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, ffn_dim=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tied_embeddings=cfg.get("tie_word_embeddings", False), rope_theta=theta, rope_scaling=scaling,
            norm_eps=cfg.get("rms_norm_eps", 1e-6), bos_id=_first_id(cfg.get("bos_token_id")),
            eos_id=_first_id(cfg.get("eos_token_id")))
    except KeyError as e:
        raise ExportError(f"'{cfg_path}' lacks {e}")
    spec.validate()
    ckpt = Checkpoint(ckpt_dir)

    def make(hf_name, want_bf16):
        if hf_name not in ckpt:
            raise ExportError(f"checkpoint '{ckpt_dir}' has no tensor '{hf_name}'")
        dtype = ckpt.dtype(hf_name)
        if dtype not in ("F32", "F16", "BF16"):
            raise ExportError(f"tensor '{hf_name}' has unsupported dtype {dtype}")
        shape = ckpt.shape(hf_name)
        if len(shape) not in (1, 2):
            raise ExportError(f"tensor '{hf_name}' has {len(shape)} dims")
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        raw_bf16 = want_bf16 and dtype == "BF16"

        def read(r0, r1):
            raw, dt = ckpt.raw(hf_name)
            raw = raw.reshape(rows, cols)[r0:r1]
            return np.array(raw) if raw_bf16 else to_f32(raw, dt)
        return TensorSource(rows, cols, read, raw_bf16=raw_bf16)

    def build(want_bf16):
        sources = {}
        for name, hf_name, _ in spec.tensor_layout():
            sources[name] = make(hf_name, want_bf16)
        return sources
    return spec, build


# ---------------------------------------------------------------------------------------------------
# GGUF (llama.cpp).

def _llama3_inv_freq(theta, head_dim, s):
    """Llama 3.1 scaled inverse frequencies (float64), the formula transformers uses."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if s is None:
        return inv
    old = s["original_max_position_embeddings"]
    low_wl, high_wl = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wl = 2 * math.pi / inv
    out = np.where(wl > low_wl, inv / s["factor"], inv)
    smooth = (old / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    mid = ~(wl < high_wl) & ~(wl > low_wl)
    return np.where(mid, (1 - smooth) * out / s["factor"] + smooth * out, out)


def _gguf_rope_scaling(g, md, theta, head_dim):
    """llama.cpp keeps Llama 3.1 scaling as a tensor rope_freqs.weight of per-frequency divisors; recover the
    four parameters by matching it against the formula (metadata fixes factor / context where present)."""
    stype = md.get("llama.rope.scaling.type")
    if stype not in (None, "none") and "rope_freqs.weight" not in g.tensors:
        raise ExportError(f"unsupported GGUF rope scaling type '{stype}'")
    if "rope_freqs.weight" not in g.tensors:
        return None
    freqs = g.load("rope_freqs.weight").astype(np.float64).reshape(-1)
    if freqs.size != head_dim // 2:
        raise ExportError(f"rope_freqs.weight has {freqs.size} values, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(freqs, 1.0):
        return None
    base = _llama3_inv_freq(theta, head_dim, None)
    factors = [md["llama.rope.scaling.factor"]] if "llama.rope.scaling.factor" in md else [8, 32, 16, 4, 2]
    origs = ([md["llama.rope.scaling.original_context_length"]]
             if "llama.rope.scaling.original_context_length" in md else [8192, 4096, 2048, 16384])
    for factor in factors:
        for orig in origs:
            for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
                s = {"factor": float(factor), "low_freq_factor": low, "high_freq_factor": high,
                     "original_max_position_embeddings": int(orig)}
                if np.allclose(base / _llama3_inv_freq(theta, head_dim, s), freqs, rtol=1e-4, atol=0):
                    return s
    raise ExportError("rope_freqs.weight does not match Llama 3.1 rope scaling for any known parameters")


def gguf_source(path, warn):
    if not os.path.isfile(path):
        raise ExportError(f"cannot open '{path}' (no such file)")
    g = GGUFFile(path)
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ExportError(f"unsupported GGUF architecture '{arch}' (only 'llama')")

    def need(key):
        if key not in md:
            raise ExportError(f"GGUF metadata lacks '{key}'")
        return md[key]
    if "token_embd.weight" not in g.tensors:
        raise ExportError(f"'{path}' has no tensor 'token_embd.weight'")
    dim = need("llama.embedding_length")
    heads = need("llama.attention.head_count")
    head_dim = md.get("llama.attention.key_length") or md.get("llama.rope.dimension_count") or dim // heads
    if md.get("llama.attention.value_length", head_dim) != head_dim:
        raise ExportError("GGUF key_length and value_length differ, which Llama models never do")
    if md.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ExportError("partial rotary embeddings (rope.dimension_count < head dim) are not supported")
    kv = md.get("llama.attention.head_count_kv", heads)
    vocab = g.tensors["token_embd.weight"].shape[0]
    if md.get("llama.vocab_size", vocab) != vocab:
        raise ExportError(f"llama.vocab_size {md['llama.vocab_size']} differs from token_embd rows {vocab}")
    if isinstance(kv, list) or isinstance(heads, list):
        raise ExportError("per-layer head counts are not supported")
    theta = float(md.get("llama.rope.freq_base", 10000.0))
    spec = ModelSpec(
        vocab_size=vocab, n_layers=need("llama.block_count"), dim=dim, n_heads=heads, n_kv_heads=kv,
        head_dim=head_dim, ffn_dim=need("llama.feed_forward_length"), max_seq_len=md.get("llama.context_length", 2048),
        tied_embeddings="output.weight" not in g.tensors, rope_theta=theta,
        rope_scaling=_gguf_rope_scaling(g, md, theta, head_dim),
        norm_eps=md.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        bos_id=md.get("tokenizer.ggml.bos_token_id"), eos_id=md.get("tokenizer.ggml.eos_token_id"))
    spec.validate()

    names = {"tok_embeddings": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
    per_layer = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                 "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}

    def gguf_name(ours):
        if ours.startswith("layers."):
            _, l, what = ours.split(".")
            return f"blk.{l}.{per_layer[what]}.weight"
        return names[ours]

    def make(ours):
        gname = gguf_name(ours)
        if gname not in g.tensors:
            raise ExportError(f"'{path}' has no tensor '{gname}'")
        info = g.tensors[gname]
        if info.type not in _DEQUANT:
            supported = ", ".join(GGML_TYPES[t][0] for t in _DEQUANT)
            raise ExportError(f"tensor '{gname}' has quantization type {info.type_name}, which is not "
                              f"supported (supported: {supported})")
        if len(info.shape) not in (1, 2):
            raise ExportError(f"tensor '{gname}' has {len(info.shape)} dims")
        rows, cols = (info.shape[0], info.shape[1]) if len(info.shape) == 2 else (1, info.shape[0])
        permute = ours.endswith(".wq") or ours.endswith(".wk")

        def read(r0, r1):
            x = g.load(gname, r0, r1)
            return interleaved_to_rotate_half(x, head_dim) if permute else x
        return TensorSource(rows, cols, read, row_align=head_dim if permute else 1)

    def build(want_bf16):
        return {ours: make(ours) for ours, _, _ in spec.tensor_layout()}
    return spec, build


# ---------------------------------------------------------------------------------------------------
# llama2.c checkpoints.

def llama2c_source(path, warn):
    if not os.path.isfile(path):
        raise ExportError(f"cannot open '{path}' (no such file)")
    size = os.path.getsize(path)
    if size < 28:
        raise ExportError(f"'{path}' is too small to be a llama2.c checkpoint")
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", f.read(28))
    shared = vocab > 0
    vocab = abs(vocab)
    for k, v in dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     vocab_size=vocab, seq_len=seq_len).items():
        if v <= 0:
            raise ExportError(f"'{path}': llama2.c header field {k} = {v} must be positive")
    if dim % n_heads:
        raise ExportError(f"'{path}': dim {dim} is not a multiple of n_heads {n_heads}")
    hd = dim // n_heads
    spec = ModelSpec(vocab_size=vocab, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                     ffn_dim=hidden, max_seq_len=seq_len, tied_embeddings=shared, rope_theta=10000.0,
                     norm_eps=1e-5, bos_id=1 if vocab > 2 else None, eos_id=2 if vocab > 2 else None)
    spec.validate()
    L, D, F, KVD = n_layers, dim, hidden, n_kv * hd
    # (name, shape) in file order; every value fp32.
    parts = [("tok", (vocab, D)), ("rms_att", (L, D)), ("wq", (L, D, D)), ("wk", (L, KVD, D)), ("wv", (L, KVD, D)),
             ("wo", (L, D, D)), ("rms_ffn", (L, D)), ("w1", (L, F, D)), ("w2", (L, D, F)), ("w3", (L, F, D)),
             ("rms_final", (D,)), ("freq_real", (seq_len, hd // 2)), ("freq_imag", (seq_len, hd // 2))]
    if not shared:
        parts.append(("wcls", (vocab, D)))
    n_floats = sum(int(np.prod(s)) for _, s in parts)
    if size != 28 + 4 * n_floats:
        raise ExportError(f"'{path}' has {size} bytes but its llama2.c header implies {28 + 4 * n_floats} "
                          f"({'truncated' if size < 28 + 4 * n_floats else 'trailing data'})")
    mm = np.memmap(path, dtype="<f4", mode="r", offset=28, shape=(n_floats,))
    arrays, off = {}, 0
    for name, shape in parts:
        n = int(np.prod(shape))
        arrays[name] = mm[off:off + n].reshape(shape)
        off += n
    # The file's precomputed RoPE table must be theta 10000, or the model was trained with something else.
    t = np.arange(seq_len, dtype=np.float64)[:, None]
    ang = t * (1.0 / 10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))[None, :]
    if not (np.allclose(arrays["freq_real"], np.cos(ang), atol=1e-3) and
            np.allclose(arrays["freq_imag"], np.sin(ang), atol=1e-3)):
        warn("the checkpoint's freq_cis table does not match RoPE theta 10000; exporting with theta 10000 anyway")

    def rows_of(arr):
        def read(r0, r1):
            return np.array(arr.reshape(-1, arr.shape[-1])[r0:r1], dtype=np.float32)
        return read

    def source(arr, permute=False):
        a2 = arr.reshape(-1, arr.shape[-1]) if arr.ndim == 2 else arr.reshape(1, -1)
        if permute:
            def read(r0, r1):
                return interleaved_to_rotate_half(np.array(a2[r0:r1], dtype=np.float32), hd)
            return TensorSource(a2.shape[0], a2.shape[1], read, row_align=hd)
        return TensorSource(a2.shape[0], a2.shape[1], rows_of(a2))

    def build(want_bf16):
        s = {"tok_embeddings": source(arrays["tok"]), "final_norm": source(arrays["rms_final"])}
        for l in range(L):
            p = f"layers.{l}."
            s[p + "attn_norm"] = source(arrays["rms_att"][l])
            s[p + "wq"] = source(arrays["wq"][l], permute=True)
            s[p + "wk"] = source(arrays["wk"][l], permute=True)
            s[p + "wv"] = source(arrays["wv"][l])
            s[p + "wo"] = source(arrays["wo"][l])
            s[p + "ffn_norm"] = source(arrays["rms_ffn"][l])
            s[p + "w_gate"] = source(arrays["w1"][l])
            s[p + "w_down"] = source(arrays["w2"][l])
            s[p + "w_up"] = source(arrays["w3"][l])
        if not shared:
            s["lm_head"] = source(arrays["wcls"])
        return s
    return spec, build


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Export a Llama-family checkpoint to the lolcats .bin model file.")
    sub = ap.add_subparsers(dest="kind", required=True)
    for kind, what in (("hf", "Hugging Face checkpoint directory"), ("gguf", "GGUF file"),
                       ("llama2c", "llama2.c checkpoint")):
        p = sub.add_parser(kind, help=f"from a {what}")
        p.add_argument("source", help=what)
        p.add_argument("out", help="output .bin")
        p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="storage dtype (default bf16)")
        if kind != "hf":
            p.add_argument("--hf-out", metavar="DIR", help="also write an fp32 HF checkpoint of the same weights")
        p.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = ap.parse_args(argv)

    def warn(msg):
        print(f"warning: {msg}", file=sys.stderr)

    make_source = {"hf": hf_source, "gguf": gguf_source, "llama2c": llama2c_source}[args.kind]
    spec, build = make_source(args.source, warn)
    sources = build(args.dtype == "bf16" and not getattr(args, "hf_out", None))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise ExportError(f"output directory '{out_dir}' does not exist")
    write_model(spec, sources, args.out, args.dtype, getattr(args, "hf_out", None))
    if not args.quiet:
        n = spec.n_elements()
        print(f"exported {args.kind} '{args.source}' -> '{args.out}' ({args.dtype}, {n / 1e6:.2f}M params, "
              f"{os.path.getsize(args.out) / 2**20:.1f} MiB): {spec.summary()}"
              + (f"; HF copy in '{args.hf_out}'" if getattr(args, "hf_out", None) else ""))


if __name__ == "__main__":
    try:
        main()
    except (ExportError, GGUFError, SafetensorsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"error: {e.strerror or e}{': ' + repr(e.filename) if e.filename else ''}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug or an input we did not foresee: still one line, never a traceback
        if os.environ.get("LOLCATS_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set LOLCATS_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(1)
