// dataloader.h: the token shard file (validation, memory-mapped reading) and DataLoader, which turns a
// directory of shards into B x T batches of (inputs, targets, mask) on the host: shuffled per epoch from
// a seed, split disjointly across ranks, with a position that can be saved and restored exactly.
// The trainer copies the batches to the GPU itself.
//
// Shard file (written by scripts/prepare_alpaca.py), little-endian:
//   ShardHeader (64 bytes, below), then uint32 tokens[n_tokens], then, if flags & SHARD_HAS_MASK,
//   uint8 mask[n_tokens] (1 = a response or EOS token: a target that counts in the stage-2 loss).
//   The file size must be exactly 64 + 4 n + (mask ? n : 0). Names: <prefix>_<split>_NNNN.bin, NNNN
//   counting from 0000 without gaps; split is "train" or "val".
//
// Sequences. A shard with seq_len = S > 0 holds n_tokens / S sequences of S tokens, back to back (the
// preparer concatenated the samples and cut the stream; sequences never cross shards). A shard with
// seq_len = 0 is a plain stream, which the loader cuts into T-token sequences, dropping each shard's tail.
// A sequence of T tokens x[0..T-1] gives one batch row, as Hugging Face trains (labels shifted inside the
// sequence):
//   inputs[t]  = x[t]                          t = 0..T-1
//   targets[t] = x[t+1],  mask[t] = m[t+1]     t = 0..T-2   (m = the shard mask, all ones without one)
//   targets[T-1] = 0,     mask[T-1] = 0        (no next token in the sequence: the target does not exist;
//                                               0 is a valid id, so indexing logits by it stays in range)
// So the mask shifts with the targets, and a row has at most T-1 counted targets.
//
// The stream. The sequences of a split (all shards, in file order, numbered 0..N-1) form an endless
// stream of epochs: epoch e is a permutation P_e of 0..N-1 (Fisher-Yates from (seed, e); the identity
// when shuffle is off), and global position g is sequence P_{g / N}[g % N]. Step s of R ranks with batch
// B takes positions g0 + s*R*B .. g0 + (s+1)*R*B - 1; rank r gets rows g0 + s*R*B + r*B + b, b = 0..B-1.
// So ranks are disjoint, and across ranks every sequence of every epoch is seen exactly once: nothing is
// dropped, and when N is not a multiple of R*B a batch simply spans an epoch boundary (its first rows end
// epoch e, the rest begin epoch e+1). epoch() is the epoch of the next batch's first row.
// The position (LoaderPosition) is the next g plus the seed: it does not depend on the rank, and a loader
// restored from it yields exactly the stream the saved one would have, even with another B or R.
#pragma once
#include "common.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "shards are little-endian and read in place");

static const char kShardMagic[8] = {'L', 'O', 'L', 'C', 'T', 'O', 'K', '1'};
static const uint32_t kShardVersion = 1;
enum ShardFlags : uint32_t { SHARD_HAS_MASK = 1 };

#pragma pack(push, 1)
struct ShardHeader {
  char magic[8];        // "LOLCTOK1"
  uint32_t version;     // kShardVersion
  uint32_t vocab_size;  // every token id is < vocab_size
  uint64_t n_tokens;    // > 0
  uint32_t flags;       // ShardFlags
  int32_t bos_id;       // -1 when unknown
  int32_t eos_id;       // -1 when unknown
  uint32_t seq_len;     // sequence length the preparer cut to; 0 = a plain stream
  uint8_t reserved[24]; // zero
};
#pragma pack(pop)
static_assert(sizeof(ShardHeader) == 64, "shard header must be 64 bytes");

