#!/usr/bin/env python3
"""hf_perplexity.py: perplexity of a token shard under a Hugging Face checkpoint (transformers + torch; run
on the GPU machine). It is the yardstick for `train_lolcats --eval-ppl` and build/ref_perplexity.

    python3 scripts/hf_perplexity.py HF_DIR TOKEN_SHARD --seq-len T [--max-seqs N] [--dtype fp32|bf16]
                                     [--device cuda|cpu] [--batch-size B]

Protocol (identical in every implementation):
  1. Read the shard's tokens (format below); the loss mask, if any, is ignored: every position counts.
  2. Cut the token stream, from its first token, into non-overlapping windows of exactly T tokens:
     window w = tokens[w*T : (w+1)*T] for w = 0 .. W-1, W = min(N, n_tokens // T); a partial last window
     is dropped. Each window is an independent sequence starting at position 0 (no BOS is added, no
     context carries over).
  3. In each window the model predicts tokens 1..T-1 from their prefixes: T-1 predictions per window.
  4. nll = mean over all W*(T-1) predictions of -log softmax(logits)[target], accumulated in float64 from
     fp32 log-probabilities; ppl = exp(nll).
  Output: one JSON line {"ppl": ..., "nll": ..., "tokens": W*(T-1), "seqs": W}.

Token shard (little-endian): 64-byte header: char magic[8] = "LOLCTOK1"; uint32 version = 1; uint32
vocab_size; uint64 n_tokens; uint32 flags (bit 0: a uint8 loss mask follows the tokens); int32 bos_id;
int32 eos_id; uint32 seq_len; zero padding; then uint32 tokens[n_tokens].

--dtype fp32 (default) loads the weights in fp32 and disables TF32, so this is an fp32 reference; bf16 loads
them in bf16 (logits still upcast to fp32 before the softmax). Attention is eager.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

SHARD_MAGIC = b"LOLCTOK1"


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_shard(path):
    """(tokens uint32 array, header dict) of a token shard, memory-mapped."""
    if not os.path.isfile(path):
        fail(f"cannot open '{path}' (no such file)")
    size = os.path.getsize(path)
    if size < 64:
        fail(f"'{path}' is too small to be a token shard")
    with open(path, "rb") as f:
        head = f.read(64)
    magic, version, vocab, n_tokens, flags, bos, eos, seq_len = struct.unpack("<8sIIQIiiI", head[:40])
    if magic != SHARD_MAGIC:
        fail(f"'{path}' is not a token shard (bad magic)")
    if version != 1:
        fail(f"'{path}': unsupported token shard version {version}")
    expect = 64 + 4 * n_tokens + (n_tokens if flags & 1 else 0)
    if size != expect:
        fail(f"'{path}' has {size} bytes but its header implies {expect}")
    tokens = np.memmap(path, dtype="<u4", mode="r", offset=64, shape=(n_tokens,))
    return tokens, dict(vocab_size=vocab, n_tokens=n_tokens, flags=flags, bos_id=bos, eos_id=eos, seq_len=seq_len)


def main():
    ap = argparse.ArgumentParser(description="Perplexity of a token shard under a Hugging Face checkpoint.")
    ap.add_argument("hf_dir", help="checkpoint directory (config.json + safetensors)")
    ap.add_argument("shard", help="token shard (.bin, LOLCTOK1)")
    ap.add_argument("--seq-len", type=int, required=True, help="window length T")
    ap.add_argument("--max-seqs", type=int, default=None, help="use only the first N windows")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    args = ap.parse_args()
    T = args.seq_len
    if T < 2:
        fail("--seq-len must be at least 2")
    if args.max_seqs is not None and args.max_seqs < 1:
        fail("--max-seqs must be at least 1")
    if args.batch_size < 1:
        fail("--batch-size must be at least 1")
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        fail(f"'{args.hf_dir}' has no config.json")
    tokens, head = read_shard(args.shard)
    windows = len(tokens) // T
    if args.max_seqs is not None:
        windows = min(windows, args.max_seqs)
    if windows == 0:
        fail(f"the shard holds {len(tokens)} tokens, fewer than one window of T = {T}")

    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        fail(f"torch and transformers are needed (they exist on the GPU machine): {e}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=dtype, attn_implementation="eager")
    except Exception as e:  # one line, whatever transformers raised
        fail(f"cannot load '{args.hf_dir}' with transformers ({type(e).__name__}: {str(e).splitlines()[0]})")
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    if head["vocab_size"] > vocab:
        fail(f"the shard's vocabulary {head['vocab_size']} exceeds the model's {vocab}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and T > max_pos:
        fail(f"--seq-len {T} exceeds the model's max_position_embeddings {max_pos}")
    used = np.asarray(tokens[:windows * T])
    if used.size and int(used.max()) >= vocab:
        fail(f"token id {int(used.max())} is outside the model's vocabulary of {vocab}")

    total, count = 0.0, 0
    with torch.no_grad():
        for w0 in range(0, windows, args.batch_size):
            w1 = min(windows, w0 + args.batch_size)
            batch = torch.from_numpy(used[w0 * T:w1 * T].astype(np.int64).reshape(w1 - w0, T)).to(device)
            logits = model(input_ids=batch).logits.float()                       # (b, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)               # (b, T-1)
            total += nll.double().sum().item()
            count += nll.numel()
            print(f"\rwindow {w1}/{windows}  running ppl {math.exp(total / count):.4f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    nll = total / count
    print(json.dumps({"ppl": math.exp(nll), "nll": nll, "tokens": count, "seqs": windows}))


if __name__ == "__main__":
    main()
