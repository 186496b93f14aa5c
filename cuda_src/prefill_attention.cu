// Causal attention of several new tokens per sequence over the PQ cache, on tensor cores. Three regimes:
// prefill_attention (below) for chunks of up to ~64 tokens per sequence, which dequantizes tiles into shared
// memory; verify_attention (further down) for at most 32 query rows per kv head (speculative verification),
// which gathers centroids straight into MMA fragments; and for long chunks (chunked prefill, multi-turn prompts)
// dequantize_history into a workspace once per layer, then dense_prefill_attention over it (last). All share the
// host's work list (prefill.TensorCorePlan) and prefill_merge.
//
// One CTA of 8 warps serves one work item: a (sequence, kv head, tile of 16 * RT query rows, token range)
// quadruple planned on the host (prefill.TensorCorePlan). A query row is one (new token j, query head h of the
// kv head's group) pair, row = j * G + h, so the GQA group and the chunk's tokens share every K / V tile.
// The warps are RT row tiles of 16 rows x 8 / RT token groups: with few rows (speculative verification, RT = 1)
// every warp still has MMA work, on its own slice of each tile, with its own softmax state; the token groups'
// states are merged through shared memory at the end. RT = 8 gives each warp 16 rows and whole tiles.
// Per 64-token tile, the CTA first dequantizes the tile into shared memory (fp16 / bf16, [token][dim]):
// PQ tokens (in full pages) by gathering centroids from the kv head's two codebooks, staged in shared memory
// once per CTA; residual tokens by copying their exact rows from the ring. Each warp then runs flash
// attention for its 16 rows with mma.sync m16n8k16 (S = Q K^T, online softmax in the log2 domain, O += P V)
// over the tile, masked causally: row j attends to the first n - c + j + 1 tokens of its sequence (n tokens
// after the append of the c new ones). The next tile's codes are loaded into registers while the warps
// compute, so the dequantization waits on shared memory only.
//
// Splits of one (sequence, kv head, row tile) write partial (o, lse) states; prefill_merge combines them.
#include "decode_common.cuh"

namespace mc {
namespace prefill {

constexpr int NWARPS = 8;
constexpr int NT = NWARPS * 32;
constexpr int BN = 64;           // tokens per tile
constexpr float LN2 = 0.6931471805599453f;
constexpr float RESCALE_SLACK = 8.f;  // log2 units a score may exceed the row's reference max by
#define kNegInf (-__int_as_float(0x7f800000))

// Two values of T in one 32-bit register (the MMA operand format), and T's MMA.
template <typename T> struct Ops;
template <> struct Ops<__half> {
  static __device__ __forceinline__ unsigned pack(float x, float y) {
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&h);
  }
  // A pair of fp16 centroid values, as stored.
  static __device__ __forceinline__ unsigned from_half2(unsigned h) { return h; }
  static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(b0));
  }
};
template <> struct Ops<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned pack(float x, float y) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&h);
  }
  static __device__ __forceinline__ unsigned from_half2(unsigned h) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    return pack(f.x, f.y);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma_k8(float (&c)[4], unsigned a0, unsigned a1, unsigned b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(b0));
  }
};

// Read-only global loads the compiler issues where they are written (volatile: not sunk towards their use).
__device__ __forceinline__ int load_pinned(const int* p) {
  int v;
  asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
// out[I] := the E words at shared-window byte address addr[I] + (I / GROUP) * STRIDE, the offset carried by the
// load instruction (no address arithmetic per load). volatile keeps them after the barrier that publishes the
// tables.
template <int N, int E, int GROUP, int STRIDE, int I = 0>
__device__ __forceinline__ void lds_offset(unsigned (&out)[N][E], const unsigned (&addr)[N]) {
  static_assert(E == 1 || E == 2, "1 or 2 words");
  if constexpr (I < N) {
    if constexpr (E == 1)
      asm volatile("ld.shared.b32 %0, [%1+%2];" : "=r"(out[I][0]) : "r"(addr[I]), "n"(I / GROUP * STRIDE));
    else
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2+%3];"
                   : "=r"(out[I][0]), "=r"(out[I][1]) : "r"(addr[I]), "n"(I / GROUP * STRIDE));
    lds_offset<N, E, GROUP, STRIDE, I + 1>(out, addr);
  }
}

// N words at byte offsets I * STRIDE from p, which the load instructions carry (no address arithmetic per load).
template <int N, int STRIDE, int I = 0>
__device__ __forceinline__ void load_pinned_strided(unsigned* dst, const int* p) {
  if constexpr (I < N) {
    asm volatile("ld.global.nc.b32 %0, [%1+%2];" : "=r"(dst[I]) : "l"(p), "n"(I * STRIDE));
    load_pinned_strided<N, STRIDE, I + 1>(dst, p);
  }
}
__device__ __forceinline__ uint2 load_pinned(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 load_pinned(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// The online softmax's reference maxima of a lane's two rows (g and g + 8) after a tile whose masked raw scores
// (Q K^T, before the scale) peak at mxA / mxB in this lane; the row's four lanes are reduced here, and the peaks
// scaled into the log2 domain (scale_log2 > 0, so the max commutes with it). Lazy rescaling: a reference
// max moves only when a score exceeds it by more than RESCALE_SLACK, so p stays <= 2^RESCALE_SLACK (exact in
// fp16 / bf16 as a value, fp32 sums) and the O rescale by alpha, D / 2 multiplies per lane, runs only on the few
// tiles where some row of the warp moved its max (the return value, uniform over the warp). A row that has seen
// no token keeps max -inf; its exponents are then taken from base 0 (all p = 0).
__device__ __forceinline__ bool lazy_max(float mxA, float mxB, float scale_log2, float& mA, float& mB, float& baseA,
                                         float& baseB, float& alphaA, float& alphaB) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, off));
    mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, off));
  }
  mxA *= scale_log2;
  mxB *= scale_log2;
  const float mnA = mxA > mA + RESCALE_SLACK ? mxA : mA, mnB = mxB > mB + RESCALE_SLACK ? mxB : mB;
  const bool moved = __any_sync(0xffffffffu, mnA != mA || mnB != mB);
  baseA = mnA == kNegInf ? 0.f : mnA;
  baseB = mnB == kNegInf ? 0.f : mnB;
  alphaA = fast_exp2(mA - baseA);
  alphaB = fast_exp2(mB - baseB);
  mA = mnA;
  mB = mnB;
  return moved;
}

// The exponentials 2^(s scale_log2 - base) of a 16 x 8 fragment of raw scores (rows g: elements 0, 1; g + 8: 2, 3;
// masked ones -inf) against the rows' bases, the scale folded into one FFMA per score as in FlashAttention-2, and
// their per-lane sums added to sumA / sumB (the four lanes of a row are added at the end, finish_rows).
__device__ __forceinline__ void exp_scores(float (&s)[4], float scale_log2, float baseA, float baseB, float& sumA,
                                           float& sumB) {
  s[0] = fast_exp2(fmaf(s[0], scale_log2, -baseA));
  s[1] = fast_exp2(fmaf(s[1], scale_log2, -baseA));
  s[2] = fast_exp2(fmaf(s[2], scale_log2, -baseB));
  s[3] = fast_exp2(fmaf(s[3], scale_log2, -baseB));
  sumA += s[0] + s[1];
  sumB += s[2] + s[3];
}

// The weight of a partial state with max m in a merge whose max is mx: 0 for a state that has seen no token.
__device__ __forceinline__ float state_weight(float m, float mx) { return m == kNegInf ? 0.f : fast_exp2(m - mx); }

// A lane's two rows at the end: their sums over the row's four lanes, as 1 / l (0 for a row that saw no token)
// and the log2-sum-exp m + log2(l) (-inf for such a row).
__device__ __forceinline__ void finish_rows(float lA, float lB, float mA, float mB, float& invA, float& invB,
                                            float& lseA, float& lseB) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  invA = lA > 0.f ? 1.f / lA : 0.f;
  invB = lB > 0.f ? 1.f / lB : 0.f;
  lseA = lA > 0.f ? mA + log2f(lA) : kNegInf;
  lseB = lB > 0.f ? mB + log2f(lB) : kNegInf;
}

// The kernel's dynamic shared memory is at least `need` bytes (the host sizes it from the same formula).
__device__ __forceinline__ void require_dynamic_smem(size_t need) {
  if (threadIdx.x == 0) {
    unsigned int dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < need) __trap();
  }
}

// This CTA's work item of the host's list (prefill.TensorCorePlan): a (sequence, kv head, row tile, token range),
// with the rows it derives. Opening it first checks the launch's dynamic shared memory.
struct WorkItem {
  int b, kvh, row0;        // sequence index in the batch, kv head, first query row of the tile
  int4 seq;                // {first query row in q, new tokens c, tokens n, tokens in pages}
  int t_begin, t_end;      // the item's cached tokens
  int G, rows;             // query heads per kv head; the sequence's query rows (new tokens x G)
  bool single;             // the unit's only split: the output is written directly, not merged
};
__device__ __forceinline__ WorkItem open_work_item(size_t smem_need, const int4* items, const int4* units,
                                                   const int4* seq_meta, int nh, int nh_k) {
  require_dynamic_smem(smem_need);
  const int4 item = items[blockIdx.x];
  const int4 unit = units[item.x];
  WorkItem w;
  w.b = unit.x;
  w.kvh = unit.y;
  w.row0 = unit.z;
  w.seq = seq_meta[w.b];
  w.t_begin = item.y;
  w.t_end = item.z;
  w.G = nh / nh_k;
  w.rows = w.seq.y * w.G;
  w.single = item.w == 1;
  return w;
}

// A work item over the PQ pages and the residual ring: where its sequence's codes and ring rows are.
struct PqWorkItem : WorkItem {
  int page_mask;           // a token's index within its page
  long long prow;          // index in page_table of the sequence's first page
  long long ring_base;     // the (sequence, kv head) row of the residual ring
  const unsigned char *k_codes, *v_codes;  // the kv head's codes in the layer's pool
};
__device__ __forceinline__ PqWorkItem open_pq_work_item(size_t smem_need, const int4* items, const int4* units,
                                                        const int4* seq_meta, const long long* page_row,
                                                        const int* res_row, int nh, int nh_k, int ring_cap,
                                                        int page_shift, const unsigned char* k_codes,
                                                        const unsigned char* v_codes, long long head_stride) {
  PqWorkItem w;
  static_cast<WorkItem&>(w) = open_work_item(smem_need, items, units, seq_meta, nh, nh_k);
  w.page_mask = (1 << page_shift) - 1;
  w.prow = page_row[w.b];
  w.ring_base = ((long long)res_row[w.b] * nh_k + w.kvh) * ring_cap;
  w.k_codes = k_codes + w.kvh * head_stride;
  w.v_codes = v_codes + w.kvh * head_stride;
  return w;
}

// A kv head's K and V codebooks ([c][m][dsub] fp16, 256 x D values each) into shared memory by the CTA's NT
// threads, asynchronously (cp.async; the caller waits).
template <int D>
__device__ __forceinline__ void copy_codebooks(__half* k_dst, __half* v_dst, const __half* k_src, const __half* v_src) {
  constexpr int CHUNKS = (int)(sizeof(__half) * 256 * D / 16);
  const uint4* ks = reinterpret_cast<const uint4*>(k_src);
  const uint4* vs = reinterpret_cast<const uint4*>(v_src);
  uint4* kd = reinterpret_cast<uint4*>(k_dst);
  uint4* vd = reinterpret_cast<uint4*>(v_dst);
#pragma unroll 4
  for (int i = threadIdx.x; i < CHUNKS; i += NT) {
    cp_async16(kd + i, ks + i);
    cp_async16(vd + i, vs + i);
  }
}

// The dequantization tasks of a 64-token tile, spread over the CTA's NT threads (prefill_attention's fill and
// dequantize_history): K as (token, 16-byte code chunk) pairs, a warp's lanes being consecutive tokens, so the
// in-page XOR permutation puts their gathers on distinct banks; V as (16-token block, subspace) pairs.
template <int D, int M>
struct PqTileTasks {
  static constexpr int DSUB = D / M;
  static constexpr int ROT = M < 32 ? M : 32;  // K-row permutation period (layout.permute_k_rows)
  static constexpr int K_TASKS = BN * (M / 16);
  static constexpr int V_TASKS = (BN / 16) * M;
  static constexpr int KT = (K_TASKS + NT - 1) / NT, VT = (V_TASKS + NT - 1) / NT;  // tasks per thread
  static_assert(M >= 16 && M % 16 == 0 && (DSUB == 2 || DSUB == 4 || DSUB == 8), "M, DSUB");
};

template <int D>
struct PrefillSmem {
  static constexpr int STAGES = 2;   // tile buffers: one being filled while the other is computed on
  static constexpr int ROW = D + 8;  // tile row stride (elements): 16 bytes of padding keep ldmatrix conflict-free
  static constexpr size_t codebook_bytes = sizeof(__half) * 256 * D;  // one kind, [c][m][dsub]
  static constexpr size_t tile_bytes = 2 * BN * ROW;                  // one kind, [token][ROW] of 2-byte T
  static constexpr size_t total = 2 * codebook_bytes + 2 * STAGES * tile_bytes;
  // The token groups' states (o and the row statistics, fragment order) reuse the tile buffers at the end.
  static constexpr size_t merge_bytes = sizeof(float) * NWARPS * 32 * (D / 2 + 4);
  static_assert(merge_bytes <= 2 * STAGES * tile_bytes, "merge area");
};

