#!/usr/bin/env bash
# bench_tokenizer.sh: encode speed of our C++ tokenizer (tokenizer.h) against tiktoken on one core each,
# in the same run, on the same text (default: wiki_demo.txt of the shared data), with the Llama 3
# tokenizer; both encode the whole file as one string with special-token text as plain text
# (tiktoken: encode_ordinary in one thread). Also checks that both give the same ids (FNV-1a 64).
# Usage: scripts/bench_tokenizer.sh [TEXT_FILE] [REPEATS=10]
# Needs assets/llama3_tokenizer.model (scripts/fetch_assets.sh), g++ and tiktoken.
set -euo pipefail
cd "$(dirname "$0")/.."
text=${1:-${LOLCATS_SHARED:-../shared}/data/wiki_demo.txt}
repeats=${2:-10}
build=${LOLCATS_BUILD:-build}
python=${PYTHON:-python3}
mkdir -p "$build/tokenizer" dev/build
tok="$build/tokenizer/llama3.tok"
if [ ! -s "$tok" ] || [ assets/llama3_tokenizer.model -nt "$tok" ] || [ scripts/export_tokenizer.py -nt "$tok" ]; then
  "$python" scripts/export_tokenizer.py llama3 assets/llama3_tokenizer.model "$tok" --quiet
fi
bin=dev/build/bench_tokenizer
if [ ! -x "$bin" ] || [ dev/bench_tokenizer.cpp -nt "$bin" ] || [ tokenizer.h -nt "$bin" ] || [ tokenizer_unicode.h -nt "$bin" ]; then
  ${CXX:-g++} -O2 -march=native -std=c++17 -I. dev/bench_tokenizer.cpp -o "$bin"
fi
# One core each: the C++ benchmark is single-threaded; tiktoken's Rust core runs in the calling thread.
ours=$(taskset -c 0 "$bin" "$tok" "$text" "$repeats" 2>&1 || "$bin" "$tok" "$text" "$repeats")
theirs=$(RAYON_NUM_THREADS=1 taskset -c 0 "$python" - "$text" "$repeats" <<'EOF' 2>&1
import base64, sys, time
sys.path.insert(0, "scripts")
import tiktoken
from lolcats_tokenizer import LLAMA3_PATTERN
from export_tokenizer import llama3_special_names
ranks = {}
for line in open("assets/llama3_tokenizer.model", "rb"):
    if line.strip():
        t, r = line.split()
        ranks[base64.b64decode(t)] = int(r)
enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                        special_tokens={s: len(ranks) + i for i, s in enumerate(llama3_special_names())})
text = open(sys.argv[1], "rb").read().decode("utf-8")
repeats = int(sys.argv[2])
times = []
for _ in range(repeats):
    t = time.perf_counter()
    ids = enc.encode_ordinary(text)
    times.append(time.perf_counter() - t)
h = 0xCBF29CE484222325
for i in ids:
    for b in i.to_bytes(4, "little"):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
mb = len(text.encode()) / 1e6
print(f"tiktoken {tiktoken.__version__} (encode_ordinary, 1 thread): {len(text.encode())} bytes -> {len(ids)} tokens, "
      f"fnv {h:016x}")
print(f"  first pass:         {mb / times[0]:7.2f} MB/s  {len(ids) / times[0]:10.0f} tokens/s")
if repeats > 1:
    s = sum(times[1:]) / (repeats - 1)
    print(f"  later ({repeats - 1} passes):  {mb / s:7.2f} MB/s  {len(ids) / s:10.0f} tokens/s")
EOF
)
echo "$ours"
echo "$theirs"
fnv_ours=$(echo "$ours" | sed -n 's/.*fnv \([0-9a-f]*\).*/\1/p')
fnv_theirs=$(echo "$theirs" | sed -n 's/.*fnv \([0-9a-f]*\).*/\1/p')
if [ "$fnv_ours" = "$fnv_theirs" ]; then echo "ids: identical"; else echo "ids: DIFFERENT"; exit 1; fi
