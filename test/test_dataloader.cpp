// test_dataloader.cpp: DataLoader and TokenShard (dataloader.h) on shards this test writes byte by byte
// at the documented offsets (an oracle independent of ShardHeader): rows, shifted targets and masks;
// every sequence exactly once per epoch across 1..3 ranks; seeded determinism; save/restore; refusal of
// bad shards and directories with the one-line error.
#include <gtest/gtest.h>

#include <set>

#include "dataloader.h"

namespace {

namespace fs = std::filesystem;

// A fresh directory under /tmp, removed when the test ends.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/lolcats_dataloader_XXXXXX";
    if (!mkdtemp(tmpl)) fatal("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& name) const { return path + "/" + name; }
};

template <typename V>
void put(std::vector<uint8_t>& buf, size_t offset, V value) {
  memcpy(buf.data() + offset, &value, sizeof value);
}

// The shard format as CONTEXT.md specifies it, written field by field.
std::vector<uint8_t> shard_bytes(uint32_t vocab, const std::vector<uint32_t>& tokens, const std::vector<uint8_t>* mask,
                                 uint32_t seq_len, int32_t bos = 1, int32_t eos = 2) {
  std::vector<uint8_t> buf(64 + tokens.size() * 4 + (mask ? mask->size() : 0), 0);
  memcpy(buf.data(), "LOLCTOK1", 8);
  put<uint32_t>(buf, 8, 1);  // version
  put<uint32_t>(buf, 12, vocab);
  put<uint64_t>(buf, 16, tokens.size());
  put<uint32_t>(buf, 24, mask ? 1u : 0u);
  put<int32_t>(buf, 28, bos);
  put<int32_t>(buf, 32, eos);
  put<uint32_t>(buf, 36, seq_len);
  memcpy(buf.data() + 64, tokens.data(), tokens.size() * 4);
  if (mask) memcpy(buf.data() + 64 + tokens.size() * 4, mask->data(), mask->size());
  return buf;
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  FILE* f = open_or_die(path, "wb");
  write_or_die(bytes.data(), bytes.size(), f, path);
  fclose(f);
}

// A split of random sequences spread over shards, remembered for checking: sequence i (in shard order)
// is seqs[i] with mask masks[i]. Rows are random, so a row identifies its sequence.
struct Corpus {
  uint32_t vocab = 1000;
  int T = 8;
  std::vector<std::vector<uint32_t>> seqs;
  std::vector<std::vector<uint8_t>> masks;
  std::map<std::vector<int32_t>, int> id_of;  // input row -> sequence id

  Corpus(const TempDir& dir, const std::string& prefix, const std::string& split,
         const std::vector<int>& seqs_per_shard, uint64_t seed, bool with_mask = true) {
    Rng rng(seed);
    for (size_t s = 0; s < seqs_per_shard.size(); s++) {
      std::vector<uint32_t> tokens;
      std::vector<uint8_t> mask;
      for (int q = 0; q < seqs_per_shard[s]; q++) {
        std::vector<uint32_t> seq(T);
        std::vector<uint8_t> m(T);
        for (int t = 0; t < T; t++) {
          seq[t] = (uint32_t)(rng.next() % vocab);
          m[t] = with_mask ? (uint8_t)(rng.next() & 1) : 1;
        }
        std::vector<int32_t> key(seq.begin(), seq.end());
        EXPECT_EQ(id_of.count(key), 0u) << "random rows collided; pick another seed";
        id_of[key] = (int)seqs.size();
        seqs.push_back(seq);
        masks.push_back(m);
        tokens.insert(tokens.end(), seq.begin(), seq.end());
        mask.insert(mask.end(), m.begin(), m.end());
      }
      char name[256];
      snprintf(name, sizeof name, "%s_%s_%04zu.bin", prefix.c_str(), split.c_str(), s);
      write_file(dir.file(name), shard_bytes(vocab, tokens, with_mask ? &mask : nullptr, (uint32_t)T));
    }
  }
  int n() const { return (int)seqs.size(); }