template <int D, int M, typename T, int RT>
__global__ void __launch_bounds__(NT, 1) prefill_attention(
    const T* __restrict__ q,                    // (N, nh, D): the new tokens' queries, CSR order
    T* __restrict__ out,                        // (N, nh, D)
    float* __restrict__ lse_out,                // (N, nh) natural log, or nullptr
    const __half* __restrict__ k_cent,          // (Hc, 256, M, DSUB) fp16, [c][m] order
    const __half* __restrict__ v_cent,
    long long cb_head_stride,                   // elements between kv heads' codebooks (0: shared)
    const unsigned char* __restrict__ k_codes,  // pool + layer K offset
    const unsigned char* __restrict__ v_codes,  // pool + layer V offset
    const T* __restrict__ ring_k,               // residual ring (S, nh_k, R, D)
    const T* __restrict__ ring_v,
    int ring_cap,
    long long page_stride, long long head_stride,  // bytes per page; P * M
    const int* __restrict__ page_table, int page_shift,
    const int4* __restrict__ seq_meta,          // (B): {first query row in q, new tokens c, tokens n, tokens in pages}
    const long long* __restrict__ page_row,     // (B): index in page_table of the sequence's first page
    const int* __restrict__ res_row,            // (B): ring row (sequence slot)
    const int4* __restrict__ units,             // (U): {b, kv head, first query row of the tile, first item}
    const int4* __restrict__ items,             // (W): {unit, token begin, token end, splits of the unit}
    float* __restrict__ part_o,                 // (W, 16 * RT, D)
    float* __restrict__ part_lse,               // (W, 16 * RT) log2
    int nh, int nh_k, float scale_log2) {
  wait_for_previous_grid();
  using S = PrefillSmem<D>;
  static_assert(RT == 1 || RT == 2 || RT == 4 || RT == 8, "RT");
  constexpr int BM = 16 * RT;       // query rows per CTA
  constexpr int TG = NWARPS / RT;   // token groups
  constexpr int NW = BN / TG;       // tokens of a tile per warp
  using Tasks = PqTileTasks<D, M>;
  constexpr int DSUB = Tasks::DSUB, ROT = Tasks::ROT, K_TASKS = Tasks::K_TASKS, V_TASKS = Tasks::V_TASKS;
  constexpr int KT = Tasks::KT, VT = Tasks::VT;
  constexpr int ROW = S::ROW;
  static_assert(D % 16 == 0 && D <= 128, "D");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* kc_s = reinterpret_cast<__half*>(smem_raw);
  __half* vc_s = kc_s + 256 * D;
  T* tiles = reinterpret_cast<T*>(vc_s + 256 * D);  // per stage: K tile, then V tile

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rt = warp / TG, tg = warp % TG;  // this warp's row tile and token group
  const int tok0 = tg * NW;                  // its slice of every tile
  const PqWorkItem wi = open_pq_work_item(S::total, items, units, seq_meta, page_row, res_row, nh, nh_k, ring_cap,
                                     page_shift, k_codes, v_codes, head_stride);
  const int kvh = wi.kvh, n_main = wi.seq.w, t_begin = wi.t_begin, t_end = wi.t_end;
  const int G = wi.G, rows = wi.rows, page_mask = wi.page_mask;
  const int4 sm = wi.seq;

  // ---- both codebooks of the kv head into shared memory (asynchronous: they land during the Q loads) ----
  copy_codebooks<D>(kc_s, vc_s, k_cent + kvh * cb_head_stride, v_cent + kvh * cb_head_stride);

  // ---- this warp's 16 query rows: Q fragments in registers, causal limits ----------------------------
  const int g = lane >> 2, i4 = lane & 3;
  const int rA = wi.row0 + rt * 16 + g, rB = rA + 8;
  const bool vA = rA < rows, vB = rB < rows;
  const int jA = vA ? rA / G : 0, jB = vB ? rB / G : 0;
  const T* qA = q + ((long long)(sm.x + jA) * nh + kvh * G + (vA ? rA % G : 0)) * D;
  const T* qB = q + ((long long)(sm.x + jB) * nh + kvh * G + (vB ? rB % G : 0)) * D;
  unsigned qf[D / 16][4];
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) {
    const int d0 = kb * 16 + 2 * i4;
    qf[kb][0] = vA ? __ldg(reinterpret_cast<const unsigned*>(qA + d0)) : 0u;
    qf[kb][1] = vB ? __ldg(reinterpret_cast<const unsigned*>(qB + d0)) : 0u;
    qf[kb][2] = vA ? __ldg(reinterpret_cast<const unsigned*>(qA + d0 + 8)) : 0u;
    qf[kb][3] = vB ? __ldg(reinterpret_cast<const unsigned*>(qB + d0 + 8)) : 0u;
  }
  // Tokens each row attends to (its sequence position + 1); rows past the chunk see none.
  const int limA = vA ? sm.z - sm.y + jA + 1 : 0;
  const int limB = vB ? sm.z - sm.y + jB + 1 : 0;
  int warp_lim = max(limA, limB);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, off));

  // ---- tile staging: page ids two tiles ahead, codes into registers one tile ahead, then dequantized into
  // shared memory. The page ids are loaded an iteration before the codes they address, so no warp waits on
  // the page table's latency between its dequantization and its MMAs (measured: the dependent load was the
  // top stall); the loads are pinned where they are written (load_pinned), since the compiler otherwise sinks
  // them next to their use.
  uint4 kreg[KT], vreg[VT];
  int kpage[KT], vpage[VT];
  auto load_pages = [&](int x0) {
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT, x = x0 + task % BN;
      if (task < K_TASKS && x < t_end && x < n_main) kpage[k] = load_pinned(page_table + wi.prow + (x >> page_shift));
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT, xb = x0 + (task / M) * 16;
      if (task < V_TASKS && xb < t_end && xb < n_main) vpage[k] = load_pinned(page_table + wi.prow + (xb >> page_shift));
    }
  };
  auto load_codes = [&](int x0) {  // the pages of x0's tile were loaded by load_pages(x0)
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT;
      const int x = x0 + task % BN, chunk = task / BN;
      if (task < K_TASKS && x < t_end && x < n_main)
        kreg[k] = load_pinned(reinterpret_cast<const uint4*>(
            wi.k_codes + (long long)max(kpage[k], 0) * page_stride + chunk * ((page_mask + 1) * 16) +
            (x & page_mask) * 16));
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT;
      const int xb = x0 + (task / M) * 16, m = task % M;
      if (task < V_TASKS && xb < t_end && xb < n_main)
        vreg[k] = load_pinned(reinterpret_cast<const uint4*>(
            wi.v_codes + (long long)max(vpage[k], 0) * page_stride + ((xb & page_mask) >> 4) * (M * 16) + m * 16));
    }
  };
  // Centroid (code, m): DSUB fp16 values, read as W 32-bit words; stored into a tile row as T.
  constexpr int W = DSUB / 2;
  using CentroidWords = typename VecOf<W * 4 < 8 ? 8 : W * 4>::type;  // uint2 or uint4 (W = 1 uses .x)
  auto load_centroid = [&](const __half* table, unsigned code, int m) -> CentroidWords {
    const __half* src = table + ((int)code * M + m) * DSUB;
    CentroidWords v;
    if constexpr (W == 1) v.x = *reinterpret_cast<const unsigned*>(src);
    else v = *reinterpret_cast<const CentroidWords*>(src);
    return v;
  };
  auto store_centroid = [&](T* dst, const CentroidWords& v) {
    if constexpr (W == 1) {
      *reinterpret_cast<unsigned*>(dst) = Ops<T>::from_half2(v.x);
    } else if constexpr (W == 2) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(Ops<T>::from_half2(v.x), Ops<T>::from_half2(v.y));
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(Ops<T>::from_half2(v.x), Ops<T>::from_half2(v.y),
                                                  Ops<T>::from_half2(v.z), Ops<T>::from_half2(v.w));
    }
  };
  // Gathers of a task are issued in batches before their stores: a store may alias a later gather as far
  // as the compiler knows, so interleaving them would serialise every gather behind the previous store.
  constexpr int GB = W == 4 ? 8 : 16;
  auto zero_values = [&](T* dst, int n) {  // n elements, a multiple of 2
    for (int e = 0; e < n; e += 2) *reinterpret_cast<unsigned*>(dst + e) = 0u;
  };
  auto fill_tile = [&](int x0, int stage) {
    T* k_tile = tiles + stage * 2 * BN * ROW;
    T* v_tile = k_tile + BN * ROW;
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT;
      if (task >= K_TASKS) break;
      const int t = task % BN, chunk = task / BN, x = x0 + t;
      T* row = k_tile + t * ROW;
      if (x >= t_end) {
        zero_values(row + chunk * 16 * DSUB, 16 * DSUB);
      } else if (x < n_main) {
        // Stored byte s of the token's row holds subspace s ^ (t % ROT) (layout.permute_k_rows); tokens of a
        // warp are consecutive, so at each step the lanes gather distinct subspaces: distinct banks.
        const int rot = (x & page_mask) % ROT;
        const unsigned* w = reinterpret_cast<const unsigned*>(&kreg[k]);
#pragma unroll
        for (int j0 = 0; j0 < 16; j0 += GB) {
          CentroidWords c[GB];
#pragma unroll
          for (int jj = 0; jj < GB; ++jj) c[jj] = load_centroid(kc_s, code_byte(w, j0 + jj), (chunk * 16 + j0 + jj) ^ rot);
#pragma unroll
          for (int jj = 0; jj < GB; ++jj) store_centroid(row + ((chunk * 16 + j0 + jj) ^ rot) * DSUB, c[jj]);
        }
      } else {
        const uint4* src = reinterpret_cast<const uint4*>(ring_k + (wi.ring_base + x % ring_cap) * D + chunk * 16 * DSUB);
        uint4* dst = reinterpret_cast<uint4*>(row + chunk * 16 * DSUB);
#pragma unroll
        for (int e = 0; e < 2 * DSUB; ++e) dst[e] = __ldg(src + e);
      }
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT;
      if (task >= V_TASKS) break;
      const int blk = task / M, m = task % M, xb = x0 + blk * 16;
      const unsigned* w = reinterpret_cast<const unsigned*>(&vreg[k]);
      if (xb < n_main && xb + 16 <= t_end) {  // a 16-token block lies wholly in pages or wholly in the ring
#pragma unroll
        for (int t0 = 0; t0 < 16; t0 += GB) {
          CentroidWords c[GB];
#pragma unroll
          for (int tt = 0; tt < GB; ++tt) c[tt] = load_centroid(vc_s, code_byte(w, t0 + tt), m);
#pragma unroll
          for (int tt = 0; tt < GB; ++tt) store_centroid(v_tile + (blk * 16 + t0 + tt) * ROW + m * DSUB, c[tt]);
        }
        continue;
      }
#pragma unroll
      for (int tt = 0; tt < 16; ++tt) {
        T* row = v_tile + (blk * 16 + tt) * ROW;
        const int x = xb + tt;
        if (x >= t_end) {
          zero_values(row + m * DSUB, DSUB);
        } else if (xb < n_main) {
          store_centroid(row + m * DSUB, load_centroid(vc_s, code_byte(w, tt), m));
        } else {
          const T* src = ring_v + (wi.ring_base + x % ring_cap) * D + m * DSUB;
#pragma unroll
          for (int e = 0; e < DSUB; e += 2)
            *reinterpret_cast<unsigned*>(row + m * DSUB + e) = __ldg(reinterpret_cast<const unsigned*>(src + e));
        }
      }
    }
  };

  // ---- the main loop ------------------------------------------------------------------------------
  float o[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float mA = kNegInf, mB = kNegInf, lA = 0.f, lB = 0.f;
  auto scale_o = [&](float a, float b) {  // rows A (g) by a, rows B (g + 8) by b
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      o[nd][0] *= a;
      o[nd][1] *= a;
      o[nd][2] *= b;
      o[nd][3] *= b;
    }
  };
  const unsigned tiles32 = smem_addr(tiles);
  constexpr unsigned STAGE_BYTES = 2 * BN * ROW * 2, V_AT = BN * ROW * 2;
  // ldmatrix row addresses: lane l supplies row l % 8 of 8x8 matrix l / 8.
  const int mat = lane >> 3, mrow = lane & 7;
  // K (B operand of Q K^T, [token][dim]): matrices (dims +0, +8, +16, +24) of 8 tokens.
  const unsigned k_lane = tiles32 + (unsigned)(mrow * ROW + mat * 8) * 2;
  // V (B operand of P V, transposed): matrices (tokens +0, +8) x (dims +0, +8); with 8 tokens per warp
  // (m16n8k8), matrices of dims +0, +8, +16, +24.
  const unsigned v_lane = NW >= 16 ? tiles32 + V_AT + (unsigned)(((tok0 + (mat & 1) * 8 + mrow) * ROW + (mat >> 1) * 8) * 2)
                                   : tiles32 + V_AT + (unsigned)(((tok0 + mrow) * ROW + mat * 8) * 2);

  // Two tile buffers and one barrier per tile: a warp dequantizes the next tile, then computes on the
  // current one, so one warp's shared-memory work overlaps another's MMAs (measured on an H100: a 2K chunk
  // over 32K tokens 5.8 ms, against 6.1 ms with one buffer and two barriers per tile).
  if (t_begin < t_end) {
    load_pages(t_begin);
    load_codes(t_begin);
  }
  cp_async_wait_all();
  __syncthreads();  // the codebooks are published
  if (t_begin < t_end) fill_tile(t_begin, 0);
  if (t_begin + BN < t_end) {
    load_pages(t_begin + BN);
    load_codes(t_begin + BN);
  }
  if (t_begin + 2 * BN < t_end) load_pages(t_begin + 2 * BN);
  __syncthreads();
  int stage = 0;
  for (int x0 = t_begin; x0 < t_end; x0 += BN, stage ^= 1) {
    if (x0 > t_begin) __syncthreads();  // the tile filled last time is complete, the one before consumed
    if (x0 + BN < t_end) fill_tile(x0 + BN, stage ^ 1);
    if (x0 + 2 * BN < t_end) load_codes(x0 + 2 * BN);
    if (x0 + 3 * BN < t_end) load_pages(x0 + 3 * BN);
    if (x0 + tok0 >= warp_lim) continue;  // causal: no row of this warp reaches its slice of this tile
    const unsigned stage_at = stage * STAGE_BYTES;

    // S = Q K^T; with one or two 8-token blocks per warp, each block's k-steps go to two accumulators
    // (summed after) so that the MMAs are not one dependent chain.
    constexpr int CHAINS = NW / 8 >= 4 ? 1 : 2;
    float s[NW / 8][4], s2[NW / 8][4];
#pragma unroll
    for (int nb = 0; nb < NW / 8; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
      s2[nb][0] = s2[nb][1] = s2[nb][2] = s2[nb][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < D / 16; kb += 2) {
        unsigned kf[4];
        ldmatrix_x4(kf, k_lane + stage_at + (unsigned)((tok0 + nb * 8) * ROW + kb * 16) * 2);
        Ops<T>::mma(s[nb], qf[kb], kf[0], kf[1]);
        Ops<T>::mma(CHAINS == 2 ? s2[nb] : s[nb], qf[kb + 1], kf[2], kf[3]);
      }
      if constexpr (CHAINS == 2)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nb][e] += s2[nb][e];
    }
    // Mask (causal and the item's end), online softmax per row in the log2 domain.
    float mxA = kNegInf, mxB = kNegInf;
#pragma unroll
    for (int nb = 0; nb < NW / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = x0 + tok0 + nb * 8 + 2 * i4 + (e & 1);
        const int lim = min(e < 2 ? limA : limB, t_end);
        if (x >= lim) s[nb][e] = kNegInf;
        if (e < 2) mxA = fmaxf(mxA, s[nb][e]); else mxB = fmaxf(mxB, s[nb][e]);
      }
    float baseA, baseB, alphaA, alphaB;
    const bool moved = lazy_max(mxA, mxB, scale_log2, mA, mB, baseA, baseB, alphaA, alphaB);
    float sumA = 0.f, sumB = 0.f;
#pragma unroll
    for (int nb = 0; nb < NW / 8; ++nb) exp_scores(s[nb], scale_log2, baseA, baseB, sumA, sumB);
    lA = lA * alphaA + sumA;  // per-lane partial sums: the four lanes of a row are added at the end
    lB = lB * alphaB + sumB;
    if (moved) scale_o(alphaA, alphaB);
    // O += P V: the score accumulators are the A operand (16 rows x 16 tokens per k-block, or x 8) as they are.
    if constexpr (NW == 8) {
      const unsigned pa0 = Ops<T>::pack(s[0][0], s[0][1]), pa1 = Ops<T>::pack(s[0][2], s[0][3]);
#pragma unroll
      for (int nd = 0; nd < D / 8; nd += 4) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, v_lane + stage_at + (unsigned)(nd * 8) * 2);
