"""Tests of scripts/export.py and scripts/safetensors_io.py on small checkpoints written here (Hugging Face
safetensors, GGUF, llama2.c), plus the real stories260K when the shared data is present: header fields, exact
tensor values, the q/k permutation (checked through RoPE attention scores, the property that matters), the
HF copy written by --hf-out, and one-line errors for bad input. Pure numpy; no torch."""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io as st  # noqa: E402
from test_gguf import quantize_q8_0, write_gguf  # noqa: E402

EXPORT = os.path.join(ROOT, "scripts", "export.py")
SHARED = os.environ.get("LOLCATS_SHARED", os.path.join(ROOT, "..", "shared"))
STORIES = os.path.join(SHARED, "models", "stories260K.bin")
HEADER_KEYS = ("magic version dtype vocab_size n_layers dim n_heads n_kv_heads head_dim ffn_dim max_seq_len "
               "tied_embeddings rope_scaling rope_theta rope_factor rope_low_freq_factor rope_high_freq_factor "
               "rope_original_max_pos norm_eps bos_id eos_id").split()


def run_export(*args):
    return subprocess.run([sys.executable, EXPORT, *map(str, args)], capture_output=True, text=True)


def export_ok(*args):
    r = run_export(*args, "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    return r


def read_model(path):
    """(header dict, {our tensor name: float32 array}) of a .bin, parsed independently of export.py."""
    with open(path, "rb") as f:
        raw = f.read()
    h = dict(zip(HEADER_KEYS, struct.unpack("<8s12I4fIfii", raw[:88])))
    assert h["magic"] == b"LOLCMDL1" and h["version"] == 1 and raw[88:256] == bytes(168)
    if h["dtype"] == 0:
        data = np.frombuffer(raw, "<f4", offset=256)
    else:
        data = (np.frombuffer(raw, "<u2", offset=256).astype(np.uint32) << 16).view(np.float32)
    D, Q, KV, F, V = (h["dim"], h["n_heads"] * h["head_dim"], h["n_kv_heads"] * h["head_dim"], h["ffn_dim"],
                      h["vocab_size"])
    shapes = [("tok_embeddings", (V, D))]
    for l in range(h["n_layers"]):
        shapes += [(f"layers.{l}.{n}", s) for n, s in (("attn_norm", (D,)), ("wq", (Q, D)), ("wk", (KV, D)),
                                                       ("wv", (KV, D)), ("wo", (D, Q)), ("ffn_norm", (D,)),
                                                       ("w_gate", (F, D)), ("w_up", (F, D)), ("w_down", (D, F)))]
    shapes.append(("final_norm", (D,)))
    if not h["tied_embeddings"]:
        shapes.append(("lm_head", (V, D)))
    out, off = {}, 0
    for name, s in shapes:
        n = int(np.prod(s))
        out[name] = data[off:off + n].reshape(s)
        off += n
    assert off == data.size, "file size does not match its header"
    return h, out


HF_NAMES = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
            "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}


def hf_name(ours):
    if ours.startswith("layers."):
        _, l, what = ours.split(".")
        return f"model.layers.{l}.{HF_NAMES[what]}.weight"
    return {"tok_embeddings": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
            "lm_head": "lm_head.weight"}[ours]


def random_hf_weights(rng, V, D, L, H, KV, hd, F, tied):
    w = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "model.norm.weight": 1 + rng.standard_normal(D)}
    for l in range(L):
        p = f"model.layers.{l}."
        w.update({p + "input_layernorm.weight": 1 + rng.standard_normal(D),
                  p + "self_attn.q_proj.weight": rng.standard_normal((H * hd, D)),
                  p + "self_attn.k_proj.weight": rng.standard_normal((KV * hd, D)),
                  p + "self_attn.v_proj.weight": rng.standard_normal((KV * hd, D)),
                  p + "self_attn.o_proj.weight": rng.standard_normal((D, H * hd)),
                  p + "post_attention_layernorm.weight": 1 + rng.standard_normal(D),
                  p + "mlp.gate_proj.weight": rng.standard_normal((F, D)),
                  p + "mlp.up_proj.weight": rng.standard_normal((F, D)),
                  p + "mlp.down_proj.weight": rng.standard_normal((D, F))})
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((V, D))
    return {k: (0.1 * v).astype(np.float32) for k, v in w.items()}


