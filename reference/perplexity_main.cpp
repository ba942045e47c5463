// reference/perplexity_main.cpp: perplexity of a token shard under the CPU reference forward, with the
// protocol of train_lolcats --eval-ppl and scripts/hf_perplexity.py (non-overlapping T-token windows
// from the start of the shard, mean next-token NLL over the T-1 predictions of each window).
// Usage: build/ref_perplexity MODEL.bin SHARD.bin T [MAX_WINDOWS]
#include <cstdio>

#include "dataloader.h"
#include "reference/llama_ref.h"

int main(int argc, char** argv) {
  if (argc < 4) fatal("usage: ref_perplexity MODEL.bin SHARD.bin T [MAX_WINDOWS]");
  HostModel m = load_host_model(argv[1]);
  TokenShard shard(argv[2]);
  const int T = atoi(argv[3]);
  if (T < 2 || T > (int)m.h.max_seq_len) fatal("T must be in [2, %u]", m.h.max_seq_len);
  if (shard.header().vocab_size > m.h.vocab_size) fatal("shard vocabulary %u exceeds the model's %u", shard.header().vocab_size, m.h.vocab_size);
  long long windows = (long long)shard.n_tokens() / T;
  if (argc > 4) windows = std::min(windows, atoll(argv[4]));
  if (windows <= 0) fatal("shard holds fewer than T = %d tokens", T);
  double nll = 0;
  long long count = 0;
  std::vector<int> toks(T);
  std::vector<float> logits;
  for (long long w = 0; w < windows; w++) {
    for (int i = 0; i < T; i++) toks[i] = (int)shard.tokens()[(size_t)w * T + i];
    ref::llama_forward(m, toks.data(), 1, T, logits);
    double s;
    long long c;
    ref::next_token_loss(logits.data(), toks.data(), nullptr, 1, T, m.h.vocab_size, &s, &c);
    nll += s;
    count += c;
    fprintf(stderr, "\rwindow %lld/%lld  running ppl %.4f", w + 1, windows, exp(nll / count));
  }
  fprintf(stderr, "\n");
  printf("{\"ppl\": %.6f, \"nll\": %.6f, \"tokens\": %lld, \"seqs\": %lld}\n", exp(nll / count), nll / count, count, windows);
  return 0;
}
