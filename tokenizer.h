// tokenizer.h: byte-level BPE tokenizer (encode text to token ids, decode ids to bytes) for Llama 3
// (tiktoken ranks) and GPT-2-style vocab + merges (SmolLM2), read from our tokenizer file.
//
// Tokenizer file (.tok), written by scripts/export_tokenizer.py, little-endian:
//   header, 96 bytes:
//     char     magic[8]          "LOLCBPE1"
//     uint32   version           1
//     uint32   vocab_size        number of token ids, special tokens included
//     uint32   n_merges
//     uint32   flags             bit 0: a pre-token that is itself a normal token is emitted as that token
//                                before any merging (tiktoken does this; Hugging Face BPE does not)
//     int32    bos_id, eos_id    -1: none
//     char     pretokenizer[24]  NUL-padded name of the split rule: "llama3" or "smollm" (below)
//     char     name[40]          NUL-padded, e.g. "llama3", "smollm2-135M"
//   tokens, vocab_size records in id order:
//     uint8 type (0 normal, 1 special), uint16 n_bytes (>= 1), uint8 bytes[n_bytes]
//     A normal token's bytes are unique; a special token's bytes are its text (e.g. "<|eot_id|>").
//   merges, n_merges records: uint32 left_id, right_id, merged_id, priority
//     bytes(merged) = bytes(left) + bytes(right), all three normal; sorted by priority; no pair twice.
// Nothing follows. The loader checks all of the above and fails with one line (fatal) otherwise.
//
// Encoding. The text is cut at special tokens (only if asked: parse_special; leftmost, longest first),
// each remaining segment is split into pre-tokens by the tokenizer's pattern, and each pre-token is BPE
// merged on its own: it starts as one symbol per byte (a byte with no token is dropped, as Hugging Face's
// BPE without an unknown token does), then the adjacent pair with the lowest merge priority is merged,
// the leftmost on ties, until no pair has a merge. For tiktoken ranks the exporter lists every split of
// every token as a merge with the token's rank as priority, which is exactly tiktoken's rule.
// Pre-tokenizers (hand-written scanners over UTF-8, equal to the regexes with backtracking semantics):
//   "llama3"  (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
//             |\s*[\r\n]+|\s+(?!\S)|\s+
//   "smollm"  every numeric character alone (HF Digits, individual digits), then in the text between:
//             's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ (GPT-2, byte level)
// Character classes come from tokenizer_unicode.h (read off the reference engines). Bytes that are not
// valid UTF-8 count as one "other" character each (not a letter, number or space); the references take
// only valid text, so this choice only has to round-trip.
// Speed: pair priorities in an open-addressing hash map, a cache of encoded pre-tokens; encode() is
// therefore not const: use one Tokenizer per thread.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "tokenizer_unicode.h"

namespace tok {

// ---------------------------------------------------------------------------------------------------------
// Character classes

enum : uint8_t {
  kOther = 0,
  kLetter = 1,   // \p{L}
  kNumber = 2,   // \p{N}
  kSpace = 4,    // \s
  kNumeric = 8,  // what HF's Digits isolates (every \p{N}, and a few newer code points)
};

template <size_t N>
inline bool in_ranges(const uint32_t (&ranges)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;  // first range with end >= cp
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (ranges[mid][1] < cp) lo = mid + 1; else hi = mid;
  }
  return lo < N && ranges[lo][0] <= cp;
}

inline uint8_t class_by_search(uint32_t cp) {
  namespace u = tokenizer_unicode;
  if (in_ranges(u::kLetterRanges, cp)) return kLetter;
  if (in_ranges(u::kNumberRanges, cp)) return kNumber | kNumeric;
  if (in_ranges(u::kNumericExtraRanges, cp)) return kNumeric;
  if (in_ranges(u::kSpaceRanges, cp)) return kSpace;
  return kOther;
}

// Classes of the Basic Multilingual Plane in one table (64 KiB, built once); the rest by binary search.
inline const uint8_t* bmp_classes() {
  static const std::vector<uint8_t> table = [] {
    std::vector<uint8_t> t(0x10000);
    for (uint32_t cp = 0; cp < 0x10000; cp++) t[cp] = class_by_search(cp);
    return t;
  }();
  return table.data();
}

