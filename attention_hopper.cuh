// attention_hopper.cuh: the teacher's causal softmax attention forward for d = 128 on Hopper (sm_90a):
// warpgroup MMA (wgmma) with operands in shared memory loaded by the tensor memory accelerator (TMA).
// Included by attention.cuh (softmax_attention_forward dispatches here for d = 128); same math, layouts
// and lse as flash_forward_kernel there, which stays the path for other head sizes and older GPUs.
//
// Why: mma.sync (the warp-level MMA of flash_forward_kernel) tops out near 340 TFLOP/s here, about a
// third of the H200's dense bf16 peak; wgmma, issued by 4 warps together with B (and A) read straight
// from shared memory, is the instruction that goes further (H200, H=32, Hkv=8, B*T=8192: 390 / 559 /
// 600-650 TFLOP/s at T = 1024 / 4096 / 16384 against 280 / 331 / 344). Its operand layouts dictate
// the design:
//  - Block: 128 query rows of one (batch, head), 3 warpgroups. Warpgroup 0 is the producer: one thread
//    issues TMA copies of the block's q tile and of every 128-key k and v tile into a ring of STAGES
//    shared-memory buffers, with mbarriers saying "full" (bytes landed) and "empty" (consumers done).
//    Warpgroups 1 and 2 each own 64 query rows and run the flash loop; while one does its softmax the
//    other's MMAs keep the tensor cores busy. setmaxnreg moves registers from the producer (24) to the
//    consumers (240): a consumer holds s (64 x 128 fp32) and o (64 x 128 fp32) accumulators.
//  - Shared tiles are 64-column halves (128 bytes per row) in the 128-byte swizzle that TMA writes and
//    that the wgmma descriptors read (16-byte chunk c of row r lives at chunk c ^ (r % 8)): no bank
//    conflicts, no transposes. s = q k^T reads q and k K-major (d contiguous, as they are in memory);
//    o += p v takes p from registers (the fp32 accumulator layout of s, packed to bf16 pairs, is the
//    register A layout) and v (keys x d, d contiguous) as an MN-major B via the descriptor's transpose.
//  - OVERLAP: within a warpgroup, the s MMAs of tile j and the p v MMAs of tile j - 1 are issued
//    together and the softmax of tile j runs while p v is still in flight. It holds two k/v stages at
//    once, so it needs STAGES = 3 (224 KB of shared memory) to keep a load ahead; with 2 stages it is
//    slower than the serial loop.
//  - Online softmax in fp32 with exp2 and the scale folded into one multiply; the causal mask only on
//    the diagonal tile (the last of every block; DIAG_HALF, a lab option: the first consumer, whose 64
//    rows all precede the tile's last 64 keys, computes only 64 keys there). Heaviest query tiles are
//    scheduled first; TMA zero-fills rows past T (and the mask removes keys past T: they follow every
//    valid row).
//  - Dispatched: STAGES = 3, OVERLAP, p v as one n128 MMA, no DIAG_HALF (dev/flash_attention.cu times
//    the others).
#pragma once
#include <type_traits>
#include <cuda.h>  // CUtensorMap (the encoder is fetched through the runtime: no -lcuda)