#pragma unroll
        for (int e = 0; e < 4; ++e) Ops<T>::mma_k8(o[nd + e], pa0, pa1, vf[e]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < NW / 16; ++kk) {
      const unsigned pa[4] = {Ops<T>::pack(s[2 * kk][0], s[2 * kk][1]), Ops<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                              Ops<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Ops<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nd = 0; nd < D / 8; nd += 2) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, v_lane + stage_at + (unsigned)(kk * 16 * ROW + nd * 8) * 2);
        Ops<T>::mma(o[nd], pa, vf[0], vf[1]);
        Ops<T>::mma(o[nd + 1], pa, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait_all();  // an empty item still waits for its copies before the CTA exits

  // ---- the token groups' states merged into group 0's registers (shared memory, fragment order) --------
  if constexpr (TG > 1) {
    constexpr int WORDS = D / 2 + 4;  // o, then mA, mB, lA, lB
    float* merge = reinterpret_cast<float*>(tiles);
    __syncthreads();  // every warp is done with the tiles
    if (tg != 0) {
      float* mine = merge + warp * WORDS * 32 + lane;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) mine[(nd * 4 + e) * 32] = o[nd][e];
      mine[(D / 2) * 32] = mA;
      mine[(D / 2 + 1) * 32] = mB;
      mine[(D / 2 + 2) * 32] = lA;
      mine[(D / 2 + 3) * 32] = lB;
    }
    __syncthreads();
    if (tg != 0) return;
    float nmA = mA, nmB = mB;
#pragma unroll
    for (int w = 1; w < TG; ++w) {
      const float* theirs = merge + (warp + w) * WORDS * 32 + lane;
      nmA = fmaxf(nmA, theirs[(D / 2) * 32]);
      nmB = fmaxf(nmB, theirs[(D / 2 + 1) * 32]);
    }
    float fA = state_weight(mA, nmA), fB = state_weight(mB, nmB);
    lA *= fA;
    lB *= fB;
    scale_o(fA, fB);
#pragma unroll
    for (int w = 1; w < TG; ++w) {
      const float* theirs = merge + (warp + w) * WORDS * 32 + lane;
      fA = state_weight(theirs[(D / 2) * 32], nmA);
      fB = state_weight(theirs[(D / 2 + 1) * 32], nmB);
      lA = fmaf(fA, theirs[(D / 2 + 2) * 32], lA);
      lB = fmaf(fB, theirs[(D / 2 + 3) * 32], lB);
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][0] = fmaf(fA, theirs[(nd * 4) * 32], o[nd][0]);
        o[nd][1] = fmaf(fA, theirs[(nd * 4 + 1) * 32], o[nd][1]);
        o[nd][2] = fmaf(fB, theirs[(nd * 4 + 2) * 32], o[nd][2]);
        o[nd][3] = fmaf(fB, theirs[(nd * 4 + 3) * 32], o[nd][3]);
      }
    }
    mA = nmA;
    mB = nmB;
  }

  // ---- the rows' states: output (one split) or partial state -----------------------------------------
  float invA, invB, lseA, lseB;
  finish_rows(lA, lB, mA, mB, invA, invB, lseA, lseB);
  if (wi.single) {
    T* oA = out + (qA - q);
    T* oB = out + (qB - q);
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int d0 = nd * 8 + 2 * i4;
      if (vA) *reinterpret_cast<unsigned*>(oA + d0) = Ops<T>::pack(o[nd][0] * invA, o[nd][1] * invA);
      if (vB) *reinterpret_cast<unsigned*>(oB + d0) = Ops<T>::pack(o[nd][2] * invB, o[nd][3] * invB);
    }
    if (lse_out != nullptr && i4 == 0) {
      if (vA) lse_out[(qA - q) / D] = lseA * LN2;
      if (vB) lse_out[(qB - q) / D] = lseB * LN2;
    }
  } else {
    const int wrA = rt * 16 + g, wrB = wrA + 8;
    float* pA = part_o + ((long long)blockIdx.x * BM + wrA) * D;
    float* pB = part_o + ((long long)blockIdx.x * BM + wrB) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int d0 = nd * 8 + 2 * i4;
      *reinterpret_cast<float2*>(pA + d0) = make_float2(o[nd][0] * invA, o[nd][1] * invA);
      *reinterpret_cast<float2*>(pB + d0) = make_float2(o[nd][2] * invB, o[nd][3] * invB);
    }
    if (i4 == 0) {
      part_lse[(long long)blockIdx.x * BM + wrA] = lseA;
      part_lse[(long long)blockIdx.x * BM + wrB] = lseB;
    }
  }
}

template <int N> struct FloatVec;
template <> struct FloatVec<2> { using type = float2; };
template <> struct FloatVec<4> { using type = float4; };

// The output rows of one split unit from its splits' partial states, by the CTA's NT threads: the prefill_merge
// kernel (a CTA per unit) and the last of a unit's verify_attention splits to finish. The partial states may have
// been written by other CTAs of the same launch: loaded through L2 (__ldcg), not a possibly stale L1.
// A warp per row (rows warp, warp + NWARPS, ...), a lane per VEC consecutive dims; each split's lse and vectors of
// the warp's rows are loaded together and the splits merged online (running max). A thread per element, each with
// its splits' loads in a dependent chain, took an L2 round trip per element in turn on the critical path of the
// last split to arrive: H200, q = 8 at 8 x 32K, M = 32 (clock64 stamps per CTA), that merge 17 -> 3.5 us, the
// launch 197 -> ~184 us.
template <int D, typename T, int RT>
__device__ __forceinline__ void merge_unit(const int4 unit, const int4* __restrict__ items,
                                           const int4* __restrict__ seq_meta, const float* __restrict__ part_o,
                                           const float* __restrict__ part_lse, T* __restrict__ out,
                                           float* __restrict__ lse_out, int nh, int nh_k) {
  constexpr int BM = 16 * RT;
  constexpr int VEC = D / 32;
  constexpr int RPW = BM / NWARPS;  // rows per warp
  static_assert((VEC == 2 || VEC == 4) && BM % NWARPS == 0, "merge_unit layout");
  using Vec = typename FloatVec<VEC>::type;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int first = unit.w;
  const int splits = items[first].w;
  const int4 sm = seq_meta[unit.x];
  const int G = nh / nh_k;
  const int rows = sm.y * G;
  float mx[RPW], wsum[RPW], acc[RPW][VEC];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    mx[i] = kNegInf;
    wsum[i] = 0.f;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[i][v] = 0.f;
  }
  for (int k = 0; k < splits; ++k) {
    const long long base = (long long)(first + k) * BM;
    float l[RPW];
    Vec x[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp + i * NWARPS;
      l[i] = __ldcg(part_lse + base + r);
      x[i] = __ldcg(reinterpret_cast<const Vec*>(part_o + (base + r) * D) + lane);
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const float nm = fmaxf(mx[i], l[i]);
      const float keep = state_weight(mx[i], nm), w = state_weight(l[i], nm);
      const float* xs = reinterpret_cast<const float*>(&x[i]);
      wsum[i] = fmaf(wsum[i], keep, w);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] = fmaf(acc[i][v], keep, w * xs[v]);
      mx[i] = nm;
    }
  }
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp + i * NWARPS, row = unit.z + r;
    if (row >= rows) continue;
    const long long at = (long long)(sm.x + row / G) * nh + unit.y * G + row % G;
    const float inv = wsum[i] > 0.f ? 1.f / wsum[i] : 0.f;
    T* dst = out + at * D + lane * VEC;
#pragma unroll
    for (int v = 0; v < VEC; v += 2)
      *reinterpret_cast<unsigned*>(dst + v) = Ops<T>::pack(acc[i][v] * inv, acc[i][v + 1] * inv);  // 0 for no token
    if (lse_out != nullptr && lane == 0) lse_out[at] = (wsum[i] > 0.f ? mx[i] + log2f(wsum[i]) : kNegInf) * LN2;
  }
}

// ---- few query rows: operands gathered straight into MMA fragments ----------------------------------------
//
// With at most 32 query rows per kv head (RT = 1 or 2 row tiles of 16: speculative verification), dequantizing
// whole tiles into shared memory costs more than the MMAs it feeds: a store and an ldmatrix per centroid and a
// barrier per tile, with 8 warps whose latencies all show. Here each warp gathers the centroids of its MMA
// operands straight into registers, from the kv head's codebooks staged in shared memory (T-typed; tables below):
// * S = Q K^T: lane (g, i4)'s B fragment is two consecutive dims of token g; with DSUB = 2 that is one centroid
//   word, with DSUB = 4 one centroid is both registers. A lane serves the GL = M / 4 subspaces
//   GL * i4 .. GL * i4 + GL - 1 of its token (Q's fragments are loaded in the same order), which are one
//   GL-byte group of the stored K row after undoing its in-page XOR permutation (layout.permute_k_rows) with
//   a word select and a byte permute per word.
// * O += P V: lane (g, i4)'s B fragment is one dim of tokens 4 i4 .. 4 i4 + 3 of a 16-token step (the score
//   columns are ordered so that the P fragment meets them there), which is one 32-bit word of the stored V
//   block of a subspace; the lane gathers those four centroids and byte-permutes them into DSUB n-tiles (dims
//   DSUB * (8 j + g) + e), so every centroid word is used whole.
// Every warp is a token stream: it takes every 8th 16-token step of the item, for all rows and all dims, with its
// own softmax state; no barrier in the main loop, the 8 states merged at the end. Each centroid is thus gathered
// once per CTA whatever the rows. With two row tiles O takes 128 registers per lane, so Q's fragments wait in
// shared memory (loaded once per step each, for both n-tiles) and a step gathers V after its Q K^T (K's fragments
// are dead by then). H200, q = 8 at GQA 4 (32 rows) at 8 x 32K: 312 -> 237 us at M = 64, 264 -> 207 us at M = 32,
// against warp pairs that split O's dims and each gathered K for all 16 tokens (a pair split exchanging P through
// shared memory with a named barrier per step measured slower still: 2 warps per scheduler wait on each other).
// Codes are loaded a step ahead and page ids two steps ahead. A long history's splits write partial states and
// the last split of the unit to arrive merges them (merge_unit), so a layer is one launch, as in decode.
// K gathers with few bank conflicts: the 8 lanes of one i4 group hold the same slot of 8 tokens, so a [m][code]
// table would put their gathers on banks set by random codes (~3.4-way conflicts over the warp). The K table is
// [code][row] instead, a gather's bank set by its place in the row, and lane (g, i4) gathers slot
// (v + k_rot) mod GL at its v-th gather (k_rot = g mod K_ROTATIONS): a row keeps each slot group in a region of
// GL + K_ROTATIONS - 1 entries (the group's slots, then its first ones again), so that the lane's v-th entry is
// v entries past its own start (an offset the load instruction carries), and the regions sit K_REGION entries
// apart, so that the lanes of one shared-memory phase (the warp for one-word centroids, a half-warp for two-word
// ones) meet at most 2-way conflicts (K_ROTATIONS below). log2(K_ROTATIONS) conditional moves per word then rotate
// the centroids back into slot order for the MMA, and a byte rotation of the codes makes byte v the code of the
// v-th gather. H200, q = 4 at 8 x 32K, M = 64: shared-load wavefronts 26.7 M -> 16.5 M with conflict-free
// rotations; with the paged and ring steps in loops of their own (below) and the gathers' offsets in their load
// instructions, 250 -> 197 us (M = 32: 232 -> 155 us); with half the rotations, 182 us (M = 32: 159 us); with the
// scale in the exponent, unmasked steps and unsigned in-page offsets (below), 168 us (M = 32: 146 us).
template <int D, int RT>
struct VerifySmem {
  static constexpr size_t k_table_bytes = sizeof(unsigned) * 256 * 4 * 24;  // [code][4 regions of 24 words]
  static constexpr size_t v_table_bytes = sizeof(__half) * 256 * D;         // [m / V_GROUP][code][m % V_GROUP]
  static constexpr bool q_shared = RT == 2;  // Q's A fragments staged here: O holds 128 registers per lane
  static constexpr size_t q_bytes = q_shared ? sizeof(__half) * 16 * RT * D : 0;  // [rt][kb][lane] 16 bytes
  static constexpr size_t total = k_table_bytes + v_table_bytes + q_bytes;
  static constexpr size_t merge_bytes = sizeof(float) * NWARPS * 32 * (RT * D / 2 + 4 * RT);
  static_assert(merge_bytes <= total, "the token streams' states reuse the codebooks' space");
};

// verify_attention's parameters, which its sm_90a warpgroup form (verify_attention_wgmma below) takes too; R is
// __restrict__ or nothing (the wgmma entry points pass unqualified pointers to their inlined body: qualified there,
// ptxas scheduled the kernel differently, 24 instructions longer, unmeasured).
#define MC_VERIFY_PARAMS(T, R)                                                                                     \
  const T *R q, T *R out, float *R lse_out, const __half *R k_cent, const __half *R v_cent,                        \
      long long cb_head_stride, const unsigned char *R k_codes, const unsigned char *R v_codes, const T *R ring_k, \
      const T *R ring_v, int ring_cap, long long page_stride, long long head_stride, const int *R page_table,       \
      int page_shift, const int4 *R seq_meta, const long long *R page_row, const int *R res_row,                   \
      const int4 *R units, const int4 *R items, float *R part_o, float *R part_lse, int *R unit_counter, int nh,    \
      int nh_k, float scale_log2
