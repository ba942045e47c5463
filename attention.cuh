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
// Three implementations behind softmax_attention_forward():
//  - flash_forward_wgmma_kernel (attention_hopper.cuh; d = 128 on Hopper, when the binary carries
//    sm_90a code): the same algorithm on warpgroup MMA (wgmma) with TMA-loaded, 128-byte-swizzled
//    q/k/v tiles and a producer warpgroup; mma.sync below tops out near 340 TFLOP/s on the H200,
//    wgmma reaches 390-650 (T = 1024-16384).
//  - flash_forward_kernel (d = 64; d = 128 elsewhere): warp-level tensor-core MMA (mma.sync m16n8k16 bf16, fp32
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

// Asynchronous copy of ROWS rows of D bf16 (global row stride `stride` elements, from global row row0)
// into shared-memory rows of STRIDE elements; rows at or past T are zero-filled. Each thread copies the
// same 16-byte column chunk of every (THREADS / (D/8))-th row through one running pointer, which keeps
// the address arithmetic out of the register budget.
template <int D, int STRIDE, int THREADS, int ROWS>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* src, size_t stride, int row0, int T) {
  constexpr int CHUNKS = D / 8, PASS_ROWS = THREADS / CHUNKS;
  static_assert(THREADS % CHUNKS == 0 && ROWS % PASS_ROWS == 0, "passes cover whole rows");
  const int ld_row = threadIdx.x / CHUNKS, ld_col = (threadIdx.x % CHUNKS) * 8;
  const bf16* g = src + (size_t)(row0 + ld_row) * stride + ld_col;
  uint32_t sdst = smem_addr(dst + ld_row * STRIDE + ld_col);
#pragma unroll
  for (int r = 0; r < ROWS; r += PASS_ROWS) {
    const bool valid = row0 + ld_row + r < T;
    cp_async_16(sdst, valid ? g : src, valid);
    g += PASS_ROWS * stride;
    sdst += PASS_ROWS * STRIDE * sizeof(bf16);
  }
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

  const int n_tiles = (min(T, m0 + BLOCK_M) + BLOCK_N - 1) / BLOCK_N;
  load_rows_async<D, STRIDE, THREADS, BLOCK_M>(sQ, q_base, q_stride, m0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK_N>(sK, k_base, kv_stride, 0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK_N>(sV, v_base, kv_stride, 0, T);
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
      load_rows_async<D, STRIDE, THREADS, BLOCK_N>(sK + (buf ^ 1) * BLOCK_N * STRIDE, k_base, kv_stride,
                                                   (j + 1) * BLOCK_N, T);
      load_rows_async<D, STRIDE, THREADS, BLOCK_N>(sV + (buf ^ 1) * BLOCK_N * STRIDE, v_base, kv_stride,
                                                   (j + 1) * BLOCK_N, T);
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

// The tensor-core configurations the dispatcher uses: 4 warps x 32 rows = 128 query rows, 64-key
// tiles, q re-read from shared memory (102 KB of shared memory at d = 128, <= 255 registers, two blocks
// per multiprocessor). Of the shapes dev/flash_attention.cu times, the fastest on the H200 at both head
// sizes and every T: 32 rows per warp halve the shared-memory reads of k and v per MMA.
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

// ---- teacher backward ----------------------------------------------------------------------------
//
// With p_ij = exp(q_i.k_j scale - lse_i) (the forward's logsumexp recovers the probabilities without a
// second max pass), dp_ij = dout_i . v_j and delta_i = dout_i . out_i (= sum_j p_ij dp_ij):
//   ds_ij = p_ij (dp_ij - delta_i),  dq_i = scale sum_j ds_ij k_j,
//   dk_j = scale sum_{h in group} sum_i ds_ij q_i,  dv_j = sum_{h in group} sum_i p_ij dout_i.
// Three kernels, no atomics, deterministic: delta per query row; dq with a block per query tile walking
// the keys (like the forward); dk and dv with a block per key tile walking every query tile at or after
// it, of every query head of its GQA group, so the group sum accumulates in fp32 registers and each
// kv row is written once. s and p are recomputed in both (7 matmuls instead of 5, but no fp32 dq
// buffer and no atomics).

// delta_i = dout_i . out_i in fp32, one thread per (b, t, h) row. (B, T, H, d) rows -> delta (B, H, T).
template <int D>
__global__ void attention_backward_delta_kernel(float* __restrict__ delta, const bf16* __restrict__ dout,
                                                const bf16* __restrict__ out, int B, int T, int H) {
  const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // (b * T + t) * H + h
  if (row >= (long long)B * T * H) return;
  const int h = row % H, t = (row / H) % T, b = row / ((long long)H * T);
  const int4* a = reinterpret_cast<const int4*>(dout + row * D);
  const int4* o = reinterpret_cast<const int4*>(out + row * D);
  float acc = 0.f;
#pragma unroll
  for (int c = 0; c < D / 8; c++) {
    const int4 ra = a[c], ro = o[c];
    const bf16* ea = reinterpret_cast<const bf16*>(&ra);
    const bf16* eo = reinterpret_cast<const bf16*>(&ro);
#pragma unroll
    for (int e = 0; e < 8; e++) acc = fmaf(__bfloat162float(ea[e]), __bfloat162float(eo[e]), acc);
  }
  delta[((size_t)b * H + h) * T + t] = acc;
}

// Generic dq: as attention_generic_kernel, LANES threads per query row with 8 dims each.
template <int D>
__global__ void __launch_bounds__(128)
    attention_generic_dq_kernel(bf16* __restrict__ dq, const bf16* __restrict__ dout, const float* __restrict__ lse,
                                const float* __restrict__ delta, const bf16* __restrict__ q,
                                const bf16* __restrict__ k, const bf16* __restrict__ v, int T, int H, int Hkv,
                                float scale_log2, float scale) {
  constexpr int PARTS = D / 8;
  constexpr int LANES = PARTS <= 1 ? 1 : PARTS <= 2 ? 2 : PARTS <= 4 ? 4 : PARTS <= 8 ? 8 : 16;
  constexpr int ROWS = 128 / LANES, TILE = 64;
  __shared__ __align__(16) bf16 sK[TILE * D];
  __shared__ __align__(16) bf16 sV[TILE * D];
  const int b = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  const int row_block = gridDim.y - 1 - blockIdx.y;
  const int i = row_block * ROWS + threadIdx.x / LANES;
  const int part = threadIdx.x % LANES;
  const bool has_part = part < PARTS;
  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;
  const bf16* k_base = k + (size_t)b * T * kv_stride + (size_t)hk * D;
  const bf16* v_base = v + (size_t)b * T * kv_stride + (size_t)hk * D;

  float qr[8], dor[8], acc[8];
  {
    int4 rq = make_int4(0, 0, 0, 0), rd = make_int4(0, 0, 0, 0);
    if (i < T && has_part) {
      const size_t off = ((size_t)b * T + i) * q_stride + (size_t)h * D + part * 8;
      rq = *reinterpret_cast<const int4*>(q + off);
      rd = *reinterpret_cast<const int4*>(dout + off);
    }
    const bf16* eq = reinterpret_cast<const bf16*>(&rq);
    const bf16* ed = reinterpret_cast<const bf16*>(&rd);
#pragma unroll
    for (int c = 0; c < 8; c++) qr[c] = __bfloat162float(eq[c]), dor[c] = __bfloat162float(ed[c]), acc[c] = 0.f;
  }
  const float lse2 = i < T ? lse[((size_t)b * H + h) * T + i] * LOG2E : INFINITY;  // p = 0 past T
  const float dlt = i < T ? delta[((size_t)b * H + h) * T + i] : 0.f;
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
    const int n_keys = min(TILE, last_row - n0 + 1);
    for (int jj = 0; jj < n_keys; jj++) {
      float s = 0.f, dp = 0.f;
      float kr[8];
      if (has_part) {
        const int4 rk = *reinterpret_cast<const int4*>(sK + jj * D + part * 8);
        const int4 rv = *reinterpret_cast<const int4*>(sV + jj * D + part * 8);
        const bf16* ek = reinterpret_cast<const bf16*>(&rk);
        const bf16* ev = reinterpret_cast<const bf16*>(&rv);
#pragma unroll
        for (int c = 0; c < 8; c++) {
          kr[c] = __bfloat162float(ek[c]);
          s = fmaf(qr[c], kr[c], s);
          dp = fmaf(dor[c], __bfloat162float(ev[c]), dp);
        }
      } else {
#pragma unroll
        for (int c = 0; c < 8; c++) kr[c] = 0.f;
      }
#pragma unroll
      for (int off = LANES / 2; off > 0; off /= 2) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
        dp += __shfl_xor_sync(0xffffffffu, dp, off);
      }
      if (n0 + jj <= i) {
        const float ds = exp2f(fmaf(s, scale_log2, -lse2)) * (dp - dlt);
#pragma unroll
        for (int c = 0; c < 8; c++) acc[c] = fmaf(ds, kr[c], acc[c]);
      }
    }
  }
  if (i < T && has_part) {
    __align__(16) bf16 res[8];
#pragma unroll
    for (int c = 0; c < 8; c++) res[c] = __float2bfloat16(acc[c] * scale);
    *reinterpret_cast<int4*>(dq + ((size_t)b * T + i) * q_stride + (size_t)h * D + part * 8) =
        *reinterpret_cast<const int4*>(res);
  }
}

// Generic dk, dv: LANES threads per KEY row (8 dims each); the block's keys walk the query rows at or
// after its first key, of each query head of the group, staged 64 at a time with their lse and delta.
template <int D>
__global__ void __launch_bounds__(128)
    attention_generic_dkdv_kernel(bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const bf16* __restrict__ q, const bf16* __restrict__ k,
                                  const bf16* __restrict__ v, int T, int H, int Hkv, float scale_log2, float scale) {
  constexpr int PARTS = D / 8;
  constexpr int LANES = PARTS <= 1 ? 1 : PARTS <= 2 ? 2 : PARTS <= 4 ? 4 : PARTS <= 8 ? 8 : 16;
  constexpr int ROWS = 128 / LANES, TILE = 64;
  __shared__ __align__(16) bf16 sQ[TILE * D];
  __shared__ __align__(16) bf16 sdO[TILE * D];
  __shared__ float sL[TILE], sD[TILE];
  const int b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv, group = H / Hkv;
  const int j0 = blockIdx.y * ROWS;  // block 0 has the most queries after it: launched first
  const int j = j0 + threadIdx.x / LANES;
  const int part = threadIdx.x % LANES;
  const bool has_part = part < PARTS;
  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;

  float kr[8], vr[8], dk_acc[8], dv_acc[8];
  {
    int4 rk = make_int4(0, 0, 0, 0), rv = make_int4(0, 0, 0, 0);
    if (j < T && has_part) {
      const size_t off = ((size_t)b * T + j) * kv_stride + (size_t)hk * D + part * 8;
      rk = *reinterpret_cast<const int4*>(k + off);
      rv = *reinterpret_cast<const int4*>(v + off);
    }
    const bf16* ek = reinterpret_cast<const bf16*>(&rk);
    const bf16* ev = reinterpret_cast<const bf16*>(&rv);
#pragma unroll
    for (int c = 0; c < 8; c++)
      kr[c] = __bfloat162float(ek[c]), vr[c] = __bfloat162float(ev[c]), dk_acc[c] = 0.f, dv_acc[c] = 0.f;
  }
  for (int g = 0; g < group; g++) {
    const int h = hk * group + g;
    const bf16* q_base = q + (size_t)b * T * q_stride + (size_t)h * D;
    const bf16* do_base = dout + (size_t)b * T * q_stride + (size_t)h * D;
    for (int n0 = j0; n0 < T; n0 += TILE) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < TILE * PARTS; idx += 128) {
        const int r = idx / PARTS, c = idx % PARTS, i = n0 + r;
        int4 qq = make_int4(0, 0, 0, 0), dd = make_int4(0, 0, 0, 0);
        if (i < T) {
          qq = *reinterpret_cast<const int4*>(q_base + (size_t)i * q_stride + c * 8);
          dd = *reinterpret_cast<const int4*>(do_base + (size_t)i * q_stride + c * 8);
        }
        *reinterpret_cast<int4*>(sQ + r * D + c * 8) = qq;
        *reinterpret_cast<int4*>(sdO + r * D + c * 8) = dd;
      }
      for (int r = threadIdx.x; r < TILE; r += 128) {
        const int i = n0 + r;
        sL[r] = i < T ? lse[((size_t)b * H + h) * T + i] * LOG2E : INFINITY;
        sD[r] = i < T ? delta[((size_t)b * H + h) * T + i] : 0.f;
      }
      __syncthreads();
      const int n_q = min(TILE, T - n0);
      for (int ii = 0; ii < n_q; ii++) {
        float s = 0.f, dp = 0.f;
        float qv[8], dov[8];
        if (has_part) {
          const int4 rq = *reinterpret_cast<const int4*>(sQ + ii * D + part * 8);
          const int4 rd = *reinterpret_cast<const int4*>(sdO + ii * D + part * 8);
          const bf16* eq = reinterpret_cast<const bf16*>(&rq);
          const bf16* ed = reinterpret_cast<const bf16*>(&rd);
#pragma unroll
          for (int c = 0; c < 8; c++) {
            qv[c] = __bfloat162float(eq[c]), dov[c] = __bfloat162float(ed[c]);
            s = fmaf(qv[c], kr[c], s);
            dp = fmaf(dov[c], vr[c], dp);
          }
        } else {
#pragma unroll
          for (int c = 0; c < 8; c++) qv[c] = 0.f, dov[c] = 0.f;
        }
#pragma unroll
        for (int off = LANES / 2; off > 0; off /= 2) {
          s += __shfl_xor_sync(0xffffffffu, s, off);
          dp += __shfl_xor_sync(0xffffffffu, dp, off);
        }
        if (n0 + ii >= j) {
          const float p = exp2f(fmaf(s, scale_log2, -sL[ii]));
          const float ds = p * (dp - sD[ii]);
#pragma unroll
          for (int c = 0; c < 8; c++) dv_acc[c] = fmaf(p, dov[c], dv_acc[c]), dk_acc[c] = fmaf(ds, qv[c], dk_acc[c]);
        }
      }
    }
  }
  if (j < T && has_part) {
    __align__(16) bf16 rk[8], rv[8];
#pragma unroll
    for (int c = 0; c < 8; c++) rk[c] = __float2bfloat16(dk_acc[c] * scale), rv[c] = __float2bfloat16(dv_acc[c]);
    const size_t off = ((size_t)b * T + j) * kv_stride + (size_t)hk * D + part * 8;
    *reinterpret_cast<int4*>(dk + off) = *reinterpret_cast<const int4*>(rk);
    *reinterpret_cast<int4*>(dv + off) = *reinterpret_cast<const int4*>(rv);
  }
}

