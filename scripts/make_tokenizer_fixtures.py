#!/usr/bin/env python3
"""make_tokenizer_fixtures.py: reference token ids for test/test_tokenizer.cpp, from the reference
tokenizers built straight from the original files (never from our tokenizer file):
  llama3   tiktoken.Encoding with the official ranks (assets/llama3_tokenizer.model), Llama 3's pattern and
           its 256 special tokens
  smollm2  a Hugging Face `tokenizers` BPE from the GGUF's tokens and merges, pre-tokenizer
           Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)] (GGUF
           tokenizer.ggml.pre = "smollm"), no unknown token; in "special" mode its CONTROL tokens are
           added as special tokens (not normalized, no strip), as SmolLM2's tokenizer.json has them.

    python3 scripts/make_tokenizer_fixtures.py [--assets assets] [--data ../shared/data]
                                               [--out test/fixtures/tokenizer] [--check-loader]
--check-loader also exports our tokenizer files to a temporary folder and checks that
scripts/lolcats_tokenizer.py gives the reference ids on every case.

Fixture file (one per tokenizer, text, lines separated by "\\n"):
  tokenizer NAME
  case NAME MODE SOURCE ARG     MODE: plain (special-token text is text) | special (it is the special id)
                                SOURCE inline: ARG = the text, UTF-8, in hex
                                       file:   ARG = a file of the data folder, its whole text
                                       alpaca: ARG = a JSON list of {instruction, input, output}: one unit
                                               per field, in that order, sample after sample
                                       jsonl:  ARG = one JSON object a line: one unit per line's "text"
                                       sweep:  ARG = a block size B: code points 0..0x3FFFF (surrogates
                                               skipped) and every 97th after, B per unit, each code point
                                               c giving the text  x c c 9 c ' ' c ' c x \\n
  units COUNT
  COUNT lines "N_IDS FNV"       per unit: its id count and FNV-1a 64 (hex) of its ids as uint32 LE bytes
  ids K ID...                   the first K ids of all units concatenated (all of them for inline)
"""
import argparse
import base64
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lolcats_tokenizer import LLAMA3_PATTERN  # noqa: E402

STORED_IDS = 2000
SWEEP_BLOCK = 8192


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for i in ids:
        for b in i.to_bytes(4, "little"):
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


# ---------------------------------------------------------------------------------------------------------
# Reference tokenizers


def llama3_reference(assets):
    import tiktoken
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from export_tokenizer import llama3_special_names
    ranks = {}
    with open(os.path.join(assets, "llama3_tokenizer.model"), "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_names())}
    enc = tiktoken.Encoding("llama3-reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens=specials)
    return {"plain": enc.encode_ordinary, "special": lambda t: enc.encode(t, allowed_special="all"),
            "batch": lambda texts: enc.encode_ordinary_batch(texts, num_threads=2),
            "specials": list(specials), "engine": f"tiktoken {tiktoken.__version__}"}


def smollm2_reference(assets):
    import tokenizers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from gguf_reader import GGUFFile
    md = GGUFFile(os.path.join(assets, "SmolLM2-135M-Instruct.Q4_1.gguf")).metadata
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
    strings = md["tokenizer.ggml.tokens"]
    vocab = {s: i for i, s in enumerate(strings)}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    controls = [s for s, ty in zip(strings, md["tokenizer.ggml.token_type"]) if ty == 3]

    def build(with_specials):
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
        if with_specials:
            tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                               single_word=False) for s in controls])
        return tok
    plain, special = build(False), build(True)
    return {"plain": lambda t: plain.encode(t, add_special_tokens=False).ids,
            "special": lambda t: special.encode(t, add_special_tokens=False).ids,
            "batch": lambda texts: [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)],
            "specials": controls, "engine": f"tokenizers {tokenizers.__version__}"}


# ---------------------------------------------------------------------------------------------------------
# Inputs


def sweep_code_points():
    return [c for c in range(0x40000) if not 0xD800 <= c <= 0xDFFF] + list(range(0x40000, 0x110000, 97))


def sweep_texts(block):
    cps = sweep_code_points()
    return ["".join(f"x{chr(c)}{chr(c)}9{chr(c)} {chr(c)}'{chr(c)}x\n" for c in cps[i:i + block])
            for i in range(0, len(cps), block)]


def read_text(path):
    with open(path, "rb") as f:  # bytes: no newline translation
        return f.read().decode("utf-8")


def alpaca_units(path):
    return [s[k] for s in json.loads(read_text(path)) for k in ("instruction", "input", "output")]


def jsonl_units(path):
    return [json.loads(line)["text"] for line in read_text(path).split("\n") if line.strip()]


