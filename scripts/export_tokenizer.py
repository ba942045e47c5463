#!/usr/bin/env python3
"""export_tokenizer.py: convert a model's tokenizer into our tokenizer file (.tok, format in tokenizer.h).

    export_tokenizer.py llama3 assets/llama3_tokenizer.model OUT.tok [--quiet]
        Llama 3's tiktoken ranks file (one "base64-token rank" a line, 128,000 tokens) plus Llama 3's 256
        special tokens (ids 128000..128255, named as in llama-models 0.3.0), BOS <|begin_of_text|>,
        EOS <|end_of_text|>, pre-tokenizer "llama3".
    export_tokenizer.py gguf FILE.gguf OUT.tok [--quiet]
        A GGUF whose tokenizer.ggml.model is "gpt2" (byte-level BPE: tokens + merges), with
        tokenizer.ggml.pre "smollm" (SmolLM/SmolLM2). CONTROL tokens become special tokens; BOS/EOS from
        tokenizer.ggml.bos_token_id / eos_token_id.

Both become one table: every token's bytes, and merges (left id, right id, merged id, priority); encoding
repeatedly merges the adjacent pair of lowest priority, the leftmost on ties.
  - A merges list (GGUF/HF) is stored as it is, priority = its line number.
  - tiktoken ranks have no merges list: tiktoken merges any adjacent pair of parts whose concatenation
    is a token, at that token's rank. Its parts are always tokens (they start as single bytes and only
    grow by such merges), so listing every split of every token into two tokens, with the token's rank as
    priority, gives exactly the pairs tiktoken can merge and the order it merges them in. Two splits of one
    token share a priority, and the leftmost pair wins, as in tiktoken. tiktoken also emits a pre-token
    that is itself a token directly, even where merging would not reach it (588 Llama 3 tokens); flag bit 0
    asks the encoder to do the same.
The output is written to OUT.tmp and renamed. Every failure is one line "error: ..." and exit status 1.
"""
import argparse
import base64
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lolcats_tokenizer import (FLAG_WHOLE_PIECE_FIRST, TOKEN_NORMAL, TOKEN_SPECIAL, TokenizerData,  # noqa: E402
                               TokenizerFileError, byte_level_alphabet, write_tokenizer_file)

# Llama 3's special tokens in id order from 128000 (llama-models 0.3.0); the rest are reserved.
LLAMA3_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                         "<|python_tag|>", "<|image|>"]
LLAMA3_N_SPECIALS = 256


def llama3_special_names():
    n_reserved = LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS)
    return LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]


def splits_as_merges(tokens, n_normal):
    """Every (a, b) with a + b = t for tokens a, b, t: the pairs tiktoken can merge, at t's rank = id."""
    id_of = {tokens[i]: i for i in range(n_normal)}
    merges = []
    for t in range(n_normal):
        s = tokens[t]
        for k in range(1, len(s)):
            left, right = id_of.get(s[:k]), id_of.get(s[k:])
            if left is not None and right is not None:
                merges.append((left, right, t, t))
    return merges


def load_llama3(path):
    ranks = {}
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TokenizerFileError(f"cannot open '{path}' ({e.strerror})")
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise TokenizerFileError(f"'{path}' line {line_no} is not 'base64-token rank'")
            if token in ranks:
                raise TokenizerFileError(f"'{path}' line {line_no}: token {token!r} is listed twice")
            ranks[token] = rank
    n = len(ranks)
    tokens = [None] * n
    for token, rank in ranks.items():
        if not 0 <= rank < n or tokens[rank] is not None:
            raise TokenizerFileError(f"'{path}': the ranks are not 0..{n - 1}, each once (rank {rank})")
        tokens[rank] = token
    specials = [s.encode() for s in llama3_special_names()]
    merges = splits_as_merges(tokens, n)
    return TokenizerData(name="llama3", pretokenizer="llama3", flags=FLAG_WHOLE_PIECE_FIRST,
                         bos_id=n, eos_id=n + 1, tokens=tokens + specials,
                         types=[TOKEN_NORMAL] * n + [TOKEN_SPECIAL] * len(specials), merges=merges)


GGUF_NORMAL, GGUF_CONTROL = 1, 3  # llama.cpp token types (2 unknown, 4 user-defined, 5 unused, 6 byte)


def load_gguf(path):
    from gguf_reader import GGUFError, GGUFFile
    try:
        g = GGUFFile(path)
    except GGUFError as e:
        raise TokenizerFileError(str(e))
    md = g.metadata
    model, pre = md.get("tokenizer.ggml.model"), md.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise TokenizerFileError(f"'{path}': tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) "
                                 "is supported")
    if pre != "smollm":
        raise TokenizerFileError(f"'{path}': pre-tokenizer {pre!r} is not supported (only 'smollm')")
    strings, merge_lines = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
    types = md.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(strings or []))
    if not strings or merge_lines is None or len(types) != len(strings):
        raise TokenizerFileError(f"'{path}' lacks tokenizer.ggml.tokens, token_type or merges")
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    tokens, our_types = [], []
    for i, (s, ty) in enumerate(zip(strings, types)):
        if ty == GGUF_CONTROL:
            tokens.append(s.encode("utf-8"))
            our_types.append(TOKEN_SPECIAL)
        elif ty == GGUF_NORMAL:
            try:
                tokens.append(bytes(byte_of[c] for c in s))
            except KeyError:
                raise TokenizerFileError(f"'{path}': token {i} {s!r} is not in the byte-level alphabet")
            our_types.append(TOKEN_NORMAL)
        else:
            raise TokenizerFileError(f"'{path}': token {i} {s!r} has unsupported token type {ty}")
    id_of = {s: i for i, (s, ty) in enumerate(zip(strings, types)) if ty == GGUF_NORMAL}
    merges = []
    for rank, line in enumerate(merge_lines):
        parts = line.split(" ")
        if len(parts) != 2 or parts[0] not in id_of or parts[1] not in id_of or parts[0] + parts[1] not in id_of:
            raise TokenizerFileError(f"'{path}': merge {rank} {line!r} does not join two tokens into a token")
        merges.append((id_of[parts[0]], id_of[parts[1]], id_of[parts[0] + parts[1]], rank))
    name = md.get("general.basename") or md.get("general.name") or "gguf"
    if md.get("general.size_label"):
        name = f"{name}-{md['general.size_label']}"
    bos, eos = md.get("tokenizer.ggml.bos_token_id", -1), md.get("tokenizer.ggml.eos_token_id", -1)
    return TokenizerData(name=name, pretokenizer=pre, flags=0, bos_id=int(bos), eos_id=int(eos),
                         tokens=tokens, types=our_types, merges=merges)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["llama3", "gguf"])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    try:
        d = load_llama3(args.src) if args.kind == "llama3" else load_gguf(args.src)
        write_tokenizer_file(args.out, d)
    except TokenizerFileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not args.quiet:
        n_special = sum(d.types)
        normal = {t for t, ty in zip(d.tokens, d.types) if ty == TOKEN_NORMAL}
        n_no_token = sum(bytes([b]) not in normal for b in range(256))
        print(f"{args.out}: {d.name}, pre-tokenizer {d.pretokenizer}, {len(d.tokens)} tokens ({n_special} special), "
              f"{len(d.merges)} merges, bos {d.bos_id}, eos {d.eos_id}"
              + (f", {n_no_token} byte values without a token (dropped when encoding)" if n_no_token else ""))


if __name__ == "__main__":
    main()
