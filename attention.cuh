// attention.cuh: attention on the GPU. This file holds the teacher's causal softmax attention
// (flash-style, GQA, never materialising T x T); the LoLCATs hybrid attention lives in
// hybrid_attention.cuh, included at the end, so the two can be read (and developed) apart.
#pragma once
#include "cuda_common.cuh"

// ---- teacher: causal softmax attention --------------------------------------------------------
//
//   out_i = sum_{j<=i} softmax_j(q_i . k_j / sqrt(d)) v_j,   lse_i = log sum_{j<=i} exp(q_i . k_j / sqrt(d))
//
// Layout: q, out (B, T, H, d); k, v (B, T, Hkv, d); query head h reads kv head h / (H / Hkv), so the
// repeated K/V of GQA are never materialised: the H/Hkv query heads of a group read the same rows
// (and meet in L2). bf16 in and out; scores, softmax statistics and the output accumulate in fp32.
//
// The algorithm (flash attention, forward): a thread block owns BLOCK_M consecutive query rows of one
// (batch, head). It walks the key/value rows in tiles of BLOCK_N, from position 0 up to its last
// query row (causality: later tiles are never touched), keeping per query row
//   m = the running max of the scores,  l = the running sum of exp(score - m),  o = sum exp(score - m) v.
// For each tile: s = q k^T (tensor cores); new max m' = max(m, rowmax s); rescale l and o by
// exp(m - m'); p = exp(s - m'); l += rowsum p; o += p v (tensor cores, p rounded to bf16).
// At the end out = o / l and lse = m + log l. Memory is O(T d): the T x T scores exist only one
// BLOCK_M x BLOCK_N tile at a time, in registers. Exponentials run in base 2 with the scale and
// log2(e) folded into one multiply.
//
// Two implementations behind softmax_attention_forward():
//  - flash_forward_kernel (d = 64, 128): warp-level tensor-core MMA (mma.sync m16n8k16 bf16, fp32
//    accumulators), ldmatrix from padded shared memory, K/V tiles double-buffered with cp.async so
//    the next tile loads while this one computes. Each warp owns 16 * M_TILES query rows; the whole
//    score tile of a warp stays in registers and becomes the A operand of p v without touching shared
//    memory (the mma accumulator layout of s is exactly the A-fragment layout of p).
//  - attention_generic_kernel (any d <= 128 that is a multiple of 8): plain fp32 FMAs; a group of
//    threads shares one query row (8 dims each), K/V tiles staged in shared memory. For the small
//    test models and odd head sizes; simple, correct, not fast.

namespace attention_detail {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16-byte global -> shared copy that bypasses registers; a zero source size fills zeros (rows past T).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 bf16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// c (16x8 fp32) += a (16x16 bf16, row-major fragment) * b (16x8 bf16, column-major fragment).
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&t);
}

// 2^x with the hardware approximation (rel. error ~2^-22); 2^-inf = 0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Tile shape of the tensor-core kernel. BLOCK_M = WARPS * 16 * M_TILES query rows per block.
// Q_IN_REGS keeps the block's q fragments in registers for the whole key loop (cheaper shared-memory
// traffic, more registers); otherwise they are re-read from shared memory for every key tile.
template <int D_, int WARPS_, int M_TILES_, int BLOCK_N_, bool Q_IN_REGS_, int MIN_BLOCKS_>
struct FlashTile {
  static constexpr int D = D_, WARPS = WARPS_, M_TILES = M_TILES_, BLOCK_N = BLOCK_N_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr bool Q_IN_REGS = Q_IN_REGS_;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int WARP_ROWS = 16 * M_TILES;
  static constexpr int BLOCK_M = WARPS * WARP_ROWS;
  // Shared-memory rows padded by 16 bytes: the 8 row addresses of one ldmatrix then fall on 8
  // different 16-byte bank groups, so it runs without bank conflicts.
  static constexpr int STRIDE = D + 8;
  // sQ (BLOCK_M rows) + double-buffered sK and sV (BLOCK_N rows each).
  static constexpr size_t SMEM_BYTES = (size_t)(BLOCK_M + 4 * BLOCK_N) * STRIDE * sizeof(bf16);
  static_assert(D % 16 == 0 && D <= 256, "tensor-core path needs d a multiple of 16");
  static_assert(BLOCK_N % 16 == 0, "key tile must be a multiple of 16");
};

