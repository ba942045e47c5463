// stage1.cuh: stage 1 of LoLCATs, attention transfer, on the GPU: the trained state (feature maps
// and window factors with their AdamW state), one micro-batch of teacher-vs-hybrid MSE with its
// backward, the FLOP count, and the checkpoint format. The loop around it (data, schedule, logging,
// evaluation) is in train_lolcats.cu; the CPU oracle of a micro-batch is reference/stage1_ref.h.
#pragma once
#include <functional>
#include <chrono>

#include "dataloader.h"
#include "llama.cuh"
#include "optim.cuh"
#include "reference/stage1_ref.h"

// Stage 1: attention transfer (../shared/LOLCATS.md §2). Every weight of the model is frozen; the
// trained parameters are, per layer, the Hedgehog maps Wq, Wk (H, d, f) and the window-factor logits
// w (H), in one flat fp32 buffer (the layout of reference/stage1_ref.h). Per micro-batch and layer:
// q, k, v -> teacher softmax attention y_true -> hybrid attention with the MSE fused (its output y is
// not stored: only the loss, dy and the row statistics are) -> its
// backward into the feature-map gradients -> the TEACHER's output continues through o_proj and the
// MLP. Nothing crosses layers, so one layer's activations are live at a time; the last layer's
// o_proj/MLP and the LM head are skipped (nothing uses them).

inline const char kStage1Magic[8] = {'L', 'O', 'L', 'C', 'S', '1', 'C', 'K'};
inline const uint32_t kStage1Version = 1;

// Checkpoint header (1024 bytes, then fp32 master[n], m[n], v[n]). The model's shape is recorded so
// a checkpoint of another model is refused.
#pragma pack(push, 1)
struct Stage1CheckpointHeader {
  char magic[8];             // "LOLCS1CK"
  uint32_t version;          // kStage1Version
  uint32_t n_layers, n_heads, n_kv_heads, head_dim, dim, vocab_size;
  uint32_t feature_dim, window, geometry, sinks;
  uint64_t n_params;         // trained parameters (= n_layers * (2 H d f + H))
  int64_t opt_step;          // optimizer steps taken
  uint64_t tokens_seen;      // training tokens consumed
  double best_val_loss;      // best validation loss so far (+inf before the first evaluation)
  double mse_factor;
  LoaderPosition train_pos;  // where the training stream continues
  AdamWHyper hyper;
  LrSchedule schedule;
};
#pragma pack(pop)
static_assert(sizeof(Stage1CheckpointHeader) <= 1024, "stage-1 checkpoint header must fit 1024 bytes");

// What stage 1 is configured with (the CLI fills it from its options).
struct Stage1Config {
  int feature_dim = 64, window = 64, geometry = HYBRID_TERRACE, sinks = 0;
  double mse_factor = 1000.0;
  bool overlap = true;  // each layer's hybrid attention on a second stream, beside the next layer's work
  AdamWHyper hyper;
  LrSchedule schedule = lr_schedule_plateau(1e-2);
};

struct Stage1 {
  HybridAttnParams hp;
  int L = 0;
  size_t hdf = 0, per_layer = 0;
  AdamW opt;                  // master (n) fp32, grad (n) fp32, moments; one buffer for all layers
  bf16* params_bf16 = nullptr;// (n) bf16 copy of the masters: the kernels read Wq, Wk from here
  void* saved_mem = nullptr;  // one layer's HybridAttnSaved (forward -> backward of the same layer)
  HybridAttnSaved saved;
  void* workspace = nullptr;  // hybrid scratch, shared by all layers
  float* layer_mse = nullptr; // (L) per-layer MSE, summed over the micro-batches since the last reset
  LrSchedule sched;
  double mse_factor = 1000.0;   // loss = mse_factor * mean over layers of the MSE
  double best_val = INFINITY;
  uint64_t tokens_seen = 0;
  // Overlap (Stage1Config::overlap). The hybrid attention of layer l only reads that layer's q, k, v and
  // teacher output and writes the feature-map gradients: nothing downstream waits for it. So it runs on
  // `side` while the main stream goes on with layer l+1 (o_proj, MLP, projections, teacher), which fills
  // the SMs that one kernel's tail or launch gap leaves idle. Layer l's inputs must survive layer l+1's
  // writes: the layers alternate between two sets of q, k, v, att buffers (set 0 is the LlamaActs' own).
  bool overlap = false;
  cudaStream_t side = nullptr;
  bf16* set1 = nullptr;        // q (B, T, H, d) | k, v (B, T, Hkv, d) | att (B, T, H, d): the second set
  cudaEvent_t start_ev = nullptr, done_ev = nullptr;
  cudaEvent_t inputs_ready[2] = {nullptr, nullptr}, inputs_free[2] = {nullptr, nullptr};
};

