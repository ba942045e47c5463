"""Tests of scripts/export_tokenizer.py and scripts/lolcats_tokenizer.py (the Python loader that
prepare_alpaca.py uses): the exported files load and give the reference ids recorded in
test/fixtures/tokenizer/ (tiktoken for Llama 3, Hugging Face tokenizers for SmolLM2) on every inline case and
on the shared data; bad files and sources are refused with a one-line error. The real tokenizers need assets/
(scripts/fetch_assets.sh); without it those tests skip."""
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from lolcats_tokenizer import (HEADER, TokenizerFileError, load_tokenizer,  # noqa: E402
                               read_tokenizer_file)
from make_tokenizer_fixtures import fnv1a64  # noqa: E402  (the hash the fixtures were written with)

EXPORT = os.path.join(ROOT, "scripts", "export_tokenizer.py")
FIXTURES = os.path.join(ROOT, "test", "fixtures", "tokenizer")
DATA = os.path.join(os.environ.get("LOLCATS_SHARED", os.path.join(ROOT, "..", "shared")), "data")
SOURCES = {"llama3": ("llama3", os.path.join(ROOT, "assets", "llama3_tokenizer.model")),
           "smollm2": ("gguf", os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct.Q4_1.gguf"))}


def read_fixture(name):
    cases, lines = [], open(os.path.join(FIXTURES, f"{name}.txt")).read().split("\n")
    i = 0
    while i < len(lines):
        if lines[i].startswith("case "):
            _, cname, mode, source, arg = lines[i].split(" ", 4)
            n = int(lines[i + 1].split()[1])
            units = [(int(a), int(b, 16)) for a, b in (ln.split() for ln in lines[i + 2:i + 2 + n])]
            ids = [int(x) for x in lines[i + 2 + n].split()[2:]]
            cases.append((cname, mode, source, arg, units, ids))
            i += 3 + n
        else:
            i += 1
    return cases


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def exported(request, tmp_path_factory):
    kind, src = SOURCES[request.param]
    if not os.path.exists(src):
        pytest.skip(f"{src} missing (scripts/fetch_assets.sh)")
    out = str(tmp_path_factory.mktemp("tok") / f"{request.param}.tok")
    subprocess.run([sys.executable, EXPORT, kind, src, out, "--quiet"], check=True)
    return request.param, out, load_tokenizer(out)


def test_inline_cases_match_reference(exported):
    name, path, tok = exported
    token_set = set(tok.data.tokens)
    missing_bytes = {b for b in range(256) if bytes([b]) not in token_set}
    n = 0
    for cname, mode, source, arg, units, ids in read_fixture(name):
        if source != "inline":
            continue
        text = bytes.fromhex(arg).decode("utf-8")
        got = tok.encode(text, parse_special=(mode == "special"))
        assert got == ids, f"{name} {cname} {mode}"
        if not missing_bytes & set(text.encode()):
            assert tok.decode(got) == text, f"{name} {cname}: decode(encode(x)) != x"
        n += 1
    assert n > 900


def test_shared_data_matches_reference(exported):
    name, path, tok = exported
    if not os.path.isdir(DATA):
        pytest.skip(f"{DATA} missing (set LOLCATS_SHARED)")
    for cname, mode, source, arg, units, ids in read_fixture(name):
        if source not in ("file", "alpaca", "jsonl"):
            continue
        text = open(os.path.join(DATA, arg), "rb").read().decode("utf-8")
        if source == "file":
            texts = [text]
        elif source == "alpaca":
            texts = [s[k] for s in json.loads(text) for k in ("instruction", "input", "output")]
        else:
            texts = [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
        got = [tok.encode(t) for t in texts]
        assert [(len(g), fnv1a64(g)) for g in got] == units, f"{name} {cname}"
        assert [i for g in got for i in g][:len(ids)] == ids


def test_header_fields(exported):
    name, path, tok = exported
    if name == "llama3":
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
        assert tok.special_tokens["<|eot_id|>"] == 128009
        assert tok.encode("<|eot_id|>", parse_special=True) == [128009]
        assert len(tok.encode("<|eot_id|>")) > 1  # plain text by default
    else:
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
        assert tok.special_tokens["<|im_end|>"] == 2


def test_bad_files_are_refused(exported, tmp_path):
    _, path, _ = exported
    good = open(path, "rb").read()

    def refused(data, message):
        p = tmp_path / "bad.tok"
        p.write_bytes(data)
        with pytest.raises(TokenizerFileError, match=message):
            read_tokenizer_file(str(p))
    refused(b"XXXX" + good[4:], "bad magic")
    refused(good[:8] + struct.pack("<I", 9) + good[12:], "unsupported tokenizer file version 9")
    refused(good[:HEADER.size + 1000], "truncated in the token table")
    refused(good[:-3], "merge table has")
    refused(good + b"\0", "merge table has")
    with pytest.raises(TokenizerFileError, match="cannot open"):
        read_tokenizer_file(str(tmp_path / "none.tok"))


def test_exporter_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not base64 at all\n")
    r = subprocess.run([sys.executable, EXPORT, "llama3", str(bad), str(tmp_path / "o.tok")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, EXPORT, "gguf", str(bad), str(tmp_path / "o.tok")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o.tok").exists()