  // Checks every row of a batch against the written data (targets shifted, mask of the targets, last
  // target absent) and returns the sequence id of each row.
  std::vector<int> identify(const Batch& b) const {
    std::vector<int> ids;
    for (int r = 0; r < b.B; r++) {
      std::vector<int32_t> row(b.inputs.begin() + r * b.T, b.inputs.begin() + (r + 1) * b.T);
      auto it = id_of.find(row);
      EXPECT_NE(it, id_of.end()) << "row " << r << " is no sequence of the corpus";
      if (it == id_of.end()) return ids;
      const int id = it->second;
      for (int t = 0; t + 1 < b.T; t++) {
        EXPECT_EQ(b.targets[r * b.T + t], (int32_t)seqs[id][t + 1]) << "row " << r << " t " << t;
        EXPECT_EQ(b.mask[r * b.T + t], masks[id][t + 1]) << "row " << r << " t " << t;
      }
      EXPECT_EQ(b.targets[r * b.T + b.T - 1], 0);
      EXPECT_EQ(b.mask[r * b.T + b.T - 1], 0) << "the last position has no target";
      ids.push_back(id);
    }
    return ids;
  }
};

// The ids of `steps` batches of one loader, flattened in order.
std::vector<int> stream(DataLoader& dl, const Corpus& c, int steps) {
  std::vector<int> ids;
  Batch b;
  for (int s = 0; s < steps; s++) {
    dl.next(b);
    for (int id : c.identify(b)) ids.push_back(id);
  }
  return ids;
}

}  // namespace

TEST(DataLoader, HeaderFieldsRowsTargetsAndMask) {
  TempDir dir;
  Corpus c(dir, "alp", "train", {3, 4}, 11);
  DataLoader dl(dir.path, "train", 2, 0, 0, 1, 7);
  EXPECT_EQ(dl.vocab_size(), 1000u);
  EXPECT_EQ(dl.seq_len(), 8);
  EXPECT_EQ(dl.n_sequences(), 7u);
  EXPECT_EQ(dl.n_shards(), 2u);
  EXPECT_EQ(dl.bos_id(), 1);
  EXPECT_EQ(dl.eos_id(), 2);
  EXPECT_TRUE(dl.has_mask());
  EXPECT_EQ(dl.steps_for_epochs(2), 7u);  // ceil(2 * 7 / 2)
  EXPECT_EQ(dl.whole_steps_per_epoch(), 3u);  // floor(7 / 2)
  // Unshuffled, the stream is the shards' order, crossing from shard 0 to shard 1 inside a batch.
  DataLoader plain(dir.path, "train", 2, 8, 0, 1, 7, /*shuffle=*/false);
  std::vector<int> ids = stream(plain, c, 5);
  std::vector<int> expected = {0, 1, 2, 3, 4, 5, 6, 0, 1, 2};
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(plain.epoch(), 1u);
}

TEST(DataLoader, PlainStreamShardsAreCutIntoTTokenRows) {
  // seq_len 0 and no mask: the loader cuts each shard into T-token rows (dropping the shard's tail) and
  // counts every target that exists.
  TempDir dir;
  std::vector<uint32_t> a = {5, 6, 7, 8, 9, 10, 11}, b = {20, 21, 22, 23, 24};
  write_file(dir.file("txt_val_0000.bin"), shard_bytes(50, a, nullptr, 0));
  write_file(dir.file("txt_val_0001.bin"), shard_bytes(50, b, nullptr, 0));
  DataLoader dl(dir.path, "val", 1, 3, 0, 1, 0, false);
  EXPECT_FALSE(dl.has_mask());
  EXPECT_EQ(dl.n_sequences(), 3u);  // 5 6 7 | 8 9 10 | (11 dropped) 20 21 22 | (23 24 dropped)
  const int32_t in[3][3] = {{5, 6, 7}, {8, 9, 10}, {20, 21, 22}};
  Batch batch;
  for (int s = 0; s < 3; s++) {
    dl.next(batch);
    for (int t = 0; t < 3; t++) EXPECT_EQ(batch.inputs[t], in[s][t]);
    EXPECT_EQ(batch.targets[0], in[s][1]);
    EXPECT_EQ(batch.targets[1], in[s][2]);
    EXPECT_EQ(batch.targets[2], 0);
    EXPECT_EQ(batch.mask[0], 1);
    EXPECT_EQ(batch.mask[1], 1);
    EXPECT_EQ(batch.mask[2], 0);
  }
}

