"""Tests of scripts/gguf_reader.py: header and metadata parsing of GGUF files this test writes itself, the
block decoders against values worked out by hand (and, for the real SmolLM2 file when assets/ has it, blocks
decoded here byte by byte with struct), and row-range loading. Pure numpy; no torch."""
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gguf_reader  # noqa: E402
from gguf_reader import GGUFError, GGUFFile  # noqa: E402

SMOLLM2 = os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---------------------------------------------------------------------------------------------------
# A minimal GGUF writer for tests (the format facts are in gguf_reader's docstring).

def _gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


_SCALARS = {"u8": (0, "<B"), "i8": (1, "<b"), "u16": (2, "<H"), "i16": (3, "<h"), "u32": (4, "<I"), "i32": (5, "<i"),
            "f32": (6, "<f"), "bool": (7, "<?"), "u64": (10, "<Q"), "i64": (11, "<q"), "f64": (12, "<d")}


def _gguf_value(kind, value):
    """(type id bytes, value bytes) for kind in _SCALARS, 'str', or ('arr', element kind)."""
    if kind == "str":
        return struct.pack("<I", 8), _gguf_string(value)
    if isinstance(kind, tuple):
        ek = kind[1]
        etype = 8 if ek == "str" else _SCALARS[ek][0]
        body = struct.pack("<IQ", etype, len(value))
        for v in value:
            body += _gguf_value(ek, v)[1]
        return struct.pack("<I", 9), body
    tid, fmt = _SCALARS[kind]
    return struct.pack("<I", tid), struct.pack(fmt, value)


def write_gguf(path, metadata, tensors, alignment=32, version=3):
    """metadata: [(key, kind, value)]; tensors: [(name, dims in GGUF order, ggml type id, raw bytes)]."""
    kv = [("general.alignment", "u32", alignment)] if alignment != 32 else []
    kv += list(metadata)
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, kind, value in kv:
        t, v = _gguf_value(kind, value)
        out += _gguf_string(key) + t + v
    offset, blobs = 0, []
    for name, dims, ttype, raw in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, offset)
        pad = -len(raw) % alignment
        blobs.append(raw + bytes(pad))
        offset += len(raw) + pad
    out += bytes(-len(out) % alignment)
    with open(path, "wb") as f:
        f.write(out + b"".join(blobs))


def quantize_q8_0(x):
    """(rows, cols) float -> Q8_0 bytes and the exact values they decode to (d rounded to fp16 first)."""
    blocks = x.reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
    q = np.round(blocks / np.maximum(d.astype(np.float32), 1e-8)).clip(-127, 127).astype(np.int8)
    raw = b"".join(d[i].tobytes() + q[i].tobytes() for i in range(len(blocks)))
    return raw, (d.astype(np.float32) * q).reshape(x.shape)


def quantize_q4_1(x):
    """(rows, cols) float -> Q4_1 bytes and their exact decoded values (x = d * nibble + m)."""
    blocks = x.reshape(-1, 32)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16)
    m = lo.astype(np.float16)
    q = np.round((blocks - m.astype(np.float32)) / np.maximum(d.astype(np.float32), 1e-8)).clip(0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    raw = b"".join(d[i].tobytes() + m[i].tobytes() + packed[i].tobytes() for i in range(len(blocks)))
    return raw, (d.astype(np.float32) * q + m.astype(np.float32)).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------

def test_block_decoders_match_hand_worked_values():
    gguf_reader._self_test()  # raises AssertionError naming the type on any mismatch


def test_metadata_of_every_type_and_tensor_orientation(tmp_path):
    rng = np.random.default_rng(1)
    w32 = rng.standard_normal((3, 64)).astype(np.float32)       # PyTorch (out=3, in=64)
    w16 = rng.standard_normal((2, 32)).astype(np.float16)
    wbf = rng.standard_normal((4, 8)).astype(np.float32)
    bf_bits = (wbf.view(np.uint32) >> 16).astype(np.uint16)      # truncation: exact bf16 values
    q8_raw, q8_val = quantize_q8_0(rng.standard_normal((2, 64)).astype(np.float32))
    q41_raw, q41_val = quantize_q4_1(rng.standard_normal((5, 32)).astype(np.float32))
    md = [("general.architecture", "str", "llama"), ("u8", "u8", 250), ("i8", "i8", -7), ("u16", "u16", 60000),
          ("i16", "i16", -30000), ("u32", "u32", 4000000000), ("i32", "i32", -2000000000), ("f32", "f32", 0.5),
          ("bool", "bool", True), ("u64", "u64", 1 << 40), ("i64", "i64", -(1 << 40)), ("f64", "f64", 0.1),
          ("tokens", ("arr", "str"), ["<s>", "a b", "Ġé"]), ("types", ("arr", "i32"), [1, 3, -2]),
          ("scores", ("arr", "f32"), [0.25, -1.5]), ("flags", ("arr", "bool"), [True, False]),
          ("nested", ("arr", "u8"), [])]
    path = str(tmp_path / "t.gguf")
    write_gguf(path, md, [("w32", (64, 3), 0, w32.tobytes()), ("w16", (32, 2), 1, w16.tobytes()),
                          ("wbf", (8, 4), 30, bf_bits.tobytes()), ("q8", (64, 2), 8, q8_raw),
                          ("q41", (32, 5), 3, q41_raw), ("vec", (5,), 0, np.arange(5, dtype=np.float32).tobytes())],
               alignment=64)
    g = GGUFFile(path)
    m = g.metadata
    assert g.version == 3 and g.alignment == 64 and g.data_start % 64 == 0
    assert (m["u8"], m["i8"], m["u16"], m["i16"], m["u32"], m["i32"]) == (250, -7, 60000, -30000, 4000000000, -2000000000)
    assert m["f32"] == 0.5 and m["bool"] is True and m["u64"] == 1 << 40 and m["i64"] == -(1 << 40)
    assert m["f64"] == 0.1 and m["general.architecture"] == "llama"
    assert m["tokens"] == ["<s>", "a b", "Ġé"] and m["types"] == [1, 3, -2] and m["scores"] == [0.25, -1.5]
    assert m["flags"] == [True, False] and m["nested"] == []
    assert g.tensors["w32"].shape == (3, 64) and g.tensors["w32"].dims == (64, 3)
    assert np.array_equal(g.load("w32"), w32)
    assert np.array_equal(g.load("w16"), w16.astype(np.float32))
    assert np.array_equal(g.load("wbf"), (bf_bits.astype(np.uint32) << 16).view(np.float32))
    assert np.array_equal(g.load("q8"), q8_val)
    assert np.array_equal(g.load("q41"), q41_val)
    assert np.array_equal(g.load("vec"), np.arange(5, dtype=np.float32))
    assert np.array_equal(g.load("q41", 1, 4), q41_val[1:4])   # row ranges decode the same values
    assert g.load("q8").dtype == np.float32


def test_quantizers_here_are_close_to_the_input():
    # Guards the test helpers themselves: a broken helper would make the exact checks above vacuous.
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    assert np.abs(quantize_q8_0(x)[1] - x).max() < 0.02 * np.abs(x).max()
    assert np.abs(quantize_q4_1(x)[1] - x).max() < 0.2 * np.abs(x).max()


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"GGUX" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "unsupported GGUF version 1"),
    (lambda b: b[:4] + struct.pack("<I", 0x03000000) + b[8:], "big-endian"),
    (lambda b: b[:60], "truncated"),
    (lambda b: b[:-8], "truncated"),
])
def test_malformed_files_raise_one_clear_error(tmp_path, mutate, message):
    good = str(tmp_path / "good.gguf")
    write_gguf(good, [("general.architecture", "str", "llama")],
               [("w", (32, 2), 0, np.ones((2, 32), np.float32).tobytes())])
    bad = str(tmp_path / "bad.gguf")
    with open(good, "rb") as f, open(bad, "wb") as g:
        g.write(mutate(f.read()))
    with pytest.raises(GGUFError, match=message):
        GGUFFile(bad)