inline HybridAttnWeights stage1_weights(const Stage1& s, int l) {
  HybridAttnWeights w;
  w.Wq = s.params_bf16 + s.per_layer * l;
  w.Wk = w.Wq + s.hdf;
  w.w = s.opt.master + s.per_layer * l + 2 * s.hdf;  // window factors are read in fp32
  return w;
}

inline Stage1 stage1_create(const Stage1Config& o, const LlamaModel& m, int B, int T) {
  Stage1 s;
  const ModelHeader& h = m.h;
  s.L = h.n_layers;
  s.hp.B = B; s.hp.T = T; s.hp.H = h.n_heads; s.hp.Hkv = h.n_kv_heads; s.hp.d = h.head_dim;
  s.hp.f = o.feature_dim; s.hp.window = o.window; s.hp.sinks = o.sinks;
  s.hp.geometry = o.geometry;
  hybrid_check_params(s.hp);
  s.hdf = (size_t)h.n_heads * h.head_dim * o.feature_dim;
  s.per_layer = ref::stage1_params_per_layer(h.n_heads, h.head_dim, o.feature_dim);
  adamw_create(&s.opt, s.per_layer * s.L, o.hyper);
  std::vector<float> init = ref::stage1_init_params(s.L, h.n_heads, h.head_dim, o.feature_dim);
  adamw_set_params(&s.opt, init.data());
  s.params_bf16 = cuda_alloc<bf16>(s.opt.n);
  adamw_write_bf16(&s.opt, s.params_bf16);
  s.saved_mem = cuda_alloc<char>(hybrid_saved_bytes(s.hp, true));
  s.saved = hybrid_saved_carve(s.saved_mem, s.hp, true);
  s.workspace = cuda_alloc<char>(hybrid_workspace_bytes(s.hp, /*input_grads=*/false));  // stage 1 asks for no dq, dk, dv
  s.layer_mse = cuda_alloc<float>(s.L);
  CUDA_CHECK(cudaMemset(s.layer_mse, 0, s.L * sizeof(float)));
  s.sched = o.schedule;
  s.mse_factor = o.mse_factor;
  s.overlap = o.overlap;
  if (s.overlap) {
    const size_t N = (size_t)B * T, q = N * h.n_heads * h.head_dim, kv = N * h.n_kv_heads * h.head_dim;
    s.set1 = cuda_alloc<bf16>(2 * q + 2 * kv);
    CUDA_CHECK(cudaStreamCreateWithFlags(&s.side, cudaStreamNonBlocking));
    for (cudaEvent_t* e : {&s.start_ev, &s.done_ev, &s.inputs_ready[0], &s.inputs_ready[1], &s.inputs_free[0],
                           &s.inputs_free[1]})
      CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  }
  return s;
}

inline void stage1_destroy(Stage1& s) {
  adamw_destroy(&s.opt);
  cuda_free(s.params_bf16);
  cuda_free(s.saved_mem);
  cuda_free(s.workspace);
  cuda_free(s.layer_mse);
  if (s.overlap) {
    cuda_free(s.set1);
    for (cudaEvent_t e : {s.start_ev, s.done_ev, s.inputs_ready[0], s.inputs_ready[1], s.inputs_free[0], s.inputs_free[1]})
      CUDA_CHECK(cudaEventDestroy(e));
    CUDA_CHECK(cudaStreamDestroy(s.side));
  }
}

