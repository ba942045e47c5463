#!/usr/bin/env python3
"""make_fixtures.py: build the Hugging Face parity fixtures under test/fixtures/ (run on the GPU machine,
where torch and transformers exist; CI only reads the committed results and never needs torch).

    python3 scripts/make_fixtures.py [--out test/fixtures] [--shared ../shared]

For each tiny random LlamaForCausalLM below (fp32, eager attention, seeded) it writes
    test/fixtures/<name>/config.json, test/fixtures/<name>/model.safetensors   (save_pretrained)
    test/fixtures/<name>/expected.bin                                          (B = 2, T = 32)
and from the real llama2.c checkpoint SHARED/models/stories260K.bin (exported with
`export.py llama2c --hf-out`, then loaded by transformers; the weights themselves are not committed)
    test/fixtures/stories260k_expected.bin                                    (B = 1, T = 64)

expected.bin (little-endian): int32 magic 0x46584C4C ("LLXF"), int32 version 1, int32 B, int32 T, int32 V,
int32 tokens[B*T], float32 logits[B*T*V] (transformers, fp32, eager attention, on the CPU so no TF32),
float32 loss (mean next-token cross-entropy over the B*(T-1) positions, accumulated in float64).

Weights are drawn with initializer_range 0.1 (and RMSNorm gains 1 + 0.2 N(0,1)) so logits are O(1) and a
wrong layout or a missed permutation changes them visibly; the script prints max |logit| per fixture.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_MAGIC, FIXTURE_VERSION = 0x46584C4C, 1

# name -> (LlamaConfig arguments, seed)
FIXTURES = {
    # GQA (2 query heads per kv head), separate LM head.
    "hf_gqa_untied": (dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=160, max_position_embeddings=256,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), 1),
    # Multi-query attention, head_dim 32 != hidden / heads = 24, tied embeddings, Llama 3.1 rope scaling
    # with an original context of 64 so all three frequency bands (kept, interpolated, divided) occur.
    "hf_tied_ropescaled": (dict(vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=32, intermediate_size=128,
                                max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=True,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64)), 2),
    # Plain multi-head attention, 3 layers, a vocabulary that is not a power of two, eps 1e-6.
    "hf_mha": (dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256,
                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False), 3),
}
B, T = 2, 32
STORIES_T = 64


def make_config(args):
    """LlamaConfig from our argument dict: transformers >= 5 takes RoPE settings as rope_parameters
    (rope_theta inside it), older versions as rope_theta + rope_scaling."""
    args = dict(args)
    theta = args.pop("rope_theta")
    scaling = args.pop("rope_scaling", None)
    if "rope_parameters" in getattr(LlamaConfig, "__dataclass_fields__", {}) or \
            int(transformers.__version__.split(".")[0]) >= 5:
        rope = dict(scaling) if scaling else {"rope_type": "default"}
        rope["rope_theta"] = theta
        args["rope_parameters"] = rope
    else:
        args["rope_theta"] = theta
        args["rope_scaling"] = scaling
    return LlamaConfig(initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                       attn_implementation="eager", **args)


def write_expected(path, tokens, logits, loss):
    b, t = tokens.shape
    v = logits.shape[-1]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<5i", FIXTURE_MAGIC, FIXTURE_VERSION, b, t, v))
        f.write(tokens.to(torch.int32).contiguous().numpy().astype("<i4").tobytes())
        f.write(logits.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
        f.write(struct.pack("<f", float(loss)))
    os.replace(tmp, path)


@torch.no_grad()
def logits_and_loss(model, tokens):
    logits = model(input_ids=tokens).logits.float()                  # (B, T, V) fp32
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)            # (B, T-1)
    return logits, nll.mean().item()


def build_fixture(name, cfg_args, seed, out_dir):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(cfg_args)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    d = os.path.join(out_dir, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    model.save_pretrained(d)  # safetensors (the only format transformers 5 writes)
    for f in os.listdir(d):  # keep only what the exporter reads
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(d, f))
    gen = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.randint(0, cfg_args["vocab_size"], (B, T), generator=gen)
    logits, loss = logits_and_loss(model, tokens)
    # The saved files must reproduce these logits exactly.
    again = LlamaForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    logits2, _ = logits_and_loss(again, tokens)
    if not torch.equal(logits, logits2):
        sys.exit(f"error: {name}: reloading the saved checkpoint changed the logits "
                 f"(max diff {(logits - logits2).abs().max().item():g})")
    write_expected(os.path.join(d, "expected.bin"), tokens, logits, loss)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    if size > 1 << 20:
        sys.exit(f"error: {name}: fixture directory is {size} bytes (limit 1 MiB)")
    check_export("hf", d)
    print(f"{name}: max |logit| {logits.abs().max().item():.4f}, loss {loss:.6f}, {size / 1024:.0f} KiB")


def check_export(kind, src, extra=()):
    """Run our exporter on the result so a fixture CI cannot export fails here, not in CI."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), kind, src, os.path.join(tmp, "m.bin"),
                            "--dtype", "fp32", "--quiet", *extra], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: export.py {kind} {src} failed: {r.stderr.strip()}")


def build_stories(shared, out_dir):
    src = os.path.join(shared, "models", "stories260K.bin")
    if not os.path.exists(src):
        sys.exit(f"error: '{src}' not found (pass --shared)")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        r = subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "llama2c", src,
                            os.path.join(tmp, "stories.bin"), "--dtype", "fp32", "--hf-out", hf_dir, "--quiet"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: export.py llama2c failed: {r.stderr.strip()}")
        with open(os.path.join(hf_dir, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(260)
        tokens = torch.randint(3, vocab, (1, STORIES_T), generator=gen)
        tokens[0, 0] = 1  # BOS, as llama2.c starts every sequence
        logits, loss = logits_and_loss(model, tokens)
    write_expected(os.path.join(out_dir, "stories260k_expected.bin"), tokens, logits, loss)
    print(f"stories260k: max |logit| {logits.abs().max().item():.4f}, loss {loss:.6f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "test", "fixtures"), help="fixture directory")
    ap.add_argument("--shared", default=os.environ.get("LOLCATS_SHARED", os.path.join(HERE, "..", "..", "shared")),
                    help="the shared data directory holding models/stories260K.bin")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name, (cfg_args, seed) in FIXTURES.items():
        build_fixture(name, cfg_args, seed, args.out)
    build_stories(args.shared, args.out)


if __name__ == "__main__":
    main()