template <int D, int M, typename T, int RT>
__global__ void __launch_bounds__(NT, 1) verify_attention(MC_VERIFY_PARAMS(T, __restrict__)) {
  wait_for_previous_grid();
  using S = VerifySmem<D, RT>;
  constexpr int DSUB = D / M;
  static_assert(DSUB == 2 || DSUB == 4, "DSUB");
  static_assert(RT == 1 || RT == 2, "RT");
  static_assert(D == 64 || D == 128, "D");
  constexpr int BM = 16 * RT;
  constexpr int NS = NWARPS;             // token streams: every warp
  constexpr int STEP = 16;               // tokens per step
  constexpr int E = DSUB / 2;            // 32-bit words per centroid
  constexpr int GL = M / 4;              // K subspaces (code bytes) per lane and token
  constexpr int KW = GL / 4;             // ... in 32-bit words
  constexpr int KB = D / 16;             // k16 blocks of Q K^T
  constexpr int SLOTS = KB * 2 / E;      // centroid gathers per lane and token (== GL)
  constexpr int J = M / 8;               // V subspaces per lane (8 j + g)
  constexpr int NDT = J * DSUB;          // O n-tiles of a warp: every dim
  constexpr int ROT = M < 32 ? M : 32;   // K-row permutation period (layout.permute_k_rows)
  static_assert(SLOTS == GL && ROT / GL <= 4, "layout");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // K entry (m, code): E words at (code * K_ROW + K_REGION * (m / GL) + t) * E for t = m % GL, and again for
  // t = m % GL + GL when that is below GL + K_ROTATIONS - 1. V entries sit at (m / V_GROUP * 256 + code) *
  // V_GROUP + m % V_GROUP: the lanes of a V gather take m = 8 j + g, so g picks the bank's residue and only the
  // 4 lanes of one g compete. One-word centroids (DSUB = 2): V_GROUP 8 (H200, q = 4 at 8 x 32K, M = 64:
  // shared-load wavefronts 29.0 M -> 26.7 M, 264 -> 250 us). Two-word ones: 4 with two row tiles (q = 8, M = 32:
  // ~211 -> ~204 us), [m][code] (V_GROUP 1) with one (8 made q = 4 slower, 232 -> 240 us; 4, 146 -> 150 us).
  // Tried: a [code][m] table with the V gathers' order rotated by i4 over the subspaces makes every V gather
  // conflict-free, but the centroids' rotation back costs 64 conditional moves per step, and it measured no
  // faster (q = 8 at M = 32: ~208 us; q = 4 at M = 64: 167 -> 190 us).
  constexpr int V_GROUP = E == 1 ? 8 : (RT == 2 ? 4 : 1);
  // K_ROTATIONS: 4 for one-word centroids, 2 for two-word ones, so that each lane of a slot group's 8 tokens
  // (4 per half-warp for two-word ones) shares its bank with one other: 2-way conflicts, for a rotation back of
  // log2(K_ROTATIONS) conditional moves per word. Measured on the H200 (q = 4 / 8 at 8 x 32K): 8 and 4 rotations
  // (conflict-free) 196 / 376 us (M = 64) and 165 / 341 us (M = 32); these 182 / 355 and 159 / 305 us; one rotation
  // fewer again (4-way conflicts) ~196 / 380 us at M = 64, none at all 276 / 524 us.
  // K_REGION: E = 1, regions at banks 0, 24, 16, 8 (each lane's bank window disjoint from the other groups');
  // E = 2, at entry pairs 0, 12, 8, 4 of 16.
  constexpr int K_ROTATIONS = 4 / E, K_REGION = 24 / E;
  constexpr int K_ROW = 4 * K_REGION;  // entries of a code's row: 96 words, a multiple of 32 (no bank shift)
  static_assert(GL + K_ROTATIONS - 1 <= K_REGION && K_ROW * E * 4 * 256 == S::k_table_bytes, "K table");
  static_assert(K_ROTATIONS <= 4, "the codes' byte rotation by k_rot stays within a word and the next");
  auto v_entry = [](int m, int c) { return ((m / V_GROUP) * 256 + c) * V_GROUP + m % V_GROUP; };
  unsigned* kc_s = reinterpret_cast<unsigned*>(smem_raw);
  unsigned* vc_s = kc_s + S::k_table_bytes / sizeof(unsigned);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int stream = warp;
  const int g = lane >> 2, i4 = lane & 3;
  if (items[blockIdx.x].x < 0) return;  // padding of a captured launch's fixed grid (prefill.TensorCorePlan)
  const PqWorkItem wi = open_pq_work_item(S::total, items, units, seq_meta, page_row, res_row, nh, nh_k, ring_cap,
                                     page_shift, k_codes, v_codes, head_stride);
  const int kvh = wi.kvh, n_main = wi.seq.w, t_begin = wi.t_begin, t_end = wi.t_end;
  const int G = wi.G, rows = wi.rows, page_mask = wi.page_mask;
  const int4 sm = wi.seq;

  // ---- both codebooks (converted to T). V, transposed to [m][code]: a lane keeps one code for 32 bytes of the
  // global [code][m] rows, so the loads use whole sectors and the stores hit consecutive words ---------------
  {
    constexpr int WORDS32 = 8;                      // 32 bytes
    constexpr int PARTS = M * E / WORDS32;          // 32-byte parts of one code's row
    const unsigned* ks = reinterpret_cast<const unsigned*>(k_cent + kvh * cb_head_stride);
    const unsigned* vs = reinterpret_cast<const unsigned*>(v_cent + kvh * cb_head_stride);
    for (int task = tid; task < 256 * PARTS; task += NT) {
      const int c = task & 255, part = task >> 8;
      const uint4* vp = reinterpret_cast<const uint4*>(vs + (c * M * E + part * WORDS32));
      const uint4 v0 = __ldg(vp), v1 = __ldg(vp + 1);
      const unsigned vw[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int w = 0; w < WORDS32; ++w) {
        const int m = (part * WORDS32 + w) / E, e = w % E;
        vc_s[v_entry(m, c) * E + e] = Ops<T>::from_half2(vw[w]);
      }
    }
    // K: a lane's 16 bytes of a global [code][m] row into its entries' places
    constexpr int QE = 4 / E;  // entries per 16 bytes
#pragma unroll 4
    for (int task = tid; task < 256 * M / QE; task += NT) {
      const int c = task / (M / QE), m0 = task % (M / QE) * QE;
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(ks) + task);
      const unsigned xw[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int e = 0; e < QE; ++e) {
        const int t = (m0 + e) % GL;
        unsigned* dst = kc_s + (c * K_ROW + K_REGION * ((m0 + e) / GL) + t) * E;
#pragma unroll
        for (int w = 0; w < E; ++w) {
          const unsigned y = Ops<T>::from_half2(xw[e * E + w]);
          dst[w] = y;
          if (t < K_ROTATIONS - 1) dst[GL * E + w] = y;
        }
      }
    }
  }

  // ---- Q fragments of every row tile, in the lane's subspace order ------------------------------------
  int rA[RT], limA[RT], limB[RT];
  bool vA[RT], vB[RT];
  unsigned qf[S::q_shared ? 1 : RT][KB][4];  // with two row tiles Q waits in shared memory: O takes 128 registers
  uint4* q_s = reinterpret_cast<uint4*>(smem_raw + S::k_table_bytes + S::v_table_bytes);
  int warp_lim = 0, warp_full = t_end;  // no row of the warp attends past warp_lim; every valid one below warp_full
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    rA[rt] = wi.row0 + rt * 16 + g;
    const int rB = rA[rt] + 8;
    vA[rt] = rA[rt] < rows;
    vB[rt] = rB < rows;
    const int jA = vA[rt] ? rA[rt] / G : 0, jB = vB[rt] ? rB / G : 0;
    const T* qA = q + ((long long)(sm.x + jA) * nh + kvh * G + (vA[rt] ? rA[rt] % G : 0)) * D;
    const T* qB = q + ((long long)(sm.x + jB) * nh + kvh * G + (vB[rt] ? rB % G : 0)) * D;
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      // b0 / b1 of block kb: dims (d0, d0 + 1) and (d1, d1 + 1)
      const int d0 = DSUB == 2 ? 2 * (GL * i4 + 2 * kb) : 4 * (GL * i4 + kb), d1 = d0 + 2;
      if (S::q_shared && warp != (rt * KB + kb) % NWARPS) continue;  // one warp stages each fragment
      const unsigned f0 = vA[rt] ? __ldg(reinterpret_cast<const unsigned*>(qA + d0)) : 0u;
      const unsigned f1 = vB[rt] ? __ldg(reinterpret_cast<const unsigned*>(qB + d0)) : 0u;
      const unsigned f2 = vA[rt] ? __ldg(reinterpret_cast<const unsigned*>(qA + d1)) : 0u;
      const unsigned f3 = vB[rt] ? __ldg(reinterpret_cast<const unsigned*>(qB + d1)) : 0u;
      if constexpr (S::q_shared) {
        q_s[(rt * KB + kb) * 32 + lane] = make_uint4(f0, f1, f2, f3);
      } else {
        qf[rt][kb][0] = f0; qf[rt][kb][1] = f1; qf[rt][kb][2] = f2; qf[rt][kb][3] = f3;
      }
    }
    limA[rt] = vA[rt] ? sm.z - sm.y + jA + 1 : 0;
    limB[rt] = vB[rt] ? sm.z - sm.y + jB + 1 : 0;
    warp_lim = max(warp_lim, max(limA[rt], limB[rt]));
    if (vA[rt]) warp_full = min(warp_full, limA[rt]);
    if (vB[rt]) warp_full = min(warp_full, limB[rt]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, off));
    warp_full = min(warp_full, __shfl_xor_sync(0xffffffffu, warp_full, off));
  }
  const int t_stop = min(t_end, warp_lim);  // no row of this warp attends past it

  // ---- codes of a step: K (the lane's GL-byte group of tokens tau(0, g) and tau(1, g)), V (a word per j) ----
  // Step columns: n-tile nt's column n is token 4 (n >> 1) + 2 nt + (n & 1) of the step, so the P fragment of
  // lane (g, i4) holds tokens 4 i4 .. 4 i4 + 3, the tokens of its V fragment.
  const int ktok0 = 4 * (g >> 1) + (g & 1);  // tau(nt, g) = ktok0 + 2 nt
  struct Codes {
    unsigned k[2][KW];
    unsigned v[J];
  };
  // In-page indices and byte offsets in unsigned 32-bit arithmetic (a page of one head's codes is far below 4 GB),
  // so that the step's address math has no sign fix-ups. x0 is a multiple of 16 and a page holds a multiple of 16
  // tokens, so token x0 + c (c < 16) is token (x0 & page_mask) + c of its page.
  auto in_page = [&](int x0, int c) { return ((unsigned)x0 & (unsigned)page_mask) + (unsigned)c; };
  const unsigned k_column_stride = ((unsigned)page_mask + 1u) * 16u;  // a page's 16-byte K code columns
  const unsigned v_lane_at = (unsigned)(g * 16 + 4 * i4);
  auto load_page = [&](int x0) { return x0 < t_stop && x0 < n_main ? load_pinned(page_table + wi.prow + (x0 >> page_shift)) : 0; };
  auto load_codes = [&](Codes& c, int x0, int page) {
    if (x0 >= t_stop || x0 >= n_main) return;  // ring steps read exact rows; steps past the end nothing
    const unsigned char* kp = wi.k_codes + (long long)page * page_stride;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const unsigned t = in_page(x0, ktok0 + 2 * nt);
      const unsigned gi = (unsigned)i4 ^ ((t % ROT) / GL);
      const unsigned char* src = kp + (((gi * GL) >> 4) * k_column_stride + t * 16u + ((gi * GL) & 15u));
      if constexpr (KW == 4) {
        const uint4 w = load_pinned(reinterpret_cast<const uint4*>(src));
        c.k[nt][0] = w.x; c.k[nt][1] = w.y; c.k[nt][2] = w.z; c.k[nt][3] = w.w;
      } else if constexpr (KW == 2) {
        const uint2 w = load_pinned(reinterpret_cast<const uint2*>(src));
        c.k[nt][0] = w.x; c.k[nt][1] = w.y;
      } else {
        c.k[nt][0] = (unsigned)load_pinned(reinterpret_cast<const int*>(src));
      }
    }
    const int* vp = reinterpret_cast<const int*>(wi.v_codes + (long long)page * page_stride +
                                                 ((in_page(x0, 0) >> 4) * (M * 16u) + v_lane_at));
    load_pinned_strided<J, 8 * 16>(c.v, vp);  // subspace 8 j + g: j * 128 bytes further
  };

  float o[RT][NDT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int nd = 0; nd < NDT; ++nd) o[rt][nd][0] = o[rt][nd][1] = o[rt][nd][2] = o[rt][nd][3] = 0.f;
  float mA[RT], mB[RT], lA[RT], lB[RT];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) mA[rt] = mB[rt] = kNegInf, lA[rt] = lB[rt] = 0.f;

  // + 4 E (code * K_ROW + v) bytes at the lane's v-th gather, slot (v + k_rot) mod GL
  const int k_rot = g % K_ROTATIONS;
  const unsigned k_lane = smem_addr(kc_s + (K_REGION * i4 + k_rot) * E);  // shared-window addresses (bytes)
  const unsigned k_shift = 0x3210u + 0x1111u * (unsigned)k_rot;  // byte_perm: bytes k_rot .. k_rot + 3
  const unsigned* v_lane = vc_s + v_entry(g, 0) * E;   // + (v_entry(8 j + g, code) - v_entry(g, 0)) * E
  constexpr int V_J_STRIDE = 8 * 256 * E;              // words from subspace 8 j + g to 8 (j + 1) + g
  static_assert(V_J_STRIDE == (v_entry(8, 0) - v_entry(0, 0)) * E, "V layout");
  const unsigned v_warp = smem_addr(v_lane);  // subspace g
  constexpr int SSTRIDE = NS * STEP;
  int x0 = t_begin + stream * STEP;
  Codes codes;
  int page_next = load_page(x0 + SSTRIDE);
  load_codes(codes, x0, load_page(x0));
  __syncthreads();  // the codebooks are published

  // One step of 16 tokens, wholly in pages or wholly in the ring (inlined at each loop, paged and masked constants
  // there). Paged steps and ring steps run in loops of their own: with one loop, the ring branch's global loads into
  // the fragments met the paged branch's prefetch of the next codes at the join, and the first MMA waited for that
  // prefetch (H200, ncu: a quarter of all stall samples on that one instruction). Paged steps that every valid row
  // of the warp sees whole (all but the last few of a long history) skip the mask's compares and selects.
  // One row tile: every gather of the step first (one basic block, so that the K and V gathers' latencies overlap
  // and the scheduler can interleave them with the MMAs); the code registers are then free for the next step's
  // loads. Two row tiles: V after Q K^T, since O's 128 registers leave no room for both operands (ptxas spilled
  // in the loop at M = 64; H200, q = 8: 248-260 -> 236-241 us at M = 64, the same at M = 32; one row tile is
  // slower that way, 167 -> 181-187 us at q = 4).
  constexpr bool V_AFTER_QK = RT == 2;
  auto step = [&](const bool paged, const bool masked) {
    unsigned kf[2][SLOTS][E];        // K: B fragments of n-tiles 0 and 1, slot order
    unsigned vc[J * 4][E];           // V: [4 jj + u] the centroid of token 4 i4 + u in subspace 8 j + g
    if (paged) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        // the group's stored bytes are its slots XOR rr: whole words into slot order first
        const unsigned rr = (in_page(x0, ktok0 + 2 * nt) % ROT) % GL;
        unsigned w[KW];
#pragma unroll
        for (int k = 0; k < KW; ++k) w[k] = codes.k[nt][k];
        if constexpr (KW >= 2) {
          if (rr & 4) {
#pragma unroll
            for (int k = 0; k < KW; k += 2) { const unsigned x = w[k]; w[k] = w[k + 1]; w[k + 1] = x; }
          }
        }
        if constexpr (KW == 4) {
          if (rr & 8) {
            unsigned x = w[0]; w[0] = w[2]; w[2] = x;
            x = w[1]; w[1] = w[3]; w[3] = x;
          }
        }
        // byte v := slot (v + k_rot) mod GL: the in-word XOR by rr & 3 and the rotation by k_rot (< 4: within a
        // word and the next) in one byte permute per word, source byte (v + k_rot) ^ (rr & 3)
        const unsigned sel = k_shift ^ ((unsigned)(rr & 3) * 0x1111u);
        unsigned y[KW];
#pragma unroll
        for (int k = 0; k < KW; ++k) y[k] = __byte_perm(w[k], w[(k + 1) % KW], sel);
        unsigned k_at[SLOTS];
#pragma unroll
        for (int v = 0; v < SLOTS; ++v) k_at[v] = k_lane + code_byte(y, v) * (4 * K_ROW * E);
        lds_offset<SLOTS, E, 1, 4 * E>(kf[nt], k_at);  // + 4 E v: kf[nt][v] holds slot (v + k_rot) mod GL
#pragma unroll
        for (int b = 1; b < K_ROTATIONS; b <<= 1) {  // slot order: rotate back by k_rot, one bit at a time
          const bool turn = k_rot & b;
          unsigned t[SLOTS][E];
#pragma unroll
          for (int v = 0; v < SLOTS; ++v)
#pragma unroll
            for (int x = 0; x < E; ++x) t[v][x] = turn ? kf[nt][(v + GL - b) % GL][x] : kf[nt][v][x];
#pragma unroll
          for (int v = 0; v < SLOTS; ++v)
#pragma unroll
            for (int x = 0; x < E; ++x) kf[nt][v][x] = t[v][x];
        }
      }
    } else {  // exact rows of the ring; K past the item's end is masked below, V there must be finite (zero)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int xt = x0 + ktok0 + 2 * nt;
        const T* row = ring_k + (wi.ring_base + xt % ring_cap) * D + DSUB * GL * i4;
#pragma unroll
        for (int v = 0; v < SLOTS; ++v)
#pragma unroll
          for (int x = 0; x < E; ++x)
            kf[nt][v][x] = xt < t_end ? __ldg(reinterpret_cast<const unsigned*>(row + DSUB * v + 2 * x)) : 0u;
      }
    }
    auto gather_v = [&]() {
      if (paged) {
        unsigned v_at[J * 4];
#pragma unroll
        for (int i = 0; i < J * 4; ++i)
          v_at[i] = v_warp + __byte_perm(codes.v[i / 4], 0u, 0x4440u | (i % 4)) * (4 * V_GROUP * E);
        lds_offset<J * 4, E, 4, 4 * V_J_STRIDE>(vc, v_at);  // + subspace 8 jj + g's offset
      } else {
#pragma unroll
        for (int jj = 0; jj < J; ++jj)
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int xt = x0 + 4 * i4 + u;
            const T* row = ring_v + (wi.ring_base + xt % ring_cap) * D + DSUB * (8 * jj + g);
#pragma unroll
            for (int x = 0; x < E; ++x)
              vc[4 * jj + u][x] = xt < t_end ? __ldg(reinterpret_cast<const unsigned*>(row + 2 * x)) : 0u;
          }
      }
      load_codes(codes, x0 + SSTRIDE, page_next);
      page_next = load_page(x0 + 2 * SSTRIDE);
    };
    if constexpr (!V_AFTER_QK) gather_v();

    // S = Q K^T for both n-tiles of the step
    float s[RT][2][4];
    if constexpr (S::q_shared) {  // each Q fragment loaded once per step, for both n-tiles
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) s[rt][nt][0] = s[rt][nt][1] = s[rt][nt][2] = s[rt][nt][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < KB; ++kb)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          const uint4 w = q_s[(rt * KB + kb) * 32 + lane];
          const unsigned a[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const unsigned b0 = E == 1 ? kf[nt][2 * kb][0] : kf[nt][kb][0];
            const unsigned b1 = E == 1 ? kf[nt][2 * kb + 1][0] : kf[nt][kb][E - 1];
            Ops<T>::mma(s[rt][nt], a, b0, b1);
          }
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          float a[4] = {0.f, 0.f, 0.f, 0.f}, a2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int kb = 0; kb < KB; ++kb) {
            const unsigned b0 = E == 1 ? kf[nt][2 * kb][0] : kf[nt][kb][0];
            const unsigned b1 = E == 1 ? kf[nt][2 * kb + 1][0] : kf[nt][kb][E - 1];
            Ops<T>::mma((kb & 1) ? a2 : a, qf[rt][kb], b0, b1);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) s[rt][nt][e] = a[e] + a2[e];
        }
    }

    if constexpr (V_AFTER_QK) gather_v();

    // mask, online softmax in the log2 domain (lazy rescaling as in prefill_attention)
    unsigned pa[RT][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      float mxA = kNegInf, mxB = kNegInf;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (masked) {
            const int x = x0 + 4 * i4 + 2 * nt + (e & 1);
            if (x >= min(e < 2 ? limA[rt] : limB[rt], t_end)) s[rt][nt][e] = kNegInf;
          }
          if (e < 2) mxA = fmaxf(mxA, s[rt][nt][e]); else mxB = fmaxf(mxB, s[rt][nt][e]);
        }
      float baseA, baseB, alphaA, alphaB;
      const bool moved = lazy_max(mxA, mxB, scale_log2, mA[rt], mB[rt], baseA, baseB, alphaA, alphaB);
      float sumA = 0.f, sumB = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) exp_scores(s[rt][nt], scale_log2, baseA, baseB, sumA, sumB);
      lA[rt] = lA[rt] * alphaA + sumA;
      lB[rt] = lB[rt] * alphaB + sumB;
      if (moved) {
#pragma unroll
        for (int nd = 0; nd < NDT; ++nd) {
          o[rt][nd][0] *= alphaA;
          o[rt][nd][1] *= alphaA;
          o[rt][nd][2] *= alphaB;
          o[rt][nd][3] *= alphaB;
        }
      }
      // A fragment of P (rows g / g + 8, tokens 4 i4 .. 4 i4 + 3)
      pa[rt][0] = Ops<T>::pack(s[rt][0][0], s[rt][0][1]);
      pa[rt][1] = Ops<T>::pack(s[rt][0][2], s[rt][0][3]);
      pa[rt][2] = Ops<T>::pack(s[rt][1][0], s[rt][1][1]);
      pa[rt][3] = Ops<T>::pack(s[rt][1][2], s[rt][1][3]);
    }

    // O += P V over this warp's subspaces 8 j + g
