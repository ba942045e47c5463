// hybrid_attention.cuh: the LoLCATs hybrid attention (sliding-window softmax + Hedgehog linear
// attention), forward and backward, chunked and linear in T. The function is exactly the one of
// ../shared/LOLCATS.md §1; reference/hybrid_ref.h is its CPU oracle (the O(T^2) formula).
//
// USE. Stage 1: hybrid_attention_forward(..., &loss) then hybrid_attention_backward(..., y = dy = nullptr):
// dWq, dWk, dw accumulate; nothing else is computed (a forward with the loss saves only what that backward
// reads: follow it with no other backward). Stage 2: forward without a loss, then backward with dy
// and dq/dk/dv set; the maps and window factors are frozen there, so leave dWq, dWk, dw null (no
// weight-gradient pass) and give `saved` no y_lo (it only sharpens dw). Buffers: HybridAttnSaved per layer
// (hybrid_saved_bytes; with_phi buys a faster stage-2 backward for 2 x 256 bytes a row and head), one
// scratch workspace for all layers (hybrid_workspace_bytes; without input gradients it can be smaller). Layouts as everywhere: q, y (B, T, H, d); k, v (B, T, Hkv, d).
//
// THE FUNCTION (per batch b, query head h, kv head h / (H/Hkv); window w = 64):
//   phi(x) = [softmax(x W), softmax(-x W)] (2f entries, clamped >= 1e-12); per query head, W_q for q, W_k for k
//   softmax keys of query i: the window (terrace: chunks c-1 and c of query chunk c; sliding: i-w < j <= i)
//   and the sinks (the first `sinks` positions); linear keys: every other j <= i
//   y_i = (gamma sum_W e^{s_ij - m_i} v_j + sum_L phi_q(q_i).phi_k(k_j) v_j) / (the same sums without v_j)
//   with m_i the max over the softmax keys only; the linear part is not rescaled by it; no epsilon.
//
// ALGORITHM. Chunks of 64 = w positions, anchored at position 0. A query in chunk c has its softmax keys in
// chunks c-1 and c (plus the sinks, which from chunk 2 on form a 16-key tile of their own) and its linear keys
// in chunks <= c-2 (both geometries) plus, for sliding, the keys of chunk c-1 at least w behind it. With the
// prefix state of the linear keys
//     S_c = sum over keys j in chunks <= c-2 (sinks excluded) of phi_k(k_j) v_j^T      (2f x d = 128 x d)
//     z_c = sum over the same keys of phi_k(k_j)                                        (128)
// chunk c needs two 64-key tiles of K/V and (S_c, z_c):
//     numA, denA = online softmax over the tiles (running max, rescaled as in flash attention), times gamma
//     numL = phi_q S_c (+ sliding: (phi_q phi_k^T, masked) V_{c-1}),  denL = phi_q . z_c (+ its row sums)
//     y = (numA + numL) / (denA + denL)
// numA and numL stay in separate accumulators and meet only at the end, which is how the max over the
// window keys and the unscaled linear term combine exactly. Work per chunk is constant: linear in T; memory
// is O(T d) plus one 128 x d state per thread block (no T x T buffer anywhere).
//
// KERNEL VERSIONS. Version 3 (d = 128, the Llama shapes; HYBRID_IMPL_TENSOR or AUTO) runs the forward and the
// backward (stage 1 and full; the window dk/dv kernel is shared with version 2); version 2 runs d = 64 and
// everything under HYBRID_IMPL_TENSOR_V2. Version 2 is described first, version 3 after it.
//
// FORWARD, version 2 (fast_forward_kernel; tensor cores, d in {64, 128}, f = 64). A block of 4 warps walks a
// segment of G consecutive chunks of one (b, h) (G = 16, 32 or 64, seg_chunks() picks it from the shape); warp w owns rows [16w, 16w + 16) of each chunk. S (fp32) and z
// live in shared memory (with the K/V tiles ~213 KB at d = 128: one block of 4 warps per SM, which is what left
// it latency-bound and led to version 3). Per chunk c: phi_k of chunk c-1 (bf16 mma + softmax, to shared memory),
// the softmax tiles (q K^T in bf16, probabilities in f16 for p V), phi_q (kept as f16 mma fragments), phi_q S in
// tf32 mma on the fp32 state, the sliding masked term, the output; then S += phi_k(c-1)^T V_{c-1}, z += sum
// phi_k(c-1). K/V of chunk c+1 (and y_true in stage 1) arrive by cp.async while chunk c computes; GQA heads read
// the same K/V rows (never repeated in memory). The state entering segment s (chunks <= G s - 2) is the
// exclusive scan over segments of each segment's own sum (segment_sum_kernel, all segments in parallel; it
// sums sub-segments of 8 chunks, more blocks and shorter chains, and the scan adds them up); one segment
// (T <= 1024) skips it. The forward keeps these prefixes in `saved` for its backward. Fused stage-1
// loss: the output section also writes dy = scale * 2 (y - y_true) / n, delta_i = dy_i . y_i / den_i and the
// window factor's term sum_j A_ij dA_ij = dy_i . (numA_i - y_i denA_i) / den_i, so the stage-1 backward never
// revisits the softmax part.
//
// FORWARD, version 3 (fast_forward_v3_kernel, d = 128). Same segments, 8 warps (256 threads). The fp32
// state lives in REGISTERS: warp w owns rows [16w, 16w + 16) of S^T (d x 128) as mma C fragments (64
// registers a thread), so S^T += V_{c-1}^T phi_k(c-1) is an mma chain into them (f16), and numL^T = S^T
// phi_q^T takes them as f16 A fragments (the C fragments of two n-tiles are the A fragment of one 16-wide
// k-step), scaled per warp by a power of two that fits f16's range (state_times_tile_t). numL^T goes to an
// fp32 shared tile (query, d). Per chunk: (A) warps
// 0-3 phi_k(c-1), warps 4-7 phi_q(c) and phi_q . z; (B) every warp its state rows: numL^T, then the update;
// (C) warp (row group rg = w % 4, half hf = w / 4) the softmax tiles of rows [16 rg, +16) for head-dim columns
// [64 hf, +64) (both halves form the same scores, so the pair needs no max/sum exchange) and the sliding
// term; (D) y = (numA + numL) / den and the fused loss, the two halves' row sums combined in a fixed order.
// z stays in shared memory (read in (A), updated in (B), a barrier apart). With the stage-1 loss, y_true comes
// in by cp.async at the top of the chunk (awaited before (D)), the feature maps go to `saved` for the
// backward (phi_q of chunk c, phi_k of chunk c-1, 16-byte copies of the shared tiles), and the window's arg
// max is not tracked (only
// input gradients need it). 242-255 registers, no spills, 221 KB of shared memory: one block of 8 warps per
// SM (twice version 2's warps, each with half the work). Where its time goes (ncu, H200, T = 1024): issue
// slots 38 % busy, tensor pipe 19 %; per issued instruction the warps wait ~0.9 cycles on fixed latencies,
// 0.8 on global memory, 0.7 on shared memory. Tried and dropped: Q double-buffered with K_c, V_c awaited
// only after the feature maps (one more barrier; 0.399 -> 0.418 ms). Source-level stall sampling (ncu,
// 2026-11-29) then put a quarter of the samples in (D): every shared load there waited for the dy store
// before it, which the compiler may not reorder (same memory, addresses it cannot tell apart). Loading a
// row's words first, and the same in the state kernels' dphi stores, is worth 8-12 % of each kernel; a
// pattern to look for wherever a loop both reads and writes shared memory.
// On Hopper (use_wgmma(): a binary with sm_90a code) the same kernel (WG = true) issues three of its
// products as warpgroup MMA, warps 0-3 and 4-7 each a warpgroup: q K^T of the window tiles (q as register A
// fragments, K a swizzled tile), numL^T = S^T phi_q^T (the scaled f16 state as register A, phi_q a swizzled
// tile) and S^T += V^T phi_k (V^T fragments by ldmatrix from the padded V tile as register A, phi_k an MN-major
// B). The state's rows are the warps' rows, so a warpgroup's m64 is its four warps' 16 rows each; the K and
// feature tiles are 128-byte swizzled (the other readers use swizzled addresses). H200, T = 1024: forward
// 0.387 -> 0.356 ms, its stage-1 form 0.379 -> 0.341 (the P V products stay mma.sync).
//
// BACKWARD. With g_i = dy_i / den_i and delta_i = dy_i . y_i / den_i:
//   dA_ij = dB_ij = g_i . v_j - delta_i; on softmax keys ds_ij = A_ij dA_ij, and since m_i is a real function
//   of the scores here, the arg max j* also gets dm_i = -sum_j A_ij dA_ij;  dw_h = (1 - gamma) sum A dA.
//   dphi_q(i) = S_c g_i - delta_i z_c  (+ sliding: the masked keys of chunk c-1, sum_j dB_ij phi_k(j))
//   dphi_k(j) = R_c v_j - r_c          (+ sliding: the masked queries of chunk c+1)
//   with the REVERSE prefix state R_c = sum over queries in chunks >= c+2 of phi_q(q_i) g_i^T, r_c = sum
//   phi_q(q_i) delta_i; the linear part of dv_j is R_c^T phi_k(k_j) (+ sliding).
//   Feature maps: du = phi+ (dphi+ - phi+.dphi+) - phi- (dphi- - phi-.dphi-); dx = W du, dW = sum x du^T.
// fast_backward_query_kernel walks the segment forward with S (the forward's prefixes): phi_q, dphi_q = dy S^T
// (tf32), du_q (to scratch), dq = du_q Wq^T, and when dq (or, with dy given, dw) is wanted the window part:
// s, p from the saved m_i, dP = dy V^T, ds, its row sums (-dm_i, window term), dq += ds K / sqrt(d) + dm_i k_j*.
// fast_backward_key_kernel walks the segment backward with R (its prefixes from a segment-sum pass over
// phi_q / den and dy): phi_k, dphi_k = V R^T - r (tf32), du_k, and for stage 2 dv = phi_k R, dk = du_k Wk^T.
// fast_window_kv_kernel (stage 2) is key-centric and stateless: key chunk c against query chunks c and c+1,
// dk += ds^T q / sqrt(d) (arg-max terms included), dv += A^T g.
// Backward, version 3 (d = 128; fast_backward_query_v3_kernel, fast_backward_key_v3_kernel): 8 warps,
// the state in registers partitioned by FEATURES (warp w owns rows [16w, +16) of S or R, 128 x d), because
// dphi_q = g S^T and dphi_k = V R^T contract over d: dphi^T (features x rows) = S dy^T takes S's C fragments
// as bf16 A fragments, split hi + lo (B: the row-major dy or V tile by ldmatrix), goes to an fp32 shared
// tile, and du = phi_backward(phi, dphi) is then formed 4 threads a row (elementwise). z (query side) and r
// (key side) are double-buffered in shared memory. When the forward kept the feature maps (always in stage 1;
// in stage 2 when `saved` has room) they load them instead of recomputing them (PHI_SAVED). 167-200 registers,
// no spills, ~210 KB of shared memory.
// Full backward, version 3 (d = 128): the same two state kernels give du_q and du_k (loading the feature maps
// when the forward kept them, as in stage 1: HybridAttnSaved with room for them; the query kernel then also
// forms delta from the y tiles, in the W tiles' room, so no delta pass runs first); what they cannot give
// cheaply runs in kernels of its own. (0) du_weights_kernel: the feature-map parts du_q Wq^T (bf16, into dq)
// and du_k Wk^T summed over the GQA group (fp32, into dk_acc), W in shared memory. (1) fast_window_q_kernel,
// stateless (a block per query chunk and kv head, looping over the GQA group's query heads, which share the
// K/V tiles; 2 blocks an SM): the window's ds from the saved max, its row sums (-dm_i, the window term),
// dq = (du_q Wq^T, read from dq) + ds K / sqrt(d) + dm_i k_j* / sqrt(d). (2) fast_backward_dv_v3_kernel:
// dv = phi_k R contracts over the features, which the key kernel's partition splits across warps, so a
// second backward walk holds R^T partitioned by head-dim rows (as the forward holds S^T) and forms
// dv^T = R^T phi_k^T exactly like the forward's numL^T (+ the sliding term), into the fp32 dv accumulator
// (16-byte atomics over the GQA heads); cost: R is accumulated twice. (3) sink_kv_grad_kernel, then
// fast_window_kv_v3_kernel: a block per key chunk and kv head loops over the group's query heads, summing
// the window's dk, dv in registers, adds the accumulators and writes bf16 dk, dv (no atomics, no conversion
// pass). Its loop runs over (head, query chunk) pairs with two shared-memory slots, so the next pair's q, dy
// tiles and row statistics (cp.async, finished by the thread that copied them) arrive while this one
// computes: one slot per query chunk, the earlier layout, left every head's loads exposed at 2 blocks an SM
// (registers: 255 a thread). The dq
// kernel reads the arg max key's row k_{j*} from its shared tiles (j* is a softmax key), not from global
// memory after the row sums, and prefetches the next head's dy and dq rows into L2; its row statistics come
// by cp.async with the query tile. (H200, T = 1024: window dq 0.314 -> 0.279 ms, window dk dv 0.460 -> 0.450
// with the slots and prefetches. Then ncu's source-level sampling, 2026-11-29: du W^T with W read from L2
// (inside these kernels then) was 16-25 % of their samples, the dk/dv kernel's output loop (a load then a
// store a word, which the compiler may not reorder) 17 %, its scalar row-statistic loads a third, the tile
// copies' index arithmetic a fifth of its instructions. With du_weights_kernel, batched output loads, the
// statistics packed per query pair with gamma and 1/sqrt(d) folded in, one ex2 a score and fixed-pattern
// copies: window dq 0.279 -> 0.205 (+ 0.037 for dq's maps), window dk dv 0.450 -> 0.249 (+ 0.033 for dk's).
// The state kernels and the dv pass loading the forward's feature maps instead of recomputing them: query side
// 0.239 -> 0.158, key side 0.175 -> 0.136, dv 0.155 -> 0.125 ms, for 0.017 more in the forward. Full fwd + bwd
// 1.783 -> 1.456 ms; 1.586 without room for the maps.)
// The window tiles skip the causal tile's 16-row blocks a warp never sees.
// On Hopper (a binary with sm_90a code, attention_hopper::wgmma_available()) both window kernels run as
// warpgroup-MMA versions, fast_window_q_wg_kernel and fast_window_kv_wg_kernel: the same grids, loops and
// elementwise code, the products as wgmma with 128-byte-swizzled tiles read straight from shared memory (H200,
// T = 1024: window dq 0.211 -> 0.153 ms, window dk dv 0.249 -> 0.161; full fwd + bwd 1.42 -> 1.27).
// 180-255 registers; the dq window kernel spills 28 bytes.
// On Hopper with the saved maps the two state kernels take the WG form too (fast_backward_query_v3_kernel<..., WG>,
// fast_backward_key_v3_kernel<..., WG, DV>): dphi = state x tile^T as two wgmma chains (the state split hi + lo as
// register A fragments, the dy or V tile a swizzled K-major B), the state update as one (a transposed feature tile
// as register A, an MN-major B); their V, dy and feature tiles are swizzled. And in the full backward the key
// kernel forms dv's linear part itself (DV), so the dv pass does not run: R_c goes each chunk to a swizzled f16
// tile (one power-of-two scale for the block, from the warps' maxima), each warpgroup forms its half of the head
// dim of dv = phi_k R_c as a wgmma chain with phi_k as register A fragments, adds the sliding term (mma.sync)
// and sends the rows to dv_acc by 16-byte atomics. H200, T = 1024: key side + dv 0.137 + 0.125 -> 0.172 ms,
// query side 0.190 -> 0.164, stage 1's 0.159 -> 0.133 and 0.138 -> 0.114; full fwd + bwd 1.24 -> 1.12-1.13.
// weight_grad_kernel forms dWq = sum q^T du_q
// and dWk = sum k^T du_k (tensor cores, fixed row splits, fixed-order reduction). Recomputed rather than
// stored: feature maps, scores, probabilities, states; saved per row: m_i, den_i, arg max, delta, the window
// term (and dy in stage 1; version 3's stage 1 keeps the feature maps, and the window term only as one sum per
// forward block, which is all dw needs). Stage 1 is bit-reproducible; stage 2 sums dk/dv over GQA heads with
// fp32 atomics.
//
// PRECISION. bf16 inputs; q K^T and the feature-map products in bf16 mma (exact products); probabilities and
// features in f16 (11-bit mantissa: bf16 probabilities would cost as much error as storing y in bf16); products
// with the fp32 state in tf32 (version 3: the state in f16 scaled per warp to its largest entry, or split
// into bf16 hi + lo, as precise as tf32 or more, see state_times_tile_t); accumulation in fp32. Against fp64
// on the same bf16 inputs: forward ~1.6e-3
// (the bf16 output alone is ~1.7e-3 rms), gradients 2e-3 .. 5e-3. Limits: window 64, sinks <= 16, and on the
// tensor path |v| <= 65504 (V is staged in f16).
//
// The plain path (generic_*: any d in {8..128}, f <= 64) computes the same function with fp32 CUDA-core code
// and per-chunk states in global memory: simple, linear in T, slow; the kernel lab's reference version.
#pragma once
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

// ================================================================================================
// Public API
// ================================================================================================

enum HybridGeometry { HYBRID_TERRACE = 0, HYBRID_SLIDING = 1 };
// TENSOR: the fastest tensor-core kernels for the shape (version 3 where it applies); TENSOR_V2 forces the
// version-2 tensor-core kernels (kept for comparison in the kernel lab and the tests).
enum HybridImpl { HYBRID_IMPL_AUTO = 0, HYBRID_IMPL_PLAIN = 1, HYBRID_IMPL_TENSOR = 2, HYBRID_IMPL_TENSOR_V2 = 3 };

constexpr int HYBRID_WINDOW = 64;     // the only window the kernels support (it is also the chunk)
constexpr int HYBRID_MAX_SINKS = 16;  // sink positions the kernels support
constexpr int HYBRID_MAX_F = 64;      // feature-map width per half

struct HybridAttnParams {
  int B = 1, T = 1, H = 1, Hkv = 1;  // batch, positions, query heads, kv heads (H % Hkv == 0)
  int d = 128;                       // head dim: 8, 16, 32, 64 or 128
  int f = 64;                        // feature-map width per half (phi has 2f entries), 1..64
  int window = HYBRID_WINDOW;        // softmax window w; must be 64
  int geometry = HYBRID_TERRACE;     // HYBRID_TERRACE (training default) or HYBRID_SLIDING
  int sinks = 0;                     // the first `sinks` positions are always softmax keys, 0..16
  int seg_chunks = 0;                // fast path: chunks walked by one thread block (0 = chosen from the
                                     // shape and the SM count: 16, 32 or 64, see seg_chunks());
                                     // tests set it small to exercise the segment prefixes
  int impl = HYBRID_IMPL_AUTO;       // AUTO: tensor cores when the shape allows; PLAIN / TENSOR force one
};

// Feature maps and window factors as the kernels read them (the optimizer keeps fp32 masters).
struct HybridAttnWeights {
  const bf16* Wq = nullptr;    // (H, d, f) query maps, per query head
  const bf16* Wk = nullptr;    // (H, d, f) key maps, per QUERY head (applied after the GQA repeat)
  const float* w = nullptr;    // (H) window-factor logits: gamma_h = sigmoid(w_h)
};

// What the forward leaves for the backward (per layer; keep it until that layer's backward).
// Carve it from one allocation of hybrid_saved_bytes() with hybrid_saved_carve().
struct HybridAttnSaved {
  float* row_max = nullptr;    // (B, T, H) m_i: max of the scaled scores over the softmax keys (*)
  float* row_den = nullptr;    // (B, T, H) the denominator sum A + sum B
  int* row_argmax = nullptr;   // (B, T, H) position of the softmax key that attains m_i (*)
                               // (*) only the input gradients read these; version 3's forward with the
                               // stage-1 loss leaves them unwritten (that forward pairs with the stage-1
                               // backward, which takes no dy)
  float* row_delta = nullptr;  // (B, T, H) dy_i . y_i / den_i (stage-1 forward, or the backward)
  float* row_wgrad = nullptr;  // (B, T, H) sum_j A_ij dA_ij (stage-1 forward, or the backward; version 3 with the
                               // stage-1 loss keeps only wgrad_part below)
  bf16* dy = nullptr;          // (B, T, H, d) dL/dy written by the stage-1 forward (null if unused)
  bf16* y_lo = nullptr;        // (B, T, H, d) optional: y_fp32 - bf16(y), the output's rounding residual.
                               // With it an unfused backward forms delta from the fp32 output; without it
                               // from the bf16 one (flash attention's convention), which leaves dw (a sum of
                               // cancelling terms) with percent-level noise. Stage 1 never needs it.
  float* seg_state = nullptr;  // tensor-core path with more than one segment: the linear state before each
                               // segment, (B, H, nseg, 128, d) then (B, H, nseg, 128); the backward reuses it
  __half* phi_q = nullptr;     // (B, T, H, 128) version 3 (carved with dy or with_phi): the forward's phi_q (f16)
  __half* phi_k = nullptr;     // (B, T, H, 128) and phi_k (f16; zero for the sinks, the last chunk unwritten), so
                               // the backward loads the feature maps instead of recomputing them (H200, T = 1024,
                               // full backward: query side 0.239 -> ~0.16 ms, key side 0.175 -> ~0.14)
  float* wgrad_part = nullptr; // (B, H, nseg) version 3, stage 1 (carved with dy): row_wgrad summed over each
                               // forward block's rows, for dw (row_wgrad itself is then not written)
};

// The stage-1 loss fused into the forward: MSE(y, y_true) over all B*T*H*d elements.
struct HybridStage1Loss {
  const bf16* y_true = nullptr;  // (B, T, H, d) the teacher's attention output
  float grad_scale = 1.0f;       // the backward gets dy = grad_scale * dMSE/dy (e.g. 1000 / n_layers)
  float* mse = nullptr;          // (1) += the MSE of this call (unscaled)
};

// Gradients. dWq, dWk, dw are ACCUMULATED (+=, fp32: gradient accumulation over micro-batches);
// dq, dk, dv (bf16) are written when not null (stage 2) and skipped, with their work, when null.
struct HybridAttnGrads {
  float* dWq = nullptr;  // (H, d, f)
  float* dWk = nullptr;  // (H, d, f)
  float* dw = nullptr;   // (H)
  bf16* dq = nullptr;    // (B, T, H, d)
  bf16* dk = nullptr;    // (B, T, Hkv, d)
  bf16* dv = nullptr;    // (B, T, Hkv, d)
};

// Checks the shapes (one-line fatal error on bad input).
inline void hybrid_check_params(const HybridAttnParams& p);
// Bytes of the per-layer saved state; with_dy: room for the stage-1 dy (B, T, H, d); with_ylo: for y_lo.
// with_phi: room for the feature maps (2 x 256 bytes a row and head, version 3 only), which the forward then
// keeps so that the backward loads them rather than recomputing them (stage 1 always keeps them: with_dy).
inline size_t hybrid_saved_bytes(const HybridAttnParams& p, bool with_dy, bool with_ylo = false, bool with_phi = false);
inline HybridAttnSaved hybrid_saved_carve(void* base, const HybridAttnParams& p, bool with_dy, bool with_ylo = false,
                                          bool with_phi = false);
// Bytes of scratch one forward + backward needs (shared by all layers; allocate once for the largest shape).
// input_grads = false: enough only for backward calls that ask for no dq, dk, dv (stage 1).
inline size_t hybrid_workspace_bytes(const HybridAttnParams& p, bool input_grads = true);

// y (B, T, H, d) = hybrid attention of q (B, T, H, d), k, v (B, T, Hkv, d). With `loss` it also adds the
// MSE against loss->y_true to *loss->mse and leaves dy, delta and the window-factor terms in `saved`, so
// the backward needs no dy (stage 1); y may then be null (stage 1 never reads it: 2 bytes an element
// not written).
inline void hybrid_attention_forward(const HybridAttnParams& p, const bf16* q, const bf16* k, const bf16* v,
                                     const HybridAttnWeights& wts, bf16* y, const HybridAttnSaved& saved,
                                     void* workspace, const HybridStage1Loss* loss, cudaStream_t stream);

// Backward of the forward that filled `saved`. dy (B, T, H, d) is the upstream gradient and y the forward's
// output; pass dy = nullptr (and y = nullptr) after a stage-1 forward: then the fused dy is used.
inline void hybrid_attention_backward(const HybridAttnParams& p, const bf16* q, const bf16* k, const bf16* v,
                                      const HybridAttnWeights& wts, const bf16* y, const bf16* dy,
                                      const HybridAttnSaved& saved, void* workspace, const HybridAttnGrads& grads,
                                      cudaStream_t stream);

// Which implementation runs these shapes: the tensor-core kernels (d 64 or 128, f 64) or the plain ones.
inline bool hybrid_uses_fast_path(const HybridAttnParams& p) {
  return p.impl != HYBRID_IMPL_PLAIN && (p.d == 64 || p.d == 128) && p.f == 64;
}

// ================================================================================================
// Implementation
// ================================================================================================
namespace hybrid_detail {

constexpr int CHUNK = 64;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float PHI_FLOOR = 1e-12f;  // the reference clamps feature values at this floor

// ---- device primitives ------------------------------------------------------------------------
// Tensor-core fragments (mma.sync m16n8k16 bf16/f16, m16n8k8 tf32), ldmatrix, cp.async. Fragment
// layouts (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A 16x16 (4 regs of 2 x 16 bit): r0 (row g, cols 2t..2t+1), r1 (row g+8), r2 (row g, cols 8+2t..),
//     r3 (row g+8, cols 8+2t..);  B 16x8 (2 regs): r0 (rows 2t..2t+1, col g), r1 (rows 8+2t.., col g);
//   C 16x8 fp32 (4 regs): c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same cols).
//   tf32 A 16x8: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);  tf32 B 8x8: b0 (t, g), b1 (t+4, g).
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// 16-byte global -> shared copy without a register round trip; valid = false fills zeros.
__device__ __forceinline__ void cp_async16_s(uint32_t dst, const void* src, bool valid) {  // dst: a shared address
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) { cp_async16_s(smem_u32(dst), src, valid); }
// 4-byte copy (cp.async.ca: the only kind below 16 bytes); valid = false fills zeros.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
// 2^x in one MUFU instruction (results below 2^-126 flush to zero; relative error ~2^-22).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// ---- end device primitives --------------------------------------------------------------------

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&t);
}
__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  __half2 t = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&t);
}
__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
// delta's terms for a bf16 pair: dy . (y + y_lo), y_lo the output's rounding residual (0 when not kept).
__device__ __forceinline__ float dy_dot_y2(uint32_t dy, uint32_t y, uint32_t y_lo) {
  return bf16_lo(dy) * (bf16_lo(y) + bf16_lo(y_lo)) + bf16_hi(dy) * (bf16_hi(y) + bf16_hi(y_lo));
}
__device__ __forceinline__ float f16_bits_to_float(unsigned short bits) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}
__device__ __forceinline__ float f16_lo(uint32_t u) { return f16_bits_to_float((unsigned short)(u & 0xffff)); }
__device__ __forceinline__ float f16_hi(uint32_t u) { return f16_bits_to_float((unsigned short)(u >> 16)); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum / max over the 4 lanes of a quad (the lanes that share a row of an mma fragment).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_min(float v) {
  v = fminf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fminf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// Everything a kernel needs about one call, passed by value.
struct Shape {
  int B, T, H, Hkv, group, d, f, geometry, sinks, NC;
  float scale;  // 1 / sqrt(d)
};
inline Shape make_shape(const HybridAttnParams& p) {
  Shape s;
  s.B = p.B; s.T = p.T; s.H = p.H; s.Hkv = p.Hkv; s.group = p.H / p.Hkv; s.d = p.d; s.f = p.f;
  s.geometry = p.geometry; s.sinks = p.sinks; s.NC = ceil_div(p.T, CHUNK);
  s.scale = 1.0f / sqrtf((float)p.d);
  return s;
}
__host__ __device__ __forceinline__ size_t row_index(const Shape& s, int b, int t, int h) {
  return ((size_t)b * s.T + t) * s.H + h;
}
__host__ __device__ __forceinline__ size_t kv_index(const Shape& s, int b, int t, int hk) {
  return ((size_t)b * s.T + t) * s.Hkv + hk;
}

// The softmax keys of query i (besides the sinks): [window_lo, i]. Terrace: from the start of the
// previous chunk; sliding: the last w positions.
__device__ __forceinline__ int window_lo(const Shape& s, int i) {
  return s.geometry == HYBRID_TERRACE ? max(0, (i / CHUNK - 1) * CHUNK) : max(0, i - CHUNK + 1);
}

// ---- small kernels shared by both paths -------------------------------------------------------

// delta_i = dy_i . y_i / den_i, one warp per (b, t, h) row.
static __global__ void delta_kernel(float* __restrict__ delta, const bf16* __restrict__ dy, const bf16* __restrict__ y,
                             const bf16* __restrict__ y_lo, const float* __restrict__ den, size_t rows, int d) {
  const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.0f;
  if (d == 128) {  // 8-byte loads, 4 columns a lane: the kernel is bound by bytes in flight (2-byte loads: 0.067 ms at 8K x 32 heads)
    const size_t o = row * 128 + 4 * lane;
    const uint2 a = *(const uint2*)(dy + o), b = *(const uint2*)(y + o);
    const uint2 lo = y_lo ? *(const uint2*)(y_lo + o) : make_uint2(0u, 0u);
    acc = dy_dot_y2(a.x, b.x, lo.x) + dy_dot_y2(a.y, b.y, lo.y);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc / den[row];
    return;
  }
  for (int c = lane; c < d; c += 32) {
    const float yv = __bfloat162float(y[row * d + c]) + (y_lo ? __bfloat162float(y_lo[row * d + c]) : 0.0f);
    acc += __bfloat162float(dy[row * d + c]) * yv;
  }
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc / den[row];
}

// Sums by one block in a fixed order (deterministic), SUM_LANES independent accumulators a thread so that
// that many loads are in flight: one dependent chain of loads took 0.1 ms for 262K rows (B*T = 8192, H = 32).
constexpr int SUM_LANES = 8;
__device__ __forceinline__ float sum_lanes(const float (&acc)[SUM_LANES]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
// dw_h += (1 - gamma_h) * sum over (b, t) of row_wgrad; one block per head, fixed order (deterministic).
static __global__ void window_grad_kernel(float* __restrict__ dw, const float* __restrict__ row_wgrad,
                                   const float* __restrict__ wlogit, int BT, int H) {
  const int h = blockIdx.x;
  __shared__ float partial[32];
  float lanes[SUM_LANES] = {};
  for (int base = 0; base < BT; base += SUM_LANES * blockDim.x)
    #pragma unroll
    for (int u = 0; u < SUM_LANES; u++) {
      const int r = base + u * blockDim.x + threadIdx.x;
      if (r < BT) lanes[u] += row_wgrad[(size_t)r * H + h];
    }
  float acc = warp_sum(sum_lanes(lanes));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) total += partial[w];
    dw[h] += (1.0f - sigmoidf_(wlogit[h])) * total;
  }
}

// dw_h += (1 - gamma_h) * the sum over (b, segment) of the version-3 forward blocks' window-term sums, fixed order:
// one small block instead of a pass over every row (H200, T = 1024: 0.011 -> 0.007 ms; the loss's sum over the
// blocks' squared errors likewise: 0.009 -> 0.004 ms).
static __global__ void window_grad_part_kernel(float* __restrict__ dw, const float* __restrict__ part,
                                               const float* __restrict__ wlogit, int B, int H, int nseg) {
  for (int h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int b = 0; b < B; b++)
      for (int sg = 0; sg < nseg; sg++) acc += part[((size_t)b * H + h) * nseg + sg];
    dw[h] += (1.0f - sigmoidf_(wlogit[h])) * acc;
  }
}

// partial[blockIdx.x] = the sum of slice blockIdx.x of x[0..n) (gridDim.x equal slices), fixed order: the
// first of two passes that replace one block's walk over all rows (32 us for 262K rows).
constexpr int SUM_BLOCKS = 128;
static __global__ void partial_sum_kernel(float* __restrict__ partial, const float* __restrict__ x, size_t n) {
  __shared__ float wsum[32];
  const size_t per = (n + gridDim.x - 1) / gridDim.x, lo = (size_t)blockIdx.x * per, hi = min(n, lo + per);
  float lanes[SUM_LANES] = {};
  for (size_t base = lo; base < hi; base += (size_t)SUM_LANES * blockDim.x)
    #pragma unroll
    for (int u = 0; u < SUM_LANES; u++) {
      const size_t i = base + (size_t)u * blockDim.x + threadIdx.x;
      if (i < hi) lanes[u] += x[i];
    }
  const float acc = warp_sum(sum_lanes(lanes));
  if (threadIdx.x % 32 == 0) wsum[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) total += wsum[w];
    partial[blockIdx.x] = total;
  }
}
// *out += sum(x[0..n)) * scale, one block, fixed order (deterministic).
static __global__ void sum_into_kernel(float* __restrict__ out, const float* __restrict__ x, size_t n, float scale) {
  __shared__ float partial[32];
  float lanes[SUM_LANES] = {};
  for (size_t base = 0; base < n; base += (size_t)SUM_LANES * blockDim.x)
    #pragma unroll
    for (int u = 0; u < SUM_LANES; u++) {
      const size_t i = base + (size_t)u * blockDim.x + threadIdx.x;
      if (i < n) lanes[u] += x[i];
    }
  float acc = warp_sum(sum_lanes(lanes));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) total += partial[w];
    *out += total * scale;
  }
}

static __global__ void f32_to_bf16_kernel(bf16* __restrict__ out, const float* __restrict__ in, size_t n) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16(in[i]);
}

// Gradients of the sink keys (positions < sinks) from the query chunks >= 2, where they form a tile of
// their own (in chunks 0 and 1 they are ordinary window keys, handled by the key-side kernels).
// One block per (query chunk, h, b), one warp per sink key; atomics into the fp32 dk/dv accumulators.
static __global__ void sink_kv_grad_kernel(float* __restrict__ dk_acc, float* __restrict__ dv_acc, const bf16* __restrict__ q,
                                    const bf16* __restrict__ k, const bf16* __restrict__ v, const bf16* __restrict__ dy,
                                    const float* __restrict__ wlogit, HybridAttnSaved sv, const float* __restrict__ dm,
                                    Shape s) {
  const int qc = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  if (qc < 2) return;
  const float gamma = sigmoidf_(wlogit[h]);
  for (int j = warp; j < s.sinks; j += nwarps) {
    float kj[4], vj[4], dk[4] = {0, 0, 0, 0}, dv[4] = {0, 0, 0, 0};
    #pragma unroll
    for (int u = 0; u < 4; u++) {
      const int c = lane + 32 * u;
      kj[u] = c < s.d ? __bfloat162float(k[kv_index(s, b, j, hk) * s.d + c]) : 0.0f;
      vj[u] = c < s.d ? __bfloat162float(v[kv_index(s, b, j, hk) * s.d + c]) : 0.0f;
    }
    for (int i = qc * CHUNK; i < min(s.T, (qc + 1) * CHUNK); i++) {
      const size_t r = row_index(s, b, i, h);
      float qi[4], gi[4], sdot = 0.0f, gv = 0.0f;
      const float inv_den = 1.0f / sv.row_den[r];
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int c = lane + 32 * u;
        qi[u] = c < s.d ? __bfloat162float(q[r * s.d + c]) : 0.0f;
        gi[u] = c < s.d ? __bfloat162float(dy[r * s.d + c]) * inv_den : 0.0f;
        sdot += qi[u] * kj[u];
        gv += gi[u] * vj[u];
      }
      sdot = warp_sum(sdot) * s.scale;
      gv = warp_sum(gv);
      const float A = gamma * expf(sdot - sv.row_max[r]);
      float ds = A * (gv - sv.row_delta[r]);
      if (sv.row_argmax[r] == j) ds += dm[r];
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        dk[u] += ds * s.scale * qi[u];
        dv[u] += A * gi[u];
      }
    }
    #pragma unroll
    for (int u = 0; u < 4; u++) {
      const int c = lane + 32 * u;
      if (c < s.d) {
        atomicAdd(&dk_acc[kv_index(s, b, j, hk) * s.d + c], dk[u]);
        atomicAdd(&dv_acc[kv_index(s, b, j, hk) * s.d + c], dv[u]);
      }
    }
  }
}

// ================================================================================================
// Generic path: plain fp32 CUDA-core kernels for any d <= 128, f <= 64. Simple and chunked (linear in
// T, per-chunk states materialised), not fast. It is also the "simple correct version" of the kernel lab.
// ================================================================================================

// phi (B, T, H, 2f) fp32 of the rows of x (B, T, Hx, d) with W (H, d, f): one warp per (b, t, h).
// For keys Hx = Hkv and query head h reads kv head h / group (the maps are per query head).
static __global__ void generic_feature_map_kernel(float* __restrict__ phi, const bf16* __restrict__ x,
                                           const bf16* __restrict__ W, Shape s, int Hx) {
  const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // (b, t, h)
  const int lane = threadIdx.x % 32;
  if (row >= (size_t)s.B * s.T * s.H) return;
  const int h = (int)(row % s.H);
  const size_t bt = row / s.H;
  const bf16* xr = x + (bt * Hx + (Hx == s.H ? h : h / s.group)) * s.d;
  const bf16* Wh = W + (size_t)h * s.d * s.f;
  float u[2] = {0.0f, 0.0f};
  for (int c = 0; c < s.d; c++) {
    const float xc = __bfloat162float(xr[c]);
    #pragma unroll
    for (int e = 0; e < 2; e++) {
      const int j = lane + 32 * e;
      if (j < s.f) u[e] += xc * __bfloat162float(Wh[(size_t)c * s.f + j]);
    }
  }
  float mx = -INFINITY, mn = INFINITY;
  #pragma unroll
  for (int e = 0; e < 2; e++)
    if (lane + 32 * e < s.f) { mx = fmaxf(mx, u[e]); mn = fminf(mn, u[e]); }
  mx = warp_max(mx);
  mn = -warp_max(-mn);
  float ep[2], em[2], sp = 0.0f, sm = 0.0f;
  #pragma unroll
  for (int e = 0; e < 2; e++) {
    const bool ok = lane + 32 * e < s.f;
    ep[e] = ok ? expf(u[e] - mx) : 0.0f;
    em[e] = ok ? expf(mn - u[e]) : 0.0f;
    sp += ep[e];
    sm += em[e];
  }
  sp = warp_sum(sp);
  sm = warp_sum(sm);
  float* out = phi + row * 2 * s.f;
  #pragma unroll
  for (int e = 0; e < 2; e++) {
    const int j = lane + 32 * e;
    if (j < s.f) {
      out[j] = fmaxf(ep[e] / sp, PHI_FLOOR);
      out[s.f + j] = fmaxf(em[e] / sm, PHI_FLOOR);
    }
  }
}

// Per-chunk sums. KEYS: S_c[e][col] = sum phi_k[j][e] v_j[col], z_c[e] = sum phi_k[j][e] over the keys of
// chunk c (sinks excluded). QUERIES: R_c[e][col] = sum phi_q[i][e] dy_i[col] / den_i, r_c[e] = sum
// phi_q[i][e] delta_i. St (B, H, NC, 2f, d), zt (B, H, NC, 2f). One block per (c, h, b).
template <bool KEYS>
static __global__ void generic_chunk_sum_kernel(float* __restrict__ St, float* __restrict__ zt, const float* __restrict__ phi,
                                         const bf16* __restrict__ y, const float* __restrict__ den,
                                         const float* __restrict__ delta, Shape s) {
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int F2 = 2 * s.f;
  const size_t base = (((size_t)b * s.H + h) * s.NC + c) * F2;
  const int r0 = c * CHUNK, r1 = min(s.T, r0 + CHUNK);
  for (int idx = threadIdx.x; idx < F2 * (s.d + 1); idx += blockDim.x) {
    const int e = idx / (s.d + 1), col = idx % (s.d + 1);  // col == d: the z / r column
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) {
      if (KEYS && r < s.sinks) continue;
      const size_t ri = row_index(s, b, r, h);
      const float ph = phi[ri * F2 + e];
      if (col == s.d) {
        acc += KEYS ? ph : ph * delta[ri];
      } else {
        const float yv = KEYS ? __bfloat162float(y[kv_index(s, b, r, hk) * s.d + col])
                              : __bfloat162float(y[ri * s.d + col]) / den[ri];
        acc += ph * yv;
      }
    }
    if (col == s.d) zt[base + e] = acc;
    else St[(base + e) * s.d + col] = acc;
  }
}

// In-place prefix over chunks of the per-chunk sums: FORWARD (keys): chunk c gets the sum over chunks
// <= c-2 (the linear region of a query in chunk c); backward (queries): key chunk c gets the sum over
// query chunks >= c+2. One thread per (b, h, element).
template <bool FORWARD>
static __global__ void generic_chunk_scan_kernel(float* __restrict__ St, float* __restrict__ zt, Shape s) {
  const int F2 = 2 * s.f, per = F2 * (s.d + 1);
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)s.B * s.H * per) return;
  const size_t bh = idx / per;
  const int el = (int)(idx % per), e = el / (s.d + 1), col = el % (s.d + 1);
  auto at = [&](int c) -> float& {
    const size_t base = (bh * s.NC + c) * F2 + e;
    return col == s.d ? zt[base] : St[base * s.d + col];
  };
  float acc = 0.0f, prev = 0.0f;  // acc: sum of chunks two or more steps back; prev: the last one
  for (int n = 0; n < s.NC; n++) {
    const int c = FORWARD ? n : s.NC - 1 - n;
    const float cur = at(c);
    at(c) = acc;
    acc += prev;
    prev = cur;
  }
}

// Forward, one warp per query row (4 warps, a block per (chunk, h, b)).
struct GenericFwdArgs {
  bf16* y;
  const bf16 *q, *k, *v, *y_true;
  const float *phiq, *phik, *St, *zt, *wlogit;
  HybridAttnSaved sv;
  float* row_sq;  // (B, T, H) squared error of the row (stage 1)
  float grad_scale, inv_n;
  Shape s;
};
constexpr int GEN_MAX_WIN = HYBRID_MAX_SINKS + 2 * CHUNK;  // softmax keys of one query at most

static __global__ void __launch_bounds__(128) generic_forward_kernel(GenericFwdArgs a) {
  const Shape& s = a.s;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, F2 = 2 * s.f;
  __shared__ float s_q[4][128], s_phi[4][128], s_w[4][GEN_MAX_WIN], s_bl[4][CHUNK];
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t state = ((size_t)b * s.H + h) * s.NC + c;
  for (int rr = warp; rr < CHUNK; rr += 4) {
    const int i = c * CHUNK + rr;
    if (i >= s.T) break;
    const size_t ri = row_index(s, b, i, h);
    for (int e = lane; e < 128; e += 32) {
      s_q[warp][e] = e < s.d ? __bfloat162float(a.q[ri * s.d + e]) : 0.0f;
      s_phi[warp][e] = e < F2 ? a.phiq[ri * F2 + e] : 0.0f;
    }
    __syncwarp();
    const int lo = window_lo(s, i), n_sink = min(s.sinks, lo), nw = n_sink + (i - lo + 1);
    auto key = [&](int kk) { return kk < n_sink ? kk : lo + kk - n_sink; };
    // Scores of the softmax keys; the max and the key attaining it (ties: the earlier key).
    float m = -INFINITY;
    int arg = 0x7fffffff;
    for (int kk = lane; kk < nw; kk += 32) {
      const int j = key(kk);
      const bf16* kr = a.k + kv_index(s, b, j, hk) * s.d;
      float acc = 0.0f;
      for (int e = 0; e < s.d; e++) acc += s_q[warp][e] * __bfloat162float(kr[e]);
      acc *= s.scale;
      s_w[warp][kk] = acc;
      if (acc > m || (acc == m && j < arg)) { m = acc; arg = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const int a2 = __shfl_xor_sync(0xffffffffu, arg, o);
      if (m2 > m || (m2 == m && a2 < arg)) { m = m2; arg = a2; }
    }
    __syncwarp();
    float sumA = 0.0f;
    for (int kk = lane; kk < nw; kk += 32) {
      const float A = gamma * expf(s_w[warp][kk] - m);
      s_w[warp][kk] = A;
      sumA += A;
    }
    sumA = warp_sum(sumA);
    // Sliding: the part of chunk c-1 at or before i - w is linear (quadratic here, the rest is in the state).
    const int jl0 = max((c - 1) * CHUNK, s.sinks);
    const int nl = (s.geometry == HYBRID_SLIDING && c >= 1) ? max(0, i - CHUNK - jl0 + 1) : 0;
    float sumB = 0.0f;
    for (int kk = lane; kk < nl; kk += 32) {
      const float* pk = a.phik + row_index(s, b, jl0 + kk, h) * F2;
      float acc = 0.0f;
      for (int e = 0; e < F2; e++) acc += s_phi[warp][e] * pk[e];
      s_bl[warp][kk] = acc;
      sumB += acc;
    }
    sumB = warp_sum(sumB);
    float denS = 0.0f;
    if (c >= 2)
      for (int e = lane; e < F2; e += 32) denS += s_phi[warp][e] * a.zt[state * F2 + e];
    denS = warp_sum(denS);
    __syncwarp();
    const float den = sumA + sumB + denS;
    float yv[4], numA[4];
    #pragma unroll
    for (int u = 0; u < 4; u++) {
      const int col = lane + 32 * u;
      yv[u] = numA[u] = 0.0f;
      if (col >= s.d) continue;
      float nA = 0.0f, nB = 0.0f, nS = 0.0f;
      for (int kk = 0; kk < nw; kk++) nA += s_w[warp][kk] * __bfloat162float(a.v[kv_index(s, b, key(kk), hk) * s.d + col]);
      for (int kk = 0; kk < nl; kk++) nB += s_bl[warp][kk] * __bfloat162float(a.v[kv_index(s, b, jl0 + kk, hk) * s.d + col]);
      if (c >= 2)
        for (int e = 0; e < F2; e++) nS += s_phi[warp][e] * a.St[(state * F2 + e) * s.d + col];
      numA[u] = nA;
      yv[u] = (nA + nB + nS) / den;
      const bf16 yb = __float2bfloat16(yv[u]);
      if (a.y) a.y[ri * s.d + col] = yb;
      if (a.sv.y_lo) a.sv.y_lo[ri * s.d + col] = __float2bfloat16(yv[u] - __bfloat162float(yb));
    }
    if (lane == 0) {
      a.sv.row_max[ri] = m;
      a.sv.row_den[ri] = den;
      a.sv.row_argmax[ri] = arg;
    }
    if (a.y_true) {  // stage 1: squared error, dy, delta and the window-factor term of this row
      float sq = 0.0f, dyy = 0.0f, dyA = 0.0f;
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int col = lane + 32 * u;
        if (col >= s.d) continue;
        const float e = yv[u] - __bfloat162float(a.y_true[ri * s.d + col]);
        sq += e * e;
        const bf16 g = __float2bfloat16(a.grad_scale * 2.0f * e * a.inv_n);
        a.sv.dy[ri * s.d + col] = g;
        dyy += __bfloat162float(g) * yv[u];
        dyA += __bfloat162float(g) * numA[u];
      }
      sq = warp_sum(sq);
      dyy = warp_sum(dyy);
      dyA = warp_sum(dyA);
      if (lane == 0) {
        a.row_sq[ri] = sq;
        a.sv.row_delta[ri] = dyy / den;
        a.sv.row_wgrad[ri] = (dyA - dyy * sumA) / den;
      }
    }
    __syncwarp();
  }
}

// Backward, query side: dq (window, the max, the feature map), du_q, dm, row_wgrad. One warp per row.
struct GenericBwdArgs {
  bf16 *dq, *du;   // dq (B, T, H, d) or null; du (B, T, H, f) bf16: dL/du of the feature map input u = x W
  float* dm;       // (B, T, H) dL/dm_i (query side) — read by the key side
  float *dk_acc, *dv_acc;  // (B, T, Hkv, d) fp32 accumulators (key side, full backward)
  const bf16 *q, *k, *v, *dy, *Wq, *Wk;
  const float *phiq, *phik, *St, *zt, *wlogit;
  HybridAttnSaved sv;
  bool want_window;  // compute the window part (dq, or row_wgrad when the forward did not)
  bool want_input_grads;
  Shape s;
};

// du = phi+ (dphi+ - phi+.dphi+) - phi- (dphi- - phi-.dphi-), one warp, f <= 64 entries per half.
// dphi and phi in shared memory (2f each); returns du for j = lane and lane + 32.
__device__ __forceinline__ void generic_phi_backward(float (&du)[2], const float* phi, const float* dphi, int f) {
  float dp = 0.0f, dm = 0.0f;
  #pragma unroll
  for (int e = 0; e < 2; e++) {
    const int j = threadIdx.x % 32 + 32 * e;
    if (j < f) {
      if (phi[j] > PHI_FLOOR) dp += phi[j] * dphi[j];
      if (phi[f + j] > PHI_FLOOR) dm += phi[f + j] * dphi[f + j];
    }
  }
  dp = warp_sum(dp);
  dm = warp_sum(dm);
  #pragma unroll
  for (int e = 0; e < 2; e++) {
    const int j = threadIdx.x % 32 + 32 * e;
    du[e] = 0.0f;
    if (j < f) {
      const float gp = phi[j] > PHI_FLOOR ? dphi[j] : 0.0f, gm = phi[f + j] > PHI_FLOOR ? dphi[f + j] : 0.0f;
      du[e] = phi[j] * (gp - dp) - phi[f + j] * (gm - dm);
    }
  }
}

static __global__ void __launch_bounds__(128) generic_backward_query_kernel(GenericBwdArgs a) {
  const Shape& s = a.s;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, F2 = 2 * s.f;
  __shared__ float s_q[4][128], s_g[4][128], s_phi[4][128], s_dphi[4][128], s_w[4][GEN_MAX_WIN], s_bl[4][CHUNK],
      s_du[4][64];
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t state = ((size_t)b * s.H + h) * s.NC + c;
  const bf16* Wh = a.Wq + (size_t)h * s.d * s.f;
  for (int rr = warp; rr < CHUNK; rr += 4) {
    const int i = c * CHUNK + rr;
    if (i >= s.T) break;
    const size_t ri = row_index(s, b, i, h);
    const float inv_den = 1.0f / a.sv.row_den[ri], delta = a.sv.row_delta[ri], m = a.sv.row_max[ri];
    for (int e = lane; e < 128; e += 32) {
      s_q[warp][e] = e < s.d ? __bfloat162float(a.q[ri * s.d + e]) : 0.0f;
      s_g[warp][e] = e < s.d ? __bfloat162float(a.dy[ri * s.d + e]) * inv_den : 0.0f;
      s_phi[warp][e] = e < F2 ? a.phiq[ri * F2 + e] : 0.0f;
    }
    __syncwarp();
    const int lo = window_lo(s, i), n_sink = min(s.sinks, lo), nw = n_sink + (i - lo + 1);
    auto key = [&](int kk) { return kk < n_sink ? kk : lo + kk - n_sink; };
    float dq[4] = {0, 0, 0, 0};
    if (a.want_window) {
      // ds_ij = A_ij (g_i . v_j - delta_i) over the softmax keys; their sum is -dL/dm_i.
      float rowsum = 0.0f;
      for (int kk = lane; kk < nw; kk += 32) {
        const int j = key(kk);
        const bf16* kr = a.k + kv_index(s, b, j, hk) * s.d;
        const bf16* vr = a.v + kv_index(s, b, j, hk) * s.d;
        float sc = 0.0f, gv = 0.0f;
        for (int e = 0; e < s.d; e++) {
          sc += s_q[warp][e] * __bfloat162float(kr[e]);
          gv += s_g[warp][e] * __bfloat162float(vr[e]);
        }
        const float ds = gamma * expf(sc * s.scale - m) * (gv - delta);
        s_w[warp][kk] = ds;
        rowsum += ds;
      }
      rowsum = warp_sum(rowsum);
      __syncwarp();
      const float dmi = -rowsum;
      const int jmax = a.sv.row_argmax[ri];
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int col = lane + 32 * u;
        if (col >= s.d) continue;
        float acc = dmi * __bfloat162float(a.k[kv_index(s, b, jmax, hk) * s.d + col]);
        for (int kk = 0; kk < nw; kk++) acc += s_w[warp][kk] * __bfloat162float(a.k[kv_index(s, b, key(kk), hk) * s.d + col]);
        dq[u] = acc * s.scale;
      }
      if (lane == 0) {
        a.dm[ri] = dmi;
        a.sv.row_wgrad[ri] = rowsum;
      }
    }
    // dphi_q = sum over linear keys of (g . v_j - delta) phi_k(j): the state part, then (sliding) chunk c-1.
    const int jl0 = max((c - 1) * CHUNK, s.sinks);
    const int nl = (s.geometry == HYBRID_SLIDING && c >= 1) ? max(0, i - CHUNK - jl0 + 1) : 0;
    for (int kk = lane; kk < nl; kk += 32) {
      const bf16* vr = a.v + kv_index(s, b, jl0 + kk, hk) * s.d;
      float gv = 0.0f;
      for (int e = 0; e < s.d; e++) gv += s_g[warp][e] * __bfloat162float(vr[e]);
      s_bl[warp][kk] = gv - delta;
    }
    __syncwarp();
    for (int e = lane; e < F2; e += 32) {
      float acc = 0.0f;
      if (c >= 2) {
        for (int col = 0; col < s.d; col++) acc += a.St[(state * F2 + e) * s.d + col] * s_g[warp][col];
        acc -= delta * a.zt[state * F2 + e];
      }
      for (int kk = 0; kk < nl; kk++) acc += s_bl[warp][kk] * a.phik[row_index(s, b, jl0 + kk, h) * F2 + e];
      s_dphi[warp][e] = acc;
    }
    __syncwarp();
    float du[2];
    generic_phi_backward(du, s_phi[warp], s_dphi[warp], s.f);
    #pragma unroll
    for (int e = 0; e < 2; e++) {
      const int j = lane + 32 * e;
      if (j < s.f) {
        s_du[warp][j] = du[e];
        a.du[ri * s.f + j] = __float2bfloat16(du[e]);
      }
    }
    __syncwarp();
    if (a.dq) {
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int col = lane + 32 * u;
        if (col >= s.d) continue;
        float acc = dq[u];
        for (int j = 0; j < s.f; j++) acc += __bfloat162float(Wh[(size_t)col * s.f + j]) * s_du[warp][j];
        a.dq[ri * s.d + col] = __float2bfloat16(acc);
      }
    }
    __syncwarp();
  }
}

// Backward, key side: du_k, and (full backward) dk, dv into the fp32 accumulators. One warp per key j.
// The queries that see key j: chunk(j) (causal) and chunk(j)+1 through the window, or (sliding, i >= j + w)
// through the linear part; later chunks through the state R. Sinks from chunks >= 2: sink_kv_grad_kernel.
static __global__ void __launch_bounds__(128) generic_backward_key_kernel(GenericBwdArgs a) {
  const Shape& s = a.s;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, F2 = 2 * s.f;
  __shared__ float s_dphi[4][128], s_phi[4][128];
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t state = ((size_t)b * s.H + h) * s.NC + c;
  const bf16* Wh = a.Wk + (size_t)h * s.d * s.f;
  for (int rr = warp; rr < CHUNK; rr += 4) {
    const int j = c * CHUNK + rr;
    if (j >= s.T) break;
    const bool linear_key = j >= s.sinks;
    float kj[4], vj[4], dk[4] = {0, 0, 0, 0}, dv[4] = {0, 0, 0, 0}, dphi[4] = {0, 0, 0, 0};
    #pragma unroll
    for (int u = 0; u < 4; u++) {
      const int col = lane + 32 * u;
      kj[u] = col < s.d ? __bfloat162float(a.k[kv_index(s, b, j, hk) * s.d + col]) : 0.0f;
      vj[u] = col < s.d ? __bfloat162float(a.v[kv_index(s, b, j, hk) * s.d + col]) : 0.0f;
    }
    for (int e = lane; e < 128; e += 32) s_phi[warp][e] = (e < F2 && linear_key) ? a.phik[row_index(s, b, j, h) * F2 + e] : 0.0f;
    __syncwarp();
    const int i_end = min(s.T, (c + 2) * CHUNK);
    for (int i = j; i < i_end; i++) {
      const bool window = i / CHUNK == c || s.geometry == HYBRID_TERRACE || i < j + CHUNK || !linear_key;
      if (window && !a.want_input_grads) continue;
      const size_t ri = row_index(s, b, i, h);
      const float inv_den = 1.0f / a.sv.row_den[ri], delta = a.sv.row_delta[ri];
      float qi[4], gi[4], sc = 0.0f, gv = 0.0f;
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int col = lane + 32 * u;
        qi[u] = col < s.d ? __bfloat162float(a.q[ri * s.d + col]) : 0.0f;
        gi[u] = col < s.d ? __bfloat162float(a.dy[ri * s.d + col]) * inv_den : 0.0f;
        sc += qi[u] * kj[u];
        gv += gi[u] * vj[u];
      }
      sc = warp_sum(sc) * s.scale;
      gv = warp_sum(gv);
      if (window) {
        const float A = gamma * expf(sc - a.sv.row_max[ri]);
        float ds = A * (gv - delta);
        if (a.sv.row_argmax[ri] == j) ds += a.dm[ri];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
          dk[u] += ds * s.scale * qi[u];
          dv[u] += A * gi[u];
        }
      } else {
        const float* pq = a.phiq + ri * F2;
        float Bw = 0.0f;
        for (int e = 0; e < F2; e++) Bw += s_phi[warp][e] * pq[e];
        #pragma unroll
        for (int u = 0; u < 4; u++) {
          dv[u] += Bw * gi[u];
          const int e = lane + 32 * u;
          if (e < F2) dphi[u] += (gv - delta) * pq[e];
        }
      }
    }
    // The state of the query chunks >= c+2: dphi_k += R v_j - r, dv_j += R^T phi_k.
    if (linear_key && c + 2 < s.NC) {
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int e = lane + 32 * u;
        if (e >= F2) continue;
        float acc = -a.zt[state * F2 + e];
        for (int col = 0; col < s.d; col++)
          acc += a.St[(state * F2 + e) * s.d + col] * __bfloat162float(a.v[kv_index(s, b, j, hk) * s.d + col]);
        dphi[u] += acc;
      }
      if (a.want_input_grads)
        #pragma unroll
        for (int u = 0; u < 4; u++) {
          const int col = lane + 32 * u;
          if (col >= s.d) continue;
          float acc = 0.0f;
          for (int e = 0; e < F2; e++) acc += a.St[(state * F2 + e) * s.d + col] * s_phi[warp][e];
          dv[u] += acc;
        }
    }
    #pragma unroll
    for (int u = 0; u < 4; u++) {
      const int e = lane + 32 * u;
      if (e < 128) s_dphi[warp][e] = linear_key ? dphi[u] : 0.0f;
    }
    __syncwarp();
    float du[2];
    generic_phi_backward(du, s_phi[warp], s_dphi[warp], s.f);
    #pragma unroll
    for (int e = 0; e < 2; e++) {
      const int jf = lane + 32 * e;
      if (jf < s.f) a.du[row_index(s, b, j, h) * s.f + jf] = __float2bfloat16(linear_key ? du[e] : 0.0f);
    }
    if (a.want_input_grads) {
      __shared__ float s_du[4][64];
      #pragma unroll
      for (int e = 0; e < 2; e++) {
        const int jf = lane + 32 * e;
        if (jf < 64) s_du[warp][jf] = (jf < s.f && linear_key) ? du[e] : 0.0f;
      }
      __syncwarp();
      #pragma unroll
      for (int u = 0; u < 4; u++) {
        const int col = lane + 32 * u;
        if (col >= s.d) continue;
        float acc = dk[u];
        for (int jf = 0; jf < s.f; jf++) acc += __bfloat162float(Wh[(size_t)col * s.f + jf]) * s_du[warp][jf];
        atomicAdd(&a.dk_acc[kv_index(s, b, j, hk) * s.d + col], acc);
        atomicAdd(&a.dv_acc[kv_index(s, b, j, hk) * s.d + col], dv[u]);
      }
    }
    __syncwarp();
  }
}

// dW_h[c][j] += sum over (b, t) of x[b, t, h'][c] du[b, t, h][j] (h' = h for queries, h / group for keys);
// one thread per (h, c, j), fixed summation order (deterministic). For the generic path.
static __global__ void generic_weight_grad_kernel(float* __restrict__ dW, const bf16* __restrict__ x, const bf16* __restrict__ du,
                                           Shape s, int Hx) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)s.H * s.d * s.f) return;
  const int h = (int)(idx / ((size_t)s.d * s.f)), c = (int)(idx / s.f % s.d), j = (int)(idx % s.f);
  const int hx = Hx == s.H ? h : h / s.group;
  float acc = 0.0f;
  for (size_t bt = 0; bt < (size_t)s.B * s.T; bt++)
    acc += __bfloat162float(x[(bt * Hx + hx) * s.d + c]) * __bfloat162float(du[(bt * s.H + h) * s.f + j]);
  dW[idx] += acc;
}

// ================================================================================================
// Fast path: tensor-core kernels for d in {64, 128}, f = 64 (2f = 128 features). 4 warps per block;
// warp w owns rows [16w, 16w + 16) of a 64-row chunk. See the header comment for the algorithm.
// ================================================================================================
constexpr int NF = 128;  // features per row (2f)

template <int D>
struct Tiles {
  static constexpr int LDT = D + 8;   // row stride (elements) of a 64 x D bf16/f16 tile: conflict-free ldmatrix
  static constexpr int LDW = 64 + 8;  // row stride of a D x 64 feature-map weight tile
  static constexpr int LDP = NF + 8;  // row stride of a 64 x 128 feature tile
  static constexpr int KT = D / 16;   // 16-wide k-steps over the head dim
  static constexpr int NT = D / 8;    // 8-wide n-tiles over the head dim
  static constexpr int TILE = 64 * LDT, WT = D * LDW, PT = 64 * LDP;  // elements
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// ---- fragment loaders (see the layouts at the device primitives) ----
// A (16x16) = rows [r0, r0+16) x cols [k0, k0+16) of a row-major tile.
template <class T>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T* tile, int ld, int r0, int k0) {
  const int l = lane_id();
  ldsm_x4(a, tile + (r0 + (l & 15)) * ld + k0 + (l >> 4) * 8);
}
// Hopper's warpgroup MMA reads 64 x 128 bf16 tiles 128-byte swizzled: two 64-column halves of 64 rows x 128
// bytes, 16-byte chunk c of row r at chunk c ^ (r % 8) (load_tile_swz_async writes them).
constexpr int WG_TILE = 64 * 128 * 2;
constexpr int WG_HALF = WG_TILE / 2;
// A fragment (16 x 16) = rows [r0, r0 + 16) x cols [k0, k0 + 16) of a 64-row swizzled tile (frag_a's layout).
__device__ __forceinline__ void frag_a_swz(uint32_t (&a)[4], const void* tile, int r0, int k0) {
  const int l = lane_id(), r = r0 + (l & 15), c = (k0 >> 3) + (l >> 4);
  ldsm_x4(a, (const unsigned char*)tile + (c >> 3) * WG_HALF + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}
// A (16x16) with A[m][k] = tile[k][m]: the transpose of a row-major tile.
template <class T>
__device__ __forceinline__ void frag_a_t(uint32_t (&a)[4], const T* tile, int ld, int m0, int k0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  ldsm_x4_t(a, tile + (k0 + rr + 8 * (mi >> 1)) * ld + m0 + 8 * (mi & 1));
}
// B of two n-tiles [n0, n0+16) x k [k0, k0+16) with B[k][n] = tile[n][k] (K in q K^T): b[0], b[1] for n0, b[2], b[3] for n0+8.
template <class T>
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const T* tile, int ld, int n0, int k0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  ldsm_x4(b, tile + (n0 + rr + 8 * (mi >> 1)) * ld + k0 + 8 * (mi & 1));
}
// B of two n-tiles with B[k][n] = tile[k][n] (V in p V).
template <class T>
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  ldsm_x4_t(b, tile + (k0 + rr + 8 * (mi & 1)) * ld + n0 + 8 * (mi >> 1));
}

// ---- tile loads ----
// rows [0, nrows) x cols [0, COLS) of a global matrix (row r at src + r * row_stride) -> shared (row stride
// ld); rows >= n_valid are filled with zeros. All THREADS threads of the block take part, thread tid copying
// the 16-byte column piece tid % CPR of rows tid / CPR + k (THREADS / CPR): its addresses are a base and a
// constant step. (Per-piece index arithmetic and generic-to-shared conversion were ~10 % of the state kernels'
// instructions and a fifth of the window dk/dv kernel's, ncu.)
template <int COLS, int THREADS = 128, class T>
__device__ __forceinline__ void load_rows_async(T* dst, int ld, const T* src, size_t row_stride, int nrows, int n_valid) {
  constexpr int CPR = COLS / 8, RPP = THREADS / CPR;  // 16-byte pieces a row, rows a pass
  static_assert(THREADS % CPR == 0, "a pass covers whole rows");
  const int r0 = threadIdx.x / CPR, cc = threadIdx.x % CPR;
  uint32_t d = smem_u32(dst + r0 * ld + cc * 8);
  const T* g = src + (size_t)r0 * row_stride + cc * 8;
  for (int r = r0; r < nrows; r += RPP, d += RPP * ld * (int)sizeof(T), g += RPP * row_stride) {
    const bool ok = r < n_valid;
    cp_async16_s(d, ok ? g : src, ok);
  }
}
// bf16 -> f16 in place (the forward multiplies probabilities by V in f16: 3 more mantissa bits than bf16,
// exact for every bf16 value of magnitude 6e-5 .. 65504).
template <int COLS>
__device__ __forceinline__ void tile_bf16_to_f16(void* tile, int ld, int nrows, int tid = -1) {
  constexpr int CPR = COLS / 8;
  for (int idx = tid < 0 ? (int)threadIdx.x : tid; idx < nrows * CPR; idx += 128) {
    uint4* p = (uint4*)((unsigned short*)tile + (idx / CPR) * ld + (idx % CPR) * 8);
    uint4 x = *p;
    uint32_t* w = (uint32_t*)&x;
    #pragma unroll
    for (int i = 0; i < 4; i++) w[i] = pack_f16(bf16_lo(w[i]), bf16_hi(w[i]));
    *p = x;
  }
}

// ---- the Hedgehog feature map of a warp's 16 rows ----
// u = x W (16 x 64, bf16 mma, W (D x 64) in shared memory), then phi = [softmax(u), softmax(-u)] clamped.
// ph[j][.] in mma C layout: n-tile j < 8 is the + half (features 8j + 2t, +1), j >= 8 the - half.
__device__ __forceinline__ void hedgehog_softmax(float (&ph)[16][4], const float (&u)[8][4]) {
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    float mx = -INFINITY, mn = INFINITY;
    #pragma unroll
    for (int j = 0; j < 8; j++)
      for (int e = 2 * r; e < 2 * r + 2; e++) { mx = fmaxf(mx, u[j][e]); mn = fminf(mn, u[j][e]); }
    mx = quad_max(mx);
    mn = quad_min(mn);
    float sp = 0.0f, sm = 0.0f;
    #pragma unroll
    for (int j = 0; j < 8; j++)
      for (int e = 2 * r; e < 2 * r + 2; e++) {
        ph[j][e] = exp2f((u[j][e] - mx) * LOG2E);
        ph[j + 8][e] = exp2f((mn - u[j][e]) * LOG2E);
        sp += ph[j][e];
        sm += ph[j + 8][e];
      }
    const float ip = 1.0f / quad_sum(sp), im = 1.0f / quad_sum(sm);
    #pragma unroll
    for (int j = 0; j < 8; j++)
      for (int e = 2 * r; e < 2 * r + 2; e++) {
        ph[j][e] = fmaxf(ph[j][e] * ip, PHI_FLOOR);
        ph[j + 8][e] = fmaxf(ph[j + 8][e] * im, PHI_FLOOR);
      }
  }
}
// x rows from A fragments already in registers.
template <int D>
__device__ __forceinline__ void feature_map_regs(float (&ph)[16][4], const uint32_t (&xf)[D / 16][4], const bf16* sW) {
  float u[8][4] = {};
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++)
    #pragma unroll
    for (int np = 0; np < 4; np++) {
      uint32_t bb[4];
      frag_b_kn(bb, sW, Tiles<D>::LDW, kt * 16, np * 16);
      mma_bf16(u[2 * np], xf[kt], bb[0], bb[1]);
      mma_bf16(u[2 * np + 1], xf[kt], bb[2], bb[3]);
    }
  hedgehog_softmax(ph, u);
}
// x rows [r0, r0+16) of a shared tile.
template <int D, bool SWZ = false>
__device__ __forceinline__ void feature_map_smem(float (&ph)[16][4], const bf16* X, int r0, const bf16* sW) {
  float u[8][4] = {};
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++) {
    uint32_t xa[4];
    if constexpr (SWZ) frag_a_swz(xa, X, r0, kt * 16);  // X: a swizzled 64-row tile (the Hopper forward's K)
    else frag_a(xa, X, Tiles<D>::LDT, r0, kt * 16);
    #pragma unroll
    for (int np = 0; np < 4; np++) {
      uint32_t bb[4];
      frag_b_kn(bb, sW, Tiles<D>::LDW, kt * 16, np * 16);
      mma_bf16(u[2 * np], xa, bb[0], bb[1]);
      mma_bf16(u[2 * np + 1], xa, bb[2], bb[3]);
    }
  }
  hedgehog_softmax(ph, u);
}
// C-layout phi -> 16-bit A fragments over the 128 features (8 k-steps).
template <bool HALF>
__device__ __forceinline__ void pack_phi_a(uint32_t (&pa)[8][4], const float (&ph)[16][4]) {
  #pragma unroll
  for (int k = 0; k < 8; k++) {
    pa[k][0] = HALF ? pack_f16(ph[2 * k][0], ph[2 * k][1]) : pack_bf16(ph[2 * k][0], ph[2 * k][1]);
    pa[k][1] = HALF ? pack_f16(ph[2 * k][2], ph[2 * k][3]) : pack_bf16(ph[2 * k][2], ph[2 * k][3]);
    pa[k][2] = HALF ? pack_f16(ph[2 * k + 1][0], ph[2 * k + 1][1]) : pack_bf16(ph[2 * k + 1][0], ph[2 * k + 1][1]);
    pa[k][3] = HALF ? pack_f16(ph[2 * k + 1][2], ph[2 * k + 1][3]) : pack_bf16(ph[2 * k + 1][2], ph[2 * k + 1][3]);
  }
}
// phi of n-tile j, element e (C layout) back from 16-bit A fragments.
template <bool HALF>
__device__ __forceinline__ float phi_at(const uint32_t (&pa)[8][4], int j, int e) {
  const uint32_t r = pa[j >> 1][(j & 1) * 2 + (e >> 1)];
  return HALF ? ((e & 1) ? f16_hi(r) : f16_lo(r)) : ((e & 1) ? bf16_hi(r) : bf16_lo(r));
}
// Stores C-layout phi of this warp's rows to a shared 64 x 128 tile (row stride LDP); rows where
// keep(row) is false get zeros (sinks, rows past T).
template <bool HALF>
__device__ __forceinline__ void store_phi(void* tile, int ldp, int r0, const float (&ph)[16][4], bool keep_g, bool keep_g8) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  uint32_t* base = (uint32_t*)tile;
  #pragma unroll
  for (int j = 0; j < 16; j++) {
    const float a0 = keep_g ? ph[j][0] : 0.0f, a1 = keep_g ? ph[j][1] : 0.0f;
    const float a2 = keep_g8 ? ph[j][2] : 0.0f, a3 = keep_g8 ? ph[j][3] : 0.0f;
    base[((r0 + g) * ldp + 8 * j + 2 * t) / 2] = HALF ? pack_f16(a0, a1) : pack_bf16(a0, a1);
    base[((r0 + g + 8) * ldp + 8 * j + 2 * t) / 2] = HALF ? pack_f16(a2, a3) : pack_bf16(a2, a3);
  }
}

// ---- the running state: S (128 x D fp32, row stride LDS) += Phi^T Y over a 64-row tile ----
// Phi (64 x 128) and Y (64 x D) are 16-bit shared tiles (f16 in the forward, bf16 in the backward).
// Warp w owns state rows [32w, 32w + 32); the product is formed a quarter of the columns at a time.
template <int D, int LDS, bool HALF>
__device__ __forceinline__ void state_update(float* sS, const void* Phi, const void* Y) {
  using TL = Tiles<D>;
  constexpr int NQ = D / 32;  // n-tiles per column quarter
  const int l = lane_id(), warp = threadIdx.x >> 5, g = l >> 2, t = l & 3;
  const unsigned short* P = (const unsigned short*)Phi;
  const unsigned short* Yv = (const unsigned short*)Y;
  #pragma unroll
  for (int qq = 0; qq < 4; qq++) {
    float acc[2][NQ][4] = {};
    #pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t a0[4], a1[4];
      frag_a_t(a0, P, TL::LDP, 32 * warp, 16 * kk);
      frag_a_t(a1, P, TL::LDP, 32 * warp + 16, 16 * kk);
      #pragma unroll
      for (int np = 0; np < NQ / 2; np++) {
        uint32_t bb[4];
        frag_b_kn(bb, Yv, TL::LDT, 16 * kk, qq * (D / 4) + 16 * np);
        if (HALF) {
          mma_f16(acc[0][2 * np], a0, bb[0], bb[1]); mma_f16(acc[0][2 * np + 1], a0, bb[2], bb[3]);
          mma_f16(acc[1][2 * np], a1, bb[0], bb[1]); mma_f16(acc[1][2 * np + 1], a1, bb[2], bb[3]);
        } else {
          mma_bf16(acc[0][2 * np], a0, bb[0], bb[1]); mma_bf16(acc[0][2 * np + 1], a0, bb[2], bb[3]);
          mma_bf16(acc[1][2 * np], a1, bb[0], bb[1]); mma_bf16(acc[1][2 * np + 1], a1, bb[2], bb[3]);
        }
      }
    }
    #pragma unroll
    for (int mt = 0; mt < 2; mt++)
      #pragma unroll
      for (int nt = 0; nt < NQ; nt++) {
        const int col = qq * (D / 4) + 8 * nt + 2 * t;
        float2* p0 = (float2*)&sS[(32 * warp + 16 * mt + g) * LDS + col];
        float2* p1 = (float2*)&sS[(32 * warp + 16 * mt + g + 8) * LDS + col];
        float2 v0 = *p0, v1 = *p1;
        v0.x += acc[mt][nt][0]; v0.y += acc[mt][nt][1];
        v1.x += acc[mt][nt][2]; v1.y += acc[mt][nt][3];
        *p0 = v0;
        *p1 = v1;
      }
  }
}
// z[f] += sum over the 64 rows of Phi[row][f] * (scal ? scal[row] : 1); thread f of the 128.
template <bool HALF>
__device__ __forceinline__ void column_sum_update(float* sZ, const void* Phi, int ldp, const float* scal, int f = threadIdx.x) {
  const unsigned short* P = (const unsigned short*)Phi;
  float acc = 0.0f;
  #pragma unroll
  for (int r = 0; r < 64; r++) {
    const unsigned short bits = P[r * ldp + f];
    const float v = HALF ? f16_bits_to_float(bits) : __uint_as_float((uint32_t)bits << 16);
    acc += scal ? v * scal[r] : v;
  }
  sZ[f] += acc;
}

// ---- tf32 products with the fp32 state (S or R, 128 x D, row stride LDS, in shared memory) ----
// The A operand comes from 16-bit A fragments: a 16-wide k-step splits into two 8-wide tf32 steps; in
// step h the logical k index t holds physical column 8h + 2t and t + 4 holds 8h + 2t + 1 (the fragment's
// own pairs), and the B operand is read with the same permutation, so no data moves between lanes.
template <bool HALF>
__device__ __forceinline__ void tf32_a_from16(uint32_t (&a)[4], const uint32_t (&x)[4], int h) {
  const uint32_t r0 = x[2 * h], r1 = x[2 * h + 1];
  a[0] = __float_as_uint(HALF ? f16_lo(r0) : bf16_lo(r0));
  a[1] = __float_as_uint(HALF ? f16_lo(r1) : bf16_lo(r1));
  a[2] = __float_as_uint(HALF ? f16_hi(r0) : bf16_hi(r0));
  a[3] = __float_as_uint(HALF ? f16_hi(r1) : bf16_hi(r1));
}
// acc (16 x D) += A (16 x 128 features, as 8 16-bit A fragments) . S (128 x D).
template <int D, int LDS, bool HALF>
__device__ __forceinline__ void mul_feat_state(float (&acc)[D / 8][4], const uint32_t (&A)[8][4], const float* sS) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  #pragma unroll
  for (int k = 0; k < 8; k++)
    #pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t a[4];
      tf32_a_from16<HALF>(a, A[k], h);
      const float* r0 = sS + (16 * k + 8 * h + 2 * t) * LDS;
      #pragma unroll
      for (int nt = 0; nt < D / 8; nt++)
        mma_tf32(acc[nt], a, to_tf32(r0[8 * nt + g]), to_tf32(r0[LDS + 8 * nt + g]));
    }
}
// acc (16 x 128 features) += X (16 x D, as D/16 bf16 A fragments) . S^T (D x 128).
template <int D, int LDS>
__device__ __forceinline__ void mul_x_state_t(float (&acc)[16][4], const uint32_t (&X)[D / 16][4], const float* sS) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  #pragma unroll
  for (int k = 0; k < D / 16; k++)
    #pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t a[4];
      tf32_a_from16<false>(a, X[k], h);
      #pragma unroll
      for (int j = 0; j < 16; j++) {
        const float2 bv = *(const float2*)&sS[(8 * j + g) * LDS + 16 * k + 8 * h + 2 * t];
        mma_tf32(acc[j], a, to_tf32(bv.x), to_tf32(bv.y));
      }
    }
}

// du = phi+ (dphi+ - phi+.dphi+) - phi- (dphi- - phi-.dphi-) for a warp's 16 rows (C layout; the clamp
// is ignored: a clamped entry is 1e-12 and contributes nothing measurable). du[j] covers features 8j + 2t.
template <bool HALF>
__device__ __forceinline__ void phi_backward(float (&du)[8][4], const uint32_t (&pa)[8][4], const float (&dphi)[16][4]) {
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    float dp = 0.0f, dm = 0.0f;
    #pragma unroll
    for (int j = 0; j < 8; j++)
      for (int e = 2 * r; e < 2 * r + 2; e++) {
        dp += phi_at<HALF>(pa, j, e) * dphi[j][e];
        dm += phi_at<HALF>(pa, j + 8, e) * dphi[j + 8][e];
      }
    dp = quad_sum(dp);
    dm = quad_sum(dm);
    #pragma unroll
    for (int j = 0; j < 8; j++)
      for (int e = 2 * r; e < 2 * r + 2; e++)
        du[j][e] = phi_at<HALF>(pa, j, e) * (dphi[j][e] - dp) - phi_at<HALF>(pa, j + 8, e) * (dphi[j + 8][e] - dm);
  }
}
// C layout (16 x 64 keys or features) -> bf16 / f16 A fragments over those 64 columns (4 k-steps).
template <bool HALF, int NTILES>
__device__ __forceinline__ void pack_c_to_a(uint32_t (&a)[NTILES / 2][4], const float (&c)[NTILES][4]) {
  #pragma unroll
  for (int k = 0; k < NTILES / 2; k++) {
    a[k][0] = HALF ? pack_f16(c[2 * k][0], c[2 * k][1]) : pack_bf16(c[2 * k][0], c[2 * k][1]);
    a[k][1] = HALF ? pack_f16(c[2 * k][2], c[2 * k][3]) : pack_bf16(c[2 * k][2], c[2 * k][3]);
    a[k][2] = HALF ? pack_f16(c[2 * k + 1][0], c[2 * k + 1][1]) : pack_bf16(c[2 * k + 1][0], c[2 * k + 1][1]);
    a[k][3] = HALF ? pack_f16(c[2 * k + 1][2], c[2 * k + 1][3]) : pack_bf16(c[2 * k + 1][2], c[2 * k + 1][3]);
  }
}
// acc (16 x D) += A (16 x 16*NK16 keys, A fragments) . Y (shared tile, B[k][n] = Y[k][n]).
template <int D, bool HALF, int NK16 = 4>
__device__ __forceinline__ void mul_a_tile(float (&acc)[D / 8][4], const uint32_t (&A)[4][4], const void* Y, int kb_lo = 0) {
  #pragma unroll
  for (int kk = 0; kk < NK16; kk++)
    #pragma unroll
    for (int np = 0; np < D / 16; np++) {
      if (kk < kb_lo) continue;  // A's k-blocks below kb_lo are zero
      uint32_t bb[4];
      frag_b_kn(bb, (const unsigned short*)Y, Tiles<D>::LDT, 16 * kk, 16 * np);
      if (HALF) { mma_f16(acc[2 * np], A[kk], bb[0], bb[1]); mma_f16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
      else { mma_bf16(acc[2 * np], A[kk], bb[0], bb[1]); mma_bf16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
    }
}
// s (16 x NKEYS keys) = X (16 x D, A fragments) . K^T for the key tile K (NKEYS x D shared, B[k][n] = K[n][k]).
template <int D, int NKEYS = 64>
__device__ __forceinline__ void mul_x_keys(float (&sc)[8][4], const uint32_t (&X)[D / 16][4], const bf16* K) {
  #pragma unroll
  for (int i = 0; i < 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++)
    #pragma unroll
    for (int np = 0; np < NKEYS / 16; np++) {
      uint32_t bb[4];
      frag_b_nk(bb, K, Tiles<D>::LDT, 16 * np, 16 * kt);
      mma_bf16(sc[2 * np], X[kt], bb[0], bb[1]);
      mma_bf16(sc[2 * np + 1], X[kt], bb[2], bb[3]);
    }
}
// The same two products with X read from a shared tile (rows [r0, r0+16)), one k-step at a time: fewer
// registers than holding all D/16 fragments.
template <int D, int LDS>
__device__ __forceinline__ void mul_x_state_t_smem(float (&acc)[16][4], const bf16* X, int r0, const float* sS) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  #pragma unroll
  for (int k = 0; k < D / 16; k++) {
    uint32_t xa[4];
    frag_a(xa, X, Tiles<D>::LDT, r0, 16 * k);
    #pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t a[4];
      tf32_a_from16<false>(a, xa, h);
      #pragma unroll
      for (int j = 0; j < 16; j++) {
        const float2 bv = *(const float2*)&sS[(8 * j + g) * LDS + 16 * k + 8 * h + 2 * t];
        mma_tf32(acc[j], a, to_tf32(bv.x), to_tf32(bv.y));
      }
    }
  }
}
// (n-blocks of 16 below nb_lo are left zero: the causal tile's blocks that a warp's rows never see.)
template <int D, int NKEYS = 64>
__device__ __forceinline__ void mul_x_keys_smem(float (&sc)[8][4], const bf16* X, int r0, const bf16* K, int nb_lo = 0) {
  #pragma unroll
  for (int i = 0; i < 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++) {
    uint32_t xa[4];
    frag_a(xa, X, Tiles<D>::LDT, r0, 16 * kt);
    #pragma unroll
    for (int np = 0; np < NKEYS / 16; np++) {
      if (np < nb_lo) continue;
      uint32_t bb[4];
      frag_b_nk(bb, K, Tiles<D>::LDT, 16 * np, 16 * kt);
      mma_bf16(sc[2 * np], xa, bb[0], bb[1]);
      mma_bf16(sc[2 * np + 1], xa, bb[2], bb[3]);
    }
  }
}
// Loads A fragments of a 16 x D row block from global memory (rows past n_valid read as zeros).
template <int D>
__device__ __forceinline__ void frag_a_global(uint32_t (&xf)[D / 16][4], const bf16* rows, size_t row_stride, int r0, int n_valid) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  const bool ok0 = r0 + g < n_valid, ok1 = r0 + g + 8 < n_valid;
  const uint32_t* p0 = (const uint32_t*)(rows + (size_t)(r0 + g) * row_stride);
  const uint32_t* p1 = (const uint32_t*)(rows + (size_t)(r0 + g + 8) * row_stride);
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++) {
    xf[kt][0] = ok0 ? p0[8 * kt + t] : 0u;
    xf[kt][1] = ok1 ? p1[8 * kt + t] : 0u;
    xf[kt][2] = ok0 ? p0[8 * kt + 4 + t] : 0u;
    xf[kt][3] = ok1 ? p1[8 * kt + 4 + t] : 0u;
  }
}
template <class K>
inline void set_max_smem(K kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}
// ---- fast forward ----
struct FastFwdArgs {
  bf16* y;
  const bf16 *q, *k, *v, *Wq, *Wk, *y_true;
  const float *wlogit, *segS, *segZ;  // segS/segZ: state of the chunks before each segment (B, H, nseg, 128, D)
  HybridAttnSaved sv;
  float* row_sq;  // version 2: (B, T, H) squared error of each row
  float* blk_sq;  // version 3: (B, H, nseg) squared error summed over each block's rows
  float grad_scale, inv_n;
  Shape s;
  int seg_chunks;
};
template <int D>
struct FwdLayout {
  using TL = Tiles<D>;
  static constexpr int LDS = D + 4;  // state row stride: the tf32 B reads (rows 2t, cols g) hit 32 banks
  static constexpr size_t Q = 0, K = Q + TL::TILE * 2, V = K + 2 * TL::TILE * 2, WQ = V + 2 * TL::TILE * 2,
                          WK = WQ + TL::WT * 2, PHI = WK + TL::WT * 2, S = PHI + TL::PT * 2, Z = S + NF * LDS * 4,
                          SK = Z + NF * 4, SV = SK + 16 * TL::LDT * 2, BYTES = SV + 16 * TL::LDT * 2;
};

// Online softmax over one key tile for a warp's 16 query rows. MASK(kl, row_local) says whether key kl of
// the tile is a softmax key of that query row. Updates the running max m, partial sums l, output o, and the
// arg max (value best, key position barg; ties keep the earlier key).
template <int D, int NKEYS, class MASK>
__device__ __forceinline__ void softmax_tile(float (&o)[D / 8][4], float (&m)[2], float (&l)[2], float (&best)[2], int (&barg)[2],
                                             const uint32_t (&qf)[D / 16][4], const bf16* K, const __half* V,
                                             int key0, int row0, float scale, MASK mask) {
  constexpr int nkeys = NKEYS;
  const int ln = lane_id(), g = ln >> 2, t = ln & 3;
  float sc[8][4];
  mul_x_keys<D, NKEYS>(sc, qf, K);
  float tmax[2] = {-INFINITY, -INFINITY};
  #pragma unroll
  for (int nt = 0; nt < nkeys / 8; nt++)
    #pragma unroll
    for (int e = 0; e < 4; e++) {
      const int kl = 8 * nt + 2 * t + (e & 1), r = e >> 1;
      const float x = mask(kl, row0 + g + 8 * r) ? sc[nt][e] * scale : -INFINITY;
      sc[nt][e] = x;
      tmax[r] = fmaxf(tmax[r], x);
      if (x > best[r]) { best[r] = x; barg[r] = key0 + kl; }  // keys are visited in increasing order
    }
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    const float mnew = fmaxf(m[r], quad_max(tmax[r]));
    const float muse = mnew == -INFINITY ? 0.0f : mnew;
    const float corr = exp2f((m[r] - muse) * LOG2E);
    l[r] *= corr;
    #pragma unroll
    for (int nt = 0; nt < D / 8; nt++) { o[nt][2 * r] *= corr; o[nt][2 * r + 1] *= corr; }
    m[r] = mnew;
    #pragma unroll
    for (int nt = 0; nt < nkeys / 8; nt++)
      for (int e = 2 * r; e < 2 * r + 2; e++) {
        sc[nt][e] = exp2f((sc[nt][e] - muse) * LOG2E);
        l[r] += sc[nt][e];
      }
  }
  uint32_t pa[4][4];
  pack_c_to_a<true, 8>(pa, sc);
  mul_a_tile<D, true, NKEYS / 16>(o, pa, V);
}

template <int D>
static __global__ void __launch_bounds__(128, 1) fast_forward_kernel(FastFwdArgs a) {
  using TL = Tiles<D>;
  using LY = FwdLayout<D>;
  constexpr int LDT = TL::LDT, LDS = LY::LDS, NT = TL::NT, KT = TL::KT;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sYT = (bf16*)(smem_raw + LY::Q);  // the teacher's output for this chunk (stage 1), prefetched
  bf16* sK = (bf16*)(smem_raw + LY::K);
  __half* sV = (__half*)(smem_raw + LY::V);
  bf16* sWq = (bf16*)(smem_raw + LY::WQ);
  bf16* sWk = (bf16*)(smem_raw + LY::WK);
  __half* sPhi = (__half*)(smem_raw + LY::PHI);
  float* sS = (float*)(smem_raw + LY::S);
  float* sZ = (float*)(smem_raw + LY::Z);
  bf16* sSK = (bf16*)(smem_raw + LY::SK);
  __half* sSV = (__half*)(smem_raw + LY::SV);

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* qb = a.q + row_index(s, b, 0, h) * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  const bf16* ytb = a.y_true ? a.y_true + row_index(s, b, 0, h) * D : nullptr;
  auto rows_in = [&](int c) { return min(CHUNK, s.T - c * CHUNK); };

  // Prologue: maps, sinks, the first two key chunks, the first y_true, the state before this segment.
  load_rows_async<64>(sWq, TL::LDW, a.Wq + (size_t)h * D * 64, 64, D, D);
  load_rows_async<64>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  if (s.sinks > 0) {
    load_rows_async<D>(sSK, LDT, kb, kstride, 16, s.sinks);
    load_rows_async<D>((bf16*)sSV, LDT, vb, kstride, 16, s.sinks);
  }
  if (c_begin >= 1) {
    const int c = c_begin - 1;
    load_rows_async<D>(sK + (c & 1) * TL::TILE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    load_rows_async<D>((bf16*)sV + (c & 1) * TL::TILE, LDT, vb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
  }
  load_rows_async<D>(sK + (c_begin & 1) * TL::TILE, LDT, kb + (size_t)c_begin * CHUNK * kstride, kstride, 64, rows_in(c_begin));
  load_rows_async<D>((bf16*)sV + (c_begin & 1) * TL::TILE, LDT, vb + (size_t)c_begin * CHUNK * kstride, kstride, 64, rows_in(c_begin));
  if (a.y_true) load_rows_async<D>(sYT, LDT, ytb + (size_t)c_begin * CHUNK * qstride, qstride, 64, rows_in(c_begin));
  cp_async_commit();
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    for (int idx = tid; idx < NF * D; idx += 128) {
      const int f = idx / D, col = idx % D;
      sS[f * LDS + col] = seg > 0 ? a.segS[(base + f) * D + col] : 0.0f;
    }
    sZ[tid] = seg > 0 ? a.segZ[base + tid] : 0.0f;
  }
  cp_async_wait<0>();
  __syncthreads();
  tile_bf16_to_f16<D>(sV, LDT, 64);
  tile_bf16_to_f16<D>(sV + TL::TILE, LDT, 64);
  if (s.sinks > 0) tile_bf16_to_f16<D>(sSV, LDT, 16);
  __syncthreads();

  for (int c = c_begin; c < c_end; c++) {
    const int cur = c & 1, prv = cur ^ 1;
    const bf16* Kc = sK + cur * TL::TILE;
    const bf16* Kp = sK + prv * TL::TILE;
    __half* Vc = sV + cur * TL::TILE;
    const __half* Vp = sV + prv * TL::TILE;
    const bool has_prev = c >= 1;
    const int row0 = warp * 16;               // this warp's first row within the chunk
    const int i0 = c * CHUNK + row0;          // its first query position
    // The queries go straight to registers: the loads are in flight while phi_k is computed.
    uint32_t qf[KT][4];
    frag_a_global<D>(qf, qb + (size_t)c * CHUNK * qstride, qstride, row0, rows_in(c));
    cp_async_wait<1>();                       // K_c is in (V_c, y_true_c may still be in flight)
    __syncthreads();

    // phi_k of chunk c-1 (shared, sinks zeroed): the state update and the sliding linear keys read it.
    if (has_prev) {
      float ph[16][4];
      feature_map_smem<D>(ph, Kp, row0, sWk);
      const int j0 = (c - 1) * CHUNK + row0;
      store_phi<true>(sPhi, TL::LDP, row0, ph, j0 + g >= s.sinks, j0 + g + 8 >= s.sinks);
    }
    cp_async_wait<0>();                       // V_c (and y_true_c) are in
    __syncthreads();
    if (c > c_begin) {
      tile_bf16_to_f16<D>(Vc, LDT, 64);
      __syncthreads();
    }

    // Softmax part: sinks (as their own tile from chunk 2 on), chunk c-1, the causal part of chunk c.
    float o[NT][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, best[2] = {-INFINITY, -INFINITY};
    int barg[2] = {0, 0};
    const bool sliding = s.geometry == HYBRID_SLIDING;
    if (s.sinks > 0 && c >= 2)
      softmax_tile<D, 16>(o, m, l, best, barg, qf, sSK, sSV, 0, row0, s.scale, [&](int kl, int) { return kl < s.sinks; });
    if (has_prev) {
      const int key0 = (c - 1) * CHUNK;
      softmax_tile<D, 64>(o, m, l, best, barg, qf, Kp, Vp, key0, row0, s.scale,
                      [&](int kl, int rl) { return !sliding || kl > rl || key0 + kl < s.sinks; });
    }
    softmax_tile<D, 64>(o, m, l, best, barg, qf, Kc, Vc, c * CHUNK, row0, s.scale, [&](int kl, int rl) { return kl <= rl; });
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      l[r] = quad_sum(l[r]) * gamma;
      #pragma unroll
      for (int nt = 0; nt < NT; nt++) { o[nt][2 * r] *= gamma; o[nt][2 * r + 1] *= gamma; }
      for (int off = 1; off < 4; off <<= 1) {  // arg max over the quad (ties: the earlier key)
        const float bv = __shfl_xor_sync(0xffffffffu, best[r], off);
        const int ba = __shfl_xor_sync(0xffffffffu, barg[r], off);
        if (bv > best[r] || (bv == best[r] && ba < barg[r])) { best[r] = bv; barg[r] = ba; }
      }
    }
    uint32_t phq[8][4];  // phi_q of this chunk as f16 A fragments (the softmax part no longer needs q)
    {
      float ph[16][4];
      feature_map_regs<D>(ph, qf, sWq);
      pack_phi_a<true>(phq, ph);
    }
    __syncthreads();                          // K_{c-1} free: fetch K_{c+1} into its slot
    if (c + 1 < c_end)
      load_rows_async<D>(sK + prv * TL::TILE, LDT, kb + (size_t)(c + 1) * CHUNK * kstride, kstride, 64, rows_in(c + 1));
    cp_async_commit();

    // Linear part (not rescaled): phi_q . S over chunks <= c-2, and for sliding the keys of chunk c-1
    // at least w behind the query, as a masked quadratic term.
    float ol[NT][4] = {};
    float ll[2] = {0.0f, 0.0f};
    if (c >= 2) {
      mul_feat_state<D, LDS, true>(ol, phq, sS);
      #pragma unroll
      for (int k = 0; k < 8; k++) {
        const int f0 = 16 * k + 2 * t;
        ll[0] += f16_lo(phq[k][0]) * sZ[f0] + f16_hi(phq[k][0]) * sZ[f0 + 1] + f16_lo(phq[k][2]) * sZ[f0 + 8] + f16_hi(phq[k][2]) * sZ[f0 + 9];
        ll[1] += f16_lo(phq[k][1]) * sZ[f0] + f16_hi(phq[k][1]) * sZ[f0 + 1] + f16_lo(phq[k][3]) * sZ[f0 + 8] + f16_hi(phq[k][3]) * sZ[f0 + 9];
      }
    }
    if (sliding && has_prev) {
      float bm[8][4] = {};
      #pragma unroll
      for (int k = 0; k < 8; k++)
        #pragma unroll
        for (int np = 0; np < 4; np++) {
          uint32_t bb[4];
          frag_b_nk(bb, sPhi, TL::LDP, 16 * np, 16 * k);
          mma_f16(bm[2 * np], phq[k], bb[0], bb[1]);
          mma_f16(bm[2 * np + 1], phq[k], bb[2], bb[3]);
        }
      const int key0 = (c - 1) * CHUNK;
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          const int kl = 8 * nt + 2 * t + (e & 1), rl = row0 + g + 8 * (e >> 1);
          if (!(kl <= rl && key0 + kl >= s.sinks)) bm[nt][e] = 0.0f;
          ll[e >> 1] += bm[nt][e];
        }
      uint32_t pa[4][4];
      pack_c_to_a<true, 8>(pa, bm);
      mul_a_tile<D, true>(ol, pa, Vp);
    }
    ll[0] = quad_sum(ll[0]);
    ll[1] = quad_sum(ll[1]);

    // Output, statistics, and the fused stage-1 loss.
    {
      float den[2], inv[2], sq[2] = {0, 0}, dyy[2] = {0, 0}, dyA[2] = {0, 0};
      #pragma unroll
      for (int r = 0; r < 2; r++) { den[r] = l[r] + ll[r]; inv[r] = 1.0f / den[r]; }
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int i = i0 + g + 8 * r;
        if (i >= s.T) continue;
        const size_t ri = row_index(s, b, i, h);
        #pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const int col = 8 * nt + 2 * t;
          const float y0 = (o[nt][2 * r] + ol[nt][2 * r]) * inv[r], y1 = (o[nt][2 * r + 1] + ol[nt][2 * r + 1]) * inv[r];
          const uint32_t yp = pack_bf16(y0, y1);
          if (a.y) *(uint32_t*)&a.y[ri * D + col] = yp;  // stage 1 may skip y: nothing reads it
          if (a.sv.y_lo) *(uint32_t*)&a.sv.y_lo[ri * D + col] = pack_bf16(y0 - bf16_lo(yp), y1 - bf16_hi(yp));
          if (a.y_true) {
            const uint32_t tv = *(const uint32_t*)&sYT[(row0 + g + 8 * r) * LDT + col];
            const float e0 = y0 - bf16_lo(tv), e1 = y1 - bf16_hi(tv);
            sq[r] += e0 * e0 + e1 * e1;
            const uint32_t gp = pack_bf16(a.grad_scale * 2.0f * e0 * a.inv_n, a.grad_scale * 2.0f * e1 * a.inv_n);
            *(uint32_t*)&a.sv.dy[ri * D + col] = gp;
            dyy[r] += bf16_lo(gp) * y0 + bf16_hi(gp) * y1;
            dyA[r] += bf16_lo(gp) * o[nt][2 * r] + bf16_hi(gp) * o[nt][2 * r + 1];
          }
        }
      }
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        sq[r] = quad_sum(sq[r]);
        dyy[r] = quad_sum(dyy[r]);
        dyA[r] = quad_sum(dyA[r]);
        const int i = i0 + g + 8 * r;
        if (t == 0 && i < s.T) {
          const size_t ri = row_index(s, b, i, h);
          a.sv.row_max[ri] = m[r];
          a.sv.row_den[ri] = den[r];
          a.sv.row_argmax[ri] = barg[r];
          if (a.y_true) {
            a.row_sq[ri] = sq[r];
            a.sv.row_delta[ri] = dyy[r] * inv[r];
            a.sv.row_wgrad[ri] = (dyA[r] - dyy[r] * l[r]) * inv[r];
          }
        }
      }
    }

    // The state takes chunk c-1 (so that it covers chunks <= c-1 for the next query chunk).
    __syncthreads();                          // every warp is done reading sS, sZ
    if (has_prev) {
      state_update<D, LDS, true>(sS, sPhi, Vp);
      column_sum_update<true>(sZ, sPhi, TL::LDP, nullptr);
    }
    __syncthreads();                          // V_{c-1}, sPhi and y_true_c free: fetch V_{c+1}, y_true_{c+1}
    if (c + 1 < c_end) {
      load_rows_async<D>((bf16*)sV + prv * TL::TILE, LDT, vb + (size_t)(c + 1) * CHUNK * kstride, kstride, 64, rows_in(c + 1));
      if (a.y_true) load_rows_async<D>(sYT, LDT, ytb + (size_t)(c + 1) * CHUNK * qstride, qstride, 64, rows_in(c + 1));
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
}

// ---- segment sums and their prefix ----
// KEYS: the state contribution S += phi_k^T v, z += phi_k of the chunks between two segment starts, for
// the forward and the query-side backward: segment s sums chunks [s G - 1, (s+1) G - 2] (a query of chunk
// c sees chunks <= c-2). !KEYS: R += (phi_q / den)^T dy, r += phi_q delta over query chunks [s G + 1,
// (s+1) G] for the key-side backward (a key of chunk c is seen by query chunks >= c+2). The block of the
// last (KEYS) or first (!KEYS) segment has nothing to sum. Output (B, H, nseg, 128, D) and (B, H, nseg, 128).
struct SegSumArgs {
  float *segS, *segZ;
  const bf16 *x, *y, *W;        // KEYS: x = k, W = Wk, y = v;  !KEYS: x = phi_q / den (B, T, H, 128), y = dy
  const float *den, *delta;     // !KEYS
  Shape s;
  int seg_chunks, nseg;  // here: the sub-segment length and count
  int first, last;       // the sub-segments some segment's prefix needs: [first, last); the others return
};
// 8 warps. The sum lives in registers: warp w owns value columns [16w, 16w + 16) of S^T (16 x 128 fp32, the
// accumulator of an mma with M = columns, N = features), so the update is a plain mma chain, no shared-memory
// read-modify-write; KEYS: the feature maps in pairs of chunks (below). The next chunk's (pair's) tiles load while
// this one computes (double buffers): waiting for each chunk's tiles right after asking for them left these passes
// at a third of the forward's time.
constexpr int SEG_THREADS = 256;
// The reverse pass (!KEYS) reads no W and forms no feature maps: its blocks take only the part before W, and two
// fit an SM (registers capped at 128 for it).
// The forward pass (KEYS) takes its chunks in PAIRS: warpgroup u (warps 4u .. 4u + 3) maps chunk 2p + u of the
// pair while the other maps its partner, then every warp adds both chunks to its state rows (warps 4-7 also add
// both to z). The maps were the long pole of a chunk, with warps 4-7 meanwhile converting V and summing columns.
// V stays bf16 in shared memory; its A fragments become f16 in registers. H200, full pass: T = 4096 0.070 -> 0.063
// ms, 32K 0.414 -> 0.363.
template <int D>
struct SegLayout {
  using TL = Tiles<D>;
  // KEYS: K and V of two pairs (slot 2 (p & 1) + u), W, phi of the pair's two chunks, z
  static constexpr size_t X = 0, Y = X + 4 * TL::TILE * 2, W = Y + 4 * TL::TILE * 2, PHI = W + TL::WT * 2,
                          Z = PHI + 2 * TL::PT * 2, BYTES = Z + NF * 4;
  // !KEYS: phi_q / den and dy of two chunks (double-buffered), z, delta * den of both
  static constexpr size_t QX = 0, QY = QX + 2 * TL::PT * 2, QZ = QY + 2 * TL::TILE * 2, QSC = QZ + NF * 4,
                          BYTES_QUERIES = QSC + 2 * 64 * 4;
};
template <int D, bool KEYS>
static __global__ void __launch_bounds__(SEG_THREADS, KEYS ? 1 : 2) segment_sum_kernel(SegSumArgs a) {
  using TL = Tiles<D>;
  using LY = SegLayout<D>;
  constexpr int LDT = TL::LDT, LDP = TL::LDP;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  if (seg < a.first || seg >= a.last) return;  // only segments that come after it (KEYS: before) would use it
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sZ = (float*)(smem_raw + (KEYS ? LY::Z : LY::QZ));
  float acc[16][4] = {};  // S^T rows [16 warp, +16) (value columns) x 128 features
  if (tid < NF) sZ[tid] = 0.0f;
  const int c0 = KEYS ? max(0, seg * a.seg_chunks - 1) : seg * a.seg_chunks + 1;
  const int c1 = min(s.NC - 1, KEYS ? (seg + 1) * a.seg_chunks - 2 : (seg + 1) * a.seg_chunks);
  // acc += Y^T P over a 64-row chunk: Y the 16-bit value tile (A^T fragments; made f16 here if y_bf16), P the features.
  auto update = [&](const bf16* Y, const unsigned short* P, auto y_bf16) {
    #pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t va[4];
      frag_a_t(va, (const unsigned short*)Y, LDT, 16 * warp, 16 * kk);  // A[col][key] = Y[key][col]
      if constexpr (decltype(y_bf16)::value) {
        #pragma unroll
        for (int i = 0; i < 4; i++) va[i] = pack_f16(bf16_lo(va[i]), bf16_hi(va[i]));
      }
      #pragma unroll
      for (int np = 0; np < 8; np++) {
        uint32_t bb[4];
        frag_b_kn(bb, P, LDP, 16 * kk, 16 * np);  // B[key][feature] = Phi[key][feature]
        if (KEYS) { mma_f16(acc[2 * np], va, bb[0], bb[1]); mma_f16(acc[2 * np + 1], va, bb[2], bb[3]); }
        else { mma_bf16(acc[2 * np], va, bb[0], bb[1]); mma_bf16(acc[2 * np + 1], va, bb[2], bb[3]); }
      }
    }
  };
  const bool owns = warp < D / 16;  // a warp a 16-column slice of the state (d = 64: warps 0-3)
  if constexpr (KEYS) {
    bf16* sX = (bf16*)(smem_raw + LY::X);  // keys, slot 2 (p & 1) + u
    bf16* sY = (bf16*)(smem_raw + LY::Y);  // values
    bf16* sW = (bf16*)(smem_raw + LY::W);
    unsigned short* sPhi = (unsigned short*)(smem_raw + LY::PHI);  // phi of chunk 2p + u in tile u
    const int hf = warp >> 2, row0 = 16 * (warp & 3);
    const size_t kstride = (size_t)s.Hkv * D;
    const bf16* kb = a.x + kv_index(s, b, 0, hk) * D;
    const bf16* vb = a.y + kv_index(s, b, 0, hk) * D;
    load_rows_async<64, SEG_THREADS>(sW, TL::LDW, a.W + (size_t)h * D * 64, 64, D, D);
    const int npairs = c0 <= c1 ? (c1 - c0 + 2) / 2 : 0;
    auto load_pair = [&](int p) {
      #pragma unroll
      for (int u = 0; u < 2; u++) {
        const int c = c0 + 2 * p + u, nval = c <= c1 ? min(CHUNK, s.T - c * CHUNK) : 0;
        const size_t off = nval > 0 ? (size_t)c * CHUNK * kstride : 0;
        load_rows_async<D, SEG_THREADS>(sX + (2 * (p & 1) + u) * TL::TILE, LDT, kb + off, kstride, 64, nval);
        load_rows_async<D, SEG_THREADS>(sY + (2 * (p & 1) + u) * TL::TILE, LDT, vb + off, kstride, 64, nval);
      }
    };
    if (npairs > 0) load_pair(0);
    cp_async_commit();
    for (int p = 0; p < npairs; p++) {
      const int sl = 2 * (p & 1);
      cp_async_wait<0>();
      __syncthreads();  // pair p's tiles are in; pair p-1's readers of phi and of the other slots are done
      if (p + 1 < npairs) load_pair(p + 1);
      cp_async_commit();
      const int c = c0 + 2 * p + hf;  // this warpgroup's chunk
      if (c <= c1) {
        float ph[16][4];
        feature_map_smem<D>(ph, sX + (sl + hf) * TL::TILE, row0, sW);
        const int j0 = c * CHUNK + row0;
        store_phi<true>(sPhi + hf * TL::PT, LDP, row0, ph, j0 + g >= s.sinks && j0 + g < s.T, j0 + g + 8 >= s.sinks && j0 + g + 8 < s.T);
      }
      __syncthreads();  // both phi tiles
      const bool both = c0 + 2 * p + 1 <= c1;
      if (owns) update(sY + sl * TL::TILE, sPhi, std::true_type{});
      if (owns && both) update(sY + (sl + 1) * TL::TILE, sPhi + TL::PT, std::true_type{});
      if (tid >= SEG_THREADS - NF) {  // z: warps 4-7, chunk 2p then 2p + 1 (a fixed order)
        column_sum_update<true>(sZ, sPhi, LDP, nullptr, tid - (SEG_THREADS - NF));
        if (both) column_sum_update<true>(sZ, sPhi + TL::PT, LDP, nullptr, tid - (SEG_THREADS - NF));
      }
    }
  } else {
    bf16* sX = (bf16*)(smem_raw + LY::QX);  // phi_q / den (64 x 128)
    bf16* sY = (bf16*)(smem_raw + LY::QY);  // dy
    float* sSc = (float*)(smem_raw + LY::QSC);
    auto load = [&](int c, int sl) {  // chunk c's tiles into buffer sl (all 256 threads)
      const int nval = min(CHUNK, s.T - c * CHUNK);
      bf16* X = sX + sl * TL::PT;
      bf16* Y = sY + sl * TL::TILE;
      for (int idx = tid; idx < 64 * (D / 8) + 64 * (NF / 8); idx += SEG_THREADS) {
        if (idx < 64 * (NF / 8)) {
          const int r = idx / (NF / 8), cc = idx % (NF / 8);
          const bool ok = r < nval;
          cp_async16(X + r * LDP + cc * 8, a.x + row_index(s, b, c * CHUNK + (ok ? r : 0), h) * NF + cc * 8, ok);
        } else {
          const int j = idx - 64 * (NF / 8), r = j / (D / 8), cc = j % (D / 8);
          const bool ok = r < nval;
          cp_async16(Y + r * LDT + cc * 8, a.y + row_index(s, b, c * CHUNK + (ok ? r : 0), h) * D + cc * 8, ok);
        }
      }
      if (tid < 64) {
        const int i = c * CHUNK + tid;
        sSc[sl * 64 + tid] = i < s.T ? a.delta[row_index(s, b, i, h)] * a.den[row_index(s, b, i, h)] : 0.0f;
      }
    };
    if (c0 <= c1) load(c0, 0);
    cp_async_commit();
    for (int c = c0; c <= c1; c++) {
      const int sl = (c - c0) & 1;
      cp_async_wait<0>();
      __syncthreads();  // chunk c's tiles are in; chunk c-1's readers of the other buffers are done
      if (c + 1 <= c1) load(c + 1, sl ^ 1);
      cp_async_commit();
      const unsigned short* P = (const unsigned short*)(sX + sl * TL::PT);
      if (owns) update(sY + sl * TL::TILE, P, std::false_type{});
      if (tid < NF) column_sum_update<false>(sZ, P, LDP, sSc + sl * 64);
    }
  }
  __syncthreads();
  const size_t base = (((size_t)b * s.H + h) * a.nseg + seg) * NF;
  if (owns) {
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int e = 0; e < 4; e++) {
        const int col = 16 * warp + g + 8 * (e >> 1), f = 8 * j + 2 * t + (e & 1);
        a.segS[(base + f) * D + col] = acc[j][e];
      }
  }
  if (tid < NF) a.segZ[base + tid] = sZ[tid];
}
// Exclusive prefix over segments from the sub-segment sums (split sub-segments a segment): FORWARD: segment s
// gets the sum of segments < s; otherwise the sum of segments > s. One thread per (b, h, element); a fixed
// order (deterministic). The sub-segments a pass leaves unwritten (the last segment's for FORWARD, the first's
// otherwise) belong to the segment that is summed last, so they are never read.
template <bool FORWARD>
static __global__ void segment_scan_kernel(float* __restrict__ segS, float* __restrict__ segZ, const float* __restrict__ subS,
                                           const float* __restrict__ subZ, int BH, int nseg, int nsub, int split, int D) {
  const size_t per = (size_t)NF * (D + 1);
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)BH * per) return;
  const size_t bh = idx / per, el = idx % per;
  const bool isS = el < (size_t)NF * D;
  const size_t ez = el - (size_t)NF * D;
  float acc = 0.0f;
  for (int n = 0; n < nseg; n++) {
    const int sg = FORWARD ? n : nseg - 1 - n;
    if (isS) segS[(bh * nseg + sg) * NF * D + el] = acc;
    else segZ[(bh * nseg + sg) * NF + ez] = acc;
    if (n + 1 < nseg)
      for (int u = sg * split; u < min(nsub, (sg + 1) * split); u++)
        acc += isS ? subS[(bh * nsub + u) * NF * D + el] : subZ[(bh * nsub + u) * NF + ez];
  }
}
// ---- fast backward ----
struct FastBwdArgs {
  bf16 *dq, *phiq_out, *du_q, *du_k;  // phiq_out: (B, T, H, 128) phi_q / den, for the key side
  float *dm, *dk_acc, *dv_acc;
  const bf16 *q, *k, *v, *dy, *Wq, *Wk, *phiq_in;
  const float *wlogit, *segS, *segZ, *segR, *segRz;  // state prefixes per segment: S (query side), R (key side)
  HybridAttnSaved sv;
  bool want_window, want_input_grads;
  Shape s;
  int seg_chunks;
  bf16 *dk_out, *dv_out;  // version 3: the window dk / dv kernel writes the outputs
  const bf16 *y, *y_lo;   // version 3 query kernel with the saved maps: delta from these (null: delta given)
};
template <int D>
struct BwdQLayout {
  using TL = Tiles<D>;
  static constexpr int LDS = D + 8;  // state row stride: the float2 reads (rows g, cols 2t) hit 32 banks
  static constexpr size_t Q = 0, K = Q + TL::TILE * 2, V = K + 2 * TL::TILE * 2, WQ = V + 2 * TL::TILE * 2,
                          WK = WQ + TL::WT * 2, PHI = WK + TL::WT * 2, S = PHI + TL::PT * 2, Z = S + NF * LDS * 4,
                          SK = Z + NF * 4, SV = SK + 16 * TL::LDT * 2, BYTES = SV + 16 * TL::LDT * 2;
};

// A thread's two query rows (g, g + 8) as the window gradient reads them: m_i log2(e), gamma / den_i and
// gamma delta_i (0 for rows past T, whose 1/den and delta are 0), so that each score costs one FFMA, one
// exp2 and two more FMA-pipe instructions.
struct WinRows {
  float mL[2], ginv[2], gdelta[2];
};
__device__ __forceinline__ WinRows win_rows(const float (&m)[2], const float (&inv)[2], const float (&delta)[2], float gamma) {
  WinRows w;
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    w.mL[r] = m[r] * LOG2E;
    w.ginv[r] = gamma * inv[r];
    w.gdelta[r] = gamma * delta[r];
  }
  return w;
}
// Window gradient of one key tile for a warp's 16 query rows: ds = A (g.v - delta), its row sums, and
// dq += ds K / sqrt(d) when want_dq. Only the 16-key blocks [0, nkb) are formed (the causal tile: a warp's
// rows see no key past its last row, so the blocks beyond are all masked and skipped).
template <int D, int NKEYS, class MASK>
__device__ __forceinline__ void window_grad_tile(float (&dqa)[D / 8][4], float (&rowsum)[2], const bf16* sQ, int row0,
                                                 const uint32_t (&dyf)[D / 16][4], const bf16* K, const bf16* V,
                                                 const WinRows& wr, float scale, bool want_dq, MASK mask,
                                                 int nkb = NKEYS / 16) {
  constexpr int nkeys = NKEYS;
  const int ln = lane_id(), g = ln >> 2, t = ln & 3;
  const float c1 = scale * LOG2E;
  float sc[8][4] = {};
  float dp[8][4] = {};
  #pragma unroll
  for (int kt = 0; kt < D / 16; kt++) {
    uint32_t qa[4];
    frag_a(qa, sQ, Tiles<D>::LDT, row0, 16 * kt);
    #pragma unroll
    for (int np = 0; np < nkeys / 16; np++) {
      if (np >= nkb) break;
      uint32_t bb[4];
      frag_b_nk(bb, K, Tiles<D>::LDT, 16 * np, 16 * kt);
      mma_bf16(sc[2 * np], qa, bb[0], bb[1]);
      mma_bf16(sc[2 * np + 1], qa, bb[2], bb[3]);
      frag_b_nk(bb, V, Tiles<D>::LDT, 16 * np, 16 * kt);  // dP = dy V^T (V read like K: B[k][n] = V[n][k])
      mma_bf16(dp[2 * np], dyf[kt], bb[0], bb[1]);
      mma_bf16(dp[2 * np + 1], dyf[kt], bb[2], bb[3]);
    }
  }
  #pragma unroll
  for (int nt = 0; nt < nkeys / 8; nt++)
    #pragma unroll
    for (int e = 0; e < 4; e++) {
      const int kl = 8 * nt + 2 * t + (e & 1), r = e >> 1;
      float ds = 0.0f;
      if (nt < 2 * nkb && mask(kl, row0 + g + 8 * r)) {
        // p rounded to f16 as the forward multiplied it, so that sum_j ds_ij (dw, and the max's gradient)
        // is formed from the same weights as the forward's output, not a 2^-11 neighbour of them
        const float p = __half2float(__float2half(ex2_approx(sc[nt][e] * c1 - wr.mL[r])));
        ds = p * (dp[nt][e] * wr.ginv[r] - wr.gdelta[r]);
      }
      rowsum[r] += ds;
      sc[nt][e] = ds * scale;
    }
  if (want_dq) {
    uint32_t da[4][4];
    pack_c_to_a<false, 8>(da, sc);
    #pragma unroll
    for (int kk = 0; kk < nkeys / 16; kk++) {
      if (kk >= nkb) break;
      #pragma unroll
      for (int np = 0; np < D / 16; np++) {
        uint32_t bb[4];
        frag_b_kn(bb, K, Tiles<D>::LDT, 16 * kk, 16 * np);
        mma_bf16(dqa[2 * np], da[kk], bb[0], bb[1]);
        mma_bf16(dqa[2 * np + 1], da[kk], bb[2], bb[3]);
      }
    }
  }
}

template <int D>
static __global__ void __launch_bounds__(128, 1) fast_backward_query_kernel(FastBwdArgs a) {
  using TL = Tiles<D>;
  using LY = BwdQLayout<D>;
  constexpr int LDT = TL::LDT, LDS = LY::LDS, NT = TL::NT, KT = TL::KT;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = (bf16*)(smem_raw + LY::Q);
  bf16* sK = (bf16*)(smem_raw + LY::K);
  bf16* sV = (bf16*)(smem_raw + LY::V);
  bf16* sWq = (bf16*)(smem_raw + LY::WQ);
  bf16* sWk = (bf16*)(smem_raw + LY::WK);
  bf16* sPhi = (bf16*)(smem_raw + LY::PHI);
  float* sS = (float*)(smem_raw + LY::S);
  float* sZ = (float*)(smem_raw + LY::Z);
  bf16* sSK = (bf16*)(smem_raw + LY::SK);
  bf16* sSV = (bf16*)(smem_raw + LY::SV);

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* qb = a.q + row_index(s, b, 0, h) * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  auto rows_in = [&](int c) { return min(CHUNK, s.T - c * CHUNK); };
  const bool sliding = s.geometry == HYBRID_SLIDING;

  load_rows_async<64>(sWq, TL::LDW, a.Wq + (size_t)h * D * 64, 64, D, D);
  load_rows_async<64>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  if (s.sinks > 0) {
    load_rows_async<D>(sSK, LDT, kb, kstride, 16, s.sinks);
    load_rows_async<D>(sSV, LDT, vb, kstride, 16, s.sinks);
  }
  if (c_begin >= 1) {
    const int c = c_begin - 1;
    load_rows_async<D>(sK + (c & 1) * TL::TILE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    load_rows_async<D>(sV + (c & 1) * TL::TILE, LDT, vb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
  }
  load_rows_async<D>(sK + (c_begin & 1) * TL::TILE, LDT, kb + (size_t)c_begin * CHUNK * kstride, kstride, 64, rows_in(c_begin));
  load_rows_async<D>(sV + (c_begin & 1) * TL::TILE, LDT, vb + (size_t)c_begin * CHUNK * kstride, kstride, 64, rows_in(c_begin));
  load_rows_async<D>(sQ, LDT, qb + (size_t)c_begin * CHUNK * qstride, qstride, 64, rows_in(c_begin));
  cp_async_commit();
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    for (int idx = tid; idx < NF * D; idx += 128) {
      const int f = idx / D, col = idx % D;
      sS[f * LDS + col] = seg > 0 ? a.segS[(base + f) * D + col] : 0.0f;
    }
    sZ[tid] = seg > 0 ? a.segZ[base + tid] : 0.0f;
  }
  cp_async_wait<0>();
  __syncthreads();

  for (int c = c_begin; c < c_end; c++) {
    const int cur = c & 1, prv = cur ^ 1;
    const bf16* Kc = sK + cur * TL::TILE;
    const bf16* Kp = sK + prv * TL::TILE;
    const bf16* Vc = sV + cur * TL::TILE;
    const bf16* Vp = sV + prv * TL::TILE;
    const bool has_prev = c >= 1;
    const int row0 = warp * 16, i0 = c * CHUNK + row0;
    cp_async_wait<1>();  // q_c and K_c are in
    __syncthreads();

    float inv[2], delta[2], m[2];
    int arg[2];
    bool valid[2];
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      const int i = i0 + g + 8 * r;
      valid[r] = i < s.T;
      const size_t ri = row_index(s, b, valid[r] ? i : 0, h);
      inv[r] = valid[r] ? 1.0f / a.sv.row_den[ri] : 0.0f;
      delta[r] = valid[r] ? a.sv.row_delta[ri] : 0.0f;
      m[r] = valid[r] ? a.sv.row_max[ri] : 0.0f;
      arg[r] = valid[r] ? a.sv.row_argmax[ri] : 0;
    }
    // phi_q (f16 A fragments; phi_q / den also goes out for the key side), then phi_k of chunk c-1.
    uint32_t phq[8][4];
    {
      uint32_t qf[KT][4];
      #pragma unroll
      for (int kt = 0; kt < KT; kt++) frag_a(qf[kt], sQ, LDT, row0, kt * 16);
      float ph[16][4];
      feature_map_regs<D>(ph, qf, sWq);
      pack_phi_a<true>(phq, ph);
      #pragma unroll
      for (int r = 0; r < 2; r++)
        if (valid[r]) {
          uint32_t* dst = (uint32_t*)(a.phiq_out + row_index(s, b, i0 + g + 8 * r, h) * NF);
          #pragma unroll
          for (int j = 0; j < 16; j++) dst[4 * j + t] = pack_bf16(ph[j][2 * r] * inv[r], ph[j][2 * r + 1] * inv[r]);
        }
      if (has_prev) {
        feature_map_smem<D>(ph, Kp, row0, sWk);
        const int j0 = (c - 1) * CHUNK + row0;
        store_phi<false>(sPhi, TL::LDP, row0, ph, j0 + g >= s.sinks, j0 + g + 8 >= s.sinks);
      }
    }
    uint32_t dyf[KT][4];
    frag_a_global<D>(dyf, a.dy + row_index(s, b, c * CHUNK, h) * D, qstride, row0, rows_in(c));
    __syncthreads();  // sPhi complete

    // dphi_q = (dy S^T) / den - delta z over chunks <= c-2, plus (sliding) the linear keys of chunk c-1.
    float dphi[16][4] = {};
    if (c >= 2) {
      mul_x_state_t<D, LDS>(dphi, dyf, sS);
      #pragma unroll
      for (int j = 0; j < 16; j++)
        #pragma unroll
        for (int e = 0; e < 4; e++) dphi[j][e] = dphi[j][e] * inv[e >> 1] - delta[e >> 1] * sZ[8 * j + 2 * t + (e & 1)];
    }
    if (sliding && has_prev) {
      float dp[8][4];
      mul_x_keys<D>(dp, dyf, Vp);
      const int key0 = (c - 1) * CHUNK;
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          const int kl = 8 * nt + 2 * t + (e & 1), rl = row0 + g + 8 * (e >> 1);
          dp[nt][e] = (kl <= rl && key0 + kl >= s.sinks) ? dp[nt][e] * inv[e >> 1] - delta[e >> 1] : 0.0f;
        }
      uint32_t da[4][4];
      pack_c_to_a<false, 8>(da, dp);
      #pragma unroll
      for (int kk = 0; kk < 4; kk++)
        #pragma unroll
        for (int np = 0; np < 8; np++) {
          uint32_t bb[4];
          frag_b_kn(bb, sPhi, TL::LDP, 16 * kk, 16 * np);
          mma_bf16(dphi[2 * np], da[kk], bb[0], bb[1]);
          mma_bf16(dphi[2 * np + 1], da[kk], bb[2], bb[3]);
        }
    }
    float dqa[NT][4] = {};
    {
      float du[8][4];
      phi_backward<true>(du, phq, dphi);
      #pragma unroll
      for (int r = 0; r < 2; r++)
        if (valid[r]) {
          uint32_t* dst = (uint32_t*)(a.du_q + row_index(s, b, i0 + g + 8 * r, h) * 64);
          #pragma unroll
          for (int j = 0; j < 8; j++) dst[4 * j + t] = pack_bf16(du[j][2 * r], du[j][2 * r + 1]);
        }
      if (a.dq) {  // dq += du Wq^T
        uint32_t ua[4][4];
        pack_c_to_a<false, 8>(ua, du);
        #pragma unroll
        for (int kk = 0; kk < 4; kk++)
          #pragma unroll
          for (int np = 0; np < NT / 2; np++) {
            uint32_t bb[4];
            frag_b_nk(bb, sWq, TL::LDW, 16 * np, 16 * kk);
            mma_bf16(dqa[2 * np], ua[kk], bb[0], bb[1]);
            mma_bf16(dqa[2 * np + 1], ua[kk], bb[2], bb[3]);
          }
      }
    }

    // Window part: ds over the softmax keys; its row sum is -dL/dm (the max), and feeds dw.
    if (a.want_window) {
      cp_async_wait<0>();  // V_c
      __syncthreads();
      float rowsum[2] = {0.0f, 0.0f};
      const bool want_dq = a.dq != nullptr;
      const WinRows wr = win_rows(m, inv, delta, gamma);
      if (s.sinks > 0 && c >= 2)
        window_grad_tile<D, 16>(dqa, rowsum, sQ, row0, dyf, sSK, sSV, wr, s.scale, want_dq,
                            [&](int kl, int) { return kl < s.sinks; });
      if (has_prev) {
        const int key0 = (c - 1) * CHUNK;
        window_grad_tile<D, 64>(dqa, rowsum, sQ, row0, dyf, Kp, Vp, wr, s.scale, want_dq,
                            [&](int kl, int rl) { return !sliding || kl > rl || key0 + kl < s.sinks; });
      }
      window_grad_tile<D, 64>(dqa, rowsum, sQ, row0, dyf, Kc, Vc, wr, s.scale, want_dq,
                          [&](int kl, int rl) { return kl <= rl; }, warp + 1);
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        rowsum[r] = quad_sum(rowsum[r]);
        const int i = i0 + g + 8 * r;
        if (!valid[r]) continue;
        const size_t ri = row_index(s, b, i, h);
        if (t == 0) {
          a.dm[ri] = -rowsum[r];
          a.sv.row_wgrad[ri] = rowsum[r];
        }
        if (want_dq) {  // the max moved s_{i, j*}: dq_i += dm_i k_{j*} / sqrt(d)
          const uint32_t* kr = (const uint32_t*)(a.k + kv_index(s, b, arg[r], hk) * D);
          const float f = -rowsum[r] * s.scale;
          #pragma unroll
          for (int nt = 0; nt < NT; nt++) {
            const uint32_t kv2 = kr[4 * nt + t];
            dqa[nt][2 * r] += f * bf16_lo(kv2);
            dqa[nt][2 * r + 1] += f * bf16_hi(kv2);
          }
        }
      }
    }
    if (a.dq)
      #pragma unroll
      for (int r = 0; r < 2; r++)
        if (valid[r]) {
          uint32_t* dst = (uint32_t*)(a.dq + row_index(s, b, i0 + g + 8 * r, h) * D);
          #pragma unroll
          for (int nt = 0; nt < NT; nt++) dst[4 * nt + t] = pack_bf16(dqa[nt][2 * r], dqa[nt][2 * r + 1]);
        }

    __syncthreads();  // sQ, K_{c-1} and the state reads are done
    if (c + 1 < c_end) {
      load_rows_async<D>(sQ, LDT, qb + (size_t)(c + 1) * CHUNK * qstride, qstride, 64, rows_in(c + 1));
      load_rows_async<D>(sK + prv * TL::TILE, LDT, kb + (size_t)(c + 1) * CHUNK * kstride, kstride, 64, rows_in(c + 1));
    }
    cp_async_commit();
    if (has_prev) {
      state_update<D, LDS, false>(sS, sPhi, Vp);
      column_sum_update<false>(sZ, sPhi, TL::LDP, nullptr);
    }
    __syncthreads();
    if (c + 1 < c_end)
      load_rows_async<D>(sV + prv * TL::TILE, LDT, vb + (size_t)(c + 1) * CHUNK * kstride, kstride, 64, rows_in(c + 1));
    cp_async_commit();
  }
  cp_async_wait<0>();
}

// Key side: walks the segment's key chunks backwards with R = sum over query chunks >= c+2 of
// (phi_q / den)^T dy and r = sum phi_q delta. For key chunk c: dphi_k = v R^T - r (+ the linear keys seen
// by query chunk c+1, sliding), dv += phi_k R (+ sliding), then du_k, dk = du_k Wk^T, and R takes chunk c+1.
template <int D>
struct BwdKLayout {
  using TL = Tiles<D>;
  static constexpr int LDS = D + 8;
  static constexpr size_t K = 0, V = K + 2 * TL::TILE * 2, PQ = V + 2 * TL::TILE * 2, DY = PQ + 2 * TL::PT * 2,
                          WK = DY + 2 * TL::TILE * 2, R = WK + TL::WT * 2, RV = R + NF * LDS * 4, DD = RV + NF * 4,
                          BYTES = DD + 2 * 64 * 4;
};
template <int D>
static __global__ void __launch_bounds__(128, 1) fast_backward_key_kernel(FastBwdArgs a) {
  using TL = Tiles<D>;
  using LY = BwdKLayout<D>;
  constexpr int LDT = TL::LDT, LDS = LY::LDS, NT = TL::NT;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = (bf16*)(smem_raw + LY::K);
  bf16* sV = (bf16*)(smem_raw + LY::V);
  bf16* sPQ = (bf16*)(smem_raw + LY::PQ);
  bf16* sDY = (bf16*)(smem_raw + LY::DY);
  bf16* sWk = (bf16*)(smem_raw + LY::WK);
  float* sR = (float*)(smem_raw + LY::R);
  float* sRv = (float*)(smem_raw + LY::RV);
  float* sDD = (float*)(smem_raw + LY::DD);  // [2][64] delta * den of the query rows of chunk c+1

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  const bf16* dyb = a.dy + row_index(s, b, 0, h) * D;
  const bf16* pqb = a.phiq_in + row_index(s, b, 0, h) * NF;
  auto rows_in = [&](int c) { return max(0, min(CHUNK, s.T - c * CHUNK)); };
  const bool sliding = s.geometry == HYBRID_SLIDING;
  // Tiles of iteration c: K_c, V_c, and phi_q / den, dy, delta * den of query chunk c+1 (if any).
  auto load_iter = [&](int c) {
    const int sl = c & 1;
    load_rows_async<D>(sK + sl * TL::TILE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    load_rows_async<D>(sV + sl * TL::TILE, LDT, vb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    const int qc = c + 1, nq = qc < s.NC ? rows_in(qc) : 0;
    const size_t q0 = nq > 0 ? (size_t)qc * CHUNK : 0;  // no query chunk: all zeros, from a valid address
    load_rows_async<NF>(sPQ + sl * TL::PT, TL::LDP, pqb + q0 * s.H * NF, (size_t)s.H * NF, 64, nq);
    load_rows_async<D>(sDY + sl * TL::TILE, LDT, dyb + q0 * qstride, qstride, 64, nq);
    if (tid < 64) {
      const bool ok = tid < nq;
      const size_t ri = row_index(s, b, ok ? qc * CHUNK + tid : 0, h);
      sDD[sl * 64 + tid] = ok ? a.sv.row_delta[ri] * a.sv.row_den[ri] : 0.0f;
    }
  };
  load_rows_async<64>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  load_iter(c_end - 1);
  cp_async_commit();
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    const bool last = seg == (int)gridDim.x - 1;
    for (int idx = tid; idx < NF * D; idx += 128) {
      const int f = idx / D, col = idx % D;
      sR[f * LDS + col] = last ? 0.0f : a.segR[(base + f) * D + col];
    }
    sRv[tid] = last ? 0.0f : a.segRz[base + tid];
  }

  for (int c = c_end - 1; c >= c_begin; c--) {
    const int sl = c & 1;
    const bf16* Kc = sK + sl * TL::TILE;
    const bf16* Vc = sV + sl * TL::TILE;
    const bf16* PQc = sPQ + sl * TL::PT;
    const bf16* DYc = sDY + sl * TL::TILE;
    const float* dd = sDD + sl * 64;
    const int row0 = warp * 16, j0 = c * CHUNK + row0;
    const bool has_q = c + 1 < s.NC, has_state = c + 2 < s.NC;
    cp_async_wait<0>();
    __syncthreads();
    if (c - 1 >= c_begin) load_iter(c - 1);
    cp_async_commit();

    const bool keep0 = j0 + g >= s.sinks && j0 + g < s.T, keep1 = j0 + g + 8 >= s.sinks && j0 + g + 8 < s.T;
    uint32_t pk[8][4];
    {
      float ph[16][4];
      feature_map_smem<D>(ph, Kc, row0, sWk);
      #pragma unroll
      for (int j = 0; j < 16; j++) {
        if (!keep0) ph[j][0] = ph[j][1] = 0.0f;
        if (!keep1) ph[j][2] = ph[j][3] = 0.0f;
      }
      pack_phi_a<false>(pk, ph);
    }
    float dphi[16][4] = {};
    if (has_state) {
      mul_x_state_t_smem<D, LDS>(dphi, Vc, row0, sR);
      #pragma unroll
      for (int j = 0; j < 16; j++)
        #pragma unroll
        for (int e = 0; e < 4; e++) dphi[j][e] -= sRv[8 * j + 2 * t + (e & 1)];
    }
    uint32_t bsa[4][4] = {};  // (sliding) the linear weights B^T (keys x queries of chunk c+1), for dv
    if (sliding && has_q) {
      // linear iff i - j = 64 + ql - kl >= w, i.e. kl <= ql (sinks and rows past T have phi_k = 0)
      {
        float dpt[8][4];
        mul_x_keys_smem<D>(dpt, Vc, row0, DYc);  // dP^T = V dy^T
        #pragma unroll
        for (int nt = 0; nt < 8; nt++)
          #pragma unroll
          for (int e = 0; e < 4; e++) {
            const int kl = row0 + g + 8 * (e >> 1), ql = 8 * nt + 2 * t + (e & 1);
            dpt[nt][e] = kl <= ql ? dpt[nt][e] - dd[ql] : 0.0f;  // (g.v - delta) * den
          }
        uint32_t da[4][4];
        pack_c_to_a<false, 8>(da, dpt);
        #pragma unroll
        for (int kk = 0; kk < 4; kk++)
          #pragma unroll
          for (int np = 0; np < 8; np++) {
            uint32_t bb[4];
            frag_b_kn(bb, PQc, TL::LDP, 16 * kk, 16 * np);
            mma_bf16(dphi[2 * np], da[kk], bb[0], bb[1]);
            mma_bf16(dphi[2 * np + 1], da[kk], bb[2], bb[3]);
          }
      }
      if (a.want_input_grads) {
        float bst[8][4] = {};  // phi_k . phi_q / den
        #pragma unroll
        for (int k = 0; k < 8; k++)
          #pragma unroll
          for (int np = 0; np < 4; np++) {
            uint32_t bb[4];
            frag_b_nk(bb, PQc, TL::LDP, 16 * np, 16 * k);
            mma_bf16(bst[2 * np], pk[k], bb[0], bb[1]);
            mma_bf16(bst[2 * np + 1], pk[k], bb[2], bb[3]);
          }
        #pragma unroll
        for (int nt = 0; nt < 8; nt++)
          #pragma unroll
          for (int e = 0; e < 4; e++)
            if (row0 + g + 8 * (e >> 1) > 8 * nt + 2 * t + (e & 1)) bst[nt][e] = 0.0f;
        pack_c_to_a<false, 8>(bsa, bst);
      }
    }
    {
      float du[8][4];
      phi_backward<false>(du, pk, dphi);
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int j = j0 + g + 8 * r;
        if (j >= s.T) continue;
        uint32_t* dst = (uint32_t*)(a.du_k + row_index(s, b, j, h) * 64);
        #pragma unroll
        for (int jj = 0; jj < 8; jj++) dst[4 * jj + t] = pack_bf16(du[jj][2 * r], du[jj][2 * r + 1]);
      }
      if (a.want_input_grads) {
        uint32_t ua[4][4];
        pack_c_to_a<false, 8>(ua, du);
        {
          float dv[NT][4] = {};
          if (has_state) mul_feat_state<D, LDS, false>(dv, pk, sR);
          if (sliding && has_q) mul_a_tile<D, false>(dv, bsa, DYc);
          #pragma unroll
          for (int r = 0; r < 2; r++) {
            const int j = j0 + g + 8 * r;
            if (j >= s.T) continue;
            float* dst = a.dv_acc + kv_index(s, b, j, hk) * D;
            #pragma unroll
            for (int nt = 0; nt < NT; nt++) {
              atomicAdd(&dst[8 * nt + 2 * t], dv[nt][2 * r]);
              atomicAdd(&dst[8 * nt + 2 * t + 1], dv[nt][2 * r + 1]);
            }
          }
        }
        float dka[NT][4] = {};
        #pragma unroll
        for (int kk = 0; kk < 4; kk++)
          #pragma unroll
          for (int np = 0; np < NT / 2; np++) {
            uint32_t bb[4];
            frag_b_nk(bb, sWk, TL::LDW, 16 * np, 16 * kk);
            mma_bf16(dka[2 * np], ua[kk], bb[0], bb[1]);
            mma_bf16(dka[2 * np + 1], ua[kk], bb[2], bb[3]);
          }
        #pragma unroll
        for (int r = 0; r < 2; r++) {
          const int j = j0 + g + 8 * r;
          if (j >= s.T) continue;
          float* dst = a.dk_acc + kv_index(s, b, j, hk) * D;
          #pragma unroll
          for (int nt = 0; nt < NT; nt++) {
            atomicAdd(&dst[8 * nt + 2 * t], dka[nt][2 * r]);
            atomicAdd(&dst[8 * nt + 2 * t + 1], dka[nt][2 * r + 1]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done reading R
    if (has_q) {
      state_update<D, LDS, false>(sR, PQc, DYc);
      column_sum_update<false>(sRv, PQc, TL::LDP, dd);
    }
  }
  cp_async_wait<0>();
}

// dst rows [j0, j0+16) of (B, T, Hkv, D) fp32 += a warp's C-layout accumulator (16 x 8 NT): one 16-byte
// atomic a lane per n-tile (lane pairs swap halves so that each holds 4 consecutive columns of one row).
// The fp32 reductions over GQA heads are bound by the number of atomic operations, not their bytes.
template <int NT>
__device__ __forceinline__ void add_c_tile_atomic(float* dst, const float (&acc)[NT][4], const Shape& s, int b, int hk, int j0, int D) {
  const int l = lane_id(), g = l >> 2, t = l & 3, odd = t & 1;
  const int row = j0 + g + 8 * odd;  // even t: row g, odd t: row g + 8
  float* p = dst + kv_index(s, b, row < s.T ? row : 0, hk) * D + 2 * (t & 2);
  #pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    // even t keeps its row-g pair and receives the partner's; odd t keeps its row-(g+8) pair
    const float s0 = odd ? acc[nt][0] : acc[nt][2], s1 = odd ? acc[nt][1] : acc[nt][3];
    const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    const float4 v = odd ? make_float4(r0, r1, acc[nt][2], acc[nt][3]) : make_float4(acc[nt][0], acc[nt][1], r0, r1);
    if (row < s.T) atomicAdd((float4*)(p + 8 * nt), v);
  }
}

// Window part of dk, dv (full backward): one block per (key chunk, h, b), no state. Key chunk c is a softmax
// key of query chunk c (causally) and c+1 (all of it for terrace; keys less than w behind for sliding).
// ds^T = A^T (g.v - delta) + [j = arg max_i] dm_i; dk += ds^T q / sqrt(d), dv += A^T g.
// The window kernels' shared pieces (fast_window_kv_kernel, fast_window_kv_v3_kernel).
// Row statistics of a query chunk as they read them (WST floats): per query PAIR (2p, 2p + 1) three 16-byte
// words [m'0 m'1 inv0 inv1 | is0 is1 dl0 dl1 | dm0 dm1 arg0 arg1], with m' = m log2(e) - log2(gamma) (+inf
// past T, so A = 0 there), inv = 1/den (0 past T), is = inv / sqrt(d), dl = delta / sqrt(d), dm = dm_i / sqrt(d)
// and arg the arg max (int bits): a thread's n-tile needs its two queries' statistics, three vector loads
// (one word a statistic and query was ~80 shared loads a tile, and a third of the dk/dv kernel's stalls).
constexpr int WST = 32 * 12;
__device__ __forceinline__ int wst_at(int q, int field) { return (q >> 1) * 12 + 2 * field + (q & 1); }
// Turns query q's raw statistics (m, den, delta, dm at their fields 0, 1, 3, 4; den = 0 past T) into the
// above, for the head with window logit wlogit.
__device__ __forceinline__ void wst_finish(float* st, int q, float wlogit, float scale) {
  const float den = st[wst_at(q, 1)];
  const bool ok = den != 0.0f;
  const float inv = ok ? 1.0f / den : 0.0f;
  st[wst_at(q, 0)] = ok ? st[wst_at(q, 0)] * LOG2E - log2f(sigmoidf_(wlogit)) : INFINITY;
  st[wst_at(q, 1)] = inv;
  st[wst_at(q, 2)] = inv * scale;
  st[wst_at(q, 3)] *= scale;
  st[wst_at(q, 4)] *= scale;
}
// Queries of chunks c and c+1 (nq_chunks of them) of head h: their q and dy tiles (cp.async, not committed)
// and row statistics [u][WST] (plain loads).
template <int D>
__device__ __forceinline__ void load_window_queries(const FastBwdArgs& a, int b, int c, int h, int nq_chunks, bf16* sQ,
                                                    bf16* sDY, float* sSt, int tid) {
  using TL = Tiles<D>;
  const Shape& s = a.s;
  const size_t qstride = (size_t)s.H * D;
  for (int u = 0; u < nq_chunks; u++) {
    const int qc = c + u, rows = max(0, min(CHUNK, s.T - qc * CHUNK));
    load_rows_async<D>(sQ + u * TL::TILE, TL::LDT, a.q + row_index(s, b, qc * CHUNK, h) * D, qstride, 64, rows);
    load_rows_async<D>(sDY + u * TL::TILE, TL::LDT, a.dy + row_index(s, b, qc * CHUNK, h) * D, qstride, 64, rows);
    if (tid < 64) {
      const int i = qc * CHUNK + tid;
      const bool ok = i < s.T;
      const size_t ri = row_index(s, b, ok ? i : 0, h);
      float* st = sSt + u * WST;
      st[wst_at(tid, 0)] = ok ? a.sv.row_max[ri] : 0.0f;
      st[wst_at(tid, 1)] = ok ? a.sv.row_den[ri] : 0.0f;
      st[wst_at(tid, 3)] = ok ? a.sv.row_delta[ri] : 0.0f;
      st[wst_at(tid, 4)] = ok ? a.dm[ri] : 0.0f;
      st[wst_at(tid, 5)] = __int_as_float(ok ? a.sv.row_argmax[ri] : -1);
      wst_finish(st, tid, a.wlogit[h], s.scale);
    }
  }
}

// One head's window part of dk, dv for the warp's key rows [row0, +16) (global j0 = first of them) of key
// chunk c (K, V tiles in sK, sV) against the queries loaded by load_window_queries:
//   dv += A^T (dy / den),  dk += ds^T q / sqrt(d)  with ds = A (dP / den - delta) (+ dm at the arg max).
// window_kv_chunk: one query chunk (u = 0: chunk c, the causal tile; u = 1: chunk c+1), its tiles Q, DY and
// statistics st [WST]. Key rows past T come out as garbage that nothing writes (each key row's dk, dv depend
// on that row alone), so only the geometry masks A; a query past T has m' = +inf and so A = 0.
// The elementwise middle of a window dk/dv tile (a warp's key rows [row0, +16) against a query chunk: u = 0
// the causal tile, u = 1 the next chunk), in the C layout of both MMA kinds, an n-tile (8 queries) at a time
// and in two steps: s^T (sc) becomes A^T (window_kv_probs); then dP^T (dpt) becomes ds^T / sqrt(d) =
// A (dP / den - delta) / sqrt(d) (+ dm at the arg max) and A^T becomes A^T / den (window_kv_ds). The wgmma
// kernel forms every tile's probabilities while dP^T is still being formed; the mma.sync kernel takes both
// steps an n-tile at a time (all probabilities first made it spill).
// The statistics of the thread's two queries of n-tile nt (8 nt + 2 t, +1): three 16-byte words (see WST).
struct WinPair {
  float4 w0, w1, w2;
};
__device__ __forceinline__ WinPair win_pair(const float* st, int nt, int t) {
  const float* w = st + (4 * nt + t) * 12;
  return {*(const float4*)w, *(const float4*)(w + 4), *(const float4*)(w + 8)};
}
// mp2: m' of the two queries (the first two floats of their statistics)
__device__ __forceinline__ void window_kv_probs(float (&sc)[4], float2 mp2, int nt, int u, int row0, int g, int t,
                                                bool sliding, const Shape& s, int j0) {
  const float c1 = s.scale * LOG2E;
  #pragma unroll
  for (int e = 0; e < 4; e++) {
    const int o = e & 1, kl = row0 + g + 8 * (e >> 1), ql = 8 * nt + 2 * t + o, j = j0 + g + 8 * (e >> 1);
    const bool win = u == 0 ? kl <= ql : !sliding || ql < kl || j < s.sinks;
    sc[e] = win ? ex2_approx(sc[e] * c1 - (o ? mp2.y : mp2.x)) : 0.0f;  // gamma is in m'
  }
}
__device__ __forceinline__ void window_kv_ds(float (&sc)[4], float (&dpt)[4], const WinPair& wp, int g, int j0) {
  const float4 &w0 = wp.w0, &w1 = wp.w1, &w2 = wp.w2;
  #pragma unroll
  for (int e = 0; e < 4; e++) {
    const int o = e & 1, j = j0 + g + 8 * (e >> 1);
    const float A = sc[e], inv = o ? w0.w : w0.z, is = o ? w1.y : w1.x, dl = o ? w1.w : w1.z;
    const float dm = o ? w2.y : w2.x;
    const int arg = __float_as_int(o ? w2.w : w2.z);
    // the arg max is a softmax key of its query, so j = arg implies the window
    dpt[e] = A * (dpt[e] * is - dl) + (arg == j ? dm : 0.0f);  // ds / sqrt(d)
    sc[e] = A * inv;                                             // A^T / den: dv = sum_i A_ij dy_i / den_i
  }
}
template <int D>
__device__ __forceinline__ void window_kv_chunk(float (&dv)[Tiles<D>::NT][4], float (&dk)[Tiles<D>::NT][4],
                                                const bf16* sK, const bf16* sV, const bf16* Q, const bf16* DY,
                                                const float* st, int u, int warp, int g, int t, bool sliding,
                                                const Shape& s, int j0) {
  const int row0 = warp * 16;
  {
    uint32_t ap[4][4], dsp[4][4];
    const int qb_lo = u == 0 ? warp : 0;  // causal tile: key rows [16 w, +16) are seen by queries >= 16 w only
    {
      float sc[8][4], dpt[8][4];
      mul_x_keys_smem<D>(sc, sK, row0, Q, qb_lo);    // s^T = K q^T (keys x queries)
      mul_x_keys_smem<D>(dpt, sV, row0, DY, qb_lo);  // dP^T = V dy^T
      #pragma unroll
      for (int nt = 0; nt < 8; nt++) {
        const WinPair wp = win_pair(st, nt, t);
        window_kv_probs(sc[nt], make_float2(wp.w0.x, wp.w0.y), nt, u, row0, g, t, sliding, s, j0);
        window_kv_ds(sc[nt], dpt[nt], wp, g, j0);
      }
      pack_c_to_a<false, 8>(ap, sc);
      pack_c_to_a<false, 8>(dsp, dpt);
    }
    mul_a_tile<D, false>(dv, ap, DY, qb_lo);
    mul_a_tile<D, false>(dk, dsp, Q, qb_lo);
  }
}
template <int D>
__device__ __forceinline__ void window_kv_accumulate(float (&dv)[Tiles<D>::NT][4], float (&dk)[Tiles<D>::NT][4],
                                                     const bf16* sK, const bf16* sV, const bf16* sQ, const bf16* sDY,
                                                     const float* sSt, int nq_chunks, int warp, int g, int t,
                                                     bool sliding, const Shape& s, int j0) {
  for (int u = 0; u < nq_chunks; u++)
    window_kv_chunk<D>(dv, dk, sK, sV, sQ + u * Tiles<D>::TILE, sDY + u * Tiles<D>::TILE, sSt + u * WST, u, warp, g, t,
                       sliding, s, j0);
}

template <int D>
struct WinLayout {
  using TL = Tiles<D>;
  static constexpr size_t K = 0, V = K + TL::TILE * 2, Q = V + TL::TILE * 2, DY = Q + 2 * TL::TILE * 2,
                          ST = DY + 2 * TL::TILE * 2, BYTES = ST + 2 * WST * 4;
};
template <int D>
static __global__ void __launch_bounds__(128, 2) fast_window_kv_kernel(FastBwdArgs a) {  // 2 blocks per SM
  using TL = Tiles<D>;
  using LY = WinLayout<D>;
  constexpr int LDT = TL::LDT, NT = TL::NT;
  const Shape& s = a.s;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = (bf16*)(smem_raw + LY::K);
  bf16* sV = (bf16*)(smem_raw + LY::V);
  bf16* sQ = (bf16*)(smem_raw + LY::Q);
  bf16* sDY = (bf16*)(smem_raw + LY::DY);
  float* sSt = (float*)(smem_raw + LY::ST);  // [2 query chunks][WST]
  const size_t kstride = (size_t)s.Hkv * D;
  auto rows_in = [&](int cc) { return max(0, min(CHUNK, s.T - cc * CHUNK)); };
  const bool sliding = s.geometry == HYBRID_SLIDING;
  const int nq_chunks = c + 1 < s.NC ? 2 : 1;
  load_rows_async<D>(sK, LDT, a.k + kv_index(s, b, c * CHUNK, hk) * D, kstride, 64, rows_in(c));
  load_rows_async<D>(sV, LDT, a.v + kv_index(s, b, c * CHUNK, hk) * D, kstride, 64, rows_in(c));
  load_window_queries<D>(a, b, c, h, nq_chunks, sQ, sDY, sSt, tid);
  cp_async_commit();
  const int row0 = warp * 16, j0 = c * CHUNK + row0;
  float dv[NT][4] = {}, dk[NT][4] = {};
  cp_async_wait<0>();
  __syncthreads();
  window_kv_accumulate<D>(dv, dk, sK, sV, sQ, sDY, sSt, nq_chunks, warp, g, t, sliding, s, j0);
  add_c_tile_atomic<NT>(a.dv_acc, dv, s, b, hk, j0, D);
  add_c_tile_atomic<NT>(a.dk_acc, dk, s, b, hk, j0, D);
}

// dW_h (d x 64) partial sums over row splits: part[z][split][h] = sum x^T du over the split's rows of
// B*T (z = 0: queries, du_q; z = 1: keys of head h's kv head, du_k). Tensor cores; fixed order.
struct WeightGradArgs {
  float* part;
  const bf16 *q, *k, *du_q, *du_k;
  Shape s;
  int rows_per_split;
};
template <int D>
struct WgLayout {
  using TL = Tiles<D>;
  static constexpr size_t X = 0, DU = X + 2 * TL::TILE * 2, BYTES = DU + 2 * 64 * TL::LDW * 2;
};
template <int D>
static __global__ void __launch_bounds__(128) weight_grad_kernel(WeightGradArgs a) {
  using TL = Tiles<D>;
  using LY = WgLayout<D>;
  constexpr int MT = D / 64;  // 16-row m-tiles per warp (warp w owns d rows [w D/4, (w+1) D/4))
  const Shape& s = a.s;
  const int split = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sX = (bf16*)(smem_raw + LY::X);
  bf16* sDU = (bf16*)(smem_raw + LY::DU);
  const int Hx = z == 0 ? s.H : s.Hkv, hx = z == 0 ? h : h / s.group;
  const bf16* x = (z == 0 ? a.q : a.k) + (size_t)hx * D;
  const bf16* du = (z == 0 ? a.du_q : a.du_k) + (size_t)h * 64;
  const long long BT = (long long)s.B * s.T;
  const long long r_begin = (long long)split * a.rows_per_split, r_end = min(BT, r_begin + a.rows_per_split);
  const int ntiles = r_end > r_begin ? (int)((r_end - r_begin + 63) / 64) : 0;
  auto load = [&](int it) {
    const long long r0 = r_begin + 64LL * it;
    const int nval = (int)min(64LL, r_end - r0);
    load_rows_async<D>(sX + (it & 1) * TL::TILE, TL::LDT, x + r0 * Hx * D, (size_t)Hx * D, 64, nval);
    load_rows_async<64>(sDU + (it & 1) * 64 * TL::LDW, TL::LDW, du + r0 * s.H * 64, (size_t)s.H * 64, 64, nval);
  };
  float acc[MT][8][4] = {};
  if (ntiles > 0) load(0);
  cp_async_commit();
  for (int it = 0; it < ntiles; it++) {
    if (it + 1 < ntiles) load(it + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const bf16* X = sX + (it & 1) * TL::TILE;
    const bf16* U = sDU + (it & 1) * 64 * TL::LDW;
    #pragma unroll
    for (int kk = 0; kk < 4; kk++)
      #pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        uint32_t xa[4];
        frag_a_t(xa, X, TL::LDT, warp * (D / 4) + 16 * mt, 16 * kk);
        #pragma unroll
        for (int np = 0; np < 4; np++) {
          uint32_t bb[4];
          frag_b_kn(bb, U, TL::LDW, 16 * kk, 16 * np);
          mma_bf16(acc[mt][2 * np], xa, bb[0], bb[1]);
          mma_bf16(acc[mt][2 * np + 1], xa, bb[2], bb[3]);
        }
      }
    __syncthreads();
  }
  cp_async_wait<0>();
  float* out = a.part + (((size_t)z * gridDim.x + split) * s.H + h) * D * 64;
  #pragma unroll
  for (int mt = 0; mt < MT; mt++)
    #pragma unroll
    for (int nt = 0; nt < 8; nt++) {
      const int r = warp * (D / 4) + 16 * mt + g, col = 8 * nt + 2 * t;
      out[r * 64 + col] = acc[mt][nt][0];
      out[r * 64 + col + 1] = acc[mt][nt][1];
      out[(r + 8) * 64 + col] = acc[mt][nt][2];
      out[(r + 8) * 64 + col + 1] = acc[mt][nt][3];
    }
}
// dWq += sum of the query partials, dWk += the key partials (fixed order).
static __global__ void weight_grad_reduce_kernel(float* __restrict__ dWq, float* __restrict__ dWk, const float* __restrict__ part,
                                          size_t n, int splits) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 2 * n) return;
  const int z = (int)(i / n);
  const size_t e = i % n;
  float acc = 0.0f;
  for (int sp = 0; sp < splits; sp++) acc += part[((size_t)z * splits + sp) * n + e];
  (z == 0 ? dWq : dWk)[e] += acc;
}

// ================================================================================================
// Fast path, version 3 (d = 128, f = 64): 8 warps per block, the fp32 linear state in REGISTERS.
// ================================================================================================
// Why: version 2 keeps the 128 x d state in shared memory, which with the K/V tiles fills an SM with one
// block of 4 warps; every chunk is then a long dependent chain with nothing to hide its latency. Here each
// of 8 warps owns 16 rows of the state as mma accumulators (16 x 128 fp32 = 64 registers a thread), so the
// state update is a plain mma chain into those registers, and the state is used as an operand straight
// from them: the C fragments of two adjacent n-tiles hold exactly a 16-bit A fragment of one 16-wide k-step,
// so the state enters f16 or bf16 mma after a conversion in registers (state_times_tile_t; until 2026-11-29
// it was tf32, with the k index permuted to match the C layout). The state's products therefore come out
// transposed (state rows x 64 chunk rows) and go through a shared fp32 tile to the warps that own the chunk
// rows. Everything else in a chunk (feature maps,
// softmax window, output, feature-map backward) is split over the 8 warps. The full backward's dq, dk, dv
// come from separate kernels (the header comment: "Full backward, version 3").
constexpr int V3_THREADS = 256;
constexpr int V3_LDN = 128 + 4;  // row stride (floats) of a 64 x 128 fp32 tile: conflict-free for the
                                 // transposed scalar stores (rows 2t, cols g) and the float2 row reads

// A chunk's 64 rows of 128 16-bit values, shared (row stride ld) -> global (row r at dst + r * stride), rows
// at positions pos0 + r >= T skipped. Thread tid copies the 16-byte column piece tid % 16 of rows tid / 16 + 16 k,
// so its addresses are a base and a constant step (index arithmetic a step cost the forward ~4 %).
__device__ __forceinline__ void store_rows_v3(unsigned short* dst, size_t stride, const unsigned short* src, int ld, int pos0, int T) {
  static_assert(V3_THREADS == 256, "16 pieces a row, 16 rows a pass");
  const int cc = threadIdx.x & 15, r0 = threadIdx.x >> 4;
  dst += r0 * stride + 8 * cc;
  src += r0 * ld + 8 * cc;
  #pragma unroll
  for (int k = 0; k < 4; k++)
    if (pos0 + r0 + 16 * k < T) *(uint4*)(dst + 16 * k * stride) = *(const uint4*)(src + 16 * k * ld);
}
// bf16 -> f16 (TO_F16) or f16 -> bf16, in place, by all 256 threads.
template <int COLS, bool TO_F16>
__device__ __forceinline__ void tile_convert_v3(void* tile, int ld, int nrows) {
  constexpr int CPR = COLS / 8;
  for (int idx = threadIdx.x; idx < nrows * CPR; idx += V3_THREADS) {
    uint4* p = (uint4*)((unsigned short*)tile + (idx / CPR) * ld + (idx % CPR) * 8);
    uint4 x = *p;
    uint32_t* w = (uint32_t*)&x;
    #pragma unroll
    for (int i = 0; i < 4; i++)
      w[i] = TO_F16 ? pack_f16(bf16_lo(w[i]), bf16_hi(w[i])) : pack_bf16(f16_lo(w[i]), f16_hi(w[i]));
    *p = x;
  }
}
// out (16 state rows x 64 chunk rows) = State (16 x 128, C fragments) . X^T, where X is a 64 x 128 row-major
// 16-bit shared tile (row stride ld elements): B[k][n] = X[n][k], two n-tiles a k-step from one ldmatrix.
// The fp32 state enters the 16-bit mma as A fragments straight from its C fragments (pack_c_to_a's
// layout), at least as precisely as the tf32 products used before, with a third of the instructions (tf32
// took one 16-bit pair load and two conversions per mma, and half the k per mma). H200, same calls: T = 1024
// stage-1 forward + loss about -5 %, stage-1 backward -3 %, linear dv -7 %; T = 4096 stage-1 forward -12 %.
//  - X in f16 (the forward's phi_q, whose f16 must not meet bf16): the state in f16, scaled per warp by a
//    power of two that puts its largest |entry| in [2^13, 2^14) (f16's range ends at 65504), so every
//    entry within 2^-28 of the largest keeps f16's 11 significant bits, tf32's precision; the product is
//    scaled back exactly. The warp's rows are its own output rows, so no other warp needs its scale.
//  - X in bf16 (dy, V, the dv pass's phi_k): the state split into bf16 hi + lo (16 significant bits, fp32's
//    range), two bf16 mma a product.
__device__ __forceinline__ float warp_f16_scale(const float (&st)[16][4], float* inv) {
  float mx = 0.0f;
  #pragma unroll
  for (int j = 0; j < 16; j++)
    #pragma unroll
    for (int e = 0; e < 4; e++) mx = fmaxf(mx, fabsf(st[j][e]));
  mx = warp_max(mx);  // NaN and Inf propagate through the scaled products like any other value
  // mx in [2^(ex-127), 2^(ex-126)): times 2^(140-ex) it lies in [2^13, 2^14). Clamped so that both the
  // scale and its inverse are normal floats (a zero or denormal state gets the largest scale: still zero).
  const int ex = (__float_as_int(mx) >> 23) & 0xff;
  const int sh = max(-100, min(100, 140 - ex));
  *inv = __int_as_float((127 - sh) << 23);
  return __int_as_float((127 + sh) << 23);
}
// k-step k of the state's C fragments as bf16 A fragments, split hi + lo (x = hi + lo to ~16 bits of mantissa).
__device__ __forceinline__ void split_state_a(uint32_t (&hi)[4], uint32_t (&lo)[4], const float (&st)[16][4], int k) {
  #pragma unroll
  for (int i = 0; i < 4; i++) {
    const float (&c)[4] = st[2 * k + (i >> 1)];
    const float x0 = c[2 * (i & 1)], x1 = c[2 * (i & 1) + 1];
    hi[i] = pack_bf16(x0, x1);
    lo[i] = pack_bf16(x0 - bf16_lo(hi[i]), x1 - bf16_hi(hi[i]));
  }
}
template <bool HALF>
__device__ __forceinline__ void state_times_tile_t(float (&out)[8][4], const float (&st)[16][4], const void* X, int ld) {
  #pragma unroll
  for (int n = 0; n < 8; n++) out[n][0] = out[n][1] = out[n][2] = out[n][3] = 0.0f;
  const unsigned short* Xs = (const unsigned short*)X;
  if (HALF) {
    float inv;
    const float sc = warp_f16_scale(st, &inv);
    #pragma unroll
    for (int k = 0; k < 8; k++) {
      uint32_t a[4];
      a[0] = pack_f16(st[2 * k][0] * sc, st[2 * k][1] * sc);
      a[1] = pack_f16(st[2 * k][2] * sc, st[2 * k][3] * sc);
      a[2] = pack_f16(st[2 * k + 1][0] * sc, st[2 * k + 1][1] * sc);
      a[3] = pack_f16(st[2 * k + 1][2] * sc, st[2 * k + 1][3] * sc);
      #pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t bb[4];
        frag_b_nk(bb, Xs, ld, 16 * np, 16 * k);
        mma_f16(out[2 * np], a, bb[0], bb[1]);
        mma_f16(out[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    #pragma unroll
    for (int n = 0; n < 8; n++)
      #pragma unroll
      for (int e = 0; e < 4; e++) out[n][e] *= inv;
  } else {
    #pragma unroll
    for (int k = 0; k < 8; k++) {
      uint32_t hi[4], lo[4];
      split_state_a(hi, lo, st, k);
      #pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t bb[4];
        frag_b_nk(bb, Xs, ld, 16 * np, 16 * k);
        mma_bf16(out[2 * np], hi, bb[0], bb[1]);
        mma_bf16(out[2 * np], lo, bb[0], bb[1]);
        mma_bf16(out[2 * np + 1], hi, bb[2], bb[3]);
        mma_bf16(out[2 * np + 1], lo, bb[2], bb[3]);
      }
    }
  }
}
// State (16 rows m0.. of A^T Y: M = columns of A, N = the 128 columns of Y) += A^T Y over a 64-row tile:
// A (64 x >= m0+16) and Y (64 x 128) 16-bit row-major shared tiles.
template <bool HALF>
__device__ __forceinline__ void state_accumulate(float (&st)[16][4], const void* A, int lda, int m0, const void* Y, int ldy) {
  #pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    uint32_t aa[4];
    frag_a_t(aa, (const unsigned short*)A, lda, m0, 16 * kk);
    #pragma unroll
    for (int np = 0; np < 8; np++) {
      uint32_t bb[4];
      frag_b_kn(bb, (const unsigned short*)Y, ldy, 16 * kk, 16 * np);
      if (HALF) { mma_f16(st[2 * np], aa, bb[0], bb[1]); mma_f16(st[2 * np + 1], aa, bb[2], bb[3]); }
      else { mma_bf16(st[2 * np], aa, bb[0], bb[1]); mma_bf16(st[2 * np + 1], aa, bb[2], bb[3]); }
    }
  }
}
// acc (16 x 64 columns [col0, col0+64) of Y) += A (16 x 16*NK16, A fragments) . Y (16-bit shared tile).
template <bool HALF, int NK16 = 4>
__device__ __forceinline__ void mul_a_tile_half(float (&acc)[8][4], const uint32_t (&A)[4][4], const void* Y, int ldy, int col0) {
  #pragma unroll
  for (int kk = 0; kk < NK16; kk++)
    #pragma unroll
    for (int np = 0; np < 4; np++) {
      uint32_t bb[4];
      frag_b_kn(bb, (const unsigned short*)Y, ldy, 16 * kk, col0 + 16 * np);
      if (HALF) { mma_f16(acc[2 * np], A[kk], bb[0], bb[1]); mma_f16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
      else { mma_bf16(acc[2 * np], A[kk], bb[0], bb[1]); mma_bf16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
    }
}
// ---- warpgroup MMA (Hopper) helpers: swizzled tiles ----
// rows [0, ROWS) of src (row stride in elements) into a swizzled tile of ROWS rows (halves of ROWS x 128 bytes) at
// shared address dst; rows >= n_valid zero. Thread tid copies chunk tid % 16 of rows tid / 16 + (THREADS / 16) k:
// its swizzled chunk is the same for all of them.
template <int ROWS, int THREADS = 128>
__device__ __forceinline__ void load_tile_swz_async(uint32_t dst, const bf16* src, size_t row_stride, int n_valid, int tid) {
  constexpr int RP = THREADS / 16;  // rows a pass
  static_assert(RP % 8 == 0 && ROWS % RP == 0, "a pass covers whole swizzle groups");
  const int c = tid & 15, r0 = tid >> 4;
  uint32_t d = dst + (c >> 3) * (ROWS * 128) + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
  const bf16* g = src + (size_t)r0 * row_stride + c * 8;
  #pragma unroll
  for (int k = 0; k < ROWS / RP; k++) {
    const bool ok = r0 + RP * k < n_valid;
    cp_async16_s(d + k * RP * 128, ok ? g + (size_t)RP * k * row_stride : src, ok);
  }
}
// The byte offset of element (r, col) of a 64-row swizzled tile of 16-bit values.
__device__ __forceinline__ int swz_off(int r, int col) {
  return (col >> 6) * WG_HALF + r * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4) + 2 * (col & 7);
}
// B of two n-tiles (frag_b_nk's layout: B[k][n] = tile[n][k]) from a 64-row swizzled tile.
__device__ __forceinline__ void frag_b_nk_swz(uint32_t (&b)[4], const void* tile, int n0, int k0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  ldsm_x4(b, (const unsigned char*)tile + swz_off(n0 + rr + 8 * (mi >> 1), k0 + 8 * (mi & 1)));
}
// A (16 x 16) with A[m][k] = tile[k][m] (frag_a_t's layout) from a 64-row swizzled tile.
__device__ __forceinline__ void frag_a_t_swz(uint32_t (&a)[4], const void* tile, int m0, int k0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  ldsm_x4_t(a, (const unsigned char*)tile + swz_off(k0 + rr + 8 * (mi >> 1), m0 + 8 * (mi & 1)));
}
// mul_a_tile_half (mma.sync) with Y a swizzled 16-bit tile: B[k][n] = Y[k][n] by ldmatrix.trans.
template <bool HALF = true>
__device__ __forceinline__ void mul_a_tile_half_swz(float (&acc)[8][4], const uint32_t (&A)[4][4], const void* Y, int col0) {
  const int l = lane_id(), mi = l >> 3, rr = l & 7;
  #pragma unroll
  for (int kk = 0; kk < 4; kk++)
    #pragma unroll
    for (int np = 0; np < 4; np++) {
      uint32_t bb[4];
      ldsm_x4_t(bb, (const unsigned char*)Y + swz_off(16 * kk + rr + 8 * (mi & 1), col0 + 16 * np + 8 * (mi >> 1)));
      if (HALF) { mma_f16(acc[2 * np], A[kk], bb[0], bb[1]); mma_f16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
      else { mma_bf16(acc[2 * np], A[kk], bb[0], bb[1]); mma_bf16(acc[2 * np + 1], A[kk], bb[2], bb[3]); }
    }
}
// acc (this warp's 16 rows x columns [col0, col0 + 64)) += A (16 x 64 keys, f16 A fragments) . V, V a swizzled
// f16 64-key tile: mul_a_tile_half<true> as one wgmma chain of the warpgroup.
__device__ __forceinline__ void mul_a_tile_half_wg(float (&acc)[8][4], const uint32_t (&A)[4][4], const void* V, int col0) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  const uint32_t v = smem_u32(V) + (col0 >> 6) * WG_HALF;
  fence_regs(acc);
  wgmma_fence();
  #pragma unroll
  for (int kk = 0; kk < 4; kk++) wgmma_rs_m64n64k16_f16_tb(&acc[0][0], A[kk], make_desc(v + kk * 2048, WG_HALF, 1024));
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(acc);
#endif
}
// sc (this warp's 16 rows x 64 keys, C layout) = X K^T, X the warp's register A fragments (8 k-steps over d = 128),
// K a swizzled 64-key tile: one wgmma chain by the whole warpgroup (Hopper; the forward's version-3 path there).
__device__ __forceinline__ void mul_x_keys_wg(float (&sc)[8][4], const uint32_t (&X)[8][4], const bf16* K) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  const uint32_t k = smem_u32(K);
  wgmma_fence();
  #pragma unroll
  for (int kt = 0; kt < 8; kt++)
    wgmma_rs_m64n64k16_kb(&sc[0][0], X[kt], make_desc(k + (kt / 4) * WG_HALF + (kt % 4) * 32, 16, 1024), kt > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(sc);
#endif
}

// Online softmax over one key tile for a warp's 16 query rows, output columns [col0, col0+64) only (the
// two warps of a row group each take half of the head dim; both form the same scores, max and sums).
template <int NKEYS, bool ARGMAX, class MASK, bool WGK = false>
__device__ __forceinline__ void softmax_tile_half(float (&o)[8][4], float (&m)[2], float (&l)[2], float (&best)[2], int (&barg)[2],
                                                  const uint32_t (&qf)[8][4], const bf16* K, const __half* V, int key0,
                                                  int row0, float scale, int col0, MASK mask) {
  const int ln = lane_id(), g = ln >> 2, t = ln & 3;
  float sc[8][4];
  if constexpr (WGK) mul_x_keys_wg(sc, qf, K);  // K, V swizzled (NKEYS = 64; the whole warpgroup)
  else mul_x_keys<128, NKEYS>(sc, qf, K);
  float tmax[2] = {-INFINITY, -INFINITY};
  #pragma unroll
  for (int nt = 0; nt < NKEYS / 8; nt++)
    #pragma unroll
    for (int e = 0; e < 4; e++) {
      const int kl = 8 * nt + 2 * t + (e & 1), r = e >> 1;
      const float x = mask(kl, row0 + g + 8 * r) ? sc[nt][e] * scale : -INFINITY;
      sc[nt][e] = x;
      tmax[r] = fmaxf(tmax[r], x);
      if (ARGMAX && x > best[r]) { best[r] = x; barg[r] = key0 + kl; }  // keys are visited in increasing order
    }
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    const float mnew = fmaxf(m[r], quad_max(tmax[r]));
    const float muse = mnew == -INFINITY ? 0.0f : mnew;
    const float corr = exp2f((m[r] - muse) * LOG2E);
    l[r] *= corr;
    #pragma unroll
    for (int nt = 0; nt < 8; nt++) { o[nt][2 * r] *= corr; o[nt][2 * r + 1] *= corr; }
    m[r] = mnew;
    #pragma unroll
    for (int nt = 0; nt < NKEYS / 8; nt++)
      for (int e = 2 * r; e < 2 * r + 2; e++) {
        sc[nt][e] = exp2f((sc[nt][e] - muse) * LOG2E);
        l[r] += sc[nt][e];
      }
  }
  uint32_t pa[4][4];
  pack_c_to_a<true, 8>(pa, sc);
  if constexpr (WGK) mul_a_tile_half_wg(o, pa, V, col0);  // V swizzled too
  else mul_a_tile_half<true, NKEYS / 16>(o, pa, V, Tiles<128>::LDT, col0);
}

// ---- version-3 forward on Hopper: the state products as wgmma on swizzled feature tiles ----
// store_phi into a 64-row swizzled tile (f16).
__device__ __forceinline__ void store_phi_swz(void* tile, int r0, const float (&ph)[16][4], bool keep_g, bool keep_g8) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  unsigned char* base = (unsigned char*)tile;
  #pragma unroll
  for (int j = 0; j < 16; j++) {
    const float a0 = keep_g ? ph[j][0] : 0.0f, a1 = keep_g ? ph[j][1] : 0.0f;
    const float a2 = keep_g8 ? ph[j][2] : 0.0f, a3 = keep_g8 ? ph[j][3] : 0.0f;
    *(uint32_t*)(base + swz_off(r0 + g, 8 * j + 2 * t)) = pack_f16(a0, a1);
    *(uint32_t*)(base + swz_off(r0 + g + 8, 8 * j + 2 * t)) = pack_f16(a2, a3);
  }
}
// column_sum_update over a swizzled 16-bit tile: sZ[f] += sum of column f (thread f), rows weighted by scal if given.
template <bool HALF = true>
__device__ __forceinline__ void column_sum_update_swz(float* sZ, const void* Phi, int f = threadIdx.x, const float* scal = nullptr) {
  const unsigned char* P = (const unsigned char*)Phi;
  float acc = 0.0f;
  #pragma unroll
  for (int r = 0; r < 64; r++) {
    const unsigned short bits = *(const unsigned short*)(P + swz_off(r, f));
    const float v = HALF ? f16_bits_to_float(bits) : __uint_as_float((uint32_t)bits << 16);
    acc += scal ? v * scal[r] : v;
  }
  sZ[f] += acc;
}
// store_rows_v3 from a swizzled tile.
__device__ __forceinline__ void store_rows_v3_swz(unsigned short* dst, size_t stride, const void* src, int pos0, int T) {
  const int cc = threadIdx.x & 15, r0 = threadIdx.x >> 4;
  dst += r0 * stride + 8 * cc;
  const unsigned char* sp = (const unsigned char*)src + swz_off(r0, 8 * cc);  // r0 + 16 k: the same chunk
  #pragma unroll
  for (int k = 0; k < 4; k++)
    if (pos0 + r0 + 16 * k < T) *(uint4*)(dst + 16 * k * stride) = *(const uint4*)(sp + 16 * k * 128);
}
// out (this warp's 16 d-rows x 64 queries) = S^T X^T: state_times_tile_t<true> with X a swizzled f16 tile, as
// one wgmma chain of the warpgroup (each warp's A fragments scaled by its own power of two, undone after).
__device__ __forceinline__ void state_times_tile_t_wg(float (&out)[8][4], const float (&st)[16][4], const void* X) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  float inv;
  const float sc = warp_f16_scale(st, &inv);
  uint32_t a[8][4];
  #pragma unroll
  for (int k = 0; k < 8; k++) {
    a[k][0] = pack_f16(st[2 * k][0] * sc, st[2 * k][1] * sc);
    a[k][1] = pack_f16(st[2 * k][2] * sc, st[2 * k][3] * sc);
    a[k][2] = pack_f16(st[2 * k + 1][0] * sc, st[2 * k + 1][1] * sc);
    a[k][3] = pack_f16(st[2 * k + 1][2] * sc, st[2 * k + 1][3] * sc);
  }
  const uint32_t x = smem_u32(X);
  wgmma_fence();
  #pragma unroll
  for (int k = 0; k < 8; k++)
    wgmma_rs_m64n64k16_f16_kb(&out[0][0], a[k], make_desc(x + (k / 4) * WG_HALF + (k % 4) * 32, 16, 1024), k > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(out);
  #pragma unroll
  for (int n = 0; n < 8; n++)
    #pragma unroll
    for (int e = 0; e < 4; e++) out[n][e] *= inv;
#endif
}
// st (this warp's 16 rows m0.. of A^T Y) += A^T Y: state_accumulate with A and Y swizzled 64-row 16-bit tiles
// (A^T as register fragments by ldmatrix.trans, Y an MN-major B), one wgmma chain of the warpgroup. The forward:
// A the f16 V tile, Y a feature tile (S^T's d-rows); the backward (bf16): A a feature tile, Y the V or dy tile.
template <bool HALF>
__device__ __forceinline__ void state_accumulate_wg(float (&st)[16][4], const void* A, int m0, const void* Y) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  uint32_t aa[4][4];
  #pragma unroll
  for (int kk = 0; kk < 4; kk++) frag_a_t_swz(aa[kk], A, m0, 16 * kk);
  const uint32_t y = smem_u32(Y);
  fence_regs(st);
  wgmma_fence();
  #pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    if (HALF) wgmma_rs_m64n128k16_f16_tb(&st[0][0], aa[kk], make_desc(y + kk * 2048, WG_HALF, 1024));
    else wgmma_rs_m64n128k16_tb(&st[0][0], aa[kk], make_desc(y + kk * 2048, WG_HALF, 1024));
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(st);
#endif
}

// out (this warp's 16 state rows x 64 columns) = st X^T with the state split hi + lo in bf16 (state_times_tile_t
// <false>), X a swizzled 64-row bf16 tile (a K-major B): two wgmma chains of the warpgroup.
__device__ __forceinline__ void state_times_tile_t_split_wg(float (&out)[8][4], const float (&st)[16][4], const void* X) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  uint32_t hi[8][4], lo[8][4];
  #pragma unroll
  for (int k = 0; k < 8; k++) split_state_a(hi[k], lo[k], st, k);
  const uint32_t x = smem_u32(X);
  wgmma_fence();
  #pragma unroll
  for (int k = 0; k < 8; k++) wgmma_rs_m64n64k16_kb(&out[0][0], hi[k], make_desc(x + (k / 4) * WG_HALF + (k % 4) * 32, 16, 1024), k > 0);
  #pragma unroll
  for (int k = 0; k < 8; k++) wgmma_rs_m64n64k16_kb(&out[0][0], lo[k], make_desc(x + (k / 4) * WG_HALF + (k % 4) * 32, 16, 1024), 1);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(out);
#endif
}
// ---- forward, version 3 ----
// Per chunk c: (A) warps 0-3 phi_k of chunk c-1, warps 4-7 phi_q of chunk c and its linear denominator
// phi_q . z; (B) every warp: its 16 d-rows of numL^T = S^T phi_q^T (to the shared fp32 tile), then
// S^T += V_{c-1}^T phi_k(c-1); (C) warp (row group rg, half hf) the softmax tiles of rows [16 rg, +16) for
// head-dim columns [64 hf, +64) (plus the sliding masked term); (D) output and the fused stage-1 loss, the
// two halves' row sums combined through shared memory in a fixed order.
// WG (Hopper): the K, V and feature tiles 128-byte swizzled (16 KB each, first, on the 1024-aligned base: BYTES
// has the slack), for q K^T, p V and the state products as wgmma reading them from shared memory.
template <bool WG>
struct Fwd3LayoutT {
  using TL = Tiles<128>;
  static constexpr size_t K_TILE = WG ? WG_TILE : TL::TILE * 2, P_TILE = WG ? WG_TILE : TL::PT * 2;
  static constexpr size_t K = 0, PK = K + 2 * K_TILE, PQ = PK + P_TILE, V = PQ + P_TILE, Q = V + 2 * K_TILE,
                          WQ = Q + TL::TILE * 2, WK = WQ + TL::WT * 2, NUM = WK + TL::WT * 2,
                          SK = NUM + 64 * V3_LDN * 4, SV = SK + 16 * TL::LDT * 2, Z = SV + 16 * TL::LDT * 2,
                          LL = Z + NF * 4, RED = LL + 64 * 4, YT = RED + 2 * 3 * 64 * 4,
                          BYTES = YT + TL::TILE * 2 + (WG ? 1024 : 0);
};
using Fwd3Layout = Fwd3LayoutT<false>;
template <bool SLIDING, bool STAGE1, bool WG = false>
static __global__ void __launch_bounds__(V3_THREADS, 1) fast_forward_v3_kernel(FastFwdArgs a) {
  constexpr int D = 128;
  using TL = Tiles<D>;
  using LY = Fwd3LayoutT<WG>;
  constexpr int LDT = TL::LDT, LDP = TL::LDP, LDN = V3_LDN;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  const int rg = warp & 3, hf = warp >> 2, row0 = 16 * rg;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // WG: the 1024-aligned base the swizzled K tiles need (BYTES has the slack)
  unsigned char* sm = WG ? smem_raw + (((smem_u32(smem_raw) + 1023) & ~1023u) - smem_u32(smem_raw)) : smem_raw;
  constexpr int KTE = LY::K_TILE / 2;  // elements a K slot
  bf16* sQ = (bf16*)(sm + LY::Q);
  bf16* sK = (bf16*)(sm + LY::K);
  __half* sV = (__half*)(sm + LY::V);
  bf16* sWq = (bf16*)(sm + LY::WQ);
  bf16* sWk = (bf16*)(sm + LY::WK);
  __half* sPK = (__half*)(sm + LY::PK);
  __half* sPQ = (__half*)(sm + LY::PQ);
  float* sNum = (float*)(sm + LY::NUM);  // numL (query, d) of the current chunk
  bf16* sSK = (bf16*)(sm + LY::SK);
  __half* sSV = (__half*)(sm + LY::SV);
  float* sZ = (float*)(sm + LY::Z);
  float* sLL = (float*)(sm + LY::LL);    // phi_q . z per query row
  float* sRed = (float*)(sm + LY::RED);  // [half][sq, dy.y, dy.numA][64]
  bf16* sYT = (bf16*)(sm + LY::YT);      // the teacher's output y_true of the current chunk (stage 1)

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const float gamma = sigmoidf_(a.wlogit[h]);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* qb = a.q + row_index(s, b, 0, h) * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  const bf16* ytb = a.y_true ? a.y_true + row_index(s, b, 0, h) * D : nullptr;
  auto rows_in = [&](int c) { return min(CHUNK, s.T - c * CHUNK); };
  auto load_kv = [&](int c) {
    if constexpr (WG) load_tile_swz_async<64, V3_THREADS>(smem_u32(sK + (c & 1) * KTE), kb + (size_t)c * CHUNK * kstride, kstride, rows_in(c), threadIdx.x);
    else load_rows_async<D, V3_THREADS>(sK + (c & 1) * KTE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    if constexpr (WG) load_tile_swz_async<64, V3_THREADS>(smem_u32(sV + (c & 1) * KTE), vb + (size_t)c * CHUNK * kstride, kstride, rows_in(c), threadIdx.x);
    else load_rows_async<D, V3_THREADS>((bf16*)sV + (c & 1) * KTE, LDT, vb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
  };

  load_rows_async<64, V3_THREADS>(sWq, TL::LDW, a.Wq + (size_t)h * D * 64, 64, D, D);
  load_rows_async<64, V3_THREADS>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  if (s.sinks > 0) {
    load_rows_async<D, V3_THREADS>(sSK, LDT, kb, kstride, 16, s.sinks);
    load_rows_async<D, V3_THREADS>((bf16*)sSV, LDT, vb, kstride, 16, s.sinks);
  }
  if (c_begin >= 1) load_kv(c_begin - 1);
  load_kv(c_begin);
  load_rows_async<D, V3_THREADS>(sQ, LDT, qb + (size_t)c_begin * CHUNK * qstride, qstride, 64, rows_in(c_begin));
  cp_async_commit();
  float st[16][4];  // S^T: rows d = 16 warp + g (+8), n-tile j = features 8j + 2t (+1)
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int e = 0; e < 4; e++) {
        const int f = 8 * j + 2 * t + (e & 1), dr = 16 * warp + g + 8 * (e >> 1);
        st[j][e] = seg > 0 ? a.segS[(base + f) * D + dr] : 0.0f;
      }
    if (tid < NF) sZ[tid] = seg > 0 ? a.segZ[base + tid] : 0.0f;
  }
  cp_async_wait<0>();
  __syncthreads();
  // V to f16 in place (a swizzled tile converts as 128 rows of 64)
  auto v_to_f16 = [&](__half* V) {
    if constexpr (WG) tile_convert_v3<64, true>(V, 64, 128);
    else tile_convert_v3<D, true>(V, LDT, 64);
  };
  if (c_begin >= 1) v_to_f16(sV + ((c_begin - 1) & 1) * KTE);
  if (s.sinks > 0) tile_convert_v3<D, true>(sSV, LDT, 16);
  // Stage 1: the squared errors and window terms of this thread's rows (hf == 0, t == 0), summed over the
  // chunks; the block's sums go out at the end (the loss and dw then need no pass over the rows).
  float blk_sq = 0.0f, blk_wg = 0.0f;

  for (int c = c_begin; c < c_end; c++) {
    const int cur = c & 1, prv = cur ^ 1;
    const bf16* Kc = sK + cur * KTE;
    const bf16* Kp = sK + prv * KTE;
    __half* Vc = sV + cur * KTE;
    const __half* Vp = sV + prv * KTE;
    const bool has_prev = c >= 1, has_state = c >= 2;
    cp_async_wait<0>();
    __syncthreads();  // Q_c, K_c, V_c are in; the last chunk's readers of sNum, sLL, sRed, sYT are done
    // The teacher's output for (D): a coalesced copy now, awaited at the barrier before (D) (as 4-byte
    // loads into registers in (C) it was scattered, and 16 registers a thread were held through the softmax).
    if (ytb) {
      load_rows_async<D, V3_THREADS>(sYT, LDT, ytb + (size_t)c * CHUNK * qstride, qstride, 64, rows_in(c));
      cp_async_commit();
    }

    // (A) feature maps; V_c to f16 by everyone.
    v_to_f16(Vc);
    if (hf == 0) {
      if (has_prev) {
        float ph[16][4];
        feature_map_smem<D, WG>(ph, Kp, row0, sWk);
        const int j0 = (c - 1) * CHUNK + row0;
        if constexpr (WG) store_phi_swz(sPK, row0, ph, j0 + g >= s.sinks, j0 + g + 8 >= s.sinks);
        else store_phi<true>(sPK, LDP, row0, ph, j0 + g >= s.sinks, j0 + g + 8 >= s.sinks);
      }
    } else {
      float ph[16][4];
      feature_map_smem<D>(ph, sQ, row0, sWq);
      if constexpr (WG) store_phi_swz(sPQ, row0, ph, true, true);
      else store_phi<true>(sPQ, LDP, row0, ph, true, true);
      if (has_state) {  // from the f16-rounded features: the values the numerator's products use
        float l0 = 0.0f, l1 = 0.0f;
        #pragma unroll
        for (int j = 0; j < 16; j++) {
          const float z0 = sZ[8 * j + 2 * t], z1 = sZ[8 * j + 2 * t + 1];
          l0 += __half2float(__float2half_rn(ph[j][0])) * z0 + __half2float(__float2half_rn(ph[j][1])) * z1;
          l1 += __half2float(__float2half_rn(ph[j][2])) * z0 + __half2float(__float2half_rn(ph[j][3])) * z1;
        }
        l0 = quad_sum(l0);
        l1 = quad_sum(l1);
        if (t == 0) { sLL[row0 + g] = l0; sLL[row0 + g + 8] = l1; }
      }
    }
    __syncthreads();  // phi tiles, sLL, V_c (f16)
    if (a.sv.phi_q) {  // the feature maps for the backward: phi_q of chunk c, phi_k of chunk c-1 (with the dy
      // copy below by the fixed pattern of store_rows_v3: forward + loss 0.397 -> 0.383 ms)
      static_assert(NF == 128, "store_rows_v3 copies 128 values a row");
      const size_t pstride = (size_t)s.H * NF;
      unsigned short* pq = (unsigned short*)a.sv.phi_q + row_index(s, b, c * CHUNK, h) * NF;
      unsigned short* pk = (unsigned short*)a.sv.phi_k + row_index(s, b, has_prev ? (c - 1) * CHUNK : 0, h) * NF;
      if constexpr (WG) {
        store_rows_v3_swz(pq, pstride, sPQ, c * CHUNK, s.T);
        if (has_prev) store_rows_v3_swz(pk, pstride, sPK, (c - 1) * CHUNK, s.T);
      } else {
        store_rows_v3(pq, pstride, (const unsigned short*)sPQ, LDP, c * CHUNK, s.T);
        if (has_prev) store_rows_v3(pk, pstride, (const unsigned short*)sPK, LDP, (c - 1) * CHUNK, s.T);
      }
    }

    // (B) the state: numL^T for this warp's 16 d-rows, then the update with chunk c-1 (z: threads < 128,
    // after every read of z, which happened in (A)).
    if (has_state) {
      float nl[8][4];
      if constexpr (WG) state_times_tile_t_wg(nl, st, sPQ);
      else state_times_tile_t<true>(nl, st, sPQ, LDP);
      #pragma unroll
      for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) sNum[(8 * n + 2 * t + (e & 1)) * LDN + 16 * warp + g + 8 * (e >> 1)] = nl[n][e];
    }
    if (has_prev) {
      if constexpr (WG) {
        state_accumulate_wg<true>(st, Vp, 16 * warp, sPK);
        if (tid < NF) column_sum_update_swz(sZ, sPK);
      } else {
        state_accumulate<true>(st, Vp, LDT, 16 * warp, sPK, LDP);
        if (tid < NF) column_sum_update<true>(sZ, sPK, LDP, nullptr);
      }
    }

    // (C) the softmax part (sinks as their own tile from chunk 2 on, chunk c-1, the causal part of chunk c)
    // for head-dim columns [64 hf, +64).
    const int col0 = 64 * hf;
    float o[8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, best[2] = {-INFINITY, -INFINITY};
    int barg[2] = {0, 0};
    {
      uint32_t qf[8][4];
      #pragma unroll
      for (int kt = 0; kt < 8; kt++) frag_a(qf[kt], sQ, LDT, row0, 16 * kt);
      // The arg max of the window scores serves only the input gradients: not tracked with the stage-1 loss
      // (H200, T = 1024: the stage-1 forward 0.466 -> 0.451 ms).
      if (s.sinks > 0 && c >= 2)
        softmax_tile_half<16, !STAGE1>(o, m, l, best, barg, qf, sSK, sSV, 0, row0, s.scale, col0,
                                       [&](int kl, int) { return kl < s.sinks; });
      if (has_prev) {
        const int key0 = (c - 1) * CHUNK;
        auto mask = [&](int kl, int rl) { return !SLIDING || kl > rl || key0 + kl < s.sinks; };
        softmax_tile_half<64, !STAGE1, decltype(mask), WG>(o, m, l, best, barg, qf, Kp, Vp, key0, row0, s.scale, col0, mask);
      }
      auto causal = [&](int kl, int rl) { return kl <= rl; };
      softmax_tile_half<64, !STAGE1, decltype(causal), WG>(o, m, l, best, barg, qf, Kc, Vc, c * CHUNK, row0, s.scale, col0, causal);
    }
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      l[r] = quad_sum(l[r]) * gamma;
      #pragma unroll
      for (int nt = 0; nt < 8; nt++) { o[nt][2 * r] *= gamma; o[nt][2 * r + 1] *= gamma; }
      for (int off = 1; off < 4 && !STAGE1; off <<= 1) {  // arg max over the quad (ties: the earlier key)
        const float bv = __shfl_xor_sync(0xffffffffu, best[r], off);
        const int ba = __shfl_xor_sync(0xffffffffu, barg[r], off);
        if (bv > best[r] || (bv == best[r] && ba < barg[r])) { best[r] = bv; barg[r] = ba; }
      }
    }
    // Sliding: the keys of chunk c-1 at least w behind the query are linear keys (masked quadratic term).
    float ol[8][4] = {};
    float lls[2] = {0.0f, 0.0f};
    if (SLIDING && has_prev) {
      float bm[8][4] = {};
      #pragma unroll
      for (int k = 0; k < 8; k++) {
        uint32_t pa[4];
        if constexpr (WG) frag_a_swz(pa, sPQ, row0, 16 * k);
        else frag_a(pa, sPQ, LDP, row0, 16 * k);
        #pragma unroll
        for (int np = 0; np < 4; np++) {
          uint32_t bb[4];
          if constexpr (WG) frag_b_nk_swz(bb, sPK, 16 * np, 16 * k);
          else frag_b_nk(bb, sPK, LDP, 16 * np, 16 * k);
          mma_f16(bm[2 * np], pa, bb[0], bb[1]);
          mma_f16(bm[2 * np + 1], pa, bb[2], bb[3]);
        }
      }
      const int key0 = (c - 1) * CHUNK;
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          const int kl = 8 * nt + 2 * t + (e & 1), rl = row0 + g + 8 * (e >> 1);
          if (!(kl <= rl && key0 + kl >= s.sinks)) bm[nt][e] = 0.0f;
          lls[e >> 1] += bm[nt][e];
        }
      uint32_t pa[4][4];
      pack_c_to_a<true, 8>(pa, bm);
      if constexpr (WG) mul_a_tile_half_swz(ol, pa, Vp, col0);  // (as wgmma: 12 bytes of spills)
      else mul_a_tile_half<true>(ol, pa, Vp, LDT, col0);
      lls[0] = quad_sum(lls[0]);
      lls[1] = quad_sum(lls[1]);
    }
    cp_async_wait<0>();  // y_true of chunk c (the only copy in flight)
    __syncthreads();  // sNum, sYT complete; K_{c-1}, V_{c-1}, Q_c no longer read: fetch chunk c+1
    if (c + 1 < c_end) {
      load_kv(c + 1);
      load_rows_async<D, V3_THREADS>(sQ, LDT, qb + (size_t)(c + 1) * CHUNK * qstride, qstride, 64, rows_in(c + 1));
    }
    cp_async_commit();

    // (D) output, statistics, the fused stage-1 loss.
    {
      float den[2], inv[2], sq[2] = {0, 0}, dyy[2] = {0, 0}, dyA[2] = {0, 0};
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        den[r] = l[r] + (has_state ? sLL[row0 + g + 8 * r] : 0.0f) + lls[r];
        inv[r] = 1.0f / den[r];
      }
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int rl = row0 + g + 8 * r, i = c * CHUNK + rl;
        if (i >= s.T) continue;
        const size_t ri = row_index(s, b, i, h);
        // The row's numL and y_true words, all loaded before the first dy store into sYT: the compiler cannot
        // move a shared load above a store it cannot tell apart, so loading them in the loop below made every
        // step wait for its load (H200, T = 1024: stage-1 forward + loss 0.431 -> 0.397 ms).
        float2 nl[8];
        uint32_t tv[8];
        #pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          const int col = col0 + 8 * nt + 2 * t;
          nl[nt] = has_state ? *(const float2*)&sNum[rl * LDN + col] : make_float2(0.0f, 0.0f);
          tv[nt] = STAGE1 ? *(const uint32_t*)&sYT[rl * LDT + col] : 0u;
        }
        #pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          const int col = col0 + 8 * nt + 2 * t;
          const float y0 = (o[nt][2 * r] + nl[nt].x + ol[nt][2 * r]) * inv[r];
          const float y1 = (o[nt][2 * r + 1] + nl[nt].y + ol[nt][2 * r + 1]) * inv[r];
          const uint32_t yp = pack_bf16(y0, y1);
          if (a.y) *(uint32_t*)&a.y[ri * D + col] = yp;  // stage 1 may skip y: nothing reads it
          // y_lo serves only an unfused backward, which never follows a stage-1 forward
          if (!STAGE1 && a.sv.y_lo) *(uint32_t*)&a.sv.y_lo[ri * D + col] = pack_bf16(y0 - bf16_lo(yp), y1 - bf16_hi(yp));
          if (STAGE1) {  // (STAGE1 is exactly "y_true given")
            const float e0 = y0 - bf16_lo(tv[nt]), e1 = y1 - bf16_hi(tv[nt]);
            sq[r] += e0 * e0 + e1 * e1;
            const uint32_t gp = pack_bf16(a.grad_scale * 2.0f * e0 * a.inv_n, a.grad_scale * 2.0f * e1 * a.inv_n);
            *(uint32_t*)&sYT[rl * LDT + col] = gp;  // dy over its own y_true: written out in 16-byte pieces below
            dyy[r] += bf16_lo(gp) * y0 + bf16_hi(gp) * y1;
            dyA[r] += bf16_lo(gp) * o[nt][2 * r] + bf16_hi(gp) * o[nt][2 * r + 1];
          }
        }
      }
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int rl = row0 + g + 8 * r, i = c * CHUNK + rl;
        if (hf == 0 && t == 0 && i < s.T) {
          const size_t ri = row_index(s, b, i, h);
          a.sv.row_den[ri] = den[r];
          if (!STAGE1) {
            a.sv.row_max[ri] = m[r];
            a.sv.row_argmax[ri] = barg[r];
          }
        }
        if (a.y_true) {
          sq[r] = quad_sum(sq[r]);
          dyy[r] = quad_sum(dyy[r]);
          dyA[r] = quad_sum(dyA[r]);
          if (t == 0) {
            sRed[(3 * hf + 0) * 64 + rl] = sq[r];
            sRed[(3 * hf + 1) * 64 + rl] = dyy[r];
            sRed[(3 * hf + 2) * 64 + rl] = dyA[r];
          }
        }
      }
      if (a.y_true) {
        __syncthreads();  // both halves' row sums
        #pragma unroll
        for (int r = 0; r < 2; r++) {
          const int rl = row0 + g + 8 * r, i = c * CHUNK + rl;
          if (hf == 0 && t == 0 && i < s.T) {
            const size_t ri = row_index(s, b, i, h);
            const float sqs = sRed[0 * 64 + rl] + sRed[3 * 64 + rl];
            const float yy = sRed[1 * 64 + rl] + sRed[4 * 64 + rl];
            const float yA = sRed[2 * 64 + rl] + sRed[5 * 64 + rl];
            const float wg = (yA - yy * l[r]) * inv[r];
            blk_sq += sqs;
            a.sv.row_delta[ri] = yy * inv[r];
            if (a.sv.wgrad_part) blk_wg += wg;
            else a.sv.row_wgrad[ri] = wg;
          }
        }
        // dy, from sYT, 16 bytes a step (4-byte stores from the fragments cost more)
        store_rows_v3((unsigned short*)a.sv.dy + row_index(s, b, c * CHUNK, h) * D, (size_t)s.H * D, (const unsigned short*)sYT, LDT,
                      c * CHUNK, s.T);
      }
    }
  }
  cp_async_wait<0>();
  if (STAGE1) {  // the block's sums, fixed order (warp sums, then warps 0-3; warps 4-7 hold zeros)
    const float wsq = warp_sum(blk_sq), wwg = warp_sum(blk_wg);
    __syncthreads();  // the chunk loop's readers of sRed are done
    if (ln == 0) { sRed[warp] = wsq; sRed[8 + warp] = wwg; }
    __syncthreads();
    if (tid == 0) {
      const size_t bi = ((size_t)b * s.H + h) * gridDim.x + seg;
      a.blk_sq[bi] = (sRed[0] + sRed[1]) + (sRed[2] + sRed[3]);
      if (a.sv.wgrad_part) a.sv.wgrad_part[bi] = (sRed[8] + sRed[9]) + (sRed[10] + sRed[11]);
    }
  }
}

// du = phi+ (dphi+ - phi+.dphi+) - phi- (dphi- - phi-.dphi-) for 64 rows: phi a 16-bit shared tile (row
// stride LDP), dphi an fp32 shared tile (row stride V3_LDN); 4 threads a row, 16 of the 64 columns each;
// rows past n_valid are not written. du goes to global rows (row r at out + r * out_stride), bf16.
template <bool HALF>
__device__ __forceinline__ void phi_backward_rows_v3(bf16* out, size_t out_stride, const void* Phi, const float* dPhi, int n_valid) {
  const int row = threadIdx.x >> 2, part = threadIdx.x & 3;
  const unsigned short* P = (const unsigned short*)Phi + row * Tiles<128>::LDP + 16 * part;
  const float* G = dPhi + row * V3_LDN + 16 * part;
  float pp[16], pm[16], gp[16], gm[16];
  #pragma unroll
  for (int h8 = 0; h8 < 2; h8++) {
    const uint4 a = *(const uint4*)(P + 8 * h8), bm = *(const uint4*)(P + 64 + 8 * h8);
    const uint32_t* wa = (const uint32_t*)&a;
    const uint32_t* wb = (const uint32_t*)&bm;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
      pp[8 * h8 + 2 * i] = HALF ? f16_lo(wa[i]) : bf16_lo(wa[i]);
      pp[8 * h8 + 2 * i + 1] = HALF ? f16_hi(wa[i]) : bf16_hi(wa[i]);
      pm[8 * h8 + 2 * i] = HALF ? f16_lo(wb[i]) : bf16_lo(wb[i]);
      pm[8 * h8 + 2 * i + 1] = HALF ? f16_hi(wb[i]) : bf16_hi(wb[i]);
    }
  }
  #pragma unroll
  for (int i = 0; i < 4; i++) {
    const float4 x = *(const float4*)(G + 4 * i), y = *(const float4*)(G + 64 + 4 * i);
    gp[4 * i] = x.x; gp[4 * i + 1] = x.y; gp[4 * i + 2] = x.z; gp[4 * i + 3] = x.w;
    gm[4 * i] = y.x; gm[4 * i + 1] = y.y; gm[4 * i + 2] = y.z; gm[4 * i + 3] = y.w;
  }
  // Four partial sums each: one chain of 16 dependent FMAs was what the warps waited on (ncu: ~20 % of the
  // key-side kernel's stall samples at the quad sums below).
  float sp4[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sm4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  #pragma unroll
  for (int i = 0; i < 16; i++) { sp4[i & 3] += pp[i] * gp[i]; sm4[i & 3] += pm[i] * gm[i]; }
  float sp = (sp4[0] + sp4[1]) + (sp4[2] + sp4[3]), sm = (sm4[0] + sm4[1]) + (sm4[2] + sm4[3]);
  sp = quad_sum(sp);  // the 4 threads of a row are the lanes of one quad
  sm = quad_sum(sm);
  if (row < n_valid) {
    uint32_t w[8];
    #pragma unroll
    for (int i = 0; i < 8; i++)
      w[i] = pack_bf16(pp[2 * i] * (gp[2 * i] - sp) - pm[2 * i] * (gm[2 * i] - sm),
                       pp[2 * i + 1] * (gp[2 * i + 1] - sp) - pm[2 * i + 1] * (gm[2 * i + 1] - sm));
    uint4* dst = (uint4*)(out + (size_t)row * out_stride + 16 * part);
    dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
    dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

// ---- stage-1 backward, query side, version 3 ----
// Per chunk c: (A) warps 0-3 phi_k(c-1) (bf16, to shared), warps 4-7 phi_q(c) (f16 to shared, phi_q / den
// to global for the key side); (B) warp w, owning features [16 w, +16) of S (128 x d) as accumulators:
// dphi_q^T = S dy^T / den - z delta^T for its features (to the shared fp32 tile), then S += phi_k^T V_{c-1}
// (and warps 4-7 z += the column sums of phi_k); (C) sliding: the masked keys of chunk c-1, added by
// row-group warps; then du_q, 4 threads a row.
// PHI_SAVED (stage 1, the forward kept phi_q and phi_k): the feature maps arrive by cp.async with the
// chunk's other tiles, double-buffered in the slots Q and K would use, and (A) is only the row statistics
// and phi_q / den for the key side (H200, T = 1024, same calls: query side 0.259 -> 0.251 ms, key side 0.196 ->
// 0.158, the forward + loss 0.440 -> 0.461 for the copies: stage-1 fwd + bwd 0.960 -> 0.935). The phi_k tile is
// turned into bf16 in place (its products with V and dy are bf16 ones, as when it is recomputed).
struct BwdQ3Layout {
  using TL = Tiles<128>;
  static constexpr size_t Q = 0, K = Q + TL::TILE * 2, V = K + TL::TILE * 2, DY = V + 2 * TL::TILE * 2,
                          WQ = DY + 2 * TL::TILE * 2, WK = WQ + TL::WT * 2, PK = WK + TL::WT * 2, PQ = PK + TL::PT * 2,
                          DP = PQ + TL::PT * 2, Z = DP + 64 * V3_LDN * 4, INV = Z + 2 * NF * 4, DEL = INV + 2 * 64 * 4,
                          BYTES = DEL + 2 * 64 * 4;
  // PHI_SAVED: no W tiles; their room holds the y and y_lo tiles of the chunk when the kernel forms delta.
  static constexpr size_t Y = WQ, YLO = Y + TL::TILE * 2;
  static_assert(2 * TL::TILE <= 2 * TL::WT, "y and y_lo fit where Wq and Wk would be");
};
// WG (Hopper, with the saved maps): the products as wgmma, as in the key-side kernel: dphi_q^T = S dy^T two chains
// (S split hi + lo), S += phi_k^T V one. The V, dy and phi_k slots are 128-byte swizzled (first, on the
// 1024-aligned base); the phi_q slots and the y tiles stay padded (read by rows).
struct BwdQ3WgLayout {
  using TL = Tiles<128>;
  static constexpr size_t V = 0, DY = V + 2 * WG_TILE, PK = DY + 2 * WG_TILE, PQ = PK + 2 * WG_TILE, Y = PQ + 2 * TL::PT * 2,
                          YLO = Y + TL::TILE * 2, DP = YLO + TL::TILE * 2, Z = DP + 64 * V3_LDN * 4, INV = Z + 2 * NF * 4,
                          DEL = INV + 2 * 64 * 4, BYTES = DEL + 2 * 64 * 4 + 1024;
};
// sc (this warp's 16 rows x 64 keys) = X K^T in mma.sync, X register A fragments (d = 128), K a swizzled 64-key tile.
__device__ __forceinline__ void mul_x_keys_swz(float (&sc)[8][4], const uint32_t (&X)[8][4], const void* K) {
  #pragma unroll
  for (int i = 0; i < 8; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
  #pragma unroll
  for (int kt = 0; kt < 8; kt++)
    #pragma unroll
    for (int np = 0; np < 4; np++) {
      uint32_t bb[4];
      frag_b_nk_swz(bb, K, 16 * np, 16 * kt);
      mma_bf16(sc[2 * np], X[kt], bb[0], bb[1]);
      mma_bf16(sc[2 * np + 1], X[kt], bb[2], bb[3]);
    }
}
template <bool SLIDING, bool PHI_SAVED, bool OWN_DELTA = false, bool WG = false>
static __global__ void __launch_bounds__(V3_THREADS, 1) fast_backward_query_v3_kernel(FastBwdArgs a) {
  static_assert(PHI_SAVED || !OWN_DELTA, "delta is formed only with the saved maps (the W tiles' room)");
  static_assert(PHI_SAVED || !WG, "the Hopper form loads the saved maps");
  constexpr int D = 128;
  using TL = Tiles<D>;
  using LY = BwdQ3Layout;
  using LW = BwdQ3WgLayout;
  constexpr int LDT = TL::LDT, LDP = TL::LDP, LDN = V3_LDN;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  const int rg = warp & 3, hf = warp >> 2, row0 = 16 * rg;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // WG: the 1024-aligned base the swizzled tiles need (BYTES has the slack)
  unsigned char* sm = WG ? smem_raw + (((smem_u32(smem_raw) + 1023) & ~1023u) - smem_u32(smem_raw)) : smem_raw;
  constexpr int XT = WG ? WG_TILE / 2 : TL::TILE;  // elements a V or dy slot
  bf16* sQ = (bf16*)(sm + LY::Q);
  bf16* sK = (bf16*)(sm + LY::K);
  bf16* sV = (bf16*)(sm + (WG ? LW::V : LY::V));
  bf16* sDY = (bf16*)(sm + (WG ? LW::DY : LY::DY));
  bf16* sWq = (bf16*)(sm + LY::WQ);
  bf16* sWk = (bf16*)(sm + LY::WK);
  bf16* sPK = (bf16*)(sm + LY::PK);
  __half* sPQ = (__half*)(sm + LY::PQ);
  float* sDP = (float*)(sm + (WG ? LW::DP : LY::DP));  // dphi_q (query, feature)
  float* sZ = (float*)(sm + (WG ? LW::Z : LY::Z));      // [2][128]: z before chunk c (c & 1), and after
  float* sInv = (float*)(sm + (WG ? LW::INV : LY::INV));  // [2][64] 1 / den of the chunk's query rows (slot c & 1)
  float* sDel = (float*)(sm + (WG ? LW::DEL : LY::DEL));  // [2][64] delta
  bf16* sY = (bf16*)(sm + (WG ? LW::Y : LY::Y));          // PHI_SAVED with a.y: y_c and y_lo_c (one slot each)
  bf16* sYlo = (bf16*)(sm + (WG ? LW::YLO : LY::YLO));

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  // Row statistics: chunk c+1's are loaded into registers at the top of chunk c, ahead of its tile copies,
  // and stored after chunk c's work. Loaded where they are used, behind the block's cp.async copies, they
  // waited ~2 us a chunk with every warp at the next barrier (H200, T = 1024, stage 1: query side 0.252 ms,
  // 0.177 with the loads knocked out).
  // OWN_DELTA (the full backward with the saved maps): delta_i = dy_i . y_i / den_i is formed here, in (A),
  // from the y and y_lo tiles, and written for the later kernels, instead of by a pass of its own before this
  // kernel. H200, T = 1024: that pass took 0.060 ms (with y_lo; 0.042 without), this kernel 0.157 -> 0.191
  // (knock-outs: the y tiles' loads and the sums cost about half each), full fwd + bwd 1.443 -> 1.420-1.439.
  // Its own instantiation, so that stage 1's kernel stays as it was.
  constexpr bool own_delta = OWN_DELTA;
  float next_den = INFINITY, next_del = 0.0f;
  auto load_stats = [&](int c) {
    if (tid < 64) {
      const bool ok = c * CHUNK + tid < s.T;
      const size_t ri = row_index(s, b, ok ? c * CHUNK + tid : 0, h);
      next_den = ok ? a.sv.row_den[ri] : INFINITY;  // 1 / inf: rows past T get 0
      next_del = ok && !own_delta ? a.sv.row_delta[ri] : 0.0f;
    }
  };
  auto store_stats = [&](int c) {
    if (tid < 64) {
      sInv[(c & 1) * 64 + tid] = 1.0f / next_den;
      if (!own_delta) sDel[(c & 1) * 64 + tid] = next_del;
    }
  };
  const bf16* qb = a.q + row_index(s, b, 0, h) * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  const bf16* dyb = a.dy + row_index(s, b, 0, h) * D;
  auto rows_in = [&](int c) { return min(CHUNK, s.T - c * CHUNK); };
  auto load_y = [&](int c) {
    const size_t o = (size_t)c * CHUNK * qstride;
    load_rows_async<D, V3_THREADS>(sY, LDT, a.y + row_index(s, b, 0, h) * D + o, qstride, 64, rows_in(c));
    if (a.y_lo) load_rows_async<D, V3_THREADS>(sYlo, LDT, a.y_lo + row_index(s, b, 0, h) * D + o, qstride, 64, rows_in(c));
  };
  // Saved feature maps: phi_q(c) in slot c & 1 of (sPQ, sQ), phi_k(c-1) in slot c & 1 of (sPK, sK).
  const size_t pstride = (size_t)s.H * NF;
  const unsigned short* pqb = PHI_SAVED ? (const unsigned short*)a.sv.phi_q + row_index(s, b, 0, h) * NF : nullptr;
  const unsigned short* pkb = PHI_SAVED ? (const unsigned short*)a.sv.phi_k + row_index(s, b, 0, h) * NF : nullptr;
  // (WG: phi_q(c) in slot c & 1 of LW::PQ, phi_k(c-1) in slot c & 1 of LW::PK, swizzled)
  auto pq_slot = [&](int c) {
    if constexpr (WG) return (unsigned short*)(sm + LW::PQ + (c & 1) * TL::PT * 2);
    else return (unsigned short*)((c & 1) ? (void*)sQ : (void*)sPQ);
  };
  auto pk_slot = [&](int c) {
    if constexpr (WG) return (unsigned short*)(sm + LW::PK + (c & 1) * WG_TILE);
    else return (unsigned short*)((c & 1) ? (void*)sK : (void*)sPK);
  };
  // The tiles chunk c reads: Q_c, dy_c (slot c & 1), K_{c-1}, V_{c-1} (slot (c-1) & 1).
  auto load_for = [&](int c) {
    if (PHI_SAVED) load_rows_async<NF, V3_THREADS>(pq_slot(c), LDP, pqb + (size_t)c * CHUNK * pstride, pstride, 64, rows_in(c));
    else load_rows_async<D, V3_THREADS>(sQ, LDT, qb + (size_t)c * CHUNK * qstride, qstride, 64, rows_in(c));
    if constexpr (WG) {
      load_tile_swz_async<64, V3_THREADS>(smem_u32(sDY + (c & 1) * XT), dyb + (size_t)c * CHUNK * qstride, qstride, rows_in(c), tid);
      if (c >= 1) {
        load_tile_swz_async<64, V3_THREADS>(smem_u32(pk_slot(c)), (const bf16*)(pkb + (size_t)(c - 1) * CHUNK * pstride), pstride,
                                            rows_in(c - 1), tid);
        load_tile_swz_async<64, V3_THREADS>(smem_u32(sV + ((c - 1) & 1) * XT), vb + (size_t)(c - 1) * CHUNK * kstride, kstride,
                                            rows_in(c - 1), tid);
      }
      return;
    }
    load_rows_async<D, V3_THREADS>(sDY + (c & 1) * TL::TILE, LDT, dyb + (size_t)c * CHUNK * qstride, qstride, 64, rows_in(c));
    if (c >= 1) {
      if (PHI_SAVED) load_rows_async<NF, V3_THREADS>(pk_slot(c), LDP, pkb + (size_t)(c - 1) * CHUNK * pstride, pstride, 64, rows_in(c - 1));
      else load_rows_async<D, V3_THREADS>(sK, LDT, kb + (size_t)(c - 1) * CHUNK * kstride, kstride, 64, rows_in(c - 1));
      load_rows_async<D, V3_THREADS>(sV + ((c - 1) & 1) * TL::TILE, LDT, vb + (size_t)(c - 1) * CHUNK * kstride, kstride, 64, rows_in(c - 1));
    }
  };
  if (!PHI_SAVED) {
    load_rows_async<64, V3_THREADS>(sWq, TL::LDW, a.Wq + (size_t)h * D * 64, 64, D, D);
    load_rows_async<64, V3_THREADS>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  }
  load_stats(c_begin);
  load_for(c_begin);
  if (own_delta) load_y(c_begin);
  cp_async_commit();
  store_stats(c_begin);
  float st[16][4];  // S: rows = features 16 warp + g (+8), n-tile j = d columns 8j + 2t (+1)
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int f = 16 * warp + g + 8 * r;
        const float2 v2 = seg > 0 ? *(const float2*)&a.segS[(base + f) * D + 8 * j + 2 * t] : make_float2(0.0f, 0.0f);
        st[j][2 * r] = v2.x;
        st[j][2 * r + 1] = v2.y;
      }
    if (tid < NF) sZ[(c_begin & 1) * NF + tid] = seg > 0 ? a.segZ[base + tid] : 0.0f;
  }

  for (int c = c_begin; c < c_end; c++) {
    const bf16* Vp = sV + ((c - 1) & 1) * XT;
    const bf16* DYc = sDY + (c & 1) * XT;
    const __half* PQc = PHI_SAVED ? (const __half*)pq_slot(c) : sPQ;
    const bf16* PKc = PHI_SAVED ? (const bf16*)pk_slot(c) : sPK;
    const float* zc = sZ + (c & 1) * NF;
    float* zn = sZ + ((c + 1) & 1) * NF;
    const float* sInvc = sInv + (c & 1) * 64;
    const float* sDelc = sDel + (c & 1) * 64;
    const bool has_prev = c >= 1, has_state = c >= 2;
    const int i0 = c * CHUNK;
    cp_async_wait<0>();
    __syncthreads();  // this chunk's tiles and statistics are in; the last chunk's readers are done
    if (c + 1 < c_end) load_stats(c + 1);
    if (PHI_SAVED) {  // chunk c+1's tiles go to the other slots, last read in chunk c-1
      if (c + 1 < c_end) load_for(c + 1);
      cp_async_commit();
    }

    // (A) feature maps
    if (PHI_SAVED) {
      if (has_prev) {  // the products with V and dy are in bf16
        if constexpr (WG) tile_convert_v3<64, false>((void*)PKc, 64, 128);  // (a swizzled tile: 128 rows of 64)
        else tile_convert_v3<NF, false>((void*)PKc, LDP, 64);
      }
      if (own_delta) {  // delta of the chunk's rows: 8 threads a row (16-byte pieces p, p + 8: conflict-free), 2 passes
        const int p = tid & 7;
        #pragma unroll
        for (int pass = 0; pass < 2; pass++) {
          const int r = (tid >> 3) + 32 * pass;
          float acc[2] = {0.0f, 0.0f};
          #pragma unroll
          for (int i = 0; i < 2; i++) {
            const int col = 8 * (p + 8 * i);
            const uint4 dv4 = WG ? *(const uint4*)((const unsigned char*)DYc + swz_off(r, col)) : *(const uint4*)(DYc + r * LDT + col);
            const uint4 yv4 = *(const uint4*)(sY + r * LDT + col);
            const uint4 lv4 = a.y_lo ? *(const uint4*)(sYlo + r * LDT + col) : make_uint4(0u, 0u, 0u, 0u);
            const uint32_t* dw = (const uint32_t*)&dv4;
            const uint32_t* yw = (const uint32_t*)&yv4;
            const uint32_t* lw = (const uint32_t*)&lv4;
            #pragma unroll
            for (int j = 0; j < 4; j++) acc[i] += dy_dot_y2(dw[j], yw[j], lw[j]);
          }
          float sum = acc[0] + acc[1];
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          sum += __shfl_xor_sync(0xffffffffu, sum, 4);
          if (p == 0) {
            const float dl = sum * sInvc[r];
            sDel[(c & 1) * 64 + r] = dl;
            if (i0 + r < s.T) a.sv.row_delta[row_index(s, b, i0 + r, h)] = dl;
          }
        }
      }
      __syncthreads();  // phi_k in bf16; delta in
      if (own_delta && c + 1 < c_end) {  // the y tiles were read
        load_y(c + 1);
        cp_async_commit();
      }
      for (int idx = tid; idx < 64 * (NF / 8); idx += V3_THREADS) {  // phi_q / den for the key side, 16 bytes a step
        const int r = idx / (NF / 8), cc = idx % (NF / 8);
        if (i0 + r >= s.T) continue;
        const uint4 x = *(const uint4*)((const unsigned short*)PQc + r * LDP + 8 * cc);
        const uint32_t* w = (const uint32_t*)&x;
        const float inv = sInvc[r];
        uint4 o4;
        uint32_t* ow = (uint32_t*)&o4;
        #pragma unroll
        for (int i = 0; i < 4; i++) ow[i] = pack_bf16(f16_lo(w[i]) * inv, f16_hi(w[i]) * inv);
        *(uint4*)(a.phiq_out + row_index(s, b, i0 + r, h) * NF + 8 * cc) = o4;
      }
    } else if (hf == 0) {
      if (has_prev) {
        float ph[16][4];
        feature_map_smem<D>(ph, sK, row0, sWk);
        const int j0 = (c - 1) * CHUNK + row0;
        store_phi<false>(sPK, LDP, row0, ph, j0 + g >= s.sinks, j0 + g + 8 >= s.sinks);
      }
    } else {
      float ph[16][4];
      feature_map_smem<D>(ph, sQ, row0, sWq);
      store_phi<true>(sPQ, LDP, row0, ph, true, true);
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int i = i0 + row0 + g + 8 * r;
        if (i < s.T) {
          const size_t ri = row_index(s, b, i, h);
          const float inv = sInvc[row0 + g + 8 * r];
          uint32_t* dst = (uint32_t*)(a.phiq_out + ri * NF);
          #pragma unroll
          for (int j = 0; j < 16; j++) dst[4 * j + t] = pack_bf16(ph[j][2 * r] * inv, ph[j][2 * r + 1] * inv);
        }
      }
    }
    if (!PHI_SAVED) {
      __syncthreads();  // phi tiles; Q_c and K_{c-1} no longer read: fetch for chunk c+1
      if (c + 1 < c_end) load_for(c + 1);
      cp_async_commit();
    }

    // (B) dphi_q^T for this warp's features, then the state update with chunk c-1.
    {
      float dpt[8][4];
      if (has_state) {
        if constexpr (WG) state_times_tile_t_split_wg(dpt, st, DYc);
        else state_times_tile_t<false>(dpt, st, DYc, LDT);
      } else {
        #pragma unroll
        for (int n = 0; n < 8; n++) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
      }
      // z, 1/den and delta into registers before the first store into sDP: the compiler cannot move a shared
      // load above a store it cannot tell apart, so in the loop they were reloaded for every element (ncu: that
      // loop held ~19 % of the kernel's stall samples).
      const float zf[2] = {zc[16 * warp + g], zc[16 * warp + g + 8]};
      float iv[8][2], dl[8][2];
      #pragma unroll
      for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int j = 0; j < 2; j++) { iv[n][j] = sInvc[8 * n + 2 * t + j]; dl[n][j] = sDelc[8 * n + 2 * t + j]; }
      #pragma unroll
      for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          const int qr = 8 * n + 2 * t + (e & 1), f = 16 * warp + g + 8 * (e >> 1);
          sDP[qr * LDN + f] = has_state ? dpt[n][e] * iv[n][e & 1] - dl[n][e & 1] * zf[e >> 1] : 0.0f;
        }
    }
    if (has_prev) {
      if constexpr (WG) state_accumulate_wg<false>(st, PKc, 16 * warp, Vp);
      else state_accumulate<false>(st, PKc, LDP, 16 * warp, Vp, LDT);
    }
    if (tid >= V3_THREADS - NF) {  // warps 4-7 (warps 0-3 had phi_k in (A))
      const int f = tid - (V3_THREADS - NF);
      zn[f] = zc[f];
      if (has_prev) {
        if constexpr (WG) column_sum_update_swz<false>(zn, PKc, f);
        else column_sum_update<false>(zn, PKc, LDP, nullptr, f);
      }
    }
    __syncthreads();  // sDP complete

    // (C) sliding: the linear keys of chunk c-1 (at least w behind): dphi += ((dy V^T) / den - delta) phi_k,
    // rows of row group rg, features [64 hf, +64).
    if (SLIDING && has_prev) {
      uint32_t da[4][4];
      {
        uint32_t dyf[8][4];
        #pragma unroll
        for (int kt = 0; kt < 8; kt++) {
          if constexpr (WG) frag_a_swz(dyf[kt], DYc, row0, 16 * kt);
          else frag_a(dyf[kt], DYc, LDT, row0, 16 * kt);
        }
        float dp[8][4];
        if constexpr (WG) mul_x_keys_swz(dp, dyf, Vp);
        else mul_x_keys<D>(dp, dyf, Vp);
        const int key0 = (c - 1) * CHUNK;
        #pragma unroll
        for (int nt = 0; nt < 8; nt++)
          #pragma unroll
          for (int e = 0; e < 4; e++) {
            const int kl = 8 * nt + 2 * t + (e & 1), rl = row0 + g + 8 * (e >> 1);
            dp[nt][e] = (kl <= rl && key0 + kl >= s.sinks) ? dp[nt][e] * sInvc[rl] - sDelc[rl] : 0.0f;
          }
        pack_c_to_a<false, 8>(da, dp);
      }
      float acc[8][4] = {};
      if constexpr (WG) mul_a_tile_half_swz<false>(acc, da, PKc, 64 * hf);
      else mul_a_tile_half<false>(acc, da, PKc, LDP, 64 * hf);
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) sDP[(row0 + g + 8 * (e >> 1)) * LDN + 64 * hf + 8 * nt + 2 * t + (e & 1)] += acc[nt][e];
      __syncthreads();
    }
    phi_backward_rows_v3<true>(a.du_q + row_index(s, b, i0, h) * 64, (size_t)s.H * 64, PQc, sDP, rows_in(c));
    if (c + 1 < c_end) store_stats(c + 1);  // slot (c + 1) & 1 was last read in chunk c - 1
  }
  cp_async_wait<0>();
}

// ---- stage-1 backward, key side, version 3 ----
// Walks the key chunks backwards with R = sum over query chunks >= c+2 of (phi_q / den)^T dy (warp w owns
// features [16 w, +16) as accumulators) and r = sum phi_q delta (shared, double-buffered). Per key chunk c:
// (A) warps 0-3 phi_k(c) (bf16, sinks and rows past T zeroed); (B) dphi_k^T = R V^T - r for the warp's
// features (no dependence on (A)), then R += (phi_q / den)^T dy of query chunk c+1, and warps 4-7, which
// have no (A), r += phi_q delta (the barrier after (B) waited on warps 0-3 alone); (C) sliding term, du_k.
// dv's sliding term for this warp's 16 keys (row0..) x the head-dim half hf, into acc: the queries of chunk c+1 at
// least w ahead see key chunk c linearly, acc += (phi_k (phi_q / den)^T, masked) dy. FUSED: phi_k (padded) as the
// forward saved it (f16, made bf16 in registers), PQ and DY swizzled; else phi_k in bf16 and all three padded.
template <bool FUSED>
__device__ __forceinline__ void sliding_dv_rows(float (&acc)[8][4], const bf16* PK, const bf16* PQ, const bf16* DY, int row0, int hf) {
  constexpr int LDP = Tiles<128>::LDP, LDT = Tiles<128>::LDT;
  const int ln = lane_id(), g = ln >> 2, t = ln & 3;
  uint32_t pa[4][4];
  {
    float bst[8][4] = {};  // phi_k . phi_q / den (keys x queries), in bf16 as phi_q / den is
    #pragma unroll
    for (int k = 0; k < 8; k++) {
      uint32_t pk[4];
      frag_a(pk, PK, LDP, row0, 16 * k);
      if (FUSED) {
        #pragma unroll
        for (int i = 0; i < 4; i++) pk[i] = pack_bf16(f16_lo(pk[i]), f16_hi(pk[i]));
      }
      #pragma unroll
      for (int np = 0; np < 4; np++) {
        uint32_t bb[4];
        if (FUSED) frag_b_nk_swz(bb, PQ, 16 * np, 16 * k);
        else frag_b_nk(bb, PQ, LDP, 16 * np, 16 * k);
        mma_bf16(bst[2 * np], pk, bb[0], bb[1]);
        mma_bf16(bst[2 * np + 1], pk, bb[2], bb[3]);
      }
    }
    #pragma unroll
    for (int nt = 0; nt < 8; nt++)
      #pragma unroll
      for (int e = 0; e < 4; e++)
        if (row0 + g + 8 * (e >> 1) > 8 * nt + 2 * t + (e & 1)) bst[nt][e] = 0.0f;  // query w or more ahead
    pack_c_to_a<false, 8>(pa, bst);
  }
  if (FUSED) mul_a_tile_half_swz<false>(acc, pa, DY, 64 * hf);
  else mul_a_tile_half<false>(acc, pa, DY, LDT, 64 * hf);
}
// The fused dv of fast_backward_key_v3_kernel<..., WG = true> for key chunk c (rows j0..): this warp's 16 keys
// (row group rg) x the head-dim half hf of dv = phi_k R_c (R_c the scaled f16 tile sR, times inv) + the sliding
// term (the queries of chunk c+1 at least w ahead: (phi_k (phi_q / den)^T, masked) dy), into the fp32 accumulator.
// Kc padded (phi_k, f16), PQc and DYc swizzled (bf16).
__device__ __forceinline__ void key_side_dv(const FastBwdArgs& a, const unsigned char* sR, const bf16* Kc, const bf16* PQc,
                                         const bf16* DYc, float inv, bool linear, bool sliding, int b, int hk, int j0) {
  constexpr int D = 128, LDP = Tiles<D>::LDP;
  const int warp = threadIdx.x >> 5, ln = lane_id(), g = ln >> 2, t = ln & 3, row0 = 16 * (warp & 3), hf = warp >> 2;
  float acc[8][4] = {};
#ifdef LOLCATS_WGMMA
  if (linear) {
    using namespace attention_hopper;
    uint32_t pk[8][4];
    #pragma unroll
    for (int k = 0; k < 8; k++) frag_a(pk[k], Kc, LDP, row0, 16 * k);  // phi_k (f16 as saved)
    const uint32_t r = smem_u32(sR) + hf * (128 * 128);
    fence_regs(acc);
    wgmma_fence();
    #pragma unroll
    for (int k = 0; k < 8; k++) wgmma_rs_m64n64k16_f16_tb(&acc[0][0], pk[k], make_desc(r + k * 2048, 128 * 128, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc);
    #pragma unroll
    for (int n = 0; n < 8; n++)
      #pragma unroll
      for (int e = 0; e < 4; e++) acc[n][e] *= inv;
  }
#endif
  if (sliding) sliding_dv_rows<true>(acc, Kc, PQc, DYc, row0, hf);
  // Four consecutive columns a thread (the quad's pairs exchanged): even t row g, odd t row g + 8.
  const Shape& s = a.s;
  const int j = j0 + row0 + g + 8 * (t & 1);
  float* dst = a.dv_acc + kv_index(s, b, j < s.T ? j : 0, hk) * D + 64 * hf + 4 * (t >> 1);
  #pragma unroll
  for (int nt = 0; nt < 8; nt++) {
    const float s0 = __shfl_xor_sync(0xffffffffu, (t & 1) ? acc[nt][0] : acc[nt][2], 1);
    const float s1 = __shfl_xor_sync(0xffffffffu, (t & 1) ? acc[nt][1] : acc[nt][3], 1);
    const float4 v = (t & 1) ? make_float4(s0, s1, acc[nt][2], acc[nt][3]) : make_float4(acc[nt][0], acc[nt][1], s0, s1);
    if (j < s.T) atomicAdd((float4*)(dst + 8 * nt), v);
  }
}
// WG (Hopper, the full backward with the saved maps): the products as wgmma and the linear part of dv in this
// kernel too, so the dv pass below does not run. The V, phi_q / den and dy tiles are 128-byte swizzled: dphi_k^T =
// R V^T is two wgmma chains (R split hi + lo as register A fragments), R += (phi_q / den)^T dy one (as the
// forward's state update). For dv, each chunk the warps store R_c (in f16, scaled by one power of two for the
// block, from the warps' maxima of the chunk before) to a swizzled shared tile, and each warpgroup forms its half
// of the head dim of dv = phi_k R_c as one wgmma chain (phi_k as register A fragments, R an MN-major B), plus the
// sliding term in mma.sync; the rows go to the fp32 dv accumulator by 16-byte atomics (GQA heads).
template <bool WG, bool DV = WG>
struct BwdK3LayoutT {
  using TL = Tiles<128>;
  static constexpr size_t R_TILE = DV ? (size_t)NF * 128 * 2 : 0;  // R_c (features x d), f16, swizzled halves of d
  static constexpr size_t X_TILE = WG ? WG_TILE : TL::TILE * 2;    // a V, phi_q / den or dy slot
  static_assert(TL::TILE == TL::PT, "a phi tile is a d-tile");
  // (the swizzled slots first, on the 1024-aligned base; without WG the order of version 3's first layout)
  static constexpr size_t R = 0, V = WG ? R + R_TILE : 2 * TL::TILE * 2, PQ = V + 2 * X_TILE, DY = PQ + 2 * X_TILE,
                          K = WG ? DY + 2 * X_TILE : 0, WK = WG ? K + 2 * TL::TILE * 2 : DY + 2 * X_TILE,
                          PK = WK + (WG ? 0 : TL::WT * 2), DP = PK + (WG ? 0 : TL::PT * 2),
                          RV = DP + 64 * V3_LDN * 4, DD = RV + 2 * NF * 4, MX = DD + 2 * 64 * 4,
                          BYTES = MX + (WG ? 2 * 8 * 4 + 1024 : 0);  // WG: the warps' maxima of R; the 1024-byte alignment
};
using BwdK3Layout = BwdK3LayoutT<false>;
// The byte offset of element (r, col) of a 128-row swizzled tile of 16-bit values (halves of 64 columns).
__device__ __forceinline__ int swz_off128(int r, int col) {
  return (col >> 6) * (128 * 128) + r * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4) + 2 * (col & 7);
}
// DV (with WG; without: stage 1, no input gradients): the fused dv.
template <bool SLIDING, bool PHI_SAVED, bool WG = false, bool DV = WG>
static __global__ void __launch_bounds__(V3_THREADS, 1) fast_backward_key_v3_kernel(FastBwdArgs a) {
  static_assert(PHI_SAVED || !WG, "the Hopper form loads the saved maps");
  static_assert(WG || !DV, "the fused dv is part of the Hopper form");
  constexpr int D = 128;
  using TL = Tiles<D>;
  using LY = BwdK3LayoutT<WG, DV>;
  constexpr int XT = LY::X_TILE / 2;  // elements a V, phi_q / den or dy slot
  constexpr int LDT = TL::LDT, LDP = TL::LDP, LDN = V3_LDN;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  const int rg = warp & 3, hf = warp >> 2, row0 = 16 * rg;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // WG: the 1024-aligned base the swizzled tiles need (BYTES has the slack)
  unsigned char* sm = WG ? smem_raw + (((smem_u32(smem_raw) + 1023) & ~1023u) - smem_u32(smem_raw)) : smem_raw;
  unsigned char* sR = sm + LY::R;
  bf16* sK = (bf16*)(sm + LY::K);
  bf16* sV = (bf16*)(sm + LY::V);
  bf16* sPQ = (bf16*)(sm + LY::PQ);
  bf16* sDY = (bf16*)(sm + LY::DY);
  bf16* sWk = (bf16*)(sm + LY::WK);
  bf16* sPK = (bf16*)(sm + LY::PK);
  float* sDP = (float*)(sm + LY::DP);  // dphi_k (key, feature)
  float* sRv = (float*)(sm + LY::RV);  // [2][128] r, double-buffered by chunk parity
  float* sDD = (float*)(sm + LY::DD);  // [2][64] delta * den of the query rows of chunk c+1
  float* sMx = (float*)(sm + LY::MX);  // DV: [2][8] the warps' max |R_c|, by chunk parity
  // DV: this warp's max |R| for chunk cn (read by all warps after the next barrier)
  auto note_max = [&](const float (&r)[16][4], int cn) {
    float mx = 0.0f;
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int e = 0; e < 4; e++) mx = fmaxf(mx, fabsf(r[j][e]));
    mx = warp_max(mx);
    if (ln == 0) sMx[(cn & 1) * 8 + warp] = mx;
  };

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  const bf16* dyb = a.dy + row_index(s, b, 0, h) * D;
  const bf16* pqb = a.phiq_in + row_index(s, b, 0, h) * NF;
  auto rows_in = [&](int c) { return max(0, min(CHUNK, s.T - c * CHUNK)); };
  // PHI_SAVED: the forward's phi_k(c) takes K_c's slot (zero for the last chunk, which the forward never maps:
  // nothing follows it, so its dphi_k and du_k are zero whatever phi_k is).
  const unsigned short* pkb = PHI_SAVED ? (const unsigned short*)a.sv.phi_k + row_index(s, b, 0, h) * NF : nullptr;
  auto load_iter = [&](int c) {  // K_c, V_c, and phi_q / den, dy, delta * den of query chunk c+1 (if any)
    const int sl = c & 1;
    if (PHI_SAVED)
      load_rows_async<NF, V3_THREADS>((unsigned short*)sK + sl * TL::TILE, LDP, pkb + (size_t)c * CHUNK * s.H * NF, (size_t)s.H * NF, 64,
                             c + 1 < s.NC ? rows_in(c) : 0);
    else
      load_rows_async<D, V3_THREADS>(sK + sl * TL::TILE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    const int qc = c + 1, nq = qc < s.NC ? rows_in(qc) : 0;
    const size_t q0 = nq > 0 ? (size_t)qc * CHUNK : 0;  // no query chunk: all zeros, from a valid address
    if constexpr (WG) {
      load_tile_swz_async<64, V3_THREADS>(smem_u32(sV + sl * XT), vb + (size_t)c * CHUNK * kstride, kstride, rows_in(c), tid);
      load_tile_swz_async<64, V3_THREADS>(smem_u32(sPQ + sl * XT), pqb + q0 * s.H * NF, (size_t)s.H * NF, nq, tid);
      load_tile_swz_async<64, V3_THREADS>(smem_u32(sDY + sl * XT), dyb + q0 * qstride, qstride, nq, tid);
    } else {
      load_rows_async<D, V3_THREADS>(sV + sl * XT, LDT, vb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
      load_rows_async<NF, V3_THREADS>(sPQ + sl * XT, LDP, pqb + q0 * s.H * NF, (size_t)s.H * NF, 64, nq);
      load_rows_async<D, V3_THREADS>(sDY + sl * XT, LDT, dyb + q0 * qstride, qstride, 64, nq);
    }
    if (tid < 64) {
      const bool ok = tid < nq;
      const size_t ri = row_index(s, b, ok ? qc * CHUNK + tid : 0, h);
      sDD[sl * 64 + tid] = ok ? a.sv.row_delta[ri] * a.sv.row_den[ri] : 0.0f;
    }
  };
  if (!PHI_SAVED) load_rows_async<64, V3_THREADS>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  load_iter(c_end - 1);
  cp_async_commit();
  float st[16][4];  // R: rows = features 16 warp + g (+8), n-tile j = d columns 8j + 2t (+1)
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    const bool last = seg == (int)gridDim.x - 1;
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        const int f = 16 * warp + g + 8 * r;
        const float2 v2 = last ? make_float2(0.0f, 0.0f) : *(const float2*)&a.segR[(base + f) * D + 8 * j + 2 * t];
        st[j][2 * r] = v2.x;
        st[j][2 * r + 1] = v2.y;
      }
    if (tid < NF) sRv[((c_end - 1) & 1) * NF + tid] = last ? 0.0f : a.segRz[base + tid];
  }
  if (DV) note_max(st, c_end - 1);

  for (int c = c_end - 1; c >= c_begin; c--) {
    const int sl = c & 1;
    const bf16* Kc = sK + sl * TL::TILE;
    const bf16* Vc = sV + sl * XT;
    const bf16* PQc = sPQ + sl * XT;
    const bf16* DYc = sDY + sl * XT;
    const float* dd = sDD + sl * 64;
    const float* rc = sRv + sl * NF;
    float* rn = sRv + (sl ^ 1) * NF;
    const int j0 = c * CHUNK;
    const bool has_q = c + 1 < s.NC, has_state = c + 2 < s.NC;
    cp_async_wait<0>();
    __syncthreads();  // this chunk's tiles are in; the last chunk's readers are done
    if (c - 1 >= c_begin) load_iter(c - 1);
    cp_async_commit();

    // (A) phi_k of this chunk (row groups, warps 0-3)
    const bf16* PKc = PHI_SAVED ? Kc : sPK;
    if (!PHI_SAVED && hf == 0) {
      float ph[16][4];
      feature_map_smem<D>(ph, Kc, row0, sWk);
      const int jr = j0 + row0 + g;
      store_phi<false>(sPK, LDP, row0, ph, jr >= s.sinks && jr < s.T, jr + 8 >= s.sinks && jr + 8 < s.T);
    }
    // (B) dphi_k^T = R V^T - r for this warp's features, then R, r take query chunk c+1.
    {
      float dpt[8][4];
      if (has_state) {
        if constexpr (WG) state_times_tile_t_split_wg(dpt, st, Vc);
        else state_times_tile_t<false>(dpt, st, Vc, LDT);
      } else {
        #pragma unroll
        for (int n = 0; n < 8; n++) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
      }
      const float rf[2] = {rc[16 * warp + g], rc[16 * warp + g + 8]};  // before the stores (the query side's note)
      #pragma unroll
      for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) {
          const int kr = 8 * n + 2 * t + (e & 1), f = 16 * warp + g + 8 * (e >> 1);
          sDP[kr * LDN + f] = has_state ? dpt[n][e] - rf[e >> 1] : 0.0f;
        }
    }
    float dsc_inv = 1.0f;  // DV: the inverse of R_c's scale in the f16 tile
    if (DV && has_state) {  // R_c into the f16 tile before the update (dv of chunk c takes query chunks >= c+2)
      float mx = sMx[(c & 1) * 8];
      #pragma unroll
      for (int w = 1; w < 8; w++) mx = fmaxf(mx, sMx[(c & 1) * 8 + w]);
      // warp_f16_scale's rule with the block's max: |R| * scale < 2^14, both normal floats
      const int ex = (__float_as_int(mx) >> 23) & 0xff, sh = max(-100, min(100, 140 - ex));
      const float sc = __int_as_float((127 + sh) << 23);
      dsc_inv = __int_as_float((127 - sh) << 23);
      #pragma unroll
      for (int j = 0; j < 16; j++)
        #pragma unroll
        for (int r = 0; r < 2; r++)
          *(uint32_t*)(sR + swz_off128(16 * warp + g + 8 * r, 8 * j + 2 * t)) = pack_f16(st[j][2 * r] * sc, st[j][2 * r + 1] * sc);
    }
    if (has_q) {
      if constexpr (WG) state_accumulate_wg<false>(st, PQc, 16 * warp, DYc);
      else state_accumulate<false>(st, PQc, LDP, 16 * warp, DYc, LDT);
    }
    if (DV && c - 1 >= c_begin) note_max(st, c - 1);
    if (tid >= V3_THREADS - NF) {  // warps 4-7, which have no (A): H200, T = 1024, 0.212 -> 0.202 ms
      const int f = tid - (V3_THREADS - NF);
      rn[f] = rc[f];
      if (has_q) {
        if constexpr (WG) column_sum_update_swz<false>(rn, PQc, f, dd);
        else column_sum_update<false>(rn, PQc, LDP, dd, f);
      }
    }
    __syncthreads();  // sPK, sDP (DV: sR) complete
    if (DV && (has_state || (SLIDING && has_q))) key_side_dv(a, sR, Kc, PQc, DYc, dsc_inv, has_state, SLIDING && has_q, b, hk, j0);

    // (C) sliding: the queries of chunk c+1 at least w ahead (kl <= ql) see these keys linearly:
    // dphi_k += ((V dy^T) - delta den) . (phi_q / den), key rows of row group rg, features [64 hf, +64).
    if (SLIDING && has_q) {
      uint32_t da[4][4];
      {
        float dpt[8][4];
        if constexpr (WG) {  // dP^T = V dy^T
          #pragma unroll
          for (int n = 0; n < 8; n++) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
          #pragma unroll
          for (int kt = 0; kt < 8; kt++) {
            uint32_t xa[4];
            frag_a_swz(xa, Vc, row0, 16 * kt);
            #pragma unroll
            for (int np = 0; np < 4; np++) {
              uint32_t bb[4];
              frag_b_nk_swz(bb, DYc, 16 * np, 16 * kt);
              mma_bf16(dpt[2 * np], xa, bb[0], bb[1]);
              mma_bf16(dpt[2 * np + 1], xa, bb[2], bb[3]);
            }
          }
        } else {
          mul_x_keys_smem<D>(dpt, Vc, row0, DYc);  // dP^T = V dy^T
        }
        #pragma unroll
        for (int nt = 0; nt < 8; nt++)
          #pragma unroll
          for (int e = 0; e < 4; e++) {
            const int kl = row0 + g + 8 * (e >> 1), ql = 8 * nt + 2 * t + (e & 1);
            dpt[nt][e] = kl <= ql ? dpt[nt][e] - dd[ql] : 0.0f;
          }
        pack_c_to_a<false, 8>(da, dpt);
      }
      float acc[8][4] = {};
      if constexpr (WG) mul_a_tile_half_swz<false>(acc, da, PQc, 64 * hf);
      else mul_a_tile_half<false>(acc, da, PQc, LDP, 64 * hf);
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) sDP[(row0 + g + 8 * (e >> 1)) * LDN + 64 * hf + 8 * nt + 2 * t + (e & 1)] += acc[nt][e];
      __syncthreads();
    }
    phi_backward_rows_v3<PHI_SAVED>(a.du_k + row_index(s, b, j0, h) * 64, (size_t)s.H * 64, PKc, sDP, rows_in(c));
  }
  cp_async_wait<0>();
}

// ---- full backward, version 3: the feature-map part of dq and dk ----
// out (rows, Ho, D) = sum over the G heads o G + i of output head o of du (rows, Ho G, 64) . W^T, with W
// (Ho G, D, 64) as the maps are stored. dq: G = 1, Ho = H (du_q Wq^T per head, bf16 into dq itself, which the
// window dq kernel then completes); dk: G = the GQA group, Ho = Hkv (du_k Wk^T summed over the heads that share
// k, fp32 into dk_acc). A pass of its own because inside the window kernels W (16 KB a head) has no room in
// shared memory at 2 blocks an SM, and read from L2 there it stalled every warp at once (ncu, H200, T = 1024:
// 16 % of the dk/dv window kernel's samples, 25 % of the dq one's). Here W of the G heads sits in shared
// memory, each warp takes 16 rows at a time, and the next head's du fragments load while one head multiplies.
// dq's part goes out in bf16 (rounded twice, like two gradient contributions summed in a bf16 model): in fp32
// its 4 bytes an element, written and read back, cost 0.03 ms of the 1.6 (H200, T = 1024).
template <class OutT>
struct DuWeightsArgs {
  OutT* out;
  const bf16 *du, *W;
  long long rows;
  int Ho, G;        // output heads, input heads per output head
  int g0, gc;       // this launch sums input heads [g0, g0 + gc) of each group (W of gc heads in shared memory)
  bool accumulate;  // out += (fp32 only: the later launches of a group split in pieces)
};
constexpr int DUW_MAX_HEADS = 8;  // W heads a launch holds in shared memory (8 x 18 KB)
constexpr int DUW_WARPS = 8;
// A warp's output staging rows: 8 rows of D + 8 values (rows 4 or 8 banks apart: the fragment stores of a
// half-warp hit distinct banks).
constexpr int duw_stage_ld(int D) { return D + 8; }
template <class OutT>
inline size_t du_weights_smem(int G, int D) {  // G: W heads held (at most DUW_MAX_HEADS)
  return (size_t)G * D * (64 + 8) * 2 + (size_t)DUW_WARPS * 8 * duw_stage_ld(D) * sizeof(OutT);
}
template <int D, class OutT>
static __global__ void __launch_bounds__(DUW_WARPS * 32, 2) du_weights_kernel(DuWeightsArgs<OutT> a) {
  constexpr int LDW = Tiles<D>::LDW, NT = D / 8;
  const int o = blockIdx.y, warp = threadIdx.x >> 5, ln = threadIdx.x & 31, g = ln >> 2, t = ln & 3;
  constexpr int LDS = duw_stage_ld(D), CPR = D * (int)sizeof(OutT) / 16;  // 16-byte pieces a row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sW = (bf16*)smem_raw;  // [G][D][LDW]
  OutT* stage = (OutT*)(smem_raw + (size_t)a.gc * D * LDW * 2) + warp * 8 * LDS;  // this warp's [8][LDS]
  const int h0 = o * a.G + a.g0;  // the launch's first input head of group o
  for (int i = 0; i < a.gc; i++)
    load_rows_async<64, DUW_WARPS * 32>(sW + i * D * LDW, LDW, a.W + (size_t)(h0 + i) * D * 64, 64, D, D);
  cp_async_commit();
  const size_t in_stride = (size_t)a.Ho * a.G * 64;
  const bf16* du = a.du + (size_t)h0 * 64;
  cp_async_wait<0>();
  __syncthreads();
  // The warp's (16-row tile, head) pairs in order; the next pair's du fragments load while one multiplies.
  const long long step = (long long)gridDim.x * DUW_WARPS * 16;
  long long r0 = ((long long)blockIdx.x * DUW_WARPS + warp) * 16;
  if (r0 >= a.rows) return;
  auto rows_at = [&](long long r) { return (int)min(16LL, a.rows - r); };
  uint32_t uf[4][4], un[4][4];
  frag_a_global<64>(uf, du + r0 * in_stride, in_stride, 0, rows_at(r0));
  float acc[NT][4] = {};
  for (int i = 0;;) {
    long long r1 = r0;
    int i1 = i + 1;
    if (i1 == a.gc) { i1 = 0; r1 += step; }
    const bool more = r1 < a.rows;
    if (more) frag_a_global<64>(un, du + r1 * in_stride + i1 * 64, in_stride, 0, rows_at(r1));
    {
      const bf16* Wi = sW + i * D * LDW;
      #pragma unroll
      for (int kk = 0; kk < 4; kk++)
        #pragma unroll
        for (int np = 0; np < D / 16; np++) {
          uint32_t bb[4];
          frag_b_nk(bb, Wi, LDW, 16 * np, 16 * kk);  // B[k][n] = W[n][k]
          mma_bf16(acc[2 * np], uf[kk], bb[0], bb[1]);
          mma_bf16(acc[2 * np + 1], uf[kk], bb[2], bb[3]);
        }
    }
    if (i + 1 == a.gc) {  // the tile's sum is complete: out through the staging rows, 16-byte stores
      // (the fragments' 4- and 8-byte stores straight to global half-filled their sectors and were 56 % of
      // the samples, ncu)
      const int nval = rows_at(r0);
      #pragma unroll
      for (int r = 0; r < 2; r++) {
        #pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          OutT* sp = stage + g * LDS + 8 * nt + 2 * t;
          if constexpr (std::is_same<OutT, float>::value) *(float2*)sp = make_float2(acc[nt][2 * r], acc[nt][2 * r + 1]);
          else *(uint32_t*)sp = pack_bf16(acc[nt][2 * r], acc[nt][2 * r + 1]);
          acc[nt][2 * r] = acc[nt][2 * r + 1] = 0.0f;
        }
        __syncwarp();
        #pragma unroll
        for (int k = 0; k < 8 * CPR / 32; k++) {
          const int piece = ln + 32 * k, rr = piece / CPR, cc = piece % CPR;
          if (8 * r + rr >= nval) continue;
          uint4* dst = (uint4*)((char*)(a.out + ((r0 + 8 * r + rr) * a.Ho + o) * D) + 16 * cc);
          uint4 v = *(const uint4*)((const char*)(stage + rr * LDS) + 16 * cc);
          if constexpr (std::is_same<OutT, float>::value) {
            if (a.accumulate) {
              const float4 x = *(const float4*)dst;
              float4& f = *(float4*)&v;
              f.x += x.x; f.y += x.y; f.z += x.z; f.w += x.w;
            }
          }
          *dst = v;
        }
        __syncwarp();
      }
    }
    if (!more) break;
    r0 = r1;
    i = i1;
    #pragma unroll
    for (int kk = 0; kk < 4; kk++)
      #pragma unroll
      for (int e = 0; e < 4; e++) uf[kk][e] = un[kk][e];
  }
}

// ---- full backward, version 3: the window part of dq (stateless) ----
// One block of 4 warps per (query chunk c, kv head, b), warp w owning query rows [16w, +16); it loops over
// the query heads of the GQA group, which share the key / value tiles (loaded once), with the next head's
// query tile arriving while this one computes. No state: every chunk runs in parallel (two blocks an SM).
// From the saved max: the probabilities of the softmax tiles (the sinks from chunk 2 on, chunk c-1, the
// causal part of chunk c), ds = A (g.v - delta), its row sums (-dm_i, for the max's gradient on the key
// side, and the window factor's term), and
// dq = du_q Wq^T (the feature-map part, which du_weights_kernel wrote into dq) + ds K / sqrt(d) + dm_i k_{j*} / sqrt(d).
// ---- pieces shared by the two window dq kernels (mma.sync and wgmma) ----
// A head's row statistics: den, delta, m, arg max [4][64] at st, the window logit at st[256]; cp.async, not
// committed (loaded into registers at the top of their head, they stalled every warp: ncu, 9 % of the samples).
__device__ __forceinline__ void window_q_stats_async(float* st, const FastBwdArgs& a, int b, int c, int h, int rows, int tid) {
  const Shape& s = a.s;
  if (tid < 64) {
    const bool ok = tid < rows;
    const size_t ri = row_index(s, b, ok ? c * CHUNK + tid : 0, h);
    cp_async4(st + tid, a.sv.row_den + ri, ok);
    cp_async4(st + 64 + tid, a.sv.row_delta + ri, ok);
    cp_async4(st + 128 + tid, a.sv.row_max + ri, ok);
    cp_async4(st + 192 + tid, a.sv.row_argmax + ri, ok);
  } else if (tid == 64) {
    cp_async4(st + 256, a.wlogit + h, true);
  }
}
// Zeroes rows [c * 64, + rows) of kv head hk's dv accumulator (the dv pass adds into it next): no memset pass.
template <int D>
__device__ __forceinline__ void zero_dv_acc_rows(const FastBwdArgs& a, int b, int c, int hk, int rows, int tid) {
  if (!a.dv_acc) return;
  float4* z = (float4*)(a.dv_acc + kv_index(a.s, b, c * CHUNK, hk) * D);
  for (int r = tid / (D / 4); r < rows; r += 128 / (D / 4)) z[(size_t)r * a.s.Hkv * (D / 4) + tid % (D / 4)] = make_float4(0.f, 0.f, 0.f, 0.f);
}
// The thread's two dq rows (i0 + g, + 8) of head h in the C layout: the feature-map part du_q Wq^T that
// du_weights_kernel wrote into dq (each thread reads the words it will write); zero without dq.
template <int D>
__device__ __forceinline__ void load_dq_rows(float (&dqa)[D / 8][4], const FastBwdArgs& a, int b, int i0, int h, const bool (&valid)[2]) {
  const int t = lane_id() & 3, g = lane_id() >> 2;
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    const uint32_t* src = (const uint32_t*)(a.dq + row_index(a.s, b, valid[r] ? i0 + g + 8 * r : 0, h) * D) + t;
    #pragma unroll
    for (int nt = 0; nt < D / 8; nt++) {
      const uint32_t x = a.dq && valid[r] ? src[4 * nt] : 0u;
      dqa[nt][2 * r] = bf16_lo(x);
      dqa[nt][2 * r + 1] = bf16_hi(x);
    }
  }
}
// The thread's rows' statistics from a head's block (window_q_stats_async's layout).
__device__ __forceinline__ WinRows window_q_rows(const float* st, int rl0, const bool (&valid)[2], int (&arg)[2]) {
  float inv[2], delta[2], m[2];
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    const int rl = rl0 + 8 * r;
    inv[r] = valid[r] ? 1.0f / st[rl] : 0.0f;
    delta[r] = st[64 + rl];
    m[r] = st[128 + rl];
    arg[r] = __float_as_int(st[192 + rl]);
  }
  return win_rows(m, inv, delta, sigmoidf_(st[256]));
}
// Where key row j's words are: the 4-byte word 4 nt + t (columns 8 nt + 2 t, + 1) at byte p + (nt / 8) half +
// ((nt % 8) ^ x) 16 + 4 t. A plain row (global memory): half 128, x 0; row r of a swizzled tile: p its row
// start, half the tile's half size, x = r % 8.
struct KRow {
  const unsigned char* p;
  int half, x;
};
// The end of a head in fast_window_q_wg_kernel: the row sums give dm_i (for the dk/dv kernel) and the window
// term (dw); the max moved s_{i, j*}, so dq_i += dm_i k_{j*} / sqrt(d), k_row(j) saying where key row j is; then
// dq goes out as bf16.
template <int D, class KROW>
__device__ __forceinline__ void window_q_finish(float (&dqa)[D / 8][4], float (&rowsum)[2], const int (&arg)[2],
                                                const bool (&valid)[2], const FastBwdArgs& a, int b, int i0, int h,
                                                KROW k_row) {
  const int t = lane_id() & 3, g = lane_id() >> 2;
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    rowsum[r] = quad_sum(rowsum[r]);
    if (!valid[r]) continue;
    const size_t ri = row_index(a.s, b, i0 + g + 8 * r, h);
    if (t == 0) {
      a.dm[ri] = -rowsum[r];
      a.sv.row_wgrad[ri] = rowsum[r];
    }
    if (a.dq) {
      const float f = -rowsum[r] * a.s.scale;
      const KRow kr = k_row(arg[r]);
      #pragma unroll
      for (int nt = 0; nt < D / 8; nt++) {
        const uint32_t kv2 = *(const uint32_t*)(kr.p + (nt >> 3) * kr.half + (((nt & 7) ^ kr.x) << 4) + 4 * t);
        dqa[nt][2 * r] += f * bf16_lo(kv2);
        dqa[nt][2 * r + 1] += f * bf16_hi(kv2);
      }
      uint32_t* dst = (uint32_t*)(a.dq + ri * D);
      #pragma unroll
      for (int nt = 0; nt < D / 8; nt++) dst[4 * nt + t] = pack_bf16(dqa[nt][2 * r], dqa[nt][2 * r + 1]);
    }
  }
}
template <int D>
struct WinQLayout {
  using TL = Tiles<D>;
  static constexpr int STW = 4 * 64 + 4;  // a head's row statistics: den, delta, m, arg max [4][64], the window logit
  static constexpr size_t Q = 0, K = Q + 2 * TL::TILE * 2, V = K + 2 * TL::TILE * 2, SK = V + 2 * TL::TILE * 2,
                          SV = SK + 16 * TL::LDT * 2, ST = SV + 16 * TL::LDT * 2, BYTES = ST + 2 * STW * 4;
};
template <int D>
static __global__ void __launch_bounds__(128, 2) fast_window_q_kernel(FastBwdArgs a) {
  using TL = Tiles<D>;
  using LY = WinQLayout<D>;
  constexpr int LDT = TL::LDT, NT = TL::NT, KT = TL::KT;
  const Shape& s = a.s;
  const int c = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = (bf16*)(smem_raw + LY::Q);  // [2]: by head parity
  bf16* sK = (bf16*)(smem_raw + LY::K);  // slot 0: chunk c-1, slot 1: chunk c
  bf16* sV = (bf16*)(smem_raw + LY::V);
  bf16* sSK = (bf16*)(smem_raw + LY::SK);
  bf16* sSV = (bf16*)(smem_raw + LY::SV);
  float* sSt = (float*)(smem_raw + LY::ST);  // [2]: by head parity
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  auto rows_in = [&](int cc) { return min(CHUNK, s.T - cc * CHUNK); };
  const bool sliding = s.geometry == HYBRID_SLIDING, has_prev = c >= 1, sink_tile = s.sinks > 0 && c >= 2;
  auto load_q = [&](int hh) {  // a head's query tile and row statistics (cp.async, like the tiles)
    const int h = hk * s.group + hh;
    load_rows_async<D>(sQ + (hh & 1) * TL::TILE, LDT, a.q + row_index(s, b, c * CHUNK, h) * D, qstride, 64, rows_in(c));
    window_q_stats_async(sSt + (hh & 1) * LY::STW, a, b, c, h, rows_in(c), tid);
  };
  load_q(0);
  for (int u = has_prev ? 0 : 1; u < 2; u++) {
    const int kc = c - 1 + u;
    load_rows_async<D>(sK + u * TL::TILE, LDT, kb + (size_t)kc * CHUNK * kstride, kstride, 64, rows_in(kc));
    load_rows_async<D>(sV + u * TL::TILE, LDT, vb + (size_t)kc * CHUNK * kstride, kstride, 64, rows_in(kc));
  }
  if (sink_tile) {
    load_rows_async<D>(sSK, LDT, kb, kstride, 16, s.sinks);
    load_rows_async<D>(sSV, LDT, vb, kstride, 16, s.sinks);
  }
  cp_async_commit();
  zero_dv_acc_rows<D>(a, b, c, hk, rows_in(c), tid);
  const int row0 = 16 * warp, i0 = c * CHUNK + row0;
  const bool want_dq = a.dq != nullptr;
  bool valid[2];
  #pragma unroll
  for (int r = 0; r < 2; r++) valid[r] = i0 + g + 8 * r < s.T;

  for (int hh = 0; hh < s.group; hh++) {
    const int h = hk * s.group + hh;
    const bool more = hh + 1 < s.group;
    if (more) {
      load_q(hh + 1);  // its buffers' last readers (head hh-1) passed the barrier below
      // The next head's dy rows and du_q Wq^T rows, which this kernel reads into registers at the top of each
      // head: into L2 now (first touches otherwise go to HBM while the block waits).
      const int rn = tid >> 1, i = c * CHUNK + rn;
      if (rn < rows_in(c)) {
        const size_t ri = row_index(s, b, i, h + 1);
        prefetch_l2(a.dy + ri * D + 64 * (tid & 1));
        if (want_dq) prefetch_l2(a.dq + ri * D + 64 * (tid & 1));
      }
    }
    cp_async_commit();
    const bf16* Q = sQ + (hh & 1) * TL::TILE;
    // While the tiles arrive: dy and the feature-map part du_q Wq^T (from du_weights_kernel, in dq itself;
    // each thread reads the words it will write). (Loading the next head's dy fragments at the end of this
    // one instead: 0.205 -> 0.215 ms, more spills.)
    uint32_t dyf[KT][4];
    frag_a_global<D>(dyf, a.dy + row_index(s, b, c * CHUNK, h) * D, qstride, row0, rows_in(c));
    float dqa[NT][4];
    load_dq_rows<D>(dqa, a, b, i0, h, valid);
    cp_async_wait<1>();  // everything but the next head's query tile and statistics
    __syncthreads();
    int arg[2];
    const WinRows wr = window_q_rows(sSt + (hh & 1) * LY::STW, row0 + g, valid, arg);

    float rowsum[2] = {0.0f, 0.0f};
    if (sink_tile)
      window_grad_tile<D, 16>(dqa, rowsum, Q, row0, dyf, sSK, sSV, wr, s.scale, want_dq,
                              [&](int kl, int) { return kl < s.sinks; });
    if (has_prev) {
      const int key0 = (c - 1) * CHUNK;
      window_grad_tile<D, 64>(dqa, rowsum, Q, row0, dyf, sK, sV, wr, s.scale, want_dq,
                              [&](int kl, int rl) { return !sliding || kl > rl || key0 + kl < s.sinks; });
    }
    window_grad_tile<D, 64>(dqa, rowsum, Q, row0, dyf, sK + TL::TILE, sV + TL::TILE, wr, s.scale, want_dq,
                            [&](int kl, int rl) { return kl <= rl; }, warp + 1);
    // k_{j*}: j* is a softmax key, so its row is in shared memory (sink tile, chunk c-1 or c): no dependent
    // global load at the end of every head (global only if the saved arg max were outside the window)
    // The row sums give dm_i (for the dk/dv kernel) and the window term (dw); the max moved s_{i, j*}, so
    // dq_i += dm_i k_{j*} / sqrt(d). j* is a softmax key, so its row is in shared memory (sink tile, chunk c-1
    // or c): no dependent global load at the end of every head (global only if the saved arg max were outside
    // the window). (window_q_finish, which the wgmma kernel uses, costs this kernel 96 bytes of spills, not 20.)
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      rowsum[r] = quad_sum(rowsum[r]);
      if (!valid[r]) continue;
      const size_t ri = row_index(s, b, i0 + g + 8 * r, h);
      if (t == 0) {
        a.dm[ri] = -rowsum[r];
        a.sv.row_wgrad[ri] = rowsum[r];
      }
      if (want_dq) {
        const int j = arg[r], slot = j / CHUNK - (c - 1);
        const uint32_t* kr = (const uint32_t*)(sink_tile && j < s.sinks ? sSK + j * LDT
                                               : (slot == 1 || (slot == 0 && has_prev)) ? sK + slot * TL::TILE + (j % CHUNK) * LDT
                                               : a.k + kv_index(s, b, j, hk) * D);
        const float f = -rowsum[r] * s.scale;
        #pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const uint32_t kv2 = kr[4 * nt + t];
          dqa[nt][2 * r] += f * bf16_lo(kv2);
          dqa[nt][2 * r + 1] += f * bf16_hi(kv2);
        }
        uint32_t* dst = (uint32_t*)(a.dq + ri * D);
        #pragma unroll
        for (int nt = 0; nt < NT; nt++) dst[4 * nt + t] = pack_bf16(dqa[nt][2 * r], dqa[nt][2 * r + 1]);
      }
    }
    __syncthreads();  // this head's query tile is no longer read
  }
}

// The window dk/dv kernels' row statistics of one (head, query chunk) into st (WST floats, raw: the thread that
// copied them finishes them with wst_finish after its wait); cp.async, not committed.
__device__ __forceinline__ void window_kv_stats_async(float* st, const FastBwdArgs& a, int b, int qc, int h, int rows, int tid) {
  if (tid >= 64) return;
  const bool ok = tid < rows;
  const size_t ri = row_index(a.s, b, ok ? qc * CHUNK + tid : 0, h);
  cp_async4(st + wst_at(tid, 0), a.sv.row_max + ri, ok);
  cp_async4(st + wst_at(tid, 1), a.sv.row_den + ri, ok);
  cp_async4(st + wst_at(tid, 3), a.sv.row_delta + ri, ok);
  cp_async4(st + wst_at(tid, 4), a.dm + ri, ok);
  cp_async4(st + wst_at(tid, 5), a.sv.row_argmax + ri, ok);  // 0 past T, where dm = 0
}
// The dk/dv accumulator rows (j0 + g, + 8) this thread's output adds, into L2 during the last iteration (the
// quad's 4 lines of the 512-byte row).
template <int D>
__device__ __forceinline__ void prefetch_kv_acc_rows(const FastBwdArgs& a, int b, int hk, int j0, int g, int t) {
  #pragma unroll
  for (int r = 0; r < 2; r++) {
    const int j = j0 + g + 8 * r;
    if (j >= a.s.T) continue;
    const size_t base = kv_index(a.s, b, j, hk) * D + 32 * t;
    if (a.dv_out) prefetch_l2(a.dv_acc + base);
    if (a.dk_out) prefetch_l2(a.dk_acc + base);
  }
}
// The window dk/dv kernels' output: dv (rows [0, 64) of sOut) and dk (rows [64, 128)), fp32 with row stride
// ldo, plus the accumulators (dk_acc: du_k Wk^T and the sinks' part; dv_acc: the linear and the sinks'
// parts), as bf16 rows [c * 64, + rows) of dk_out, dv_out. Every thread reads its accumulator words as 16
// independent 16-byte loads (one round trip) and writes 8 bytes at a time.
template <int D>
__device__ __forceinline__ void window_kv_out(const FastBwdArgs& a, const float* sOut, int ldo, int b, int c, int hk,
                                              int rows, int tid) {
  const Shape& s = a.s;
  #pragma unroll
  for (int which = 0; which < 2; which++) {
    bf16* out = which ? a.dk_out : a.dv_out;
    if (!out) continue;
    const float* acc = which ? a.dk_acc : a.dv_acc;
    const float* so = sOut + which * 64 * ldo;
    constexpr int PER = 64 * (D / 4) / 128;  // float4 pieces a thread
    float4 x[PER];
    #pragma unroll
    for (int k = 0; k < PER; k++) {
      const int idx = tid + 128 * k, rr = idx / (D / 4), c4 = 4 * (idx % (D / 4));
      x[k] = rr < rows ? *(const float4*)&acc[kv_index(s, b, c * CHUNK + rr, hk) * D + c4] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    #pragma unroll
    for (int k = 0; k < PER; k++) {
      const int idx = tid + 128 * k, rr = idx / (D / 4), c4 = 4 * (idx % (D / 4));
      if (rr >= rows) continue;
      const float4 w = *(const float4*)&so[rr * ldo + c4];
      *(uint2*)&out[kv_index(s, b, c * CHUNK + rr, hk) * D + c4] =
          make_uint2(pack_bf16(w.x + x[k].x, w.y + x[k].y), pack_bf16(w.z + x[k].z, w.w + x[k].w));
    }
  }
}

// ---- full backward, version 3: the window part of dk, dv, and the outputs ----
// One block of 4 warps per (key chunk c, kv head, b), warp w owning key rows [16w, +16). It loops over the
// query heads of the GQA group, so the window parts of dk and dv (query chunks c and c+1, as
// fast_window_kv_kernel) are summed in registers, not by atomics. Then dk += dk_acc (du_k Wk^T from
// du_weights_kernel, and the sinks' part), dv += dv_acc (the linear part from the dv pass, and the sinks'),
// and both go out as bf16.
template <int D>
static __global__ void __launch_bounds__(128, 2) fast_window_kv_v3_kernel(FastBwdArgs a) {
  using TL = Tiles<D>;
  using LY = WinLayout<D>;
  constexpr int LDT = TL::LDT, NT = TL::NT;
  const Shape& s = a.s;
  const int c = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = (bf16*)(smem_raw + LY::K);
  bf16* sV = (bf16*)(smem_raw + LY::V);
  bf16* sQ = (bf16*)(smem_raw + LY::Q);      // [2 slots]
  bf16* sDY = (bf16*)(smem_raw + LY::DY);    // [2 slots]
  float* sSt = (float*)(smem_raw + LY::ST);  // [2 slots][WST]
  const size_t kstride = (size_t)s.Hkv * D, qstride = (size_t)s.H * D;
  auto rows_in = [&](int cc) { return max(0, min(CHUNK, s.T - cc * CHUNK)); };
  const bool sliding = s.geometry == HYBRID_SLIDING;
  const int nq_chunks = c + 1 < s.NC ? 2 : 1, n_it = s.group * nq_chunks;
  load_rows_async<D>(sK, LDT, a.k + kv_index(s, b, c * CHUNK, hk) * D, kstride, 64, rows_in(c));
  load_rows_async<D>(sV, LDT, a.v + kv_index(s, b, c * CHUNK, hk) * D, kstride, 64, rows_in(c));
  const int row0 = warp * 16, j0 = c * CHUNK + row0;
  // Iteration it = (head hh = it / nq_chunks, query chunk c + it % nq_chunks) uses slot it & 1: the query and
  // dy tiles and the row statistics, all by cp.async (the statistics too: plain loads would stall the loading
  // warps), so iteration it + 1's data arrives while it computes (the same shared memory as one slot per
  // query chunk, which left every head's loads exposed). The statistics arrive raw; the thread that copied
  // them finishes them (wst_finish) after its wait.
  auto load_it = [&](int it) {
    const int sl = it & 1, h = hk * s.group + it / nq_chunks, qc = c + it % nq_chunks, rows = rows_in(qc);
    load_rows_async<D>(sQ + sl * TL::TILE, LDT, a.q + row_index(s, b, qc * CHUNK, h) * D, qstride, 64, rows);
    load_rows_async<D>(sDY + sl * TL::TILE, LDT, a.dy + row_index(s, b, qc * CHUNK, h) * D, qstride, 64, rows);
    window_kv_stats_async(sSt + sl * WST, a, b, qc, h, rows, tid);
    cp_async_commit();
  };
  load_it(0);  // with K and V
  float wl = a.wlogit[hk * s.group];  // the window logit of iteration it's head (loaded an iteration ahead)
  float dk[NT][4] = {}, dv[NT][4] = {};
  #pragma unroll 1
  for (int it = 0; it < n_it; it++) {
    float wl_next = wl;
    if (it + 1 < n_it) {  // its slot's last readers (iteration it - 1) passed the barrier below
      load_it(it + 1);
      wl_next = a.wlogit[hk * s.group + (it + 1) / nq_chunks];
    } else {
      cp_async_commit();  // an empty group: the wait below still means "iteration it's data"
      prefetch_kv_acc_rows<D>(a, b, hk, j0, g, t);  // the accumulator rows the output adds: into L2 now
    }
    cp_async_wait<1>();
    const int sl = it & 1, u = it % nq_chunks;
    if (tid < 64) wst_finish(sSt + sl * WST, tid, wl, s.scale);  // its own copies, visible after its wait
    wl = wl_next;
    __syncthreads();
    window_kv_chunk<D>(dv, dk, sK, sV, sQ + sl * TL::TILE, sDY + sl * TL::TILE, sSt + sl * WST, u, warp, g, t, sliding, s, j0);
    __syncthreads();  // slot sl is free for iteration it + 2
  }
  // Out: the window part + the accumulators (dk_acc: du_k Wk^T from du_weights_kernel and the sinks' part;
  // dv_acc: the linear and the sinks' parts). The block's dv, dk go through shared memory (the query slots,
  // free now), so that every thread then reads its accumulator words as 16 independent 16-byte loads, one
  // round trip, and writes 8 bytes at a time. (A load then a store a fragment word, which the compiler may
  // not reorder, was 17 % of the kernel's samples; batched a fragment row at a time, still 12 %.)
  static_assert(2 * 64 * (D + 8) * 4 <= 4 * TL::TILE * 2, "dv, dk fit the query slots");
  constexpr int LDO = D + 8;  // rows 8 banks apart: a half-warp's 8-byte fragment stores hit distinct banks
  float* sOut = (float*)(smem_raw + LY::Q);  // [2][64][LDO]: dv, dk
  #pragma unroll
  for (int nt = 0; nt < NT; nt++)
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      const int o = (row0 + g + 8 * r) * LDO + 8 * nt + 2 * t;
      *(float2*)&sOut[o] = make_float2(dv[nt][2 * r], dv[nt][2 * r + 1]);
      *(float2*)&sOut[64 * LDO + o] = make_float2(dk[nt][2 * r], dk[nt][2 * r + 1]);
    }
  __syncthreads();
  window_kv_out<D>(a, sOut, LDO, b, c, hk, rows_in(c), tid);
}

// ---- full backward, Hopper (sm_90a): the window part of dk, dv with warpgroup MMA ----
// The same function as fast_window_kv_v3_kernel (a block of 4 warps per key chunk c, kv head and batch,
// looping over the GQA group's heads and query chunks c, c+1 with two shared-memory slots), but its four
// products are wgmma issued by the 4 warps together: s^T = K q^T and dP^T = V dy^T (K, V as A and q, dy as
// B, all K-major from shared memory), then dv += (A^T / den) dy and dk += ds^T q with the probabilities and
// ds as register A operands and dy, q as MN-major B. The accumulator layout of wgmma (warp w: rows
// [16 w, +16), the mma.sync C layout) is the one the mma.sync kernel's elementwise code already uses, so
// that code is shared (window_kv_probs, window_kv_ds). Why: the mma.sync kernel spends its issue slots on
// ldmatrix and mma instructions at 8 warps an SM (255 registers a thread); wgmma reads its B operands
// straight from shared memory. Tiles are 64 rows x 128 bf16 in two 64-column halves of 8 KB, 128-byte
// swizzled (16-byte chunk c of row r at chunk c ^ (r % 8)) as the descriptors read them, filled by
// cp.async. The causal tile is computed whole (the mask zeroes the upper part), not skipped by 16-row blocks.
struct WinWgLayout {  // byte offsets from the 1024-aligned base; BYTES includes the alignment slack
  static constexpr size_t K = 0, V = K + WG_TILE, Q = V + WG_TILE, DY = Q + 2 * WG_TILE, ST = DY + 2 * WG_TILE,
                          BYTES = ST + 2 * WST * 4 + 1024;
};
static __global__ void __launch_bounds__(128, 2) fast_window_kv_wg_kernel(FastBwdArgs a) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  using LY = WinWgLayout;
  constexpr int D = 128, NT = 16;
  const Shape& s = a.s;
  const int c = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sK = base + LY::K, sV = base + LY::V, sQ = base + LY::Q, sDY = base + LY::DY;
  float* sSt = (float*)(base_ptr + LY::ST);  // [2 slots][WST]
  const size_t kstride = (size_t)s.Hkv * D, qstride = (size_t)s.H * D;
  auto rows_in = [&](int cc) { return max(0, min(CHUNK, s.T - cc * CHUNK)); };
  const bool sliding = s.geometry == HYBRID_SLIDING;
  const int nq_chunks = c + 1 < s.NC ? 2 : 1, n_it = s.group * nq_chunks;
  load_tile_swz_async<64>(sK, a.k + kv_index(s, b, c * CHUNK, hk) * D, kstride, rows_in(c), tid);
  load_tile_swz_async<64>(sV, a.v + kv_index(s, b, c * CHUNK, hk) * D, kstride, rows_in(c), tid);
  const int row0 = warp * 16, j0 = c * CHUNK + row0;
  auto load_it = [&](int it) {  // as fast_window_kv_v3_kernel's
    const int sl = it & 1, h = hk * s.group + it / nq_chunks, qc = c + it % nq_chunks, rows = rows_in(qc);
    load_tile_swz_async<64>(sQ + sl * WG_TILE, a.q + row_index(s, b, qc * CHUNK, h) * D, qstride, rows, tid);
    load_tile_swz_async<64>(sDY + sl * WG_TILE, a.dy + row_index(s, b, qc * CHUNK, h) * D, qstride, rows, tid);
    window_kv_stats_async(sSt + sl * WST, a, b, qc, h, rows, tid);
    cp_async_commit();
  };
  load_it(0);
  float wl = a.wlogit[hk * s.group];
  float dk[NT][4] = {}, dv[NT][4] = {};
  #pragma unroll 1
  for (int it = 0; it < n_it; it++) {
    float wl_next = wl;
    if (it + 1 < n_it) {
      load_it(it + 1);
      wl_next = a.wlogit[hk * s.group + (it + 1) / nq_chunks];
    } else {
      cp_async_commit();
      prefetch_kv_acc_rows<D>(a, b, hk, j0, g, t);  // the accumulator rows the output adds: into L2 now
    }
    cp_async_wait<1>();
    const int sl = it & 1, u = it % nq_chunks;
    if (tid < 64) wst_finish(sSt + sl * WST, tid, wl, s.scale);
    wl = wl_next;
    __syncthreads();
    const uint32_t Q = sQ + sl * WG_TILE, DY = sDY + sl * WG_TILE;
    uint32_t ap[4][4], dsp[4][4];
    {
      float sc[8][4], dpt[8][4];
      wgmma_fence();
      #pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {  // s^T = K q^T, dP^T = V dy^T (64 keys x 64 queries, k = d)
        const uint32_t off = (kk / 4) * WG_HALF + (kk % 4) * 32;
        wgmma_ss_m64n64k16(&sc[0][0], make_desc(sK + off, 16, 1024), make_desc(Q + off, 16, 1024), kk > 0);
      }
      wgmma_commit();
      #pragma unroll
      for (int kk = 0; kk < D / 16; kk++) {
        const uint32_t off = (kk / 4) * WG_HALF + (kk % 4) * 32;
        wgmma_ss_m64n64k16(&dpt[0][0], make_desc(sV + off, 16, 1024), make_desc(DY + off, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();  // s^T is done: the probabilities while dP^T is formed
      fence_regs(sc);
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        window_kv_probs(sc[nt], *(const float2*)(sSt + sl * WST + (4 * nt + t) * 12), nt, u, row0, g, t, sliding, s, j0);
      wgmma_wait<0>();
      fence_regs(dpt);
      #pragma unroll
      for (int nt = 0; nt < 8; nt++) window_kv_ds(sc[nt], dpt[nt], win_pair(sSt + sl * WST, nt, t), g, j0);
      pack_c_to_a<false, 8>(ap, sc);
      pack_c_to_a<false, 8>(dsp, dpt);
    }
    fence_regs(dv);
    fence_regs(dk);
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < 4; kk++)  // dv += (A^T / den) dy, dk += ds^T q (k = the 64 queries)
      wgmma_rs_m64n128k16_tb(&dv[0][0], ap[kk], make_desc(DY + kk * 2048, WG_HALF, 1024));
    #pragma unroll
    for (int kk = 0; kk < 4; kk++) wgmma_rs_m64n128k16_tb(&dk[0][0], dsp[kk], make_desc(Q + kk * 2048, WG_HALF, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    __syncthreads();  // slot sl is free for iteration it + 2
  }
  // Out, as fast_window_kv_v3_kernel: through shared memory (every tile is free now).
  constexpr int LDO = D + 8;
  static_assert(2 * 64 * (D + 8) * 4 <= LY::ST, "dv, dk fit the tiles");
  float* sOut = (float*)base_ptr;  // [2][64][LDO]: dv, dk
  #pragma unroll
  for (int nt = 0; nt < NT; nt++)
    #pragma unroll
    for (int r = 0; r < 2; r++) {
      const int o = (row0 + g + 8 * r) * LDO + 8 * nt + 2 * t;
      *(float2*)&sOut[o] = make_float2(dv[nt][2 * r], dv[nt][2 * r + 1]);
      *(float2*)&sOut[64 * LDO + o] = make_float2(dk[nt][2 * r], dk[nt][2 * r + 1]);
    }
  __syncthreads();
  window_kv_out<D>(a, sOut, LDO, b, c, hk, rows_in(c), tid);
#else
  __trap();  // built without sm_90a: the dispatcher does not launch it (attention_hopper::wgmma_available())
#endif
}

// ---- full backward, Hopper (sm_90a): the window part of dq with warpgroup MMA ----
// The function of fast_window_q_kernel (a block of 4 warps per query chunk c, kv head and batch, looping over
// the GQA group's heads, which share the K, V tiles of chunks c-1 and c and the sinks' tile), with its
// products as wgmma: s = q K^T and dP = dy V^T from shared memory (q, dy, K, V all K-major), then
// dq += ds K / sqrt(d) with ds as the register A operand and K as an MN-major B. One key tile at a time (s,
// dP, then its dq product), so a thread holds dq (64 registers) and one tile's s and dP (64). The query and
// dy tiles have one slot each (two would not leave room for 2 blocks an SM): the next head's are requested as
// soon as this head's last s and dP products have read them, and arrive while the rest of the head computes.
// One key tile (NKEYS = 64, or 16: the sinks) for the warpgroup's 64 query rows: ds = A (g.v - delta) with p
// rounded to f16 as the forward multiplied it (as window_grad_tile), its row sums, and dq += ds K / sqrt(d)
// when want_dq. Q, DY: 64-row swizzled tiles; Kt, Vt: NKEYS-row swizzled tiles. after_reads() runs once every
// warp's s and dP products are done (they are the last readers of Q and DY).
template <int NKEYS, class MASK, class AFTER>
__device__ __forceinline__ void window_q_tile_wg(float (&dqa)[16][4], float (&rowsum)[2], uint32_t Q, uint32_t DY,
                                                 uint32_t Kt, uint32_t Vt, const WinRows& wr, float scale, bool want_dq,
                                                 int row0, MASK mask, AFTER after_reads) {
#ifdef LOLCATS_WGMMA
  using namespace attention_hopper;
  constexpr int NB = NKEYS / 8, HALFK = NKEYS * 128;
  const int ln = lane_id(), g = ln >> 2, t = ln & 3;
  const float c1 = scale * LOG2E;
  float sc[NB][4], dp[NB][4];
  wgmma_fence();
  #pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const uint32_t oq = (kk / 4) * WG_HALF + (kk % 4) * 32, ok = (kk / 4) * HALFK + (kk % 4) * 32;
    if constexpr (NKEYS == 64) wgmma_ss_m64n64k16(&sc[0][0], make_desc(Q + oq, 16, 1024), make_desc(Kt + ok, 16, 1024), kk > 0);
    else wgmma_ss_m64n16k16(&sc[0][0], make_desc(Q + oq, 16, 1024), make_desc(Kt + ok, 16, 1024), kk > 0);
  }
  wgmma_commit();
  #pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const uint32_t oq = (kk / 4) * WG_HALF + (kk % 4) * 32, ok = (kk / 4) * HALFK + (kk % 4) * 32;
    if constexpr (NKEYS == 64) wgmma_ss_m64n64k16(&dp[0][0], make_desc(DY + oq, 16, 1024), make_desc(Vt + ok, 16, 1024), kk > 0);
    else wgmma_ss_m64n16k16(&dp[0][0], make_desc(DY + oq, 16, 1024), make_desc(Vt + ok, 16, 1024), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<1>();  // s is done: the probabilities while dP is formed
  fence_regs(sc);
  #pragma unroll
  for (int nt = 0; nt < NB; nt++)
    #pragma unroll
    for (int e = 0; e < 4; e++) {
      const int kl = 8 * nt + 2 * t + (e & 1), r = e >> 1;
      sc[nt][e] = mask(kl, row0 + g + 8 * r) ? __half2float(__float2half(ex2_approx(sc[nt][e] * c1 - wr.mL[r]))) : 0.0f;
    }
  wgmma_wait<0>();
  fence_regs(dp);
  after_reads();
  #pragma unroll
  for (int nt = 0; nt < NB; nt++)
    #pragma unroll
    for (int e = 0; e < 4; e++) {
      const int r = e >> 1;
      const float ds = sc[nt][e] * (dp[nt][e] * wr.ginv[r] - wr.gdelta[r]);
      rowsum[r] += ds;
      sc[nt][e] = ds * scale;
    }
  if (want_dq) {
    uint32_t da[NB / 2][4];
    pack_c_to_a<false, NB>(da, sc);
    fence_regs(dqa);
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < NKEYS / 16; kk++) wgmma_rs_m64n128k16_tb(&dqa[0][0], da[kk], make_desc(Kt + kk * 2048, HALFK, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dqa);
  }
#endif
}
struct WinQWgLayout {  // byte offsets from the 1024-aligned base; BYTES includes the alignment slack
  static constexpr int STW = 4 * 64 + 4;  // a head's row statistics, as WinQLayout's
  static constexpr size_t K = 0, V = K + 2 * WG_TILE, Q = V + 2 * WG_TILE, DY = Q + WG_TILE, SK = DY + WG_TILE,
                          SV = SK + WG_TILE / 4, ST = SV + WG_TILE / 4, BYTES = ST + 2 * STW * 4 + 1024;
};
static __global__ void __launch_bounds__(128, 2) fast_window_q_wg_kernel(FastBwdArgs a) {
#ifdef LOLCATS_WGMMA
  using LY = WinQWgLayout;
  constexpr int D = 128, NT = 16, SINK_HALF = 16 * 128;
  const Shape& s = a.s;
  const int c = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
  const unsigned char* base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sK = base + LY::K, sV = base + LY::V, sQ = base + LY::Q, sDY = base + LY::DY, sSK = base + LY::SK,
                 sSV = base + LY::SV;  // sK, sV: slot 0 chunk c-1, slot 1 chunk c
  float* sSt = (float*)(base_ptr + LY::ST);  // [2]: by head parity
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* vb = a.v + kv_index(s, b, 0, hk) * D;
  auto rows_in = [&](int cc) { return min(CHUNK, s.T - cc * CHUNK); };
  const bool sliding = s.geometry == HYBRID_SLIDING, has_prev = c >= 1, sink_tile = s.sinks > 0 && c >= 2;
  auto load_head = [&](int hh) {  // a head's q and dy tiles and row statistics (not committed)
    const int h = hk * s.group + hh;
    load_tile_swz_async<64>(sQ, a.q + row_index(s, b, c * CHUNK, h) * D, qstride, rows_in(c), tid);
    load_tile_swz_async<64>(sDY, a.dy + row_index(s, b, c * CHUNK, h) * D, qstride, rows_in(c), tid);
    window_q_stats_async(sSt + (hh & 1) * LY::STW, a, b, c, h, rows_in(c), tid);
  };
  load_head(0);
  for (int u = has_prev ? 0 : 1; u < 2; u++) {
    const int kc = c - 1 + u;
    load_tile_swz_async<64>(sK + u * WG_TILE, kb + (size_t)kc * CHUNK * kstride, kstride, rows_in(kc), tid);
    load_tile_swz_async<64>(sV + u * WG_TILE, vb + (size_t)kc * CHUNK * kstride, kstride, rows_in(kc), tid);
  }
  if (sink_tile) {
    load_tile_swz_async<16>(sSK, kb, kstride, s.sinks, tid);
    load_tile_swz_async<16>(sSV, vb, kstride, s.sinks, tid);
  }
  cp_async_commit();
  zero_dv_acc_rows<D>(a, b, c, hk, rows_in(c), tid);
  const int row0 = 16 * warp, i0 = c * CHUNK + row0;
  const bool want_dq = a.dq != nullptr;
  bool valid[2];
  #pragma unroll
  for (int r = 0; r < 2; r++) valid[r] = i0 + g + 8 * r < s.T;

  for (int hh = 0; hh < s.group; hh++) {
    const int h = hk * s.group + hh;
    const bool more = hh + 1 < s.group;
    if (more && want_dq) {  // the next head's du_q Wq^T rows (read into registers at its top): into L2 now
      const int rn = tid >> 1, i = c * CHUNK + rn;
      if (rn < rows_in(c)) prefetch_l2(a.dq + row_index(s, b, i, h + 1) * D + 64 * (tid & 1));
    }
    float dqa[NT][4];
    load_dq_rows<D>(dqa, a, b, i0, h, valid);
    cp_async_wait<0>();
    __syncthreads();
    int arg[2];
    const WinRows wr = window_q_rows(sSt + (hh & 1) * LY::STW, row0 + g, valid, arg);
    auto nothing = [] {};
    auto next_head = [&] {  // every warp's last s, dP products have read q, dy: the next head's may come in
      __syncthreads();
      if (more) load_head(hh + 1);
      cp_async_commit();
    };
    float rowsum[2] = {0.0f, 0.0f};
    if (sink_tile)
      window_q_tile_wg<16>(dqa, rowsum, sQ, sDY, sSK, sSV, wr, s.scale, want_dq, row0,
                           [&](int kl, int) { return kl < s.sinks; }, nothing);
    if (has_prev) {
      const int key0 = (c - 1) * CHUNK;
      window_q_tile_wg<64>(dqa, rowsum, sQ, sDY, sK, sV, wr, s.scale, want_dq, row0,
                           [&](int kl, int rl) { return !sliding || kl > rl || key0 + kl < s.sinks; }, nothing);
    }
    window_q_tile_wg<64>(dqa, rowsum, sQ, sDY, sK + WG_TILE, sV + WG_TILE, wr, s.scale, want_dq, row0,
                         [&](int kl, int rl) { return kl <= rl; }, next_head);
    window_q_finish<D>(dqa, rowsum, arg, valid, a, b, i0, h, [&](int j) {  // k_{j*} from the swizzled tiles
      const int slot = j / CHUNK - (c - 1);
      if (sink_tile && j < s.sinks) return KRow{base_ptr + LY::SK + j * 128, SINK_HALF, j & 7};
      if (slot == 1 || (slot == 0 && has_prev)) return KRow{base_ptr + LY::K + slot * WG_TILE + (j % CHUNK) * 128, WG_HALF, j & 7};
      return KRow{(const unsigned char*)(a.k + kv_index(s, b, j, hk) * D), 128, 0};
    });
  }
  cp_async_wait<0>();
#else
  __trap();  // built without sm_90a: the dispatcher does not launch it (attention_hopper::wgmma_available())
#endif
}

// ---- full backward, version 3: the linear part of dv ----
// dv_j = R_c^T phi_k(k_j) contracts over the features, which the key-side kernel's partition (features
// across warps) splits; so this kernel walks the key chunks backwards once more with R^T (d x 128) in
// registers partitioned by HEAD-DIM rows (warp w owns d-rows [16w, +16), as the forward holds S^T), and
// dv^T = R^T phi_k^T is the forward's numL^T product. Per key chunk c: (A) warps 0-3 phi_k(c) (bf16, sinks
// and rows past T zeroed); (B) each warp its 16 d-rows of dv^T (to a shared fp32 tile), then R^T +=
// dy^T (phi_q / den) of query chunk c+1; (C) sliding: the queries of chunk c+1 at least w ahead,
// dv += (phi_k (phi_q / den)^T, masked) dy; (D) the tile into the fp32 dv accumulator (atomics: GQA heads).
// PHI_SAVED (the forward kept the feature maps): phi_k(c) arrives by cp.async in K_c's slot (f16, made bf16
// in place), and (A) is that conversion (every chunk that needs (A) has a successor, so the forward mapped it).
struct BwdDv3Layout {
  using TL = Tiles<128>;
  static constexpr size_t K = 0, PQ = K + 2 * TL::TILE * 2, DY = PQ + 2 * TL::PT * 2, WK = DY + 2 * TL::TILE * 2,
                          PK = WK + TL::WT * 2, DV = PK + TL::PT * 2, BYTES = DV + 64 * V3_LDN * 4;
};
template <bool SLIDING, bool PHI_SAVED>
static __global__ void __launch_bounds__(V3_THREADS, 1) fast_backward_dv_v3_kernel(FastBwdArgs a) {
  constexpr int D = 128;
  using TL = Tiles<D>;
  using LY = BwdDv3Layout;
  constexpr int LDT = TL::LDT, LDP = TL::LDP, LDN = V3_LDN;
  const Shape& s = a.s;
  const int seg = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / s.group;
  const int tid = threadIdx.x, warp = tid >> 5, ln = tid & 31, g = ln >> 2, t = ln & 3;
  const int rg = warp & 3, hf = warp >> 2, row0 = 16 * rg;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = (bf16*)(smem_raw + LY::K);
  bf16* sPQ = (bf16*)(smem_raw + LY::PQ);
  bf16* sDY = (bf16*)(smem_raw + LY::DY);
  bf16* sWk = (bf16*)(smem_raw + LY::WK);
  bf16* sPK = (bf16*)(smem_raw + LY::PK);
  float* sDV = (float*)(smem_raw + LY::DV);  // dv (key, d) of the current chunk

  const int c_begin = seg * a.seg_chunks, c_end = min(s.NC, c_begin + a.seg_chunks);
  const size_t qstride = (size_t)s.H * D, kstride = (size_t)s.Hkv * D;
  const bf16* kb = a.k + kv_index(s, b, 0, hk) * D;
  const bf16* dyb = a.dy + row_index(s, b, 0, h) * D;
  const bf16* pqb = a.phiq_in + row_index(s, b, 0, h) * NF;
  auto rows_in = [&](int c) { return max(0, min(CHUNK, s.T - c * CHUNK)); };
  const size_t pstride = (size_t)s.H * NF;
  const unsigned short* pkb = PHI_SAVED ? (const unsigned short*)a.sv.phi_k + row_index(s, b, 0, h) * NF : nullptr;
  static_assert(TL::TILE == TL::PT, "a phi tile fits a K slot");
  auto load_iter = [&](int c) {  // K_c (or phi_k(c)), and phi_q / den, dy of query chunk c+1 (zeros if none)
    const int sl = c & 1;
    if (PHI_SAVED)
      load_rows_async<NF, V3_THREADS>((unsigned short*)(sK + sl * TL::TILE), LDP, pkb + (size_t)c * CHUNK * pstride, pstride, 64, rows_in(c));
    else
      load_rows_async<D, V3_THREADS>(sK + sl * TL::TILE, LDT, kb + (size_t)c * CHUNK * kstride, kstride, 64, rows_in(c));
    const int qc = c + 1, nq = qc < s.NC ? rows_in(qc) : 0;
    const size_t q0 = nq > 0 ? (size_t)qc * CHUNK : 0;
    load_rows_async<NF, V3_THREADS>(sPQ + sl * TL::PT, LDP, pqb + q0 * s.H * NF, (size_t)s.H * NF, 64, nq);
    load_rows_async<D, V3_THREADS>(sDY + sl * TL::TILE, LDT, dyb + q0 * qstride, qstride, 64, nq);
  };
  if (!PHI_SAVED) load_rows_async<64, V3_THREADS>(sWk, TL::LDW, a.Wk + (size_t)h * D * 64, 64, D, D);
  load_iter(c_end - 1);
  cp_async_commit();
  float st[16][4];  // R^T: rows d = 16 warp + g (+8), n-tile j = features 8j + 2t (+1)
  {
    const size_t base = (((size_t)b * s.H + h) * gridDim.x + seg) * NF;
    const bool last = seg == (int)gridDim.x - 1;
    #pragma unroll
    for (int j = 0; j < 16; j++)
      #pragma unroll
      for (int e = 0; e < 4; e++) {
        const int f = 8 * j + 2 * t + (e & 1), dr = 16 * warp + g + 8 * (e >> 1);
        st[j][e] = last ? 0.0f : a.segR[(base + f) * D + dr];
      }
  }

  for (int c = c_end - 1; c >= c_begin; c--) {
    const int sl = c & 1;
    const bf16* Kc = sK + sl * TL::TILE;
    const bf16* PQc = sPQ + sl * TL::PT;
    const bf16* DYc = sDY + sl * TL::TILE;
    const int j0 = c * CHUNK;
    const bool has_q = c + 1 < s.NC, has_state = c + 2 < s.NC, any = has_state || (SLIDING && has_q);
    cp_async_wait<0>();
    __syncthreads();  // this chunk's tiles are in; the last chunk's readers (sPK, sDV) are done
    if (c - 1 >= c_begin) load_iter(c - 1);
    cp_async_commit();

    // (A) phi_k of this chunk (row groups, warps 0-3)
    const bf16* PKc = PHI_SAVED ? Kc : sPK;
    if (any) {
      if (PHI_SAVED) {
        tile_convert_v3<NF, false>((void*)PKc, LDP, 64);  // the products are bf16 ones, as when recomputed
      } else if (hf == 0) {
        float ph[16][4];
        feature_map_smem<D>(ph, Kc, row0, sWk);
        const int jr = j0 + row0 + g;
        store_phi<false>(sPK, LDP, row0, ph, jr >= s.sinks && jr < s.T, jr + 8 >= s.sinks && jr + 8 < s.T);
      }
      __syncthreads();  // phi_k complete
      // (B) dv^T = R^T phi_k^T for this warp's d-rows (transposed into sDV: key rows)
      float dvt[8][4];
      if (has_state) {
        state_times_tile_t<false>(dvt, st, PKc, LDP);
      } else {
        #pragma unroll
        for (int n = 0; n < 8; n++) dvt[n][0] = dvt[n][1] = dvt[n][2] = dvt[n][3] = 0.0f;
      }
      #pragma unroll
      for (int n = 0; n < 8; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) sDV[(8 * n + 2 * t + (e & 1)) * LDN + 16 * warp + g + 8 * (e >> 1)] = dvt[n][e];
    }
    // R^T += dy^T (phi_q / den) of query chunk c+1 (after (B): dv of chunk c uses query chunks >= c+2)
    if (has_q) state_accumulate<false>(st, DYc, LDT, 16 * warp, PQc, LDP);
    if (!any) continue;
    // (C) sliding: key rows of row group rg, d-columns [64 hf, +64)
    if (SLIDING && has_q) {
      float acc[8][4] = {};
      sliding_dv_rows<false>(acc, PKc, PQc, DYc, row0, hf);
      __syncthreads();  // sDV's transposed stores are done
      #pragma unroll
      for (int nt = 0; nt < 8; nt++)
        #pragma unroll
        for (int e = 0; e < 4; e++) sDV[(row0 + g + 8 * (e >> 1)) * LDN + 64 * hf + 8 * nt + 2 * t + (e & 1)] += acc[nt][e];
    }
    __syncthreads();  // sDV complete
    // (D) into the fp32 accumulator, 4 columns a thread (coalesced)
    const int nk = rows_in(c);
    for (int idx = tid; idx < nk * (D / 4); idx += V3_THREADS) {
      const int r = idx / (D / 4), c4 = 4 * (idx % (D / 4));
      atomicAdd((float4*)(a.dv_acc + kv_index(s, b, j0 + r, hk) * D + c4), *(const float4*)&sDV[r * LDN + c4]);
    }
  }
  cp_async_wait<0>();
}

// ---- workspace layout --------------------------------------------------------------------------
struct Workspace {
  float *phiq, *phik, *St, *zt;  // generic path: (B,T,H,2f) x2, per-chunk states (B,H,NC,2f,d), (B,H,NC,2f)
  float *segS, *segZ;            // fast path: per-segment states (B,H,nseg,128,d), (B,H,nseg,128)
  float *subS, *subZ;            // fast path: per-sub-segment sums (B,H,nsub,128,d), (B,H,nsub,128)
  float *row_sq, *dm;            // (B,T,H)
  float* blk_sq;                 // fast path: (B,H,nseg) the version-3 forward blocks' squared errors
  bf16 *du_q, *du_k;             // (B,T,H,f)
  float *dk_acc, *dv_acc;        // (B,T,Hkv,d) input gradients only
  float* dW_part;                // fast path: (2, WG_SPLITS, H, d, f)
  bf16* phiq_bf;                 // fast path: (B,T,H,128) phi_q / den, query side -> key side
  float* sum_part;               // (SUM_BLOCKS) partial sums of the stage-1 loss
};
inline int sm_count() {  // of the current device, asked once
  static const int n = [] {
    int dev = 0, v = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}
// Segment length (chunks walked by one block of the main kernels). The main kernels' critical path is
// (waves of blocks) x (chunks per block); among 16, 32 and 64 chunks the longest segment with the least of
// that wins, because the prefix passes cost the chunks outside the last segment. H200, B*T = 8192, 32 heads:
// T = 1024 one segment (any), 4096: 32 (128 blocks, one wave, instead of 256 in two), 16K and 32K: 64.
inline int seg_chunks(const HybridAttnParams& p) {
  if (p.seg_chunks > 0) return p.seg_chunks;
  const long long NC = ceil_div(p.T, CHUNK), BH = (long long)p.B * p.H, sms = sm_count();
  int best = 16;
  long long best_cost = -1;
  for (int G : {16, 32, 64}) {
    const long long cost = ceil_div(ceil_div(NC, (long long)G) * BH, sms) * std::min<long long>(G, NC);
    if (best_cost < 0 || cost <= best_cost) { best = G; best_cost = cost; }
  }
  return best;
}
inline int num_segments(const HybridAttnParams& p) { return ceil_div(ceil_div(p.T, CHUNK), seg_chunks(p)); }
// The segment-sum passes sum SUB-segments of 8 chunks (seg_chunks / split; the scan adds them up per
// segment): a pass block is a serial chain of chunks at one block an SM, and whole segments would give too
// few blocks for the SMs (4K tokens in 16-chunk segments: 192 blocks for 132 SMs, two waves, the second
// half empty). Odd test lengths: halves when even, else whole segments.
inline int seg_split(const HybridAttnParams& p) {
  const int G = seg_chunks(p);
  if (G >= 16 && G % 8 == 0) return G / 8;
  return G % 2 == 0 && G >= 8 ? 2 : 1;
}
inline int num_subsegments(const HybridAttnParams& p) { return ceil_div(ceil_div(p.T, CHUNK), seg_chunks(p) / seg_split(p)); }
// Floats of the per-segment state prefixes a forward keeps for its backward (none with one segment).
inline size_t seg_state_floats(const HybridAttnParams& p) {
  const size_t nseg = num_segments(p);
  return (hybrid_uses_fast_path(p) && nseg > 1) ? (size_t)p.B * p.H * nseg * NF * (p.d + 1) : 0;
}
constexpr int WG_SPLITS = 4;  // row splits of the fast weight-gradient reduction (8 measured slower)

inline size_t carve(size_t& off, size_t bytes) {
  const size_t at = off;
  off += (bytes + 255) / 256 * 256;
  return at;
}
// The buffers that only input gradients (dq, dk, dv) use come last, so that a workspace sized without them
// (hybrid_workspace_bytes(p, false)) is a prefix of the full layout.
inline Workspace workspace_layout(void* base, const HybridAttnParams& p, size_t* total, bool input_grads = true) {
  const size_t rows = (size_t)p.B * p.T * p.H, kv = (size_t)p.B * p.T * p.Hkv * p.d;
  const size_t NC = ceil_div(p.T, CHUNK), F2 = 2 * (size_t)p.f;
  const bool fast = hybrid_uses_fast_path(p);
  char* c = (char*)base;
  size_t off = 0;
  Workspace w{};
  auto take = [&](size_t bytes) { const size_t at = carve(off, bytes); return c ? (void*)(c + at) : nullptr; };
  if (!fast) {
    w.phiq = (float*)take(rows * F2 * 4);
    w.phik = (float*)take(rows * F2 * 4);
    w.St = (float*)take((size_t)p.B * p.H * NC * F2 * p.d * 4);
    w.zt = (float*)take((size_t)p.B * p.H * NC * F2 * 4);
  } else {
    const size_t nseg = num_segments(p);
    w.segS = (float*)take((size_t)p.B * p.H * nseg * 128 * p.d * 4);
    w.segZ = (float*)take((size_t)p.B * p.H * nseg * 128 * 4);
    const size_t nsub = nseg > 1 ? num_subsegments(p) : 0;
    w.subS = (float*)take((size_t)p.B * p.H * nsub * 128 * p.d * 4);
    w.subZ = (float*)take((size_t)p.B * p.H * nsub * 128 * 4);
    w.dW_part = (float*)take((size_t)2 * WG_SPLITS * p.H * p.d * p.f * 4);
    w.phiq_bf = (bf16*)take(rows * 128 * 2);
    w.blk_sq = (float*)take((size_t)p.B * p.H * nseg * 4);
  }
  w.row_sq = (float*)take(rows * 4);
  w.sum_part = (float*)take(SUM_BLOCKS * 4);
  w.dm = (float*)take(rows * 4);
  w.du_q = (bf16*)take(rows * p.f * 2);
  w.du_k = (bf16*)take(rows * p.f * 2);
  if (input_grads) {
    w.dk_acc = (float*)take(kv * 4);
    w.dv_acc = (float*)take(kv * 4);
  }
  if (total) *total = off;
  return w;
}

// Kernel-lab instrumentation: when set, called after each stage's launches (dev/ records an event there).
inline void (*profile_hook)(const char* stage, cudaStream_t stream) = nullptr;
inline void mark(const char* stage, cudaStream_t stream) {
  if (profile_hook) profile_hook(stage, stream);
}

// ---- fast path host side ----
// Version 3 (8 warps, register state) serves d = 128 unless version 2 is asked for.
// Warpgroup MMA (Hopper, a binary with sm_90a code): the version-3 forward's window scores and the full
// backward's window kernels. The lab and the tests set wgmma_off to run the mma.sync code, which every other
// GPU runs.
inline bool wgmma_off = false;
inline bool use_wgmma() { return !wgmma_off && attention_hopper::wgmma_available(); }
inline bool uses_v3(const HybridAttnParams& p) { return p.d == 128 && p.impl != HYBRID_IMPL_TENSOR_V2; }
// Whether a stage-1 forward keeps its feature maps for the backward (version 3; 2 x 256 bytes a row and head).
inline bool keeps_phi(const HybridAttnParams& p) { return hybrid_uses_fast_path(p) && uses_v3(p); }
// The full backward after a version-3 forward that kept the feature maps: its query kernel forms delta.
inline bool query_forms_delta(const HybridAttnParams& p, const HybridAttnSaved& saved, bool fused) {
  return !fused && keeps_phi(p) && saved.phi_q && saved.phi_k;
}
template <int D>
inline void fast_segment_sums(bool keys, const HybridAttnParams& p, const Shape& s, const bf16* x, const bf16* y, const bf16* W,
                              const HybridAttnSaved& saved, const Workspace& ws, float* segS, float* segZ, cudaStream_t stream) {
  const int G = seg_chunks(p), nseg = num_segments(p), split = seg_split(p), nsub = num_subsegments(p);
  if (nseg <= 1) return;
  const dim3 grid(nsub, p.H, p.B);
  // KEYS: segment g needs sub-segments < g * split, so the last segment's are unused; the reverse pass:
  // segment g needs those >= (g + 1) * split, so the first segment's are unused.
  SegSumArgs sa{ws.subS, ws.subZ, x, y, W, saved.row_den, saved.row_delta, s, G / split, nsub,
                keys ? 0 : split, keys ? (nseg - 1) * split : nsub};
  const int scan_blocks = ceil_div((size_t)p.B * p.H * NF * (D + 1), 256);
  if (keys) {
    set_max_smem(segment_sum_kernel<D, true>, SegLayout<D>::BYTES);
    segment_sum_kernel<D, true><<<grid, SEG_THREADS, SegLayout<D>::BYTES, stream>>>(sa);
    CUDA_LAUNCH_CHECK();
    segment_scan_kernel<true><<<scan_blocks, 256, 0, stream>>>(segS, segZ, ws.subS, ws.subZ, p.B * p.H, nseg, nsub, split, D);
  } else {
    set_max_smem(segment_sum_kernel<D, false>, SegLayout<D>::BYTES_QUERIES);
    segment_sum_kernel<D, false><<<grid, SEG_THREADS, SegLayout<D>::BYTES_QUERIES, stream>>>(sa);
    CUDA_LAUNCH_CHECK();
    segment_scan_kernel<false><<<scan_blocks, 256, 0, stream>>>(segS, segZ, ws.subS, ws.subZ, p.B * p.H, nseg, nsub, split, D);
  }
  CUDA_LAUNCH_CHECK();
}
// Where the forward's state prefixes live: in `saved` when it has room (the backward reuses them), else scratch.
inline void state_prefix_buffers(const HybridAttnParams& p, const HybridAttnSaved& saved, const Workspace& ws, float** S, float** Z) {
  if (saved.seg_state) {
    *S = saved.seg_state;
    *Z = saved.seg_state + (size_t)p.B * p.H * num_segments(p) * NF * p.d;
  } else {
    *S = ws.segS;
    *Z = ws.segZ;
  }
}

template <int D>
inline void fast_forward_d(const HybridAttnParams& p, const Shape& s, const bf16* q, const bf16* k, const bf16* v,
                           const HybridAttnWeights& wts, bf16* y, const HybridAttnSaved& saved, const Workspace& ws,
                           const HybridStage1Loss* loss, cudaStream_t stream) {
  float *segS, *segZ;
  state_prefix_buffers(p, saved, ws, &segS, &segZ);
  fast_segment_sums<D>(true, p, s, k, v, wts.Wk, saved, ws, segS, segZ, stream);
  mark("fwd: state prefixes", stream);
  const float inv_n = 1.0f / (float)((size_t)p.B * p.T * p.H * p.d);
  FastFwdArgs fa{y, q, k, v, wts.Wq, wts.Wk, loss ? loss->y_true : nullptr, wts.w, segS, segZ, saved, ws.row_sq,
                 ws.blk_sq, loss ? loss->grad_scale : 0.0f, inv_n, s, seg_chunks(p)};
  const dim3 grid(num_segments(p), p.H, p.B);
  if (uses_v3(p)) {
    const bool sliding = p.geometry == HYBRID_SLIDING;
    const bool wg = use_wgmma();  // Hopper: q K^T of the window tiles in wgmma, K swizzled
    auto kf = wg ? (loss ? (sliding ? fast_forward_v3_kernel<true, true, true> : fast_forward_v3_kernel<false, true, true>)
                         : (sliding ? fast_forward_v3_kernel<true, false, true> : fast_forward_v3_kernel<false, false, true>))
                 : (loss ? (sliding ? fast_forward_v3_kernel<true, true> : fast_forward_v3_kernel<false, true>)
                         : (sliding ? fast_forward_v3_kernel<true, false> : fast_forward_v3_kernel<false, false>));
    const size_t bytes = wg ? Fwd3LayoutT<true>::BYTES : Fwd3Layout::BYTES;
    set_max_smem(kf, bytes);
    kf<<<grid, V3_THREADS, bytes, stream>>>(fa);
  } else {
    set_max_smem(fast_forward_kernel<D>, FwdLayout<D>::BYTES);
    fast_forward_kernel<D><<<grid, 128, FwdLayout<D>::BYTES, stream>>>(fa);
  }
  CUDA_LAUNCH_CHECK();
  mark("fwd: main", stream);
}

// out (B*T, Ho, D) = the feature-map part of dq (bf16, Ho = H, G = 1) or dk (fp32, Ho = Hkv, G = group).
template <int D, class OutT>
inline void launch_du_weights(OutT* out, const bf16* du, const bf16* W, const HybridAttnParams& p, int Ho, int G,
                              cudaStream_t stream) {
  const long long rows = (long long)p.B * p.T;
  // Two blocks an SM in one wave (each loads W of its heads once), the row tiles spread over them. Groups of
  // more than DUW_MAX_HEADS heads (e.g. 128 query heads on 8 kv heads) go in pieces, the later ones added.
  if (G > DUW_MAX_HEADS && !std::is_same<OutT, float>::value) fatal("hybrid attention: du_weights pieces need fp32 output");
  const int bx = std::max(1, std::min(ceil_div(rows, 16LL * DUW_WARPS), 2 * sm_count() / Ho));
  for (int g0 = 0; g0 < G; g0 += DUW_MAX_HEADS) {
    const int gc = std::min(DUW_MAX_HEADS, G - g0);
    const size_t smem = du_weights_smem<OutT>(gc, D);
    set_max_smem(du_weights_kernel<D, OutT>, smem);
    du_weights_kernel<D, OutT><<<dim3((unsigned)bx, Ho), DUW_WARPS * 32, smem, stream>>>(
        DuWeightsArgs<OutT>{out, du, W, rows, Ho, G, g0, gc, g0 > 0});
    CUDA_LAUNCH_CHECK();
  }
}
template <int D>
inline void fast_backward_d(const HybridAttnParams& p, const Shape& s, const bf16* q, const bf16* k, const bf16* v,
                            const HybridAttnWeights& wts, const bf16* y, const bf16* dy, const HybridAttnSaved& saved,
                            const Workspace& ws, const HybridAttnGrads& grads, bool fused, cudaStream_t stream) {
  const bool input_grads = grads.dq || grads.dk || grads.dv;
  const dim3 grid(num_segments(p), p.H, p.B);
  float *segS, *segZ;
  state_prefix_buffers(p, saved, ws, &segS, &segZ);
  FastBwdArgs ba{grads.dq, ws.phiq_bf, ws.du_q, ws.du_k, ws.dm, ws.dk_acc, ws.dv_acc, q, k, v, dy, wts.Wq, wts.Wk,
                 ws.phiq_bf, wts.w, segS, segZ, ws.segS, ws.segZ, saved, input_grads || (!fused && grads.dw != nullptr),
                 input_grads, s, seg_chunks(p)};
  if (!saved.seg_state) fast_segment_sums<D>(true, p, s, k, v, wts.Wk, saved, ws, segS, segZ, stream);  // else: the forward's
  mark("bwd: S prefixes", stream);
  // Version 3 (d = 128): the state kernels form the feature-map gradients (du_q, du_k) and, for the full
  // backward, stateless window kernels and the dv pass (on Hopper the key kernel) add dq, dk, dv. Version 2 does it all in its own kernels.
  const bool v3 = uses_v3(p);
  const bool sliding = p.geometry == HYBRID_SLIDING;
  // After a version-3 forward that kept the feature maps (stage 1, or a caller that gave them room): the state
  // kernels load them.
  const bool phi_saved = v3 && saved.phi_q && saved.phi_k;
  // On Hopper, with the maps, the state kernels' WG forms (wgmma products; the full backward's dv in the key kernel).
  const bool wg_state = phi_saved && use_wgmma();
  if (query_forms_delta(p, saved, fused)) {
    ba.y = y;
    ba.y_lo = saved.y_lo;
  }
  if (wg_state) {
    const bool own_delta = ba.y != nullptr;
    auto kq = sliding ? (own_delta ? fast_backward_query_v3_kernel<true, true, true, true> : fast_backward_query_v3_kernel<true, true, false, true>)
                      : (own_delta ? fast_backward_query_v3_kernel<false, true, true, true> : fast_backward_query_v3_kernel<false, true, false, true>);
    set_max_smem(kq, BwdQ3WgLayout::BYTES);
    kq<<<grid, V3_THREADS, BwdQ3WgLayout::BYTES, stream>>>(ba);
  } else if (v3) {
    const bool own_delta = ba.y != nullptr;
    auto kq = sliding ? (phi_saved ? (own_delta ? fast_backward_query_v3_kernel<true, true, true> : fast_backward_query_v3_kernel<true, true>)
                                   : fast_backward_query_v3_kernel<true, false>)
                      : (phi_saved ? (own_delta ? fast_backward_query_v3_kernel<false, true, true> : fast_backward_query_v3_kernel<false, true>)
                                   : fast_backward_query_v3_kernel<false, false>);
    set_max_smem(kq, BwdQ3Layout::BYTES);
    kq<<<grid, V3_THREADS, BwdQ3Layout::BYTES, stream>>>(ba);
  } else {
    set_max_smem(fast_backward_query_kernel<D>, BwdQLayout<D>::BYTES);
    fast_backward_query_kernel<D><<<grid, 128, BwdQLayout<D>::BYTES, stream>>>(ba);
  }
  CUDA_LAUNCH_CHECK();
  mark("bwd: query side", stream);
  if (v3 && grads.dq) {  // the feature-map part of dq, du_q Wq^T, into dq for the window dq kernel to complete
    launch_du_weights<D>(grads.dq, ws.du_q, wts.Wq, p, p.H, 1, stream);
    mark("bwd: dq maps", stream);
  }
  if (v3 && ba.want_window) {
    if (use_wgmma()) {
      set_max_smem(fast_window_q_wg_kernel, WinQWgLayout::BYTES);
      fast_window_q_wg_kernel<<<dim3(s.NC, p.Hkv, p.B), 128, WinQWgLayout::BYTES, stream>>>(ba);
    } else {
      set_max_smem(fast_window_q_kernel<D>, WinQLayout<D>::BYTES);
      fast_window_q_kernel<D><<<dim3(s.NC, p.Hkv, p.B), 128, WinQLayout<D>::BYTES, stream>>>(ba);
    }
    CUDA_LAUNCH_CHECK();
    mark("bwd: window dq", stream);
  }
  fast_segment_sums<D>(false, p, s, ws.phiq_bf, dy, nullptr, saved, ws, ws.segS, ws.segZ, stream);
  mark("bwd: R prefixes", stream);
  // Hopper with the saved maps: the key kernel forms dv's linear part too (no dv pass).
  const bool dv_fused = wg_state && input_grads;
  if (dv_fused) {
    auto kk = sliding ? fast_backward_key_v3_kernel<true, true, true> : fast_backward_key_v3_kernel<false, true, true>;
    set_max_smem(kk, BwdK3LayoutT<true>::BYTES);
    kk<<<grid, V3_THREADS, BwdK3LayoutT<true>::BYTES, stream>>>(ba);
  } else if (wg_state) {  // stage 1: no dv
    auto kk = sliding ? fast_backward_key_v3_kernel<true, true, true, false> : fast_backward_key_v3_kernel<false, true, true, false>;
    set_max_smem(kk, BwdK3LayoutT<true, false>::BYTES);
    kk<<<grid, V3_THREADS, BwdK3LayoutT<true, false>::BYTES, stream>>>(ba);
  } else if (v3) {
    auto kk = sliding ? (phi_saved ? fast_backward_key_v3_kernel<true, true> : fast_backward_key_v3_kernel<true, false>)
                      : (phi_saved ? fast_backward_key_v3_kernel<false, true> : fast_backward_key_v3_kernel<false, false>);
    set_max_smem(kk, BwdK3Layout::BYTES);
    kk<<<grid, V3_THREADS, BwdK3Layout::BYTES, stream>>>(ba);
  } else {
    set_max_smem(fast_backward_key_kernel<D>, BwdKLayout<D>::BYTES);
    fast_backward_key_kernel<D><<<grid, 128, BwdKLayout<D>::BYTES, stream>>>(ba);
  }
  CUDA_LAUNCH_CHECK();
  mark("bwd: key side", stream);
  if (v3 && input_grads && !dv_fused) {
    auto kv = sliding ? (phi_saved ? fast_backward_dv_v3_kernel<true, true> : fast_backward_dv_v3_kernel<true, false>)
                      : (phi_saved ? fast_backward_dv_v3_kernel<false, true> : fast_backward_dv_v3_kernel<false, false>);
    set_max_smem(kv, BwdDv3Layout::BYTES);
    kv<<<grid, V3_THREADS, BwdDv3Layout::BYTES, stream>>>(ba);
    CUDA_LAUNCH_CHECK();
    mark("bwd: dv linear", stream);
  }
  if (input_grads && v3) {  // dk_acc = du_k Wk^T, then the sinks' part; the window kernel writes dk, dv
    if (grads.dk) launch_du_weights<D>(ws.dk_acc, ws.du_k, wts.Wk, p, p.Hkv, s.group, stream);
    mark("bwd: dk maps", stream);
    if (p.sinks > 0) {
      sink_kv_grad_kernel<<<dim3(s.NC, p.H, p.B), 128, 0, stream>>>(ws.dk_acc, ws.dv_acc, q, k, v, dy, wts.w, saved, ws.dm, s);
      CUDA_LAUNCH_CHECK();
    }
    ba.dk_out = grads.dk;
    ba.dv_out = grads.dv;
    if (use_wgmma()) {
      set_max_smem(fast_window_kv_wg_kernel, WinWgLayout::BYTES);
      fast_window_kv_wg_kernel<<<dim3(s.NC, p.Hkv, p.B), 128, WinWgLayout::BYTES, stream>>>(ba);
    } else {
      set_max_smem(fast_window_kv_v3_kernel<D>, WinLayout<D>::BYTES);
      fast_window_kv_v3_kernel<D><<<dim3(s.NC, p.Hkv, p.B), 128, WinLayout<D>::BYTES, stream>>>(ba);
    }
    CUDA_LAUNCH_CHECK();
    mark("bwd: window dk dv", stream);
  } else if (input_grads) {
    set_max_smem(fast_window_kv_kernel<D>, WinLayout<D>::BYTES);
    fast_window_kv_kernel<D><<<dim3(s.NC, p.H, p.B), 128, WinLayout<D>::BYTES, stream>>>(ba);
    CUDA_LAUNCH_CHECK();
    mark("bwd: window dk dv", stream);
  }
  if (grads.dWq) {  // (stage 2 freezes the maps: no weight gradients)
    const long long BT = (long long)p.B * p.T;
    WeightGradArgs wa{ws.dW_part, q, k, ws.du_q, ws.du_k, s, (int)((BT + WG_SPLITS * 64 - 1) / (WG_SPLITS * 64) * 64)};
    set_max_smem(weight_grad_kernel<D>, WgLayout<D>::BYTES);
    weight_grad_kernel<D><<<dim3(WG_SPLITS, p.H, 2), 128, WgLayout<D>::BYTES, stream>>>(wa);
    CUDA_LAUNCH_CHECK();
    const size_t nW = (size_t)p.H * p.d * p.f;
    weight_grad_reduce_kernel<<<ceil_div(2 * nW, 256), 256, 0, stream>>>(grads.dWq, grads.dWk, ws.dW_part, nW, WG_SPLITS);
    CUDA_LAUNCH_CHECK();
  }
  mark("bwd: weight grads", stream);
}

inline void fast_forward(const HybridAttnParams& p, const Shape& s, const bf16* q, const bf16* k, const bf16* v,
                         const HybridAttnWeights& wts, bf16* y, const HybridAttnSaved& saved, const Workspace& ws,
                         const HybridStage1Loss* loss, cudaStream_t stream) {
  if (p.d == 128) fast_forward_d<128>(p, s, q, k, v, wts, y, saved, ws, loss, stream);
  else fast_forward_d<64>(p, s, q, k, v, wts, y, saved, ws, loss, stream);
}
inline void fast_backward(const HybridAttnParams& p, const Shape& s, const bf16* q, const bf16* k, const bf16* v,
                          const HybridAttnWeights& wts, const bf16* y, const bf16* dy, const HybridAttnSaved& saved,
                          const Workspace& ws, const HybridAttnGrads& grads, bool fused, cudaStream_t stream) {
  if (p.d == 128) fast_backward_d<128>(p, s, q, k, v, wts, y, dy, saved, ws, grads, fused, stream);
  else fast_backward_d<64>(p, s, q, k, v, wts, y, dy, saved, ws, grads, fused, stream);
}

}  // namespace hybrid_detail

// ================================================================================================
// Host functions
// ================================================================================================

inline void hybrid_check_params(const HybridAttnParams& p) {
  if (p.B < 1 || p.T < 1 || p.H < 1 || p.Hkv < 1) fatal("hybrid attention: bad shape B=%d T=%d H=%d Hkv=%d", p.B, p.T, p.H, p.Hkv);
  if (p.H % p.Hkv != 0) fatal("hybrid attention: H=%d is not a multiple of Hkv=%d", p.H, p.Hkv);
  if (p.d != 8 && p.d != 16 && p.d != 32 && p.d != 64 && p.d != 128)
    fatal("hybrid attention: head dim %d not supported (8, 16, 32, 64, 128)", p.d);
  if (p.f < 1 || p.f > HYBRID_MAX_F) fatal("hybrid attention: feature dim %d not in 1..%d", p.f, HYBRID_MAX_F);
  if (p.window != HYBRID_WINDOW) fatal("hybrid attention: window %d not supported (the kernels use %d)", p.window, HYBRID_WINDOW);
  if (p.geometry != HYBRID_TERRACE && p.geometry != HYBRID_SLIDING) fatal("hybrid attention: unknown geometry %d", p.geometry);
  if (p.sinks < 0 || p.sinks > HYBRID_MAX_SINKS) fatal("hybrid attention: %d sinks not in 0..%d", p.sinks, HYBRID_MAX_SINKS);
  if ((p.impl == HYBRID_IMPL_TENSOR || p.impl == HYBRID_IMPL_TENSOR_V2) && !((p.d == 64 || p.d == 128) && p.f == 64))
    fatal("hybrid attention: the tensor-core kernels need d = 64 or 128 and f = 64 (got d=%d f=%d)", p.d, p.f);
}

inline size_t hybrid_saved_bytes(const HybridAttnParams& p, bool with_dy, bool with_ylo, bool with_phi) {
  const size_t rows = (size_t)p.B * p.T * p.H;
  size_t off = 0;
  for (int i = 0; i < 5; i++) hybrid_detail::carve(off, rows * 4);
  if (with_dy) hybrid_detail::carve(off, rows * p.d * 2);
  if (with_ylo) hybrid_detail::carve(off, rows * p.d * 2);
  hybrid_detail::carve(off, hybrid_detail::seg_state_floats(p) * 4);
  if ((with_dy || with_phi) && hybrid_detail::keeps_phi(p)) {
    hybrid_detail::carve(off, rows * hybrid_detail::NF * 2);
    hybrid_detail::carve(off, rows * hybrid_detail::NF * 2);
    hybrid_detail::carve(off, (size_t)p.B * p.H * hybrid_detail::num_segments(p) * 4);
  }
  return off;
}
inline HybridAttnSaved hybrid_saved_carve(void* base, const HybridAttnParams& p, bool with_dy, bool with_ylo, bool with_phi) {
  const size_t rows = (size_t)p.B * p.T * p.H;
  char* c = (char*)base;
  size_t off = 0;
  HybridAttnSaved s;
  s.row_max = (float*)(c + hybrid_detail::carve(off, rows * 4));
  s.row_den = (float*)(c + hybrid_detail::carve(off, rows * 4));
  s.row_argmax = (int*)(c + hybrid_detail::carve(off, rows * 4));
  s.row_delta = (float*)(c + hybrid_detail::carve(off, rows * 4));
  s.row_wgrad = (float*)(c + hybrid_detail::carve(off, rows * 4));
  s.dy = with_dy ? (bf16*)(c + hybrid_detail::carve(off, rows * p.d * 2)) : nullptr;
  s.y_lo = with_ylo ? (bf16*)(c + hybrid_detail::carve(off, rows * p.d * 2)) : nullptr;
  const size_t seg = hybrid_detail::seg_state_floats(p);
  s.seg_state = seg ? (float*)(c + hybrid_detail::carve(off, seg * 4)) : nullptr;
  if ((with_dy || with_phi) && hybrid_detail::keeps_phi(p)) {
    s.phi_q = (__half*)(c + hybrid_detail::carve(off, rows * hybrid_detail::NF * 2));
    s.phi_k = (__half*)(c + hybrid_detail::carve(off, rows * hybrid_detail::NF * 2));
    s.wgrad_part = (float*)(c + hybrid_detail::carve(off, (size_t)p.B * p.H * hybrid_detail::num_segments(p) * 4));
  }
  return s;
}
inline size_t hybrid_workspace_bytes(const HybridAttnParams& p, bool input_grads) {
  size_t total = 0;
  hybrid_detail::workspace_layout(nullptr, p, &total, input_grads);
  return total;
}

inline void hybrid_attention_forward(const HybridAttnParams& p, const bf16* q, const bf16* k, const bf16* v,
                                     const HybridAttnWeights& wts, bf16* y, const HybridAttnSaved& saved,
                                     void* workspace, const HybridStage1Loss* loss, cudaStream_t stream) {
  using namespace hybrid_detail;
  hybrid_check_params(p);
  if (loss && (!loss->y_true || !loss->mse || !saved.dy)) fatal("hybrid attention: the stage-1 loss needs y_true, mse and saved.dy");
  if (!y && !loss) fatal("hybrid attention: y is required without the stage-1 loss");
  const Shape s = make_shape(p);
  Workspace ws = workspace_layout(workspace, p, nullptr, /*input_grads=*/false);  // the forward uses none of them
  const size_t rows = (size_t)p.B * p.T * p.H;
  const float inv_n = 1.0f / (float)(rows * p.d);
  if (hybrid_uses_fast_path(p)) {
    fast_forward(p, s, q, k, v, wts, y, saved, ws, loss, stream);
  } else {
    const int F2 = 2 * p.f;
    generic_feature_map_kernel<<<ceil_div(rows, 4), 128, 0, stream>>>(ws.phiq, q, wts.Wq, s, p.H);
    CUDA_LAUNCH_CHECK();
    generic_feature_map_kernel<<<ceil_div(rows, 4), 128, 0, stream>>>(ws.phik, k, wts.Wk, s, p.Hkv);
    CUDA_LAUNCH_CHECK();
    const dim3 grid(s.NC, p.H, p.B);
    generic_chunk_sum_kernel<true><<<grid, 256, 0, stream>>>(ws.St, ws.zt, ws.phik, v, nullptr, nullptr, s);
    CUDA_LAUNCH_CHECK();
    generic_chunk_scan_kernel<true><<<ceil_div((size_t)p.B * p.H * F2 * (p.d + 1), 256), 256, 0, stream>>>(ws.St, ws.zt, s);
    CUDA_LAUNCH_CHECK();
    GenericFwdArgs a{y, q, k, v, loss ? loss->y_true : nullptr, ws.phiq, ws.phik, ws.St, ws.zt, wts.w, saved,
                     ws.row_sq, loss ? loss->grad_scale : 0.0f, inv_n, s};
    generic_forward_kernel<<<grid, 128, 0, stream>>>(a);
    CUDA_LAUNCH_CHECK();
  }
  if (loss && hybrid_uses_fast_path(p) && uses_v3(p)) {  // the blocks' sums: one small pass, not one over the rows
    sum_into_kernel<<<1, 1024, 0, stream>>>(loss->mse, ws.blk_sq, (size_t)p.B * p.H * num_segments(p), inv_n);
    CUDA_LAUNCH_CHECK();
  } else if (loss) {
    partial_sum_kernel<<<SUM_BLOCKS, 256, 0, stream>>>(ws.sum_part, ws.row_sq, rows);
    CUDA_LAUNCH_CHECK();
    sum_into_kernel<<<1, 1024, 0, stream>>>(loss->mse, ws.sum_part, SUM_BLOCKS, inv_n);
    CUDA_LAUNCH_CHECK();
  }
  mark("fwd: loss sum", stream);
}

inline void hybrid_attention_backward(const HybridAttnParams& p, const bf16* q, const bf16* k, const bf16* v,
                                      const HybridAttnWeights& wts, const bf16* y, const bf16* dy,
                                      const HybridAttnSaved& saved, void* workspace, const HybridAttnGrads& grads,
                                      cudaStream_t stream) {
  using namespace hybrid_detail;
  hybrid_check_params(p);
  if (!grads.dWq != !grads.dWk) fatal("hybrid attention backward: give both dWq and dWk, or neither");
  const bool fused = dy == nullptr;
  if (fused && !grads.dWq) fatal("hybrid attention backward: the stage-1 backward needs dWq and dWk");
  if (fused && !saved.dy) fatal("hybrid attention backward: no dy given and the forward did not fuse the stage-1 loss");
  if (!fused && !y) fatal("hybrid attention backward: y (the forward output) is required with dy");
  const Shape s = make_shape(p);
  const bool input_grads = grads.dq || grads.dk || grads.dv;
  // (without input gradients, the buffers only they use are null: the workspace may end before them)
  Workspace ws = workspace_layout(workspace, p, nullptr, input_grads);
  const size_t rows = (size_t)p.B * p.T * p.H, kv = (size_t)p.B * p.T * p.Hkv * p.d;
  const bf16* g = fused ? saved.dy : dy;
  if (!fused && !query_forms_delta(p, saved, fused)) {
    delta_kernel<<<ceil_div(rows, 8), 256, 0, stream>>>(saved.row_delta, dy, y, saved.y_lo, saved.row_den, rows, p.d);
    CUDA_LAUNCH_CHECK();
  }
  mark("bwd: delta", stream);
  // Version 3 (fast path, d = 128) writes dk, dv from its window kernel; dk_acc then starts as du_k Wk^T
  // (written, not added, by du_weights_kernel).
  const bool v3_out = hybrid_uses_fast_path(p) && uses_v3(p);
  if (input_grads && !v3_out) {  // (version 3: the window dq kernel zeroes dv_acc, tile by tile)
    CUDA_CHECK(cudaMemsetAsync(ws.dk_acc, 0, kv * 4, stream));
    CUDA_CHECK(cudaMemsetAsync(ws.dv_acc, 0, kv * 4, stream));
  }
  if (hybrid_uses_fast_path(p)) {
    fast_backward(p, s, q, k, v, wts, y, g, saved, ws, grads, fused, stream);
  } else {
    const int F2 = 2 * p.f;
    const dim3 grid(s.NC, p.H, p.B);
    const int scan_blocks = ceil_div((size_t)p.B * p.H * F2 * (p.d + 1), 256);
    generic_feature_map_kernel<<<ceil_div(rows, 4), 128, 0, stream>>>(ws.phiq, q, wts.Wq, s, p.H);
    CUDA_LAUNCH_CHECK();
    generic_feature_map_kernel<<<ceil_div(rows, 4), 128, 0, stream>>>(ws.phik, k, wts.Wk, s, p.Hkv);
    CUDA_LAUNCH_CHECK();
    generic_chunk_sum_kernel<true><<<grid, 256, 0, stream>>>(ws.St, ws.zt, ws.phik, v, nullptr, nullptr, s);
    CUDA_LAUNCH_CHECK();
    generic_chunk_scan_kernel<true><<<scan_blocks, 256, 0, stream>>>(ws.St, ws.zt, s);
    CUDA_LAUNCH_CHECK();
    GenericBwdArgs a{grads.dq, ws.du_q, ws.dm, ws.dk_acc, ws.dv_acc, q, k, v, g, wts.Wq, wts.Wk,
                     ws.phiq, ws.phik, ws.St, ws.zt, wts.w, saved, input_grads || (!fused && grads.dw), input_grads, s};
    generic_backward_query_kernel<<<grid, 128, 0, stream>>>(a);
    CUDA_LAUNCH_CHECK();
    generic_chunk_sum_kernel<false><<<grid, 256, 0, stream>>>(ws.St, ws.zt, ws.phiq, g, saved.row_den, saved.row_delta, s);
    CUDA_LAUNCH_CHECK();
    generic_chunk_scan_kernel<false><<<scan_blocks, 256, 0, stream>>>(ws.St, ws.zt, s);
    CUDA_LAUNCH_CHECK();
    a.du = ws.du_k;
    generic_backward_key_kernel<<<grid, 128, 0, stream>>>(a);
    CUDA_LAUNCH_CHECK();
    if (grads.dWq) {
      const size_t nW = (size_t)p.H * p.d * p.f;
      generic_weight_grad_kernel<<<ceil_div(nW, 128), 128, 0, stream>>>(grads.dWq, q, ws.du_q, s, p.H);
      CUDA_LAUNCH_CHECK();
      generic_weight_grad_kernel<<<ceil_div(nW, 128), 128, 0, stream>>>(grads.dWk, k, ws.du_k, s, p.Hkv);
      CUDA_LAUNCH_CHECK();
    }
  }
  if (grads.dw && fused && saved.wgrad_part) {  // a version-3 stage-1 forward summed the window terms per block
    window_grad_part_kernel<<<1, 256, 0, stream>>>(grads.dw, saved.wgrad_part, wts.w, p.B, p.H, num_segments(p));
    CUDA_LAUNCH_CHECK();
  } else if (grads.dw) {
    window_grad_kernel<<<p.H, 256, 0, stream>>>(grads.dw, saved.row_wgrad, wts.w, p.B * p.T, p.H);
    CUDA_LAUNCH_CHECK();
  }
  if (input_grads && !v3_out) {
    if (p.sinks > 0) {
      sink_kv_grad_kernel<<<dim3(s.NC, p.H, p.B), 128, 0, stream>>>(ws.dk_acc, ws.dv_acc, q, k, v, g, wts.w, saved, ws.dm, s);
      CUDA_LAUNCH_CHECK();
    }
    if (grads.dk) {
      f32_to_bf16_kernel<<<ceil_div(kv, 256), 256, 0, stream>>>(grads.dk, ws.dk_acc, kv);
      CUDA_LAUNCH_CHECK();
    }
    if (grads.dv) {
      f32_to_bf16_kernel<<<ceil_div(kv, 256), 256, 0, stream>>>(grads.dv, ws.dv_acc, kv);
      CUDA_LAUNCH_CHECK();
    }
  }
  mark("bwd: dw, sinks, dk/dv out", stream);
}
