// train_lolcats.cu: the command-line program. Parses options, loads a model (a .bin file or a random
// preset), and runs one of: stage 1 attention transfer over token shards (the default job),
// perplexity evaluation (--eval-ppl), or a speed benchmark (--bench).
#include <sys/stat.h>

#include <chrono>
#include <memory>
#include <string>

#include "dataloader.h"
#include "llama.cuh"
#include "stage1.cuh"

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
  int overlap = 1;       // stage 1: each layer's hybrid attention on a second stream
  int tune_matmuls = 0;  // off: on the H200 it measured no gain inside the model (BENCHMARKS.md)
};

// The matmul tuning cache: $LOLCATS_CACHE_DIR/matmul_tuning.txt, else ~/.cache/lolcats/...; "" (no cache,
// tuning still runs) when neither folder can be made.
static std::string tuning_cache_path() {
  std::string dir;
  if (const char* e = getenv("LOLCATS_CACHE_DIR")) {
    dir = e;
  } else if (const char* home = getenv("HOME")) {
    mkdir((std::string(home) + "/.cache").c_str(), 0755);
    dir = std::string(home) + "/.cache/lolcats";
  } else {
    return "";
  }
  mkdir(dir.c_str(), 0755);  // may exist already
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return "";
  return dir + "/matmul_tuning.txt";
}

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
      "  --overlap 0|1       run each layer's hybrid attention on a second stream beside the next layer's\n"
      "                      frozen-model work (default 1; same results either way, 0 only for timing)\n"
      "checkpoints and logs:\n"
      "  --resume FILE       continue from a stage-1 checkpoint (bit-exact on the same GPU)\n"
      "  --log FILE          JSON-lines log (default OUT/log.jsonl)\n"
      "  --save-every N      also save a checkpoint every N steps (default: at evaluations and the end)\n"
      "other jobs:\n"
      "  --eval-ppl FILE     print the perplexity of a token shard: non-overlapping T-token windows\n"
      "  --max-seqs N        at most N windows for --eval-ppl (default all)\n"
      "  --bench forward|stage1   time B x T steps on MODEL (random presets are fine), print tokens/s,\n"
      "                      TFLOP/s, peak memory and each piece's time\n"
      "  --bench-steps N     timed steps for --bench (default 10)\n"
      "  --tune-matmuls 0|1  time cuBLASLt's candidate algorithms per matmul shape at first use and keep\n"
      "                      the fastest (default 0); the choices are remembered in\n"
      "                      $LOLCATS_CACHE_DIR/matmul_tuning.txt (default ~/.cache/lolcats) so later runs,\n"
      "                      --resume included, compute the same bits\n"
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
    else if (a == "--tune-matmuls") o.tune_matmuls = (int)parse_int(a, v, 0, 1);
    else if (a == "--overlap") o.overlap = (int)parse_int(a, v, 0, 1);
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
// Where a step's time goes: pieces of one layer timed alone (10 runs each, on the buffers the benchmark
// just used, so the inputs are real), each scaled by how often a step runs it.
struct TimedPiece {
  const char* name;
  double flops;  // per run (0: not a FLOP-bound piece)
  int times;     // runs per step
  std::function<void()> fn;
};
static void print_breakdown(const char* what, const std::vector<TimedPiece>& pieces, double step_ms) {
  GpuTimer timer;
  double total = 0;
  printf("breakdown of a %s step (ms per run x runs per step):\n", what);
  for (const TimedPiece& p : pieces) {
    p.fn();  // warm
    timer.start();
    for (int r = 0; r < 10; r++) p.fn();
    const double ms = timer.stop_ms() / 10;
    total += ms * p.times;
    printf("  %-24s %8.3f ms x %-3d = %8.2f ms", p.name, ms, p.times, ms * p.times);
    if (p.flops > 0) printf("   %6.1f TFLOP/s", p.flops / (ms / 1e3) / 1e12);
    printf("\n");
  }
  printf("  %-24s %36.2f ms of the measured %.2f ms\n", "sum", total, step_ms);
}