struct Char {
  uint32_t cp;   // 0xFFFFFFFF for a byte that is not valid UTF-8
  uint32_t len;  // bytes
  uint8_t cls;
};

// The character at s[i] (i < n). Overlong forms, surrogates and code points past U+10FFFF are invalid.
inline Char char_at(const uint8_t* s, size_t n, size_t i, const uint8_t* bmp) {
  uint32_t b0 = s[i];
  if (b0 < 0x80) return {b0, 1, bmp[b0]};
  Char bad = {0xFFFFFFFFu, 1, kOther};
  auto cont = [&](size_t k) { return i + k < n && (s[i + k] & 0xC0) == 0x80; };
  uint32_t cp, len;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (!cont(1)) return bad;
    cp = ((b0 & 0x1F) << 6) | (s[i + 1] & 0x3F), len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (!cont(1) || !cont(2)) return bad;
    cp = ((b0 & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F), len = 3;
    if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return bad;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return bad;
    cp = ((b0 & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F), len = 4;
    if (cp < 0x10000 || cp > 0x10FFFF) return bad;
  } else {
    return bad;
  }
  return {cp, len, cp < 0x10000 ? bmp[cp] : class_by_search(cp)};
}

// ---------------------------------------------------------------------------------------------------------
// Pre-tokenizers: each returns the end of the piece that starts at i (i < n).

struct Scanner {
  const uint8_t* s;
  size_t n;
  const uint8_t* bmp;
  Char at(size_t i) const { return char_at(s, n, i, bmp); }

  // End of the run of characters whose class has a bit in `want` and none in `stop`, from i.
  size_t run_end(size_t i, uint8_t want, uint8_t stop) const {
    while (i < n) {
      uint8_t b = s[i];
      if (b < 0x80) {  // ASCII fast path
        uint8_t c = bmp[b];
        if (!(c & want) || (c & stop)) return i;
        i++;
      } else {
        Char c = at(i);
        if (!(c.cls & want) || (c.cls & stop)) return i;
        i += c.len;
      }
    }
    return i;
  }
  // Run of "other" characters: not letter, number, space (nor numeric when `stop` has kNumeric).
  size_t others_end(size_t i, uint8_t stop) const {
    while (i < n) {
      uint8_t b = s[i];
      uint32_t len = 1;
      uint8_t c;
      if (b < 0x80) c = bmp[b];
      else { Char ch = at(i); c = ch.cls; len = ch.len; }
      if (c & stop) return i;
      i += len;
    }
    return i;
  }

  // Length of a contraction s t re ve m ll d after an apostrophe at j-1 (0: none). Case-insensitive as
  // Rust's regex (?i) is: simple case folding, which adds U+017F (long s) to s/S.
  size_t contraction(size_t j, bool ignore_case) const {
    if (j >= n) return 0;
    auto lower = [&](uint8_t b) -> uint8_t { return ignore_case && b >= 'A' && b <= 'Z' ? b + 32 : b; };
    uint8_t a = lower(s[j]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 1;
    if (ignore_case && a == 0xC5 && j + 1 < n && s[j + 1] == 0xBF) return 2;  // U+017F
    if (j + 1 < n) {
      uint8_t b = lower(s[j + 1]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 2;
    }
    return 0;
  }

  // Whitespace run from i: its end, the start of its last character, its character count (capped at 2),
  // and one past its last CR or LF (0 if none).
  struct SpaceRun { size_t end, last_start; int n_chars; size_t after_last_newline; };
  SpaceRun space_run(size_t i) const {
    SpaceRun r = {i, i, 0, 0};
    while (r.end < n) {
      uint8_t b = s[r.end];
      uint32_t len = 1;
      if (b < 0x80) {
        if (!(bmp[b] & kSpace)) break;
        if (b == '\r' || b == '\n') r.after_last_newline = r.end + 1;
      } else {
        Char c = at(r.end);
        if (!(c.cls & kSpace)) break;
        len = c.len;
      }
      r.last_start = r.end;
      r.end += len;
      if (r.n_chars < 2) r.n_chars++;
    }
    return r;
  }

  size_t llama3_piece_end(size_t i) const {
    Char c = at(i);
    size_t next = i + c.len;
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if (c.cp == '\'') {
      size_t k = contraction(next, true);
      if (k) return next + k;
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (c.cls & kLetter) return run_end(next, kLetter, 0);
    bool is_newline = c.cp == '\r' || c.cp == '\n';
    if (!(c.cls & kNumber) && !is_newline && next < n) {
      Char d = at(next);
      if (d.cls & kLetter) return run_end(next + d.len, kLetter, 0);
    }
    // \p{N}{1,3}
    if (c.cls & kNumber) {
      size_t j = next;
      for (int k = 1; k < 3 && j < n; k++) {
        Char d = at(j);
        if (!(d.cls & kNumber)) break;
        j += d.len;
      }
      return j;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    size_t run_start = SIZE_MAX;
    if (!(c.cls & (kLetter | kNumber | kSpace))) run_start = i;
    else if (c.cp == ' ' && next < n && !(at(next).cls & (kLetter | kNumber | kSpace))) run_start = next;
    if (run_start != SIZE_MAX) {
      size_t j = others_end(run_start, kLetter | kNumber | kSpace);
      while (j < n && (s[j] == '\r' || s[j] == '\n')) j++;
      return j;
    }
    // c is white space: \s*[\r\n]+ | \s+(?!\S) | \s+
    SpaceRun r = space_run(i);
    if (r.after_last_newline) return r.after_last_newline;
    if (r.end == n || r.n_chars == 1) return r.end;
    return r.last_start;
  }

  // GPT-2's byte-level pattern inside a segment that ends at n or at the next numeric character (HF's
  // Digits pre-tokenizer has already isolated those, so they end the text this pattern sees).
  bool segment_ends_at(size_t j) const { return j >= n || (at(j).cls & kNumeric); }

  size_t smollm_piece_end(size_t i) const {
    Char c = at(i);
    if (c.cls & kNumeric) return i + c.len;  // Digits(individual_digits=True)
    size_t next = i + c.len;
    // 's|'t|'re|'ve|'m|'ll|'d
    if (c.cp == '\'') {
      size_t k = contraction(next, false);
      if (k) return next + k;
    }
    // ` ?\p{L}+` (letters are never numeric)
    if (c.cls & kLetter) return run_end(next, kLetter, 0);
    if (c.cp == ' ' && next < n && (at(next).cls & kLetter)) return run_end(next, kLetter, 0);
    // ` ?\p{N}+` cannot match: every \p{N} is numeric, so a segment holds none.
    // ` ?[^\s\p{L}\p{N}]+`
    const uint8_t not_other = kLetter | kNumber | kSpace | kNumeric;
    if (!(c.cls & not_other)) return others_end(next, not_other);
    if (c.cp == ' ' && next < n && !(at(next).cls & not_other)) return others_end(next, not_other);
    // \s+(?!\S) | \s+
    SpaceRun r = space_run(i);
    if (segment_ends_at(r.end) || r.n_chars == 1) return r.end;
    return r.last_start;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Hash maps (open addressing, linear probing, power-of-two capacity)

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  const uint64_t k = 0x9E3779B97F4A7C15ull;
  uint64_t h = n * k;
  while (n >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    h = (h ^ w) * k;
    h ^= h >> 29;
    p += 8, n -= 8;
  }
  if (n) {
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * k;
  }
  h ^= h >> 32;
  h *= 0xD6E8FEB86659FD93ull;
  return h ^ (h >> 32);
}

// memcmp(a, b, n) == 0, without a library call for the short keys that dominate.
inline bool bytes_equal(const uint8_t* a, const uint8_t* b, size_t n) {
  if (n <= 8) {
    for (size_t i = 0; i < n; i++)
      if (a[i] != b[i]) return false;
    return true;
  }
  return memcmp(a, b, n) == 0;
}

inline size_t table_capacity(size_t n) {  // load factor at most 1/2
  size_t cap = 16;
  while (cap < 2 * n) cap *= 2;
  return cap;
}

// (left id, right id) -> (priority, merged id).
struct PairMap {
  struct Slot { uint64_t key; uint32_t priority, merged; };
  static constexpr uint64_t kEmpty = ~0ull;
  std::vector<Slot> slots;
  uint64_t mask = 0;

  static uint64_t key_of(uint32_t left, uint32_t right) { return (uint64_t)left << 32 | right; }
  static uint64_t slot_of(uint64_t key) { return (key * 0x9E3779B97F4A7C15ull) >> 20; }
  void reserve(size_t n) {
    slots.assign(table_capacity(n), Slot{kEmpty, 0, 0});
    mask = slots.size() - 1;
  }
  // False if the pair is already there.
  bool insert(uint32_t left, uint32_t right, uint32_t priority, uint32_t merged) {
    uint64_t key = key_of(left, right);
    for (uint64_t i = slot_of(key) & mask;; i = (i + 1) & mask) {
      if (slots[i].key == key) return false;
      if (slots[i].key == kEmpty) { slots[i] = {key, priority, merged}; return true; }
    }
  }
  const Slot* find(uint32_t left, uint32_t right) const {
    uint64_t key = key_of(left, right);
    for (uint64_t i = slot_of(key) & mask;; i = (i + 1) & mask) {
      const Slot& s = slots[i];
      if (s.key == key) return &s;
      if (s.key == kEmpty) return nullptr;
    }
  }
};

// Byte string -> int32 value; the keys live in an external arena (the token table).
struct BytesMap {
  struct Slot { uint64_t hash; uint32_t key_off, key_len; int32_t value; };  // key_len 0: empty
  std::vector<Slot> slots;
  uint64_t mask = 0;

  void reserve(size_t n) {
    slots.assign(table_capacity(n), Slot{0, 0, 0, 0});
    mask = slots.size() - 1;
  }
  const Slot* find(const uint8_t* arena, const uint8_t* p, size_t len, uint64_t h) const {
    if (slots.empty()) return nullptr;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots[i];
      if (s.key_len == 0) return nullptr;
      if (s.hash == h && s.key_len == len && bytes_equal(arena + s.key_off, p, len)) return &s;
    }
  }
  // False if the key is already there.
  bool insert(const uint8_t* arena, uint32_t key_off, uint32_t key_len, int32_t value) {
    uint64_t h = hash_bytes(arena + key_off, key_len);
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots[i];
      if (s.key_len == 0) { s = {h, key_off, key_len, value}; return true; }
      if (s.hash == h && s.key_len == key_len && memcmp(arena + s.key_off, arena + key_off, key_len) == 0)
        return false;
    }
  }
};

// Encoded pre-tokens: bytes -> ids. Bounded: emptied when half full (frequent pieces come straight back).
struct PieceCache {
  static constexpr size_t kMaxKeyBytes = 64;
  struct Slot { uint64_t hash; uint32_t key_off, ids_off; uint16_t key_len, n_ids; };  // key_len 0: empty
  std::vector<Slot> slots;
  std::vector<uint8_t> keys;
  std::vector<int32_t> ids;
  size_t used = 0;

  explicit PieceCache(size_t capacity = 1 << 16) : slots(capacity, Slot{0, 0, 0, 0, 0}) {}
  const Slot* find(const uint8_t* p, size_t len, uint64_t h) const {
    size_t mask = slots.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots[i];
      if (s.key_len == 0) return nullptr;
      if (s.hash == h && s.key_len == len && bytes_equal(keys.data() + s.key_off, p, len)) return &s;
    }
  }
  void insert(const uint8_t* p, size_t len, uint64_t h, const int32_t* piece_ids, size_t n_ids) {
    if (len == 0 || len > kMaxKeyBytes || n_ids > 0xFFFF) return;
    if (2 * (used + 1) > slots.size()) clear();
    size_t mask = slots.size() - 1;
    size_t i = h & mask;
    while (slots[i].key_len != 0) i = (i + 1) & mask;
    slots[i] = {h, (uint32_t)keys.size(), (uint32_t)ids.size(), (uint16_t)len, (uint16_t)n_ids};
    keys.insert(keys.end(), p, p + len);
    ids.insert(ids.end(), piece_ids, piece_ids + n_ids);
    used++;
  }
  void clear() {
    std::fill(slots.begin(), slots.end(), Slot{0, 0, 0, 0, 0});
    keys.clear();
    ids.clear();
    used = 0;
  }
};

// ---------------------------------------------------------------------------------------------------------
// The tokenizer

enum class PreTokenizer { kLlama3, kSmolLM };
constexpr uint32_t kFlagWholePieceFirst = 1;
constexpr uint8_t kTokenNormal = 0, kTokenSpecial = 1;
constexpr size_t kFileHeaderBytes = 96;

struct Tokenizer {
  std::string name, pretokenizer_name;
  PreTokenizer pretokenizer = PreTokenizer::kLlama3;
  uint32_t flags = 0;
  int vocab_size = 0, bos_id = -1, eos_id = -1;
  std::vector<uint8_t> token_bytes;     // every token's bytes, concatenated
  std::vector<uint32_t> token_offset;   // (vocab_size + 1): token t is token_bytes[offset[t], offset[t+1])
  std::vector<uint8_t> token_type;      // kTokenNormal / kTokenSpecial
  int32_t byte_token[256];              // id of the single-byte token, -1 if none (the byte is dropped)
  PairMap merges;
  BytesMap normal_tokens;               // bytes -> id, normal tokens
  BytesMap special_tokens;              // text -> id, special tokens
  std::vector<uint32_t> special_lengths;  // distinct special-token lengths, longest first
  bool special_first_byte[256] = {};
  PieceCache cache;
  const uint8_t* bmp = bmp_classes();
  std::vector<int32_t> scratch_ids;     // BPE work space
  std::vector<uint32_t> scratch_u32;

  Tokenizer() { std::fill(byte_token, byte_token + 256, -1); }
  explicit Tokenizer(const std::string& path) : Tokenizer() { load(path); }

  size_t token_len(int id) const { return token_offset[id + 1] - token_offset[id]; }
  const uint8_t* token_data(int id) const { return token_bytes.data() + token_offset[id]; }
  bool is_special(int id) const { return id >= 0 && id < vocab_size && token_type[id] == kTokenSpecial; }

  // Id of a special token given its text, -1 if there is none.
  int special_id(const std::string& text) const {
    if (text.empty()) return -1;
    auto* s = special_tokens.find(token_bytes.data(), (const uint8_t*)text.data(), text.size(),
                                  hash_bytes((const uint8_t*)text.data(), text.size()));
    return s ? s->value : -1;
  }

  void load(const std::string& path) {
    FILE* f = open_or_die(path, "rb");
    long long size = file_size_or_die(f, path);
    std::vector<uint8_t> buf((size_t)size);
    read_or_die(buf.data(), buf.size(), f, path, "the tokenizer file");
    fclose(f);
    parse(buf, path);
  }

  // ---- encoding

  std::vector<int> encode(const std::string& text, bool parse_special = false) {
    std::vector<int> out;
    encode_append(text.data(), text.size(), out, parse_special);
    return out;
  }

  // Appends the ids of text[0, n) to out. parse_special: special-token text becomes the special id;
  // otherwise it is ordinary text. BOS/EOS are never added here (the caller adds them).
  void encode_append(const char* text, size_t n, std::vector<int>& out, bool parse_special = false) {
    const uint8_t* s = (const uint8_t*)text;
    if (!parse_special || special_lengths.empty()) return encode_segment(s, n, out);
    size_t seg = 0;
    for (size_t i = 0; i < n; i++) {
      if (!special_first_byte[s[i]]) continue;
      for (uint32_t len : special_lengths) {
        if (len > n - i) continue;
        auto* hit = special_tokens.find(token_bytes.data(), s + i, len, hash_bytes(s + i, len));
        if (!hit) continue;
        encode_segment(s + seg, i - seg, out);
        out.push_back(hit->value);
        seg = i + len;
        i = seg - 1;
        break;
      }
    }
    encode_segment(s + seg, n - seg, out);
  }

  std::string decode(const std::vector<int>& ids) const {
    std::string out;
    for (int id : ids) append_token(out, id);
    return out;
  }
  std::string decode_token(int id) const {
    std::string out;
    append_token(out, id);
    return out;
  }
  void append_token(std::string& out, int id) const {
    if (id < 0 || id >= vocab_size) fatal("token id %d is outside the vocabulary of '%s' (%d)", id, name.c_str(), vocab_size);
    out.append((const char*)token_data(id), token_len(id));
  }

 private:
  void encode_segment(const uint8_t* s, size_t n, std::vector<int>& out) {
    Scanner sc{s, n, bmp};
    size_t i = 0;
    if (pretokenizer == PreTokenizer::kLlama3) {
      while (i < n) {
        size_t j = sc.llama3_piece_end(i);
        encode_piece(s + i, j - i, out);
        i = j;
      }
    } else {
      while (i < n) {
        size_t j = sc.smollm_piece_end(i);
        encode_piece(s + i, j - i, out);
        i = j;
      }
    }
  }

  void encode_piece(const uint8_t* p, size_t len, std::vector<int>& out) {
    if (len == 1) {
      if (byte_token[p[0]] >= 0) out.push_back(byte_token[p[0]]);
      return;
    }
    uint64_t h = hash_bytes(p, len);
    // The cache first: it is small and hot, and it holds whole-token pieces too.
    if (auto* c = cache.find(p, len, h)) {
      const int32_t* ids = cache.ids.data() + c->ids_off;
      if (c->n_ids == 1) out.push_back(ids[0]);
      else out.insert(out.end(), ids, ids + c->n_ids);
      return;
    }
    size_t first = out.size();
    const BytesMap::Slot* whole = nullptr;
    if (flags & kFlagWholePieceFirst) whole = normal_tokens.find(token_bytes.data(), p, len, h);
    if (whole) out.push_back(whole->value);
    else bpe(p, len, out);
    cache.insert(p, len, h, out.data() + first, out.size() - first);
  }

  // Merge the bytes of one pre-token (see the header comment for the rule) and append the ids.
  static constexpr uint32_t kNoMerge = 0xFFFFFFFFu;
  static constexpr size_t kLinearMaxSymbols = 128;

  void bpe(const uint8_t* p, size_t len, std::vector<int>& out) {
    std::vector<int32_t>& ids = scratch_ids;
    ids.clear();
    for (size_t i = 0; i < len; i++)
      if (byte_token[p[i]] >= 0) ids.push_back(byte_token[p[i]]);
    if (ids.size() <= kLinearMaxSymbols) bpe_linear(ids);
    else bpe_heap(ids);
    out.insert(out.end(), ids.begin(), ids.end());
  }

  // Short pieces: pair priorities in an array, the minimum found by a scan, symbols removed in place.
  void bpe_linear(std::vector<int32_t>& ids) {
    size_t m = ids.size();
    if (m < 2) return;
    uint32_t prio[kLinearMaxSymbols], merged[kLinearMaxSymbols];
    auto look = [&](size_t k) {  // pair (k, k+1)
      auto* slot = merges.find((uint32_t)ids[k], (uint32_t)ids[k + 1]);
      prio[k] = slot ? slot->priority : kNoMerge;
      merged[k] = slot ? slot->merged : 0;
    };
    for (size_t k = 0; k + 1 < m; k++) look(k);
    while (m > 1) {
      size_t best = 0;
      for (size_t k = 1; k + 1 < m; k++)
        if (prio[k] < prio[best]) best = k;
      if (prio[best] == kNoMerge) break;
      ids[best] = (int32_t)merged[best];
      // remove symbol best+1 and pair (best+1, best+2)
      for (size_t k = best + 1; k + 1 < m; k++) ids[k] = ids[k + 1];
      for (size_t k = best + 1; k + 2 < m; k++) prio[k] = prio[k + 1], merged[k] = merged[k + 1];
      m--;
      if (best + 1 < m) look(best);
      else prio[best] = kNoMerge;
      if (best > 0) look(best - 1);
    }
    ids.resize(m);
  }

  // Long pieces: a linked list of symbols and a min-heap of (priority, position) with stale entries
  // skipped; the position is the symbol's first byte index, so ties go to the leftmost pair.
  void bpe_heap(std::vector<int32_t>& ids) {
    size_t m = ids.size();
    std::vector<uint32_t>& next = scratch_u32;
    next.resize(2 * m);
    uint32_t* prev = next.data() + m;
    for (size_t k = 0; k < m; k++) next[k] = (uint32_t)(k + 1), prev[k] = (uint32_t)(k - 1);
    struct Entry { uint32_t priority, left, right; int32_t left_id, right_id; uint32_t merged; };
    auto later = [](const Entry& a, const Entry& b) {
      return a.priority != b.priority ? a.priority > b.priority : a.left > b.left;
    };
    std::vector<Entry> heap;
    auto push = [&](uint32_t left, uint32_t right) {
      if (right >= m) return;
      auto* slot = merges.find((uint32_t)ids[left], (uint32_t)ids[right]);
      if (!slot) return;
      heap.push_back({slot->priority, left, right, ids[left], ids[right], slot->merged});
      std::push_heap(heap.begin(), heap.end(), later);
    };
    std::vector<uint8_t> alive(m, 1);
    for (size_t k = 0; k + 1 < m; k++) push((uint32_t)k, (uint32_t)(k + 1));
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      Entry e = heap.back();
      heap.pop_back();
      if (!alive[e.left] || next[e.left] != e.right || ids[e.left] != e.left_id || ids[e.right] != e.right_id)
        continue;  // stale
      ids[e.left] = (int32_t)e.merged;
      alive[e.right] = 0;
      next[e.left] = next[e.right];
      if (next[e.right] < m) prev[next[e.right]] = e.left;
      if (prev[e.left] < m) push(prev[e.left], e.left);
      push(e.left, next[e.left]);
    }
    size_t w = 0;
    for (size_t k = 0; k < m; k = next[k]) ids[w++] = ids[k];
    ids.resize(w);
  }

  // ---- loading

  void parse(const std::vector<uint8_t>& buf, const std::string& path) {
    const char* p = path.c_str();
    if (buf.size() < kFileHeaderBytes || memcmp(buf.data(), "LOLCBPE1", 8) != 0)
      fatal("'%s' is not a lolcats tokenizer file (bad magic; make one with scripts/export_tokenizer.py)", p);
    auto u32 = [&](size_t off) { uint32_t v; memcpy(&v, buf.data() + off, 4); return v; };
    auto i32 = [&](size_t off) { int32_t v; memcpy(&v, buf.data() + off, 4); return v; };
    uint32_t version = u32(8), n_tokens = u32(12), n_merges = u32(16);
    flags = u32(20);
    bos_id = i32(24), eos_id = i32(28);
    if (version != 1) fatal("'%s': unsupported tokenizer file version %u (expected 1)", p, version);
    if (n_tokens < 256 || n_tokens > (1u << 30)) fatal("'%s': bad vocabulary size %u", p, n_tokens);
    if (flags & ~kFlagWholePieceFirst) fatal("'%s': unknown flags 0x%x", p, flags);
    vocab_size = (int)n_tokens;
    if (bos_id < -1 || bos_id >= vocab_size || eos_id < -1 || eos_id >= vocab_size)
      fatal("'%s': bos id %d or eos id %d is outside the vocabulary (%d)", p, bos_id, eos_id, vocab_size);
    auto fixed_string = [&](size_t off, size_t len, const char* what) {
      const char* s = (const char*)buf.data() + off;
      size_t k = strnlen(s, len);
      if (k == len) fatal("'%s': the %s field is not NUL-terminated", p, what);
      for (size_t i = k; i < len; i++)
        if (s[i]) fatal("'%s': the %s field has bytes after its NUL", p, what);
      return std::string(s, k);
    };
    pretokenizer_name = fixed_string(32, 24, "pretokenizer");
    name = fixed_string(56, 40, "name");
    if (pretokenizer_name == "llama3") pretokenizer = PreTokenizer::kLlama3;
    else if (pretokenizer_name == "smollm") pretokenizer = PreTokenizer::kSmolLM;
    else fatal("'%s': unknown pre-tokenizer '%s' (known: llama3, smollm)", p, pretokenizer_name.c_str());

    // Token table.
    size_t pos = kFileHeaderBytes;
    token_offset.assign(n_tokens + 1, 0);
    token_type.assign(n_tokens, 0);
    token_bytes.clear();
    token_bytes.reserve(buf.size());
    for (uint32_t t = 0; t < n_tokens; t++) {
      if (buf.size() - pos < 3) fatal("'%s' is truncated in the token table (token %u of %u)", p, t, n_tokens);
      uint8_t type = buf[pos];
      uint16_t len;
      memcpy(&len, buf.data() + pos + 1, 2);
      pos += 3;
      if (type > kTokenSpecial) fatal("'%s': token %u has unknown type %u", p, t, type);
      if (len == 0) fatal("'%s': token %u is empty", p, t);
      if (buf.size() - pos < len) fatal("'%s' is truncated in the token table (token %u of %u)", p, t, n_tokens);
      token_type[t] = type;
      token_offset[t] = (uint32_t)token_bytes.size();
      token_bytes.insert(token_bytes.end(), buf.begin() + pos, buf.begin() + pos + len);
      pos += len;
    }
    token_offset[n_tokens] = (uint32_t)token_bytes.size();
    size_t n_special = 0;
    for (uint32_t t = 0; t < n_tokens; t++) n_special += token_type[t] == kTokenSpecial;
    normal_tokens.reserve(n_tokens - n_special);
    special_tokens.reserve(n_special);
    std::fill(byte_token, byte_token + 256, -1);
    std::fill(special_first_byte, special_first_byte + 256, false);
    special_lengths.clear();
    for (uint32_t t = 0; t < n_tokens; t++) {
      uint32_t len = token_offset[t + 1] - token_offset[t];
      const uint8_t* bytes = token_bytes.data() + token_offset[t];
      if (token_type[t] == kTokenNormal) {
        if (!normal_tokens.insert(token_bytes.data(), token_offset[t], len, (int32_t)t))
          fatal("'%s': normal token %u repeats the bytes of an earlier token", p, t);
        if (len == 1) byte_token[bytes[0]] = (int32_t)t;
      } else {
        if (!special_tokens.insert(token_bytes.data(), token_offset[t], len, (int32_t)t))
          fatal("'%s': special token %u repeats the text of an earlier one", p, t);
        special_first_byte[bytes[0]] = true;
        if (std::find(special_lengths.begin(), special_lengths.end(), len) == special_lengths.end())
          special_lengths.push_back(len);
      }
    }
    std::sort(special_lengths.rbegin(), special_lengths.rend());

    // Merges.
    if ((buf.size() - pos) != (size_t)n_merges * 16)
      fatal("'%s': the merge table has %zu bytes, expected %zu (truncated or trailing data)", p, buf.size() - pos,
            (size_t)n_merges * 16);
    merges.reserve(n_merges);
    uint32_t last_priority = 0;
    for (uint32_t k = 0; k < n_merges; k++, pos += 16) {
      uint32_t left = u32(pos), right = u32(pos + 4), merged = u32(pos + 8), priority = u32(pos + 12);
      if (left >= n_tokens || right >= n_tokens || merged >= n_tokens)
        fatal("'%s': merge %u names a token outside the vocabulary", p, k);
      if (token_type[left] || token_type[right] || token_type[merged] ||
          token_len(left) + token_len(right) != token_len(merged) ||
          memcmp(token_data(left), token_data(merged), token_len(left)) != 0 ||
          memcmp(token_data(right), token_data(merged) + token_len(left), token_len(right)) != 0)
        fatal("'%s': merge %u (%u + %u -> %u) does not join the two tokens' bytes", p, k, left, right, merged);
      if (priority < last_priority) fatal("'%s': merges are not sorted by priority (merge %u)", p, k);
      if (priority == kNoMerge) fatal("'%s': merge %u has the reserved priority 0xFFFFFFFF", p, k);
      last_priority = priority;
      if (!merges.insert(left, right, priority, merged)) fatal("'%s': merge %u repeats an earlier pair", p, k);
    }
    cache.clear();
  }
};

}  // namespace tok

using tok::Tokenizer;
