// train_lolcats.cu: the command-line program. Parses options, loads a model (a .bin file or a random
// preset), and runs one of: stage 1 attention transfer over token shards (the default job),
// perplexity evaluation (--eval-ppl), or a speed benchmark (--bench).
#include <chrono>
#include <string>

#include "dataloader.h"
#include "llama.cuh"

// ------------------------------------------------------------------------------------------------
// Options.

struct Options {
  std::string data_dir;          // -i
  std::string model = "";        // -m: a .bin path or a preset name
  std::string out_dir = "out";   // -o
  int B = 1;                     // -b micro-batch
  int T = 1024;                  // -t sequence length
  int grad_accum = 8;            // -g
  int epochs = 2;
  long long max_steps = -1;      // --steps: optimizer steps (default: epochs over the data)
  float lr = 1e-2f, weight_decay = 0.f, beta1 = 0.9f, beta2 = 0.999f, adam_eps = 1e-8f, clip = 0.f;
  std::string schedule = "plateau";
  int warmup = 0;
  float min_lr = 1e-5f;
  int plateau_patience = 10;
  float plateau_factor = 0.1f;
  int eval_every = 100;
  int val_batches = -1;          // -1: the whole validation split
  int window = 64;
  std::string geometry = "terrace";
  int sinks = 0;
  int feature_dim = 64;
  float mse_factor = 1000.f;
  unsigned long long seed = 42;
  std::string resume;
  std::string log_path;          // default out_dir/log.jsonl
  int save_every = 0;            // 0: only at evals (best) and the end
  std::string eval_ppl;          // --eval-ppl FILE
  long long max_seqs = -1;
  std::string bench;             // --bench forward|stage1
  int bench_steps = 10;
};

static void print_help() {
  printf(
      "usage: train_lolcats -m MODEL [-i DATA_DIR] [options]\n"
      "\n"
      "Linearizes a Llama-family model with LoLCATs. Default job: stage 1 (attention transfer) over the\n"
      "token shards in DATA_DIR (made by scripts/prepare_alpaca.py).\n"
      "\n"
      "model and data:\n"
      "  -m MODEL            model file (.bin, scripts/export.py) or a random-weight preset: %s\n"
      "  -i DIR              directory of token shards (*_train_*.bin, *_val_*.bin)\n"
      "  -o DIR              output directory for checkpoints and the log (default out)\n"
      "  -b B                micro-batch size in sequences (default 1)\n"
      "  -t T                sequence length (default 1024; at most the model's maximum)\n"
      "  -g N                gradient accumulation steps per optimizer step (default 8)\n"
      "  --epochs N          passes over the training split (default 2)\n"
      "  --steps N           stop after N optimizer steps (default: the epochs)\n"
      "  --seed N            data order and initialisation seed (default 42)\n"
      "optimizer (AdamW on the feature maps and window factors):\n"
      "  --lr X (1e-2)  --weight-decay X (0)  --beta1 X (0.9)  --beta2 X (0.999)  --adam-eps X (1e-8)\n"
      "  --clip X            global gradient-norm clipping, 0 = off (default 0, as the reference)\n"
      "  --schedule S        plateau (reference: x0.1 after 10 evals without improvement), cosine, constant\n"
      "  --warmup N          linear warmup steps for cosine (default 0)\n"
      "  --min-lr X          floor of plateau and cosine (default 1e-5)\n"
      "  --plateau-patience N (10)  --plateau-factor X (0.1)\n"
      "  --eval-every N      validate every N optimizer steps, keep the best checkpoint (default 100)\n"
      "  --val-batches N     batches per validation (default: the whole validation split)\n"
      "hybrid attention:\n"
      "  --window W          softmax window (default 64)\n"
      "  --geometry G        terrace (default, what the published runs trained) or sliding\n"
      "  --sinks N           first N tokens always in the softmax part (default 0)\n"
      "  --feature-dim F     Hedgehog feature dimension f, phi has 2f entries (default 64)\n"
      "  --mse-factor X      stage-1 loss = X * mean over layers of the MSE (default 1000)\n"
      "checkpoints and logs:\n"
      "  --resume FILE       continue from a stage-1 checkpoint (bit-exact on the same GPU)\n"
      "  --log FILE          JSON-lines log (default OUT/log.jsonl)\n"
      "  --save-every N      also save a checkpoint every N steps (default: at evaluations and the end)\n"
      "other jobs:\n"
      "  --eval-ppl FILE     print the perplexity of a token shard: non-overlapping T-token windows\n"
      "  --max-seqs N        at most N windows for --eval-ppl (default all)\n"
      "  --bench forward|stage1   time B x T steps on MODEL (random presets are fine), print tokens/s,\n"
      "                      TFLOP/s and peak memory\n"
      "  --bench-steps N     timed steps for --bench (default 10)\n"
      "  -h, --help          this text\n",
      preset_names());
}

