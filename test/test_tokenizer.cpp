// test_tokenizer.cpp: tokenizer.h against the reference tokenizers' ids (tiktoken for Llama 3, Hugging Face
// tokenizers for SmolLM2), as scripts/make_tokenizer_fixtures.py recorded them in test/fixtures/tokenizer/:
// hand-picked and random stress strings (both special-token modes), every file of the shared data (whole,
// and per sample), a sweep over all code points; decode(encode(x)) == x; the BPE rule and every bad-file
// error on a small tokenizer file written here byte by byte.
// The real tokenizer files are exported on first use into $LOLCATS_BUILD/tokenizer/ from assets/
// (scripts/fetch_assets.sh); without assets those tests skip and say so.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <array>
#include <map>
#include <memory>

#include "test_util.h"
#include "tokenizer.h"

namespace {

// ---------------------------------------------------------------------------------------------------------
// Helpers

uint64_t fnv1a64(const int* ids, size_t n) {  // over the ids as uint32 little-endian bytes
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; i++)
    for (int b = 0; b < 4; b++) h = (h ^ (((uint32_t)ids[i] >> (8 * b)) & 0xFF)) * 0x100000001B3ull;
  return h;
}

std::string read_file(const std::string& path) {
  FILE* f = open_or_die(path, "rb");
  long long n = file_size_or_die(f, path);
  std::string s((size_t)n, '\0');
  read_or_die(&s[0], s.size(), f, path, "the file");
  fclose(f);
  return s;
}

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += (char)cp;
  } else if (cp < 0x800) {
    s += (char)(0xC0 | (cp >> 6)), s += (char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += (char)(0xE0 | (cp >> 12)), s += (char)(0x80 | ((cp >> 6) & 0x3F)), s += (char)(0x80 | (cp & 0x3F));
  } else {
    s += (char)(0xF0 | (cp >> 18)), s += (char)(0x80 | ((cp >> 12) & 0x3F));
    s += (char)(0x80 | ((cp >> 6) & 0x3F)), s += (char)(0x80 | (cp & 0x3F));
  }
}

// A minimal JSON reader for the data files: values are objects, arrays, strings (all escapes, surrogate
// pairs joined), and skipped scalars. Only the string fields of objects are kept.
struct JsonReader {
  const std::string& s;
  size_t i = 0;
  void ws() { while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++; }
  void expect(char c) {
    ws();
    if (i >= s.size() || s[i] != c) fatal("json: expected '%c' at byte %zu", c, i);
    i++;
  }
  uint32_t hex4() {
    if (i + 4 > s.size()) fatal("json: short \\u escape");
    uint32_t v = (uint32_t)std::stoul(s.substr(i, 4), nullptr, 16);
    i += 4;
    return v;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i < s.size() && s[i] != '"') {
      char c = s[i++];
      if (c != '\\') { out += c; continue; }
      char e = s[i++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= s.size() && s[i] == '\\' && s[i + 1] == 'u') {
            i += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fatal("json: unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xD800 && cp <= 0xDFFF) {
            fatal("json: unpaired surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: out += e;  // \" \\ \/
      }
    }
    expect('"');
    return out;
  }
  // An object's string fields (other values skipped).
  std::map<std::string, std::string> object() {
    std::map<std::string, std::string> fields;
    expect('{');
    ws();
    if (s[i] == '}') { i++; return fields; }
    for (;;) {
      std::string key = string();
      expect(':');
      ws();
      if (s[i] == '"') fields[key] = string();
      else skip_scalar();
      ws();
      if (s[i] == ',') { i++; continue; }
      expect('}');
      return fields;
    }
  }
  void skip_scalar() { while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']') i++; }
  std::vector<std::map<std::string, std::string>> array_of_objects() {
    std::vector<std::map<std::string, std::string>> out;
    expect('[');
    ws();
    if (s[i] == ']') { i++; return out; }
    for (;;) {
      out.push_back(object());
      ws();
      if (s[i] == ',') { i++; continue; }
      expect(']');
      return out;
    }
  }
};