TEST(DataLoader, EverySequenceOncePerEpochAcrossRanks) {
  TempDir dir;
  Corpus c(dir, "alp", "train", {10, 15, 12}, 21);  // N = 37, prime: never a multiple of R*B
  const int B = 2, N = c.n();
  for (int R = 1; R <= 3; R++) {
    std::vector<std::unique_ptr<DataLoader>> ranks;
    for (int r = 0; r < R; r++) ranks.emplace_back(new DataLoader(dir.path, "train", B, 0, r, R, 1234));
    const int steps = (3 * N + R * B - 1) / (R * B) + 1;  // a bit over 3 epochs
    // Global order of rows: step, then rank, then row (the contract in dataloader.h).
    std::vector<int> global;
    std::vector<int> count(N, 0);
    for (int s = 0; s < steps; s++) {
      std::set<int> this_step;
      for (int r = 0; r < R; r++) {
        for (int id : stream(*ranks[r], c, 1)) {
          global.push_back(id);
          count[id]++;
          this_step.insert(id);
        }
      }
      // Ranks are disjoint; only a step that spans an epoch boundary may hold a sequence twice (once
      // as the end of epoch e, once as the start of e+1).
      const bool spans_epochs = (s * R * B) / N != ((s + 1) * R * B - 1) / N;
      if (!spans_epochs) {
        EXPECT_EQ(this_step.size(), (size_t)(R * B)) << "ranks overlap in step " << s << ", R = " << R;
      }
    }
    ASSERT_GE(global.size(), (size_t)(3 * N));
    for (int e = 0; e < 3; e++) {
      std::vector<int> epoch(global.begin() + e * N, global.begin() + (e + 1) * N);
      std::vector<int> sorted = epoch;
      std::sort(sorted.begin(), sorted.end());
      for (int i = 0; i < N; i++) ASSERT_EQ(sorted[i], i) << "epoch " << e << " of R = " << R << " misses or repeats";
      if (e > 0) {
        EXPECT_NE(epoch, std::vector<int>(global.begin(), global.begin() + N)) << "epochs share an order";
      }
    }
    // Independent of the row order: after any number of rows, counts differ by at most one.
    const auto [lo, hi] = std::minmax_element(count.begin(), count.end());
    EXPECT_LE(*hi - *lo, 1) << "R = " << R;
    EXPECT_EQ(ranks[0]->epoch(), (uint64_t)(steps * R * B / N));
  }
}

TEST(DataLoader, OrderIsDeterministicInTheSeed) {
  TempDir dir;
  Corpus c(dir, "alp", "train", {10, 15, 12}, 31);
  DataLoader a(dir.path, "train", 3, 0, 0, 1, 99), b(dir.path, "train", 3, 0, 0, 1, 99);
  DataLoader other(dir.path, "train", 3, 0, 0, 1, 100);
  std::vector<int> sa = stream(a, c, 30), sb = stream(b, c, 30), so = stream(other, c, 30);
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, so);
  std::vector<int> first_epoch(sa.begin(), sa.begin() + c.n()), identity(c.n());
  for (int i = 0; i < c.n(); i++) identity[i] = i;
  EXPECT_NE(first_epoch, identity) << "shuffling left the order as it was";
}

TEST(DataLoader, RestoredPositionYieldsTheSameStream) {
  TempDir dir;
  Corpus c(dir, "alp", "train", {10, 15, 12}, 41);
  const int N = c.n();
  for (int R : {1, 3}) {
    for (int saved_after : {4, 6, 9}) {  // steps of R*2 rows: mid epoch 0, and (R = 3) mid epoch 1
      for (int r = 0; r < R; r++) {
        DataLoader uninterrupted(dir.path, "train", 2, 0, r, R, 5);
        stream(uninterrupted, c, saved_after);
        const LoaderPosition pos = uninterrupted.position();
        std::vector<int> expected = stream(uninterrupted, c, 40);  // well past two epoch boundaries
        // A loader built with another seed, and already running (as when the trainer rolls back to its
        // best checkpoint), takes the saved seed and position.
        DataLoader resumed(dir.path, "train", 2, 0, r, R, 777);
        stream(resumed, c, saved_after + 3);
        resumed.restore(pos);
        EXPECT_EQ(resumed.epoch(), pos.epoch);
        EXPECT_EQ(stream(resumed, c, 40), expected) << "R " << R << " rank " << r << " saved after " << saved_after;
      }
    }
  }
  // A position saved exactly at an epoch boundary, and one restored with another batch size: the flat
  // stream of sequences continues where it was.
  DataLoader b1(dir.path, "train", 1, 0, 0, 1, 3);
  stream(b1, c, N);
  LoaderPosition at_boundary = b1.position();
  EXPECT_EQ(at_boundary.epoch, 1u);
  EXPECT_EQ(at_boundary.index, 0u);
  std::vector<int> expected = stream(b1, c, 2 * N);
  DataLoader b2(dir.path, "train", 2, 0, 0, 1, 0);
  b2.restore(at_boundary);
  EXPECT_EQ(stream(b2, c, N), expected);
}

// ------------------------------------------------------------------------------------------------
// Refusals: one line "error: ...", exit status 1.