namespace attention_hopper {

using attention_detail::fast_exp2;
using attention_detail::pack_bf16x2;
using attention_detail::smem_addr;

constexpr int D = 128, BLOCK_M = 128, BLOCK_N = 128, THREADS = 384;
constexpr int HALF_BYTES = 128 * 128;  // one 64-column half of a 128-row tile
constexpr int TILE_BYTES = 2 * HALF_BYTES;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LOLCATS_WGMMA 1
#endif

// ---- PTX wrappers ----

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
// TMA: the box at coordinates (c0 = column, c1 = head, c2 = sequence row, c3 = batch) -> shared memory.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}

// The same for a [R][C] accumulator (the mma C-fragment arrays of hybrid_attention.cuh).
template <int R, int C>
__device__ __forceinline__ void fence_regs(float (&r)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; i++)
#pragma unroll
    for (int j = 0; j < C; j++) asm volatile("" : "+f"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte offsets
// (>> 4), layout type 1 (SWIZZLE_128B) in bits 62-63. K-major: rows of 128 bytes, 8-row groups 1024
// bytes apart (stride offset); the leading offset is unused. MN-major (v): the stride offset is
// the distance between 8-key groups (1024 bytes), the leading offset between 64-column halves.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
         (1ull << 62);
}

// d (64 x 128 fp32, accumulator layout) (+)= A (64 x 16, smem desc) * B (128 x 16, smem desc), both K-major.
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d (64 x 64 fp32) (+)= A (64 x 16, smem desc) * B (64 x 16, smem desc), both K-major.
__device__ __forceinline__ void wgmma_ss_m64n64k16(float* d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d (64 x 128 fp32) += A (64 x 16 bf16, registers) * B (16 x 128, smem desc, MN-major: transposed).
__device__ __forceinline__ void wgmma_rs_m64n128k16_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// d (64 x 64 fp32) += A (64 x 16 bf16, registers) * B (16 x 64, smem desc, MN-major: transposed).
__device__ __forceinline__ void wgmma_rs_m64n64k16_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// d (64 x 16 fp32) (+)= A (64 x 16, smem desc) * B (16 x 16, smem desc), both K-major.
__device__ __forceinline__ void wgmma_ss_m64n16k16(float* d, uint64_t desc_a, uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// d (64 x 64 fp32) (+)= A (64 x 16 bf16, registers) * B (64 x 16, smem desc, K-major).
__device__ __forceinline__ void wgmma_rs_m64n64k16_kb(float* d, const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
// d (64 x 64 fp32) (+)= A (64 x 16 f16, registers) * B (64 x 16 f16, smem desc, K-major).
__device__ __forceinline__ void wgmma_rs_m64n64k16_f16_kb(float* d, const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
// d (64 x 128 fp32) += A (64 x 16 f16, registers) * B (16 x 128 f16, smem desc, MN-major: transposed).
__device__ __forceinline__ void wgmma_rs_m64n128k16_f16_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
// d (64 x 64 fp32) += A (64 x 16 f16, registers) * B (16 x 64 f16, smem desc, MN-major: transposed).
__device__ __forceinline__ void wgmma_rs_m64n64k16_f16_tb(float* d, const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// ---- the kernel ----

template <int STAGES, bool PV_SPLIT>
struct HopperTile {
  // q (one tile), then STAGES k tiles and STAGES v tiles, then the mbarriers; +1024 for the alignment
  // the 128-byte swizzle needs (buffers on 1024-byte boundaries).
  static constexpr int BAR_OFFSET = (1 + 2 * STAGES) * TILE_BYTES;
  static constexpr size_t SMEM_BYTES = BAR_OFFSET + 8 * (1 + 3 * STAGES) + 1024;
};

template <int STAGES, bool PV_SPLIT, bool OVERLAP, bool DIAG_HALF>
__global__ void __launch_bounds__(THREADS, 1)
    flash_forward_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                               const __grid_constant__ CUtensorMap map_v, bf16* __restrict__ out,
                               float* __restrict__ lse, int T, int H, int Hkv, float scale_log2) {
#ifdef LOLCATS_WGMMA
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - smem_addr(smem_raw));
  const uint32_t sQ = base, sK = base + TILE_BYTES, sV = base + (1 + STAGES) * TILE_BYTES;
  const uint32_t bars = base + HopperTile<STAGES, PV_SPLIT>::BAR_OFFSET;
  // bars: q_full, k_full[STAGES], v_full[STAGES], empty[STAGES]
  auto q_full = [&] { return bars; };
  auto k_full = [&](int s) { return bars + 8 * (1 + s); };
  auto v_full = [&](int s) { return bars + 8 * (1 + STAGES + s); };
  auto empty = [&](int s) { return bars + 8 * (1 + 2 * STAGES + s); };

  const int b = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * BLOCK_M;  // heaviest query tiles first
  const int n_tiles = (min(T, m0 + BLOCK_M) + BLOCK_N - 1) / BLOCK_N;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;

  if (threadIdx.x == 0) {
    mbar_init(q_full(), 1);
    for (int s = 0; s < STAGES; s++) mbar_init(k_full(s), 1), mbar_init(v_full(s), 1), mbar_init(empty(s), 8);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {  // producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (tid == 0) {
      mbar_expect_tx(q_full(), TILE_BYTES);
      tma_load_4d(sQ, &map_q, q_full(), 0, h, m0, b);
      tma_load_4d(sQ + HALF_BYTES, &map_q, q_full(), 64, h, m0, b);
      for (int j = 0; j < n_tiles; j++) {
        const int s = j % STAGES;
        if (j >= STAGES) mbar_wait(empty(s), ((j / STAGES) & 1) ^ 1);
        mbar_expect_tx(k_full(s), TILE_BYTES);
        tma_load_4d(sK + s * TILE_BYTES, &map_k, k_full(s), 0, hk, j * BLOCK_N, b);
        tma_load_4d(sK + s * TILE_BYTES + HALF_BYTES, &map_k, k_full(s), 64, hk, j * BLOCK_N, b);
        mbar_expect_tx(v_full(s), TILE_BYTES);
        tma_load_4d(sV + s * TILE_BYTES, &map_v, v_full(s), 0, hk, j * BLOCK_N, b);
        tma_load_4d(sV + s * TILE_BYTES + HALF_BYTES, &map_v, v_full(s), 64, hk, j * BLOCK_N, b);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  const int cw = wg - 1;  // consumer warpgroup: query rows m0 + 64 cw ...
  const int warp = tid / 32, lane = tid % 32;
  // This thread's two rows (accumulator layout): r and r + 8, cols 8 jb + 2 (lane % 4) + {0, 1}.
  const int row0 = m0 + cw * 64 + warp * 16 + lane / 4;
  const uint32_t sQw = sQ + cw * 64 * 128;  // this warpgroup's 64 rows inside each half

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; i++) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max in scaled log2 units

  // Compile-time flags for the lambdas below (C++17 generic lambdas take them as arguments).
  using Full = std::integral_constant<bool, false>;
  using Half = std::integral_constant<bool, true>;
  // s = q k^T for the tile in stage st (8 MMAs of k16 along d), issued, not waited for. Half: only the
  // first 64 keys (the diagonal tile of the first consumer, whose rows all precede key m0 + 64); the
  // other 64 scores are then set to -inf (clear_upper) once the MMAs are done.
  auto issue_s = [&](float (&sc)[64], int st, auto half) {
    const uint32_t sKs = sK + st * TILE_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      const uint32_t off = (kk / 4) * HALF_BYTES + (kk % 4) * 32;
      if constexpr (decltype(half)::value)
        wgmma_ss_m64n64k16(sc, make_desc(sQw + off, 16, 1024), make_desc(sKs + off, 16, 1024), kk > 0);
      else
        wgmma_ss_m64n128k16(sc, make_desc(sQw + off, 16, 1024), make_desc(sKs + off, 16, 1024), kk > 0);
    }
    wgmma_commit();
  };
  auto clear_upper = [&](float (&sc)[64], auto half) {
    if constexpr (decltype(half)::value) {
#pragma unroll
      for (int i = 32; i < 64; i++) sc[i] = -INFINITY;
    }
  };
  // o += p v for the tile in stage st (8 MMAs of k16 along the keys; Half: 4, p = 0 for the last 64).
  auto issue_pv = [&](const uint32_t (&p)[8][4], int st, auto half) {
    const uint32_t sVs = sV + st * TILE_BYTES;
    constexpr int K_STEPS = decltype(half)::value ? BLOCK_N / 32 : BLOCK_N / 16;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < K_STEPS; kk++) {
      if constexpr (PV_SPLIT) {
        wgmma_rs_m64n64k16_tb(o, p[kk], make_desc(sVs + kk * 2048, 16, 1024));
        wgmma_rs_m64n64k16_tb(o + 32, p[kk], make_desc(sVs + HALF_BYTES + kk * 2048, 16, 1024));
      } else {
        wgmma_rs_m64n128k16_tb(o, p[kk], make_desc(sVs + kk * 2048, HALF_BYTES, 1024));
      }
    }
    wgmma_commit();
  };
  // Mask (diagonal tile only), online softmax: sc becomes p (fp32), alpha the rescale factor of o.
  auto softmax = [&](float (&sc)[64], int j, float (&alpha)[2]) {
    const int n0 = j * BLOCK_N;
    if (n0 + BLOCK_N - 1 > m0 + cw * 64) {  // the diagonal tile: keys after the row are masked
#pragma unroll
      for (int jb = 0; jb < 16; jb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int col = n0 + jb * 8 + (lane % 4) * 2 + (e % 2), row = row0 + (e / 2) * 8;
          if (col > row) sc[4 * jb + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      float mx = -INFINITY;
#pragma unroll
      for (int jb = 0; jb < 16; jb++) mx = fmaxf(mx, fmaxf(sc[4 * jb + 2 * hf], sc[4 * jb + 2 * hf + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[hf], mx * scale_log2);
      // Key 0 precedes every row and tile 0 is never skipped: new_max is finite; the guard keeps a
      // (never expected) all-masked row at p = 0 instead of NaN.
      const float m_use = new_max == -INFINITY ? 0.f : new_max;
      alpha[hf] = fast_exp2(row_max[hf] - m_use);
      row_max[hf] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int jb = 0; jb < 16; jb++)
#pragma unroll
        for (int e = 2 * hf; e < 2 * hf + 2; e++) {
          const float pe = fast_exp2(fmaf(sc[4 * jb + e], scale_log2, -m_use));
          sc[4 * jb + e] = pe;
          sum += pe;
        }
      row_sum[hf] = row_sum[hf] * alpha[hf] + sum;
    }
  };
  auto rescale_o = [&](const float (&alpha)[2]) {
#pragma unroll
    for (int jb = 0; jb < 16; jb++)
#pragma unroll
      for (int e = 0; e < 4; e++) o[4 * jb + e] *= alpha[e / 2];
  };
  // The accumulator layout of two adjacent 8-key blocks, packed to bf16 pairs, is the A fragment.
  auto pack_p = [&](uint32_t (&p)[8][4], const float (&sc)[64]) {
#pragma unroll
    for (int kk = 0; kk < 8; kk++) {
      p[kk][0] = pack_bf16x2(sc[8 * kk + 0], sc[8 * kk + 1]);
      p[kk][1] = pack_bf16x2(sc[8 * kk + 2], sc[8 * kk + 3]);
      p[kk][2] = pack_bf16x2(sc[8 * kk + 4], sc[8 * kk + 5]);
      p[kk][3] = pack_bf16x2(sc[8 * kk + 6], sc[8 * kk + 7]);
    }
  };
  auto release = [&](int st) {  // this warp is done with stage st (its MMAs have completed)
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(st));
  };

  // The last tile of every block is its diagonal tile (BLOCK_M == BLOCK_N, m0 a multiple of both);
  // with DIAG_HALF the first consumer takes it at 64 keys. The choice between the Full and Half code
  // is a branch between two complete sequences, each ending with its MMAs waited for (a run-time flag
  // inside the MMA issue ran 20% slower in every variant). Even so, with OVERLAP the extra code costs
  // registers: ptxas serializes the wgmma (info C7511) and it runs 25% slower; without OVERLAP it
  // gains ~1% at T = 1024. The dispatcher leaves it off.
  const bool half_last = DIAG_HALF && cw == 0;
  float sc[64], alpha[2];
  uint32_t p[8][4];
  mbar_wait(q_full(), 0);
  if constexpr (!OVERLAP) {
    // Plain: s, softmax, p v, one after the other; the other warpgroup fills the tensor cores meanwhile.
    auto step = [&](int j, auto half) {
      const int st = j % STAGES;
      const uint32_t parity = (j / STAGES) & 1;
      mbar_wait(k_full(st), parity);
      issue_s(sc, st, half);
      wgmma_wait<0>();
      fence_regs(sc);
      clear_upper(sc, half);
      softmax(sc, j, alpha);
      rescale_o(alpha);
      pack_p(p, sc);
      mbar_wait(v_full(st), parity);
      fence_regs(o);
      issue_pv(p, st, half);
      wgmma_wait<0>();
      fence_regs(o);
      release(st);
    };
    for (int j = 0; j < n_tiles - 1; j++) step(j, Full());
    if (half_last) step(n_tiles - 1, Half());
    else step(n_tiles - 1, Full());
  } else {
    // Overlapped within the warpgroup: the MMAs of s for tile j and of p v for tile j - 1 run while
    // nothing waits; the softmax of tile j then runs while p v of tile j - 1 may still be in flight
    // (it reads p, which is rewritten only after it completes; o is rescaled only after, too).
    auto first = [&](auto half) {
      mbar_wait(k_full(0), 0);
      issue_s(sc, 0, half);
      wgmma_wait<0>();
      fence_regs(sc);
      clear_upper(sc, half);
      softmax(sc, 0, alpha);  // o is still zero: no rescale
      pack_p(p, sc);
    };
    auto step = [&](int j, auto half) {
      const int st = j % STAGES, prev = (j - 1) % STAGES;
      mbar_wait(k_full(st), (j / STAGES) & 1);
      issue_s(sc, st, half);
      mbar_wait(v_full(prev), ((j - 1) / STAGES) & 1);
      fence_regs(o);
      issue_pv(p, prev, Full());
      wgmma_wait<1>();  // s of tile j is done
      fence_regs(sc);
      clear_upper(sc, half);
      softmax(sc, j, alpha);
      wgmma_wait<0>();  // p v of tile j - 1 is done
      fence_regs(o);
      release(prev);
      rescale_o(alpha);
      pack_p(p, sc);
    };
    auto last_pv = [&](auto half) {
      const int last = (n_tiles - 1) % STAGES;
      mbar_wait(v_full(last), ((n_tiles - 1) / STAGES) & 1);
      fence_regs(o);
      issue_pv(p, last, half);
      wgmma_wait<0>();
      fence_regs(o);
      release(last);
    };
    if (half_last && n_tiles == 1) first(Half());
    else first(Full());
    for (int j = 1; j < n_tiles - 1; j++) step(j, Full());
    if (n_tiles > 1) {
      if (half_last) step(n_tiles - 1, Half());
      else step(n_tiles - 1, Full());
    }
    if (half_last) last_pv(Half());
    else last_pv(Full());
  }

  // Epilogue: out = o / l through this warpgroup's rows of the q tile (its last reader was this
  // warpgroup's final s MMA, complete), swizzled like the tiles so the 4-byte writes are conflict-free,
  // then 16-byte coalesced global stores.
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    float l = row_sum[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    row_sum[hf] = l;
    const int row = row0 + hf * 8;
    if (lse && lane % 4 == 0 && row < T) lse[((size_t)b * H + h) * T + row] = (row_max[hf] + log2f(l)) * attention_detail::LN2;
  }
  unsigned char* sQw_ptr = base_ptr + cw * 64 * 128;
#pragma unroll
  for (int jb = 0; jb < 16; jb++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = warp * 16 + lane / 4 + hf * 8;  // row within the warpgroup's 64
      const float inv = 1.f / row_sum[hf];
      const int half = jb / 8, chunk = (jb % 8) ^ (r % 8);
      *reinterpret_cast<uint32_t*>(sQw_ptr + half * HALF_BYTES + r * 128 + chunk * 16 + (lane % 4) * 4) =
          pack_bf16x2(o[4 * jb + 2 * hf] * inv, o[4 * jb + 2 * hf + 1] * inv);
    }
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + cw) : "memory");
  const size_t q_stride = (size_t)H * D;
  bf16* out_base = out + (size_t)b * T * q_stride + (size_t)h * D;
#pragma unroll
  for (int idx = tid; idx < 64 * 16; idx += 128) {
    const int r = idx / 16, c = idx % 16, half = c / 8, chunk = (c % 8) ^ (r % 8);
    const int row = m0 + cw * 64 + r;
    if (row < T)
      *reinterpret_cast<int4*>(out_base + (size_t)row * q_stride + c * 8) =
          *reinterpret_cast<const int4*>(sQw_ptr + half * HALF_BYTES + r * 128 + chunk * 16);
  }
#else
  __trap();  // built without sm_90a: the dispatcher does not call this kernel (wgmma_available())
#endif
}

// ---- host side ----

typedef CUresult (*TensorMapEncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                         const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                         CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline TensorMapEncodeTiled tensor_map_encoder() {
  static TensorMapEncodeTiled fn = nullptr;
  if (!fn) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult res;
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &res));
    if (res != cudaDriverEntryPointSuccess || !p) fatal("cuTensorMapEncodeTiled not available");
    fn = (TensorMapEncodeTiled)p;
  }
  return fn;
}

// (B, T, heads, 128) bf16 as a 4-D tensor (column, head, row, batch); boxes of 64 columns x 128 rows of
// one head, 128-byte swizzled. Rows past T (within a batch) read as zeros.
inline CUtensorMap make_head_map(const bf16* x, int B, int T, int heads) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)heads, (cuuint64_t)T, (cuuint64_t)B};
  const cuuint64_t strides[3] = {(cuuint64_t)D * 2, (cuuint64_t)heads * D * 2, (cuuint64_t)T * heads * D * 2};
  const cuuint32_t box[4] = {64, 1, 128, 1}, elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void*)x, dims, strides, box,
                                          elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fatal("cuTensorMapEncodeTiled failed (%d)", (int)r);
  return map;
}

