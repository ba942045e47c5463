"""Tests of scripts/plot_log.py: synthetic JSON-lines logs (train and eval lines, a metadata line, a torn last
line) drawn to PNG, through the command line as a user runs it; bad input gives one error line. matplotlib only."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "plot_log.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import plot_log  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, steps, scale, eval_every=10, torn_tail=False):
    """A stage-1-like log: metadata line, a train line per step, an eval line every eval_every steps."""
    with open(path, "w") as f:
        f.write(json.dumps({"run": {"impl": "test", "lr": 1e-2}}) + "\n")
        f.write(json.dumps({"step": 0, "val_loss": 50.0 * scale}) + "\n")
        for s in range(1, steps + 1):
            loss = scale * (5.0 + 45.0 * math.exp(-s / 15.0))
            f.write(json.dumps({"step": s, "loss": loss, "lr": 1e-2, "tokens_per_s": 1000.0 + s}) + "\n")
            if s % eval_every == 0:
                f.write(json.dumps({"step": s, "val_loss": loss * 1.05, "best_val_loss": loss * 1.05}) + "\n")
        if torn_tail:
            f.write('{"step": 61, "loss": 4.')  # a log still being written


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True)


def assert_png(path):
    assert os.path.exists(path)
    assert os.path.getsize(path) > 1000  # a real image, not an empty or stub file
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_two_logs_default_keys(tmp_path):
    ours, ref = tmp_path / "ours.jsonl", tmp_path / "reference.jsonl"
    write_log(ours, 60, 1.0, torn_tail=True)
    write_log(ref, 60, 1.1)
    out = tmp_path / "curves.png"
    r = run(str(ours), str(ref), "-o", str(out), "--logy", "--title", "stage 1")
    assert r.returncode == 0, r.stderr
    assert "loss, val_loss" in r.stdout
    assert_png(out)


def test_explicit_key_labels_smoothing(tmp_path):
    log = tmp_path / "run.jsonl"
    write_log(log, 40, 1.0)
    out = tmp_path / "lr.png"
    r = run(str(log), "-o", str(out), "--key", "tokens_per_s", "--key", "loss", "--label", "lolcats.cu",
            "--smooth", "5", "--x", "step")
    assert r.returncode == 0, r.stderr
    assert_png(out)


def test_series_skips_bad_lines_and_keeps_last_duplicate():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "val_loss": 1.0},
            {"loss": 9.0}, {"step": 1, "loss": 2.5}, {"step": True, "loss": 1.0}, {"step": 4, "loss": "x"}]
    assert plot_log.series(rows, "step", "loss") == ([1], [2.5])
    assert plot_log.series(rows, "step", "val_loss") == ([3], [1.0])
    assert plot_log.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


@pytest.mark.parametrize("case", ["missing_file", "no_values", "label_count", "unknown_key"])
def test_bad_input_is_one_error_line(tmp_path, case):
    good = tmp_path / "good.jsonl"
    write_log(good, 10, 1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"run": {}}\nnot json\n')
    out = str(tmp_path / "x.png")
    argv = {"missing_file": [str(tmp_path / "absent.jsonl"), "-o", out],
            "no_values": [str(empty), "-o", out],
            "label_count": [str(good), "-o", out, "--label", "a", "--label", "b"],
            "unknown_key": [str(good), "-o", out, "--key", "no_such_key"]}[case]
    r = run(*argv)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not os.path.exists(out)