// One micro-batch (tokens already in a.tokens): per-layer MSE added into s.layer_mse; with train,
// feature-map gradients accumulated into s.opt.grad.
// after_layer (tests) runs after each layer's hybrid attention, while a.q, a.k, a.v and a.att still hold
// that layer's inputs and teacher output.
inline void stage1_micro_batch(Stage1& s, Blas& blas, const LlamaModel& m, LlamaActs& a, bool train,
                               cudaStream_t st, const std::function<void(int)>& after_layer = nullptr) {
  const size_t N = (size_t)a.B * a.T, nq = N * m.h.n_heads * m.h.head_dim, nkv = N * m.h.n_kv_heads * m.h.head_dim;
  bf16* const set0[4] = {a.q, a.k, a.v, a.att};
  bf16* set1[4] = {nullptr, nullptr, nullptr, nullptr};
  if (s.overlap) {
    set1[0] = s.set1; set1[1] = s.set1 + nq; set1[2] = set1[1] + nkv; set1[3] = set1[2] + nkv;
  }
  // The hybrid's stream: it starts after what the main stream did before (parameter upload, zeroed
  // gradients, reset MSE sums).
  cudaStream_t hs = s.overlap ? s.side : st;
  if (s.overlap) {
    CUDA_CHECK(cudaEventRecord(s.start_ev, st));
    CUDA_CHECK(cudaStreamWaitEvent(s.side, s.start_ev, 0));
  }
  llama_embed(m, a, st);
  for (int l = 0; l < s.L; l++) {
    const int set = s.overlap ? l % 2 : 0;
    bf16* const* use = set ? set1 : set0;
    a.q = use[0]; a.k = use[1]; a.v = use[2]; a.att = use[3];
    // Layer l-2's hybrid read this set: wait for it before overwriting.
    if (s.overlap && l >= 2) CUDA_CHECK(cudaStreamWaitEvent(st, s.inputs_free[set], 0));
    llama_layer_qkv(blas, m, l, a, st);
    softmax_attention_forward(a.att, nullptr, a.q, a.k, a.v, a.B, a.T, m.h.n_heads, m.h.n_kv_heads, m.h.head_dim, st);
    if (s.overlap) {
      CUDA_CHECK(cudaEventRecord(s.inputs_ready[set], st));
      CUDA_CHECK(cudaStreamWaitEvent(s.side, s.inputs_ready[set], 0));
    }
    HybridStage1Loss loss;
    loss.y_true = a.att;
    loss.grad_scale = (float)(s.mse_factor / s.L);
    loss.mse = s.layer_mse + l;
    const HybridAttnWeights w = stage1_weights(s, l);
    hybrid_attention_forward(s.hp, a.q, a.k, a.v, w, nullptr, s.saved, s.workspace, &loss, hs);
    if (train) {
      HybridAttnGrads g;
      float* gl = s.opt.grad + s.per_layer * l;
      g.dWq = gl; g.dWk = gl + s.hdf; g.dw = gl + 2 * s.hdf;
      hybrid_attention_backward(s.hp, a.q, a.k, a.v, w, nullptr, nullptr, s.saved, s.workspace, g, hs);
    }
    if (s.overlap) CUDA_CHECK(cudaEventRecord(s.inputs_free[set], s.side));
    if (after_layer) {
      if (s.overlap) CUDA_CHECK(cudaStreamSynchronize(s.side));
      after_layer(l);
    }
    if (l + 1 < s.L) llama_layer_finish(blas, m, l, a, st);  // the teacher's output goes on
  }
  a.q = set0[0]; a.k = set0[1]; a.v = set0[2]; a.att = set0[3];
  if (s.overlap) {  // the main stream's later work (loss read-back, optimizer) sees every layer's gradients
    CUDA_CHECK(cudaEventRecord(s.done_ev, s.side));
    CUDA_CHECK(cudaStreamWaitEvent(st, s.done_ev, 0));
  }
}