static __global__ void wgmma_probe_kernel(int* flag) {  // static: one per translation unit
#ifdef LOLCATS_WGMMA
  *flag = 1;
#else
  *flag = 0;
#endif
}

// True when the device is a Hopper (9.0) and this binary carries sm_90a code (wgmma, setmaxnreg).
inline bool wgmma_available() {
  static int cached = -1;
  if (cached < 0) {
    int dev = 0, major = 0, minor = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    cached = 0;
    if (major == 9 && minor == 0) {
      int* flag = cuda_alloc<int>(1);
      wgmma_probe_kernel<<<1, 1>>>(flag);
      const cudaError_t e = cudaGetLastError();
      int host = 0;
      if (e == cudaSuccess) CUDA_CHECK(cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost));
      cuda_free(flag);
      cached = host == 1;
    }
  }
  return cached == 1;
}

template <int STAGES, bool PV_SPLIT, bool OVERLAP, bool DIAG_HALF>
void launch_flash_forward_wgmma(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, int B, int T,
                                int H, int Hkv, cudaStream_t stream) {
  using Tile = HopperTile<STAGES, PV_SPLIT>;
  static bool configured = false;
  if (!configured) {
    CUDA_CHECK(cudaFuncSetAttribute(flash_forward_wgmma_kernel<STAGES, PV_SPLIT, OVERLAP, DIAG_HALF>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tile::SMEM_BYTES));
    configured = true;
  }
  const int m_blocks = ceil_div(T, BLOCK_M);
  if (m_blocks > 65535) fatal("softmax attention: sequence length %d too long for one launch", T);
  const CUtensorMap mq = make_head_map(q, B, T, H), mk = make_head_map(k, B, T, Hkv), mv = make_head_map(v, B, T, Hkv);
  const float scale_log2 = attention_detail::LOG2E / sqrtf((float)D);
  flash_forward_wgmma_kernel<STAGES, PV_SPLIT, OVERLAP, DIAG_HALF><<<dim3(B * H, m_blocks), THREADS, Tile::SMEM_BYTES, stream>>>(
      mq, mk, mv, out, lse, T, H, Hkv, scale_log2);
  CUDA_LAUNCH_CHECK();
}

}  // namespace attention_hopper