// One shard, memory-mapped read-only (ranks on one host share the page cache) and fully validated on
// open: every failure is a one-line fatal() naming the file.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path) : path_(path) {
    int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) fatal("cannot open shard '%s' (%s)", path.c_str(), strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) fatal("cannot stat shard '%s' (%s)", path.c_str(), strerror(errno));
    const uint64_t size = (uint64_t)st.st_size;
    if (size == 0) fatal("shard '%s' is empty (0 bytes)", path.c_str());
    if (size < sizeof(ShardHeader))
      fatal("shard '%s' is truncated: %llu bytes, shorter than the 64-byte header", path.c_str(), (unsigned long long)size);
    map_bytes_ = size;
    map_ = mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map_ == MAP_FAILED) fatal("cannot map shard '%s' (%s)", path.c_str(), strerror(errno));
    memcpy(&header_, map_, sizeof header_);
    validate(size);
    tokens_ = (const uint32_t*)((const char*)map_ + sizeof(ShardHeader));
    mask_ = has_mask() ? (const uint8_t*)(tokens_ + header_.n_tokens) : nullptr;
    check_contents();
  }
  ~TokenShard() {
    if (map_ && map_ != MAP_FAILED) munmap(map_, map_bytes_);
  }
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const std::string& path() const { return path_; }
  const ShardHeader& header() const { return header_; }
  uint64_t n_tokens() const { return header_.n_tokens; }
  bool has_mask() const { return header_.flags & SHARD_HAS_MASK; }
  const uint32_t* tokens() const { return tokens_; }  // (n_tokens,)
  const uint8_t* mask() const { return mask_; }       // (n_tokens,) or nullptr

 private:
  void validate(uint64_t size) {
    const char* p = path_.c_str();
    const ShardHeader& h = header_;
    if (memcmp(h.magic, kShardMagic, 8) != 0) fatal("shard '%s' is corrupt: bad magic (not a LOLCTOK1 token shard)", p);
    if (h.version != kShardVersion) fatal("shard '%s' has unsupported version %u (expected %u)", p, h.version, kShardVersion);
    for (uint8_t b : h.reserved)
      if (b) fatal("shard '%s' is corrupt: nonzero reserved header bytes", p);
    if (h.flags & ~(uint32_t)SHARD_HAS_MASK) fatal("shard '%s' is corrupt: unknown flags 0x%x", p, h.flags);
    if (h.vocab_size == 0) fatal("shard '%s' is corrupt: vocab_size 0", p);
    if (h.n_tokens == 0) fatal("shard '%s' is empty (0 tokens)", p);
    const uint64_t per_token = 4 + (has_mask() ? 1 : 0);
    const uint64_t payload = size - sizeof(ShardHeader);
    if (h.n_tokens > payload / per_token)  // also guards the multiplication below against overflow
      fatal("shard '%s' is truncated: %llu bytes, the header promises %llu tokens%s", p, (unsigned long long)size,
            (unsigned long long)h.n_tokens, has_mask() ? " and a mask" : "");
    if (payload != h.n_tokens * per_token)
      fatal("shard '%s' is corrupt: %llu bytes after the data (the header promises %llu tokens%s)", p,
            (unsigned long long)(payload - h.n_tokens * per_token), (unsigned long long)h.n_tokens,
            has_mask() ? " and a mask" : "");
    if (h.seq_len == 1) fatal("shard '%s' is corrupt: seq_len 1 (a sequence needs a target)", p);
    if (h.seq_len && h.n_tokens % h.seq_len)
      fatal("shard '%s' is corrupt: %llu tokens is not a whole number of %u-token sequences", p,
            (unsigned long long)h.n_tokens, h.seq_len);
    if (h.bos_id < -1 || (h.bos_id >= 0 && (uint32_t)h.bos_id >= h.vocab_size))
      fatal("shard '%s' is corrupt: bos_id %d outside vocab_size %u", p, h.bos_id, h.vocab_size);
    if (h.eos_id < -1 || (h.eos_id >= 0 && (uint32_t)h.eos_id >= h.vocab_size))
      fatal("shard '%s' is corrupt: eos_id %d outside vocab_size %u", p, h.eos_id, h.vocab_size);
  }
  // One pass over the data: a token id >= vocab_size would index past the embedding table on the GPU.
  void check_contents() {
    const uint64_t n = header_.n_tokens;
    uint32_t max_id = 0;
    for (uint64_t i = 0; i < n; i++) max_id = std::max(max_id, tokens_[i]);
    if (max_id >= header_.vocab_size) {
      uint64_t i = 0;
      while (tokens_[i] < header_.vocab_size) i++;
      fatal("shard '%s' is corrupt: token %u at index %llu is >= vocab_size %u", path_.c_str(), tokens_[i],
            (unsigned long long)i, header_.vocab_size);
    }
    if (mask_) {
      uint8_t max_m = 0;
      for (uint64_t i = 0; i < n; i++) max_m = std::max(max_m, mask_[i]);
      if (max_m > 1) fatal("shard '%s' is corrupt: mask value %u (masks are 0 or 1)", path_.c_str(), max_m);
    }
  }

  std::string path_;
  ShardHeader header_;
  void* map_ = nullptr;
  uint64_t map_bytes_ = 0;
  const uint32_t* tokens_ = nullptr;
  const uint8_t* mask_ = nullptr;
};

