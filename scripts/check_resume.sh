#!/usr/bin/env bash
# Resume must be exact: run stage 1 for 2N steps straight, and for N steps then --resume to 2N, and
# compare the logged losses, gradient norms and validation losses of steps N+1..2N bit for bit.
# Usage: scripts/check_resume.sh MODEL.bin DATA_DIR OUT_DIR [N] [T]
set -euo pipefail
model=$1; data=$2; out=$3; n=${4:-4}; t=${5:-1024}
rm -rf "$out/straight" "$out/resumed"
mkdir -p "$out"
common=(-m "$model" -i "$data" -t "$t" -b 1 -g 2 --eval-every "$n" --schedule constant --seed 7)
./train_lolcats "${common[@]}" -o "$out/straight" --steps $((2 * n)) > "$out/straight.txt"
./train_lolcats "${common[@]}" -o "$out/resumed" --steps "$n" > "$out/resumed_1.txt"
./train_lolcats "${common[@]}" -o "$out/resumed" --steps $((2 * n)) --resume "$out/resumed/stage1_last.ckpt" > "$out/resumed_2.txt"
python3 - "$out/straight/log.jsonl" "$out/resumed/log.jsonl" "$n" <<'PY'
import json, sys
def rows(path, n):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("step", 0) > n:
            out.setdefault(r["step"], {}).update({k: r[k] for k in ("loss", "grad_norm", "val_loss") if k in r})
    return out
a, b, n = rows(sys.argv[1], int(sys.argv[3])), rows(sys.argv[2], int(sys.argv[3])), int(sys.argv[3])
assert a and a.keys() == b.keys(), (a.keys(), b.keys())
bad = [(s, a[s], b[s]) for s in a if a[s] != b[s]]
for s in sorted(a): print(f"step {s}: straight {a[s]}  resumed {b[s]}")
print("RESUME EXACT" if not bad else f"RESUME DIFFERS at {len(bad)} steps")
sys.exit(1 if bad else 0)
PY
