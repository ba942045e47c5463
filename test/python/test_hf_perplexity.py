"""scripts/hf_perplexity.py input checks, which run before torch is imported (CI has no torch): every bad
shard or argument is one line "error: ..." and exit status 1."""
import os
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "hf_perplexity.py")


def write_shard(path, tokens, magic=b"LOLCTOK1", version=1, extra=b""):
    head = magic + struct.pack("<IIQIiiI", version, 50, len(tokens), 0, 1, 2, 0)
    with open(path, "wb") as f:
        f.write(head + bytes(64 - len(head)) + np.asarray(tokens, "<u4").tobytes() + extra)


def test_bad_inputs(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    good = str(tmp_path / "good.bin")
    write_shard(good, np.arange(100) % 50)
    cases = []
    p = str(tmp_path / "magic.bin")
    write_shard(p, np.arange(100), magic=b"LOLCTOKX")
    cases.append(([str(hf), p, "--seq-len", "8"], "bad magic"))
    p = str(tmp_path / "version.bin")
    write_shard(p, np.arange(100), version=2)
    cases.append(([str(hf), p, "--seq-len", "8"], "unsupported token shard version 2"))
    p = str(tmp_path / "trailing.bin")
    write_shard(p, np.arange(100), extra=b"xx")
    cases.append(([str(hf), p, "--seq-len", "8"], "header implies"))
    cases.append(([str(hf), str(tmp_path / "none.bin"), "--seq-len", "8"], "no such file"))
    cases.append(([str(hf), good, "--seq-len", "1"], "--seq-len must be at least 2"))
    cases.append(([str(hf), good, "--seq-len", "101"], "fewer than one window"))
    cases.append(([str(tmp_path), good, "--seq-len", "8"], "has no config.json"))
    for args, message in cases:
        r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert message in lines[0], (args, lines[0])
