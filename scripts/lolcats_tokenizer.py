#!/usr/bin/env python3
"""lolcats_tokenizer.py: the Python side of our tokenizer file (.tok): its reader and writer, and a
tokenizer object built from it for the data scripts.

    from lolcats_tokenizer import load_tokenizer
    tok = load_tokenizer("build/llama3.tok")
    ids = tok.encode("Hello world")      # list[int]; no BOS/EOS added, special-token text is plain text
    ids = tok.encode(text, parse_special=True)   # "<|eot_id|>" etc. become their special ids
    text = tok.decode(ids)               # str (invalid UTF-8 from a partial sequence becomes U+FFFD)
    tok.bos_id, tok.eos_id, tok.vocab_size, tok.name, tok.special_tokens (text -> id)

The file format is documented in tokenizer.h (the C++ reader); TokenizerData below mirrors it field by
field. Which library encodes depends on the pre-tokenizer the file names, and each is exact:
  "llama3": tiktoken.Encoding with the token byte strings as ranks (the file's ranks are the token ids,
            checked on load) and Llama 3's split pattern. This *is* the reference tokenizer.
  "smollm": a Hugging Face `tokenizers` BPE built from the file's vocabulary and merges, with SmolLM2's
            pre-tokenizer (digits isolated, then the GPT-2 byte-level split). tiktoken cannot be exact
            here: it merges any adjacent pair whose concatenation is a token, whereas a merges-list BPE
            only merges listed pairs, and the two pre-tokenizers differ at digit boundaries.
Running this file (`python3 scripts/lolcats_tokenizer.py FILE.tok FIXTURE.txt`) checks the loader against
a fixture written by make_tokenizer_fixtures.py.
"""
import os
import struct
import sys
from dataclasses import dataclass, field

MAGIC = b"LOLCBPE1"
VERSION = 1
# magic, version, vocab_size, n_merges, flags, bos_id, eos_id, pretokenizer[24], name[40]: 96 bytes.
HEADER = struct.Struct("<8sIIIIii24s40s")
FLAG_WHOLE_PIECE_FIRST = 1  # a pre-token that is itself a vocabulary token is emitted whole (tiktoken)
TOKEN_NORMAL, TOKEN_SPECIAL = 0, 1
MAX_TOKEN_BYTES = 65535

# Llama 3's split pattern, as llama-models' tokenizer.py gives it to tiktoken.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRETOKENIZERS = ("llama3", "smollm")


class TokenizerFileError(Exception):
    """A malformed tokenizer file or source; the message is one line meant for the user."""


@dataclass
class TokenizerData:
    name: str
    pretokenizer: str           # one of PRETOKENIZERS
    flags: int                  # FLAG_* bits
    bos_id: int                 # -1: none
    eos_id: int                 # -1: none
    tokens: list                # bytes of each token id (a special token's bytes are its text, UTF-8)
    types: list                 # TOKEN_NORMAL or TOKEN_SPECIAL per id
    merges: list = field(default_factory=list)  # (left_id, right_id, merged_id, priority), priority ascending


