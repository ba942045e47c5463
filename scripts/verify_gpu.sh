#!/usr/bin/env bash
# The GPU machine's verification, in one call: the GPU test suite, the NaN-stop and resume checks, the
# 8B-shape benchmarks with their PyTorch yardsticks, and the hybrid-attention table. Needs the built
# ./train_lolcats, build/test_gpu, build/fixtures, dev/build/hybrid_attention, torch + transformers.
# Usage: scripts/verify_gpu.sh SHARDS [OUT_DIR]   (SHARDS: token shards of stories260K's vocabulary, T >= 256)
# Full outputs go to OUT_DIR (default verify_out); a summary is printed.
set -uo pipefail
shards=$1; out=${2:-verify_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
./build/test_gpu > "$out/test_gpu.txt" 2>&1; echo "test_gpu rc=$?"
grep -E "logits rel|own inputs|PASSED|FAILED|tests ran" "$out/test_gpu.txt" | head -30
{ bash scripts/check_nan_stop.sh build/fixtures/stories260k.bin "$shards" /tmp/lolcats_nan 256 2>&1 | tail -1
  bash scripts/check_resume.sh build/fixtures/stories260k.bin "$shards" /tmp/lolcats_resume 4 256 2>&1 | tail -1; } > "$out/checks.txt"
cat "$out/checks.txt"
WHAT="forward stage1" bash scripts/run_benchmarks.sh > "$out/bench_8b.txt" 2>&1
grep -E "^bench|^  |tokens_per_s" "$out/bench_8b.txt" | grep -v '^{"bench"' | head -60
{ dev/build/hybrid_attention 2 3; python3 scripts/bench_reference.py attention; } > "$out/attention.txt" 2>&1
grep -E "fwd\+bwd|^ *[0-9]+ +[0-9]+ " "$out/attention.txt" | head -40
