// Flash-decoding attention for one query token per sequence, straight from compressed storage.
//
// One CTA of 512 threads serves one work item: a (sequence, group of G query heads sharing a kv head,
// token range) triple chosen by the host planner (split-K). The whole GQA group is served by ONE read
// of the codes. Modes:
//   MODE_PAGED_PQ   PQ codes in pages (K rows XOR-permuted in 16-byte chunks, chunk-major; V codes transposed
//                   [m][t] in 16-token blocks: cache.pack_pages); the exact residual tokens (a ring buffer)
//                   go to the last split of a sequence or to a work item of their own.
//   MODE_CONTIG_PQ  MILLION's contiguous layout (B, nh_k, T, M) for K and V, no permutation.
//   MODE_PAGED_EXACT plain fp16/bf16/fp32 K/V in pages (num_pages, nh_k, P, D): the unquantized mode (an exact
//                   PagedPQCache, paged_exact_decode). Its "residual" tokens (res_len: a sequence's partly filled
//                   last block) are read from the same pages, right after the main tokens, by the item that
//                   carries WORK_RESIDUAL (whose token range ends at main_len).
//
// Scores use a lookup table LUT[c][m][h] = scale*log2(e) * q_h[m] . K_centroid[m][c] built in shared memory
// (fp16 entries, fp32 accumulation), so K is never dequantized; V centroids sit in shared memory as fp16
// [c][m][dsub] and are gathered per code. Softmax runs in the log2 domain with a running max per head.
// Splits of one (sequence, head group) write partial (o, lse) states; the last CTA to finish merges them
// (one launch per layer, no host synchronisation).
#include "decode_common.cuh"

namespace mc {

constexpr int MODE_PAGED_PQ = 0;
constexpr int MODE_CONTIG_PQ = 1;  // every mode other than the two named below
constexpr int MODE_PAGED_EXACT = 2;

constexpr int NT = 512;  // threads per CTA
constexpr int WORK_RESIDUAL = 1 << 16;  // work item flag above the head group (decode.WORK_RESIDUAL)
constexpr int NWARPS = NT / 32;
constexpr float LN2 = 0.6931471805599453f;
#define kInf __int_as_float(0x7f800000)

constexpr int K_RUN = 4;  // lookups summed in fp16 before folding into the fp32 score

// run[] (+)= LUT entry for the whole GQA group at shared address `addr`, read with one vector load.
template <int G>
__device__ __forceinline__ void add_lut_run(__half2* run, unsigned int addr, bool first) {
  if constexpr (G == 1) {
    const __half2 v = __halves2half2(__ushort_as_half(lds_u16(addr)), __float2half_rn(0.f));
    run[0] = first ? v : __hadd2(run[0], v);
  } else {
    unsigned int raw[G / 2];  // 4 (G=2), 8 (G=4) or 16 (G=8) bytes
    lds_words<G / 2>(addr, raw);
#pragma unroll
    for (int k = 0; k < G / 2; ++k) {
      const __half2 v = *reinterpret_cast<const __half2*>(&raw[k]);
      run[k] = first ? v : __hadd2(run[k], v);
    }
  }
}

// G fp16 values to shared memory in one store where G allows (8 or 16 bytes).
template <int G>
__device__ __forceinline__ void store_halves(__half* dst, const __half (&v)[G]) {
  if constexpr (G >= 4) {
    using V = typename VecOf<G * 2>::type;
    V raw;
    __half* r = reinterpret_cast<__half*>(&raw);
#pragma unroll
    for (int h = 0; h < G; ++h) r[h] = v[h];
    *reinterpret_cast<V*>(dst) = raw;
  } else {
#pragma unroll
    for (int h = 0; h < G; ++h) dst[h] = v[h];
  }
}

template <int G>
__device__ __forceinline__ void fold_lut_run(float* sc, const __half2* run) {
#pragma unroll
  for (int k = 0; k < (G + 1) / 2; ++k) {
    const float2 f = __half22float2(run[k]);
    sc[2 * k] += f.x;
    if (2 * k + 1 < G) sc[2 * k + 1] += f.y;
  }
}

// acc[h][i] += p[h] * v[i] with p read once per token as a vector (a broadcast: every lane reads it).
template <int G, int DSUB>
__device__ __forceinline__ void accumulate_v(float (&acc)[G][DSUB], const float* pj, const float (&v)[DSUB]) {
  float p[G];
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int h = 0; h < G; h += 4) {
      const float4 f = *reinterpret_cast<const float4*>(pj + h);
      p[h] = f.x; p[h + 1] = f.y; p[h + 2] = f.z; p[h + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int h = 0; h < G; ++h) p[h] = pj[h];
  }
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int i = 0; i < DSUB; ++i) acc[h][i] = fmaf(p[h], v[i], acc[h][i]);
}