namespace {
std::vector<uint8_t> good_shard(uint32_t vocab = 100) {
  std::vector<uint32_t> tokens = {1, 5, 9, 2, 1, 7, 8, 2};
  std::vector<uint8_t> mask = {0, 0, 1, 1, 0, 1, 1, 1};
  return shard_bytes(vocab, tokens, &mask, 4);
}
void open_loader(const std::string& dir, int T = 0) { DataLoader dl(dir, "train", 1, T, 0, 1, 0); }
}  // namespace

TEST(DataLoaderDeathTest, RefusesBadShards) {
  TempDir dir;
  const std::string p = dir.file("x_train_0000.bin");
  std::vector<uint8_t> bytes = good_shard();

  bytes[3] = 'X';
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "error: shard '.*x_train_0000.bin' is corrupt: bad magic");

  bytes = good_shard();
  bytes.resize(bytes.size() - 3);  // the mask is cut short
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "x_train_0000.bin' is truncated");
  bytes.resize(40);  // not even a header
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "x_train_0000.bin' is truncated: 40 bytes");
  write_file(p, {});
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "x_train_0000.bin' is empty");
  write_file(p, shard_bytes(100, {}, nullptr, 0));
  EXPECT_EXIT(open_loader(dir.path, 4), ::testing::ExitedWithCode(1), "x_train_0000.bin' is empty \\(0 tokens\\)");

  bytes = good_shard();
  bytes.push_back(0);
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "is corrupt: 1 bytes after the data");

  bytes = good_shard();
  put<uint32_t>(bytes, 64 + 4 * 5, 100);  // token 5 = vocab_size
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "is corrupt: token 100 at index 5 is >= vocab_size 100");

  bytes = good_shard();
  bytes[64 + 32 + 2] = 2;  // a mask byte that is neither 0 nor 1
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "is corrupt: mask value 2");

  bytes = good_shard();
  put<uint32_t>(bytes, 8, 2);
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "unsupported version 2");

  bytes = good_shard();
  put<uint32_t>(bytes, 36, 3);  // 8 tokens are not whole 3-token sequences
  write_file(p, bytes);
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "not a whole number of 3-token sequences");

  write_file(p, good_shard());
  EXPECT_EXIT(open_loader(dir.path, 16), ::testing::ExitedWithCode(1), "hold 4-token sequences, but T = 16");
  open_loader(dir.path, 4);  // the good shard itself loads
}

TEST(DataLoaderDeathTest, RefusesBadDirectories) {
  TempDir dir;
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "error: no train shards in '.*lolcats_dataloader_");
  EXPECT_EXIT(open_loader(dir.file("missing")), ::testing::ExitedWithCode(1), "does not exist");
  write_file(dir.file("x_val_0000.bin"), good_shard());
  write_file(dir.file("x_train_0000.bin.tmp"), good_shard());  // a preparer's unfinished file is ignored
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "no train shards in");

  write_file(dir.file("x_train_0000.bin"), good_shard(100));
  write_file(dir.file("x_train_0001.bin"), good_shard(200));
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1),
              "shards disagree on vocab_size: '.*x_train_0000.bin' has 100, '.*x_train_0001.bin' has 200");

  write_file(dir.file("x_train_0001.bin"), shard_bytes(100, {3, 4, 5, 6}, nullptr, 4));
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "shards disagree on having a loss mask");

  write_file(dir.file("x_train_0001.bin"), good_shard(100));
  open_loader(dir.path);
  write_file(dir.file("x_train_0003.bin"), good_shard(100));
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "train shard 0002 is missing");
  fs::remove(dir.file("x_train_0003.bin"));

  write_file(dir.file("y_train_0000.bin"), good_shard(100));
  EXPECT_EXIT(open_loader(dir.path), ::testing::ExitedWithCode(1), "train shards of two prefixes");
  DataLoader only_x(dir.path, "train", 1, 0, 0, 1, 0, true, "x");  // a prefix picks one set
  EXPECT_EQ(only_x.n_shards(), 2u);

  EXPECT_EXIT(DataLoader(dir.path, "train", 1, 0, 2, 2, 0, true, "x"), ::testing::ExitedWithCode(1), "rank 2 of 2");
  EXPECT_EXIT(DataLoader(dir.path, "test", 1, 0, 0, 1, 0), ::testing::ExitedWithCode(1), "split must be 'train' or 'val'");
  LoaderPosition pos = only_x.position();
  pos.n_sequences = 99;
  EXPECT_EXIT(only_x.restore(pos), ::testing::ExitedWithCode(1), "saved on 99 sequences, the data now holds 4");
}