def stress_strings(specials):
    """Hand-picked edge cases of the split patterns and the BPE."""
    s = [
        "", "a", " ", "Hello world", "Hello, world! How are you?",
        # contractions, case variants and near misses
        "it's don't they're we've I'm you'll he'd", "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
        "It'S dOn'T tHeY'rE wE'vE i'M yOu'Ll He'D", "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
        "'sa 'tx 'rex 'vex 'mx 'llx 'dx", "'x 'r 'v 'l ''s '''", "'ſ 'ſa xſ 'K 'K", "rock'n'roll o'clock",
        "don’t it’s", "'", "''", "x'", " 's", "\n's",
        # digits
        "1", "12", "123", "1234", "12345", "1234567", "123456789012", "3.14159", "1,000,000", "-42", "+7",
        "x1y22z333w4444", " 1 22 333", "1a2b3c", "٣٤٥ ١٢٣ ۱۲۳ १२३ ১২৩", "１２３４", "½ ¼ ⅓ Ⅻ ⅻ ① ⑽ ²³",
        "2024-01-01T12:34:56Z", "0x1F 0b1010 1e-9",
        # white space
        "  ", "   ", "    x", "a  b", "a   b", "a\tb", "a\t\tb", "\t\tx", "a \tb", "a\t b", "trailing   ",
        "trailing\t", "\n", "\n\n", "\n\n\n", "a\nb", "a\n\nb", "a\n \nb", "a \n b", "a  \n  b", "\r\n", "a\r\nb",
        "a\r\n\r\nb", "\r", "a\rb", "x\r\n  y", "  \n", " \n\n", "\n ", "\n  x", "\u00a0x", "\u00a0\u00a0x", "a\u00a0b",
        "\u3000x", "\u2028x", "\u2029\u2029", "\u0085x", "\u1680x", "\u2009x\u200ay", "\u202f\u205f", "\x0b\x0cx",
        "\x1c\x1d\x1e\x1fx", " !", "  !!", "!\n", "!!\n\n", "x!\r\n", " ?!\n\nx",
        # punctuation and symbols
        "(hello)", "[a]{b}<c>", "...", "!!!???", "$100 & 50%", "#hashtag @user", "a+b=c", "C++ C# F#",
        "http://example.com/path?q=1&r=2", "user@example.com", "<html><body>x</body></html>", "--flag=value",
        "\"quoted\" 'single'", "« guillemets » „Anführung“", "—dash–en", "…", "·•°±×÷",
        # non-ASCII scripts
        "café naïve résumé Zürich", "Ünïcödé ÀÉÎÕÜ", "日本語のテキスト", "中文文本，标点。", "한국어 텍스트",
        "Привет, мир! Ёжик", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Γειά σου Κόσμε",
        "ქართული", "Ελληνικά και English mixed 日本", "e\u0301 a\u0300 n\u0303", "e\u0301e\u0301e\u0301",
        "\u0301x", "x\u0301y", "ǅ ǈ ǋ", "ßẞ", "ﬁ ﬂ", "Ǆ", "ı İ",
        # emoji
        "😀", "😀😀😀", "hi 😀!", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇫🇷", "❤️", "1️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
        "x👨‍💻y", "😀 😀  😀",
        # odd and invalid-ish Unicode
        "\x00", "a\x00b", "\x7f", "\ufeffBOM", "zero\u200bwidth", "\u200d", "\u200e\u200f", "\ufe0f",
        "\ufffd", "\uffff", "\ufdd0", "\U0010ffff", "\ue000", "\U000f0000", "\U0001d400\U0001d401",
        "\U00020000\U0002a6df", "\U0003134a", "\U000e0001", "\x01\x02\x03\x04\x05\x06",
        "!\x04!", "a\x04b", "\x13\x14\x16\x1d",
        # long pieces (the BPE's heap path) and long runs
        "a" * 300, "ab" * 200, "x" * 1000, "z" * 129, "9" * 300, " " * 300, "\n" * 200, "\r\n" * 150, "!" * 250,
        " " * 200 + "x", "\t" * 150 + "x", "é" * 200, "日" * 200, "😀" * 100,
        "".join(random.Random(7).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2000)),
        "Pneumonoultramicroscopicsilicovolcanoconiosis", "antidisestablishmentarianism" * 10,
        # code
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
        "if __name__ == '__main__':\n    main()\n", "    \n    \n", "x = {'a': 1, \"b\": [2, 3]}",
        # special-token text
        "<|begin_of_text|>", "<|end_of_text|>", "<|begin_of_text|>Hello<|end_of_text|>",
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "<|reserved_special_token_250|>",
        "<|reserved_special_token_251|>x", "<|im_start|>user\nHello<|im_end|>\n", "<|endoftext|>",
        "<repo_name><reponame><file_sep>", "a<|im_start|>b", "<|im_start|><|im_start|>", "<|im_start",
        "<|begin_of_text", "<|begin_of_text|", "<||>", "<|", "|>", "< |im_start| >", " <|eot_id|> ",
        "<|<|eot_id|>|>", "<jupyter_code>print(1)<jupyter_output>",
    ]
    # Random mixtures of the characters the patterns care about.
    rng = random.Random(1234)
    palette = (list("abcXYZ019 '\t\n\r!?.,-_()") + ["s", "t", "re", "ve", "ll", "d", "m", "S", "LL"]
               + list("éßñ日本語한ЖжΩ") + ["\u00a0", "\u3000", "\u2028", "\u0085", "\u0301", "\u200d", "\ufe0f"]
               + list("٣१１½Ⅻ①") + ["😀", "👍🏽", "🇫🇷", "\U0001d400", "\U00020000", "\x00", "\x04", "\ufffd"]
               + ["ſ", "K", "İ", "ǅ"] + ["<|", "|>", "<"] + list(specials[:3]) + list(specials[-2:]))
    for n in range(300):
        s.append("".join(rng.choice(palette) for _ in range(rng.randint(1, 40 if n < 250 else 400))))
    return s


