// bench_tokenizer.cpp: encode speed of tokenizer.h on one core: a text file encoded REPEATS times, the
// first pass with an empty pre-token cache (cold) reported apart from the rest (warm). Prints MB/s and
// tokens/s, and the FNV-1a 64 of the ids so a caller can check them against another encoder.
// Build: g++ -O2 -march=native -std=c++17 -I. dev/bench_tokenizer.cpp -o dev/build/bench_tokenizer
// (scripts/bench_tokenizer.sh builds it and runs it next to tiktoken). Not a .cu: dev/Makefile skips it.
// Usage: bench_tokenizer FILE.tok TEXT_FILE [REPEATS=10]
#include <chrono>

#include "tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 3) fatal("usage: bench_tokenizer FILE.tok TEXT_FILE [REPEATS]");
  int repeats = argc > 3 ? atoi(argv[3]) : 10;
  if (repeats < 1) fatal("REPEATS must be at least 1");
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto t0 = now();
  Tokenizer tok(argv[1]);
  double load_s = std::chrono::duration<double>(now() - t0).count();
  FILE* f = open_or_die(argv[2], "rb");
  std::string text((size_t)file_size_or_die(f, argv[2]), '\0');
  read_or_die(&text[0], text.size(), f, argv[2], "the text");
  fclose(f);

  std::vector<int> ids;
  ids.reserve(text.size());
  double cold_s = 0, warm_s = 0;
  for (int r = 0; r < repeats; r++) {
    ids.clear();
    auto t = now();
    tok.encode_append(text.data(), text.size(), ids);
    double s = std::chrono::duration<double>(now() - t).count();
    (r == 0 ? cold_s : warm_s) += s;
  }
  uint64_t h = 0xCBF29CE484222325ull;
  for (int id : ids)
    for (int b = 0; b < 4; b++) h = (h ^ (((uint32_t)id >> (8 * b)) & 0xFF)) * 0x100000001B3ull;
  double mb = text.size() / 1e6;
  printf("ours (%s, tokenizer.h): load %.0f ms; %zu bytes -> %zu tokens, fnv %016llx\n", tok.name.c_str(),
         load_s * 1e3, text.size(), ids.size(), (unsigned long long)h);
  printf("  cold (empty cache): %7.2f MB/s  %10.0f tokens/s\n", mb / cold_s, ids.size() / cold_s);
  if (repeats > 1) {
    double s = warm_s / (repeats - 1);
    printf("  warm (%d passes):   %7.2f MB/s  %10.0f tokens/s\n", repeats - 1, mb / s, ids.size() / s);
  }
  return 0;
}