// The shards of one split in a directory, sorted by index. prefix "" accepts any single prefix (two
// different prefixes for the split in one directory are refused rather than silently mixed).
inline std::vector<std::string> list_shards(const std::string& dir, const std::string& split,
                                            const std::string& prefix = "") {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fatal("shard directory '%s' does not exist", dir.c_str());
  const std::regex name_re("^(.+)_(train|val)_([0-9]{4,})\\.bin$");
  std::map<uint64_t, std::string> by_index;
  std::string found_prefix;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, name_re) || m[2] != split) continue;
    if (!prefix.empty() && m[1] != prefix) continue;
    if (found_prefix.empty()) found_prefix = m[1];
    if (m[1] != found_prefix)
      fatal("'%s' holds %s shards of two prefixes ('%s', '%s'): pass the prefix to use", dir.c_str(),
            split.c_str(), found_prefix.c_str(), std::string(m[1]).c_str());
    by_index[std::stoull(m[3])] = entry.path().string();
  }
  if (ec) fatal("cannot list shard directory '%s' (%s)", dir.c_str(), ec.message().c_str());
  if (by_index.empty())
    fatal("no %s shards in '%s' (expected %s_%s_0000.bin, ...)", split.c_str(), dir.c_str(),
          prefix.empty() ? "<prefix>" : prefix.c_str(), split.c_str());
  std::vector<std::string> paths;
  for (const auto& [index, path] : by_index) {
    if (index != paths.size())
      fatal("'%s': %s shard %04llu is missing (found shard %04llu)", dir.c_str(), split.c_str(),
            (unsigned long long)paths.size(), (unsigned long long)index);
    paths.push_back(path);
  }
  return paths;
}

// Where a loader is in its stream; a plain struct to store in checkpoints. Rank-independent.
struct LoaderPosition {
  uint64_t seed;         // shuffle seed (a restored loader takes it from here, not from its constructor)
  uint64_t epoch;        // epoch of the next batch's first row
  uint64_t index;        // that row's position within the epoch (0..n_sequences-1)
  uint64_t n_sequences;  // sequences per epoch when saved: restoring on other data is refused
};

// One batch, host side. Row-major (B, T).
struct Batch {
  int B = 0, T = 0;
  std::vector<int32_t> inputs;   // (B, T) token ids
  std::vector<int32_t> targets;  // (B, T) the next token within the sequence; 0 where none exists
  std::vector<uint8_t> mask;     // (B, T) 1 = this target counts in the loss
};