static void print_forward_breakdown(const LlamaModel& m, LlamaActs& a, Blas& blas, double step_ms) {
  const int N = a.B * a.T, D = m.D(), F = m.F(), O = m.Q() + 2 * m.KV(), L = (int)m.h.n_layers;
  const LlamaLayerWeights& W = m.layers[0];
  const double attn_flops = 2.0 * 2.0 * a.B * m.h.n_heads * ((double)a.T * (a.T + 1) / 2) * m.h.head_dim;
  print_breakdown("forward", {
      {"rmsnorm", 0, 2 * L, [&] { rmsnorm_forward(a.xn, a.x, W.attn_norm, N, D, m.h.norm_eps, 0); }},
      {"qkv matmul", 2.0 * N * D * O, L, [&] { linear_forward(blas, a.qkv, CUDA_R_16BF, O, a.xn, W.wqkv, N, D, O, false, 0); }},
      {"rope+split", 0, L, [&] { llama_rope_split(m, a, 0); }},
      {"attention", attn_flops, L, [&] { softmax_attention_forward(a.att, nullptr, a.q, a.k, a.v, a.B, a.T, m.h.n_heads,
                                                                    m.h.n_kv_heads, m.h.head_dim, 0); }},
      {"o matmul (+= x)", 2.0 * N * m.Q() * D, L, [&] { linear_forward(blas, a.x, CUDA_R_32F, D, a.att, W.wo, N, m.Q(), D, true, 0); }},
      {"gate|up matmul", 2.0 * N * D * 2 * F, L, [&] { linear_forward(blas, a.gu, CUDA_R_16BF, 2 * F, a.xn, W.w_gate_up, N, D, 2 * F, false, 0); }},
      {"swiglu", 0, L, [&] { llama_swiglu(a, F, 0); }},
      {"down matmul (+= x)", 2.0 * N * F * D, L, [&] { linear_forward(blas, a.x, CUDA_R_32F, D, a.hmlp, W.w_down, N, F, D, true, 0); }},
      {"head + CE (norm incl.)", 2.0 * N * D * m.V(), 1, [&] { llama_head_loss(blas, m, a, 0); }},
  }, step_ms);
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
  print_forward_breakdown(m, a, blas, med);
  llama_acts_free(a);
}

static Stage1Config stage1_config_from(const Options& o) {
  Stage1Config c;
  c.feature_dim = o.feature_dim; c.window = o.window; c.sinks = o.sinks;
  c.geometry = o.geometry == "sliding" ? HYBRID_SLIDING : HYBRID_TERRACE;
  c.mse_factor = o.mse_factor;
  c.overlap = o.overlap != 0;
  c.hyper.beta1 = o.beta1; c.hyper.beta2 = o.beta2; c.hyper.eps = o.adam_eps; c.hyper.weight_decay = o.weight_decay;
  c.hyper.max_grad_norm = o.clip;
  if (o.schedule == "plateau")
    c.schedule = lr_schedule_plateau(o.lr, o.plateau_factor, o.plateau_patience, 1e-4, 0, o.min_lr);
  else if (o.schedule == "cosine")
    c.schedule = lr_schedule_cosine(o.lr, o.min_lr, o.warmup, o.warmup);  // total steps set once the data is known
  else
    c.schedule = lr_schedule_constant(o.lr);
  return c;
}