#pragma unroll
    for (int jj = 0; jj < J; ++jj)
#pragma unroll
      for (int e = 0; e < DSUB; ++e) {  // n-tile of dims DSUB * (8 j + g') + e
        const unsigned sel = (e & 1) ? 0x7632u : 0x5410u;
        const unsigned b0 = __byte_perm(vc[4 * jj][e >> 1], vc[4 * jj + 1][e >> 1], sel);
        const unsigned b1 = __byte_perm(vc[4 * jj + 2][e >> 1], vc[4 * jj + 3][e >> 1], sel);
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) Ops<T>::mma(o[rt][jj * DSUB + e], pa[rt], b0, b1);
      }
  };
  for (; x0 + STEP <= warp_full && x0 < n_main; x0 += SSTRIDE) step(true, false);
  for (; x0 < t_stop && x0 < n_main; x0 += SSTRIDE) step(true, true);
  for (; x0 < t_stop; x0 += SSTRIDE) step(false, true);

  // ---- the token streams' states merged into warp 0 (shared memory, fragment order) ---------------------
  if constexpr (NS > 1) {
    constexpr int WORDS = RT * NDT * 4 + 4 * RT;  // o, then mA, mB, lA, lB per row tile
    float* merge = reinterpret_cast<float*>(smem_raw);
    __syncthreads();  // every warp is done with the codebooks
    if (stream != 0) {
      float* mine = merge + warp * WORDS * 32 + lane;
      int w = 0;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int nd = 0; nd < NDT; ++nd)
#pragma unroll
          for (int e = 0; e < 4; ++e) mine[(w++) * 32] = o[rt][nd][e];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        mine[(w++) * 32] = mA[rt];
        mine[(w++) * 32] = mB[rt];
        mine[(w++) * 32] = lA[rt];
        mine[(w++) * 32] = lB[rt];
      }
    }
    __syncthreads();
    if (stream == 0) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const int at = RT * NDT * 4 + 4 * rt;  // this row tile's mA, mB, lA, lB
        float nmA = mA[rt], nmB = mB[rt];
        for (int s = 1; s < NS; ++s) {
          const float* theirs = merge + s * WORDS * 32 + lane;
          nmA = fmaxf(nmA, theirs[at * 32]);
          nmB = fmaxf(nmB, theirs[(at + 1) * 32]);
        }
        float fA = state_weight(mA[rt], nmA), fB = state_weight(mB[rt], nmB);
        lA[rt] *= fA;
        lB[rt] *= fB;
#pragma unroll
        for (int nd = 0; nd < NDT; ++nd) {
          o[rt][nd][0] *= fA;
          o[rt][nd][1] *= fA;
          o[rt][nd][2] *= fB;
          o[rt][nd][3] *= fB;
        }
        for (int s = 1; s < NS; ++s) {
          const float* theirs = merge + s * WORDS * 32 + lane;
          fA = state_weight(theirs[at * 32], nmA);
          fB = state_weight(theirs[(at + 1) * 32], nmB);
          lA[rt] = fmaf(fA, theirs[(at + 2) * 32], lA[rt]);
          lB[rt] = fmaf(fB, theirs[(at + 3) * 32], lB[rt]);
#pragma unroll
          for (int nd = 0; nd < NDT; ++nd) {
            const int w = (rt * NDT + nd) * 4;
            o[rt][nd][0] = fmaf(fA, theirs[w * 32], o[rt][nd][0]);
            o[rt][nd][1] = fmaf(fA, theirs[(w + 1) * 32], o[rt][nd][1]);
            o[rt][nd][2] = fmaf(fB, theirs[(w + 2) * 32], o[rt][nd][2]);
            o[rt][nd][3] = fmaf(fB, theirs[(w + 3) * 32], o[rt][nd][3]);
          }
        }
        mA[rt] = nmA;
        mB[rt] = nmB;
      }
    }
  }

  // ---- output (one split) or partial state: lane (g, i4) holds dims DSUB * (8 j + 2 i4) + [0, 2 DSUB) --------
  if (stream == 0) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      float invA, invB, lseA, lseB;
      finish_rows(lA[rt], lB[rt], mA[rt], mB[rt], invA, invB, lseA, lseB);
      const int rB = rA[rt] + 8;
      const int jA = vA[rt] ? rA[rt] / G : 0, jB = vB[rt] ? rB / G : 0;
      const long long atA = (long long)(sm.x + jA) * nh + kvh * G + (vA[rt] ? rA[rt] % G : 0);
      const long long atB = (long long)(sm.x + jB) * nh + kvh * G + (vB[rt] ? rB % G : 0);
#pragma unroll
      for (int jj = 0; jj < J; ++jj) {
        const int d0 = DSUB * (8 * jj + 2 * i4);
        float va[2 * DSUB], vb[2 * DSUB];  // dims d0 + h * DSUB + e
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < DSUB; ++e) {
            va[h * DSUB + e] = o[rt][jj * DSUB + e][h] * invA;
            vb[h * DSUB + e] = o[rt][jj * DSUB + e][2 + h] * invB;
          }
        if (wi.single) {
#pragma unroll
          for (int p = 0; p < DSUB; ++p) {
            if (vA[rt]) *reinterpret_cast<unsigned*>(out + atA * D + d0 + 2 * p) = Ops<T>::pack(va[2 * p], va[2 * p + 1]);
            if (vB[rt]) *reinterpret_cast<unsigned*>(out + atB * D + d0 + 2 * p) = Ops<T>::pack(vb[2 * p], vb[2 * p + 1]);
          }
        } else {
          float* pA = part_o + ((long long)blockIdx.x * BM + rt * 16 + g) * D + d0;
          float* pB = pA + 8 * D;
#pragma unroll
          for (int p = 0; p < DSUB; ++p) {
            *reinterpret_cast<float2*>(pA + 2 * p) = make_float2(va[2 * p], va[2 * p + 1]);
            *reinterpret_cast<float2*>(pB + 2 * p) = make_float2(vb[2 * p], vb[2 * p + 1]);
          }
        }
      }
      if (i4 == 0) {
        if (wi.single) {
          if (lse_out != nullptr) {
            if (vA[rt]) lse_out[atA] = lseA * LN2;
            if (vB[rt]) lse_out[atB] = lseB * LN2;
          }
        } else {
          part_lse[(long long)blockIdx.x * BM + rt * 16 + g] = lseA;
          part_lse[(long long)blockIdx.x * BM + rt * 16 + g + 8] = lseB;
        }
      }
    }
  }
  if (wi.single) return;

  // ---- the last split of the unit to arrive merges the unit's partial states (one launch per layer) ----------
  const int4 item = items[blockIdx.x];
  // flag: the token streams' merge area, read by now
  if (!last_split_to_arrive(unit_counter + item.x, item.w, reinterpret_cast<int*>(smem_raw))) return;
  merge_unit<D, T, RT>(units[item.x], items, seq_meta, part_o, part_lse, out, lse_out, nh, nh_k);
  if (tid == 0) unit_counter[item.x] = 0;
}

// ---- long chunks over a dequantized history: dequantize_history, then dense_prefill_attention ------------
//
// A 2K-token chunk at GQA 4 makes 64 row tiles of 128 rows per kv head, and prefill_attention dequantizes the
// whole history again for each of them, in CTAs whose codebooks, tiles and registers allow one 8-warp CTA per
// SM (ncu: latency-bound, 0.31-0.37 instructions issued per scheduler per cycle). For such batches
// dequantize_history writes each (sequence, kv head)'s history once per layer into a workspace, T rows
// [kv head][workspace row][D] (a sequence's rows start at hist_row[b], its tokens padded with zeros to whole
// tiles), and dense_prefill_attention runs FlashAttention-2's tiling over it: 4 warps of 32 query rows (each
// K / V fragment loaded by ldmatrix feeds two MMAs), Q staged in shared memory, K / V tiles double-buffered by
// cp.async, two CTAs per SM. Both read the same work list (units, items) as prefill_attention.

// One CTA per span of a (sequence, kv head)'s history (the host's spans: whole tiles, at most DQ_SPAN tokens):
// both codebooks staged in shared memory, then per 64-token tile the codes are gathered into a [token][D] tile
// (the same task mapping as prefill_attention's fill, bank-conflict-free), which is copied out in 16-byte rows.
template <int D>
struct DequantizeSmem {
  static constexpr size_t codebook_bytes = sizeof(__half) * 256 * D;  // one kind, [c][m][dsub]
  static constexpr size_t tile_bytes = 2 * BN * D;                    // one kind, [token][D] of 2-byte T
  static constexpr size_t total = 2 * codebook_bytes + 2 * tile_bytes;
};

template <int D, int M, typename T>
__global__ void __launch_bounds__(NT, 1) dequantize_history(
    const __half* __restrict__ k_cent,          // (Hc, 256, M, DSUB) fp16, [c][m] order
    const __half* __restrict__ v_cent,
    long long cb_head_stride,                   // elements between kv heads' codebooks (0: shared)
    const unsigned char* __restrict__ k_codes,  // pool + layer K offset
    const unsigned char* __restrict__ v_codes,  // pool + layer V offset
    const T* __restrict__ ring_k,               // residual ring (S, nh_k, R, D)
    const T* __restrict__ ring_v,
    int ring_cap,
    long long page_stride, long long head_stride,  // bytes per page; P * M
    const int* __restrict__ page_table, int page_shift,
    const int4* __restrict__ seq_meta,          // (B): {first query row in q, new tokens c, tokens n, tokens in pages}
    const long long* __restrict__ page_row,     // (B): index in page_table of the sequence's first page
    const int* __restrict__ res_row,            // (B): ring row (sequence slot)
    const int4* __restrict__ spans,             // (S): {b, kv head, token begin, token end}, whole tiles
    const int* __restrict__ hist_row,           // (B): the sequence's first workspace row
    T* __restrict__ ws_k, T* __restrict__ ws_v, // (nh_k, ws_rows, D)
    int ws_rows, int nh_k) {
  wait_for_previous_grid();
  using S = DequantizeSmem<D>;
  using Tasks = PqTileTasks<D, M>;
  constexpr int DSUB = Tasks::DSUB, ROT = Tasks::ROT, K_TASKS = Tasks::K_TASKS, V_TASKS = Tasks::V_TASKS;
  constexpr int KT = Tasks::KT, VT = Tasks::VT;
  constexpr int W = DSUB / 2;                          // 32-bit words of a centroid
  require_dynamic_smem(S::total);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* kc_s = reinterpret_cast<__half*>(smem_raw);
  __half* vc_s = kc_s + 256 * D;
  T* k_tile = reinterpret_cast<T*>(vc_s + 256 * D);
  T* v_tile = k_tile + BN * D;

  const int tid = threadIdx.x;
  const int4 span = spans[blockIdx.x];
  const int b = span.x, kvh = span.y;
  const int4 sm = seq_meta[b];
  const int n = sm.z, n_main = sm.w, page_mask = (1 << page_shift) - 1;
  const long long prow = page_row[b];
  const long long ring_base = ((long long)res_row[b] * nh_k + kvh) * ring_cap;
  const unsigned char* kcodes = k_codes + kvh * head_stride;
  const unsigned char* vcodes = v_codes + kvh * head_stride;
  copy_codebooks<D>(kc_s, vc_s, k_cent + kvh * cb_head_stride, v_cent + kvh * cb_head_stride);
  cp_async_wait_all();
  __syncthreads();
  // Centroid (code, m) of a table as T words at dst.
  auto put_centroid = [&](T* dst, const __half* table, unsigned code, int m) {
    const unsigned* src = reinterpret_cast<const unsigned*>(table + ((int)code * M + m) * DSUB);
    unsigned w[W];
#pragma unroll
    for (int e = 0; e < W; ++e) w[e] = src[e];
#pragma unroll
    for (int e = 0; e < W; ++e) reinterpret_cast<unsigned*>(dst)[e] = Ops<T>::from_half2(w[e]);
  };
  T* dst_k = ws_k + ((long long)kvh * ws_rows + hist_row[b]) * D;
  T* dst_v = ws_v + ((long long)kvh * ws_rows + hist_row[b]) * D;
  for (int x0 = span.z; x0 < span.w; x0 += BN) {
    uint4 kreg[KT], vreg[VT];  // every code load of the tile first, then the gathers
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT, x = x0 + task % BN, chunk = task / BN;
      if (task < K_TASKS && x < n_main) {
        const int page = max(page_table[prow + (x >> page_shift)], 0);
        kreg[k] = __ldg(reinterpret_cast<const uint4*>(kcodes + (long long)page * page_stride +
                                                       chunk * ((page_mask + 1) * 16) + (x & page_mask) * 16));
      }
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT, xb = x0 + (task / M) * 16, m = task % M;
      if (task < V_TASKS && xb < n_main) {
        const int page = max(page_table[prow + (xb >> page_shift)], 0);
        vreg[k] = __ldg(reinterpret_cast<const uint4*>(vcodes + (long long)page * page_stride +
                                                       ((xb & page_mask) >> 4) * (M * 16) + m * 16));
      }
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT;
      if (task >= K_TASKS) break;
      const int t = task % BN, chunk = task / BN, x = x0 + t;
      T* row = k_tile + t * D;
      if (x < n_main) {
        // Stored byte j of the chunk holds subspace (16 chunk + j) ^ (t % ROT) (layout.permute_k_rows).
        const int rot = (x & page_mask) % ROT;
        const unsigned* w = reinterpret_cast<const unsigned*>(&kreg[k]);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
          const int m = (chunk * 16 + j) ^ rot;
          put_centroid(row + m * DSUB, kc_s, code_byte(w, j), m);
        }
      } else {
        uint4* dst = reinterpret_cast<uint4*>(row + chunk * 16 * DSUB);
        const uint4* src = reinterpret_cast<const uint4*>(ring_k + (ring_base + x % ring_cap) * D + chunk * 16 * DSUB);
#pragma unroll
        for (int e = 0; e < 2 * DSUB; ++e) dst[e] = x < n ? __ldg(src + e) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT;
      if (task >= V_TASKS) break;
      const int blk = task / M, m = task % M, xb = x0 + blk * 16;
      if (xb < n_main) {  // a 16-token block lies wholly in pages or wholly past them
        const unsigned* w = reinterpret_cast<const unsigned*>(&vreg[k]);
#pragma unroll
        for (int tt = 0; tt < 16; ++tt) put_centroid(v_tile + (blk * 16 + tt) * D + m * DSUB, vc_s, code_byte(w, tt), m);
      } else {
#pragma unroll
        for (int tt = 0; tt < 16; ++tt) {
          const int x = xb + tt;
          unsigned* dst = reinterpret_cast<unsigned*>(v_tile + (blk * 16 + tt) * D + m * DSUB);
          const unsigned* src = reinterpret_cast<const unsigned*>(ring_v + (ring_base + x % ring_cap) * D + m * DSUB);
#pragma unroll
          for (int e = 0; e < W; ++e) dst[e] = x < n ? __ldg(src + e) : 0u;
        }
      }
    }
    __syncthreads();
    uint4* out_k = reinterpret_cast<uint4*>(dst_k + (long long)x0 * D);
    uint4* out_v = reinterpret_cast<uint4*>(dst_v + (long long)x0 * D);
    const uint4* in_k = reinterpret_cast<const uint4*>(k_tile);
    const uint4* in_v = reinterpret_cast<const uint4*>(v_tile);
#pragma unroll
    for (int i = tid; i < BN * D / 8; i += NT) {
      out_k[i] = in_k[i];
      out_v[i] = in_v[i];
    }
    __syncthreads();
  }
}

