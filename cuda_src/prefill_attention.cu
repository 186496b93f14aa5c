// Causal attention of long chunks of new tokens over the PQ cache, on tensor cores (chunked prefill,
// multi-turn prompts).
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
  using S = PrefillSmem<D>;
  static_assert(RT == 1 || RT == 2 || RT == 4 || RT == 8, "RT");
  constexpr int BM = 16 * RT;       // query rows per CTA
  constexpr int TG = NWARPS / RT;   // token groups
  constexpr int NW = BN / TG;       // tokens of a tile per warp
  constexpr int DSUB = D / M;
  constexpr int ROW = S::ROW;
  constexpr int ROT = M < 32 ? M : 32;                 // K-row permutation period (layout.permute_k_rows)
  constexpr int K_TASKS = BN * (M / 16);               // (token, 16-byte code chunk) pairs of a tile
  constexpr int V_TASKS = (BN / 16) * M;               // (16-token block, subspace) pairs of a tile
  constexpr int KT = (K_TASKS + NT - 1) / NT, VT = (V_TASKS + NT - 1) / NT;
  static_assert(M >= 16 && M % 16 == 0 && (DSUB == 2 || DSUB == 4 || DSUB == 8), "M, DSUB");
  static_assert(D % 16 == 0 && D <= 128, "D");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __half* kc_s = reinterpret_cast<__half*>(smem_raw);
  __half* vc_s = kc_s + 256 * D;
  T* tiles = reinterpret_cast<T*>(vc_s + 256 * D);  // per stage: K tile, then V tile

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rt = warp / TG, tg = warp % TG;  // this warp's row tile and token group
  const int tok0 = tg * NW;                  // its slice of every tile
  if (tid == 0) {
    unsigned int dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < S::total) __trap();  // the host sizes shared memory from the same formula
  }
  const int4 item = items[blockIdx.x];
  const int4 unit = units[item.x];
  const int b = unit.x, kvh = unit.y, row0 = unit.z;
  const int4 sm = seq_meta[b];
  const int G = nh / nh_k;
  const int rows = sm.y * G;
  const int n_main = sm.w;
  const int t_begin = item.y, t_end = item.z;
  const bool single = item.w == 1;
  const long long prow = page_row[b];
  const int page_mask = (1 << page_shift) - 1;
  const unsigned char* k_base = k_codes + kvh * head_stride;
  const unsigned char* v_base = v_codes + kvh * head_stride;
  const long long ring_base = ((long long)res_row[b] * nh_k + kvh) * ring_cap;

  // ---- both codebooks of the kv head into shared memory (asynchronous: they land during the Q loads) ----
  {
    const uint4* ks = reinterpret_cast<const uint4*>(k_cent + kvh * cb_head_stride);
    const uint4* vs = reinterpret_cast<const uint4*>(v_cent + kvh * cb_head_stride);
    uint4* kd = reinterpret_cast<uint4*>(kc_s);
    uint4* vd = reinterpret_cast<uint4*>(vc_s);
    constexpr int CHUNKS = (int)(S::codebook_bytes / 16);
#pragma unroll 4
    for (int i = tid; i < CHUNKS; i += NT) {
      cp_async16(kd + i, ks + i);
      cp_async16(vd + i, vs + i);
    }
  }

  // ---- this warp's 16 query rows: Q fragments in registers, causal limits ----------------------------
  const int g = lane >> 2, i4 = lane & 3;
  const int rA = row0 + rt * 16 + g, rB = rA + 8;
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
      if (task < K_TASKS && x < t_end && x < n_main) kpage[k] = load_pinned(page_table + prow + (x >> page_shift));
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT, xb = x0 + (task / M) * 16;
      if (task < V_TASKS && xb < t_end && xb < n_main) vpage[k] = load_pinned(page_table + prow + (xb >> page_shift));
    }
  };
  auto load_codes = [&](int x0) {  // the pages of x0's tile were loaded by load_pages(x0)
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      const int task = tid + k * NT;
      const int x = x0 + task % BN, chunk = task / BN;
      if (task < K_TASKS && x < t_end && x < n_main)
        kreg[k] = load_pinned(reinterpret_cast<const uint4*>(k_base + (long long)max(kpage[k], 0) * page_stride +
                                                             chunk * ((page_mask + 1) * 16) + (x & page_mask) * 16));
    }