def test_unsupported_quant_type_is_named(tmp_path):
    path = str(tmp_path / "iq.gguf")
    write_gguf(path, [], [("w", (256, 1), 16, bytes(66))])  # IQ2_XXS: listed, not dequantizable
    g = GGUFFile(path)
    assert g.tensors["w"].type_name == "IQ2_XXS"
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        g.load("w")


def test_missing_file():
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile("/nonexistent/model.gguf")


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct Q4_1 file (fetched into assets/ by scripts/fetch_assets.sh).

needs_smollm2 = pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="assets/ lacks the SmolLM2 GGUF")


@needs_smollm2
def test_smollm2_metadata_and_types():
    g = GGUFFile(SMOLLM2)
    m = g.metadata
    assert m["general.architecture"] == "llama"
    assert (m["llama.block_count"], m["llama.embedding_length"], m["llama.feed_forward_length"]) == (30, 576, 1536)
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (9, 3)
    assert len(m["tokenizer.ggml.tokens"]) == 49152 and m["tokenizer.ggml.bos_token_id"] == 1
    assert g.tensors["token_embd.weight"].type_name == "Q8_0" and g.tensors["token_embd.weight"].shape == (49152, 576)
    assert g.tensors["blk.0.attn_q.weight"].type_name == "Q4_1" and g.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert "output.weight" not in g.tensors   # tied embeddings


@needs_smollm2
def test_smollm2_blocks_decoded_by_hand():
    g = GGUFFile(SMOLLM2)
    # Q4_1 block 7 of blk.0.attn_q.weight (row 0 holds blocks 0..17; block 7 = values 224..255 of row 0).
    raw = bytes(g.raw("blk.0.attn_q.weight")[7 * 20:8 * 20])
    d, m = struct.unpack("<ee", raw[:4])
    want = [0.0] * 32
    for j in range(16):
        want[j] = d * (raw[4 + j] & 15) + m
        want[j + 16] = d * (raw[4 + j] >> 4) + m
    got = g.load("blk.0.attn_q.weight", 0, 1)[0, 224:256]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)   # fp16*int + fp16 in fp32 vs double
    # Q8_0 block of token 1000 (row 1000 of token_embd, 18 blocks of 34 bytes per row), its block 3.
    off = (1000 * 18 + 3) * 34
    raw = bytes(g.raw("token_embd.weight")[off:off + 34])
    (d,) = struct.unpack("<e", raw[:2])
    want = [d * v for v in struct.unpack("<32b", raw[2:])]
    np.testing.assert_allclose(g.load("token_embd.weight", 1000, 1001)[0, 96:128], want, rtol=1e-6, atol=0)
    # Plausible weights: finite, small, not constant.
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"):
        w = g.load(name)
        assert np.isfinite(w).all() and 0 < w.std() < 5 and np.abs(w).max() < 100, name