// The sweep text, exactly as make_tokenizer_fixtures.py builds it: x c c 9 c ' ' c ' c x \n per code point.
std::vector<std::string> sweep_texts(size_t block) {
  std::vector<uint32_t> cps;
  for (uint32_t c = 0; c < 0x40000; c++)
    if (c < 0xD800 || c > 0xDFFF) cps.push_back(c);
  for (uint32_t c = 0x40000; c < 0x110000; c += 97) cps.push_back(c);
  std::vector<std::string> texts;
  for (size_t i = 0; i < cps.size(); i += block) {
    std::string t;
    for (size_t k = i; k < std::min(cps.size(), i + block); k++) {
      uint32_t c = cps[k];
      t += 'x', append_utf8(t, c), append_utf8(t, c), t += '9', append_utf8(t, c), t += ' ';
      append_utf8(t, c), t += '\'', append_utf8(t, c), t += "x\n";
    }
    texts.push_back(t);
  }
  return texts;
}

// ---------------------------------------------------------------------------------------------------------
// Fixtures (format: scripts/make_tokenizer_fixtures.py)

struct FixtureCase {
  std::string name, mode, source, arg;
  std::vector<std::pair<size_t, uint64_t>> units;  // (id count, FNV-1a 64) per unit
  std::vector<int> ids;                            // first ids of all units concatenated
};

std::vector<FixtureCase> load_fixture(const std::string& path) {
  std::string text = read_file(path);
  std::vector<FixtureCase> cases;
  size_t pos = 0;
  auto next_line = [&]() {
    size_t e = text.find('\n', pos);
    if (e == std::string::npos) fatal("'%s': unterminated line", path.c_str());
    std::string line = text.substr(pos, e - pos);
    pos = e + 1;
    return line;
  };
  while (pos < text.size()) {
    std::string line = next_line();
    if (line.rfind("case ", 0) != 0) continue;
    FixtureCase c;
    char name[256], mode[32], source[32], arg_start[8];
    if (sscanf(line.c_str(), "case %255s %31s %31s %7s", name, mode, source, arg_start) < 3)
      fatal("'%s': bad case line", path.c_str());
    c.name = name, c.mode = mode, c.source = source;
    size_t arg_at = line.find(' ', line.find(' ', line.find(' ', 5) + 1) + 1);
    c.arg = arg_at == std::string::npos ? "" : line.substr(arg_at + 1);
    size_t n_units = 0;
    if (sscanf(next_line().c_str(), "units %zu", &n_units) != 1) fatal("'%s': bad units line", path.c_str());
    for (size_t u = 0; u < n_units; u++) {
      size_t n;
      unsigned long long h;
      if (sscanf(next_line().c_str(), "%zu %llx", &n, &h) != 2) fatal("'%s': bad unit line", path.c_str());
      c.units.push_back({n, (uint64_t)h});
    }
    std::string ids = next_line();
    const char* p = ids.c_str();
    if (strncmp(p, "ids ", 4) != 0) fatal("'%s': bad ids line", path.c_str());
    char* end;
    size_t k = strtoul(p + 4, &end, 10);
    for (size_t j = 0; j < k; j++) c.ids.push_back((int)strtol(end, &end, 10));
    cases.push_back(std::move(c));
  }
  return cases;
}

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out += (char)std::stoi(hex.substr(i, 2), nullptr, 16);
  return out;
}

// The texts of a case's units (empty if the shared data are missing).
std::vector<std::string> case_units(const FixtureCase& c) {
  std::string data = shared_dir() + "/data/";
  if (c.source == "inline") return {from_hex(c.arg)};
  if (c.source == "sweep") return sweep_texts(std::stoul(c.arg));
  if (!file_exists(data + c.arg)) return {};
  std::string text = read_file(data + c.arg);
  if (c.source == "file") return {text};
  std::vector<std::string> units;
  if (c.source == "alpaca") {
    JsonReader r{text};
    for (auto& s : r.array_of_objects())
      for (const char* k : {"instruction", "input", "output"}) units.push_back(s[k]);
  } else if (c.source == "jsonl") {
    size_t pos = 0;
    while (pos < text.size()) {
      size_t e = text.find('\n', pos);
      if (e == std::string::npos) e = text.size();
      std::string line = text.substr(pos, e - pos);
      pos = e + 1;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      JsonReader r{line};
      units.push_back(r.object()["text"]);
    }
  } else {
    fatal("unknown fixture source '%s'", c.source.c_str());
  }
  return units;
}

