#!/usr/bin/env python3
"""plot_log.py: draw loss curves from JSON-lines training logs into a PNG.

    plot_log.py LOG [LOG ...] -o OUT.png [--key loss --key val_loss] [--label NAME ...] [--logy]
                [--x step|tokens|elapsed_s] [--smooth N] [--title TEXT]

Reads the logs train_lolcats and scripts/bench_reference.py write (one JSON object per line; every line that
plots has "step"; train lines carry "loss", "lr", "tokens_per_s"; eval lines carry "val_loss"). Each --key
(default: loss and val_loss, those present) gets its own panel, side by side, with one line per log; a log
lacking a key is left out of that panel. Labels are the file names without extension unless --label is given
(once per log, in order). --logy uses a log-scale y axis; --smooth N draws a trailing moving average over N
points (the raw curve faint behind it). Lines that are not JSON objects, lack "step" or the key, or hold a
non-finite value are skipped; a log with no usable line for any key is an error.
Needs matplotlib only (Agg backend, no display). Every failure is one line "error: ..." and exit status 1.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read_log(path):
    """All JSON objects of a JSON-lines file (non-object and unparsable lines skipped: a log being written
    may end in half a line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        die(f"cannot read log '{path}' ({e.strerror})")
    except UnicodeDecodeError:
        die(f"log '{path}' is not UTF-8 text")
    rows = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def series(rows, xkey, ykey):
    """(xs, ys) of the rows holding both keys with finite numbers, sorted by x (a resumed run may repeat
    steps: the later line wins)."""
    points = {}
    for r in rows:
        x, y = r.get(xkey), r.get(ykey)
        if isinstance(x, bool) or isinstance(y, bool):
            continue
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            points[x] = y
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def moving_average(ys, n):
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= n:
            acc -= ys[i - n]
        out.append(acc / min(i + 1, n))
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description="JSON-lines training logs -> PNG loss curves")
    ap.add_argument("logs", nargs="+", help="JSON-lines log files")
    ap.add_argument("-o", "--out", required=True, help="output PNG")
    ap.add_argument("--key", action="append", help="value to plot (repeatable; default loss and val_loss)")
    ap.add_argument("--label", action="append", help="legend label per log, in order (default: file names)")
    ap.add_argument("--x", default="step", help="x axis key (default step; tokens and elapsed_s also work)")
    ap.add_argument("--logy", action="store_true", help="log-scale y axis")
    ap.add_argument("--smooth", type=int, default=0, help="moving average over N points (0 = off)")
    ap.add_argument("--title", default="", help="figure title")
    args = ap.parse_args(argv)
    if args.label and len(args.label) != len(args.logs):
        die(f"{len(args.label)} --label for {len(args.logs)} logs: give one per log or none")
    if args.smooth < 0:
        die("--smooth must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    labels = args.label or [os.path.splitext(os.path.basename(p))[0] for p in args.logs]
    logs = [read_log(p) for p in args.logs]
    keys = args.key or [k for k in ("loss", "val_loss") if any(series(rows, args.x, k)[0] for rows in logs)]
    if not keys:
        die(f"no line with '{args.x}' and 'loss' or 'val_loss' in {', '.join(args.logs)} (choose values with --key)")
    for path, rows in zip(args.logs, logs):
        if not any(series(rows, args.x, k)[0] for k in keys):
            die(f"log '{path}' has no line with '{args.x}' and any of {', '.join(keys)}")

    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        drawn = 0
        for label, rows in zip(labels, logs):
            xs, ys = series(rows, args.x, key)
            if not xs:
                continue
            if args.logy and any(y <= 0 for y in ys):
                keep = [(x, y) for x, y in zip(xs, ys) if y > 0]  # log scale cannot show them
                xs, ys = [x for x, _ in keep], [y for _, y in keep]
            if args.smooth > 1 and len(ys) > 1:
                line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
                ax.plot(xs, moving_average(ys, args.smooth), color=line.get_color(), linewidth=1.6, label=label)
            else:
                ax.plot(xs, ys, linewidth=1.6, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
            drawn += 1
        if drawn == 0:
            die(f"no log has values for '{key}'")
        if args.logy:
            ax.set_yscale("log")
        ax.set_xlabel(args.x)
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        die(f"output directory '{out_dir}' does not exist")
    try:
        fig.savefig(args.out, dpi=120)
    except OSError as e:
        die(f"cannot write '{args.out}' ({e.strerror})")
    plt.close(fig)
    print(f"wrote {args.out} ({', '.join(keys)}; {len(logs)} log{'s' if len(logs) > 1 else ''})")


if __name__ == "__main__":
    main()
