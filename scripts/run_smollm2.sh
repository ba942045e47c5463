#!/usr/bin/env bash
# The real-model checks on SmolLM2-135M-Instruct (GPU machine; needs torch + transformers for the
# yardsticks): export the GGUF, perplexity of held-out text from transformers and from our CUDA
# forward, then stage 1 with our trainer and with the PyTorch formulation of the published method on
# the same data, steps and seed, and the loss curves of both in one PNG.
# Inputs (environment, with defaults):
#   GGUF       assets/SmolLM2-135M-Instruct.Q4_1.gguf
#   DATA       data/alpaca_smollm2          (scripts/prepare_alpaca.py --tokenizer build/tokenizer/smollm2.tok)
#   PPL_SHARD  data/wiki_smollm2/wiki_demo_train_0000.bin   (--format text on wiki_demo.txt)
#   OUTDIR     out/smollm2    STEPS 150    EVAL_EVERY 10    PPL_SEQS 16 (1024-token windows)
#   SKIP_PPL=1 / SKIP_REF=1 skip the perplexities / the PyTorch run (then no comparison plot)
set -euo pipefail
GGUF=${GGUF:-assets/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-data/alpaca_smollm2}
PPL_SHARD=${PPL_SHARD:-data/wiki_smollm2/wiki_demo_train_0000.bin}
OUTDIR=${OUTDIR:-out/smollm2}
STEPS=${STEPS:-150}
EVAL_EVERY=${EVAL_EVERY:-10}
PPL_SEQS=${PPL_SEQS:-16}
SEED=${SEED:-42}
mkdir -p "$OUTDIR/ours" "$OUTDIR/ref"

python3 scripts/export.py gguf "$GGUF" "$OUTDIR/smollm2.bin" --dtype bf16 --hf-out "$OUTDIR/hf"
if [ "${SKIP_PPL:-0}" != 1 ]; then
echo "== perplexity, ${PPL_SEQS} x 1024 tokens of $PPL_SHARD"
python3 scripts/hf_perplexity.py "$OUTDIR/hf" "$PPL_SHARD" --seq-len 1024 --max-seqs "$PPL_SEQS" --dtype fp32 \
  | tee "$OUTDIR/ppl_transformers.json"
./train_lolcats -m "$OUTDIR/smollm2.bin" -t 1024 -b 8 --eval-ppl "$PPL_SHARD" --max-seqs "$PPL_SEQS" \
  | tee "$OUTDIR/ppl_ours_cuda.json"
fi

echo "== stage 1, ours"
./train_lolcats -m "$OUTDIR/smollm2.bin" -i "$DATA" -o "$OUTDIR/ours" -t 1024 -b 1 -g 8 --steps "$STEPS" \
  --eval-every "$EVAL_EVERY" --schedule constant --seed "$SEED" | tail -n 25
[ "${SKIP_REF:-0}" = 1 ] && exit 0
echo "== stage 1, PyTorch formulation of the published method"
python3 scripts/bench_reference.py train -m "$OUTDIR/smollm2.bin" -i "$DATA" -T 1024 -B 1 --accum 8 --steps "$STEPS" \
  --eval-every "$EVAL_EVERY" --schedule constant --seed "$SEED" --log "$OUTDIR/ref/log.jsonl" --print-every 50 | tail -n 15
python3 scripts/plot_log.py "$OUTDIR/ours/log.jsonl" "$OUTDIR/ref/log.jsonl" --label "lolcats.cu" \
  --label "PyTorch reference" --key loss --key val_loss --logy -o "$OUTDIR/stage1_smollm2.png"