// ---------------------------------------------------------------------------------------------------------
// The real tokenizers, exported from assets/ once per build folder.

long long mtime(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 ? (long long)st.st_mtime : -1;
}

// Path of the exported tokenizer, or "" (with `why`) when its source asset is missing.
std::string exported_tokenizer(const std::string& kind, const std::string& asset, const std::string& out_name,
                               std::string* why) {
  std::string src = "assets/" + asset;
  if (!file_exists(src)) {
    *why = src + " is missing: run scripts/fetch_assets.sh to fetch the real tokenizers";
    return "";
  }
  std::string dir = build_dir() + "/tokenizer", out = dir + "/" + out_name;
  long long t = mtime(out);
  if (t < 0 || t < mtime(src) || t < mtime("scripts/export_tokenizer.py") || t < mtime("scripts/lolcats_tokenizer.py")) {
    const char* py = getenv("PYTHON");
    std::string cmd = "mkdir -p '" + dir + "' && " + (py ? py : "python3") + " scripts/export_tokenizer.py " + kind +
                      " '" + src + "' '" + out + "' --quiet";
    if (system(cmd.c_str()) != 0) {
      ADD_FAILURE() << "export failed: " << cmd;
      return "";
    }
  }
  return out;
}

Tokenizer* real_tokenizer(const std::string& which, std::string* why) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> loaded;
  auto it = loaded.find(which);
  if (it != loaded.end()) return it->second.get();
  std::string path = which == "llama3"
                         ? exported_tokenizer("llama3", "llama3_tokenizer.model", "llama3.tok", why)
                         : exported_tokenizer("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2.tok", why);
  if (path.empty()) return nullptr;
  loaded[which] = std::make_unique<Tokenizer>(path);
  return loaded[which].get();
}

// True if every byte of `text` has a token of its own (else the encoder drops it and decode cannot
// give the text back).
bool all_bytes_have_tokens(const Tokenizer& t, const std::string& text) {
  for (unsigned char b : text)
    if (t.byte_token[b] < 0) return false;
  return true;
}

// Checks every case of `which`'s fixture whose source is (or is not, with `negate`) `source`.
void check_fixture(const std::string& which, const std::vector<std::string>& sources) {
  std::string why;
  Tokenizer* tok = real_tokenizer(which, &why);
  if (!tok) {
    if (!why.empty()) GTEST_SKIP() << why;
    return;
  }
  std::string path = "test/fixtures/tokenizer/" + which + ".txt";
  ASSERT_TRUE(file_exists(path)) << path << " is missing (scripts/make_tokenizer_fixtures.py)";
  size_t n_cases = 0, n_ids = 0, n_bytes = 0;
  for (const FixtureCase& c : load_fixture(path)) {
    if (std::find(sources.begin(), sources.end(), c.source) == sources.end()) continue;
    std::vector<std::string> units = case_units(c);
    if (units.empty()) GTEST_SKIP() << shared_dir() << "/data/" << c.arg << " is missing (set LOLCATS_SHARED)";
    ASSERT_EQ(units.size(), c.units.size()) << c.name << ": unit count";
    bool special = c.mode == "special";
    std::vector<int> all;
    for (size_t u = 0; u < units.size(); u++) {
      std::vector<int> ids = tok->encode(units[u], special);
      ASSERT_EQ(ids.size(), c.units[u].first) << which << " " << c.name << " " << c.mode << " unit " << u;
      ASSERT_EQ(fnv1a64(ids.data(), ids.size()), c.units[u].second)
          << which << " " << c.name << " " << c.mode << " unit " << u << ": same length, different ids";
      if (all_bytes_have_tokens(*tok, units[u])) {
        ASSERT_EQ(tok->decode(ids), units[u]) << which << " " << c.name << " unit " << u << ": decode(encode(x)) != x";
      }
      if (all.size() < c.ids.size()) all.insert(all.end(), ids.begin(), ids.end());
      n_ids += ids.size(), n_bytes += units[u].size();
    }
    all.resize(std::min(all.size(), c.ids.size()));
    ASSERT_EQ(all, c.ids) << which << " " << c.name << " " << c.mode;
    n_cases++;
  }
  EXPECT_GT(n_cases, 0u);
  printf("  %s: %zu cases, %zu bytes, %zu ids equal to the reference\n", which.c_str(), n_cases, n_bytes, n_ids);
}