static void stage1_check_inputs(const Options& o, const ModelHeader& h) {
  if (o.data_dir.empty()) fatal("no data directory: -i DIR (token shards from scripts/prepare_alpaca.py)");
  for (const char* split : {"train", "val"}) {
    std::vector<std::string> shards = list_shards(o.data_dir, split);
    TokenShard first(shards[0]);
    if (first.header().vocab_size != h.vocab_size)
      fatal("shards in '%s' have vocabulary %u but the model has %u (prepared with another tokenizer?)",
            o.data_dir.c_str(), first.header().vocab_size, h.vocab_size);
    if (first.header().seq_len != 0 && (int)first.header().seq_len != o.T)
      fatal("shards in '%s' hold %u-token sequences but -t is %d (pass -t %u or re-run the preparer)",
            o.data_dir.c_str(), first.header().seq_len, o.T, first.header().seq_len);
  }
  if (!o.resume.empty()) stage1_read_header(o.resume, h, nullptr);
  if (o.window != HYBRID_WINDOW) fatal("--window %d is not supported by the kernels (only %d)", o.window, HYBRID_WINDOW);
  if (o.sinks > HYBRID_MAX_SINKS) fatal("--sinks %d exceeds the kernels' maximum %d", o.sinks, HYBRID_MAX_SINKS);
  if (o.T <= 2 * o.window && o.geometry == "terrace")
    fprintf(stderr, "warning: T = %d leaves no linear region with a terrace window of %d: nothing to train\n", o.T,
            o.window);
}

static std::string fmt_duration(double secs) {
  char buf[32];
  if (!std::isfinite(secs) || secs < 0) return "?";
  if (secs >= 3600) snprintf(buf, sizeof buf, "%dh%02dm", (int)(secs / 3600), (int)fmod(secs / 60, 60));
  else snprintf(buf, sizeof buf, "%dm%02ds", (int)(secs / 60), (int)fmod(secs, 60));
  return buf;
}

static double device_peak_tflops() { return 792.0; }  // measured bf16 GEMM ceiling of one H200 (BENCHMARKS.md)