template <int MODE, int D, int M, int G>
struct DecodeSmem {
  static constexpr bool PQ = MODE != MODE_PAGED_EXACT;
  static constexpr size_t q_bytes = sizeof(float) * G * D;
  static constexpr size_t p_bytes = sizeof(float) * NWARPS * 32 * G;
  static constexpr size_t lut_bytes = PQ ? sizeof(__half) * 256 * M * G : 0;
  // V centroids stay in shared memory when they fit beside the LUT (H100: 227 KB per block); otherwise
  // (head_dim 256 with large M) they are read through L1 from global memory.
  static constexpr bool VC_SMEM = PQ && (lut_bytes + sizeof(__half) * 256 * D + 16384) <= 227 * 1024;
  static constexpr size_t vc_bytes = VC_SMEM ? sizeof(__half) * 256 * D : 0;
  static constexpr size_t reduce_bytes = sizeof(float) * NWARPS * G * (D + 2);
  // The end-of-CTA reduction reuses the LUT region once every warp is done.
  static constexpr size_t big_bytes = lut_bytes > reduce_bytes ? lut_bytes : reduce_bytes;
  static constexpr size_t total = q_bytes + p_bytes + vc_bytes + big_bytes;
};

// Each warp streams its own 32-token tiles with its own online-softmax state (no block-wide barrier
// in the main loop, so warps drift apart and one warp's lookups overlap another's FMAs); the warps'
// states are merged once at the end.
template <int MODE, int D, int M, int G, typename T>
__global__ void __launch_bounds__(NT, 1) decode_attention(
    const T* __restrict__ q,                  // (B, nh, D)
    const __half* __restrict__ k_cent,        // PQ: (Hc, 256, M, DSUB) fp16, [c][m] order
    const __half* __restrict__ v_cent,        // PQ: (Hc, 256, M, DSUB) fp16, [c][m] order
    long long cb_head_stride,                 // elements between kv heads' codebooks (0: shared)
    const unsigned char* __restrict__ k_codes,  // PAGED: pool + layer K offset; CONTIG: (B, nh_k, Tcap, M)
    const unsigned char* __restrict__ v_codes,  // PAGED: pool + layer V offset; CONTIG: (B, nh_k, Tcap, M)
    const T* __restrict__ exact_k,            // PQ: residual ring (S, nh_k, R, D); EXACT: pages (N, nh_k, P, D)
    const T* __restrict__ exact_v,
    long long page_stride,                    // PAGED: bytes per page; CONTIG: bytes per sequence; EXACT: elements per page
    long long head_stride,                    // PAGED: P*M; CONTIG: Tcap*M; EXACT: P*D
    const int* __restrict__ page_table,       // PAGED / EXACT
    int page_shift,                           // PAGED / EXACT: log2(page size); page sizes are powers of two
    const long long* __restrict__ page_row,   // (B): index in page_table of the sequence's first page
    const int* __restrict__ main_len,         // (B): tokens in pages (PQ: full pages only) / contiguous codes
    const int* __restrict__ res_len,          // (B): exact residual tokens (PQ: in the ring; EXACT: in pages after main)
    const int* __restrict__ res_row,          // (B): residual ring row (sequence slot)
    int ring_cap, int ring_mode,              // ring slot of residual token i: ring_mode ? (main_len + i) % ring_cap : i
    const int4* __restrict__ work,            // (W): {b, head group | WORK_RESIDUAL, token begin, token end}; b < 0: padding
    const int2* __restrict__ unit_items,      // (B * nh / G): {first work item, number of items}
    float* __restrict__ part_o,               // (W, G, D) partial outputs
    float* __restrict__ part_lse,             // (W, G) partial log2-sum-exp
    int* __restrict__ unit_counter,           // (B * nh / G), zero between launches
    T* __restrict__ out,                      // (B, nh, D)
    float* __restrict__ lse_out,              // (B, nh) natural log, or nullptr
    int nh, int nh_k, float scale_log2) {
  wait_for_previous_grid();
  using S = DecodeSmem<MODE, D, M, G>;
  constexpr bool PQ = S::PQ;
  constexpr int DSUB = D / M;
  constexpr int VL = M < 32 ? M : 32;        // lanes sharing one token chunk in the V pass
  constexpr int CHUNK = VL;                  // tokens of a lane's V chunk (32 / (32 / VL) chunks a tile)
  constexpr int MPL = M < 32 ? 1 : M / 32;   // subspaces per lane in the V pass
  constexpr int ROT = M < 32 ? M : 32;       // K-row permutation period (see cache.permute_k_rows)
  constexpr int KW = M / 4;                  // 32-bit words of one K row
  constexpr int KC = M < 16 ? M : 16;        // bytes of a stored K row chunk (cache.pack_pages)
  // V bytes of a chunk read per page lookup: 16 never crosses a page (page sizes are powers of two >= 16).
  constexpr int VPIECE = CHUNK < 16 ? CHUNK : 16;
  constexpr int VWL = MPL * CHUNK / 4;       // 32-bit words of a lane's V codes
  // Exact tiles: lanes per token. Four spread the short residual over many warps (short contexts wait on
  // it); the unquantized mode streams whole contexts, where one lane per token costs fewer instructions.
  constexpr int LPT = MODE == MODE_PAGED_EXACT ? 1 : 4;
  constexpr int TE = 32 / LPT;               // exact tiles: tokens per tile
  constexpr int CHUNK_E = TE * VL / 32;      // exact tiles: tokens of a lane's V chunk
  static_assert(G == 1 || G == 2 || G == 4 || G == 8, "G in {1,2,4,8}");
  static_assert(M % 8 == 0 && (M < 32 || M % 32 == 0), "M");
  constexpr bool V_HALF = DSUB >= 2;  // packed fp16 V accumulation needs centroid pairs
  constexpr int MB = M < 32 ? M : 32;      // LUT subspace block (paged layout)
  constexpr int LUT_ROW = MB * G * 2;      // bytes of one code's row inside a block

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* q_s = reinterpret_cast<float*>(smem_raw);                       // [G][D]
  float* p_all = q_s + G * D;                                            // [NWARPS][32][G]
  __half* vc_smem = reinterpret_cast<__half*>(p_all + NWARPS * 32 * G);  // [256][M][DSUB]
  unsigned char* big = reinterpret_cast<unsigned char*>(vc_smem) + S::vc_bytes;
  __half* lut_s = reinterpret_cast<__half*>(big);                        // [256][M][G] (PQ)

  const int tid = threadIdx.x;
  if (tid == 0) {
    // The host sizes dynamic shared memory from the same formula; a mismatch must fail loudly.
    unsigned int dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < S::total) __trap();
  }
  const int lane = tid & 31;
  const int warp = tid >> 5;
  float* p_w = p_all + warp * 32 * G;
  const int4 item = work[blockIdx.x];
  // Padding of a fixed grid (a plan sized for CUDA-graph replays): nothing to do.
  if (item.x < 0) return;
  const int b = item.x, hg = item.y & (WORK_RESIDUAL - 1);
  const bool with_residual = (item.y & WORK_RESIDUAL) != 0;  // this item covers the exact residual tokens
  const int unit = b * (nh / G) + hg;    // (sequence, head group)
  const int2 ui = unit_items[unit];      // its splits: first work item, count
  const int h0 = hg * G;                 // first query head of the group
  const int kvh = h0 / (nh / nh_k);
  const int n_main = main_len[b];
  // A schedule may be planned for more tokens than the sequence holds now (it then stays valid while the
  // sequence grows, decode.AttentionPlan): the item's range is cut at the tokens in pages.
  const int tok_end = min(item.w, n_main), tok_begin = min(item.z, tok_end);
  const long long prow = page_row[b];
  const int page_mask = (1 << page_shift) - 1;

  const __half* vc_s = S::VC_SMEM ? vc_smem : v_cent + kvh * cb_head_stride;
  // ---- stage q, the V codebook and the LUT (called once the first code loads are in flight) ----------
  auto stage_tables = [&]() {
    // q_s serves the exact tiles only; it is published by the barrier after the LUT build.
    if (MODE == MODE_PAGED_EXACT || with_residual)
      for (int i = tid; i < G * D; i += NT)
        q_s[i] = to_float(q[((long long)b * nh + h0) * D + i]);
    // A residual-only work item (no PQ tokens) needs neither table.
    const bool tables = tok_end > tok_begin;
    if (S::VC_SMEM && tables) {
      // Asynchronous copies: the V codebook streams in while the LUT is being built.
      const uint4* vs = reinterpret_cast<const uint4*>(v_cent + kvh * cb_head_stride);
      uint4* vd = reinterpret_cast<uint4*>(vc_smem);
#pragma unroll
      for (int k = 0; k < (int)(S::vc_bytes / 16) / NT; ++k) cp_async16(vd + tid + k * NT, vs + tid + k * NT);
    }
    if (PQ && tables) {
      // LUT entry (c, m) for the whole head group. NT is a multiple of M, so a thread keeps one subspace m
      // (its q slice stays in registers, read straight from global memory) and walks the codes
      // c = tid / M + k * NT / M; consecutive threads take consecutive m, so the centroid reads are contiguous.
      static_assert(NT % M == 0, "a thread keeps one subspace");
      constexpr int ENT = 256 * M / NT;                      // entries per thread
      constexpr int BATCH = ENT * DSUB <= 64 ? ENT : 64 / DSUB;  // centroid loads in flight together
      const int m = tid % M;
      float qm[G][DSUB];
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int i = 0; i < DSUB; ++i) qm[h][i] = to_float(q[((long long)b * nh + h0 + h) * D + m * DSUB + i]) * scale_log2;
      const __half* ksrc = k_cent + kvh * cb_head_stride + (long long)tid * DSUB;  // entry tid / M, m
#pragma unroll 1
      for (int k0 = 0; k0 < ENT; k0 += BATCH) {
        float c[BATCH][DSUB];
#pragma unroll
        for (int k = 0; k < BATCH; ++k) pq_load_subvector<DSUB>(ksrc + (long long)(k0 + k) * NT * DSUB, c[k]);
#pragma unroll
        for (int k = 0; k < BATCH; ++k) {
          __half entry[G];
#pragma unroll
          for (int h = 0; h < G; ++h) {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < DSUB; ++i) acc = fmaf(qm[h][i], c[k][i], acc);
            entry[h] = __float2half_rn(acc);
          }
          // Paged K rows are XOR-permuted so lanes read distinct banks of [block of MB subspaces][c][MB];
          // contiguous codes are not, so there lanes read one subspace with random codes and [m][c] spreads
          // them over banks.
          const int cc = tid / M + (k0 + k) * (NT / M);
          const long long at = MODE == MODE_PAGED_PQ ? ((long long)(m / MB) * 256 + cc) * MB + m % MB
                                                     : (long long)m * 256 + cc;
          store_halves<G>(lut_s + at * G, entry);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();
  };

  // ---- this warp's tiles -------------------------------------------------------------------------
  const int n_pq = PQ ? tok_end - tok_begin : 0;
  const int ex_begin = MODE == MODE_PAGED_EXACT ? tok_begin : 0;
  const int ex_end = MODE == MODE_PAGED_EXACT ? tok_end + (with_residual ? res_len[b] : 0)
                                             : (with_residual ? res_len[b] : 0);
  const int pq_tiles = (n_pq + 31) / 32;
  const int all_tiles = pq_tiles + (ex_end - ex_begin + TE - 1) / TE;

  float m_run[G], l_lane[G];
  float acc[MPL][G][DSUB];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m_run[h] = -kInf;
    l_lane[h] = 0.f;
#pragma unroll
    for (int k = 0; k < MPL; ++k)
#pragma unroll
      for (int i = 0; i < DSUB; ++i) acc[k][h][i] = 0.f;
  }
  const int vm0 = lane % VL;   // V pass: subspaces vm0 + VL*k
  const int vtg = lane / VL;   // and token chunk

  // Online softmax over this warp's tile: s[] are the lane's token scores (log2 domain, -inf when
  // masked); leaves the probabilities in p_w (fp16 [token][G] for the packed V pass, else fp32) and
  // rescales the accumulators. Lanes that share a token (exact tiles) hold the same score; only its
  // `writer` lane counts it in l and stores its p at row `slot`.
  auto softmax_tile = [&](float (&s)[G], bool half_p, bool writer, int slot) {
    float p[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mt = s[h];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      const float m_new = fmaxf(m_run[h], mt);  // finite: every tile holds a valid token
      const float alpha = fast_exp2(m_run[h] - m_new);
      p[h] = fast_exp2(s[h] - m_new);
      l_lane[h] = l_lane[h] * alpha + (writer ? p[h] : 0.f);
      m_run[h] = m_new;
#pragma unroll
      for (int k = 0; k < MPL; ++k)
#pragma unroll
        for (int i = 0; i < DSUB; ++i) acc[k][h][i] *= alpha;
    }
    __syncwarp();  // the previous tile's V pass has finished reading p_w
    if (half_p) {
      __half ph[G];
#pragma unroll
      for (int h = 0; h < G; ++h) ph[h] = __float2half_rn(p[h]);
      store_halves<G>(reinterpret_cast<__half*>(p_w) + slot * G, ph);
    } else if (writer) {
#pragma unroll
      for (int h = 0; h < G; ++h) p_w[slot * G + h] = p[h];
    }
    __syncwarp();
  };

  if constexpr (PQ) {
    const unsigned char* k_base;
    const unsigned char* v_base;
    if constexpr (MODE == MODE_PAGED_PQ) {
      k_base = k_codes + kvh * head_stride;
      v_base = v_codes + kvh * head_stride;
    } else {
      k_base = k_codes + b * page_stride + kvh * head_stride;
      v_base = v_codes + b * page_stride + kvh * head_stride;
    }
    // A tile's page-table entry is read one tile before its codes: the code loads of the next tile then
    // never wait on a page-table load (the warp issues in order, so that wait would stall the tile). A
    // 32-token tile lies in one page, except with 16-token pages where its second half is read on the spot.
    const int* seq_pages = page_table + prow;
    // Page ids are clamped at 0: a block-table entry of a sequence freed since the launch's metadata was
    // written (a misused CUDA-graph replay, which the append kernel flags) is -1; its reads then stay in the
    // pool. One IMNMX per tile.
    auto fetch_page = [&](int tile) -> int {
      return MODE == MODE_PAGED_PQ ? max(__ldg(seq_pages + ((tok_begin + tile * 32) >> page_shift)), 0) : 0;
    };
    // The page of a tile's tokens 16..31: its own with 16-token pages, else the tile's page.
    auto page_hi_of = [&](int tok0, int page) -> int {
      return MODE == MODE_PAGED_PQ && page_shift < 5 && tok0 + 16 < tok_end
                 ? max(__ldg(seq_pages + ((tok0 + 16) >> page_shift)), 0) : page;
    };
    auto load_k = [&](int tile, int page, unsigned int (&kw)[KW]) {
      const int tok0 = tok_begin + tile * 32;
      const int tok = tok0 + lane;
      const int page_hi = page_hi_of(tok0, page);
      if (tok < tok_end) {
        if constexpr (MODE == MODE_PAGED_PQ) {
          // Chunk-major rows: lane t's chunk i sits right after lane t-1's, so each load is coalesced.
          const unsigned char* row = k_base + (long long)(lane < 16 ? page : page_hi) * page_stride + (tok & page_mask) * KC;
#pragma unroll
          for (int i = 0; i < M / KC; ++i) load_code_bytes<KC>(kw + i * (KC / 4), row + i * (page_mask + 1) * KC);
        }
        else
          load_code_bytes<M>(kw, k_base + (long long)tok * M);
      }
    };
    auto load_v = [&](int tile, int page, unsigned int (&vw)[VWL]) {
      const int tok0 = tok_begin + tile * 32;
      const int page_hi = page_hi_of(tok0, page);
      if constexpr (MODE == MODE_PAGED_PQ) {
#pragma unroll
        for (int piece = 0; piece < CHUNK / VPIECE; ++piece) {
          const int x = vtg * CHUNK + piece * VPIECE;  // the piece's first token within the tile
          if (tok0 + x < tok_end) {
            // 16-token blocks of [m][token]: lanes (subspaces) read consecutive 16-byte rows of one block.
            const int t = (tok0 + x) & page_mask;
            const unsigned char* src = v_base + (long long)(x < 16 ? page : page_hi) * page_stride +
                                       (t >> 4) * (M * 16) + vm0 * 16 + (t & 15);
#pragma unroll
            for (int k = 0; k < MPL; ++k)
              load_code_bytes<VPIECE>(vw + (k * CHUNK + piece * VPIECE) / 4, src + VL * k * 16);
          }
        }
      } else {
        // Row-wise V (MILLION layout): one byte per (token, subspace).
#pragma unroll
        for (int k = 0; k < MPL; ++k)
#pragma unroll
          for (int w4 = 0; w4 < CHUNK / 4; ++w4) {
            unsigned int w = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const int t = tok0 + vtg * CHUNK + 4 * w4 + j;
              if (t < tok_end) w |= (unsigned int)__ldg(v_base + (long long)t * M + vm0 + VL * k) << (8 * j);
            }
            vw[(k * CHUNK) / 4 + w4] = w;
          }
      }
    };
    const int rot = (MODE == MODE_PAGED_PQ) ? ((tok_begin + lane) & page_mask) % ROT : 0;  // tiles are 32-aligned in a page
    const unsigned int rot_b = (unsigned)rot * (G * 2);
    // One uniform base for both tables, their offsets compile-time constants: LDS [offset + base + imm].
    const unsigned int smem32 = smem_addr(smem_raw);
    constexpr unsigned int LUT_AT = S::q_bytes + S::p_bytes + S::vc_bytes, VC_AT = S::q_bytes + S::p_bytes;
    const unsigned char* vc_b = reinterpret_cast<const unsigned char*>(vc_s);  // V centroids in global memory (!VC_SMEM)
    // Byte offset of the lane's subspace k inside a V centroid row [m][DSUB] (fp16). With 256-byte rows
    // (head_dim 128) it is below 256, so one byte-permute builds code * 256 + offset.
    unsigned int v_lane_off[MPL];