TEST(TokenizerLlama3, MatchesTiktokenOnStressStrings) { check_fixture("llama3", {"inline"}); }
TEST(TokenizerLlama3, MatchesTiktokenOnSharedData) { check_fixture("llama3", {"file", "alpaca", "jsonl"}); }
TEST(TokenizerLlama3, MatchesTiktokenOnEveryCodePoint) { check_fixture("llama3", {"sweep"}); }
TEST(TokenizerSmolLM2, MatchesHFTokenizersOnStressStrings) { check_fixture("smollm2", {"inline"}); }
TEST(TokenizerSmolLM2, MatchesHFTokenizersOnSharedData) { check_fixture("smollm2", {"file", "alpaca", "jsonl"}); }
TEST(TokenizerSmolLM2, MatchesHFTokenizersOnEveryCodePoint) { check_fixture("smollm2", {"sweep"}); }

TEST(TokenizerLlama3, SpecialTokensAndHeader) {
  std::string why;
  Tokenizer* t = real_tokenizer("llama3", &why);
  if (!t) GTEST_SKIP() << why;
  EXPECT_EQ(t->vocab_size, 128256);
  EXPECT_EQ(t->bos_id, 128000);
  EXPECT_EQ(t->eos_id, 128001);
  EXPECT_EQ(t->special_id("<|eot_id|>"), 128009);
  EXPECT_EQ(t->special_id("<|reserved_special_token_245|>"), 128255);
  EXPECT_EQ(t->special_id("hello"), -1);
  EXPECT_EQ(t->decode({128006}), "<|start_header_id|>");
  // Plain mode: special-token text is ordinary text; special mode: one id. BOS/EOS are never added.
  std::vector<int> plain = t->encode("<|eot_id|>"), special = t->encode("<|eot_id|>", true);
  EXPECT_GT(plain.size(), 1u);
  EXPECT_EQ(special, std::vector<int>{128009});
  EXPECT_EQ(t->decode(plain), "<|eot_id|>");
  EXPECT_EQ(t->encode(""), std::vector<int>{});
}

TEST(TokenizerSmolLM2, SpecialTokensAndHeader) {
  std::string why;
  Tokenizer* t = real_tokenizer("smollm2", &why);
  if (!t) GTEST_SKIP() << why;
  EXPECT_EQ(t->vocab_size, 49152);
  EXPECT_EQ(t->bos_id, 1);  // <|im_start|>, as the GGUF says
  EXPECT_EQ(t->eos_id, 2);  // <|im_end|>
  EXPECT_EQ(t->special_id("<|endoftext|>"), 0);
  EXPECT_EQ(t->encode("<|im_start|>user", true).front(), 1);
}