// Stores a warp's 16 x D fp32 accumulator tile (mma C layout: [D/8][4] per lane) times `mul` as bf16
// into global rows row0..row0+15 (those below T), staged through 16 shared-memory rows `sbuf` that no
// other warp touches, so the global stores are 16-byte and coalesced.
template <int D, int STRIDE>
__device__ __forceinline__ void store_warp_rows(bf16* g, size_t stride, int row0, int T, const float (&acc)[D / 8][4],
                                                float mul, bf16* sbuf) {
  const int lane = threadIdx.x % 32;
  __syncwarp();
#pragma unroll
  for (int nd = 0; nd < D / 8; nd++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++)
      *reinterpret_cast<uint32_t*>(sbuf + (lane / 4 + hf * 8) * STRIDE + nd * 8 + (lane % 4) * 2) =
          pack_bf16x2(acc[nd][2 * hf] * mul, acc[nd][2 * hf + 1] * mul);
  __syncwarp();
#pragma unroll
  for (int idx = lane; idx < 16 * (D / 8); idx += 32) {
    const int r = idx / (D / 8), c = idx % (D / 8), row = row0 + r;
    if (row < T)
      *reinterpret_cast<int4*>(g + (size_t)row * stride + c * 8) = *reinterpret_cast<const int4*>(sbuf + r * STRIDE + c * 8);
  }
}