static long long parse_int(const std::string& flag, const char* v, long long lo, long long hi) {
  char* end;
  errno = 0;
  long long x = strtoll(v, &end, 10);
  if (errno || *end || end == v) fatal("option %s expects an integer, got '%s'", flag.c_str(), v);
  if (x < lo || x > hi) fatal("option %s must be in [%lld, %lld], got %lld", flag.c_str(), lo, hi, x);
  return x;
}
static float parse_float(const std::string& flag, const char* v, double lo, double hi) {
  char* end;
  errno = 0;
  double x = strtod(v, &end);
  if (errno || *end || end == v || !std::isfinite(x)) fatal("option %s expects a number, got '%s'", flag.c_str(), v);
  if (x < lo || x > hi) fatal("option %s must be in [%g, %g], got %g", flag.c_str(), lo, hi, x);
  return (float)x;
}

static Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") { print_help(); exit(0); }
    if (i + 1 >= argc) fatal("option %s needs a value (or is unknown; see --help)", a.c_str());
    const char* v = argv[++i];
    if (a == "-i") o.data_dir = v;
    else if (a == "-m") o.model = v;
    else if (a == "-o") o.out_dir = v;
    else if (a == "-b") o.B = (int)parse_int(a, v, 1, 1 << 16);
    else if (a == "-t") o.T = (int)parse_int(a, v, 2, 1 << 24);
    else if (a == "-g") o.grad_accum = (int)parse_int(a, v, 1, 1 << 20);
    else if (a == "--epochs") o.epochs = (int)parse_int(a, v, 1, 1 << 20);
    else if (a == "--steps") o.max_steps = parse_int(a, v, 0, 1ll << 40);
    else if (a == "--seed") o.seed = (unsigned long long)parse_int(a, v, 0, 1ll << 62);
    else if (a == "--lr") o.lr = parse_float(a, v, 0, 10);
    else if (a == "--weight-decay") o.weight_decay = parse_float(a, v, 0, 10);
    else if (a == "--beta1") o.beta1 = parse_float(a, v, 0, 0.999999);
    else if (a == "--beta2") o.beta2 = parse_float(a, v, 0, 0.999999999);
    else if (a == "--adam-eps") o.adam_eps = parse_float(a, v, 0, 1);
    else if (a == "--clip") o.clip = parse_float(a, v, 0, 1e9);
    else if (a == "--schedule") o.schedule = v;
    else if (a == "--warmup") o.warmup = (int)parse_int(a, v, 0, 1 << 30);
    else if (a == "--min-lr") o.min_lr = parse_float(a, v, 0, 10);
    else if (a == "--plateau-patience") o.plateau_patience = (int)parse_int(a, v, 0, 1 << 30);
    else if (a == "--plateau-factor") o.plateau_factor = parse_float(a, v, 1e-6, 1);
    else if (a == "--eval-every") o.eval_every = (int)parse_int(a, v, 1, 1 << 30);
    else if (a == "--val-batches") o.val_batches = (int)parse_int(a, v, 1, 1 << 30);
    else if (a == "--window") o.window = (int)parse_int(a, v, 1, 1 << 16);
    else if (a == "--geometry") o.geometry = v;
    else if (a == "--sinks") o.sinks = (int)parse_int(a, v, 0, 1 << 16);
    else if (a == "--feature-dim") o.feature_dim = (int)parse_int(a, v, 1, 64);
    else if (a == "--mse-factor") o.mse_factor = parse_float(a, v, 1e-9, 1e9);
    else if (a == "--resume") o.resume = v;
    else if (a == "--log") o.log_path = v;
    else if (a == "--save-every") o.save_every = (int)parse_int(a, v, 0, 1 << 30);
    else if (a == "--eval-ppl") o.eval_ppl = v;
    else if (a == "--max-seqs") o.max_seqs = parse_int(a, v, 1, 1ll << 40);
    else if (a == "--bench") o.bench = v;
    else if (a == "--bench-steps") o.bench_steps = (int)parse_int(a, v, 1, 1 << 20);
    else fatal("unknown option '%s' (see --help)", a.c_str());
  }
  if (o.model.empty()) fatal("no model given: -m MODEL.bin or a preset (%s)", preset_names());
  if (o.schedule != "plateau" && o.schedule != "cosine" && o.schedule != "constant")
    fatal("unknown --schedule '%s' (plateau, cosine, constant)", o.schedule.c_str());
  if (o.geometry != "terrace" && o.geometry != "sliding")
    fatal("unknown --geometry '%s' (terrace, sliding)", o.geometry.c_str());
  if (!o.bench.empty() && o.bench != "forward" && o.bench != "stage1")
    fatal("unknown --bench '%s' (forward, stage1)", o.bench.c_str());
  if (o.log_path.empty()) o.log_path = o.out_dir + "/log.jsonl";
  return o;
}