#pragma unroll
    for (int k = 0; k < MPL; ++k) v_lane_off[k] = (vm0 + VL * k) * DSUB * 2;

    // As soon as the K / V pass is done with its codes, the buffer is refilled with those of tile `next`
    // (page-table entry `next_page`) when there is one.
    auto process_tile = [&](int tile, unsigned int (&kcur)[KW], unsigned int (&vcur)[VWL], int next, int next_page) {
      const int tok0 = tok_begin + tile * 32;
      float s[G];
      if (tok0 + lane < tok_end) {
#pragma unroll
        for (int h = 0; h < G; ++h) s[h] = 0.f;
        // fp16 partial sums over runs of K_RUN lookups (one HADD2 per head pair and lookup), folded into
        // fp32: a run's rounding stays near the LUT's own fp16 rounding while the adds cost half.
#pragma unroll
        for (int j0 = 0; j0 < M; j0 += K_RUN) {
          __half2 run[(G + 1) / 2];
#pragma unroll
          for (int j = j0; j < j0 + K_RUN; ++j) {
            // Byte offsets written so they compile to one byte-permute plus one 3-input logic op: entry
            // (c, m) of [block][c][MB][G] sits at block * 256*LUT_ROW + c * LUT_ROW + (m % MB) * G*2, and
            // m = j ^ rot only flips j's low five bits.
            unsigned int off;
            if constexpr (MODE == MODE_PAGED_PQ) {
              const unsigned int row = LUT_ROW == 256 ? code_byte_shl8(kcur, j) : code_byte(kcur, j) * LUT_ROW;
              // The block offset is a power of two above every row offset, so it joins the XOR: one LOP3.
              off = row ^ ((((unsigned)j % MB) * (G * 2) + ((unsigned)j / MB) * (256 * LUT_ROW)) ^ rot_b);
            } else {
              off = code_byte(kcur, j) * (G * 2) + (unsigned)j * (256 * G * 2);
            }
            add_lut_run<G>(run, smem32 + off + LUT_AT, j == j0);
          }
          fold_lut_run<G>(s, run);
        }
      } else {
#pragma unroll
        for (int h = 0; h < G; ++h) s[h] = -kInf;
      }
      if (next < pq_tiles) load_k(next, next_page, kcur);
      softmax_tile(s, V_HALF, true, lane);
      // V: masked tokens have p = 0 and (stale but valid) codes, so no per-token branch is needed.
      if constexpr (V_HALF) {
        // One tile's p.v in packed fp16 FMAs (p <= 1, at most 32 terms), folded into fp32 per tile.
        __half2 tacc[MPL][G][DSUB / 2];
#pragma unroll
        for (int k = 0; k < MPL; ++k)
#pragma unroll
          for (int h = 0; h < G; ++h)
#pragma unroll
            for (int i = 0; i < DSUB / 2; ++i) tacc[k][h][i] = __float2half2_rn(0.f);
        // p of PT consecutive tokens per 16-byte broadcast read; each head's p is then used as (p, p).
        constexpr int PT = G <= 4 ? 8 / G : 1;
        const uint4* pv = reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(p_w) + vtg * CHUNK * G);
#pragma unroll
        for (int j0 = 0; j0 < CHUNK; j0 += PT) {
          __half pt[PT * G > 8 ? PT * G : 8];
          *reinterpret_cast<uint4*>(pt) = pv[(j0 * G) / 8];
#pragma unroll
          for (int j = j0; j < j0 + PT; ++j) {
#pragma unroll
            for (int k = 0; k < MPL; ++k) {
              const unsigned int cofs = M * DSUB * 2 == 256 ? code_byte_shl8_or(vcur, k * CHUNK + j, v_lane_off[k])
                                                              : code_byte(vcur, k * CHUNK + j) * (M * DSUB * 2) + v_lane_off[k];
              __half2 v[DSUB / 2];
              if constexpr (S::VC_SMEM) {
                lds_words<DSUB / 2>(smem32 + cofs + VC_AT, reinterpret_cast<unsigned int(&)[DSUB / 2]>(v));
              } else {
                const __half2* cv = reinterpret_cast<const __half2*>(vc_b + cofs);
#pragma unroll
                for (int i = 0; i < DSUB / 2; ++i) v[i] = cv[i];
              }
#pragma unroll
              for (int h = 0; h < G; ++h) {
                const __half2 ph = __half2half2(pt[(j - j0) * G + h]);
#pragma unroll
                for (int i = 0; i < DSUB / 2; ++i) tacc[k][h][i] = __hfma2(ph, v[i], tacc[k][h][i]);
              }
            }
          }
        }
#pragma unroll
        for (int k = 0; k < MPL; ++k)
#pragma unroll
          for (int h = 0; h < G; ++h)
#pragma unroll
            for (int i = 0; i < DSUB / 2; ++i) {
              const float2 f = __half22float2(tacc[k][h][i]);
              acc[k][h][2 * i] += f.x;
              acc[k][h][2 * i + 1] += f.y;
            }
      } else {
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) {
          const float* pj = p_w + (vtg * CHUNK + j) * G;
#pragma unroll
          for (int k = 0; k < MPL; ++k) {
            const unsigned int c = code_byte(vcur, k * CHUNK + j);
            float v[DSUB];
            pq_load_subvector<DSUB>(vc_s + ((int)c * M + vm0 + VL * k) * DSUB, v);
            accumulate_v<G, DSUB>(acc[k], pj, v);
          }
        }
      }
      if (next < pq_tiles) load_v(next, next_page, vcur);
    };

    // One buffer per code kind: the next tile's K codes are loaded as soon as this tile's K pass is done
    // with them (they arrive during its softmax and V pass), its V codes once the V pass is done (they
    // arrive during the next K pass). No register copies, and room for M = 256.
    unsigned int kw[KW], vw[VWL];
    int page_next = 0;  // page-table entry of the warp's next tile
    // The first tile's loads are issued before the tables are staged, so they overlap that work.
    if (warp < pq_tiles) {
      const int page = fetch_page(warp);
      load_k(warp, page, kw);
      load_v(warp, page, vw);
    }
    if (warp + NWARPS < pq_tiles) page_next = fetch_page(warp + NWARPS);
    stage_tables();
    // The next tile's V codes are pulled into L2 when this tile starts, a whole tile before their register
    // loads (issued after this tile's V pass), which then wait on L2 rather than HBM: more bytes in flight
    // without more registers. One 128-byte line per lane, pages of at least 32 tokens (a tile's two 16-token
    // V blocks are then contiguous). The prefetch reads its own copy of the page-table entry, one tile ahead.
    // Measured (b8·32K, H200): M = 64 −5 %, M = 32 −9 %; prefetching K codes, or two tiles ahead, was slower,
    // and the M = 32 gain depends on how ptxas schedules this block (docs/perf-notes.md).
    int page_pf = warp + NWARPS < pq_tiles ? fetch_page(warp + NWARPS) : 0;
    for (int tile = warp; tile < pq_tiles; tile += NWARPS) {
      const int next = tile + NWARPS;
      const int page = page_next;
      if (next + NWARPS < pq_tiles) page_next = fetch_page(next + NWARPS);
      if (MODE == MODE_PAGED_PQ && page_shift >= 5) {
        if (tile + NWARPS < pq_tiles) {
          const int t = (tok_begin + (tile + NWARPS) * 32) & page_mask;
          const long long pg = (long long)page_pf * page_stride;
          for (int l = lane; l < M / 4; l += 32) prefetch_l2(v_base + pg + (t >> 4) * (M * 16) + l * 128);
          if (tile + 2 * NWARPS < pq_tiles) page_pf = fetch_page(tile + 2 * NWARPS);
        }
      }
      process_tile(tile, kw, vw, next, page);
    }
  } else {
    stage_tables();
  }

  // ---- exact tiles: the residual ring (PQ modes) or unquantized pages (EXACT mode) -------------------
  auto exact_ptr = [&](const T* base, int t) -> const T* {
    if constexpr (MODE == MODE_PAGED_EXACT) {
      // Clamped like the PQ pages: a stale replay (a freed sequence's row holds -1) reads inside the pool.
      return base + max(page_table[prow + (t >> page_shift)], 0) * page_stride + kvh * head_stride +
             (long long)(t & page_mask) * D;
    } else {
      const int slot = ring_mode ? (n_main + t) % ring_cap : t;
      return base + (((long long)res_row[b] * nh_k + kvh) * ring_cap + slot) * D;
    }
  };
  // A tile of TE tokens with LPT lanes per token: each lane reads every LPT-th 16-byte vector of its token's
  // K row (the LPT lanes of a token read consecutive bytes, and their q vectors sit in distinct banks),
  // so the dot products need few loads per lane, all in flight at once. Short contexts wait on exactly
  // this work (the residual tokens), so it is spread over as many warps as there are tiles.
  for (int tile = pq_tiles + ((warp - pq_tiles) % NWARPS + NWARPS) % NWARPS; tile < all_tiles; tile += NWARPS) {
    const int t0 = ex_begin + (tile - pq_tiles) * TE;
    const int tq = lane / LPT;  // this lane's token in the tile
    const bool valid = t0 + tq < ex_end;
    float s[G];
#pragma unroll
    for (int h = 0; h < G; ++h) s[h] = 0.f;
    if (valid) {
      constexpr int EPV = 16 / sizeof(T);
      const uint4* kr = reinterpret_cast<const uint4*>(exact_ptr(exact_k, t0 + tq)) + lane % LPT;
      const float* qr = q_s + (lane % LPT) * EPV;
      constexpr int NVL = D / EPV / LPT;  // vectors per lane
      constexpr int ACC = MPL * G * DSUB;  // accumulator registers: the budget left for loads in flight
      constexpr int KMAX = ACC <= 16 ? 16 : (ACC <= 32 ? 8 : 4);
      constexpr int KBATCH = NVL < KMAX ? NVL : KMAX;
#pragma unroll
      for (int v0 = 0; v0 < NVL; v0 += KBATCH) {
        uint4 raw[KBATCH];
#pragma unroll
        for (int i = 0; i < KBATCH; ++i) raw[i] = __ldg(kr + (v0 + i) * LPT);
#pragma unroll
        for (int i = 0; i < KBATCH; ++i) {
          float kv[EPV];
          unpack16<T>(raw[i], kv);
          const float* qv = qr + (v0 + i) * LPT * EPV;
#pragma unroll
          for (int h = 0; h < G; ++h)
#pragma unroll
            for (int e = 0; e < EPV; ++e) s[h] = fmaf(qv[h * D + e], kv[e], s[h]);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
#pragma unroll
      for (int off = 1; off < LPT; off <<= 1) s[h] += __shfl_xor_sync(0xffffffffu, s[h], off);
      s[h] = valid ? s[h] * scale_log2 : -kInf;
    }
    softmax_tile(s, false, lane % LPT == 0, tq);
    // V: the lane's sub-vectors of VBATCH tokens loaded together. Values past the end may be NaN: they are
    // never loaded (zeros instead), not multiplied by p = 0.
    const int nvalid = min(CHUNK_E, ex_end - (t0 + vtg * CHUNK_E));
    constexpr int VBATCH_MAX = MPL * DSUB >= 32 ? 1 : (32 / (MPL * DSUB) < 8 ? 32 / (MPL * DSUB) : 8);
    constexpr int VBATCH = VBATCH_MAX < CHUNK_E ? VBATCH_MAX : CHUNK_E;
    for (int j0 = 0; j0 < nvalid; j0 += VBATCH) {
      float v[VBATCH][MPL][DSUB];
#pragma unroll
      for (int jj = 0; jj < VBATCH; ++jj) {
        const bool ok = j0 + jj < nvalid;
        const T* vr = exact_ptr(exact_v, t0 + vtg * CHUNK_E + (ok ? j0 + jj : 0));
#pragma unroll
        for (int k = 0; k < MPL; ++k) {
          pq_load_subvector<DSUB>(vr + (vm0 + VL * k) * DSUB, v[jj][k]);
          if (!ok)
#pragma unroll
            for (int i = 0; i < DSUB; ++i) v[jj][k][i] = 0.f;
        }
      }
#pragma unroll
      for (int jj = 0; jj < VBATCH; ++jj) {
        const float* pj = p_w + (vtg * CHUNK_E + j0 + jj) * G;
#pragma unroll
        for (int k = 0; k < MPL; ++k) accumulate_v<G, DSUB>(acc[k], pj, v[jj][k]);
      }
    }
  }

  // ---- merge the warps' states ---------------------------------------------------------------------
  // Lanes holding other token chunks of the same subspace (M < 32) fold in first.
#pragma unroll
  for (int off = VL; off < 32; off <<= 1)
#pragma unroll
    for (int k = 0; k < MPL; ++k)
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int i = 0; i < DSUB; ++i) acc[k][h][i] += __shfl_xor_sync(0xffffffffu, acc[k][h][i], off);
  float l_w[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    float v = l_lane[h];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    l_w[h] = v;
  }
  __syncthreads();  // every warp is done with the LUT: its region becomes the reduction buffer
  float* red = reinterpret_cast<float*>(big);   // [NWARPS][G][D]
  float* ml = red + NWARPS * G * D;             // [NWARPS][G][2]: running max, sum
  if (lane < VL) {
#pragma unroll
    for (int k = 0; k < MPL; ++k)
#pragma unroll
      for (int h = 0; h < G; ++h)
#pragma unroll
        for (int i = 0; i < DSUB; ++i) red[(warp * G + h) * D + (vm0 + VL * k) * DSUB + i] = acc[k][h][i];
  }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      ml[(warp * G + h) * 2] = m_run[h];
      ml[(warp * G + h) * 2 + 1] = l_w[h];
    }
  }
  __syncthreads();

  const bool single = ui.y == 1;
  for (int e = tid; e < G * D; e += NT) {
    const int h = e / D;
    float mx = -kInf;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, ml[(w * G + h) * 2]);
    float l = 0.f, o = 0.f;
    if (mx != -kInf) {
#pragma unroll
      for (int w = 0; w < NWARPS; ++w) {
        const float sc = exp2f(ml[(w * G + h) * 2] - mx);  // 0 for warps that saw no token
        l = fmaf(ml[(w * G + h) * 2 + 1], sc, l);
        o = fmaf(red[w * G * D + e], sc, o);
      }
    }
    o = l > 0.f ? o / l : 0.f;
    const float lse2 = l > 0.f ? mx + log2f(l) : -kInf;
    if (single) {
      out[((long long)b * nh + h0) * D + e] = from_float<T>(o);
      if (lse_out != nullptr && (e % D) == 0) lse_out[(long long)b * nh + h0 + h] = lse2 * LN2;
    } else {
      part_o[(long long)blockIdx.x * G * D + e] = o;
      if ((e % D) == 0) part_lse[(long long)blockIdx.x * G + h] = lse2;
    }
  }
  if (single) return;

  // ---- the last CTA of this (sequence, head group) merges the splits --------------------------------
  __shared__ int is_last;
  if (!last_split_to_arrive(unit_counter + unit, ui.y, &is_last)) return;
  // One pass with a running max over batches of splits whose partial states are loaded together: the
  // loads of a batch are independent, so a batch costs one global round trip (at short contexts this merge
  // is on the critical path of the whole step).
  constexpr int SB = 8;
  for (int e = tid; e < G * D; e += NT) {
    const int h = e / D;
    float mx = -kInf, wsum = 0.f, o = 0.f;
    for (int k0 = 0; k0 < ui.y; k0 += SB) {
      float l[SB], po[SB];
#pragma unroll
      for (int i = 0; i < SB; ++i) {
        const bool ok = k0 + i < ui.y;
        l[i] = ok ? __ldcg(part_lse + (long long)(ui.x + k0 + i) * G + h) : -kInf;
        po[i] = ok ? __ldcg(part_o + (long long)(ui.x + k0 + i) * G * D + e) : 0.f;
      }
      float bm = mx;
#pragma unroll
      for (int i = 0; i < SB; ++i) bm = fmaxf(bm, l[i]);
      if (bm != -kInf) {  // splits without tokens have lse = -inf and o = 0
        const float sc = fast_exp2(mx - bm);
        wsum *= sc;
        o *= sc;
#pragma unroll
        for (int i = 0; i < SB; ++i) {
          const float w = fast_exp2(l[i] - bm);
          wsum += w;
          o = fmaf(w, po[i], o);
        }
        mx = bm;
      }
    }
    out[((long long)b * nh + h0) * D + e] = from_float<T>(wsum > 0.f ? o / wsum : 0.f);
    if (lse_out != nullptr && (e % D) == 0)
      lse_out[(long long)b * nh + h0 + h] = (wsum > 0.f ? mx + log2f(wsum) : -kInf) * LN2;
  }
  if (tid == 0) unit_counter[unit] = 0;
}

}  // namespace mc