// Tensor-core backward: 4 warps x 16 rows, 64-row tiles on both sides, operands from padded shared
// memory (the ldmatrix addressing of the forward), next tiles prefetched with cp.async.
constexpr int BWD_BLOCK = 64, BWD_THREADS = 128;
template <int D>
constexpr size_t bwd_smem_bytes() {  // six 64-row tiles (two fixed, two double-buffered) + lse/delta
  return (size_t)6 * BWD_BLOCK * (D + 8) * sizeof(bf16) + 4 * BWD_BLOCK * sizeof(float);
}

// dq: a block per 64 query rows of one (b, h), walking key tiles 0..diagonal.
template <int D>
__global__ void __launch_bounds__(BWD_THREADS, 2)
    flash_backward_dq_kernel(bf16* __restrict__ dq, const bf16* __restrict__ dout, const float* __restrict__ lse,
                             const float* __restrict__ delta, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, int T, int H, int Hkv, float scale_log2, float scale) {
  constexpr int BLOCK = BWD_BLOCK, THREADS = BWD_THREADS, STRIDE = D + 8, N_FRAGS = BLOCK / 8, D_FRAGS = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // (BLOCK, STRIDE)
  bf16* sdO = sQ + BLOCK * STRIDE;               // (BLOCK, STRIDE)
  bf16* sK = sdO + BLOCK * STRIDE;               // (2, BLOCK, STRIDE)
  bf16* sV = sK + 2 * BLOCK * STRIDE;            // (2, BLOCK, STRIDE)

  const int b = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BLOCK;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_row0 = m0 + warp * 16;
  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;
  const bf16* q_base = q + (size_t)b * T * q_stride + (size_t)h * D;
  const bf16* do_base = dout + (size_t)b * T * q_stride + (size_t)h * D;
  const bf16* k_base = k + (size_t)b * T * kv_stride + (size_t)hk * D;
  const bf16* v_base = v + (size_t)b * T * kv_stride + (size_t)hk * D;

  const int n_tiles = (min(T, m0 + BLOCK) + BLOCK - 1) / BLOCK;
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sQ, q_base, q_stride, m0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sdO, do_base, q_stride, m0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sK, k_base, kv_stride, 0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sV, v_base, kv_stride, 0, T);
  cp_async_commit();

  // This thread's two rows (lane/4 and lane/4 + 8 of the warp's 16): lse in base 2, and delta.
  float lse2[2], dlt[2];
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int row = warp_row0 + lane / 4 + hf * 8;
    lse2[hf] = row < T ? lse[((size_t)b * H + h) * T + row] * LOG2E : INFINITY;  // p = 0 past T
    dlt[hf] = row < T ? delta[((size_t)b * H + h) * T + row] : 0.f;
  }
  float acc[D_FRAGS][4];