#pragma unroll
    for (int k = 0; k < VT; ++k) {
      const int task = tid + k * NT;
      const int xb = x0 + (task / M) * 16, m = task % M;
      if (task < V_TASKS && xb < t_end && xb < n_main)
        vreg[k] = load_pinned(reinterpret_cast<const uint4*>(v_base + (long long)max(vpage[k], 0) * page_stride +
                                                             ((xb & page_mask) >> 4) * (M * 16) + m * 16));
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
        const uint4* src = reinterpret_cast<const uint4*>(ring_k + (ring_base + x % ring_cap) * D + chunk * 16 * DSUB);
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
          const T* src = ring_v + (ring_base + x % ring_cap) * D + m * DSUB;
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
    // Mask (causal and the item's end), scale into the log2 domain, online softmax per row.
    float mxA = kNegInf, mxB = kNegInf;
#pragma unroll
    for (int nb = 0; nb < NW / 8; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = x0 + tok0 + nb * 8 + 2 * i4 + (e & 1);
        const int lim = min(e < 2 ? limA : limB, t_end);
        s[nb][e] = x < lim ? s[nb][e] * scale_log2 : kNegInf;
        if (e < 2) mxA = fmaxf(mxA, s[nb][e]); else mxB = fmaxf(mxB, s[nb][e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, off));
      mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, off));
    }
    // Lazy rescaling: the reference max moves only when a score exceeds it by more than RESCALE_SLACK (log2),
    // so p stays <= 2^RESCALE_SLACK (exact in fp16 / bf16 as a value, fp32 sums) and the O rescale below,
    // D / 2 multiplies per lane, runs only on the few tiles where some row of the warp moved its max.
    const float mnA = mxA > mA + RESCALE_SLACK ? mxA : mA, mnB = mxB > mB + RESCALE_SLACK ? mxB : mB;
    const bool moved = __any_sync(0xffffffffu, mnA != mA || mnB != mB);
    // A row that has seen no token yet keeps max -inf; exponents are then taken from 0 (all p = 0).
    const float baseA = mnA == kNegInf ? 0.f : mnA, baseB = mnB == kNegInf ? 0.f : mnB;
    const float alphaA = fast_exp2(mA - baseA), alphaB = fast_exp2(mB - baseB);
    mA = mnA;
    mB = mnB;
    float sumA = 0.f, sumB = 0.f;
#pragma unroll
    for (int nb = 0; nb < NW / 8; ++nb) {
      s[nb][0] = fast_exp2(s[nb][0] - baseA);
      s[nb][1] = fast_exp2(s[nb][1] - baseA);
      s[nb][2] = fast_exp2(s[nb][2] - baseB);
      s[nb][3] = fast_exp2(s[nb][3] - baseB);
      sumA += s[nb][0] + s[nb][1];
      sumB += s[nb][2] + s[nb][3];
    }
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
    // A state that has seen no token (max -inf) weighs 0; so do all when the row has seen none.
    auto weight = [](float m, float mx) { return m == kNegInf ? 0.f : fast_exp2(m - mx); };
    float fA = weight(mA, nmA), fB = weight(mB, nmB);
    lA *= fA;
    lB *= fB;
    scale_o(fA, fB);
#pragma unroll
    for (int w = 1; w < TG; ++w) {
      const float* theirs = merge + (warp + w) * WORDS * 32 + lane;
      fA = weight(theirs[(D / 2) * 32], nmA);
      fB = weight(theirs[(D / 2 + 1) * 32], nmB);
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
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  const float invA = lA > 0.f ? 1.f / lA : 0.f, invB = lB > 0.f ? 1.f / lB : 0.f;
  const float lseA = lA > 0.f ? mA + log2f(lA) : kNegInf, lseB = lB > 0.f ? mB + log2f(lB) : kNegInf;
  if (single) {
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

// Merge the partial states of every split unit (one CTA per unit; units of one split were written directly).
template <int D, typename T, int RT>
__global__ void __launch_bounds__(NT) prefill_merge(
    const int4* __restrict__ units, const int4* __restrict__ items, const int4* __restrict__ seq_meta,
    const float* __restrict__ part_o, const float* __restrict__ part_lse,
    T* __restrict__ out, float* __restrict__ lse_out, int nh, int nh_k) {
  constexpr int BM = 16 * RT;
  const int4 unit = units[blockIdx.x];
  const int first = unit.w;
  const int splits = items[first].w;
  if (splits <= 1) return;
  const int4 sm = seq_meta[unit.x];
  const int G = nh / nh_k;
  const int rows = sm.y * G;
  for (int e = threadIdx.x; e < BM * D; e += NT) {
    const int r = e / D, d = e % D;
    const int row = unit.z + r;
    if (row >= rows) continue;
    float mx = kNegInf;
    for (int k = 0; k < splits; ++k) mx = fmaxf(mx, part_lse[(long long)(first + k) * BM + r]);
    float wsum = 0.f, acc = 0.f;
    if (mx != kNegInf) {
      for (int k = 0; k < splits; ++k) {
        const float w = exp2f(part_lse[(long long)(first + k) * BM + r] - mx);
        wsum += w;
        acc = fmaf(w, part_o[((long long)(first + k) * BM + r) * D + d], acc);
      }
    }
    const long long at = (long long)(sm.x + row / G) * nh + unit.y * G + row % G;
    out[at * D + d] = from_float<T>(wsum > 0.f ? acc / wsum : 0.f);
    if (lse_out != nullptr && d == 0) lse_out[at] = (wsum > 0.f ? mx + log2f(wsum) : kNegInf) * LN2;
  }
}

}  // namespace prefill
}  // namespace mc
