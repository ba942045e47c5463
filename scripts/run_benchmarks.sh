#!/usr/bin/env bash
# Speed benchmarks on one GPU, ours and the PyTorch yardstick in the same call (random weights of the
# real Llama 3 8B shapes). Prints one JSON line per measurement; BENCHMARKS.md records the results.
# Needs a built ./train_lolcats and dev/build/hybrid_attention, and torch + transformers.
# WHAT (default "forward stage1 attention") picks the groups.
set -uo pipefail
WHAT=${WHAT:-forward stage1 attention}
for w in $WHAT; do
  case $w in
    forward)
      ./train_lolcats -m llama3_8b --bench forward -b 8 -t 1024 --bench-steps 10
      python3 scripts/bench_reference.py forward -B 8 -T 1024 ;;
    stage1)
      ./train_lolcats -m llama3_8b --bench stage1 -b 8 -t 1024 --bench-steps 10
      ./train_lolcats -m llama3_8b --bench stage1 -b 2 -t 4096 --bench-steps 10
      python3 scripts/bench_reference.py stage1 --configs 8x1024 2x4096 ;;
    attention)
      dev/build/hybrid_attention
      python3 scripts/bench_reference.py attention ;;
    *) echo "unknown group $w"; exit 1 ;;
  esac
done