#pragma unroll
  for (int nd = 0; nd < D_FRAGS; nd++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[nd][e] = 0.f;
  uint32_t q_frag[D / 16][4];

  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int bk_row = lane % 8 + (lane / 16) * 8, bk_col = ((lane / 8) % 2) * 8;
  const int bv_row = lane % 8 + ((lane / 8) % 2) * 8, bv_col = (lane / 16) * 8;
  const bf16* sQ_warp = sQ + warp * 16 * STRIDE;
  const bf16* sdO_warp = sdO + warp * 16 * STRIDE;

  for (int j = 0; j < n_tiles; j++) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      load_rows_async<D, STRIDE, THREADS, BLOCK>(sK + (buf ^ 1) * BLOCK * STRIDE, k_base, kv_stride, (j + 1) * BLOCK, T);
      load_rows_async<D, STRIDE, THREADS, BLOCK>(sV + (buf ^ 1) * BLOCK * STRIDE, v_base, kv_stride, (j + 1) * BLOCK, T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kd = 0; kd < D / 16; kd++)
        ldmatrix_x4(q_frag[kd], smem_addr(sQ_warp + a_row * STRIDE + kd * 16 + a_col));
    }
    const int n0 = j * BLOCK;
    if (n0 <= warp_row0 + 15) {
      const bf16* sKb = sK + buf * BLOCK * STRIDE;
      const bf16* sVb = sV + buf * BLOCK * STRIDE;
      // s = q k^T and dp = dout v^T, side by side.
      float s[N_FRAGS][4], dp[N_FRAGS][4];
#pragma unroll
      for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[nb][e] = 0.f, dp[nb][e] = 0.f;
#pragma unroll
      for (int kd = 0; kd < D / 16; kd++) {
        uint32_t a_do[4];
        ldmatrix_x4(a_do, smem_addr(sdO_warp + a_row * STRIDE + kd * 16 + a_col));
#pragma unroll
        for (int np = 0; np < BLOCK / 16; np++) {
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, smem_addr(sKb + (np * 16 + bk_row) * STRIDE + kd * 16 + bk_col));
          ldmatrix_x4(bv, smem_addr(sVb + (np * 16 + bk_row) * STRIDE + kd * 16 + bk_col));
          mma_16816(s[2 * np], q_frag[kd], bk[0], bk[1]);
          mma_16816(s[2 * np + 1], q_frag[kd], bk[2], bk[3]);
          mma_16816(dp[2 * np], a_do, bv[0], bv[1]);
          mma_16816(dp[2 * np + 1], a_do, bv[2], bv[3]);
        }
      }
      // ds = p (dp - delta), p = 0 above the diagonal; kept in s.
      const bool diagonal = n0 + BLOCK - 1 > warp_row0;