class DataLoader {
 public:
  // dir/split: which shards (split "train" or "val"; prefix "" = the directory's only prefix).
  // B: rows per batch on this rank. T: sequence length; 0 = the shards' seq_len, and a nonzero T must
  // equal it (re-run the preparer for another T); plain-stream shards (seq_len 0) need T >= 2.
  // rank/n_ranks: this process's share. seed/shuffle: per-epoch order (val: shuffle = false).
  DataLoader(const std::string& dir, const std::string& split, int B, int T, int rank, int n_ranks,
             uint64_t seed, bool shuffle = true, const std::string& prefix = "")
      : B_(B), rank_(rank), n_ranks_(n_ranks), seed_(seed), shuffle_(shuffle) {
    if (split != "train" && split != "val") fatal("data split must be 'train' or 'val', not '%s'", split.c_str());
    if (B < 1) fatal("batch size must be >= 1 (got %d)", B);
    if (n_ranks < 1 || rank < 0 || rank >= n_ranks) fatal("rank %d of %d is not a valid rank", rank, n_ranks);
    for (const std::string& path : list_shards(dir, split, prefix)) shards_.emplace_back(new TokenShard(path));
    const ShardHeader& h0 = shards_[0]->header();
    for (const auto& s : shards_) {
      const ShardHeader& h = s->header();
      const char *p0 = shards_[0]->path().c_str(), *p = s->path().c_str();
      if (h.vocab_size != h0.vocab_size)
        fatal("shards disagree on vocab_size: '%s' has %u, '%s' has %u", p0, h0.vocab_size, p, h.vocab_size);
      if (h.seq_len != h0.seq_len)
        fatal("shards disagree on seq_len: '%s' has %u, '%s' has %u", p0, h0.seq_len, p, h.seq_len);
      if (h.flags != h0.flags) fatal("shards disagree on having a loss mask: '%s' and '%s'", p0, p);
      if (h.bos_id != h0.bos_id || h.eos_id != h0.eos_id)
        fatal("shards disagree on bos/eos ids: '%s' has %d/%d, '%s' has %d/%d", p0, h0.bos_id, h0.eos_id, p,
              h.bos_id, h.eos_id);
    }
    if (h0.seq_len) {
      if (T != 0 && (uint32_t)T != h0.seq_len)
        fatal("shards in '%s' hold %u-token sequences, but T = %d was asked for", dir.c_str(), h0.seq_len, T);
      T_ = (int)h0.seq_len;
    } else {
      if (T < 2) fatal("shards in '%s' are plain streams (seq_len 0): give T >= 2", dir.c_str());
      T_ = T;
    }
    // Sequence n of the split starts at token seq_start_[n].second of shard seq_start_[n].first.
    for (uint32_t s = 0; s < shards_.size(); s++)
      for (uint64_t off = 0; off + (uint64_t)T_ <= shards_[s]->n_tokens(); off += (uint64_t)T_)
        seq_start_.push_back({s, off});
    if (seq_start_.empty())
      fatal("%s shards in '%s' hold no complete %d-token sequence", split.c_str(), dir.c_str(), T_);
    n_sequences_ = seq_start_.size();
  }

  // What the trainer checks against its model and buffers.
  uint32_t vocab_size() const { return shards_[0]->header().vocab_size; }
  int seq_len() const { return T_; }
  int batch_size() const { return B_; }
  int32_t bos_id() const { return shards_[0]->header().bos_id; }
  int32_t eos_id() const { return shards_[0]->header().eos_id; }
  bool has_mask() const { return shards_[0]->has_mask(); }
  uint64_t n_sequences() const { return n_sequences_; }  // per epoch, all ranks together
  size_t n_shards() const { return shards_.size(); }
  uint64_t epoch() const { return next_ / n_sequences_; }
  // Steps (each rank one batch) that consume `epochs` whole epochs from the start, rounded up.
  uint64_t steps_for_epochs(uint64_t epochs) const {
    const uint64_t per_step = (uint64_t)B_ * n_ranks_;
    return (epochs * n_sequences_ + per_step - 1) / per_step;
  }

  // Steps that fit in one epoch without wrapping into the next (rounded down): a validation pass after
  // reset() that sees every val sequence at most once; the N mod (B*R) remainder is left out of it.
  uint64_t whole_steps_per_epoch() const { return n_sequences_ / ((uint64_t)B_ * n_ranks_); }