// Per-layer mean MSE over `batches` micro-batches, read back and reset.
inline std::vector<double> stage1_take_layer_mse(Stage1& s, int batches, cudaStream_t st) {
  std::vector<float> sum(s.L);
  CUDA_CHECK(cudaMemcpyAsync(sum.data(), s.layer_mse, s.L * sizeof(float), cudaMemcpyDeviceToHost, st));
  CUDA_CHECK(cudaMemsetAsync(s.layer_mse, 0, s.L * sizeof(float), st));
  CUDA_CHECK(cudaStreamSynchronize(st));
  std::vector<double> r(s.L);
  for (int l = 0; l < s.L; l++) r[l] = (double)sum[l] / batches;
  return r;
}
inline double stage1_loss_of(const std::vector<double>& layer_mse, double factor) {
  double t = 0;
  for (double v : layer_mse) t += v;
  return factor * t / layer_mse.size();
}

// FLOPs of one stage-1 micro-batch, for TFLOP/s and MFU: the frozen model's matmuls (the last layer's
// o_proj and MLP skipped), the teacher's causal attention, and the hybrid forward + backward counted as
// 3x its forward (window scores and values over the <= 2w window keys, the four feature-map matmuls,
// and the state update and readout of the linear part).
inline double stage1_flops(const LlamaModel& m, int B, int T, int f, int window) {
  const double N = (double)B * T, H = m.h.n_heads, d = m.h.head_dim, L = m.h.n_layers;
  const double qkv = (double)m.D() * (m.Q() + 2 * m.KV()), rest = (double)m.Q() * m.D() + 3.0 * m.D() * m.F();
  double flops = 2.0 * N * (qkv * L + rest * (L - 1));
  flops += L * 2.0 * 2.0 * B * H * ((double)T * (T + 1) / 2) * d;
  const double win_keys = std::min<double>(T, 1.5 * window);
  const double hybrid_fwd = N * H * (2.0 * 2.0 * win_keys * d + 2.0 * 2.0 * d * f * 2.0 + 2.0 * 2.0 * (2.0 * f) * d);
  flops += L * 3.0 * hybrid_fwd;
  return flops;
}

inline std::string json_array(const std::vector<double>& v) {
  std::string s = "[";
  char buf[32];
  for (size_t i = 0; i < v.size(); i++) {
    snprintf(buf, sizeof buf, "%s%.6g", i ? ", " : "", v[i]);
    s += buf;
  }
  return s + "]";
}

inline void stage1_save(const Stage1& s, const LlamaModel& m, const LoaderPosition& pos,
                        const std::string& path) {
  Stage1CheckpointHeader hd;
  memset(&hd, 0, sizeof hd);
  memcpy(hd.magic, kStage1Magic, 8);
  hd.version = kStage1Version;
  hd.n_layers = m.h.n_layers; hd.n_heads = m.h.n_heads; hd.n_kv_heads = m.h.n_kv_heads; hd.head_dim = m.h.head_dim;
  hd.dim = m.h.dim; hd.vocab_size = m.h.vocab_size;
  hd.feature_dim = s.hp.f; hd.window = s.hp.window; hd.geometry = s.hp.geometry; hd.sinks = s.hp.sinks;
  hd.n_params = s.opt.n; hd.opt_step = s.opt.step; hd.tokens_seen = s.tokens_seen; hd.best_val_loss = s.best_val;
  hd.mse_factor = s.mse_factor; hd.train_pos = pos; hd.hyper = s.opt.hyper; hd.schedule = s.sched;
  std::vector<float> master, mom, vel;
  adamw_download_state(&s.opt, &master, &mom, &vel);
  const std::string tmp = path + ".tmp";
  FILE* f = open_or_die(tmp, "wb");
  std::vector<char> block(1024, 0);
  memcpy(block.data(), &hd, sizeof hd);
  write_or_die(block.data(), block.size(), f, tmp);
  write_or_die(master.data(), master.size() * 4, f, tmp);
  write_or_die(mom.data(), mom.size() * 4, f, tmp);
  write_or_die(vel.data(), vel.size() * 4, f, tmp);
  commit_tmp_file(f, tmp, path);
}