#pragma unroll
      for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int row = warp_row0 + lane / 4 + (e / 2) * 8;
          const int col = n0 + nb * 8 + (lane % 4) * 2 + (e % 2);
          float p = fast_exp2(fmaf(s[nb][e], scale_log2, -lse2[e / 2]));
          if (diagonal && col > row) p = 0.f;
          s[nb][e] = p * (dp[nb][e] - dlt[e / 2]);
        }
      // dq += ds k: ds accumulators become the A fragment; k read transposed, like v in the forward.
#pragma unroll
      for (int ks = 0; ks < BLOCK / 16; ks++) {
        uint32_t a[4];
        a[0] = pack_bf16x2(s[2 * ks][0], s[2 * ks][1]);
        a[1] = pack_bf16x2(s[2 * ks][2], s[2 * ks][3]);
        a[2] = pack_bf16x2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
        a[3] = pack_bf16x2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
        for (int np = 0; np < D / 16; np++) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, smem_addr(sKb + (ks * 16 + bv_row) * STRIDE + np * 16 + bv_col));
          mma_16816(acc[2 * np], a, bk[0], bk[1]);
          mma_16816(acc[2 * np + 1], a, bk[2], bk[3]);
        }
      }
    }
    __syncthreads();
  }
  // q fragments live in registers since tile 0, so the warp's own sQ rows are free for staging.
  store_warp_rows<D, STRIDE>(dq + (size_t)b * T * q_stride + (size_t)h * D, q_stride, warp_row0, T, acc, scale,
                             sQ + warp * 16 * STRIDE);
}