// Random bytes, valid UTF-8 or not, come back unchanged (the references only take valid text, so this is
// the one property to hold there), in both special-token modes.
TEST(Tokenizer, RoundTripsRandomBytes) {
  for (const char* which : {"llama3", "smollm2"}) {
    std::string why;
    Tokenizer* t = real_tokenizer(which, &why);
    if (!t) GTEST_SKIP() << why;
    Rng rng(42);
    const char* pieces[] = {"a", "Z", "é", "日", "😀", " ", "  ", "\n", "\r\n", "\t", "'s", "'LL", "7", "123",
                            "<|eot_id|>", "<|im_start|>", "!", "\xC3", "\x80", "\xF0\x9F", "\xED\xA0\x80", "\xFF",
                            "\xC0\xAF", "\xF4\x90\x80\x80"};
    for (int trial = 0; trial < 3000; trial++) {
      std::string s;
      int n = 1 + (int)(rng.uniform() * 40);
      for (int k = 0; k < n; k++) {
        if (rng.uniform() < 0.3) s += (char)(rng.next() & 0xFF);
        else s += pieces[(size_t)(rng.uniform() * (sizeof pieces / sizeof *pieces))];
      }
      if (!all_bytes_have_tokens(*t, s)) continue;
      ASSERT_EQ(t->decode(t->encode(s, false)), s) << which << " trial " << trial;
      ASSERT_EQ(t->decode(t->encode(s, true)), s) << which << " trial " << trial;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// A small tokenizer file written here: the BPE rule on known merges, and every bad-file error.

struct TinyTokenizer {
  std::vector<std::pair<uint8_t, std::string>> tokens;  // (type, bytes)
  std::vector<std::array<uint32_t, 4>> merges;          // left, right, merged, priority
  uint32_t version = 1, flags = 0;
  int32_t bos = -1, eos = -1;
  std::string pretokenizer = "llama3", name = "tiny";

  TinyTokenizer() {
    for (int b = 0; b < 256; b++) tokens.push_back({0, std::string(1, (char)b)});
  }
  uint32_t add(const std::string& bytes, uint8_t type = 0) {
    tokens.push_back({type, bytes});
    return (uint32_t)tokens.size() - 1;
  }
  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> b(96, 0);
    memcpy(b.data(), "LOLCBPE1", 8);
    uint32_t hdr[6] = {version, (uint32_t)tokens.size(), (uint32_t)merges.size(), flags, (uint32_t)bos, (uint32_t)eos};
    memcpy(b.data() + 8, hdr, sizeof hdr);
    memcpy(b.data() + 32, pretokenizer.data(), std::min<size_t>(pretokenizer.size(), 24));
    memcpy(b.data() + 56, name.data(), std::min<size_t>(name.size(), 40));
    for (auto& [type, s] : tokens) {
      b.push_back(type);
      uint16_t len = (uint16_t)s.size();
      b.push_back((uint8_t)(len & 0xFF)), b.push_back((uint8_t)(len >> 8));
      b.insert(b.end(), s.begin(), s.end());
    }
    for (auto& m : merges) {
      size_t at = b.size();
      b.resize(at + 16);
      memcpy(b.data() + at, m.data(), 16);
    }
    return b;
  }
  std::string write(const std::string& path, const std::vector<uint8_t>& b) const {
    FILE* f = open_or_die(path, "wb");
    write_or_die(b.data(), b.size(), f, path);
    fclose(f);
    return path;
  }
  std::string write(const std::string& path) const { return write(path, bytes()); }
};

std::string tmp_path(const std::string& name) { return "/tmp/lolcats_tokenizer_test_" + name; }

// Merges: "a"+"b" (priority 2), "b"+"c" (priority 1), "ab"+"c" (priority 3): on "abc" the rule merges b c
// first, and then a + bc has no merge, so the answer is [a, bc] although "abc" is a token. With flag 0
// that is the answer; with the whole-piece flag (tiktoken's rule) "abc" comes back whole.
TEST(Tokenizer, MergesByPriorityLeftmostFirst) {
  TinyTokenizer t;
  uint32_t ab = t.add("ab"), bc = t.add("bc"), abc = t.add("abc"), aa = t.add("aa"), eot = t.add("<|eot|>", 1);
  t.merges = {{'b', 'c', bc, 1}, {'a', 'b', ab, 2}, {ab, 'c', abc, 3}, {'a', 'a', aa, 4}};
  t.bos = (int32_t)eot;
  Tokenizer tok(t.write(tmp_path("tiny.tok")));
  EXPECT_EQ(tok.encode("abc"), (std::vector<int>{'a', (int)bc}));
  EXPECT_EQ(tok.encode("abx"), (std::vector<int>{(int)ab, 'x'}));
  EXPECT_EQ(tok.encode("aaa"), (std::vector<int>{(int)aa, 'a'}));  // tie: the leftmost pair merges first
  EXPECT_EQ(tok.encode("aaaa"), (std::vector<int>{(int)aa, (int)aa}));
  // The same rule on a long piece (the heap path): 301 a's -> 150 "aa" then "a".
  std::vector<int> want(150, (int)aa);
  want.push_back('a');
  EXPECT_EQ(tok.encode(std::string(301, 'a')), want);
  EXPECT_EQ(tok.encode("x<|eot|>y", true), (std::vector<int>{'x', (int)eot, 'y'}));
  // As text, "<|eot|>" is split by the pattern into "<|", "eot", "|>", none of which has a merge here.
  EXPECT_EQ(tok.encode("x<|eot|>y", false), (std::vector<int>{'x', '<', '|', 'e', 'o', 't', '|', '>', 'y'}));
  t.flags = tok::kFlagWholePieceFirst;
  Tokenizer whole(t.write(tmp_path("tiny_whole.tok")));
  EXPECT_EQ(whole.encode("abc"), (std::vector<int>{(int)abc}));
}

TEST(Tokenizer, DecodeRefusesUnknownIds) {
  TinyTokenizer t;
  Tokenizer tok(t.write(tmp_path("tiny_decode.tok")));
  EXPECT_EQ(tok.decode({'h', 'i'}), "hi");
  EXPECT_EXIT(tok.decode({256}), testing::ExitedWithCode(1), "error: token id 256 is outside the vocabulary");
  EXPECT_EXIT(tok.decode({-1}), testing::ExitedWithCode(1), "error: token id -1 is outside the vocabulary");
}

TEST(Tokenizer, BadFilesAreRefusedWithOneLine) {
  auto refused = [](const std::string& path, const char* message) {
    EXPECT_EXIT(Tokenizer{path}, testing::ExitedWithCode(1), message) << path;
  };
  refused(tmp_path("does_not_exist.tok"), "error: cannot open");
  TinyTokenizer good;
  uint32_t ab = good.add("ab");
  good.merges = {{'a', 'b', ab, 0}};
  std::vector<uint8_t> b = good.bytes();
  EXPECT_EQ(Tokenizer{good.write(tmp_path("good.tok"))}.encode("ab"), std::vector<int>{(int)ab});

  auto variant = [&](const std::string& name, auto edit) {
    TinyTokenizer t = good;
    edit(t);
    return t.write(tmp_path(name + ".tok"));
  };
  std::vector<uint8_t> bad_magic = b;
  bad_magic[3] = 'X';
  refused(good.write(tmp_path("magic.tok"), bad_magic), "error: .*not a lolcats tokenizer file");
  refused(good.write(tmp_path("short.tok"), std::vector<uint8_t>(b.begin(), b.begin() + 50)), "error: .*bad magic");
  refused(variant("version", [](TinyTokenizer& t) { t.version = 2; }), "error: .*unsupported tokenizer file version 2");
  refused(variant("flags", [](TinyTokenizer& t) { t.flags = 6; }), "error: .*unknown flags");
  refused(variant("bos", [](TinyTokenizer& t) { t.bos = 9999; }), "error: .*bos id 9999");
  refused(variant("pretok", [](TinyTokenizer& t) { t.pretokenizer = "gpt4"; }), "error: .*unknown pre-tokenizer 'gpt4'");
  refused(variant("type", [](TinyTokenizer& t) { t.tokens[100].first = 7; }), "error: .*unknown type 7");
  refused(variant("empty", [](TinyTokenizer& t) { t.tokens[10].second = ""; }), "error: .*token 10 is empty");
  refused(variant("dup", [](TinyTokenizer& t) { t.add("ab"); }), "error: .*repeats the bytes");
  refused(variant("range", [](TinyTokenizer& t) { t.merges[0][2] = 5000; }), "error: .*outside the vocabulary");
  refused(variant("concat", [](TinyTokenizer& t) { t.merges[0][1] = 'c'; }), "error: .*does not join");
  refused(variant("pair", [](TinyTokenizer& t) { t.merges.push_back(t.merges[0]); t.merges[1][3] = 1; }),
          "error: .*repeats an earlier pair");
  refused(variant("order", [](TinyTokenizer& t) {
            uint32_t bc = t.add("bc");
            t.merges = {{'b', 'c', bc, 5}, {'a', 'b', 256, 1}};
          }),
          "error: .*not sorted by priority");
  std::vector<uint8_t> truncated(b.begin(), b.begin() + 96 + 3 * 200);
  refused(good.write(tmp_path("trunc_tokens.tok"), truncated), "error: .*truncated in the token table");
  std::vector<uint8_t> cut_merges(b.begin(), b.end() - 5), extra = b;
  extra.push_back(0);
  refused(good.write(tmp_path("trunc_merges.tok"), cut_merges), "error: .*merge table has");
  refused(good.write(tmp_path("trailing.tok"), extra), "error: .*merge table has");
}

}  // namespace
