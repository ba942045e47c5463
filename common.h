// common.h: host-side helpers shared by every translation unit: fatal one-line errors,
// checked file I/O, bf16 <-> fp32 conversion on the CPU. No CUDA here (see cuda_common.cuh).
#pragma once
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// Every user-facing failure goes through here: one line on stderr naming the problem, exit 1.
// Tests that exercise bad input run the binary and check for this line and the exit code.
[[noreturn]] inline void fatal(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "error: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(1);
}

inline FILE* open_or_die(const std::string& path, const char* mode) {
  FILE* f = fopen(path.c_str(), mode);
  if (!f) fatal("cannot open '%s' (%s)", path.c_str(), strerror(errno));
  return f;
}

inline long long file_size_or_die(FILE* f, const std::string& path) {
  if (fseeko(f, 0, SEEK_END) != 0) fatal("cannot seek in '%s'", path.c_str());
  long long n = ftello(f);
  if (fseeko(f, 0, SEEK_SET) != 0) fatal("cannot seek in '%s'", path.c_str());
  return n;
}

inline void read_or_die(void* dst, size_t bytes, FILE* f, const std::string& path, const char* what) {
  if (bytes && fread(dst, 1, bytes, f) != bytes)
    fatal("'%s' is truncated while reading %s", path.c_str(), what);
}

inline void write_or_die(const void* src, size_t bytes, FILE* f, const std::string& path) {
  if (bytes && fwrite(src, 1, bytes, f) != bytes) fatal("write to '%s' failed (%s)", path.c_str(), strerror(errno));
}

// Crash-safe file replacement: write everything to PATH.tmp, fsync-free flush, then rename over PATH.
// A kill at any point leaves either the old file or the new one, never a half-written one.
inline void commit_tmp_file(FILE* f, const std::string& tmp, const std::string& path) {
  if (fflush(f) != 0 || ferror(f)) fatal("write to '%s' failed", tmp.c_str());
  if (fclose(f) != 0) fatal("closing '%s' failed", tmp.c_str());
  if (rename(tmp.c_str(), path.c_str()) != 0) fatal("cannot rename '%s' to '%s' (%s)", tmp.c_str(), path.c_str(), strerror(errno));
}

// bf16 is the top half of an fp32; round to nearest even on the way down, NaN kept quiet.
inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
// Round an fp32 through bf16 and back: what the GPU stores.
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// Deterministic, seedable RNG for tests and random presets (xorshift64* -> uniform / normal).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) { if (!s) s = 1; }
  uint64_t next() { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; return s * 2685821657736338717ull; }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  double normal() {
    double u1 = uniform() + 1e-300, u2 = uniform();
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
  }
};
