// test/test_util.h: helpers shared by the CPU and GPU test suites: where the shared data and build
// outputs are, the logits fixture reader (format: scripts/make_fixtures.py), error norms.
#pragma once
#include <cmath>
#include <string>
#include <vector>

#include "common.h"

inline std::string shared_dir() {
  const char* s = getenv("LOLCATS_SHARED");
  return s ? s : "../shared";
}
inline std::string build_dir() {
  const char* s = getenv("LOLCATS_BUILD");
  return s ? s : "build";
}
inline bool file_exists(const std::string& p) {
  FILE* f = fopen(p.c_str(), "rb");
  if (f) fclose(f);
  return f != nullptr;
}

// expected.bin: int32 magic "LLXF", version 1, B, T, V; int32 tokens[B*T]; float logits[B*T*V]; float loss.
struct LogitsFixture {
  int B = 0, T = 0, V = 0;
  std::vector<int> tokens;
  std::vector<float> logits;
  float loss = 0;
};
inline LogitsFixture load_logits_fixture(const std::string& path) {
  FILE* f = open_or_die(path, "rb");
  int32_t hdr[5];
  read_or_die(hdr, sizeof hdr, f, path, "the header");
  if (hdr[0] != 0x46584C4C || hdr[1] != 1) fatal("'%s' is not a logits fixture", path.c_str());
  LogitsFixture fx;
  fx.B = hdr[2]; fx.T = hdr[3]; fx.V = hdr[4];
  fx.tokens.resize((size_t)fx.B * fx.T);
  fx.logits.resize((size_t)fx.B * fx.T * fx.V);
  read_or_die(fx.tokens.data(), fx.tokens.size() * 4, f, path, "tokens");
  read_or_die(fx.logits.data(), fx.logits.size() * 4, f, path, "logits");
  read_or_die(&fx.loss, 4, f, path, "loss");
  fclose(f);
  return fx;
}

// ||a - b|| / ||b||, and +inf if anything is not finite (NaN never passes).
template <typename A, typename B>
double rel_error(const A& a, const B& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); i++) {
    if (!std::isfinite((double)a[i])) return INFINITY;
    double d = (double)a[i] - (double)b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1e-300));
}
template <typename A, typename B>
double max_abs_error(const A& a, const B& b) {
  double m = 0;
  for (size_t i = 0; i < b.size(); i++) {
    if (!std::isfinite((double)a[i])) return INFINITY;
    m = std::max(m, std::fabs((double)a[i] - (double)b[i]));
  }
  return m;
}