// dk, dv: a block per 64 keys of one (b, kv head), walking the query tiles at or after them for every
// query head of the group; each warp owns 16 keys, and computes with keys as rows (s^T = k q^T), so
// p^T and ds^T come out in the A-fragment layout that dv += p^T dout and dk += ds^T q need.
template <int D>
__global__ void __launch_bounds__(BWD_THREADS, 2)
    flash_backward_dkdv_kernel(bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ dout,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                               int T, int H, int Hkv, float scale_log2, float scale) {
  constexpr int BLOCK = BWD_BLOCK, THREADS = BWD_THREADS, STRIDE = D + 8, N_FRAGS = BLOCK / 8, D_FRAGS = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // (BLOCK, STRIDE)
  bf16* sV = sK + BLOCK * STRIDE;                // (BLOCK, STRIDE)
  bf16* sQ = sV + BLOCK * STRIDE;                // (2, BLOCK, STRIDE)
  bf16* sdO = sQ + 2 * BLOCK * STRIDE;           // (2, BLOCK, STRIDE)
  float* sL = reinterpret_cast<float*>(sdO + 2 * BLOCK * STRIDE);  // (2, BLOCK) lse * log2(e); +inf past T
  float* sD = sL + 2 * BLOCK;                                      // (2, BLOCK) delta

  const int b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv, group = H / Hkv;
  const int j0 = blockIdx.y * BLOCK;  // key block 0 has the most queries after it: launched first
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_key0 = j0 + warp * 16;
  const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hkv * D;
  const bf16* k_base = k + (size_t)b * T * kv_stride + (size_t)hk * D;
  const bf16* v_base = v + (size_t)b * T * kv_stride + (size_t)hk * D;
  const int q_tiles = (T - j0 + BLOCK - 1) / BLOCK;  // per query head
  const int n_steps = group * q_tiles;

  // Step t: query head hk * group + t / q_tiles, query rows j0 + (t % q_tiles) * BLOCK ...
  auto load_step = [&](int t, int buf) {
    const int h = hk * group + t / q_tiles, m0 = j0 + (t % q_tiles) * BLOCK;
    const size_t head_off = (size_t)b * T * q_stride + (size_t)h * D;
    load_rows_async<D, STRIDE, THREADS, BLOCK>(sQ + buf * BLOCK * STRIDE, q + head_off, q_stride, m0, T);
    load_rows_async<D, STRIDE, THREADS, BLOCK>(sdO + buf * BLOCK * STRIDE, dout + head_off, q_stride, m0, T);
    if (tid < BLOCK) {
      const int i = m0 + tid;
      sL[buf * BLOCK + tid] = i < T ? lse[((size_t)b * H + h) * T + i] * LOG2E : INFINITY;
      sD[buf * BLOCK + tid] = i < T ? delta[((size_t)b * H + h) * T + i] : 0.f;
    }
  };
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sK, k_base, kv_stride, j0, T);
  load_rows_async<D, STRIDE, THREADS, BLOCK>(sV, v_base, kv_stride, j0, T);
  load_step(0, 0);
  cp_async_commit();

  float dk_acc[D_FRAGS][4], dv_acc[D_FRAGS][4];
#pragma unroll
  for (int nd = 0; nd < D_FRAGS; nd++)
#pragma unroll
    for (int e = 0; e < 4; e++) dk_acc[nd][e] = 0.f, dv_acc[nd][e] = 0.f;

  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  const int bk_row = lane % 8 + (lane / 16) * 8, bk_col = ((lane / 8) % 2) * 8;
  const int bv_row = lane % 8 + ((lane / 8) % 2) * 8, bv_col = (lane / 16) * 8;
  const bf16* sK_warp = sK + warp * 16 * STRIDE;
  const bf16* sV_warp = sV + warp * 16 * STRIDE;

  for (int t = 0; t < n_steps; t++) {
    const int buf = t & 1;
    if (t + 1 < n_steps) {
      load_step(t + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int m0 = j0 + (t % q_tiles) * BLOCK;
    const bf16* sQb = sQ + buf * BLOCK * STRIDE;
    const bf16* sdOb = sdO + buf * BLOCK * STRIDE;
    const float* sLb = sL + buf * BLOCK;
    const float* sDb = sD + buf * BLOCK;

    // s^T = k q^T (this warp's 16 keys x 64 queries).
    float st[N_FRAGS][4];
#pragma unroll
    for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) st[nb][e] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 16; kd++) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(sK_warp + a_row * STRIDE + kd * 16 + a_col));
#pragma unroll
      for (int np = 0; np < BLOCK / 16; np++) {
        uint32_t bq[4];
        ldmatrix_x4(bq, smem_addr(sQb + (np * 16 + bk_row) * STRIDE + kd * 16 + bk_col));
        mma_16816(st[2 * np], a, bq[0], bq[1]);
        mma_16816(st[2 * np + 1], a, bq[2], bq[3]);
      }
    }
    // p^T, zero where the query precedes the key (only the diagonal tile has such pairs) or is past T.
    const bool diagonal = m0 < warp_key0 + 15;
#pragma unroll
    for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = warp_key0 + lane / 4 + (e / 2) * 8;
        const int qi = nb * 8 + (lane % 4) * 2 + (e % 2);
        float p = fast_exp2(fmaf(st[nb][e], scale_log2, -sLb[qi]));
        if (diagonal && key > m0 + qi) p = 0.f;
        st[nb][e] = p;
      }
    // dv += p^T dout (dout read transposed, like v in the forward).
#pragma unroll
    for (int ks = 0; ks < BLOCK / 16; ks++) {
      uint32_t a[4];
      a[0] = pack_bf16x2(st[2 * ks][0], st[2 * ks][1]);
      a[1] = pack_bf16x2(st[2 * ks][2], st[2 * ks][3]);
      a[2] = pack_bf16x2(st[2 * ks + 1][0], st[2 * ks + 1][1]);
      a[3] = pack_bf16x2(st[2 * ks + 1][2], st[2 * ks + 1][3]);
#pragma unroll
      for (int np = 0; np < D / 16; np++) {
        uint32_t bd[4];
        ldmatrix_x4_trans(bd, smem_addr(sdOb + (ks * 16 + bv_row) * STRIDE + np * 16 + bv_col));
        mma_16816(dv_acc[2 * np], a, bd[0], bd[1]);
        mma_16816(dv_acc[2 * np + 1], a, bd[2], bd[3]);
      }
    }
    // dp^T = v dout^T.
    float dpt[N_FRAGS][4];