template <class Tile>
__global__ void __launch_bounds__(Tile::THREADS, Tile::MIN_BLOCKS)
    flash_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                         const bf16* __restrict__ k, const bf16* __restrict__ v, int T, int H, int Hkv,
                         float scale_log2) {
  constexpr int D = Tile::D, M_TILES = Tile::M_TILES, BLOCK_N = Tile::BLOCK_N, STRIDE = Tile::STRIDE;
  constexpr int THREADS = Tile::THREADS, BLOCK_M = Tile::BLOCK_M, WARP_ROWS = Tile::WARP_ROWS;
  constexpr int CHUNKS = D / 8;        // 16-byte chunks per row
  constexpr int N_FRAGS = BLOCK_N / 8;  // 8-wide score column blocks per key tile
  constexpr int D_FRAGS = D / 8;        // 8-wide output column blocks
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // (BLOCK_M, STRIDE)
  bf16* sK = sQ + BLOCK_M * STRIDE;              // (2, BLOCK_N, STRIDE)
  bf16* sV = sK + 2 * BLOCK_N * STRIDE;          // (2, BLOCK_N, STRIDE)

  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int hk = h / (H / Hkv);
  // Heaviest query tiles (most keys) first: blockIdx.y = 0 is the last tile of the sequence.
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_M;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_row0 = m0 + warp * WARP_ROWS;  // first query row of this warp

  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;
  const bf16* q_base = q + (size_t)b * T * q_stride + (size_t)h * D;
  const bf16* k_base = k + (size_t)b * T * kv_stride + (size_t)hk * D;
  const bf16* v_base = v + (size_t)b * T * kv_stride + (size_t)hk * D;

  // Each thread copies the same 16-byte column chunk of every (THREADS / CHUNKS)-th row; one running
  // pointer per call keeps the address arithmetic out of the register budget.
  constexpr int PASS_ROWS = THREADS / CHUNKS;
  static_assert(THREADS % CHUNKS == 0, "a pass covers whole rows");
  const int ld_row = tid / CHUNKS, ld_col = (tid % CHUNKS) * 8;
  auto load_rows = [&](bf16* dst, const bf16* src, size_t stride, int row0, int rows) {
    const bf16* g = src + (size_t)(row0 + ld_row) * stride + ld_col;
    uint32_t sdst = smem_addr(dst + ld_row * STRIDE + ld_col);
#pragma unroll
    for (int r = 0; r < rows; r += PASS_ROWS) {
      const bool valid = row0 + ld_row + r < T;
      cp_async_16(sdst, valid ? g : src, valid);
      g += PASS_ROWS * stride;
      sdst += PASS_ROWS * STRIDE * sizeof(bf16);
    }
  };

  const int n_tiles = (min(T, m0 + BLOCK_M) + BLOCK_N - 1) / BLOCK_N;
  load_rows(sQ, q_base, q_stride, m0, BLOCK_M);
  load_rows(sK, k_base, kv_stride, 0, BLOCK_N);
  load_rows(sV, v_base, kv_stride, 0, BLOCK_N);
  cp_async_commit();

  float o[M_TILES][D_FRAGS][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
    for (int nd = 0; nd < D_FRAGS; nd++)
#pragma unroll
      for (int e = 0; e < 4; e++) o[mt][nd][e] = 0.f;
  // Per thread: rows lane/4 and lane/4 + 8 of each 16-row m-tile (index [mt][half]).
  float row_max[M_TILES][2], row_sum[M_TILES][2];  // max in raw score units; sum partial over the quad
#pragma unroll
  for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) row_max[mt][hf] = -INFINITY, row_sum[mt][hf] = 0.f;
  uint32_t q_frag[Tile::Q_IN_REGS ? M_TILES : 1][Tile::Q_IN_REGS ? D / 16 : 1][4];

  // ldmatrix lane addressing (see the PTX fragment layouts of m16n8k16):
  //  A (q, 16x16 at rows r0, cols c0): lane gives row r0 + lane%16, col c0 + (lane/16)*8.
  //  B from K (row-major keys x dims, 2 n-blocks x k16): row n0 + lane%8 + (lane/16)*8, col c0 + ((lane/8)%2)*8.
  //  B from V (transposed load, k16 keys x 2 d-blocks): row k0 + lane%8 + ((lane/8)%2)*8, col c0 + (lane/16)*8.
  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int bk_row = lane % 8 + (lane / 16) * 8, bk_col = ((lane / 8) % 2) * 8;
  const int bv_row = lane % 8 + ((lane / 8) % 2) * 8, bv_col = (lane / 16) * 8;
  const bf16* sQ_warp = sQ + warp * WARP_ROWS * STRIDE;

  for (int j = 0; j < n_tiles; j++) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {  // prefetch the next key/value tile into the other buffer
      load_rows(sK + (buf ^ 1) * BLOCK_N * STRIDE, k_base, kv_stride, (j + 1) * BLOCK_N, BLOCK_N);
      load_rows(sV + (buf ^ 1) * BLOCK_N * STRIDE, v_base, kv_stride, (j + 1) * BLOCK_N, BLOCK_N);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (Tile::Q_IN_REGS) {
      if (j == 0) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
          for (int kd = 0; kd < D / 16; kd++)
            ldmatrix_x4(q_frag[mt][kd], smem_addr(sQ_warp + (mt * 16 + a_row) * STRIDE + kd * 16 + a_col));
      }
    }
    const int n0 = j * BLOCK_N;
    // A tile whose first key lies after this warp's last row is entirely in the warp's future.
    if (n0 <= warp_row0 + WARP_ROWS - 1) {
      const bf16* sKb = sK + buf * BLOCK_N * STRIDE;
      const bf16* sVb = sV + buf * BLOCK_N * STRIDE;

      // s = q k^T for this warp's rows and the BLOCK_N keys.
      float s[M_TILES][N_FRAGS][4];
#pragma unroll
      for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
        for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
          for (int e = 0; e < 4; e++) s[mt][nb][e] = 0.f;
#pragma unroll
      for (int kd = 0; kd < D / 16; kd++) {
        uint32_t a[M_TILES][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++) {
          if constexpr (Tile::Q_IN_REGS) {
#pragma unroll
            for (int e = 0; e < 4; e++) a[mt][e] = q_frag[mt][kd][e];
          } else {
            ldmatrix_x4(a[mt], smem_addr(sQ_warp + (mt * 16 + a_row) * STRIDE + kd * 16 + a_col));
          }
        }
#pragma unroll
        for (int np = 0; np < BLOCK_N / 16; np++) {
          uint32_t bk[4];
          ldmatrix_x4(bk, smem_addr(sKb + (np * 16 + bk_row) * STRIDE + kd * 16 + bk_col));
#pragma unroll
          for (int mt = 0; mt < M_TILES; mt++) {
            mma_16816(s[mt][2 * np], a[mt], bk[0], bk[1]);
            mma_16816(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }

      // Causal mask, only on tiles that reach past this warp's first row.
      if (n0 + BLOCK_N - 1 > warp_row0) {
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
          for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const int row = warp_row0 + mt * 16 + lane / 4 + (e / 2) * 8;
              const int col = n0 + nb * 8 + (lane % 4) * 2 + (e % 2);
              if (col > row) s[mt][nb][e] = -INFINITY;
            }
      }

      // Online softmax: each row's 4 owners (a quad of lanes) agree on the max by two shuffles.
#pragma unroll
      for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
          float mx = row_max[mt][hf];
#pragma unroll
          for (int nb = 0; nb < N_FRAGS; nb++) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * hf], s[mt][nb][2 * hf + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // Key 0 is in every row's past and tile 0 is never skipped, so mx is finite here; the
          // guard only keeps a (never expected) all-masked row at p = 0 instead of NaN.
          const float mx_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
          const float alpha = fast_exp2(row_max[mt][hf] * scale_log2 - mx_scaled);
          row_max[mt][hf] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
            for (int e = 2 * hf; e < 2 * hf + 2; e++) {
              const float p = fast_exp2(fmaf(s[mt][nb][e], scale_log2, -mx_scaled));
              s[mt][nb][e] = p;
              sum += p;
            }
          row_sum[mt][hf] = row_sum[mt][hf] * alpha + sum;
#pragma unroll
          for (int nd = 0; nd < D_FRAGS; nd++) {
            o[mt][nd][2 * hf] *= alpha;
            o[mt][nd][2 * hf + 1] *= alpha;
          }
        }

      // o += p v: the accumulator fragments of s (two adjacent 8-key blocks) are the A fragment of p.
#pragma unroll
      for (int ks = 0; ks < BLOCK_N / 16; ks++) {
        uint32_t a[M_TILES][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; mt++) {
          a[mt][0] = pack_bf16x2(s[mt][2 * ks][0], s[mt][2 * ks][1]);
          a[mt][1] = pack_bf16x2(s[mt][2 * ks][2], s[mt][2 * ks][3]);
          a[mt][2] = pack_bf16x2(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
          a[mt][3] = pack_bf16x2(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, smem_addr(sVb + (ks * 16 + bv_row) * STRIDE + np * 16 + bv_col));
#pragma unroll
          for (int mt = 0; mt < M_TILES; mt++) {
            mma_16816(o[mt][2 * np], a[mt], bv[0], bv[1]);
            mma_16816(o[mt][2 * np + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // everyone is done with buffer `buf` before the next iteration refills it
  }

  // Epilogue: out = o / l, staged through this warp's own rows of sQ (no other warp reads them) so
  // the global stores are 16-byte and coalesced.
  bf16* sO = sQ + warp * WARP_ROWS * STRIDE;
#pragma unroll
  for (int mt = 0; mt < M_TILES; mt++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      float l = row_sum[mt][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = 1.f / l;
      const int r = mt * 16 + lane / 4 + hf * 8;
#pragma unroll
      for (int nd = 0; nd < D_FRAGS; nd++)
        *reinterpret_cast<uint32_t*>(sO + r * STRIDE + nd * 8 + (lane % 4) * 2) =
            pack_bf16x2(o[mt][nd][2 * hf] * inv, o[mt][nd][2 * hf + 1] * inv);
      const int row = warp_row0 + r;
      if (lse && lane % 4 == 0 && row < T)
        lse[((size_t)b * H + h) * T + row] = row_max[mt][hf] * (scale_log2 * LN2) + logf(l);
    }
  __syncwarp();
  bf16* out_base = out + (size_t)b * T * q_stride + (size_t)h * D;
#pragma unroll
  for (int idx = lane; idx < WARP_ROWS * CHUNKS; idx += 32) {
    const int r = idx / CHUNKS, c = idx % CHUNKS, row = warp_row0 + r;
    if (row < T)
      *reinterpret_cast<int4*>(out_base + (size_t)row * q_stride + c * 8) =
          *reinterpret_cast<const int4*>(sO + r * STRIDE + c * 8);
  }
}

// Generic path: LANES threads (D/8 rounded up to a power of two) share one query row, each holding 8
// of its dims; a score is their partial dot products summed by shuffles. ROWS query rows per block of
// 128 threads; K/V tiles of 64 rows in shared memory, read by broadcast.
template <int D>
__global__ void __launch_bounds__(128)
    attention_generic_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                             const bf16* __restrict__ k, const bf16* __restrict__ v, int T, int H, int Hkv,
                             float scale_log2) {
  constexpr int PARTS = D / 8;
  constexpr int LANES = PARTS <= 1 ? 1 : PARTS <= 2 ? 2 : PARTS <= 4 ? 4 : PARTS <= 8 ? 8 : 16;
  constexpr int ROWS = 128 / LANES;
  constexpr int TILE = 64;
  static_assert(D % 8 == 0 && D <= 128, "generic path: d a multiple of 8, at most 128");
  __shared__ __align__(16) bf16 sK[TILE * D];
  __shared__ __align__(16) bf16 sV[TILE * D];

  const int b = blockIdx.x / H, h = blockIdx.x % H;
  const int hk = h / (H / Hkv);
  const int row_block = gridDim.y - 1 - blockIdx.y;  // heaviest rows first
  const int i = row_block * ROWS + threadIdx.x / LANES;
  const int part = threadIdx.x % LANES;  // dims [8 part, 8 part + 8) when part < PARTS
  const bool has_part = part < PARTS;
  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;
  const bf16* k_base = k + (size_t)b * T * kv_stride + (size_t)hk * D;
  const bf16* v_base = v + (size_t)b * T * kv_stride + (size_t)hk * D;

  float qr[8], o[8];
  {
    int4 raw = make_int4(0, 0, 0, 0);
    if (i < T && has_part) raw = *reinterpret_cast<const int4*>(q + ((size_t)b * T + i) * q_stride + (size_t)h * D + part * 8);
    const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int c = 0; c < 8; c++) qr[c] = __bfloat162float(e[c]) * scale_log2, o[c] = 0.f;
  }
  float m = -INFINITY, l = 0.f;  // in scaled base-2 units
  const int last_row = min(T, (row_block + 1) * ROWS) - 1;
  for (int n0 = 0; n0 <= last_row; n0 += TILE) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * PARTS; idx += 128) {
      const int r = idx / PARTS, c = idx % PARTS, j = n0 + r;
      int4 kk = make_int4(0, 0, 0, 0), vv = make_int4(0, 0, 0, 0);
      if (j < T) {
        kk = *reinterpret_cast<const int4*>(k_base + (size_t)j * kv_stride + c * 8);
        vv = *reinterpret_cast<const int4*>(v_base + (size_t)j * kv_stride + c * 8);
      }
      *reinterpret_cast<int4*>(sK + r * D + c * 8) = kk;
      *reinterpret_cast<int4*>(sV + r * D + c * 8) = vv;
    }
    __syncthreads();
    const int n_keys = min(TILE, last_row - n0 + 1);  // uniform across the block: shuffles stay converged
    for (int jj = 0; jj < n_keys; jj++) {
      float s = 0.f;
      if (has_part) {
        const int4 raw = *reinterpret_cast<const int4*>(sK + jj * D + part * 8);
        const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
        for (int c = 0; c < 8; c++) s = fmaf(qr[c], __bfloat162float(e[c]), s);
      }
#pragma unroll
      for (int off = LANES / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (n0 + jj <= i) {
        if (s > m) {  // new running max: rescale what was accumulated so far
          const float alpha = exp2f(m - s);
          l *= alpha;
#pragma unroll
          for (int c = 0; c < 8; c++) o[c] *= alpha;
          m = s;
        }
        const float p = exp2f(s - m);
        l += p;
        if (has_part) {
          const int4 raw = *reinterpret_cast<const int4*>(sV + jj * D + part * 8);
          const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
          for (int c = 0; c < 8; c++) o[c] = fmaf(p, __bfloat162float(e[c]), o[c]);
        }
      }
    }
  }
  if (i < T) {
    const float inv = 1.f / l;
    if (has_part) {
      __align__(16) bf16 res[8];
#pragma unroll
      for (int c = 0; c < 8; c++) res[c] = __float2bfloat16(o[c] * inv);
      *reinterpret_cast<int4*>(out + ((size_t)b * T + i) * q_stride + (size_t)h * D + part * 8) =
          *reinterpret_cast<const int4*>(res);
    }
    if (lse && part == 0) lse[((size_t)b * H + h) * T + i] = (m + log2f(l)) * LN2;
  }
}

// The tensor-core configurations the dispatcher uses (dev/flash_attention.cu times others).
// 4 warps x 32 rows = 128 query rows, 64-key tiles, q re-read from shared memory: 102 KB of shared
// memory and <= 255 registers, two blocks per multiprocessor.
using FlashTile128 = FlashTile<128, 4, 2, 64, false, 2>;
using FlashTile64 = FlashTile<64, 4, 2, 64, false, 2>;

template <class Tile>
void launch_flash_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H,
                          int Hkv, cudaStream_t stream) {
  static bool configured = false;  // raise the dynamic shared-memory limit once per configuration
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(flash_forward_kernel<Tile>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)Tile::SMEM_BYTES));
    configured = true;
  }
  const int m_blocks = ceil_div(T, Tile::BLOCK_M);
  if (m_blocks > 65535) fatal("softmax attention: sequence length %d too long for one launch", T);
  const float scale_log2 = LOG2E / sqrtf((float)Tile::D);
  flash_forward_kernel<Tile><<<dim3(B * H, m_blocks), Tile::THREADS, Tile::SMEM_BYTES, stream>>>(
      out, lse, q, k, v, T, H, Hkv, scale_log2);
  CUDA_LAUNCH_CHECK();
}

template <int D>
void launch_attention_generic(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H,
                              int Hkv, cudaStream_t stream) {
  constexpr int PARTS = D / 8;
  constexpr int LANES = PARTS <= 1 ? 1 : PARTS <= 2 ? 2 : PARTS <= 4 ? 4 : PARTS <= 8 ? 8 : 16;
  const int row_blocks = ceil_div(T, 128 / LANES);
  if (row_blocks > 65535) fatal("softmax attention: sequence length %d too long for one launch", T);
  const float scale_log2 = LOG2E / sqrtf((float)D);
  attention_generic_kernel<D><<<dim3(B * H, row_blocks), 128, 0, stream>>>(out, lse, q, k, v, T, H, Hkv, scale_log2);
  CUDA_LAUNCH_CHECK();
}

inline void attention_generic(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H,
                              int Hkv, int d, cudaStream_t stream) {
  switch (d) {
#define ATTENTION_GENERIC_CASE(D) \
  case D: launch_attention_generic<D>(out, lse, q, k, v, B, T, H, Hkv, stream); break;
    ATTENTION_GENERIC_CASE(8) ATTENTION_GENERIC_CASE(16) ATTENTION_GENERIC_CASE(24) ATTENTION_GENERIC_CASE(32)
    ATTENTION_GENERIC_CASE(40) ATTENTION_GENERIC_CASE(48) ATTENTION_GENERIC_CASE(56) ATTENTION_GENERIC_CASE(64)
    ATTENTION_GENERIC_CASE(72) ATTENTION_GENERIC_CASE(80) ATTENTION_GENERIC_CASE(88) ATTENTION_GENERIC_CASE(96)
    ATTENTION_GENERIC_CASE(104) ATTENTION_GENERIC_CASE(112) ATTENTION_GENERIC_CASE(120) ATTENTION_GENERIC_CASE(128)
#undef ATTENTION_GENERIC_CASE
    default: fatal("softmax attention: head dim %d is not a multiple of 8 in [8, 128]", d);
  }
}

inline void check_attention_args(const bf16* q, const bf16* k, const bf16* v, const bf16* out, int B, int T, int H,
                                 int Hkv, int d) {
  if (B < 0 || T < 0 || H <= 0 || Hkv <= 0) fatal("softmax attention: bad shape B=%d T=%d H=%d Hkv=%d", B, T, H, Hkv);
  if (H % Hkv != 0) fatal("softmax attention: %d query heads are not a multiple of %d kv heads", H, Hkv);
  if (d < 8 || d > 128 || d % 8 != 0) fatal("softmax attention: head dim %d is not a multiple of 8 in [8, 128]", d);
  // 16-byte vector loads: with d a multiple of 8 every row is 16-byte aligned if the base is.
  for (const void* p : {(const void*)q, (const void*)k, (const void*)v, (const void*)out})
    if ((uintptr_t)p % 16 != 0) fatal("softmax attention: tensors must be 16-byte aligned");
}

}  // namespace attention_detail

// Causal GQA softmax attention forward. out, q: (B, T, H, d); k, v: (B, T, Hkv, d); lse: (B, H, T)
// natural-log logsumexp of the scaled scores per query row (kept for the backward), or nullptr.
// d: a multiple of 8 up to 128 (64 and 128 take the tensor-core path). Scale 1/sqrt(d).
inline void softmax_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                      int H, int Hkv, int d, cudaStream_t stream) {
  using namespace attention_detail;
  check_attention_args(q, k, v, out, B, T, H, Hkv, d);
  if (B == 0 || T == 0) return;
  if (d == 128)
    launch_flash_forward<FlashTile128>(out, lse, q, k, v, B, T, H, Hkv, stream);
  else if (d == 64)
    launch_flash_forward<FlashTile64>(out, lse, q, k, v, B, T, H, Hkv, stream);
  else
    attention_generic(out, lse, q, k, v, B, T, H, Hkv, d, stream);
}

#include "hybrid_attention.cuh"
