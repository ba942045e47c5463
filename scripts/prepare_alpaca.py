#!/usr/bin/env python3
"""prepare_alpaca.py: tokenize an Alpaca instruction file (or general text) into the token shards that
dataloader.h reads, train and val, as ../shared/LOLCATS.md section 4 prescribes.

Formats (--format):
  alpaca  a JSON list, or JSONL, of {"instruction", "input", "output"} (all three strings; "input" may be
          empty). Each sample becomes  BOS + prompt  then  output + EOS,  the prompt being the template
          with or without input (PROMPT_WITH_INPUT / PROMPT_NO_INPUT below, byte-exact). Prompt and output
          are encoded separately, and the loss mask is 1 on exactly the output and EOS tokens.
  jsonl   one JSON object {"text": ...} a line (e.g. ../shared/data/c4_demo.jsonl); each text is a
          document: BOS + text + EOS. No loss mask is stored (flags bit0 = 0): every next token counts.
  text    a UTF-8 plain text file. --text-docs line (default): every non-empty line is a document (the
          newline is not part of it; wiki_demo.txt holds one article a line); --text-docs file: the whole
          file is one document. BOS + text + EOS, no loss mask, as jsonl.
  Empty documents (jsonl/text) are skipped; an Alpaca sample with an empty output is kept.

Split and sequences: the first --val-samples samples (documents) in file order are the validation split,
the rest train. Each split's samples are concatenated in file order and cut into --seq-len-token
sequences: no document masking, no position reset, the tail that does not fill a sequence is dropped.
The data loader shuffles sequences, never the preparer.

Shards (format in dataloader.h; header 64 bytes, uint32 tokens, then a uint8 mask if flags bit0):
OUT_DIR/<prefix>_train_0000.bin, ..., <prefix>_val_0000.bin, ... Each holds a whole number of sequences
and at most --shard-tokens tokens. Every shard is written to <name>.tmp; all are renamed into place only
once the whole run succeeded, and shards of the same prefix and split left over from an earlier, larger
run are deleted then (the loader would otherwise read them).

Tokenizers (--tokenizer):
  bytes   built in, for tests and tiny models: id = UTF-8 byte value + 3; 0 = pad (never written),
          1 = BOS, 2 = EOS; vocab_size 259.
  PATH    a tokenizer file exported by scripts/export_tokenizer.py, loaded through
          scripts/lolcats_tokenizer.py (imported only in this case).

Progress goes to stderr (a bar when stderr is a terminal), the closing summary to stdout. Bad input gets
one line "error: ..." on stderr and exit status 1.

Usage:
  python3 scripts/prepare_alpaca.py --tokenizer assets/llama3.tok                # ../shared Alpaca demo
  python3 scripts/prepare_alpaca.py --input alpaca_cleaned.json --out-dir data/alpaca --tokenizer T.tok
  python3 scripts/prepare_alpaca.py --format jsonl --input ../shared/data/c4_demo.jsonl --val-samples 30 \\
      --tokenizer bytes --out-dir data/c4
"""
import argparse
import json
import os
import re
import struct
import sys
import time