// A path that names an existing file is a model file; otherwise the name must be a preset. Only the
// header is read here (on the CPU, before any CUDA call), so every bad input is reported before the
// GPU is touched; the weights are loaded by load_model.
static ModelHeader resolve_model(const Options& o, bool* is_file) {
  FILE* f = fopen(o.model.c_str(), "rb");
  ModelHeader h;
  if (f) {
    h = read_model_header(f, o.model, nullptr);
    fclose(f);
    *is_file = true;
    return h;
  }
  if (!preset_header(o.model, &h)) {
    if (o.model.find('/') != std::string::npos || o.model.find(".bin") != std::string::npos)
      fatal("cannot open model file '%s' (%s)", o.model.c_str(), strerror(errno));
    fatal("model '%s' is neither a readable file nor a preset (%s)", o.model.c_str(), preset_names());
  }
  *is_file = false;
  return h;
}

static LlamaModel load_model(const Options& o, const ModelHeader& h, bool is_file) {
  return is_file ? llama_load(o.model, o.T) : llama_random(h, o.T, o.seed);
}

// ------------------------------------------------------------------------------------------------
// --eval-ppl: the protocol of scripts/hf_perplexity.py: non-overlapping T-token windows from the
// start of the shard (the tail dropped), mean next-token NLL over the T-1 predictions of each window.

static void run_eval_ppl(const Options& o, const LlamaModel& m, Blas& blas) {
  TokenShard shard(o.eval_ppl);
  if (shard.header().vocab_size > (uint32_t)m.V())
    fatal("shard '%s' has vocabulary %u but the model has %d", o.eval_ppl.c_str(), shard.header().vocab_size, m.V());
  long long windows = (long long)shard.n_tokens() / o.T;
  if (o.max_seqs > 0) windows = std::min(windows, o.max_seqs);
  if (windows == 0) fatal("shard '%s' holds fewer than T = %d tokens", o.eval_ppl.c_str(), o.T);
  LlamaActs a = llama_acts_alloc(m, o.B, o.T);
  std::vector<int> toks((size_t)o.B * o.T);
  double nll = 0;
  long long count = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (long long w0 = 0; w0 < windows; w0 += o.B) {
    const int nb = (int)std::min<long long>(o.B, windows - w0);
    a.B = nb;
    for (size_t i = 0; i < (size_t)nb * o.T; i++) toks[i] = (int)shard.tokens()[(size_t)w0 * o.T + i];
    llama_set_tokens(m, a, toks.data(), nullptr, 0);
    llama_forward(blas, m, a, 0);
    long long c;
    nll += llama_nll_sum(a, &c);
    count += c;
  }
  a.B = o.B;
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("{\"ppl\": %.6f, \"nll\": %.6f, \"tokens\": %lld, \"seqs\": %lld, \"seconds\": %.2f}\n", exp(nll / count),
         nll / count, count, windows, secs);
  llama_acts_free(a);
}