// Read a checkpoint's header and check it against a model header (host only: the CLI calls this
// before touching the GPU, so a checkpoint of another model is refused at once).
inline Stage1CheckpointHeader stage1_read_header(const std::string& path, const ModelHeader& mh, long long* size_out) {
  FILE* f = open_or_die(path, "rb");
  const long long size = file_size_or_die(f, path);
  std::vector<char> block(1024);
  if (size < 1024) fatal("checkpoint '%s' is truncated (%lld bytes)", path.c_str(), size);
  read_or_die(block.data(), 1024, f, path, "the checkpoint header");
  fclose(f);
  Stage1CheckpointHeader hd;
  memcpy(&hd, block.data(), sizeof hd);
  if (memcmp(hd.magic, kStage1Magic, 8) != 0) fatal("'%s' is not a stage-1 checkpoint (bad magic)", path.c_str());
  if (hd.version != kStage1Version) fatal("checkpoint '%s' has version %u, expected %u", path.c_str(), hd.version, kStage1Version);
  if (hd.n_layers != mh.n_layers || hd.n_heads != mh.n_heads || hd.n_kv_heads != mh.n_kv_heads ||
      hd.head_dim != mh.head_dim || hd.dim != mh.dim || hd.vocab_size != mh.vocab_size)
    fatal("checkpoint '%s' is from another model (%u layers, %u heads, dim %u, vocab %u; this one has %u, %u, %u, %u)",
          path.c_str(), hd.n_layers, hd.n_heads, hd.dim, hd.vocab_size, mh.n_layers, mh.n_heads, mh.dim, mh.vocab_size);
  if (size != 1024 + 3 * (long long)hd.n_params * 4)
    fatal("checkpoint '%s' has %lld bytes, expected %lld (truncated or corrupt)", path.c_str(), size,
          1024 + 3 * (long long)hd.n_params * 4);
  if (size_out) *size_out = size;
  return hd;
}

// Load a checkpoint into the trained state (validated against this model and these hybrid settings).
inline Stage1CheckpointHeader stage1_load(Stage1& s, const LlamaModel& m, const std::string& path) {
  Stage1CheckpointHeader hd = stage1_read_header(path, m.h, nullptr);
  if ((int)hd.feature_dim != s.hp.f || (int)hd.window != s.hp.window || (int)hd.geometry != s.hp.geometry ||
      (int)hd.sinks != s.hp.sinks)
    fatal("checkpoint '%s' was trained with other hybrid settings (f %u, window %u, geometry %u, sinks %u)", path.c_str(),
          hd.feature_dim, hd.window, hd.geometry, hd.sinks);
  if (hd.n_params != s.opt.n) fatal("checkpoint '%s' holds %llu parameters, expected %zu", path.c_str(),
                                    (unsigned long long)hd.n_params, s.opt.n);
  FILE* f = open_or_die(path, "rb");
  if (fseeko(f, 1024, SEEK_SET) != 0) fatal("cannot seek in '%s'", path.c_str());
  std::string err = lr_schedule_validate(hd.schedule);
  if (!err.empty()) fatal("checkpoint '%s': %s", path.c_str(), err.c_str());
  std::vector<float> master(hd.n_params), mom(hd.n_params), vel(hd.n_params);
  read_or_die(master.data(), master.size() * 4, f, path, "the parameters");
  read_or_die(mom.data(), mom.size() * 4, f, path, "the first moments");
  read_or_die(vel.data(), vel.size() * 4, f, path, "the second moments");
  fclose(f);
  for (float v : master)
    if (!std::isfinite(v)) fatal("checkpoint '%s' holds non-finite parameters", path.c_str());
  adamw_upload_state(&s.opt, hd.opt_step, master.data(), mom.data(), vel.data());
  s.opt.hyper = hd.hyper;
  adamw_write_bf16(&s.opt, s.params_bf16);
  s.sched = hd.schedule;
  s.best_val = hd.best_val_loss;
  s.tokens_seen = hd.tokens_seen;
  return hd;
}

