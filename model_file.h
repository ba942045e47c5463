// model_file.h: the lolcats model file (.bin): header layout, tensor order, validation, and a
// host loader into fp32. Both the CPU reference and the CUDA model read weights through this.
//
// Layout (little-endian):
//   ModelHeader (256 bytes, below)
//   tensors, densely packed, each row-major, all of one dtype (fp32 or bf16), in this order:
//     tok_embeddings (vocab, dim)
//     for each layer l in 0..n_layers-1:
//       attn_norm (dim)
//       wq (n_heads*head_dim, dim)      q/k rows in the rotate-half ("HF") RoPE layout
//       wk (n_kv_heads*head_dim, dim)
//       wv (n_kv_heads*head_dim, dim)
//       wo (dim, n_heads*head_dim)
//       ffn_norm (dim)
//       w_gate (ffn_dim, dim)
//       w_up (ffn_dim, dim)
//       w_down (dim, ffn_dim)
//     final_norm (dim)
//     lm_head (vocab, dim)              absent when tied_embeddings = 1 (then lm_head = tok_embeddings)
//   Linear weights are (out_features, in_features): y = x W^T, as PyTorch stores them.
// The file size must equal 256 + n_elements * dtype_size exactly; anything else is refused.
#pragma once
#include "common.h"

#include <array>