import numpy as np

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Token shard header (little-endian, 64 bytes): magic, version, vocab_size, n_tokens, flags, bos_id,
# eos_id, seq_len, zero padding. Must match ShardHeader in dataloader.h.
SHARD_MAGIC = b"LOLCTOK1"
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct("<8sIIQIiiI24x")
assert SHARD_HEADER.size == 64
FLAG_MASK = 1

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputError(Exception):
    """Bad input or arguments: reported as one line, exit 1."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def render_prompt(sample):
    """The Alpaca prompt of one sample (without BOS): the with-input template when input is non-empty."""
    if sample["input"]:
        return PROMPT_WITH_INPUT.format(instruction=sample["instruction"], input=sample["input"])
    return PROMPT_NO_INPUT.format(instruction=sample["instruction"])


class ByteTokenizer:
    """Byte-level tokenizer: id = UTF-8 byte + 3; 0 pad, 1 BOS, 2 EOS; 259 ids."""
    name = "bytes"
    pad_id, bos_id, eos_id = 0, 1, 2
    n_special = 3
    vocab_size = 256 + n_special

    def encode(self, text):
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32) + self.n_special).tolist()

    def decode(self, ids):
        """Special ids decode to nothing; every other id to its byte (invalid UTF-8 replaced)."""
        return bytes(i - self.n_special for i in ids if i >= self.n_special).decode("utf-8", errors="replace")


def load_tokenizer_arg(spec):
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise InputError(f"tokenizer file '{spec}' not found (or pass --tokenizer bytes)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        from lolcats_tokenizer import load_tokenizer  # only needed for real tokenizer files
    except ImportError as e:
        raise InputError(f"cannot import scripts/lolcats_tokenizer.py ({e})")
    try:
        tok = load_tokenizer(spec)
    except Exception as e:  # the loader's own errors (bad file, wrong format) become one line
        raise InputError(f"cannot load tokenizer '{spec}' ({e})")
    for field in ("bos_id", "eos_id", "vocab_size"):
        value = getattr(tok, field, None)
        if not isinstance(value, int) or value < 0:
            raise InputError(f"tokenizer '{spec}' has no usable {field} ({value!r})")
    return tok


# ---------------------------------------------------------------------------------------------------
# Input readers: each yields documents as (prompt, response, input bytes consumed); prompt is None for
# plain text. The byte count only drives the progress bar.

def read_alpaca(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"'{path}' is not UTF-8 ({e})")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"'{path}' is not valid JSON ({e})")
        numbered = enumerate(samples)
        where = lambda i: f"'{path}' sample {i}"
    else:
        numbered = []
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                numbered.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"'{path}' line {line_no} is not valid JSON ({e})")
        where = lambda i: f"'{path}' line {i}"
    for i, sample in numbered:
        if not isinstance(sample, dict):
            raise InputError(f"{where(i)} is not an object with instruction/input/output")
        for field in ("instruction", "input", "output"):
            if field not in sample:
                raise InputError(f"{where(i)} has no '{field}' field")
            if not isinstance(sample[field], str):
                raise InputError(f"{where(i)} field '{field}' is not a string")
        yield render_prompt(sample), sample["output"], sum(len(sample[k].encode("utf-8")) for k in sample)


def read_jsonl_text(path):
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"'{path}' line {line_no} is not valid JSON ({e})")
            if not isinstance(obj, dict) or "text" not in obj:
                raise InputError(f"'{path}' line {line_no} has no 'text' field")
            if not isinstance(obj["text"], str):
                raise InputError(f"'{path}' line {line_no} field 'text' is not a string")
            if obj["text"]:
                yield None, obj["text"], len(line)


def read_plain_text(path, docs):
    with open(path, "rb") as f:
        if docs == "file":
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"'{path}' is not UTF-8 ({e})")
            if text:
                yield None, text, len(text.encode("utf-8"))
            return
        # Split on "\n" only (str.splitlines would also split on \x0b, \x1c, U+2028 inside documents).
        for line_no, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"'{path}' line {line_no} is not UTF-8 ({e})")
            text = text[:-1] if text.endswith("\n") else text
            text = text[:-1] if text.endswith("\r") else text
            if text.strip():
                yield None, text, len(line)


# ---------------------------------------------------------------------------------------------------
# Shard writing.

class SplitWriter:
    """Buffers one split's token stream and writes it as shards of whole seq_len-token sequences."""

    def __init__(self, out_dir, prefix, split, tok, seq_len, shard_tokens, with_mask):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.tok, self.seq_len, self.with_mask = tok, seq_len, with_mask
        self.shard_capacity = (shard_tokens // seq_len) * seq_len  # whole sequences per shard
        self.tokens, self.masks, self.buffered = [], [], 0
        self.tmp_paths = []  # (tmp, final) of every shard written so far
        self.samples = 0
        self.tokens_in = 0       # tokens of every sample, before the tail is dropped
        self.tokens_written = 0
        self.masked_written = 0  # mask = 1 tokens among those written

    def add(self, tokens, mask):
        self.samples += 1
        self.tokens_in += len(tokens)
        self.tokens.append(tokens)
        self.masks.append(mask)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_capacity:
            self._flush(self.shard_capacity)

    def finish(self):
        """Write the last, shorter shard; the tail that does not fill a sequence is dropped."""
        whole = (self.buffered // self.seq_len) * self.seq_len
        if whole:
            self._flush(whole)
        self.tokens, self.masks, self.buffered = [], [], 0

    def _flush(self, n):
        tokens = np.concatenate(self.tokens)
        mask = np.concatenate(self.masks) if self.with_mask else None
        self.tokens = [tokens[n:]]
        self.masks = [mask[n:]] if self.with_mask else []
        self.buffered -= n
        name = f"{self.prefix}_{self.split}_{len(self.tmp_paths):04d}.bin"
        final = os.path.join(self.out_dir, name)
        tmp = final + ".tmp"
        header = SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, self.tok.vocab_size, n,
                                   FLAG_MASK if self.with_mask else 0, self.tok.bos_id, self.tok.eos_id,
                                   self.seq_len)
        self.tmp_paths.append((tmp, final))  # before writing, so a failed write is cleaned up too
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(tokens[:n].astype("<u4").tobytes())
            if self.with_mask:
                f.write(mask[:n].astype(np.uint8).tobytes())
        self.tokens_written += n
        if self.with_mask:
            self.masked_written += int(mask[:n].sum())

    @property
    def n_shards(self):
        return len(self.tmp_paths)


def shard_index_pattern(prefix, split):
    return re.compile(re.escape(prefix) + "_" + split + r"_(\d{4,})\.bin$")


def commit(writers, out_dir):
    """Rename every .tmp shard into place, then delete same-prefix shards beyond the new count."""
    for w in writers:
        for tmp, final in w.tmp_paths:
            os.replace(tmp, final)
        pattern = shard_index_pattern(w.prefix, w.split)
        for name in os.listdir(out_dir):
            m = pattern.match(name)
            if m and int(m.group(1)) >= w.n_shards:
                os.remove(os.path.join(out_dir, name))


def discard(writers):
    for w in writers:
        for tmp, _ in w.tmp_paths:
            if os.path.exists(tmp):
                os.remove(tmp)


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second, only on a terminal."""

    def __init__(self, total_bytes, enabled):
        self.total = max(total_bytes, 1)
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.time()
        self.last = 0.0

    def update(self, done_bytes, samples, force=False):
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        frac = min(done_bytes / self.total, 1.0)
        width = 30
        filled = int(frac * width)
        rate = done_bytes / max(now - self.start, 1e-9) / 1e6
        sys.stderr.write(f"\rtokenizing [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%  "
                         f"{samples} samples  {rate:.1f} MB/s")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------

def default_input():
    shared = os.environ.get("LOLCATS_SHARED", os.path.join(REPO_ROOT, "..", "shared"))
    return os.path.normpath(os.path.join(shared, "data", "alpaca_en_demo.json"))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None,
                   help="input file (default: $LOLCATS_SHARED/data/alpaca_en_demo.json, LOLCATS_SHARED "
                        "defaulting to ../shared next to the repository)")
    p.add_argument("--format", choices=("alpaca", "jsonl", "text"), default="alpaca")
    p.add_argument("--tokenizer", required=True, help="'bytes' or a tokenizer file from export_tokenizer.py")
    p.add_argument("--out-dir", default="data", help="directory for the shards (created; default data/)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: the input file's stem)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--val-samples", type=int, default=200,
                   help="the first N samples/documents form the val split (default 200; 0: no val shards)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="most tokens in one shard, rounded down to whole sequences (default 100M)")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples/documents")
    p.add_argument("--text-docs", choices=("line", "file"), default="line",
                   help="--format text: a document per non-empty line (default) or the whole file")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p.parse_args(argv)


def prepare(args):
    path = args.input or default_input()
    if args.seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 (got {args.seq_len}): a sequence needs a target")
    if args.shard_tokens < args.seq_len:
        raise InputError(f"--shard-tokens ({args.shard_tokens}) must be at least --seq-len ({args.seq_len})")
    if args.val_samples < 0:
        raise InputError(f"--val-samples must be >= 0 (got {args.val_samples})")
    if args.max_samples is not None and args.max_samples < 1:
        raise InputError(f"--max-samples must be >= 1 (got {args.max_samples})")
    if not os.path.isfile(path):
        raise InputError(f"input file '{path}' not found")
    prefix = args.prefix or re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.splitext(os.path.basename(path))[0])
    if not prefix or "/" in prefix:
        raise InputError(f"bad --prefix '{prefix}'")
    tok = load_tokenizer_arg(args.tokenizer)

    if args.format == "alpaca":
        docs = read_alpaca(path)
    elif args.format == "jsonl":
        docs = read_jsonl_text(path)
    else:
        docs = read_plain_text(path, args.text_docs)
    with_mask = args.format == "alpaca"

    os.makedirs(args.out_dir, exist_ok=True)
    writers = {split: SplitWriter(args.out_dir, prefix, split, tok, args.seq_len, args.shard_tokens, with_mask)
               for split in ("val", "train")}
    progress = Progress(os.path.getsize(path), not args.quiet)
    bos = np.array([tok.bos_id], dtype=np.uint32)
    eos = np.array([tok.eos_id], dtype=np.uint32)
    n_docs, done_bytes = 0, 0
    try:
        for prompt, response, n_bytes in docs:
            if args.max_samples is not None and n_docs >= args.max_samples:
                break
            # BOS + prompt (mask 0), then response + EOS (mask 1); plain text: BOS + text + EOS.
            head = np.concatenate([bos, np.asarray(tok.encode(prompt), dtype=np.int64).astype(np.uint32)]) \
                if prompt is not None else bos
            tail = np.concatenate([np.asarray(tok.encode(response), dtype=np.int64).astype(np.uint32), eos])
            tokens = np.concatenate([head, tail])
            if tokens.size and int(tokens.max()) >= tok.vocab_size:
                raise InputError(f"tokenizer '{tok.name}' produced id {int(tokens.max())} >= its vocab_size "
                                 f"{tok.vocab_size}")
            mask = np.concatenate([np.zeros(head.size, np.uint8), np.ones(tail.size, np.uint8)]) \
                if with_mask else None
            writers["val" if n_docs < args.val_samples else "train"].add(tokens, mask)
            n_docs += 1
            done_bytes += n_bytes
            progress.update(done_bytes, n_docs)
        progress.update(progress.total, n_docs, force=True)
        progress.close()
        if n_docs == 0:
            raise InputError(f"'{path}' holds no samples")
        if args.val_samples and n_docs <= args.val_samples:
            raise InputError(f"'{path}' has {n_docs} samples, not more than --val-samples {args.val_samples}: "
                             f"no training data left")
        for split, w in writers.items():
            w.finish()
            if w.samples and w.n_shards == 0:
                raise InputError(f"the {split} split has {w.tokens_in} tokens, fewer than one --seq-len "
                                 f"{args.seq_len} sequence")
        commit(writers.values(), args.out_dir)
    except BaseException:
        discard(writers.values())
        raise
    return dict(path=path, prefix=prefix, tok=tok, writers=writers, with_mask=with_mask, n_docs=n_docs)


def print_summary(args, r):
    tok = r["tok"]
    print(f"{r['path']} ({args.format}): {r['n_docs']} samples, tokenizer {tok.name} (vocab {tok.vocab_size}, "
          f"bos {tok.bos_id}, eos {tok.eos_id}), seq_len {args.seq_len}")
    print(f"{'split':<6}{'samples':>9}{'tokens':>12}{'sequences':>11}{'dropped':>9}{'shards':>8}{'masked':>9}")
    for split in ("train", "val"):
        w = r["writers"][split]
        masked = f"{100.0 * w.masked_written / w.tokens_written:.2f}%" if (r["with_mask"] and w.tokens_written) \
            else "-"
        print(f"{split:<6}{w.samples:>9}{w.tokens_written:>12}{w.tokens_written // args.seq_len:>11}"
              f"{w.tokens_in - w.tokens_written:>9}{w.n_shards:>8}{masked:>9}")
    names = [os.path.basename(f) for w in r["writers"].values() for _, f in w.tmp_paths]
    print(f"wrote {len(names)} shards to {args.out_dir}: {', '.join(names)}")
    if r["with_mask"]:
        print("masked = share of written tokens that are response or EOS tokens (counted in the stage-2 loss)")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = prepare(args)
    except InputError as e:
        die(str(e))
    except OSError as e:
        die(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
    except KeyboardInterrupt:
        die("interrupted; no shards were written")
    if not args.quiet:
        print_summary(args, result)


if __name__ == "__main__":
    main()