static void run_stage1(const Options& o, const LlamaModel& m, Blas& blas) {
  cudaStream_t st = 0;
  const bool bench = o.bench == "stage1";
  std::unique_ptr<DataLoader> train, val;
  if (!bench) {
    train.reset(new DataLoader(o.data_dir, "train", o.B, o.T, 0, 1, o.seed, true));
    val.reset(new DataLoader(o.data_dir, "val", o.B, o.T, 0, 1, o.seed, false));
  }
  LlamaActs a = llama_acts_alloc(m, o.B, o.T, 1);  // stage 1 never runs the LM head
  Stage1 s = stage1_create(stage1_config_from(o), m, o.B, o.T);
  const double flops_micro = stage1_flops(m, o.B, o.T, o.feature_dim, o.window);
  int32_t *h_inputs = nullptr, *h_targets = nullptr;
  uint8_t* h_mask = nullptr;
  const size_t N = (size_t)o.B * o.T;
  CUDA_CHECK(cudaMallocHost(&h_inputs, N * 4));
  CUDA_CHECK(cudaMallocHost(&h_targets, N * 4));
  CUDA_CHECK(cudaMallocHost(&h_mask, N));
  // The pinned batch buffer is reused: before the loader overwrites it, the previous asynchronous
  // upload from it must have happened (otherwise a queued copy would read the NEXT batch's tokens).
  cudaEvent_t h2d_done;
  CUDA_CHECK(cudaEventCreateWithFlags(&h2d_done, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(h2d_done, st));
  auto upload_next = [&](DataLoader& loader) {
    CUDA_CHECK(cudaEventSynchronize(h2d_done));
    loader.next(h_inputs, h_targets, h_mask);
    CUDA_CHECK(cudaMemcpyAsync(a.tokens, h_inputs, N * 4, cudaMemcpyHostToDevice, st));
    CUDA_CHECK(cudaEventRecord(h2d_done, st));
  };

  if (bench) {
    // Random tokens; each timed step = one micro-batch forward + backward + optimizer step.
    Rng rng(o.seed);
    for (size_t i = 0; i < N; i++) h_inputs[i] = (int)(rng.next() % m.V());
    CUDA_CHECK(cudaMemcpy(a.tokens, h_inputs, N * 4, cudaMemcpyHostToDevice));
    auto step = [&]() {
      adamw_zero_grad(&s.opt, st);
      stage1_micro_batch(s, blas, m, a, true, st);
      adamw_step(&s.opt, (float)lr_schedule_lr(s.sched, s.opt.step), 1.f, s.params_bf16, st);
    };
    for (int i = 0; i < 2; i++) step();
    CUDA_CHECK(cudaDeviceSynchronize());
    stage1_take_layer_mse(s, 1, st);
    std::vector<float> ms;
    GpuTimer timer;
    for (int i = 0; i < o.bench_steps; i++) {
      timer.start(st);
      step();
      ms.push_back(timer.stop_ms(st));
    }
    std::sort(ms.begin(), ms.end());
    const float med = ms[ms.size() / 2];
    const double loss = stage1_loss_of(stage1_take_layer_mse(s, o.bench_steps, st), o.mse_factor);
    const double toks = N / (med / 1e3), tflops = flops_micro / (med / 1e3) / 1e12;
    printf("bench stage1: B=%d T=%d  median %.2f ms  %.0f tokens/s  %.1f TFLOP/s  peak %.2f GiB  loss %.4f\n", o.B,
           o.T, med, toks, tflops, peak_memory_gib(), loss);
    printf("{\"bench\": \"stage1\", \"B\": %d, \"T\": %d, \"ms\": %.3f, \"tokens_per_s\": %.1f, \"tflops\": %.2f, "
           "\"peak_gib\": %.3f, \"loss\": %.5f}\n", o.B, o.T, med, toks, tflops, peak_memory_gib(), loss);
    // The stage-1 pieces of one layer (the frozen model's matmuls and norms are as in --bench forward).
    const HybridAttnWeights w0 = stage1_weights(s, 0);
    HybridStage1Loss loss0;
    loss0.y_true = a.att; loss0.grad_scale = 1.f; loss0.mse = s.layer_mse;
    HybridAttnGrads g0;
    g0.dWq = s.opt.grad; g0.dWk = s.opt.grad + s.hdf; g0.dw = s.opt.grad + 2 * s.hdf;
    const int L = s.L;
    print_breakdown("stage-1", {
        {"teacher attention", 0, L, [&] { softmax_attention_forward(a.att, nullptr, a.q, a.k, a.v, a.B, a.T, m.h.n_heads,
                                                                     m.h.n_kv_heads, m.h.head_dim, st); }},
        {"hybrid fwd + MSE", 0, L, [&] { hybrid_attention_forward(s.hp, a.q, a.k, a.v, w0, nullptr, s.saved, s.workspace,
                                                                  &loss0, st); }},
        {"hybrid bwd (maps)", 0, L, [&] { hybrid_attention_backward(s.hp, a.q, a.k, a.v, w0, nullptr, nullptr, s.saved,
                                                                    s.workspace, g0, st); }},
        {"AdamW step", 0, 1, [&] { adamw_step(&s.opt, 0.f, 1.f, s.params_bf16, st); }},
    }, med);
  } else {
    if (train->vocab_size() != (uint32_t)m.V())
      fatal("training shards have vocabulary %u but the model has %d", train->vocab_size(), m.V());
    const uint64_t micro_per_epoch = train->steps_for_epochs(1);
    const long long total_steps =
        o.max_steps >= 0 ? o.max_steps : (long long)((train->steps_for_epochs(o.epochs) + o.grad_accum - 1) / o.grad_accum);
    if (o.schedule == "cosine") s.sched.total_steps = total_steps;
    std::string err = lr_schedule_validate(s.sched);
    if (!err.empty()) fatal("%s", err.c_str());
    if (!o.resume.empty()) {
      Stage1CheckpointHeader hd = stage1_load(s, m, o.resume);
      train->restore(hd.train_pos);
      printf("resumed from %s at step %lld (%llu tokens seen, best val %.5f)\n", o.resume.c_str(),
             (long long)s.opt.step, (unsigned long long)s.tokens_seen, s.best_val);
    }
    const std::string mkdir_cmd = "mkdir -p '" + o.out_dir + "'";
    if (system(mkdir_cmd.c_str()) != 0) fatal("cannot create output directory '%s'", o.out_dir.c_str());
    FILE* log = fopen(o.log_path.c_str(), o.resume.empty() ? "w" : "a");
    if (!log) fatal("cannot open log file '%s' (%s)", o.log_path.c_str(), strerror(errno));
    if (o.resume.empty())
      fprintf(log, "{\"run\": {\"model\": \"%s\", \"data\": \"%s\", \"B\": %d, \"T\": %d, \"grad_accum\": %d, \"lr\": %g, "
              "\"schedule\": \"%s\", \"geometry\": \"%s\", \"window\": %d, \"sinks\": %d, \"feature_dim\": %d, "
              "\"seed\": %llu, \"total_steps\": %lld, \"params\": %zu}}\n",
              o.model.c_str(), o.data_dir.c_str(), o.B, o.T, o.grad_accum, o.lr, o.schedule.c_str(),
              o.geometry.c_str(), o.window, o.sinks, o.feature_dim, (unsigned long long)o.seed, total_steps, s.opt.n);
    printf("stage 1: %d layers, %zu trained parameters, %llu train sequences (%llu micro-batches an epoch), "
           "%llu val sequences, %lld optimizer steps of %d x %d x %d tokens\n",
           s.L, s.opt.n, (unsigned long long)train->n_sequences(), (unsigned long long)micro_per_epoch,
           (unsigned long long)val->n_sequences(), total_steps, o.grad_accum, o.B, o.T);
    const std::string best_path = o.out_dir + "/stage1_best.ckpt", last_path = o.out_dir + "/stage1_last.ckpt";

    auto evaluate = [&]() {
      val->reset();
      uint64_t batches = val->whole_steps_per_epoch();
      if (o.val_batches > 0) batches = std::min<uint64_t>(batches, o.val_batches);
      if (batches == 0) fatal("the validation split holds fewer than B = %d sequences", o.B);
      for (uint64_t i = 0; i < batches; i++) {
        upload_next(*val);
        stage1_micro_batch(s, blas, m, a, false, st);
      }
      std::vector<double> lm = stage1_take_layer_mse(s, (int)batches, st);
      const double v = stage1_loss_of(lm, o.mse_factor);
      for (int l = 0; l < s.L; l++)
        if (!std::isfinite(lm[l])) fatal("validation MSE of layer %d is %g at step %lld", l, lm[l], (long long)s.opt.step);
      const bool improved = v < s.best_val;
      if (improved) s.best_val = v;
      const bool reduced = lr_schedule_on_eval(s.sched, v);
      fprintf(log, "{\"step\": %lld, \"tokens\": %llu, \"val_loss\": %.17g, \"best_val_loss\": %.17g, \"val_layer_mse\": %s}\n",
              (long long)s.opt.step, (unsigned long long)s.tokens_seen, v, s.best_val, json_array(lm).c_str());
      fflush(log);
      printf("step %6lld | val loss %.5f (mean layer MSE %.3e)%s%s\n", (long long)s.opt.step, v, v / o.mse_factor,
             improved ? " | best" : "", reduced ? " | lr reduced" : "");
      stage1_save(s, m, train->position(), last_path);
      if (improved) stage1_save(s, m, train->position(), best_path);
    };

    if (o.resume.empty()) evaluate();  // step 0: the identity-initialised maps
    // Fault injection for scripts/check_nan_stop.sh: LOLCATS_DEBUG_NAN_AT=STEP:LAYER poisons one gradient
    // of LAYER at STEP with NaN, so the stop below can be exercised on a GPU. Not a user option.
    long long nan_step = -1;
    int nan_layer = 0;
    if (const char* e = getenv("LOLCATS_DEBUG_NAN_AT")) {
      if (sscanf(e, "%lld:%d", &nan_step, &nan_layer) != 2 || nan_layer < 0 || nan_layer >= s.L)
        fatal("LOLCATS_DEBUG_NAN_AT='%s' is not STEP:LAYER with 0 <= LAYER < %d", e, s.L);
    }
    auto t_start = std::chrono::steady_clock::now();
    const long long first_step = s.opt.step;
    while (s.opt.step < total_steps) {
      auto t0 = std::chrono::steady_clock::now();
      adamw_zero_grad(&s.opt, st);
      for (int micro = 0; micro < o.grad_accum; micro++) {
        upload_next(*train);
        stage1_micro_batch(s, blas, m, a, true, st);
      }
      if (s.opt.step + 1 == nan_step)
        CUDA_CHECK(cudaMemsetAsync(s.opt.grad + s.per_layer * nan_layer + 1, 0xff, sizeof(float), st));  // NaN
      const std::vector<double> lm = stage1_take_layer_mse(s, o.grad_accum, st);
      for (int l = 0; l < s.L; l++)
        if (!std::isfinite(lm[l]))
          fatal("layer %d's MSE is %g at step %lld; stopping (last good checkpoint: %s)", l, lm[l],
                (long long)s.opt.step + 1, last_path.c_str());
      const GradNormResult gn = adamw_grad_norm(&s.opt, 1.f / o.grad_accum, st);
      if (gn.nonfinite) {
        std::vector<float> g = download_f32(s.opt.grad, s.opt.n);
        size_t bad = 0;
        while (bad < g.size() && std::isfinite(g[bad])) bad++;
        fatal("non-finite feature-map gradient in layer %zu at step %lld; stopping (last good checkpoint: %s)",
              bad / s.per_layer, (long long)s.opt.step + 1, last_path.c_str());
      }
      const double lr = lr_schedule_lr(s.sched, s.opt.step);
      adamw_step(&s.opt, (float)lr, 1.f / o.grad_accum, s.params_bf16, st);
      CUDA_CHECK(cudaStreamSynchronize(st));
      s.tokens_seen += (uint64_t)o.grad_accum * N;
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      const double loss = stage1_loss_of(lm, o.mse_factor);
      int worst = 0;
      double mn = lm[0], mx = lm[0];
      for (int l = 0; l < s.L; l++) {
        if (lm[l] > mx) { mx = lm[l]; worst = l; }
        mn = std::min(mn, lm[l]);
      }
      const double toks = o.grad_accum * N / dt, tflops = o.grad_accum * flops_micro / dt / 1e12;
      const double eta = elapsed / (s.opt.step - first_step) * (total_steps - s.opt.step);
      printf("step %6lld/%lld | loss %.5f | layer MSE min %.2e mean %.2e max %.2e (layer %d) | lr %.2e | %.0f tok/s | "
             "MFU %.1f%% | %.1f GiB | ETA %s\n",
             (long long)s.opt.step, total_steps, loss, mn, loss / o.mse_factor, mx, worst, lr, toks,
             100.0 * tflops / device_peak_tflops(), peak_memory_gib(), fmt_duration(eta).c_str());
      fprintf(log, "{\"step\": %lld, \"tokens\": %llu, \"loss\": %.17g, \"lr\": %.6g, \"grad_norm\": %.9g, "
              "\"layer_mse_min\": %.6g, \"layer_mse_max\": %.6g, \"worst_layer\": %d, \"tokens_per_s\": %.1f, "
              "\"tflops\": %.2f, \"peak_gib\": %.3f, \"elapsed_s\": %.2f}\n",
              (long long)s.opt.step, (unsigned long long)s.tokens_seen, loss, lr, gn.norm, mn, mx, worst, toks, tflops,
              peak_memory_gib(), elapsed);
      fflush(log);
      if (s.opt.step % o.eval_every == 0 || s.opt.step == total_steps) evaluate();
      else if (o.save_every > 0 && s.opt.step % o.save_every == 0) stage1_save(s, m, train->position(), last_path);
    }
    fclose(log);
    printf("done: best validation loss %.5f, checkpoint %s\n", s.best_val, best_path.c_str());
  }
  CUDA_CHECK(cudaEventDestroy(h2d_done));
  CUDA_CHECK(cudaFreeHost(h_inputs));
  CUDA_CHECK(cudaFreeHost(h_targets));
  CUDA_CHECK(cudaFreeHost(h_mask));
  stage1_destroy(s);
  llama_acts_free(a);
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
  blas.init(o.tune_matmuls != 0, o.tune_matmuls ? tuning_cache_path() : "");
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