def to_interleaved(w, n_heads):
    """llama.cpp's converter permutation of HF q/k rows (per head: rows p, p+half -> 2p, 2p+1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def rope_scores(q, k, pos_q, pos_k, interleaved, theta=10000.0):
    """q.k after RoPE at the given positions, per head pair, for one head of vectors (hd,)."""
    hd = q.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)

    def rot(x, pos):
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        if interleaved:
            a, b = x[0::2], x[1::2]
            y = np.empty_like(x)
            y[0::2], y[1::2] = a * c - b * s, a * s + b * c
            return y
        a, b = x[:hd // 2], x[hd // 2:]
        return np.concatenate([a * c - b * s, a * s + b * c])
    return rot(q, pos_q) @ rot(k, pos_k)


# ---------------------------------------------------------------------------------------------------
# safetensors_io

def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5, np.inf, 3.4e38], np.float32)
    bits = st.f32_to_bf16_bits(x)
    # 1+2^-8 is a tie -> even (1.0); 1+3*2^-8 a tie -> even (0x3F82); just above a tie rounds up;
    # 3.4e38 rounds up past the largest bf16 to inf, as IEEE round-to-nearest does.
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80, 0x7F80]
    nan = st.f32_to_bf16_bits(np.array([np.nan], np.float32))
    assert np.isnan(st.bf16_bits_to_f32(nan)).all()


def test_safetensors_roundtrip_sharded_and_lazy(tmp_path):
    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (7,), (2, 2, 4)))
    st.save_file({"a": a, "b": b}, str(tmp_path / "s1.safetensors"))
    st.save_file({"c": c}, str(tmp_path / "s2.safetensors"), dtype="BF16")
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors",
                                                  "c": "s2.safetensors"}}, f)
    ck = st.Checkpoint(str(tmp_path))
    assert sorted(ck.names()) == ["a", "b", "c"] and ck.dtype("c") == "BF16" and ck.shape("c") == (2, 2, 4)
    assert np.array_equal(ck.get("a"), a) and np.array_equal(ck.get("b"), b)
    assert np.array_equal(ck.get("c"), st.bf16_bits_to_f32(st.f32_to_bf16_bits(c)))
    raw, dt = ck.raw("a")
    assert dt == "F32" and not raw.flags.writeable    # a view into the map, not a copy
    with open(tmp_path / "s1.safetensors", "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        json.loads(f.read(n))
    assert (8 + n) % 8 == 0                           # data section 8-byte aligned


def test_safetensors_rejects_truncated(tmp_path):
    p = str(tmp_path / "x.safetensors")
    st.save_file({"a": np.ones((4, 4), np.float32)}, p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 4)
    with pytest.raises(st.SafetensorsError, match="outside the file"):
        st.SafetensorsFile(p)


# ---------------------------------------------------------------------------------------------------
# export.py hf

def write_hf(path, weights, config, shard=False, bf16_names=()):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = list(weights)
    groups = [names[:len(names) // 2], names[len(names) // 2:]] if shard else [names]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if shard else "model.safetensors"
        specs = [(n, "BF16" if n in bf16_names else "F32", weights[n].shape) for n in group]
        w = st.SafetensorsWriter(os.path.join(path, fname), specs)
        for n in group:
            w.write(n, weights[n])
        w.close()
        weight_map.update({n: fname for n in group})
    if shard:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def llama_config(V, D, L, H, KV, F, tied, **extra):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
           "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": F,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": tied, "bos_token_id": 3, "eos_token_id": [4, 5], "hidden_act": "silu"}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_export_sharded_bf16_sources(tmp_path, dtype):
    rng = np.random.default_rng(4)
    V, D, L, H, KV, hd, F = 50, 32, 2, 4, 2, 8, 48
    w = random_hf_weights(rng, V, D, L, H, KV, hd, F, tied=False)
    bf16_names = [n for n in w if "mlp" in n or "embed" in n]
    src = str(tmp_path / "hf")
    write_hf(src, w, llama_config(V, D, L, H, KV, F, False), shard=True, bf16_names=bf16_names)
    out = str(tmp_path / "m.bin")
    export_ok("hf", src, out, "--dtype", dtype)
    h, t = read_model(out)
    assert (h["vocab_size"], h["n_layers"], h["dim"], h["n_heads"], h["n_kv_heads"], h["head_dim"], h["ffn_dim"]) == \
        (V, L, D, H, KV, hd, F)
    assert (h["dtype"], h["tied_embeddings"], h["rope_scaling"], h["bos_id"], h["eos_id"]) == \
        (0 if dtype == "fp32" else 1, 0, 0, 3, 4)
    assert h["rope_theta"] == 10000.0 and h["norm_eps"] == np.float32(1e-5) and h["max_seq_len"] == 512
    for ours, arr in t.items():
        src_val = w[hf_name(ours)]
        if hf_name(ours) in bf16_names:   # stored as bf16 in the checkpoint
            src_val = st.bf16_bits_to_f32(st.f32_to_bf16_bits(src_val))
        if dtype == "bf16":
            src_val = st.bf16_bits_to_f32(st.f32_to_bf16_bits(src_val))
        assert np.array_equal(arr, src_val), ours   # HF q/k rows are copied unpermuted


def test_hf_export_llama31_tied_and_transformers5_config(tmp_path):
    rng = np.random.default_rng(5)
    V, D, L, H, KV, hd, F = 40, 48, 1, 4, 1, 16, 32   # head_dim 16 != 48 / 4 (Mistral-style explicit head_dim)
    w = random_hf_weights(rng, V, D, L, H, KV, hd, F, tied=True)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    for style, extra in (("v4", {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}),
                         ("v5", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})):
        cfg = llama_config(V, D, L, H, KV, F, True, head_dim=hd, architectures=["MistralForCausalLM"])
        del cfg["rope_theta"]
        cfg.update(extra)
        src = str(tmp_path / style)
        write_hf(src, w, cfg)
        out = str(tmp_path / f"{style}.bin")
        export_ok("hf", src, out, "--dtype", "fp32")
        h, t = read_model(out)
        assert h["tied_embeddings"] == 1 and "lm_head" not in t and h["head_dim"] == 16
        assert (h["rope_scaling"], h["rope_theta"], h["rope_factor"], h["rope_low_freq_factor"],
                h["rope_high_freq_factor"], h["rope_original_max_pos"]) == (1, 500000.0, 8.0, 1.0, 4.0, 64), style
        assert np.array_equal(t["layers.0.wq"], w["model.layers.0.self_attn.q_proj.weight"])


def test_hf_export_summary_line(tmp_path):
    rng = np.random.default_rng(6)
    w = random_hf_weights(rng, 20, 16, 1, 2, 2, 8, 16, tied=True)
    src = str(tmp_path / "hf")
    write_hf(src, w, llama_config(20, 16, 1, 2, 2, 16, True))
    r = run_export("hf", src, str(tmp_path / "m.bin"))
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.count("\n") == 1 and "vocab 20, 1 layers, dim 16" in r.stdout


# ---------------------------------------------------------------------------------------------------
# export.py gguf

def llama_gguf(path, hf, V, D, L, H, KV, hd, F, tied, theta=10000.0, rope_freqs=None, extra_md=(), embed_q8=False,
               type_override=None):
    """A llama-architecture GGUF holding HF-layout weights `hf` as llama.cpp's converter would (q/k permuted)."""
    md = [("general.architecture", "str", "llama"), ("llama.block_count", "u32", L),
          ("llama.context_length", "u32", 2048), ("llama.embedding_length", "u32", D),
          ("llama.feed_forward_length", "u32", F), ("llama.attention.head_count", "u32", H),
          ("llama.attention.head_count_kv", "u32", KV), ("llama.rope.freq_base", "f32", theta),
          ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-6), ("llama.rope.dimension_count", "u32", hd),
          ("tokenizer.ggml.bos_token_id", "u32", 1), ("tokenizer.ggml.eos_token_id", "u32", 2), *extra_md]
    tensors, expect = [], dict(hf)

    def add(name, arr, gname=None):
        arr = np.asarray(arr, np.float32)
        dims = tuple(reversed(arr.shape))
        if type_override and name in type_override:
            ttype, raw = type_override[name]
        elif embed_q8 and name == "token_embd.weight":
            raw, val = quantize_q8_0(arr)
            expect["model.embed_tokens.weight"] = val
            ttype = 8
        else:
            ttype, raw = 0, arr.tobytes()
        tensors.append((name, dims, ttype, raw))
    add("token_embd.weight", hf["model.embed_tokens.weight"])
    for l in range(L):
        p = f"model.layers.{l}."
        add(f"blk.{l}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"blk.{l}.attn_q.weight", to_interleaved(hf[p + "self_attn.q_proj.weight"], H))
        add(f"blk.{l}.attn_k.weight", to_interleaved(hf[p + "self_attn.k_proj.weight"], KV))
        add(f"blk.{l}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        add(f"blk.{l}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        add(f"blk.{l}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        add(f"blk.{l}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
        add(f"blk.{l}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
        add(f"blk.{l}.ffn_down.weight", hf[p + "mlp.down_proj.weight"])
    add("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        add("output.weight", hf["lm_head.weight"])
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs)
    write_gguf(path, md, tensors)
    return expect


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_export_undoes_the_qk_permutation(tmp_path, tied):
    rng = np.random.default_rng(7)
    V, D, L, H, KV, hd, F = 64, 64, 2, 4, 2, 16, 96
    hf = random_hf_weights(rng, V, D, L, H, KV, hd, F, tied)
    src = str(tmp_path / "m.gguf")
    expect = llama_gguf(src, hf, V, D, L, H, KV, hd, F, tied, embed_q8=True)
    out, hf_out = str(tmp_path / "m.bin"), str(tmp_path / "hf")
    export_ok("gguf", src, out, "--dtype", "fp32", "--hf-out", hf_out)
    h, t = read_model(out)
    assert (h["vocab_size"], h["n_layers"], h["dim"], h["n_heads"], h["n_kv_heads"], h["head_dim"], h["ffn_dim"],
            h["max_seq_len"], h["tied_embeddings"], h["bos_id"], h["eos_id"]) == \
        (V, L, D, H, KV, hd, F, 2048, int(tied), 1, 2)
    assert h["norm_eps"] == np.float32(1e-6) and h["rope_scaling"] == 0
    for ours, arr in t.items():
        assert np.array_equal(arr, expect[hf_name(ours)]), ours
    # The HF copy holds the same values under HF names, and a config transformers can read.
    ck = st.Checkpoint(hf_out)
    assert ("lm_head.weight" in ck) == (not tied)
    for ours, arr in t.items():
        assert ck.dtype(hf_name(ours)) == "F32" and np.array_equal(ck.get(hf_name(ours)), arr), ours
    with open(os.path.join(hf_out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] == tied
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (KV, hd, F)
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None


def test_gguf_export_recovers_llama31_rope_scaling(tmp_path):
    rng = np.random.default_rng(8)
    V, D, L, H, KV, hd, F = 32, 32, 1, 2, 1, 16, 32
    hf = random_hf_weights(rng, V, D, L, H, KV, hd, F, tied=True)
    theta = 500000.0
    # llama.cpp stores the per-frequency divisors inv_freq / scaled_inv_freq; computed here from the
    # Llama 3.1 rule: wavelength < orig/high: 1; > orig/low: factor; in between: 1 / ((1-s)/factor + s).
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wl = 2 * math.pi / inv
    s = (8192 / wl - 1.0) / (4.0 - 1.0)
    divisor = np.where(wl < 8192 / 4, 1.0, np.where(wl > 8192, 8.0, 1 / ((1 - s) / 8 + s)))
    assert (divisor == 1).any() and (divisor == 8).any() and ((divisor > 1) & (divisor < 8)).any()
    src = str(tmp_path / "m.gguf")
    llama_gguf(src, hf, V, D, L, H, KV, hd, F, True, theta=theta, rope_freqs=divisor)
    out = str(tmp_path / "m.bin")
    export_ok("gguf", src, out, "--dtype", "bf16")
    h, _ = read_model(out)
    assert (h["rope_scaling"], h["rope_theta"], h["rope_factor"], h["rope_low_freq_factor"],
            h["rope_high_freq_factor"], h["rope_original_max_pos"]) == (1, theta, 8.0, 1.0, 4.0, 8192)


# ---------------------------------------------------------------------------------------------------
# export.py llama2c

def write_llama2c(path, rng, dim, hidden, L, H, KV, V, seq, shared=True):
    """A llama2.c checkpoint with random weights (scaled 0.1) and the theta-10000 freq_cis table."""
    hd = dim // H
    weights = [rng.standard_normal((V, dim)), 1 + rng.standard_normal((L, dim)), rng.standard_normal((L, dim, dim)),
               rng.standard_normal((L, KV * hd, dim)), rng.standard_normal((L, KV * hd, dim)),
               rng.standard_normal((L, dim, dim)), 1 + rng.standard_normal((L, dim)),
               rng.standard_normal((L, hidden, dim)), rng.standard_normal((L, dim, hidden)),
               rng.standard_normal((L, hidden, dim)), 1 + rng.standard_normal(dim)]
    ang = np.arange(seq)[:, None] / 10000.0 ** (np.arange(0, hd, 2) / hd)[None]
    classifier = [] if shared else [rng.standard_normal((V, dim))]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, L, H, KV, V if shared else -V, seq))
        for p in weights:
            f.write((0.1 * p).astype("<f4").tobytes())
        f.write(np.cos(ang).astype("<f4").tobytes() + np.sin(ang).astype("<f4").tobytes())
        for p in classifier:
            f.write((0.1 * p).astype("<f4").tobytes())


def check_llama2c_permutation(src_path, out_path):
    """Row r of head h of the exported wq/wk is source row h*hd + 2*(r % half) + r // half, and attention
    scores with rotate-half RoPE on exported weights equal interleaved RoPE on the source weights."""
    with open(src_path, "rb") as f:
        dim, hidden, L, H, KV, V, seq = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), "<f4")
    hd, half = dim // H, dim // H // 2
    off = abs(V) * dim + L * dim
    wq = data[off:off + L * dim * dim].reshape(L, dim, dim)
    off += L * dim * dim
    wk = data[off:off + L * KV * hd * dim].reshape(L, KV * hd, dim)
    h, t = read_model(out_path)
    assert (h["dim"], h["ffn_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["vocab_size"], h["max_seq_len"],
            h["head_dim"]) == (dim, hidden, L, H, KV, abs(V), seq, hd)
    assert (h["rope_theta"], h["norm_eps"], h["rope_scaling"]) == (10000.0, np.float32(1e-5), 0)
    assert h["tied_embeddings"] == (1 if V > 0 else 0)
    for l in range(L):
        for src, ours, heads in ((wq[l], t[f"layers.{l}.wq"], H), (wk[l], t[f"layers.{l}.wk"], KV)):
            for head in range(heads):
                for r in range(hd):
                    assert np.array_equal(ours[head * hd + r], src[head * hd + 2 * (r % half) + r // half])
    rng = np.random.default_rng(9)
    x = rng.standard_normal(dim)
    for pos_q, pos_k in ((5, 2), (seq - 1, 0)):
        s_src = rope_scores((wq[0] @ x)[:hd], (wk[0] @ x)[:hd], pos_q, pos_k, interleaved=True)
        s_out = rope_scores((t["layers.0.wq"] @ x)[:hd], (t["layers.0.wk"] @ x)[:hd], pos_q, pos_k, interleaved=False)
        assert abs(s_src - s_out) <= 1e-9 * max(1.0, abs(s_src))
    return h, t


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_export_synthetic(tmp_path, shared):
    rng = np.random.default_rng(10)
    src = str(tmp_path / "m.bin")
    write_llama2c(src, rng, dim=32, hidden=40, L=2, H=4, KV=2, V=30, seq=64, shared=shared)
    out, hf_out = str(tmp_path / "out.bin"), str(tmp_path / "hf")
    export_ok("llama2c", src, out, "--dtype", "fp32", "--hf-out", hf_out)
    _, t = check_llama2c_permutation(src, out)
    ck = st.Checkpoint(hf_out)
    for ours, arr in t.items():
        assert np.array_equal(ck.get(hf_name(ours)), arr), ours


@pytest.mark.skipif(not os.path.exists(STORIES), reason="shared data (stories260K.bin) not found")
def test_llama2c_export_stories260k(tmp_path):
    out = str(tmp_path / "stories.bin")
    export_ok("llama2c", STORIES, out, "--dtype", "fp32")
    h, t = check_llama2c_permutation(STORIES, out)
    assert (h["dim"], h["ffn_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["vocab_size"]) == \
        (64, 172, 5, 8, 4, 512)
    assert (h["bos_id"], h["eos_id"]) == (1, 2)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line "error: ...", exit 1, no traceback, no output file.

def bad_input_cases(tmp_path):
    rng = np.random.default_rng(11)
    V, D, L, H, KV, hd, F = 20, 32, 1, 2, 2, 16, 32
    w = random_hf_weights(rng, V, D, L, H, KV, hd, F, tied=False)
    cases = []
    d = str(tmp_path / "arch")
    write_hf(d, w, llama_config(V, D, L, H, KV, F, False, architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    cases.append((("hf", d), "unsupported architecture"))
    d = str(tmp_path / "missing")
    write_hf(d, {k: v for k, v in w.items() if "k_proj" not in k}, llama_config(V, D, L, H, KV, F, False))
    cases.append((("hf", d), "no tensor 'model.layers.0.self_attn.k_proj.weight'"))
    d = str(tmp_path / "shape")
    w2 = dict(w)
    w2["model.layers.0.mlp.up_proj.weight"] = np.zeros((F + 1, D), np.float32)
    write_hf(d, w2, llama_config(V, D, L, H, KV, F, False))
    cases.append((("hf", d), "tensor 'layers.0.w_up' has shape (33, 32) but the config implies (32, 32)"))
    d = str(tmp_path / "noconfig")
    os.makedirs(d)
    cases.append((("hf", d), "cannot read"))
    d = str(tmp_path / "yarn")
    write_hf(d, w, llama_config(V, D, L, H, KV, F, False, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    cases.append((("hf", d), "unsupported rope scaling type 'yarn'"))
    d = str(tmp_path / "nan")
    w3 = dict(w)
    w3["model.norm.weight"] = np.full(D, np.nan, np.float32)
    write_hf(d, w3, llama_config(V, D, L, H, KV, F, False))
    cases.append((("hf", d), "non-finite"))
    d = str(tmp_path / "kvheads")
    write_hf(d, w, llama_config(V, D, L, 3, 2, F, False, head_dim=16))
    cases.append((("hf", d), "not a multiple of n_kv_heads"))
    g = str(tmp_path / "quant.gguf")
    # An IQ-type tensor: a real quantization llama.cpp has but this exporter does not dequantize.
    Vq, Dq, Fq = 4, 256, 256
    wq = random_hf_weights(rng, Vq, Dq, 1, 2, 2, 128, Fq, tied=True)
    llama_gguf(g, wq, Vq, Dq, 1, 2, 2, 128, Fq, True, type_override={"blk.0.ffn_up.weight": (16, bytes(66 * Fq))})
    cases.append((("gguf", g), "quantization type IQ2_XXS, which is not supported"))
    g2 = str(tmp_path / "gpt2.gguf")
    write_gguf(g2, [("general.architecture", "str", "gpt2")], [])
    cases.append((("gguf", g2), "unsupported GGUF architecture 'gpt2'"))
    g3 = str(tmp_path / "notgguf.gguf")
    with open(g3, "wb") as f:
        f.write(b"not a gguf file at all, definitely not")
    cases.append((("gguf", g3), "bad magic"))
    l2 = str(tmp_path / "trunc.bin")
    write_llama2c(l2, rng, dim=32, hidden=40, L=1, H=4, KV=2, V=30, seq=16)
    with open(l2, "r+b") as f:
        f.truncate(os.path.getsize(l2) - 4)
    cases.append((("llama2c", l2), "truncated"))
    for kind in ("hf", "gguf", "llama2c"):
        cases.append(((kind, str(tmp_path / "does_not_exist")), "does_not_exist"))
    return cases


def test_bad_input_gives_one_line_error(tmp_path):
    for args, message in bad_input_cases(tmp_path):
        out = str(tmp_path / "out.bin")
        r = run_export(*args, out, "--dtype", "fp32")
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr and message in lines[0], (args, lines[0])
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp"), args


def test_missing_output_directory(tmp_path):
    rng = np.random.default_rng(12)
    src = str(tmp_path / "m.bin")
    write_llama2c(src, rng, dim=32, hidden=40, L=1, H=4, KV=2, V=30, seq=16)
    r = run_export("llama2c", src, str(tmp_path / "no" / "such" / "dir.bin"))
    assert r.returncode == 1 and r.stderr.startswith("error: output directory") and r.stderr.count("\n") == 1
