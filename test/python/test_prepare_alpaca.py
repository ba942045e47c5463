"""Tests of scripts/prepare_alpaca.py on samples of the real ../shared data: the shards hold exactly
BOS + prompt + output + EOS per sample (the prompt templates typed out again here from LOLCATS.md, so a
template typo in the script fails), masks on exactly the response and EOS tokens, the val/train split by
sample index, header fields and file sizes, the text formats, stale-shard removal and one-line errors.
The shards are read with a reader written here, not the script's writer. With the Llama 3 tokenizer too
(when assets/llama3_tokenizer.model and the exporter exist), against tiktoken itself."""
import base64
import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREPARE = os.path.join(ROOT, "scripts", "prepare_alpaca.py")
EXPORT_TOKENIZER = os.path.join(ROOT, "scripts", "export_tokenizer.py")
LLAMA3_RANKS = os.path.join(ROOT, "assets", "llama3_tokenizer.model")
SHARED = os.environ.get("LOLCATS_SHARED", os.path.join(ROOT, "..", "shared"))
ALPACA = os.path.join(SHARED, "data", "alpaca_en_demo.json")
C4 = os.path.join(SHARED, "data", "c4_demo.jsonl")
WIKI = os.path.join(SHARED, "data", "wiki_demo.txt")

needs_shared = pytest.mark.skipif(not os.path.exists(ALPACA), reason=f"shared data not found at {SHARED}")

# LOLCATS.md section 4, byte for byte.
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
              "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

BOS, EOS, BYTE_OFFSET, BYTE_VOCAB = 1, 2, 3, 259


def run(*args):
    return subprocess.run([sys.executable, PREPARE, *map(str, args)], capture_output=True, text=True)


def read_shard(path):
    """The shard format of CONTEXT.md, read field by field."""
    with open(path, "rb") as f:
        buf = f.read()
    magic, version, vocab, n, flags, bos, eos, seq_len = struct.unpack_from("<8sIIQIiiI", buf, 0)
    assert buf[40:64] == bytes(24), "header padding must be zero"
    expected_size = 64 + 4 * n + (n if flags & 1 else 0)
    assert len(buf) == expected_size, f"{path}: {len(buf)} bytes, header implies {expected_size}"
    tokens = np.frombuffer(buf, dtype="<u4", count=n, offset=64)
    mask = np.frombuffer(buf, dtype=np.uint8, count=n, offset=64 + 4 * n) if flags & 1 else None
    return dict(magic=magic, version=version, vocab=vocab, n=n, flags=flags, bos=bos, eos=eos, seq_len=seq_len,
                tokens=tokens, mask=mask)


def read_split(out_dir, prefix, split):
    """All shards of a split in index order, checked to be numbered 0000.. without gaps."""
    paths = sorted(glob.glob(os.path.join(out_dir, f"{prefix}_{split}_*.bin")))
    assert [os.path.basename(p) for p in paths] == [f"{prefix}_{split}_{i:04d}.bin" for i in range(len(paths))]
    return [read_shard(p) for p in paths]


def byte_ids(text):
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def expected_alpaca_stream(samples, encode, bos, eos):
    """Concatenated tokens and mask of the samples: BOS + prompt (mask 0), output + EOS (mask 1)."""
    tokens, mask = [], []
    for s in samples:
        prompt = (WITH_INPUT if s["input"] else NO_INPUT).format(**s)
        head = [bos] + encode(prompt)
        tail = encode(s["output"]) + [eos]
        tokens += head + tail
        mask += [0] * len(head) + [1] * len(tail)
    return np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.uint8)


