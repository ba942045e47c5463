// test/test_model_file.cpp: the model file loader (model_file.h) on files written here: valid fp32 and bf16
// files load to the exact values in file order; every kind of bad file is refused with its one-line error
// and exit status 1. Also runs scripts/export.py on the real llama2.c checkpoint stories260K and checks
// the header and every tensor against the raw llama2.c floats, including the q/k row permutation.
#include <gtest/gtest.h>
#include <unistd.h>

#include <functional>

#include "model_file.h"
#include "test/test_util.h"

namespace {

// A fresh directory under /tmp for one test's files.
std::string temp_dir() {
  char tmpl[] = "/tmp/lolcats_model_file_XXXXXX";
  const char* d = mkdtemp(tmpl);
  if (!d) fatal("mkdtemp failed");
  return d;
}

// Random weights (normal, scaled 0.5) for a header, in file order.
std::vector<float> random_weights(const ModelHeader& h, uint64_t seed) {
  std::vector<float> w(model_num_elements(h));
  Rng rng(seed);
  for (float& x : w) x = (float)(0.5 * rng.normal());
  return w;
}

// Writes header + weights (converted to the header's dtype) + `extra` trailing bytes; drops `cut` bytes.
void write_model(const std::string& path, const ModelHeader& h, const std::vector<float>& w, size_t extra = 0,
                 size_t cut = 0) {
  std::vector<uint8_t> bytes(sizeof h);
  memcpy(bytes.data(), &h, sizeof h);
  if (h.dtype == DTYPE_BF16) {
    for (float x : w) {
      uint16_t b = float_to_bf16(x);
      bytes.insert(bytes.end(), (uint8_t*)&b, (uint8_t*)&b + 2);
    }
  } else {
    bytes.insert(bytes.end(), (const uint8_t*)w.data(), (const uint8_t*)(w.data() + w.size()));
  }
  bytes.resize(bytes.size() + extra, 0);
  bytes.resize(bytes.size() - cut);
  FILE* f = open_or_die(path, "wb");
  write_or_die(bytes.data(), bytes.size(), f, path);
  fclose(f);
}

ModelHeader small_header(bool tied, uint32_t dtype) {
  // vocab 37, 2 layers, dim 16, 4 heads / 2 kv heads of 6 (head_dim != dim / heads), ffn 24.
  ModelHeader h = make_header(37, 2, 16, 4, 2, 6, 24, 64, 10000.f, tied);
  h.dtype = dtype;
  h.bos_id = 1;
  h.eos_id = 2;
  return h;
}

// Offsets of tensors computed by hand from the layout in model_file.h, independently of host_model_index.
struct HandOffsets { size_t layer1_wk, final_norm, lm_head; };
HandOffsets hand_offsets(const ModelHeader& h) {
  const size_t V = h.vocab_size, D = h.dim, Q = h.n_heads * h.head_dim, KV = h.n_kv_heads * h.head_dim, F = h.ffn_dim;
  const size_t layer = D + Q * D + 2 * KV * D + D * Q + D + 3 * F * D;
  HandOffsets o;
  o.layer1_wk = V * D + layer + D + Q * D;
  o.final_norm = V * D + 2 * layer;
  o.lm_head = h.tied_embeddings ? 0 : o.final_norm + D;
  return o;
}

}  // namespace

TEST(ModelFile, LoadsFp32Untied) {
  const std::string dir = temp_dir(), path = dir + "/m.bin";
  ModelHeader h = small_header(false, DTYPE_F32);
  std::vector<float> w = random_weights(h, 1);
  write_model(path, h, w);
  HostModel m = load_host_model(path);
  EXPECT_EQ(memcmp(&m.h, &h, sizeof h), 0);
  ASSERT_EQ(m.data.size(), w.size());
  EXPECT_EQ(memcmp(m.data.data(), w.data(), w.size() * 4), 0);  // fp32 is stored exactly
  HandOffsets o = hand_offsets(h);
  EXPECT_EQ(m.layer(1).wk, m.data.data() + o.layer1_wk);
  EXPECT_EQ(m.fnorm(), m.data.data() + o.final_norm);
  EXPECT_EQ(m.lm(), m.data.data() + o.lm_head);
  EXPECT_EQ(m.layer(1).wk[5], w[o.layer1_wk + 5]);
  EXPECT_EQ(m.lm()[(size_t)36 * 16 + 15], w.back());             // last element of lm_head ends the file
  remove(path.c_str());
  rmdir(dir.c_str());
}