#pragma unroll
    for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) dpt[nb][e] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 16; kd++) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(sV_warp + a_row * STRIDE + kd * 16 + a_col));
#pragma unroll
      for (int np = 0; np < BLOCK / 16; np++) {
        uint32_t bd[4];
        ldmatrix_x4(bd, smem_addr(sdOb + (np * 16 + bk_row) * STRIDE + kd * 16 + bk_col));
        mma_16816(dpt[2 * np], a, bd[0], bd[1]);
        mma_16816(dpt[2 * np + 1], a, bd[2], bd[3]);
      }
    }
    // ds^T = p^T (dp^T - delta), then dk += ds^T q (q read transposed).
#pragma unroll
    for (int nb = 0; nb < N_FRAGS; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int qi = nb * 8 + (lane % 4) * 2 + (e % 2);
        st[nb][e] *= dpt[nb][e] - sDb[qi];
      }
#pragma unroll
    for (int ks = 0; ks < BLOCK / 16; ks++) {
      uint32_t a[4];
      a[0] = pack_bf16x2(st[2 * ks][0], st[2 * ks][1]);
      a[1] = pack_bf16x2(st[2 * ks][2], st[2 * ks][3]);
      a[2] = pack_bf16x2(st[2 * ks + 1][0], st[2 * ks + 1][1]);
      a[3] = pack_bf16x2(st[2 * ks + 1][2], st[2 * ks + 1][3]);
#pragma unroll
      for (int np = 0; np < D / 16; np++) {
        uint32_t bq[4];
        ldmatrix_x4_trans(bq, smem_addr(sQb + (ks * 16 + bv_row) * STRIDE + np * 16 + bv_col));
        mma_16816(dk_acc[2 * np], a, bq[0], bq[1]);
        mma_16816(dk_acc[2 * np + 1], a, bq[2], bq[3]);
      }
    }
    __syncthreads();
  }
  // Each warp read only its own 16 rows of sK and sV: stage dk and dv there.
  store_warp_rows<D, STRIDE>(dk + (size_t)b * T * kv_stride + (size_t)hk * D, kv_stride, warp_key0, T, dk_acc, scale,
                             sK + warp * 16 * STRIDE);
  store_warp_rows<D, STRIDE>(dv + (size_t)b * T * kv_stride + (size_t)hk * D, kv_stride, warp_key0, T, dv_acc, 1.f,
                             sV + warp * 16 * STRIDE);
}

template <int D>
void launch_backward_delta(float* delta, const bf16* dout, const bf16* out, int B, int T, int H, cudaStream_t stream) {
  const long long rows = (long long)B * T * H;
  attention_backward_delta_kernel<D><<<ceil_div(rows, 256), 256, 0, stream>>>(delta, dout, out, B, T, H);
  CUDA_LAUNCH_CHECK();
}