constexpr int DENSE_WARPS = 4;
constexpr int DENSE_NT = DENSE_WARPS * 32;
constexpr int DENSE_BM = DENSE_WARPS * 32;  // query rows per CTA: 32 per warp
template <int D>
struct DenseSmem {
  static constexpr int ROW = D + 8;  // row stride (elements): 16 bytes of padding keep ldmatrix conflict-free
  static constexpr size_t q_bytes = 2 * DENSE_BM * ROW;
  static constexpr size_t tile_bytes = 2 * BN * ROW;  // one kind
  static constexpr size_t total = q_bytes + 2 * 2 * tile_bytes;  // Q, then two stages of a K and a V tile
};

// Flash attention of a work item's 128 query rows over the workspace rows of its tokens [t_begin, t_end).
template <int D, typename T>
__global__ void __launch_bounds__(DENSE_NT, 2) dense_prefill_attention(
    const T* __restrict__ q,                    // (N, nh, D): the new tokens' queries, CSR order
    T* __restrict__ out,                        // (N, nh, D)
    float* __restrict__ lse_out,                // (N, nh) natural log, or nullptr
    const T* __restrict__ ws_k,                 // (nh_k, ws_rows, D): dequantize_history's workspace
    const T* __restrict__ ws_v,
    int ws_rows,
    const int* __restrict__ hist_row,           // (B): the sequence's first workspace row
    const int4* __restrict__ seq_meta,          // (B): {first query row in q, new tokens c, tokens n, tokens in pages}
    const int4* __restrict__ units,             // (U): {b, kv head, first query row of the tile, first item}
    const int4* __restrict__ items,             // (W): {unit, token begin, token end, splits of the unit}
    float* __restrict__ part_o,                 // (W, 128, D)
    float* __restrict__ part_lse,               // (W, 128) log2
    int nh, int nh_k, float scale_log2) {
  wait_for_previous_grid();
  using S = DenseSmem<D>;
  constexpr int ROW = S::ROW;
  static_assert(D % 32 == 0 && D <= 128, "D");
  const WorkItem wi = open_work_item(S::total, items, units, seq_meta, nh, nh_k);
  const int kvh = wi.kvh, t_begin = wi.t_begin, t_end = wi.t_end, G = wi.G, rows = wi.rows;
  const int4 sm = wi.seq;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* tiles = q_s + DENSE_BM * ROW;  // per stage: K tile, then V tile
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, i4 = lane & 3;
  const T* k_src = ws_k + ((long long)kvh * ws_rows + hist_row[wi.b]) * D;
  const T* v_src = ws_v + ((long long)kvh * ws_rows + hist_row[wi.b]) * D;

  // ---- the tile's query rows into shared memory (rows past the sequence's: zeros) ----------------------
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  for (int i = tid; i < DENSE_BM * CPR; i += DENSE_NT) {
    const int r = i / CPR, c = i % CPR, row = wi.row0 + r;
    T* dst = q_s + r * ROW + c * 8;
    if (row < rows)
      cp_async16(dst, q + ((long long)(sm.x + row / G) * nh + kvh * G + row % G) * D + c * 8);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
  auto load_tile = [&](int x0, int stage) {
    T* kt = tiles + stage * 2 * BN * ROW;
    T* vt = kt + BN * ROW;
#pragma unroll
    for (int i = tid; i < BN * CPR; i += DENSE_NT) {
      const int r = i / CPR, c = i % CPR;
      cp_async16(kt + r * ROW + c * 8, k_src + (long long)(x0 + r) * D + c * 8);
      cp_async16(vt + r * ROW + c * 8, v_src + (long long)(x0 + r) * D + c * 8);
    }
  };

  // ---- this warp's 32 rows: two m-tiles of 16, causal limits ------------------------------------------
  int lim[2][2];            // [m-tile][row g / g + 8]: tokens the row attends to within the item
  int warp_lim = 0, warp_full = 0x7fffffff;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wi.row0 + warp * 32 + mt * 16 + h * 8 + g;
      const bool valid = row < rows;
      lim[mt][h] = valid ? min(sm.z - sm.y + row / G + 1, t_end) : 0;
      warp_lim = max(warp_lim, lim[mt][h]);
      if (valid) warp_full = min(warp_full, lim[mt][h]);
    }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    warp_lim = max(warp_lim, __shfl_xor_sync(0xffffffffu, warp_lim, off));
    warp_full = min(warp_full, __shfl_xor_sync(0xffffffffu, warp_full, off));
  }

  float o[2][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) o[mt][nd][0] = o[mt][nd][1] = o[mt][nd][2] = o[mt][nd][3] = 0.f;
  float mA[2] = {kNegInf, kNegInf}, mB[2] = {kNegInf, kNegInf}, lA[2] = {0.f, 0.f}, lB[2] = {0.f, 0.f};

  // ldmatrix row addresses: lane l supplies row l % 8 of 8x8 matrix l / 8.
  const int mat = lane >> 3, mrow = lane & 7;
  // Q (A operand): matrices (rows +0, +8) x (dims +0, +8) of the warp's m-tile.
  const unsigned q_lane = smem_addr(q_s) + (unsigned)(((warp * 32 + (mat & 1) * 8 + mrow) * ROW + (mat >> 1) * 8) * 2);
  const unsigned tiles32 = smem_addr(tiles);
  constexpr unsigned STAGE_BYTES = 2 * BN * ROW * 2, V_AT = BN * ROW * 2;
  // K (B operand of Q K^T, [token][dim]): matrices (dims +0, +8, +16, +24) of 8 tokens.
  const unsigned k_lane = tiles32 + (unsigned)(mrow * ROW + mat * 8) * 2;
  // V (B operand of P V, transposed): matrices (tokens +0, +8) x (dims +0, +8).
  const unsigned v_lane = tiles32 + V_AT + (unsigned)((((mat & 1) * 8 + mrow) * ROW + (mat >> 1) * 8) * 2);

  if (t_begin < t_end) load_tile(t_begin, 0);
  int stage = 0;
  for (int x0 = t_begin; x0 < t_end; x0 += BN, stage ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // this tile (and Q) landed for every thread; the other stage's tile is consumed
    if (x0 + BN < t_end) load_tile(x0 + BN, stage ^ 1);
    if (x0 >= warp_lim) continue;  // causal: no row of this warp reaches this tile
    const unsigned stage_at = stage * STAGE_BYTES;

    // The tile in two halves of HN tokens (S for 32 rows x 64 tokens would need 64 more registers than O
    // leaves): S = Q K^T for both m-tiles, each K fragment feeding two MMAs; softmax; O += P V.
    constexpr int HN = BN / 2;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int xh = x0 + half * HN;
      if (xh >= warp_lim) break;
      const unsigned k_at = k_lane + stage_at + (unsigned)(half * HN * ROW * 2);
      float s[2][HN / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nb = 0; nb < HN / 8; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < D / 16; kb += 2) {
        unsigned qa[2][2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ldmatrix_x4(qa[mt][0], q_lane + (unsigned)((mt * 16 * ROW + kb * 16) * 2));
          ldmatrix_x4(qa[mt][1], q_lane + (unsigned)((mt * 16 * ROW + kb * 16 + 16) * 2));
        }
#pragma unroll
        for (int nb = 0; nb < HN / 8; ++nb) {
          unsigned kf[4];
          ldmatrix_x4(kf, k_at + (unsigned)((nb * 8 * ROW + kb * 16) * 2));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Ops<T>::mma(s[mt][nb], qa[mt][0], kf[0], kf[1]);
            Ops<T>::mma(s[mt][nb], qa[mt][1], kf[2], kf[3]);
          }
        }
      }
      // Mask (only where some row's limit falls inside), online softmax in the log2 domain.
      const bool masked = xh + HN > warp_full;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float mxA = kNegInf, mxB = kNegInf;
#pragma unroll
        for (int nb = 0; nb < HN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (masked && xh + nb * 8 + 2 * i4 + (e & 1) >= lim[mt][e >> 1]) s[mt][nb][e] = kNegInf;
            if (e < 2) mxA = fmaxf(mxA, s[mt][nb][e]); else mxB = fmaxf(mxB, s[mt][nb][e]);
          }
        float baseA, baseB, alphaA, alphaB;
        const bool moved = lazy_max(mxA, mxB, scale_log2, mA[mt], mB[mt], baseA, baseB, alphaA, alphaB);
        float sumA = 0.f, sumB = 0.f;
#pragma unroll
        for (int nb = 0; nb < HN / 8; ++nb) exp_scores(s[mt][nb], scale_log2, baseA, baseB, sumA, sumB);
        lA[mt] = lA[mt] * alphaA + sumA;  // per-lane partial sums: the four lanes of a row are added at the end
        lB[mt] = lB[mt] * alphaB + sumB;
        if (moved) {
#pragma unroll
          for (int nd = 0; nd < D / 8; ++nd) {
            o[mt][nd][0] *= alphaA;
            o[mt][nd][1] *= alphaA;
            o[mt][nd][2] *= alphaB;
            o[mt][nd][3] *= alphaB;
          }
        }
      }
      // O += P V: the score accumulators are the A operand as they are; each V fragment feeds two MMAs.
#pragma unroll
      for (int kk = 0; kk < HN / 16; ++kk) {
        unsigned pa[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          pa[mt][0] = Ops<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = Ops<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = Ops<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = Ops<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nd = 0; nd < D / 8; nd += 2) {
          unsigned vf[4];
          ldmatrix_x4_trans(vf, v_lane + stage_at + (unsigned)(((half * HN + kk * 16) * ROW + nd * 8) * 2));
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Ops<T>::mma(o[mt][nd], pa[mt], vf[0], vf[1]);
            Ops<T>::mma(o[mt][nd + 1], pa[mt], vf[2], vf[3]);
          }
        }
      }
    }
  }
  cp_async_wait_all();  // an empty item still waits for its copies before the CTA exits

  // ---- the rows' states: output (one split) or partial state -------------------------------------------
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    float invA, invB, lseA, lseB;
    finish_rows(lA[mt], lB[mt], mA[mt], mB[mt], invA, invB, lseA, lseB);
    const int wrA = warp * 32 + mt * 16 + g, wrB = wrA + 8;  // rows within the tile
    const int rA = wi.row0 + wrA, rB = wi.row0 + wrB;
    if (wi.single) {
      const bool vA = rA < rows, vB = rB < rows;
      const long long atA = vA ? (long long)(sm.x + rA / G) * nh + kvh * G + rA % G : 0;
      const long long atB = vB ? (long long)(sm.x + rB / G) * nh + kvh * G + rB % G : 0;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const int d0 = nd * 8 + 2 * i4;
        if (vA) *reinterpret_cast<unsigned*>(out + atA * D + d0) = Ops<T>::pack(o[mt][nd][0] * invA, o[mt][nd][1] * invA);
        if (vB) *reinterpret_cast<unsigned*>(out + atB * D + d0) = Ops<T>::pack(o[mt][nd][2] * invB, o[mt][nd][3] * invB);
      }
      if (lse_out != nullptr && i4 == 0) {
        if (vA) lse_out[atA] = lseA * LN2;
        if (vB) lse_out[atB] = lseB * LN2;
      }
    } else {
      float* pA = part_o + ((long long)blockIdx.x * DENSE_BM + wrA) * D;
      float* pB = part_o + ((long long)blockIdx.x * DENSE_BM + wrB) * D;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const int d0 = nd * 8 + 2 * i4;
        *reinterpret_cast<float2*>(pA + d0) = make_float2(o[mt][nd][0] * invA, o[mt][nd][1] * invA);
        *reinterpret_cast<float2*>(pB + d0) = make_float2(o[mt][nd][2] * invB, o[mt][nd][3] * invB);
      }
      if (i4 == 0) {
        part_lse[(long long)blockIdx.x * DENSE_BM + wrA] = lseA;
        part_lse[(long long)blockIdx.x * DENSE_BM + wrB] = lseB;
      }
    }
  }
}

// Merge the partial states of every split unit of prefill_attention or dense_prefill_attention (one CTA per
// unit; units of one split were written directly).
template <int D, typename T, int RT>
__global__ void __launch_bounds__(NT) prefill_merge(
    const int4* __restrict__ units, const int4* __restrict__ items, const int4* __restrict__ seq_meta,
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    T* __restrict__ out, float* __restrict__ lse_out, int nh, int nh_k) {
  wait_for_previous_grid();
  const int4 unit = units[blockIdx.x];
  if (items[unit.w].w <= 1) return;
  merge_unit<D, T, RT>(unit, items, seq_meta, part_o, part_lse, out, lse_out, nh, nh_k);
}