// ------------------------------------------------------------------------------------------------
// --bench forward: B x T forward passes (loss included), tokens/s, TFLOP/s, peak memory.

static void run_bench_forward(const Options& o, const LlamaModel& m, Blas& blas) {
  LlamaActs a = llama_acts_alloc(m, o.B, o.T);
  Rng rng(o.seed);
  std::vector<int> toks((size_t)o.B * o.T);
  for (int& t : toks) t = (int)(rng.next() % m.V());
  llama_set_tokens(m, a, toks.data(), nullptr, 0);
  for (int i = 0; i < 2; i++) llama_forward(blas, m, a, 0);  // warm-up: heuristics, caches, clocks
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  GpuTimer timer;
  for (int i = 0; i < o.bench_steps; i++) {
    timer.start();
    llama_forward(blas, m, a, 0);
    ms.push_back(timer.stop_ms());
  }
  std::sort(ms.begin(), ms.end());
  const float med = ms[ms.size() / 2];
  long long cnt;
  const double loss = llama_nll_sum(a, &cnt) / cnt;
  const double toks_s = (double)o.B * o.T / (med / 1e3);
  const double tflops = llama_forward_flops(m, o.B, o.T) / (med / 1e3) / 1e12;
  printf("bench forward: B=%d T=%d  median %.2f ms  %.0f tokens/s  %.1f TFLOP/s  peak %.2f GiB  loss %.4f\n", o.B,
         o.T, med, toks_s, tflops, peak_memory_gib(), loss);
  printf("{\"bench\": \"forward\", \"B\": %d, \"T\": %d, \"ms\": %.3f, \"tokens_per_s\": %.1f, \"tflops\": %.2f, "
         "\"peak_gib\": %.3f, \"loss\": %.5f}\n",
         o.B, o.T, med, toks_s, tflops, peak_memory_gib(), loss);
  llama_acts_free(a);
}

static void stage1_check_inputs(const Options& o, const ModelHeader& h) {
  if (o.data_dir.empty()) fatal("no data directory: -i DIR (token shards from scripts/prepare_alpaca.py)");
  (void)h;
}

static void run_stage1(const Options& o, const LlamaModel& m, Blas& blas) {
  (void)o; (void)m; (void)blas;
  fatal("stage 1 is not built yet");
}

int main(int argc, char** argv) {
  Options o = parse_options(argc, argv);
  bool is_file = false;
  const ModelHeader h = resolve_model(o, &is_file);
  if (o.T > (int)h.max_seq_len) fatal("sequence length %d exceeds the model's maximum %u", o.T, h.max_seq_len);
  if (!o.eval_ppl.empty()) {
    TokenShard probe(o.eval_ppl);  // validated now, before the GPU is touched
    if (probe.header().vocab_size > h.vocab_size)
      fatal("shard '%s' has vocabulary %u but the model has %u", o.eval_ppl.c_str(), probe.header().vocab_size,
            h.vocab_size);
  } else if (o.bench.empty()) {
    stage1_check_inputs(o, h);
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) fatal("no CUDA device found");
  LlamaModel m = load_model(o, h, is_file);
  Blas blas;
  blas.init();
  if (!o.eval_ppl.empty()) {
    run_eval_ppl(o, m, blas);
  } else if (o.bench == "forward") {
    run_bench_forward(o, m, blas);
  } else {
    run_stage1(o, m, blas);
  }
  blas.destroy();
  llama_free(m);
  return 0;
}
