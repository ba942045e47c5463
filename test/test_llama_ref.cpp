// test/test_llama_ref.cpp: the CPU reference forward against Hugging Face transformers. The fixtures
// (tiny random HF models + the logits transformers computed in fp32, eager attention) come from
// scripts/make_fixtures.py run on the GPU machine; `make test` exports them with scripts/export.py
// first, so this also checks the exporter end to end.
#include <gtest/gtest.h>

#include "reference/llama_ref.h"
#include "test/test_util.h"

namespace {

void check_against_transformers(const std::string& model_bin, const std::string& expected) {
  if (!file_exists(model_bin)) GTEST_SKIP() << model_bin << " not built (run `make fixtures`)";
  HostModel m = load_host_model(model_bin);
  LogitsFixture fx = load_logits_fixture(expected);
  ASSERT_EQ(fx.V, (int)m.h.vocab_size);
  std::vector<float> logits;
  double loss = ref::llama_forward(m, fx.tokens.data(), fx.B, fx.T, logits);
  // fp32 on both sides, different summation orders over at most a few hundred terms: 1e-4 absolute on
  // logits of magnitude O(1..10) is ~1e-5 relative, well above fp32 reordering noise (~1e-6).
  double err = max_abs_error(logits, fx.logits);
  EXPECT_LE(err, 1e-4) << "max |logit - transformers| for " << model_bin;
  EXPECT_NEAR(loss, fx.loss, 1e-5);
  double mx = 0;
  for (float v : fx.logits) mx = std::max(mx, (double)std::fabs(v));
  EXPECT_GT(mx, 0.5) << "fixture logits are degenerate";
  printf("  %s: max |logit error| %.2e (max |logit| %.2f), loss %.6f vs %.6f\n", model_bin.c_str(), err, mx, loss,
         (double)fx.loss);
}

}  // namespace

class LlamaRefFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(LlamaRefFixture, MatchesTransformers) {
  const std::string name = GetParam();
  check_against_transformers(build_dir() + "/fixtures/" + name + ".bin", "test/fixtures/" + name + "/expected.bin");
}
INSTANTIATE_TEST_SUITE_P(HF, LlamaRefFixture, ::testing::Values("hf_gqa_untied", "hf_tied_ropescaled", "hf_mha"));

TEST(LlamaRef, Stories260KMatchesTransformers) {
  check_against_transformers(build_dir() + "/fixtures/stories260k.bin", "test/fixtures/stories260k_expected.bin");
}

TEST(LlamaRef, RopeScalingLeavesHighFrequenciesAlone) {
  ModelHeader h = make_header(16, 1, 64, 2, 1, 32, 64, 256, 500000.f, false);
  std::vector<double> plain = ref::rope_inv_freq(h);
  h.rope_scaling = ROPE_LLAMA3; h.rope_factor = 8; h.rope_low_freq_factor = 1; h.rope_high_freq_factor = 4;
  h.rope_original_max_pos = 8192;
  std::vector<double> scaled = ref::rope_inv_freq(h);
  EXPECT_DOUBLE_EQ(scaled[0], plain[0]);                          // wavelength 2*pi << 2048: unchanged
  EXPECT_NEAR(scaled.back(), plain.back() / 8, 1e-18);            // wavelength >> 8192: divided by factor
  for (size_t i = 0; i < plain.size(); i++) EXPECT_LE(scaled[i], plain[i] * (1 + 1e-12));
}