// ---- 32 query rows at M = 32 on Hopper warpgroup MMA (sm_90a builds only) ---------------------------------
//
// verify_attention at two row tiles holds O for all 32 rows in every warp (128 registers): one 8-warp CTA per SM,
// two warps per scheduler, each step one dependent chain, and Q's fragments reloaded from shared memory every step
// (perf-notes, sessions 20-37). Here the products are transposed onto warpgroup MMAs (wgmma), with 64-token steps:
//   S^T = K Q^T     (m64 tokens x n32 rows x k128 dims: A = gathered K centroids in registers, B = Q in shared memory)
//   O^T += V^T P^T  (2 x m64 dims x n32 rows x k64 tokens: A = gathered V centroids in registers, B = P in shared)
// so a lane holds 16 scores and 32 values of O: three warpgroups (12 warps, 168 registers) share an SM, each a
// token stream of its own, merged at the end. Q's fragments are read by the tensor cores from shared memory.
// A warpgroup's rows share their softmax reference maxima: a step's scores are exponentiated against them, and
// one barrier with an OR reduction (barrier.red.or) both publishes P and says whether any score passed them by
// RESCALE_SLACK; only then (every first step, rarely later) do the warps exchange their row maxima and rescale.
// Layouts: lane i4 of the S^T product serves K subspaces 8 i4 .. 8 i4 + 7 (k block kb: subspace 8 i4 + kb, its 4
// dims at k = 2 i4, 2 i4 + 1, 2 i4 + 8, 2 i4 + 9), S^T row g of warp w is token 16 w + sigma(g) of the step and row
// g + 8 the next one, so that a lane's two scores of a row are the adjacent k pair (2 g, 2 g + 1) of P^T, whose k
// order within 16 tokens puts tokens 4 i4 .. 4 i4 + 3 at the V fragment's k = 2 i4, 2 i4 + 1, 2 i4 + 8, 2 i4 + 9; the
// V fragment's rows g / g + 8 of m tile mt are dims 4 (8 w + g) + 2 mt + {0, 1}. The K table is verify_attention's
// ([code][4 regions of 12 entries]) with 4 rotations (conflict-free gathers). ptxas serializes every wgmma of a
// kernel (a wait after each) when a wgmma sits in a path it thinks divergent (C7520: the warp index comes from a
// shuffle of lane 0), when its accumulators or register operands are touched while it may run (C7513-C7515: no
// wgmma is in flight across the loop's back edge, and keep() pins operands until the wait that ends their MMA).
// Measurements (and the probe that came first): perf-notes sessions 38-40 (q = 8 at M = 32, 8 x 32K: 169 us
// against verify_attention's 180 us on an H100).
#if defined(MC_SM90A_KERNELS)
namespace wg {
constexpr int NWG = 3, THREADS = 128 * NWG, STEP = 64, ROWS = 32, D = 128, M = 32;
constexpr int K_REGION = 12, K_ROW = 48, K_ROTATIONS = 4;
// V entries [m / V_GROUP][code][m % V_GROUP]: 4 measured faster than 2 and 8 (perf-notes, session 40)
constexpr int V_GROUP = 4;
constexpr int K_TABLE = 256 * K_ROW * 8, V_TABLE = 256 * M * 8, Q_BYTES = ROWS * D * 2;
constexpr int P_LBO = 528, P_BYTES = 8 * P_LBO;  // P^T's 8-token core-matrix columns: stores conflict-free
constexpr int RED_BYTES = NWG * 4 * ROWS * 4;
constexpr int STASH_BYTES = 8 * 4;  // the item's values only the ring and masked steps read (see stash)
constexpr int SMEM = K_TABLE + V_TABLE + Q_BYTES + NWG * 2 * P_BYTES + RED_BYTES + STASH_BYTES;
constexpr int MERGE_BYTES = NWG * ROWS * (D + 1 + 4) * 4;  // O, the reference max and 4 warps' sums per warpgroup
static_assert(MERGE_BYTES <= K_TABLE + V_TABLE, "the warpgroups' states reuse the codebooks' space");

template <typename T> struct Mma;
#define MC_WGMMA(TYPE, PTX)                                                                                      \
  template <> struct Mma<TYPE> {                                                                                 \
    template <bool ACCUMULATE>                                                                                    \
    static __device__ __forceinline__ void m64n32k16(float (&d)[16], const unsigned (&a)[4], unsigned long long b) { \
      if constexpr (ACCUMULATE)                                                                                   \
        asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"                                               \
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX "." PTX " "                               \
                     "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),       \
                       "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),   \
                       "+f"(d[14]), "+f"(d[15])                                                                   \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                     \
      else /* d := A B: the accumulator registers are only written */                                            \
        asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, 0, 0;\n"                                               \
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTX "." PTX " "                               \
                     "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n" \
                     : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]),       \
                       "=f"(d[7]), "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]), "=f"(d[12]), "=f"(d[13]),   \
                       "=f"(d[14]), "=f"(d[15])                                                                   \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                     \
    }                                                                                                             \
  };
MC_WGMMA(__half, "f16")
MC_WGMMA(__nv_bfloat16, "bf16")
#undef MC_WGMMA

// A shared-memory B operand, K-major without swizzle: core matrices of 8 rows x 16 bytes, those of the next 8 rows
// 128 bytes further (SBO), those of the next 8 k `lbo` bytes further.
__device__ __forceinline__ unsigned long long b_descriptor(unsigned addr, unsigned lbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
         ((unsigned long long)(128 >> 4) << 32);
}
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Generic-proxy shared-memory writes made visible to the tensor cores' (async proxy) reads.
__device__ __forceinline__ void fence_to_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// A wgmma register operand kept live (unmoved) up to here.
__device__ __forceinline__ void keep(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)::"memory"); }
// The warpgroup's barrier `id`. The .aligned forms (bar.sync, bar.red): every lane of a warp reaches them together,
// and ptxas then emits no fallback path for divergent warps (~400 instructions with the barrier.cta forms).
__device__ __forceinline__ void group_sync(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }
// The warpgroup's barrier `id`, returning whether `pred` held in any of its threads.
__device__ __forceinline__ bool group_any(int id, bool pred) {
  int r;
  asm volatile("{\n .reg .pred p, q;\n setp.ne.b32 p, %1, 0;\n bar.red.or.pred q, %2, 128, p;\n"
               " selp.b32 %0, 1, 0, q;\n}\n"
               : "=r"(r) : "r"((int)pred), "r"(id) : "memory");
  return r != 0;
}
// Byte offset of element (row n, k) of a B tile of 8 core-matrix columns `lbo` bytes apart.
__device__ __forceinline__ unsigned b_tile_offset(int n, int k, int lbo) {
  return (k >> 3) * lbo + (n >> 3) * 128 + (n & 7) * 16 + (k & 7) * 2;
}
__device__ __forceinline__ uint2 lds64(unsigned addr) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
// A word of shared memory read where it is written in the source (volatile: not forwarded from a register).
__device__ __forceinline__ int lds_volatile(const int* p) {
  int v;
  asm volatile("ld.volatile.shared.b32 %0, [%1];" : "=r"(v) : "r"(smem_addr(p)));
  return v;
}
template <int OFF> __device__ __forceinline__ uint2 lds64_at(unsigned addr) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2+%3];" : "=r"(v.x), "=r"(v.y) : "r"(addr), "n"(OFF));
  return v;
}
}  // namespace wg

template <typename T>
__device__ __forceinline__ void verify_attention_wgmma(MC_VERIFY_PARAMS(T, __restrict__)) {
  using namespace wg;  // the entry points waited for the previous grid
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* k_tab = smem_raw;
  unsigned char* v_tab = k_tab + K_TABLE;
  unsigned char* q_s = v_tab + V_TABLE;
  unsigned char* p_s = q_s + Q_BYTES;                                  // [warpgroup][2 buffers][P_BYTES]
  float* red = reinterpret_cast<float*>(p_s + NWG * 2 * P_BYTES);     // [warpgroup][4 warps][32 rows]
  // Values the ring and masked steps read and the paged ones do not: kept here, not in registers through the paged
  // steps' loop (with them live there, ptxas spilled in that loop).
  int* stash = reinterpret_cast<int*>(red + NWG * 4 * ROWS);
  enum { STASH_T_END, STASH_FULL, STASH_T_STOP, STASH_BEFORE, STASH_RING_LO, STASH_RING_HI, STASH_FAST_END };
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wgi = warp >> 2, w = warp & 3;  // uniform (see above)
  const int g = lane >> 2, i4 = lane & 3;
  if (items[blockIdx.x].x < 0) return;  // padding of a captured launch's fixed grid (prefill.TensorCorePlan)
  const PqWorkItem wi = open_pq_work_item(SMEM, items, units, seq_meta, page_row, res_row, nh, nh_k, ring_cap,
                                          page_shift, k_codes, v_codes, head_stride);
  const int kvh = wi.kvh, n_main = wi.seq.w, t_begin = wi.t_begin, t_end = wi.t_end;
  const int G = wi.G, rows = wi.rows;
  const int4 sm = wi.seq;

  const int sigma = g < 4 ? 4 * g : 4 * (g - 4) + 2;
  const int mv = 8 * w + g;  // the lane's V subspace
  const unsigned k_column_stride = ((unsigned)wi.page_mask + 1u) * 16u;
  // Codes of a step: K, the lane's 8-byte group (subspaces 8 i4 ..) of tokens t0 = x + 16 w + sigma and t0 + 1,
  // in the stored order (the group's bytes are its slots XOR t mod 8, the groups XOR (t mod 32) / 8:
  // layout.permute_k_rows); V, subspace mv of tokens 4 i4 .. 4 i4 + 3 of each 16-token block. Ring tokens have none.
  uint4 kpair;  // this lane's 16-byte column of token t0 + (i4 & 1) (see load_k_codes)
  unsigned vcode[4];
  constexpr int SSTRIDE = NWG * STEP;
  // The page id of a step, loaded a step before its codes: a step lies in one page, since this kernel runs for pages
  // of 64 tokens or more (prefill.verify_uses_wgmma) and splits start at whole 64-token tiles (0 for a step in the
  // ring: its codes are then read from page 0 and never used). One id per 16-token block, shuffled to the lanes
  // that need it, cost 38 instructions a step and ~7 % of the kernel's time (perf-notes, session 40).
  auto load_page = [&](int x) { return x < n_main ? load_pinned(page_table + wi.prow + (x >> page_shift)) : 0; };
  auto load_k_codes = [&](int x, int page) {
    const int xb = x + 16 * w;
    const unsigned char* kp = wi.k_codes + (long long)page * page_stride;
    // Lanes i4 and i4 ^ 1 need the two halves of one 16-byte column of tokens t0 and t0 + 1 (their groups differ in
    // the low bit): the even lane loads t0's column, the odd one t0 + 1's, and gather_k swaps the halves. Each load
    // then fills whole 32-byte sectors; one 8-byte load per token left every sector half used.
    const unsigned t = ((unsigned)(xb + sigma) & (unsigned)wi.page_mask) + (unsigned)(i4 & 1);
    const unsigned gi = (unsigned)i4 ^ ((t & 31u) >> 3);
    kpair = load_pinned(reinterpret_cast<const uint4*>(kp + ((gi >> 1) * k_column_stride + t * 16u)));
  };
  auto load_v_codes = [&](int x, int page) {
    const unsigned char* vp = wi.v_codes + (long long)page * page_stride;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const int xb = x + 16 * kb;
      vcode[kb] = (unsigned)load_pinned(reinterpret_cast<const int*>(
          vp + ((((unsigned)xb & (unsigned)wi.page_mask) >> 4) * (M * 16u) + (unsigned)(mv * 16 + 4 * i4))));
    }
  };
  int x0 = t_begin + wgi * STEP;

  // ---- the kv head's codebooks (as T) and Q (the S^T product's B tile) ---------------------------------------
  {
    const uint2* kc = reinterpret_cast<const uint2*>(k_cent + kvh * cb_head_stride);
    const uint2* vc = reinterpret_cast<const uint2*>(v_cent + kvh * cb_head_stride);
    uint2* kt = reinterpret_cast<uint2*>(k_tab);
    uint2* vt = reinterpret_cast<uint2*>(v_tab);
    for (int e = tid; e < 256 * M; e += THREADS) {
      const int c = e / M, m = e % M, t = m & 7;
      const uint2 x = __ldg(kc + e), y = __ldg(vc + e);
      const uint2 xt = make_uint2(Ops<T>::from_half2(x.x), Ops<T>::from_half2(x.y));
      kt[c * K_ROW + K_REGION * (m >> 3) + t] = xt;
      if (t < K_ROTATIONS - 1) kt[c * K_ROW + K_REGION * (m >> 3) + 8 + t] = xt;
      vt[((m / V_GROUP) * 256 + c) * V_GROUP + m % V_GROUP] = make_uint2(Ops<T>::from_half2(y.x), Ops<T>::from_half2(y.y));
    }
    for (int e = tid; e < ROWS * D / 2; e += THREADS) {
      const int n = e / (D / 2), d = 2 * (e % (D / 2)), r = wi.row0 + n;
      const int m = d >> 2, half = (d & 3) >> 1, k = 8 * half + 2 * (m >> 3);
      unsigned v = 0u;
      if (r < rows) v = __ldg(reinterpret_cast<const unsigned*>(q + ((long long)(sm.x + r / G) * nh + kvh * G + r % G) * D + d));
      *reinterpret_cast<unsigned*>(q_s + (m & 7) * 1024 + b_tile_offset(n, k, 512)) = v;
    }
  }
  // row r attends to the first tokens_before + r / G + 1 tokens (causal); rows past `rows` to none
  const int tokens_before = sm.z - sm.y + 1;
  auto limit = [&](int r) { return r < rows ? tokens_before + r / G : 0; };
  int full = t_end, reach = 0;  // every row attends below `full`; no row at or past `reach`
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = wi.row0 + 8 * (j >> 1) + 2 * i4 + (j & 1);
    if (r < rows) full = min(full, limit(r));
    reach = max(reach, limit(r));
  }
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    full = min(full, __shfl_xor_sync(0xffffffffu, full, off));
    reach = max(reach, __shfl_xor_sync(0xffffffffu, reach, off));
  }
  full = __shfl_sync(0xffffffffu, full, 0);  // uniform as far as ptxas knows: the loop's bounds
  const int t_stop = __shfl_sync(0xffffffffu, min(t_end, reach), 0);
  const int fast_end = min(n_main, full);  // steps below it lie in the pages and every row sees them whole
  if (tid == 0) {
    stash[STASH_T_END] = t_end;
    stash[STASH_FULL] = full;
    stash[STASH_T_STOP] = t_stop;
    stash[STASH_BEFORE] = tokens_before;
    stash[STASH_RING_LO] = (int)(unsigned)(unsigned long long)wi.ring_base;
    stash[STASH_RING_HI] = (int)((unsigned long long)wi.ring_base >> 32);
    stash[STASH_FAST_END] = fast_end;
  }
  auto ring_base = [&]() {
    return (long long)(((unsigned long long)(unsigned)lds_volatile(stash + STASH_RING_HI) << 32) |
                       (unsigned)lds_volatile(stash + STASH_RING_LO));
  };
  __syncthreads();
  fence_to_async();

  const int bar_id = 1 + wgi;
  unsigned char* my_p = p_s + wgi * 2 * P_BYTES;
  const int k_rot = g & (K_ROTATIONS - 1);
  const unsigned k_lane = smem_addr(k_tab) + (K_REGION * i4 + k_rot) * 8;
  const unsigned k_shift = 0x3210u + 0x1111u * (unsigned)k_rot;
  const unsigned v_lane = smem_addr(v_tab) + ((mv / V_GROUP) * 256 * V_GROUP + mv % V_GROUP) * 8;
  // shared memory addresses are below 2^18, so a descriptor's 14-bit address field (addr / 16) never carries
  const unsigned long long q_desc = b_descriptor(smem_addr(q_s), 512);

  float o[2][16];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 16; ++i) o[mt][i] = 0.f;
  // The rows' reference maxima (log2 domain, shared by the warpgroup) and this lane's sums. A row that has seen no
  // token has reference NO_REF, finite: a valid score then exceeds it by far (the slow path sets the reference),
  // a masked one (-inf) gives p = 0, and no exponent needs a select for it.
  constexpr float NO_REF = -1e30f;
  float ref[8], lsum[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) ref[j] = NO_REF, lsum[j] = 0.f;

  // K fragments of the step at x: the centroids of its codes (slot (v + k_rot) mod 8 at gather v, rotated back), or
  // the exact rows of the ring (zero past the item's end: masked, and finite)
  unsigned ka[8][4];
  auto gather_k = [&](int x, const bool paged) {  // paged: the step is known to lie in the pages
    const int xb = x + 16 * w;
    if (paged || xb < n_main) {
      uint2 kcode[2];
      {
        const unsigned t0 = ((unsigned)(xb + sigma) & (unsigned)wi.page_mask);
        const bool high = (((unsigned)i4 ^ ((t0 & 31u) >> 3)) & 1u) != 0u;  // this lane's group: the column's 2nd half
        const uint2 mine = high ? make_uint2(kpair.z, kpair.w) : make_uint2(kpair.x, kpair.y);
        const uint2 other = high ? make_uint2(kpair.x, kpair.y) : make_uint2(kpair.z, kpair.w);
        const uint2 got = make_uint2(__shfl_xor_sync(0xffffffffu, other.x, 1), __shfl_xor_sync(0xffffffffu, other.y, 1));
        kcode[0] = (i4 & 1) ? got : mine;
        kcode[1] = (i4 & 1) ? mine : got;
      }
#pragma unroll
      for (int tk = 0; tk < 2; ++tk) {
        const unsigned t = ((unsigned)(xb + sigma) & (unsigned)wi.page_mask) + (unsigned)tk, rr = t & 7u;
        unsigned w0 = kcode[tk].x, w1 = kcode[tk].y;
        if (rr & 4u) { const unsigned z = w0; w0 = w1; w1 = z; }
        const unsigned sel = k_shift ^ ((rr & 3u) * 0x1111u);
        const unsigned y0 = __byte_perm(w0, w1, sel), y1 = __byte_perm(w1, w0, sel);
        uint2 kf[8];
#define MC_KG(V) kf[V] = lds64_at<8 * V>(k_lane + ((((V) < 4 ? y0 : y1) >> (8 * ((V) & 3))) & 255u) * (K_ROW * 8));
        MC_KG(0) MC_KG(1) MC_KG(2) MC_KG(3) MC_KG(4) MC_KG(5) MC_KG(6) MC_KG(7)
#undef MC_KG
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          uint2 c = (k_rot & 1) ? kf[(s + 7) & 7] : kf[s];
          if constexpr (K_ROTATIONS == 4) c = (k_rot & 2) ? ((k_rot & 1) ? kf[(s + 5) & 7] : kf[(s + 6) & 7]) : c;
          ka[s][tk] = c.x;
          ka[s][2 + tk] = c.y;
        }
      }
    } else {
#pragma unroll
      for (int tk = 0; tk < 2; ++tk) {
        const int t = xb + sigma + tk;
        const T* row = ring_k + (ring_base() + t % ring_cap) * D + 32 * i4;
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const uint2 c = t < lds_volatile(stash + STASH_T_END) ? __ldg(reinterpret_cast<const uint2*>(row + 4 * s))
                                                                  : make_uint2(0u, 0u);
          ka[s][tk] = c.x;
          ka[s][2 + tk] = c.y;
        }
      }
    }
  };

  // The first codes wait for the codebooks' staging: loaded before it (their latency under its loads and stores),
  // the ring loop spilled and the kernel ran 10 % slower (perf-notes, session 40).
  int page = load_page(x0);  // then the next step's
  load_k_codes(x0, page);
  load_v_codes(x0, page);
  page = load_page(x0 + SSTRIDE);
  if (x0 < t_stop) gather_k(x0, x0 + STEP <= fast_end);
  int buf = 0;
  // No wgmma is in flight across the loop's back edge: S^T(i) runs under the V gathers, P V(i) under the K gathers
  // of step i + 1, each then waited.
  // One step at x0. `general`: some of its tokens are in the ring or masked; the other steps (all but the last few
  // of a long history) are paged and seen whole by every row, and their loop carries none of that code.
  auto step = [&](const bool general) {
    float s[16];
#pragma unroll
    for (int kb = 0; kb < 8; ++kb)
#pragma unroll
      for (int e = 0; e < 4; ++e) keep(ka[kb][e]);
    fence();
#pragma unroll
    for (int kb = 0; kb < 8; ++kb) {
      const unsigned long long b = q_desc + kb * (1024 >> 4);  // the address field (bits 0-13) cannot carry
      if (kb == 0) Mma<T>::template m64n32k16<false>(s, ka[kb], b); else Mma<T>::template m64n32k16<true>(s, ka[kb], b);
    }
    commit();
    load_k_codes(x0 + SSTRIDE, page);

    // ---- V fragments (rows g / g + 8 of m tile mt: dims 4 mv + 2 mt + {0, 1}; k: tokens 4 i4 + {0, 1, 2, 3}) ----
    unsigned va[2][4][4];
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const int xb = x0 + 16 * kb;
      uint2 c[4];
      if (!general || xb < n_main) {
#pragma unroll
        for (int u = 0; u < 4; ++u) c[u] = lds64(v_lane + ((vcode[kb] >> (8 * u)) & 255u) * (8 * V_GROUP));
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int t = xb + 4 * i4 + u;
          c[u] = t < lds_volatile(stash + STASH_T_END)
                     ? __ldg(reinterpret_cast<const uint2*>(ring_v + (ring_base() + t % ring_cap) * D + 4 * mv))
                     : make_uint2(0u, 0u);
        }
      }
      va[0][kb][0] = __byte_perm(c[0].x, c[1].x, 0x5410);
      va[0][kb][1] = __byte_perm(c[0].x, c[1].x, 0x7632);
      va[0][kb][2] = __byte_perm(c[2].x, c[3].x, 0x5410);
      va[0][kb][3] = __byte_perm(c[2].x, c[3].x, 0x7632);
      va[1][kb][0] = __byte_perm(c[0].y, c[1].y, 0x5410);
      va[1][kb][1] = __byte_perm(c[0].y, c[1].y, 0x7632);
      va[1][kb][2] = __byte_perm(c[2].y, c[3].y, 0x5410);
      va[1][kb][3] = __byte_perm(c[2].y, c[3].y, 0x7632);
    }
    load_v_codes(x0 + SSTRIDE, page);
    page = load_page(x0 + 2 * SSTRIDE);
    wait_all();  // S^T