TEST(ModelFile, LoadsBf16Tied) {
  const std::string dir = temp_dir(), path = dir + "/m.bin";
  ModelHeader h = small_header(true, DTYPE_BF16);
  h.rope_scaling = ROPE_LLAMA3; h.rope_factor = 8; h.rope_low_freq_factor = 1; h.rope_high_freq_factor = 4;
  h.rope_original_max_pos = 32;
  std::vector<float> w = random_weights(h, 2);
  write_model(path, h, w);
  HostModel m = load_host_model(path);
  EXPECT_EQ(memcmp(&m.h, &h, sizeof h), 0);
  ASSERT_EQ(m.data.size(), w.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < w.size(); i++) mismatches += m.data[i] != round_bf16(w[i]);  // widening is exact
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(m.lm(), m.embed());                                  // tied: the LM head is the embedding
  HandOffsets o = hand_offsets(h);
  EXPECT_EQ(m.fnorm(), m.data.data() + o.final_norm);
  EXPECT_EQ(m.fnorm()[15], round_bf16(w.back()));
  remove(path.c_str());
  rmdir(dir.c_str());
}

// Each bad file: how to spoil a valid one, and the message the loader must print.
struct BadFile {
  const char* name;
  std::function<void(ModelHeader&, std::vector<float>&, size_t& extra, size_t& cut)> spoil;
  const char* message;  // regex matched against stderr
};

TEST(ModelFileDeathTest, RefusesBadFiles) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const std::string dir = temp_dir();
  const std::vector<BadFile> cases = {
      {"bad_magic", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.magic[7] = '2'; },
       "error: model file '.*bad_magic.bin': bad magic \\(not a lolcats model file\\)"},
      {"version", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.version = 2; },
       "unsupported version 2 \\(expected 1\\)"},
      {"truncated", [](ModelHeader&, std::vector<float>&, size_t&, size_t& cut) { cut = 3; },
       "has [0-9]+ bytes but its header implies [0-9]+ \\(truncated\\)"},
      {"trailing", [](ModelHeader&, std::vector<float>&, size_t& extra, size_t&) { extra = 4; },
       "has [0-9]+ bytes but its header implies [0-9]+ \\(trailing data\\)"},
      {"zero_dim", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.dim = 0; },
       "a dimension in the header is zero"},
      {"kv_heads", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.n_kv_heads = 3; },
       "n_heads 4 is not a multiple of n_kv_heads 3"},
      {"dtype", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.dtype = 7; }, "unknown dtype 7"},
      {"odd_head_dim", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.head_dim = 5; },
       "head_dim must be even for RoPE"},
      {"bos", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.bos_id = 37; },
       "bos/eos id outside the vocabulary"},
      {"rope", [](ModelHeader& h, std::vector<float>&, size_t&, size_t&) { h.rope_scaling = ROPE_LLAMA3; },
       "inconsistent Llama 3.1 rope scaling fields"},
      {"nan", [](ModelHeader&, std::vector<float>& w, size_t&, size_t&) { w[100] = NAN; },
       "holds a non-finite weight at element 100"},
  };
  for (const BadFile& c : cases) {
    ModelHeader h = small_header(false, DTYPE_F32);
    std::vector<float> w = random_weights(h, 3);
    size_t extra = 0, cut = 0;
    c.spoil(h, w, extra, cut);
    // A header whose sizes changed still gets the data its own (possibly bad) fields imply, when sane.
    const std::string path = dir + "/" + c.name + ".bin";
    write_model(path, h, w, extra, cut);
    EXPECT_EXIT(load_host_model(path), ::testing::ExitedWithCode(1), c.message) << c.name;
    remove(path.c_str());
  }
  // Shorter than a header, and a file that does not exist.
  const std::string tiny = dir + "/tiny.bin";
  FILE* f = open_or_die(tiny, "wb");
  fputs("LOLCMDL1", f);
  fclose(f);
  EXPECT_EXIT(load_host_model(tiny), ::testing::ExitedWithCode(1), "is too small to be a model file \\(8 bytes\\)");
  remove(tiny.c_str());
  EXPECT_EXIT(load_host_model(dir + "/missing.bin"), ::testing::ExitedWithCode(1),
              "error: cannot open '.*missing.bin' \\(No such file or directory\\)");
  rmdir(dir.c_str());
}