static const char kModelMagic[8] = {'L', 'O', 'L', 'C', 'M', 'D', 'L', '1'};
static const uint32_t kModelVersion = 1;
enum ModelDtype : uint32_t { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum RopeScaling : uint32_t { ROPE_NONE = 0, ROPE_LLAMA3 = 1 };

#pragma pack(push, 1)
struct ModelHeader {
  char magic[8];                // "LOLCMDL1"
  uint32_t version;             // kModelVersion
  uint32_t dtype;               // ModelDtype of every tensor
  uint32_t vocab_size;
  uint32_t n_layers;
  uint32_t dim;                 // hidden size
  uint32_t n_heads;             // query heads
  uint32_t n_kv_heads;          // key/value heads (GQA), divides n_heads
  uint32_t head_dim;            // usually dim / n_heads, stored explicitly (Mistral-style models differ)
  uint32_t ffn_dim;             // SwiGLU intermediate size
  uint32_t max_seq_len;         // longest sequence the model accepts
  uint32_t tied_embeddings;     // 1: the LM head is tok_embeddings
  uint32_t rope_scaling;        // RopeScaling
  float rope_theta;
  float rope_factor;            // Llama 3.1 scaling fields (ignored when rope_scaling = ROPE_NONE)
  float rope_low_freq_factor;
  float rope_high_freq_factor;
  uint32_t rope_original_max_pos;
  float norm_eps;               // RMSNorm epsilon
  int32_t bos_id;               // -1 when unknown
  int32_t eos_id;               // -1 when unknown
  uint8_t reserved[168];        // zero
};
#pragma pack(pop)
static_assert(sizeof(ModelHeader) == 256, "model header must be 256 bytes");

// Shapes of the per-layer tensors, in file order, derived from a header.
struct LayerShapes {
  size_t attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
  size_t total() const { return attn_norm + wq + wk + wv + wo + ffn_norm + w_gate + w_up + w_down; }
};
inline LayerShapes layer_shapes(const ModelHeader& h) {
  size_t D = h.dim, Q = (size_t)h.n_heads * h.head_dim, KV = (size_t)h.n_kv_heads * h.head_dim, F = h.ffn_dim;
  return {D, Q * D, KV * D, KV * D, D * Q, D, F * D, F * D, D * F};
}
inline size_t model_num_elements(const ModelHeader& h) {
  size_t n = (size_t)h.vocab_size * h.dim + (size_t)h.n_layers * layer_shapes(h).total() + h.dim;
  if (!h.tied_embeddings) n += (size_t)h.vocab_size * h.dim;
  return n;
}
inline size_t dtype_size(uint32_t dtype) { return dtype == DTYPE_BF16 ? 2 : 4; }

// Semantic checks on a header; returns an empty string when valid, else what is wrong.
inline std::string validate_header(const ModelHeader& h) {
  char buf[256];
  if (memcmp(h.magic, kModelMagic, 8) != 0) return "bad magic (not a lolcats model file)";
  if (h.version != kModelVersion) { snprintf(buf, sizeof buf, "unsupported version %u (expected %u)", h.version, kModelVersion); return buf; }
  if (h.dtype != DTYPE_F32 && h.dtype != DTYPE_BF16) { snprintf(buf, sizeof buf, "unknown dtype %u", h.dtype); return buf; }
  if (h.vocab_size == 0 || h.n_layers == 0 || h.dim == 0 || h.n_heads == 0 || h.n_kv_heads == 0 || h.head_dim == 0 ||
      h.ffn_dim == 0 || h.max_seq_len == 0)
    return "a dimension in the header is zero";
  if (h.vocab_size > (1u << 24) || h.n_layers > 1024 || h.dim > (1u << 16) || h.n_heads > 1024 || h.head_dim > 1024 ||
      h.ffn_dim > (1u << 20) || h.max_seq_len > (1u << 24))
    return "a dimension in the header is implausibly large";
  if (h.n_heads % h.n_kv_heads != 0) { snprintf(buf, sizeof buf, "n_heads %u is not a multiple of n_kv_heads %u", h.n_heads, h.n_kv_heads); return buf; }
  if (h.head_dim % 2 != 0) return "head_dim must be even for RoPE";
  if (h.tied_embeddings > 1) return "tied_embeddings must be 0 or 1";
  if (h.rope_scaling > ROPE_LLAMA3) { snprintf(buf, sizeof buf, "unknown rope_scaling %u", h.rope_scaling); return buf; }
  if (!(h.rope_theta > 0) || !(h.norm_eps > 0)) return "rope_theta and norm_eps must be positive";
  if (h.rope_scaling == ROPE_LLAMA3 && !(h.rope_factor > 0 && h.rope_high_freq_factor > h.rope_low_freq_factor && h.rope_original_max_pos > 0))
    return "inconsistent Llama 3.1 rope scaling fields";
  if (h.bos_id >= (int32_t)h.vocab_size || h.eos_id >= (int32_t)h.vocab_size) return "bos/eos id outside the vocabulary";
  return "";
}

inline ModelHeader read_model_header(FILE* f, const std::string& path, long long* file_bytes) {
  ModelHeader h;
  long long size = file_size_or_die(f, path);
  if (size < (long long)sizeof(ModelHeader)) fatal("'%s' is too small to be a model file (%lld bytes)", path.c_str(), size);
  read_or_die(&h, sizeof h, f, path, "the header");
  std::string err = validate_header(h);
  if (!err.empty()) fatal("model file '%s': %s", path.c_str(), err.c_str());
  long long expect = (long long)sizeof(ModelHeader) + (long long)(model_num_elements(h) * dtype_size(h.dtype));
  if (size != expect)
    fatal("model file '%s' has %lld bytes but its header implies %lld (%s)", path.c_str(), size, expect,
          size < expect ? "truncated" : "trailing data");
  if (file_bytes) *file_bytes = size;
  return h;
}

// All weights as fp32 on the host, in file order (bf16 files are widened exactly).
struct HostModel {
  ModelHeader h;
  std::vector<float> data;          // every tensor, concatenated in file order
  // Offsets into data (elements).
  size_t tok_embeddings = 0, final_norm = 0, lm_head = 0;
  std::vector<size_t> layer_offset; // start of layer l's attn_norm
  LayerShapes ls;