#pragma unroll
    for (int kb = 0; kb < 8; ++kb)
#pragma unroll
      for (int e = 0; e < 4; ++e) keep(ka[kb][e]);
#pragma unroll
    for (int i = 0; i < 16; ++i) keep(s[i]);

    // ---- mask; softmax against the warpgroup's reference maxima; P^T into this step's buffer ----
    if (general && x0 + STEP > lds_volatile(stash + STASH_FULL)) {
      const int before = lds_volatile(stash + STASH_BEFORE), end = lds_volatile(stash + STASH_T_END);
      const int t0 = x0 + 16 * w + sigma;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int t = t0 + ((i >> 1) & 1);
        const int r = wi.row0 + 8 * (i >> 2) + 2 * i4 + (i & 1);
        if (t >= min(r < rows ? before + r / G : 0, end)) s[i] = kNegInf;
      }
    }
    unsigned char* pb = my_p + buf * P_BYTES;
    const unsigned p_lane = (unsigned)((2 * w + (g >> 2)) * P_LBO + (2 * i4) * 16 + (g & 3) * 4);
    bool exceed = false;  // a score past its row's reference by the slack (any valid score of a row without one)
    float sum[8];         // this step's p of the lane's rows
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] = 0.f;
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 2 * n8 + e;
        const float s0 = s[4 * n8 + e], s1 = s[4 * n8 + 2 + e];
        const float x0 = fmaf(s0, scale_log2, -ref[j]), x1 = fmaf(s1, scale_log2, -ref[j]);
        exceed |= fmaxf(x0, x1) > RESCALE_SLACK;
        const float p0 = fast_exp2(x0), p1 = fast_exp2(x1);  // inf where exceeding: rewritten below
        sum[j] = p0 + p1;
        *reinterpret_cast<unsigned*>(pb + p_lane + n8 * 128 + e * 16) = Ops<T>::pack(p0, p1);
      }
    fence_to_async();
    if (group_any(bar_id, exceed)) {  // rare after a warpgroup's first step: the maxima move, O and l rescale
      float mx[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        mx[j] = fmaxf(s[4 * (j >> 1) + (j & 1)], s[4 * (j >> 1) + 2 + (j & 1)]);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], off));
      }
      float* my_red = red + wgi * 4 * ROWS;
      if (g == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) my_red[w * ROWS + 8 * (j >> 1) + 2 * i4 + (j & 1)] = mx[j];
      }
      group_sync(bar_id);
      float alpha[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = 8 * (j >> 1) + 2 * i4 + (j & 1);
        const float m4 = fmaxf(fmaxf(my_red[r], my_red[ROWS + r]), fmaxf(my_red[2 * ROWS + r], my_red[3 * ROWS + r]));
        const float old = ref[j];
        ref[j] = fmaxf(ref[j], m4 * scale_log2);  // stays NO_REF for a row whose scores are all masked so far
        alpha[j] = fast_exp2(old - ref[j]);        // 0 from NO_REF to a reference: that row's O and l are 0
        lsum[j] *= alpha[j];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < 16; ++i) o[mt][i] *= alpha[2 * (i >> 2) + (i & 1)];
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = 2 * n8 + e;
          const float p0 = fast_exp2(fmaf(s[4 * n8 + e], scale_log2, -ref[j]));
          const float p1 = fast_exp2(fmaf(s[4 * n8 + 2 + e], scale_log2, -ref[j]));
          sum[j] = p0 + p1;
          *reinterpret_cast<unsigned*>(pb + p_lane + n8 * 128 + e * 16) = Ops<T>::pack(p0, p1);
        }
      fence_to_async();
      group_sync(bar_id);  // P published; the maxima exchange's area free again
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) lsum[j] += sum[j];

    // ---- O^T += V^T P^T ----
    const unsigned long long p_desc = b_descriptor(smem_addr(pb), P_LBO);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 16; ++i) keep(o[mt][i]);
    fence();
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) Mma<T>::template m64n32k16<true>(o[mt], va[mt][kb], p_desc + kb * (2 * P_LBO >> 4));
    commit();
    if (!general) gather_k(x0 + SSTRIDE, true);  // the fast loop's next step is a fast one too
    else if (x0 + SSTRIDE < lds_volatile(stash + STASH_T_STOP))
      gather_k(x0 + SSTRIDE, x0 + SSTRIDE + STEP <= lds_volatile(stash + STASH_FAST_END));
    wait_all();  // P V
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kb = 0; kb < 4; ++kb)
#pragma unroll
        for (int e = 0; e < 4; ++e) keep(va[mt][kb][e]);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 16; ++i) keep(o[mt][i]);
  };
  for (; x0 + SSTRIDE + STEP <= fast_end; x0 += SSTRIDE, buf ^= 1) step(false);
  for (; x0 < lds_volatile(stash + STASH_T_STOP); x0 += SSTRIDE, buf ^= 1) step(true);

  // ---- the warpgroups' states, merged per output element -------------------------------------------------------
  float* merge_o = reinterpret_cast<float*>(smem_raw);           // [warpgroup][row][D]
  float* merge_m = merge_o + NWG * ROWS * D;                      // [warpgroup][row]
  float* merge_l = merge_m + NWG * ROWS;                          // [warpgroup][warp][row]
  __syncthreads();  // every warpgroup is done with the codebooks
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = 8 * (i >> 2) + 2 * i4 + (i & 1);
      merge_o[(wgi * ROWS + r) * D + 4 * mv + 2 * mt + ((i & 3) >> 1)] = o[mt][i];
    }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) lsum[j] += __shfl_xor_sync(0xffffffffu, lsum[j], off);
    const int r = 8 * (j >> 1) + 2 * i4 + (j & 1);
    if (g == 0) {
      merge_l[(wgi * 4 + w) * ROWS + r] = lsum[j];
      if (w == 0) merge_m[wgi * ROWS + r] = ref[j];
    }
  }
  __syncthreads();
  // A second barrier, for compute-sanitizer only: racecheck reports the reads below as racing the writes above (and
  // the last-split flag's reads its write) across one barrier in this kernel, not in verify_attention nor in a
  // minimal kernel of the same barriers, wgmma and writers (bench/probes/racecheck_barriers.cu). The hardware does
  // not reproduce it (bench/wgmma_barrier_check.py delays). With two barriers racecheck reports nothing, so a real
  // race would stand out; the cost is within the noise (perf-notes, session 43).
  __syncthreads();
  for (int e = tid; e < ROWS * D; e += THREADS) {
    const int r = e / D, d = e % D;
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < NWG; ++k) mx = fmaxf(mx, merge_m[k * ROWS + r]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int k = 0; k < NWG; ++k) {
      const float f = state_weight(merge_m[k * ROWS + r], mx);
      const float* lk = merge_l + k * 4 * ROWS + r;
      l = fmaf(f, lk[0] + lk[ROWS] + lk[2 * ROWS] + lk[3 * ROWS], l);
      acc = fmaf(f, merge_o[(k * ROWS + r) * D + d], acc);
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? mx + log2f(l) : kNegInf;
    const int row = wi.row0 + r;
    if (wi.single) {
      if (row >= rows) continue;
      const long long at = (long long)(sm.x + row / G) * nh + kvh * G + row % G;
      out[at * D + d] = from_float<T>(acc * inv);
      if (d == 0 && lse_out != nullptr) lse_out[at] = lse * LN2;
    } else {
      part_o[((long long)blockIdx.x * ROWS + r) * D + d] = acc * inv;
      if (d == 0) part_lse[(long long)blockIdx.x * ROWS + r] = lse;
    }
  }
  if (wi.single) return;

  // ---- the last split of the unit to arrive merges the unit's partial states (one launch per layer) ----------
  const int4 item = items[blockIdx.x];
  if (!last_split_to_arrive<2>(unit_counter + item.x, item.w, reinterpret_cast<int*>(smem_raw))) return;  // 2: see above
  if (warp < NWARPS) merge_unit<D, T, 2>(units[item.x], items, seq_meta, part_o, part_lse, out, lse_out, nh, nh_k);
  if (tid == 0) unit_counter[item.x] = 0;
}

// Entry points of the sm_90a build (kernels.get_arch_kernel, unmangled names); verify_attention's arguments.
#define MC_VERIFY_ARGS                                                                                             \
  q, out, lse_out, k_cent, v_cent, cb_head_stride, k_codes, v_codes, ring_k, ring_v, ring_cap, page_stride,         \
      head_stride, page_table, page_shift, seq_meta, page_row, res_row, units, items, part_o, part_lse,            \
      unit_counter, nh, nh_k, scale_log2
extern "C" __global__ void __launch_bounds__(wg::THREADS, 1) verify_attention_wgmma_f16(MC_VERIFY_PARAMS(__half, )) {
  wait_for_previous_grid();
  verify_attention_wgmma<__half>(MC_VERIFY_ARGS);
}
extern "C" __global__ void __launch_bounds__(wg::THREADS, 1) verify_attention_wgmma_bf16(
    MC_VERIFY_PARAMS(__nv_bfloat16, )) {
  wait_for_previous_grid();
  verify_attention_wgmma<__nv_bfloat16>(MC_VERIFY_ARGS);
}
#undef MC_VERIFY_ARGS
#endif  // MC_SM90A_KERNELS
#undef MC_VERIFY_PARAMS

}  // namespace prefill
}  // namespace mc