def byte_level_alphabet():
    """GPT-2's byte-level alphabet: byte value -> the printable character that stands for it in vocab and
    merges strings. The printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points
    256, 257, ... in byte order."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def check_tokenizer_data(d):
    """Everything the C++ loader checks, so a file we write always loads."""
    n = len(d.tokens)
    if not 256 <= n < 2**31 or len(d.types) != n:
        raise TokenizerFileError(f"bad vocabulary size {n}")
    if d.pretokenizer not in PRETOKENIZERS:
        raise TokenizerFileError(f"unknown pre-tokenizer '{d.pretokenizer}' (known: {', '.join(PRETOKENIZERS)})")
    for which, i in (("bos", d.bos_id), ("eos", d.eos_id)):
        if not -1 <= i < n:
            raise TokenizerFileError(f"{which} id {i} is outside the vocabulary (size {n})")
    seen = {}
    for i, (t, ty) in enumerate(zip(d.tokens, d.types)):
        if ty not in (TOKEN_NORMAL, TOKEN_SPECIAL) or not 1 <= len(t) <= MAX_TOKEN_BYTES:
            raise TokenizerFileError(f"token {i} has type {ty} and {len(t)} bytes")
        if ty == TOKEN_NORMAL:
            if t in seen:
                raise TokenizerFileError(f"tokens {seen[t]} and {i} have the same bytes {t!r}")
            seen[t] = i
    # A byte with no token of its own is dropped by the encoder, as Hugging Face's BPE without an unknown
    # token does (SmolLM2 lacks 21 bytes: 6 control characters, 0xC0/0xC1/0xF1/0xF2/0xF5..0xFF).
    tokens, types, last = d.tokens, d.types, -1
    for left, right, merged, prio in d.merges:
        if not (0 <= left < n and 0 <= right < n and 0 <= merged < n):
            raise TokenizerFileError(f"merge ({left}, {right}) -> {merged} names an id outside the vocabulary")
        if types[left] or types[right] or types[merged] or tokens[left] + tokens[right] != tokens[merged]:
            raise TokenizerFileError(f"merge ({left}, {right}) -> {merged}: the bytes do not concatenate")
        if prio < last:
            raise TokenizerFileError("merges are not sorted by priority")
        last = prio
    if len({(left, right) for left, right, _, _ in d.merges}) != len(d.merges):
        raise TokenizerFileError("a merge pair is listed twice")


def write_tokenizer_file(path, d):
    """Write D to PATH through PATH.tmp and a rename, so PATH is never half-written."""
    check_tokenizer_data(d)
    name, pre = d.name.encode()[:39], d.pretokenizer.encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, len(d.tokens), len(d.merges), d.flags, d.bos_id, d.eos_id, pre, name))
        for t, ty in zip(d.tokens, d.types):
            f.write(struct.pack("<BH", ty, len(t)))
            f.write(t)
        import numpy as np
        f.write(np.asarray(d.merges, dtype="<u4").reshape(-1, 4).tobytes())
    os.replace(tmp, path)


def read_tokenizer_file(path):
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise TokenizerFileError(f"cannot open '{path}' ({e.strerror})")
    if len(buf) < HEADER.size or buf[:8] != MAGIC:
        raise TokenizerFileError(f"'{path}' is not a lolcats tokenizer file (bad magic)")
    magic, version, n, n_merges, flags, bos, eos, pre, name = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise TokenizerFileError(f"'{path}': unsupported tokenizer file version {version} (expected {VERSION})")
    pos = HEADER.size
    tokens, types = [], []
    try:
        for _ in range(n):
            ty, length = struct.unpack_from("<BH", buf, pos)
            pos += 3
            if pos + length > len(buf):
                raise struct.error
            tokens.append(buf[pos:pos + length])
            types.append(ty)
            pos += length
    except struct.error:
        raise TokenizerFileError(f"'{path}' is truncated in the token table")
    if len(buf) - pos != 16 * n_merges:
        raise TokenizerFileError(f"'{path}': the merge table has {len(buf) - pos} bytes, expected {16 * n_merges}")
    import numpy as np
    merges = list(map(tuple, np.frombuffer(buf, dtype="<u4", offset=pos).reshape(-1, 4).tolist()))
    d = TokenizerData(name.rstrip(b"\0").decode(), pre.rstrip(b"\0").decode(), flags, bos, eos, tokens, types, merges)
    try:
        check_tokenizer_data(d)
    except TokenizerFileError as e:
        raise TokenizerFileError(f"'{path}': {e}")
    return d


class Tokenizer:
    """Encode/decode with the reference library for the file's pre-tokenizer (see the module docstring)."""

    def __init__(self, d):
        self.data = d
        self.name = d.name
        self.vocab_size = len(d.tokens)
        self.bos_id, self.eos_id = d.bos_id, d.eos_id
        self.special_tokens = {t.decode("utf-8"): i for i, (t, ty) in enumerate(zip(d.tokens, d.types))
                               if ty == TOKEN_SPECIAL}
        if d.pretokenizer == "llama3":
            self._init_tiktoken(d)
        else:
            self._init_hf(d)

    def _init_tiktoken(self, d):
        import tiktoken
        if not d.flags & FLAG_WHOLE_PIECE_FIRST or any(m != p for _, _, m, p in d.merges):
            raise TokenizerFileError("a llama3 tokenizer file must rank merges by the merged token id")
        ranks = {t: i for i, (t, ty) in enumerate(zip(d.tokens, d.types)) if ty == TOKEN_NORMAL}
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerFileError("a llama3 tokenizer file must have its normal tokens first")
        self._enc = tiktoken.Encoding(d.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self._encode_plain = self._enc.encode_ordinary
        self._encode_special = lambda text: self._enc.encode(text, allowed_special="all")

    def _init_hf(self, d):
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        if d.flags & FLAG_WHOLE_PIECE_FIRST or [p for *_, p in d.merges] != list(range(len(d.merges))):
            raise TokenizerFileError("a merges tokenizer file must number its merges 0, 1, 2, ...")
        alphabet = byte_level_alphabet()
        strings = [t.decode("utf-8") if ty == TOKEN_SPECIAL else "".join(alphabet[b] for b in t)
                   for t, ty in zip(d.tokens, d.types)]
        vocab = {s: i for i, s in enumerate(strings)}
        merges = [(strings[l], strings[r]) for l, r, _, _ in d.merges]

        def build(with_specials):
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=True)])
            tok.decoder = decoders.ByteLevel()
            if with_specials:
                tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                                   single_word=False) for s in self.special_tokens])
            return tok
        plain, special = build(False), build(True)
        self._encode_plain = lambda text: plain.encode(text, add_special_tokens=False).ids
        self._encode_special = lambda text: special.encode(text, add_special_tokens=False).ids

    def encode(self, text, parse_special=False):
        """Token ids of TEXT, no BOS/EOS. parse_special: special-token text becomes its id (else plain text)."""
        return list(self._encode_special(text) if parse_special else self._encode_plain(text))

    def decode_bytes(self, ids):
        tokens = self.data.tokens
        return b"".join(tokens[i] for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(path):
    return Tokenizer(read_tokenizer_file(path))


def _check_fixture(tok_path, fixture_path):
    """Compare this loader with a fixture's inline cases (make_tokenizer_fixtures.py format)."""
    tok = load_tokenizer(tok_path)
    n_ok = n_bad = 0
    with open(fixture_path) as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        parts = lines[i].split(" ")
        if parts[0] == "case" and parts[3] == "inline":
            name, mode, text = parts[1], parts[2], bytes.fromhex(parts[4]).decode("utf-8")
            ids_line = lines[i + 2].split(" ")  # "unit N FNV" then "ids N ..."
            want = [int(x) for x in ids_line[2:]]
            got = tok.encode(text, parse_special=(mode == "special"))
            if got == want and tok.decode(got) == text:
                n_ok += 1
            else:
                n_bad += 1
                print(f"MISMATCH {name}: got {got[:20]} want {want[:20]}")
        i += 1
    print(f"{n_ok} passed, {n_bad} failed")
    return n_bad == 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: lolcats_tokenizer.py FILE.tok FIXTURE.txt")
    try:
        sys.exit(0 if _check_fixture(sys.argv[1], sys.argv[2]) else 1)
    except TokenizerFileError as e:
        sys.exit(f"error: {e}")