# ---------------------------------------------------------------------------------------------------------


def cases(data_dir, specials):
    out = []
    for i, text in enumerate(stress_strings(specials)):
        out.append((f"stress{i:03d}", "plain", "inline", text.encode().hex(), [text]))
        out.append((f"stress{i:03d}", "special", "inline", text.encode().hex(), [text]))
    p = lambda f: os.path.join(data_dir, f)  # noqa: E731
    out.append(("wiki_raw", "plain", "file", "wiki_demo.txt", [read_text(p("wiki_demo.txt"))]))
    out.append(("alpaca_raw", "plain", "file", "alpaca_en_demo.json", [read_text(p("alpaca_en_demo.json"))]))
    out.append(("c4_raw", "plain", "file", "c4_demo.jsonl", [read_text(p("c4_demo.jsonl"))]))
    out.append(("alpaca_fields", "plain", "alpaca", "alpaca_en_demo.json", alpaca_units(p("alpaca_en_demo.json"))))
    out.append(("c4_texts", "plain", "jsonl", "c4_demo.jsonl", jsonl_units(p("c4_demo.jsonl"))))
    out.append(("sweep", "plain", "sweep", str(SWEEP_BLOCK), sweep_texts(SWEEP_BLOCK)))
    return out


def encode_units(ref, mode, units):
    if mode == "plain" and len(units) > 1:
        return ref["batch"](units)
    return [ref[mode](u) for u in units]


def write_fixture(path, tok_name, engine, results):
    lines = [f"# reference ids from {engine}; written by scripts/make_tokenizer_fixtures.py", f"tokenizer {tok_name}"]
    for (name, mode, source, arg, _), unit_ids in results:
        lines.append(f"case {name} {mode} {source} {arg}")
        lines.append(f"units {len(unit_ids)}")
        lines += [f"{len(ids)} {fnv1a64(ids):016x}" for ids in unit_ids]
        flat = [i for ids in unit_ids for i in ids]
        stored = flat if source == "inline" else flat[:STORED_IDS]
        lines.append(" ".join(["ids", str(len(stored))] + [str(i) for i in stored]))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def check_loader(kind, src, all_cases, results):
    """Our exporter + scripts/lolcats_tokenizer.py must give the reference ids on every case."""
    import subprocess
    from lolcats_tokenizer import load_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.tok")
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "export_tokenizer.py"), kind, src, out, "--quiet"],
                       check=True)
        tok = load_tokenizer(out)
    bad = 0
    for (name, mode, _, _, units), want in zip(all_cases, results):
        got = [tok.encode(u, parse_special=(mode == "special")) for u in units]
        if got != want:
            bad += 1
            print(f"  loader mismatch: {name} {mode}")
        elif "\x04" not in "".join(units) and any(tok.decode(g) != u for g, u in zip(got, units)):
            bad += 1
            print(f"  loader decode mismatch: {name} {mode}")
    print(f"  lolcats_tokenizer.py: {len(all_cases) - bad} cases agree, {bad} differ")
    return bad == 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", default=os.path.join(root, "assets"))
    ap.add_argument("--data", default=os.path.join(os.environ.get("LOLCATS_SHARED", os.path.join(root, "..", "shared")),
                                                   "data"))
    ap.add_argument("--out", default=os.path.join(root, "test", "fixtures", "tokenizer"))
    ap.add_argument("--check-loader", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ok = True
    for tok_name, make_ref, kind, src in [
            ("llama3", llama3_reference, "llama3", os.path.join(args.assets, "llama3_tokenizer.model")),
            ("smollm2", smollm2_reference, "gguf", os.path.join(args.assets, "SmolLM2-135M-Instruct.Q4_1.gguf"))]:
        ref = make_ref(args.assets)
        all_cases = cases(args.data, ref["specials"])
        results = [encode_units(ref, mode, units) for _, mode, _, _, units in all_cases]
        path = os.path.join(args.out, f"{tok_name}.txt")
        write_fixture(path, tok_name, ref["engine"], [(c, r) for c, r in zip(all_cases, results)])
        n_ids = sum(len(ids) for r in results for ids in r)
        print(f"{path}: {len(all_cases)} cases, {n_ids} reference ids, {os.path.getsize(path)} bytes")
        if args.check_loader:
            ok &= check_loader(kind, src, all_cases, results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