def check_split(shards, tokens, mask, seq_len, shard_tokens, vocab, bos, eos, with_mask=True):
    """The shards hold exactly the whole seq_len sequences of the stream (tail dropped), headers right."""
    keep = (len(tokens) // seq_len) * seq_len
    assert keep > 0
    for sh in shards:
        assert (sh["magic"], sh["version"], sh["vocab"], sh["bos"], sh["eos"], sh["seq_len"]) == \
               (b"LOLCTOK1", 1, vocab, bos, eos, seq_len)
        assert sh["flags"] == (1 if with_mask else 0)
        assert 0 < sh["n"] <= shard_tokens and sh["n"] % seq_len == 0
    got = np.concatenate([sh["tokens"] for sh in shards]).astype(np.int64)
    np.testing.assert_array_equal(got, tokens[:keep])
    if with_mask:
        np.testing.assert_array_equal(np.concatenate([sh["mask"] for sh in shards]), mask[:keep])
    return got


@pytest.fixture(scope="module")
def alpaca_samples():
    if not os.path.exists(ALPACA):
        pytest.skip(f"shared data not found at {SHARED}")
    with open(ALPACA, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def few(alpaca_samples, tmp_path):
    """The first 14 real samples (with and without input) as a JSON list file."""
    samples = alpaca_samples[:14]
    assert any(s["input"] for s in samples) and any(not s["input"] for s in samples)
    path = tmp_path / "few.json"
    path.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    return samples, path


def test_bytes_shards_are_the_template_stream(few, tmp_path):
    samples, path = few
    out = tmp_path / "out"
    r = run("--input", path, "--tokenizer", "bytes", "--out-dir", out, "--prefix", "alp", "--seq-len", 256,
            "--val-samples", 4, "--shard-tokens", 1024)
    assert r.returncode == 0, r.stderr
    for split, part in (("val", samples[:4]), ("train", samples[4:])):
        tokens, mask = expected_alpaca_stream(part, byte_ids, BOS, EOS)
        shards = read_split(out, "alp", split)
        got = check_split(shards, tokens, mask, 256, 1024, BYTE_VOCAB, BOS, EOS)
        if split == "train":
            assert len(shards) > 1, "the test means to cover several shards"
        # Decoding the stream gives the template text: every document starts at a BOS, its mask-0 tokens
        # decode to the prompt, its mask-1 tokens to the output and EOS. The last document may be cut short
        # by the dropped tail; then what is left decodes to a prefix of prompt + output.
        got_mask = np.concatenate([sh["mask"] for sh in shards])
        starts = list(np.flatnonzero(got == BOS)) + [len(got)]
        assert 0 < len(starts) - 1 <= len(part)
        for i in range(len(starts) - 1):
            doc, m = got[starts[i]:starts[i + 1]], got_mask[starts[i]:starts[i + 1]]
            prompt = (WITH_INPUT if part[i]["input"] else NO_INPUT).format(**part[i])
            n_prompt = int((m == 0).sum())
            assert np.all(m[:n_prompt] == 0) and np.all(m[n_prompt:] == 1), "mask is not prompt zeros then ones"
            if starts[i + 1] < len(got) or len(got) == len(tokens):  # a complete document
                assert doc[-1] == EOS and m[-1] == 1
                assert bytes(int(t) - BYTE_OFFSET for t in doc[1:n_prompt]).decode("utf-8") == prompt
                assert bytes(int(t) - BYTE_OFFSET for t in doc[n_prompt:-1]).decode("utf-8") == part[i]["output"]
            else:
                text = bytes(int(t) - BYTE_OFFSET for t in doc[1:]).decode("utf-8", errors="ignore")
                assert (prompt + part[i]["output"]).startswith(text)
                assert n_prompt == min(len(doc), 1 + len(prompt.encode("utf-8")))
    # The split is by sample index: val starts with sample 0, train with sample 4.
    assert read_split(out, "alp", "val")[0]["tokens"][1:40].tolist() == byte_ids(NO_INPUT.format(**samples[0]))[:39]
    assert read_split(out, "alp", "train")[0]["tokens"][0] == BOS
    assert "train" in r.stdout and "masked" in r.stdout
    assert not glob.glob(os.path.join(out, "*.tmp"))


def test_templates_are_byte_exact(few, tmp_path):
    """One sample without input and one with, spelled out in full."""
    samples, _ = few
    pair = [dict(instruction="Add 2 and 3.", input="", output="5"),
            dict(instruction="Translate.", input="chat", output="cat")]
    path = tmp_path / "two.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in pair) + "\n", encoding="utf-8")  # JSONL input
    out = tmp_path / "out"
    r = run("--input", path, "--tokenizer", "bytes", "--out-dir", out, "--prefix", "t", "--seq-len", 2,
            "--val-samples", 1)
    assert r.returncode == 0, r.stderr
    val = read_split(out, "t", "val")[0]
    train = read_split(out, "t", "train")[0]
    want_val = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n5")
    want_train = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Translate.\n\n### Input:\nchat\n\n### Response:\ncat")
    for shard, want, response in ((val, want_val, "5"), (train, want_train, "cat")):
        full = [BOS] + byte_ids(want) + [EOS]
        keep = len(full) // 2 * 2
        assert shard["tokens"].tolist() == full[:keep]
        n_resp = len(response.encode()) + 1
        assert shard["mask"].tolist() == ([0] * (len(full) - n_resp) + [1] * n_resp)[:keep]


def test_json_list_and_jsonl_give_identical_shards(few, tmp_path):
    samples, path = few
    jsonl = tmp_path / "few.jsonl"
    jsonl.write_text("\n".join(json.dumps(s) for s in samples), encoding="utf-8")
    for src, out in ((path, "a"), (jsonl, "b")):
        r = run("--input", src, "--tokenizer", "bytes", "--out-dir", tmp_path / out, "--prefix", "p",
                "--seq-len", 128, "--val-samples", 3, "--quiet")
        assert r.returncode == 0 and r.stdout == "", r.stderr
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


@needs_shared
def test_jsonl_text_documents(tmp_path):
    docs = []
    with open(C4, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            if len(docs) == 8:
                break
    r = run("--input", C4, "--format", "jsonl", "--tokenizer", "bytes", "--out-dir", tmp_path, "--seq-len", 64,
            "--val-samples", 2, "--max-samples", 8)
    assert r.returncode == 0, r.stderr
    for split, part in (("val", docs[:2]), ("train", docs[2:])):
        tokens = np.array([t for d in part for t in [BOS] + byte_ids(d) + [EOS]])
        check_split(read_split(tmp_path, "c4_demo", split), tokens, None, 64, 10**8, BYTE_VOCAB, BOS, EOS,
                    with_mask=False)


@needs_shared
def test_plain_text_lines_and_whole_file(tmp_path):
    with open(WIKI, "rb") as f:
        lines = [ln.decode("utf-8").rstrip("\n") for ln in f][:5]
    lines = [ln for ln in lines if ln.strip()]
    r = run("--input", WIKI, "--format", "text", "--tokenizer", "bytes", "--out-dir", tmp_path / "l",
            "--seq-len", 512, "--val-samples", 1, "--max-samples", 5, "--prefix", "w")
    assert r.returncode == 0, r.stderr
    for split, part in (("val", lines[:1]), ("train", lines[1:])):
        tokens = np.array([t for d in part for t in [BOS] + byte_ids(d) + [EOS]])
        check_split(read_split(tmp_path / "l", "w", split), tokens, None, 512, 10**8, BYTE_VOCAB, BOS, EOS,
                    with_mask=False)
    small = tmp_path / "small.txt"
    small.write_text("first line\n\nsecond\u2028still second\n", encoding="utf-8")
    r = run("--input", small, "--format", "text", "--text-docs", "file", "--tokenizer", "bytes", "--out-dir",
            tmp_path / "f", "--seq-len", 4, "--val-samples", 0)
    assert r.returncode == 0, r.stderr
    tokens = np.array([BOS] + byte_ids(small.read_text(encoding="utf-8")) + [EOS])
    check_split(read_split(tmp_path / "f", "small", "train"), tokens, None, 4, 10**8, BYTE_VOCAB, BOS, EOS, False)
    assert not read_split(tmp_path / "f", "small", "val")
    # Lines: the empty line is skipped and U+2028 does not split a document.
    r = run("--input", small, "--format", "text", "--tokenizer", "bytes", "--out-dir", tmp_path / "g",
            "--seq-len", 4, "--val-samples", 0)
    assert r.returncode == 0, r.stderr
    tokens = np.array([BOS] + byte_ids("first line") + [EOS, BOS] + byte_ids("second\u2028still second") + [EOS])
    check_split(read_split(tmp_path / "g", "small", "train"), tokens, None, 4, 10**8, BYTE_VOCAB, BOS, EOS, False)


def test_stale_shards_of_a_larger_run_are_removed(few, tmp_path):
    _, path = few
    common = ("--input", path, "--tokenizer", "bytes", "--out-dir", tmp_path, "--prefix", "p", "--seq-len", 64,
              "--val-samples", 2, "--quiet")
    assert run(*common, "--shard-tokens", 256).returncode == 0
    assert len(read_split(tmp_path, "p", "train")) > 3
    (tmp_path / "other_train_0007.bin").write_bytes(b"not ours")
    assert run(*common).returncode == 0
    assert len(read_split(tmp_path, "p", "train")) == 1
    assert len(read_split(tmp_path, "p", "val")) == 1
    assert (tmp_path / "other_train_0007.bin").exists(), "another prefix's files are left alone"


@pytest.mark.parametrize("case", ["missing", "bad_json", "bad_jsonl", "no_output", "not_string", "seq_len",
                                  "too_few", "bad_tokenizer", "jsonl_no_text"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path):
    src = tmp_path / "in.json"
    good = [dict(instruction="i", input="", output="o" * 50)] * 4
    args = ["--seq-len", 8, "--val-samples", 1]
    want = ""
    if case == "missing":
        src = tmp_path / "nope.json"
        want = "not found"
    elif case == "bad_json":
        src.write_text(json.dumps(good)[:-5])
        want = "is not valid JSON"
    elif case == "bad_jsonl":
        src.write_text(json.dumps(good[0]) + "\n{oops\n")
        want = "line 2 is not valid JSON"
    elif case == "no_output":
        src.write_text(json.dumps(good + [dict(instruction="i", input="")]))
        want = "sample 4 has no 'output' field"
    elif case == "not_string":
        src.write_text(json.dumps(good + [dict(instruction="i", input=3, output="o")]))
        want = "sample 4 field 'input' is not a string"
    elif case == "seq_len":
        src.write_text(json.dumps(good))
        args = ["--seq-len", 1]
        want = "--seq-len must be at least 2"
    elif case == "too_few":
        src.write_text(json.dumps(good))
        args = ["--val-samples", 4]
        want = "no training data left"
    elif case == "bad_tokenizer":
        src.write_text(json.dumps(good))
        r = run("--input", src, "--tokenizer", tmp_path / "none.tok", "--out-dir", tmp_path / "out")
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        return
    elif case == "jsonl_no_text":
        src.write_text('{"text": "a"}\n{"txt": "b"}\n')
        args = ["--format", "jsonl", "--val-samples", 0]
        want = "line 2 has no 'text' field"
    r = run("--input", src, "--tokenizer", "bytes", "--out-dir", tmp_path / "out", *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert want in r.stderr, r.stderr
    assert not glob.glob(str(tmp_path / "out" / "*")), "a failed run must leave no shards or .tmp files"


@needs_shared
def test_full_demo_file_counts(tmp_path):
    r = run("--input", ALPACA, "--tokenizer", "bytes", "--out-dir", tmp_path, "--prefix", "demo")
    assert r.returncode == 0, r.stderr
    val, train = read_split(tmp_path, "demo", "val"), read_split(tmp_path, "demo", "train")
    with open(ALPACA, encoding="utf-8") as f:
        samples = json.load(f)
    assert len(samples) == 999
    for shards, part in ((val, samples[:200]), (train, samples[200:])):
        tokens, mask = expected_alpaca_stream(part, byte_ids, BOS, EOS)
        check_split(shards, tokens, mask, 1024, 10**8, BYTE_VOCAB, BOS, EOS)
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln.split()[:1] in (["train"], ["val"])}
    assert rows["train"][1] == "799" and rows["val"][1] == "200"


# ---------------------------------------------------------------------------------------------------
# The Llama 3 tokenizer, checked against tiktoken built here from the ranks file.

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    if not (os.path.exists(LLAMA3_RANKS) and os.path.exists(EXPORT_TOKENIZER)):
        pytest.skip("assets/llama3_tokenizer.model (scripts/fetch_assets.sh) or export_tokenizer.py missing")
    out = tmp_path_factory.mktemp("tok") / "llama3.tok"
    r = subprocess.run([sys.executable, EXPORT_TOKENIZER, "llama3", LLAMA3_RANKS, str(out), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_llama3_shards_match_tiktoken(llama3_tok, alpaca_samples, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {}
    with open(LLAMA3_RANKS, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    samples = alpaca_samples[:30]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(samples), encoding="utf-8")
    r = run("--input", path, "--tokenizer", llama3_tok, "--out-dir", tmp_path / "out", "--prefix", "l3",
            "--seq-len", 512, "--val-samples", 5)
    assert r.returncode == 0, r.stderr
    bos, eos = 128000, 128001  # <|begin_of_text|>, <|end_of_text|> (base Llama 3)
    for split, part in (("val", samples[:5]), ("train", samples[5:])):
        tokens, mask = expected_alpaca_stream(part, enc.encode_ordinary, bos, eos)
        check_split(read_split(tmp_path / "out", "l3", split), tokens, mask, 512, 10**8, 128256, bos, eos)