  const float* embed() const { return data.data() + tok_embeddings; }
  const float* lm() const { return data.data() + lm_head; }
  const float* fnorm() const { return data.data() + final_norm; }
  struct Layer { const float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down; };
  Layer layer(int l) const {
    const float* p = data.data() + layer_offset[l];
    Layer L;
    L.attn_norm = p; p += ls.attn_norm;
    L.wq = p; p += ls.wq;
    L.wk = p; p += ls.wk;
    L.wv = p; p += ls.wv;
    L.wo = p; p += ls.wo;
    L.ffn_norm = p; p += ls.ffn_norm;
    L.w_gate = p; p += ls.w_gate;
    L.w_up = p; p += ls.w_up;
    L.w_down = p;
    return L;
  }
};

inline void host_model_index(HostModel& m) {
  m.ls = layer_shapes(m.h);
  size_t off = 0;
  m.tok_embeddings = off; off += (size_t)m.h.vocab_size * m.h.dim;
  m.layer_offset.resize(m.h.n_layers);
  for (uint32_t l = 0; l < m.h.n_layers; l++) { m.layer_offset[l] = off; off += m.ls.total(); }
  m.final_norm = off; off += m.h.dim;
  m.lm_head = m.h.tied_embeddings ? m.tok_embeddings : off;
}

inline HostModel load_host_model(const std::string& path) {
  FILE* f = open_or_die(path, "rb");
  HostModel m;
  m.h = read_model_header(f, path, nullptr);
  size_t n = model_num_elements(m.h);
  m.data.resize(n);
  if (m.h.dtype == DTYPE_F32) {
    read_or_die(m.data.data(), n * 4, f, path, "the weights");
  } else {
    std::vector<uint16_t> tmp(1 << 20);
    for (size_t done = 0; done < n;) {
      size_t k = std::min(tmp.size(), n - done);
      read_or_die(tmp.data(), k * 2, f, path, "the weights");
      for (size_t i = 0; i < k; i++) m.data[done + i] = bf16_to_float(tmp[i]);
      done += k;
    }
  }
  fclose(f);
  for (size_t i = 0; i < n; i++)
    if (!std::isfinite(m.data[i])) fatal("model file '%s' holds a non-finite weight at element %zu", path.c_str(), i);
  host_model_index(m);
  return m;
}

inline ModelHeader make_header(uint32_t vocab, uint32_t layers, uint32_t dim, uint32_t heads, uint32_t kv_heads,
                               uint32_t head_dim, uint32_t ffn, uint32_t max_seq, float theta, bool tied) {
  ModelHeader h;
  memset(&h, 0, sizeof h);
  memcpy(h.magic, kModelMagic, 8);
  h.version = kModelVersion;
  h.dtype = DTYPE_BF16;
  h.vocab_size = vocab; h.n_layers = layers; h.dim = dim; h.n_heads = heads; h.n_kv_heads = kv_heads;
  h.head_dim = head_dim; h.ffn_dim = ffn; h.max_seq_len = max_seq; h.tied_embeddings = tied ? 1 : 0;
  h.rope_scaling = ROPE_NONE; h.rope_theta = theta; h.norm_eps = 1e-5f; h.bos_id = -1; h.eos_id = -1;
  return h;
}

// Named shapes for speed work without weights (-m llama3_8b): the loader builds them with random
// weights on the GPU. Returns false for an unknown name.
inline bool preset_header(const std::string& name, ModelHeader* out) {
  ModelHeader h;
  if (name == "llama3_8b") {
    h = make_header(128256, 32, 4096, 32, 8, 128, 14336, 8192, 500000.f, false);
  } else if (name == "llama3_70b") {
    h = make_header(128256, 80, 8192, 64, 8, 128, 28672, 8192, 500000.f, false);
  } else if (name == "llama3.2_1b") {
    h = make_header(128256, 16, 2048, 32, 8, 64, 8192, 131072, 500000.f, true);
    h.rope_scaling = ROPE_LLAMA3; h.rope_factor = 32.f; h.rope_low_freq_factor = 1.f; h.rope_high_freq_factor = 4.f;
    h.rope_original_max_pos = 8192;
  } else if (name == "smollm2_135m") {
    h = make_header(49152, 30, 576, 9, 3, 64, 1536, 8192, 100000.f, true);
  } else if (name == "tiny") {
    h = make_header(512, 2, 128, 4, 2, 32, 256, 1024, 10000.f, false);
  } else {
    return false;
  }
  if (name.rfind("llama3", 0) == 0) { h.bos_id = 128000; h.eos_id = 128001; }
  *out = h;
  return true;
}
inline const char* preset_names() { return "llama3_8b, llama3_70b, llama3.2_1b, smollm2_135m, tiny"; }