  LoaderPosition position() const { return {seed_, next_ / n_sequences_, next_ % n_sequences_, n_sequences_}; }
  void restore(const LoaderPosition& pos) {
    if (pos.n_sequences != n_sequences_)
      fatal("cannot resume the data loader: it was saved on %llu sequences, the data now holds %llu",
            (unsigned long long)pos.n_sequences, (unsigned long long)n_sequences_);
    if (pos.index >= n_sequences_) fatal("cannot resume the data loader: position %llu is past the epoch's end",
                                         (unsigned long long)pos.index);
    seed_ = pos.seed;
    next_ = pos.epoch * n_sequences_ + pos.index;
    perm_epoch_ = UINT64_MAX;  // the seed may have changed
  }
  void reset() { next_ = 0; }  // back to the start of epoch 0 (e.g. before each validation pass)

  // The next batch for this rank into caller buffers (pinned host memory, say), each (B, T).
  void next(int32_t* inputs, int32_t* targets, uint8_t* mask) {
    const uint64_t T = (uint64_t)T_;
    for (int b = 0; b < B_; b++) {
      const uint64_t seq = sequence_at(next_ + (uint64_t)rank_ * B_ + b);
      const TokenShard& shard = *shards_[seq_start_[seq].first];
      const uint32_t* x = shard.tokens() + seq_start_[seq].second;
      const uint8_t* m = shard.mask() ? shard.mask() + seq_start_[seq].second : nullptr;
      int32_t* in = inputs + b * T;
      int32_t* tg = targets + b * T;
      uint8_t* mk = mask + b * T;
      for (uint64_t t = 0; t < T; t++) in[t] = (int32_t)x[t];
      for (uint64_t t = 0; t + 1 < T; t++) {
        tg[t] = (int32_t)x[t + 1];
        mk[t] = m ? m[t + 1] : 1;
      }
      tg[T - 1] = 0;
      mk[T - 1] = 0;
    }
    next_ += (uint64_t)B_ * n_ranks_;
  }
  void next(Batch& batch) {
    batch.B = B_;
    batch.T = T_;
    batch.inputs.resize((size_t)B_ * T_);
    batch.targets.resize((size_t)B_ * T_);
    batch.mask.resize((size_t)B_ * T_);
    next(batch.inputs.data(), batch.targets.data(), batch.mask.data());
  }

  // Which sequence (0..N-1, in shard order) sits at global stream position g. Public for tests and logs.
  uint64_t sequence_at(uint64_t g) {
    const uint64_t epoch = g / n_sequences_;
    if (!shuffle_) return g % n_sequences_;
    if (epoch != perm_epoch_) make_permutation(epoch);
    return perm_[g % n_sequences_];
  }

 private:
  static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }
  // Fisher-Yates from an RNG seeded by (seed, epoch): every epoch its own order. The modulo's bias is
  // at most N / 2^64, nothing.
  void make_permutation(uint64_t epoch) {
    perm_.resize(n_sequences_);
    for (uint64_t i = 0; i < n_sequences_; i++) perm_[i] = i;
    Rng rng(splitmix64(seed_ ^ splitmix64(epoch)));
    for (uint64_t i = n_sequences_ - 1; i > 0; i--) std::swap(perm_[i], perm_[rng.next() % (i + 1)]);
    perm_epoch_ = epoch;
  }

  std::vector<std::unique_ptr<TokenShard>> shards_;
  std::vector<std::pair<uint32_t, uint64_t>> seq_start_;  // (shard, token offset) of every sequence
  uint64_t n_sequences_ = 0;
  int B_, T_ = 0, rank_, n_ranks_;
  uint64_t seed_;
  bool shuffle_;
  uint64_t next_ = 0;  // global stream position of this step's first row (rank 0, b 0)
  std::vector<uint64_t> perm_;
  uint64_t perm_epoch_ = UINT64_MAX;
};
