#!/usr/bin/env bash
# The NaN/Inf stop on a GPU: stage 1 with one feature-map gradient of LAYER poisoned at STEP
# (LOLCATS_DEBUG_NAN_AT) must exit non-zero with a message naming that layer and step, leave the last
# good checkpoint (from the validation before STEP) loadable, and a resume from it must run on.
# Usage: scripts/check_nan_stop.sh MODEL.bin DATA_DIR OUT_DIR [T]
set -uo pipefail
model=$1; data=$2; out=$3; t=${4:-256}
rm -rf "$out"; mkdir -p "$out"
common=(-m "$model" -i "$data" -t "$t" -b 1 -g 1 --eval-every 2 --schedule constant --seed 7 -o "$out/run")
LOLCATS_DEBUG_NAN_AT=3:1 ./train_lolcats "${common[@]}" --steps 6 > "$out/nan.txt" 2>&1
rc=$?
tail -2 "$out/nan.txt"
fail() { echo "NAN STOP FAILED: $*"; exit 1; }
[ $rc -ne 0 ] || fail "exit code 0"
grep -q "non-finite feature-map gradient in layer 1 at step 3" "$out/nan.txt" || fail "message does not name layer 1, step 3"
grep -q '"step": 3' "$out/run/log.jsonl" && fail "step 3 was logged as if it had trained"
./train_lolcats "${common[@]}" --steps 4 --resume "$out/run/stage1_last.ckpt" > "$out/resume.txt" 2>&1 || fail "resume from the last good checkpoint failed: $(tail -1 "$out/resume.txt")"
grep -q "step      4/4" "$out/resume.txt" || fail "resume did not reach step 4"
echo "NAN STOP OK (exit $rc, named layer 1 step 3, resumed from step 2 to 4)"