// scripts/export.py llama2c on ../shared/models/stories260K.bin, checked against the raw llama2.c file.
// The llama2.c layout rotates interleaved pairs (rows 2p, 2p+1 of a head share frequency p); the model file
// uses rotate-half (rows p, p + hd/2). So exported row r of head h must be source row
//     h*hd + 2*(r % half) + r / half,   half = hd / 2,
// for wq (per query head) and wk (per kv head); every other tensor is copied unchanged (w1 = gate,
// w3 = up, w2 = down).
TEST(ModelFile, ExportLlama2cStories260K) {
  if (std::system("python3 -c 'import numpy' > /dev/null 2>&1") != 0) GTEST_SKIP() << "python3 with numpy not found";
  if (!file_exists("scripts/export.py")) GTEST_SKIP() << "run from the repository root";
  const std::string src = shared_dir() + "/models/stories260K.bin";
  if (!file_exists(src)) GTEST_SKIP() << src << " not found (set LOLCATS_SHARED)";
  const std::string dir = temp_dir(), out = dir + "/stories.bin", out_bf16 = dir + "/stories_bf16.bin";
  ASSERT_EQ(std::system(("python3 scripts/export.py llama2c '" + src + "' '" + out + "' --dtype fp32 --quiet").c_str()), 0);
  ASSERT_EQ(std::system(("python3 scripts/export.py llama2c '" + src + "' '" + out_bf16 + "' --quiet").c_str()), 0);

  // The raw llama2.c file: 7 int32, then fp32 tensors.
  FILE* f = open_or_die(src, "rb");
  int32_t cfg[7];
  read_or_die(cfg, sizeof cfg, f, src, "header");
  const long long n = file_size_or_die(f, src) / 4 - 7;
  std::vector<float> raw(n);
  fseeko(f, 28, SEEK_SET);
  read_or_die(raw.data(), n * 4, f, src, "weights");
  fclose(f);
  const int D = cfg[0], F = cfg[1], L = cfg[2], H = cfg[3], KV = cfg[4], V = cfg[5], S = cfg[6];
  ASSERT_GT(V, 0) << "stories260K shares its classifier with the embedding";
  const int hd = D / H, half = hd / 2;

  HostModel m = load_host_model(out);
  EXPECT_EQ(m.h.dtype, (uint32_t)DTYPE_F32);
  EXPECT_EQ(m.h.vocab_size, 512u); EXPECT_EQ(m.h.dim, 64u); EXPECT_EQ(m.h.n_layers, 5u);
  EXPECT_EQ(m.h.n_heads, 8u); EXPECT_EQ(m.h.n_kv_heads, 4u); EXPECT_EQ(m.h.head_dim, 8u);
  EXPECT_EQ(m.h.ffn_dim, 172u); EXPECT_EQ(m.h.max_seq_len, 512u); EXPECT_EQ(m.h.tied_embeddings, 1u);
  EXPECT_EQ(m.h.rope_scaling, (uint32_t)ROPE_NONE); EXPECT_EQ(m.h.rope_theta, 10000.f);
  EXPECT_EQ(m.h.norm_eps, 1e-5f); EXPECT_EQ(m.h.bos_id, 1); EXPECT_EQ(m.h.eos_id, 2);
  ASSERT_EQ((int)m.h.dim, D); ASSERT_EQ((int)m.h.ffn_dim, F); ASSERT_EQ((int)m.h.n_layers, L);
  ASSERT_EQ((int)m.h.n_heads, H); ASSERT_EQ((int)m.h.n_kv_heads, KV); ASSERT_EQ((int)m.h.max_seq_len, S);

  // Offsets of the llama2.c tensors (elements).
  const size_t tok = 0, rms_att = tok + (size_t)V * D, wq = rms_att + (size_t)L * D, wk = wq + (size_t)L * D * D,
               wv = wk + (size_t)L * KV * hd * D, wo = wv + (size_t)L * KV * hd * D, rms_ffn = wo + (size_t)L * D * D,
               w1 = rms_ffn + (size_t)L * D, w2 = w1 + (size_t)L * F * D, w3 = w2 + (size_t)L * D * F,
               rms_final = w3 + (size_t)L * F * D;
  auto same = [&](const float* got, size_t src_off, size_t count) {
    return memcmp(got, raw.data() + src_off, count * 4) == 0;
  };
  EXPECT_TRUE(same(m.embed(), tok, (size_t)V * D));
  EXPECT_TRUE(same(m.fnorm(), rms_final, D));
  EXPECT_EQ(m.lm(), m.embed());
  size_t permuted_rows_checked = 0;
  for (int l = 0; l < L; l++) {
    HostModel::Layer ly = m.layer(l);
    EXPECT_TRUE(same(ly.attn_norm, rms_att + (size_t)l * D, D)) << l;
    EXPECT_TRUE(same(ly.wv, wv + (size_t)l * KV * hd * D, (size_t)KV * hd * D)) << l;
    EXPECT_TRUE(same(ly.wo, wo + (size_t)l * D * D, (size_t)D * D)) << l;
    EXPECT_TRUE(same(ly.ffn_norm, rms_ffn + (size_t)l * D, D)) << l;
    EXPECT_TRUE(same(ly.w_gate, w1 + (size_t)l * F * D, (size_t)F * D)) << l;
    EXPECT_TRUE(same(ly.w_down, w2 + (size_t)l * D * F, (size_t)D * F)) << l;
    EXPECT_TRUE(same(ly.w_up, w3 + (size_t)l * F * D, (size_t)F * D)) << l;
    for (int which = 0; which < 2; which++) {
      const float* got = which == 0 ? ly.wq : ly.wk;
      const size_t base = which == 0 ? wq + (size_t)l * D * D : wk + (size_t)l * KV * hd * D;
      const int heads = which == 0 ? H : KV;
      for (int h = 0; h < heads; h++)
        for (int r = 0; r < hd; r++) {
          const size_t src_row = (size_t)h * hd + 2 * (r % half) + r / half;
          EXPECT_TRUE(same(got + ((size_t)h * hd + r) * D, base + src_row * D, D))
              << (which ? "wk" : "wq") << " layer " << l << " head " << h << " row " << r;
          permuted_rows_checked++;
        }
    }
  }
  EXPECT_EQ(permuted_rows_checked, (size_t)L * (H + KV) * hd);
  // The permutation really moves rows (a no-op export would pass the checks above only if it were identity).
  EXPECT_FALSE(same(m.layer(0).wq + (size_t)1 * D, wq + (size_t)1 * D, D));

  // The default export is bf16: the same values, rounded to nearest even.
  HostModel mb = load_host_model(out_bf16);
  EXPECT_EQ(mb.h.dtype, (uint32_t)DTYPE_BF16);
  ASSERT_EQ(mb.data.size(), m.data.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < m.data.size(); i++) mismatches += mb.data[i] != round_bf16(m.data[i]);
  EXPECT_EQ(mismatches, 0u);
  remove(out.c_str());
  remove(out_bf16.c_str());
  rmdir(dir.c_str());
}
