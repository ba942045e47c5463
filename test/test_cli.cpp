// test/test_cli.cpp: bad input to ./train_lolcats gets a one-line error naming the problem and a
// non-zero exit, never a crash. Every check here fails before the GPU is touched, so it runs in CI.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <fstream>

#include "model_file.h"
#include "test/test_util.h"

namespace {

struct RunResult {
  int exit_code;
  std::string output;  // stdout + stderr
};

RunResult run_trainer(const std::string& args) {
  std::string cmd = "./train_lolcats " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, "popen failed"};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

// One line, starting with "error: ", containing `what`, exit code 1.
void expect_one_line_error(const std::string& args, const std::string& what) {
  if (!file_exists("train_lolcats")) GTEST_SKIP() << "train_lolcats not built";
  RunResult r = run_trainer(args);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  EXPECT_NE(r.output.find(what), std::string::npos) << "expected '" << what << "' in: " << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
}

std::string temp_path(const std::string& name) {
  return build_dir() + "/cli_" + name;
}

// A small valid model file (tiny shapes, random values) to corrupt in various ways.
std::string write_model(const std::string& name, long long truncate_bytes = 0, bool bad_magic = false) {
  ModelHeader h = make_header(64, 1, 16, 2, 1, 8, 32, 128, 10000.f, true);
  h.dtype = DTYPE_F32;
  if (bad_magic) h.magic[0] = 'X';
  std::vector<float> w(model_num_elements(h));
  Rng rng(3);
  for (float& v : w) v = (float)rng.normal() * 0.1f;
  std::string path = temp_path(name);
  FILE* f = fopen(path.c_str(), "wb");
  fwrite(&h, sizeof h, 1, f);
  fwrite(w.data(), 4, w.size() - (size_t)truncate_bytes / 4, f);
  fclose(f);
  return path;
}

}  // namespace

TEST(Cli, HelpListsEveryOption) {
  if (!file_exists("train_lolcats")) GTEST_SKIP() << "train_lolcats not built";
  RunResult r = run_trainer("--help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* opt : {"-m MODEL", "-i DIR", "--eval-ppl", "--bench", "--geometry", "--resume", "--sinks"})
    EXPECT_NE(r.output.find(opt), std::string::npos) << opt;
}

TEST(Cli, UnknownFlag) { expect_one_line_error("-m tiny --frobnicate 3", "unknown option '--frobnicate'"); }
TEST(Cli, FlagWithoutValue) { expect_one_line_error("-m", "option -m needs a value"); }
TEST(Cli, BadNumber) { expect_one_line_error("-m tiny -b abc", "option -b expects an integer"); }
TEST(Cli, NoModel) { expect_one_line_error("-i data", "no model given"); }
TEST(Cli, UnknownPreset) { expect_one_line_error("-m llama9_1t --bench forward", "neither a readable file nor a preset"); }
TEST(Cli, MissingModelFile) { expect_one_line_error("-m /nonexistent/model.bin --bench forward", "cannot open model file"); }
TEST(Cli, BadGeometry) { expect_one_line_error("-m tiny --geometry diagonal", "unknown --geometry"); }
TEST(Cli, SequenceTooLong) {
  expect_one_line_error("-m tiny -t 4096 --bench forward", "sequence length 4096 exceeds the model's maximum 1024");
}
TEST(Cli, CorruptModelMagic) {
  std::string p = write_model("badmagic.bin", 0, true);
  expect_one_line_error("-m " + p + " --bench forward", "bad magic");
}
TEST(Cli, TruncatedModel) {
  std::string p = write_model("truncated.bin", 400);
  expect_one_line_error("-m " + p + " --bench forward", "truncated");
}
TEST(Cli, MissingEvalFile) {
  std::string p = write_model("ok.bin");
  expect_one_line_error("-m " + p + " -t 64 --eval-ppl /nonexistent/shard.bin", "/nonexistent/shard.bin");
}
TEST(Cli, NoDataDirForStage1) { expect_one_line_error("-m tiny -t 64", "no data directory"); }

namespace {

// A shard directory with one train and one val shard of `vocab` and 64-token sequences.
std::string write_shards(const std::string& name, uint32_t vocab) {
  std::string dir = temp_path(name);
  std::string cmd = "rm -rf '" + dir + "' && mkdir -p '" + dir + "'";
  if (system(cmd.c_str()) != 0) return dir;
  for (const char* split : {"train", "val"}) {
    std::string path = dir + "/x_" + split + "_0000.bin";
    FILE* f = fopen(path.c_str(), "wb");
    unsigned char hdr[64] = {0};
    const uint64_t n = 128;
    const int32_t bos = 1, eos = 2;
    const uint32_t version = 1, flags = 0, seq_len = 64;
    memcpy(hdr, "LOLCTOK1", 8);
    memcpy(hdr + 8, &version, 4);
    memcpy(hdr + 12, &vocab, 4);
    memcpy(hdr + 16, &n, 8);
    memcpy(hdr + 24, &flags, 4);
    memcpy(hdr + 28, &bos, 4);
    memcpy(hdr + 32, &eos, 4);
    memcpy(hdr + 36, &seq_len, 4);
    fwrite(hdr, 1, 64, f);
    for (uint32_t i = 0; i < n; i++) { uint32_t t = (i * 7) % vocab; fwrite(&t, 4, 1, f); }
    fclose(f);
  }
  return dir;
}

}  // namespace

TEST(Cli, EmptyShardDirectory) {
  std::string p = write_model("ok2.bin");
  std::string dir = temp_path("empty_dir");
  std::string cmd = "rm -rf '" + dir + "' && mkdir -p '" + dir + "'";
  ASSERT_EQ(system(cmd.c_str()), 0);
  expect_one_line_error("-m " + p + " -t 64 -i " + dir, "no train shards in");
}
TEST(Cli, ShardVocabularyMismatch) {
  std::string p = write_model("ok3.bin");  // vocabulary 64
  std::string dir = write_shards("shards_v259", 259);
  expect_one_line_error("-m " + p + " -t 64 -i " + dir, "vocabulary 259 but the model has 64");
}
TEST(Cli, ShardLengthMismatch) {
  std::string p = write_model("ok4.bin");
  std::string dir = write_shards("shards_v64", 64);
  expect_one_line_error("-m " + p + " -t 32 -i " + dir, "hold 64-token sequences but -t is 32");
}
TEST(Cli, CheckpointFromAnotherModel) {
  std::string p = write_model("ok5.bin");  // 1 layer, 2 heads, dim 16
  std::string dir = write_shards("shards_ck", 64);
  // A checkpoint header of a 2-layer model (the rest of the file is irrelevant: refused on the header).
  std::string ck = temp_path("other.ckpt");
  FILE* f = fopen(ck.c_str(), "wb");
  std::vector<unsigned char> block(1024, 0);
  memcpy(block.data(), "LOLCS1CK", 8);
  const uint32_t fields[7] = {1, 2, 2, 1, 8, 16, 64};  // version, layers, heads, kv heads, head_dim, dim, vocab
  memcpy(block.data() + 8, fields, sizeof fields);
  fwrite(block.data(), 1, block.size(), f);
  fclose(f);
  expect_one_line_error("-m " + p + " -t 64 -i " + dir + " --resume " + ck, "is from another model");
}