template <int D>
void launch_flash_backward(bf16* dq, bf16* dk, bf16* dv, float* delta, const bf16* dout, const bf16* out,
                           const float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T, int H, int Hkv,
                           cudaStream_t stream) {
  constexpr size_t smem = bwd_smem_bytes<D>();
  static bool configured = false;
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(flash_backward_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    CUDA_CHECK(cudaFuncSetAttribute(flash_backward_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = true;
  }
  const int blocks = ceil_div(T, BWD_BLOCK);
  if (blocks > 65535) fatal("softmax attention backward: sequence length %d too long for one launch", T);
  const float scale = 1.f / sqrtf((float)D), scale_log2 = scale * LOG2E;
  launch_backward_delta<D>(delta, dout, out, B, T, H, stream);
  flash_backward_dkdv_kernel<D><<<dim3(B * Hkv, blocks), BWD_THREADS, smem, stream>>>(
      dk, dv, dout, lse, delta, q, k, v, T, H, Hkv, scale_log2, scale);
  CUDA_LAUNCH_CHECK();
  flash_backward_dq_kernel<D><<<dim3(B * H, blocks), BWD_THREADS, smem, stream>>>(dq, dout, lse, delta, q, k, v, T, H,
                                                                                  Hkv, scale_log2, scale);
  CUDA_LAUNCH_CHECK();
}

template <int D>
void launch_attention_generic_backward(bf16* dq, bf16* dk, bf16* dv, float* delta, const bf16* dout, const bf16* out,
                                       const float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                       int H, int Hkv, cudaStream_t stream) {
  constexpr int PARTS = D / 8;
  constexpr int LANES = PARTS <= 1 ? 1 : PARTS <= 2 ? 2 : PARTS <= 4 ? 4 : PARTS <= 8 ? 8 : 16;
  const int blocks = ceil_div(T, 128 / LANES);
  if (blocks > 65535) fatal("softmax attention backward: sequence length %d too long for one launch", T);
  const float scale = 1.f / sqrtf((float)D), scale_log2 = scale * LOG2E;
  launch_backward_delta<D>(delta, dout, out, B, T, H, stream);
  attention_generic_dkdv_kernel<D><<<dim3(B * Hkv, blocks), 128, 0, stream>>>(dk, dv, dout, lse, delta, q, k, v, T, H,
                                                                               Hkv, scale_log2, scale);
  CUDA_LAUNCH_CHECK();
  attention_generic_dq_kernel<D><<<dim3(B * H, blocks), 128, 0, stream>>>(dq, dout, lse, delta, q, k, v, T, H, Hkv,
                                                                           scale_log2, scale);
  CUDA_LAUNCH_CHECK();
}

inline void attention_generic_backward(bf16* dq, bf16* dk, bf16* dv, float* delta, const bf16* dout, const bf16* out,
                                       const float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                       int H, int Hkv, int d, cudaStream_t stream) {
  switch (d) {
#define ATTENTION_GENERIC_BWD_CASE(D) \
  case D: launch_attention_generic_backward<D>(dq, dk, dv, delta, dout, out, lse, q, k, v, B, T, H, Hkv, stream); break;
    ATTENTION_GENERIC_BWD_CASE(8) ATTENTION_GENERIC_BWD_CASE(16) ATTENTION_GENERIC_BWD_CASE(24)
    ATTENTION_GENERIC_BWD_CASE(32) ATTENTION_GENERIC_BWD_CASE(40) ATTENTION_GENERIC_BWD_CASE(48)
    ATTENTION_GENERIC_BWD_CASE(56) ATTENTION_GENERIC_BWD_CASE(64) ATTENTION_GENERIC_BWD_CASE(72)
    ATTENTION_GENERIC_BWD_CASE(80) ATTENTION_GENERIC_BWD_CASE(88) ATTENTION_GENERIC_BWD_CASE(96)
    ATTENTION_GENERIC_BWD_CASE(104) ATTENTION_GENERIC_BWD_CASE(112) ATTENTION_GENERIC_BWD_CASE(120)
    ATTENTION_GENERIC_BWD_CASE(128)
#undef ATTENTION_GENERIC_BWD_CASE
    default: fatal("softmax attention backward: head dim %d is not a multiple of 8 in [8, 128]", d);
  }
}

}  // namespace attention_detail

#include "attention_hopper.cuh"

// Causal GQA softmax attention forward. out, q: (B, T, H, d); k, v: (B, T, Hkv, d); lse: (B, H, T)
// natural-log logsumexp of the scaled scores per query row (kept for the backward), or nullptr.
// d: a multiple of 8 up to 128 (64 and 128 take the tensor-core paths, 128 on wgmma on Hopper). Scale 1/sqrt(d).
inline void softmax_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                      int H, int Hkv, int d, cudaStream_t stream) {
  using namespace attention_detail;
  check_attention_args(q, k, v, out, B, T, H, Hkv, d);
  if (B == 0 || T == 0) return;
  if (d == 128 && attention_hopper::wgmma_available())
    attention_hopper::launch_flash_forward_wgmma<3, false, true, false>(out, lse, q, k, v, B, T, H, Hkv, stream);
  else if (d == 128)
    launch_flash_forward<FlashTile128>(out, lse, q, k, v, B, T, H, Hkv, stream);
  else if (d == 64)
    launch_flash_forward<FlashTile64>(out, lse, q, k, v, B, T, H, Hkv, stream);
  else
    attention_generic(out, lse, q, k, v, B, T, H, Hkv, d, stream);
}

// Its backward. dout, out, q: (B, T, H, d); k, v: (B, T, Hkv, d); lse: (B, H, T) from the forward.
// Writes dq (B, T, H, d) and dk, dv (B, T, Hkv, d) (overwritten, summed over each GQA group in fp32);
// delta: (B, H, T) fp32 scratch. Same head sizes as the forward (64 and 128 on tensor cores).
inline void softmax_attention_backward(bf16* dq, bf16* dk, bf16* dv, float* delta, const bf16* dout, const bf16* out,
                                       const float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                       int H, int Hkv, int d, cudaStream_t stream) {
  using namespace attention_detail;
  check_attention_args(q, k, v, out, B, T, H, Hkv, d);
  for (const void* p : {(const void*)dq, (const void*)dk, (const void*)dv, (const void*)dout})
    if ((uintptr_t)p % 16 != 0) fatal("softmax attention backward: tensors must be 16-byte aligned");
  if (!lse || !delta) fatal("softmax attention backward: lse and the delta scratch are required");
  if (B == 0 || T == 0) return;
  if (d == 128)
    launch_flash_backward<128>(dq, dk, dv, delta, dout, out, lse, q, k, v, B, T, H, Hkv, stream);
  else if (d == 64)
    launch_flash_backward<64>(dq, dk, dv, delta, dout, out, lse, q, k, v, B, T, H, Hkv, stream);
  else
    attention_generic_backward(dq, dk, dv, delta, dout, out, lse, q, k, v, B, T, H, Hkv, d, stream);
}

#include "hybrid_attention.cuh"
