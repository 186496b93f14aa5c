// PagedPQCache device helpers (million_cupy/cache.py and million_cupy/step.py launch them):
//
// append_tokens<DSUB, T>  every append, the decode step's included: for each token row it
//   1. PQ-encodes K and V (nearest centroid per subspace, pq_common.cuh: the codes Codebook.encode gives)
//      and stores the codes at the token's place in block pos / P of its sequence, in the stored page
//      layout (K rows XOR-permuted in 16-byte chunks, V transposed in 16-token blocks: layout.pack_pages);
//   2. copies the exact K and V rows into the layer's residual ring at slot pos % R (R: the ring's slots,
//      PagedPQCache.ring_slots) when the host marks the token (tok.w != 0): one of its sequence's last R
//      tokens after the append, the window and the tokens a truncate may bring back into it.
//   A block is a full page only once the flush rule says so (layout.full_pages); until then the decode
//   kernels read its tokens from the ring. So a flush costs no work here, and every launch of a decode
//   step does the same small amount of work.
//
//   k, v          (n_tok, nh_k, M * DSUB) rows of T, contiguous, 16-byte aligned
//   ring_k/v      (max_seqs, nh_k, R, M * DSUB) this layer's rings
//   k_pages       pool + this layer's K code offset; page p, head h at p * page_nbytes + h * P * M
//   v_pages       pool + this layer's V code offset
//   k_cent/v_cent float32 (Hc, M, 256, DSUB); Hc = 1 (shared by the kv heads) or nh_k
//   block_table   int32 (max_seqs, max_blocks): page id of each block, -1 if unallocated
//   tok           int4 (n_tok): {sequence slot, position, slot generation, copied into the ring}
//   slot_gen      int32 (max_seqs): the cache's current generation of each slot
//   status        4 flag bytes (read on the host as one little-endian int32 word): byte STATUS_STALE_SLOT = a
//                 token named a slot of another generation (a batch that changed since it was planned),
//                 STATUS_NO_PAGE = its block has no page (such tokens write nothing), STATUS_NON_FINITE = a
//                 token holds NaN or inf (it is written). Each is set to 1 by a plain store, never cleared
//                 here: the word may be host-mapped pinned memory (DecodeStep reads it without a copy), where
//                 device atomics are not guaranteed atomic, and a repeated store of 1 needs none
//   warp_search   0: each thread searches APPEND_ROWS rows (bulk appends); 1: APPEND_LANES lanes per row
//                 (a few rows, e.g. a decode step's tokens: far lower latency, the same codes)
//   launch        blockDim.x = APPEND_THREADS; gridDim.x = 2 * Hc * M (kind, codebook head, subspace);
//                 gridDim.y >= 1 (row tiles, or groups of APPEND_THREADS / APPEND_LANES rows with warp_search;
//                 blocks stride over them, so any count is correct)
//
// append_exact_tokens<T>  the same for an exact (unquantized) cache: each token row of K and V is copied into
//   its place in block pos / P of its sequence, pages laid out (num_pages, [layer][kind][head], P, D) in T; no
//   ring (an exact cache reads its last, partly filled block from the pages). Same tok / slot_gen / status
//   contract as append_tokens.
//   k_pages       pool + this layer's K offset, in elements of T; page p, head h, token row r at
//                 p * page_stride + (h * P + r) * D
//   v_pages       pool + this layer's V offset
//   launch        blockDim.x = APPEND_THREADS; gridDim.x = 2 (K, V); gridDim.y >= 1 (blocks stride over the
//                 n_tok * nh_k * D * sizeof(T) / 16 16-byte vectors of a kind)
//
// gather_page_table   the CSR indices of PagedPQCache.page_table: one block per sequence copies
//                     the first (indptr[b+1] - indptr[b]) entries of its block-table row.
//   block_table       int32 (max_seqs, max_blocks) contiguous
//   meta              int32 (2B + 1): seq_ids (B) then indptr (B + 1)
//   indices           int32 (indptr[B])
//   launch            gridDim.x = B, any 1-D blockDim.x
//
// store_block_ids     its inverse for new pages (PagedPQCache's page reservation): block b writes ids
//                     [indptr[b], indptr[b+1]) into its sequence's block-table row from column first[b] on.
//   meta              int32 (3B + 1): seq_ids (B), first columns (B), then indptr (B + 1)
//   ids               int32 (indptr[B]) page ids, as the allocator popped them
//   launch            gridDim.x = B, any 1-D blockDim.x
#include "pq_common.cuh"

constexpr int APPEND_THREADS = 128;
constexpr int APPEND_ROWS = 4;  // rows per thread and tile: each staged centroid read serves four rows
constexpr int APPEND_LANES = 8;  // lanes per row with warp_search
// Byte index of each status flag (million_cupy/cache.py mirrors them as bits of the int32 word).
constexpr int STATUS_STALE_SLOT = 0;
constexpr int STATUS_NO_PAGE = 1;
constexpr int STATUS_NON_FINITE = 2;

__device__ __forceinline__ void raise_flag(unsigned char* status, int flag) { status[flag] = 1; }

// Flags a sub-vector holding NaN or inf (appends do not check on the host in the decode path; the flag is
// reported by PagedPQCache.stats() and DecodeStep's next plan).
template <int DSUB>
__device__ __forceinline__ void flag_non_finite(const float (&x)[DSUB], unsigned char* status) {
    bool bad = false;
#pragma unroll
    for (int j = 0; j < DSUB; ++j) bad |= !isfinite(x[j]);
    if (bad) raise_flag(status, STATUS_NON_FINITE);
}

// Where row i (token t = i / heads_per_cb, head h) comes from and goes to; page < 0: write nothing.
template <int DSUB, typename T>
struct AppendRow {
    const T* src;       // its sub-vector m in k or v
    T* ring_slot;       // its sub-vector m in the ring, or nullptr when the token does not stay residual
    long long dst;      // byte offset of its code in the layer's K or V pages
    int page;
};

template <int DSUB, typename T>
__device__ __forceinline__ AppendRow<DSUB, T> append_row(long long i, long long rows, int heads_per_cb, int hc,
                                                         const T* x, T* ring, bool is_v, int m, int M, int nh_k,
                                                         int R, int page_shift, long long page_nbytes,
                                                         const int* block_table, int max_blocks,
                                                         const int4* tok, const int* slot_gen, unsigned char* status) {
    AppendRow<DSUB, T> row{nullptr, nullptr, -1, -1};
    if (i >= rows) return row;
    const int D = M * DSUB;
    const int P = 1 << page_shift;
    const int t = static_cast<int>(i / heads_per_cb);
    const int h = hc * heads_per_cb + static_cast<int>(i % heads_per_cb);
    const int4 info = tok[t];  // slot, position, generation, stays residual
    if (slot_gen[info.x] != info.z) {
        raise_flag(status, STATUS_STALE_SLOT);
        return row;
    }
    row.page = block_table[static_cast<long long>(info.x) * max_blocks + (info.y >> page_shift)];
    if (row.page < 0) {
        raise_flag(status, STATUS_NO_PAGE);
        return row;
    }
    row.src = x + (static_cast<long long>(t) * nh_k + h) * D + m * DSUB;
    if (info.w) row.ring_slot = ring + ((static_cast<long long>(info.x) * nh_k + h) * R + info.y % R) * D + m * DSUB;
    const int tp = info.y & (P - 1);  // token in its page
    long long in_page;
    if (is_v) {
        in_page = (tp >> 4) * (M * 16) + m * 16 + (tp & 15);
    } else {
        const int rot = M < 32 ? M : 32;  // layout.permute_k_rows
        const int kc = M < 16 ? M : 16;   // layout.k_chunk
        const int s = m ^ (tp % rot);     // stored position of subspace m in this row
        in_page = (s / kc) * (P * kc) + tp * kc + s % kc;
    }
    row.dst = static_cast<long long>(row.page) * page_nbytes + static_cast<long long>(h) * P * M + in_page;
    return row;
}

template <int DSUB, typename T>
__global__ void __launch_bounds__(APPEND_THREADS)
append_tokens(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ ring_k, T* __restrict__ ring_v,
              unsigned char* __restrict__ k_pages, unsigned char* __restrict__ v_pages, long long page_nbytes,
              const float* __restrict__ k_cent, const float* __restrict__ v_cent,
              const int* __restrict__ block_table, int max_blocks, const int4* __restrict__ tok,
              const int* __restrict__ slot_gen, unsigned char* __restrict__ status, int n_tok, int nh_k, int M, int Hc,
              int R, int page_shift, int warp_search) {
  wait_for_previous_grid();
    __shared__ __align__(16) float s_centroids[PQ_NUM_CENTROIDS * DSUB];
    __shared__ float s_norms[PQ_NUM_CENTROIDS];

    // Block x = (kind, codebook head, subspace), subspace fastest: blocks reading the same rows run together.
    const int m = static_cast<int>(blockIdx.x % static_cast<unsigned>(M));
    const int hc = static_cast<int>((blockIdx.x / static_cast<unsigned>(M)) % static_cast<unsigned>(Hc));
    const bool is_v = blockIdx.x >= static_cast<unsigned>(M * Hc);
    const T* x = is_v ? v : k;
    T* ring = is_v ? ring_v : ring_k;
    unsigned char* pages = is_v ? v_pages : k_pages;
    const int heads_per_cb = nh_k / Hc;
    const long long rows = static_cast<long long>(n_tok) * heads_per_cb;  // rows this codebook encodes
    auto row_at = [&](long long i) {
        return append_row<DSUB, T>(i, rows, heads_per_cb, hc, x, ring, is_v, m, M, nh_k, R, page_shift, page_nbytes,
                                   block_table, max_blocks, tok, slot_gen, status);
    };
    auto load = [](const AppendRow<DSUB, T>& row, float (&xs)[DSUB]) {
        const PqVec<T, DSUB> raw = row.page >= 0 ? *reinterpret_cast<const PqVec<T, DSUB>*>(row.src) : PqVec<T, DSUB>{};
#pragma unroll
        for (int j = 0; j < DSUB; ++j) xs[j] = to_float(raw.v[j]);
        return raw;
    };
    auto store_exact = [](const AppendRow<DSUB, T>& row, const PqVec<T, DSUB>& raw) {
        if (row.ring_slot != nullptr) *reinterpret_cast<PqVec<T, DSUB>*>(row.ring_slot) = raw;
    };
    const float* cent = (is_v ? v_cent : k_cent) + (static_cast<long long>(hc) * M + m) * (PQ_NUM_CENTROIDS * DSUB);

    if (warp_search) {
        // A few rows (a decode step): APPEND_LANES lanes per row, so a row costs 256 / APPEND_LANES centroids
        // per lane and a short reduction instead of a 256-centroid scan by one thread. A block takes
        // APPEND_THREADS / APPEND_LANES rows at a time; the next ones are read while these are searched.
        constexpr int GROUPS = APPEND_THREADS / APPEND_LANES;
        const long long stride = static_cast<long long>(gridDim.y) * GROUPS;
        long long i = static_cast<long long>(blockIdx.y) * GROUPS + threadIdx.x / APPEND_LANES;
        const bool leader = (threadIdx.x & (APPEND_LANES - 1)) == 0;  // writes its group's results
        AppendRow<DSUB, T> row = row_at(i);
        float xs[DSUB];
        {
            const PqVec<T, DSUB> raw = load(row, xs);
            if (leader) store_exact(row, raw);
            flag_non_finite<DSUB>(xs, status);
        }
        pq_load_codebook<DSUB>(cent, s_centroids, s_norms);
        // The loop runs while any row of the warp is live, so every lane takes part in the shuffles.
        for (long long first = i - threadIdx.x / APPEND_LANES % (32 / APPEND_LANES); first < rows; first += stride) {
            const AppendRow<DSUB, T> next = row_at(i + stride);
            float next_xs[DSUB];
            const PqVec<T, DSUB> next_raw = load(next, next_xs);
            if (leader) store_exact(next, next_raw);
            flag_non_finite<DSUB>(next_xs, status);
            const unsigned char code = pq_nearest_lanes<DSUB, APPEND_LANES>(xs, s_centroids, s_norms);
            if (leader && row.page >= 0) pages[row.dst] = code;
            i += stride;
            row = next;
#pragma unroll
            for (int j = 0; j < DSUB; ++j) xs[j] = next_xs[j];
        }
        return;
    }

    pq_load_codebook<DSUB>(cent, s_centroids, s_norms);
    const long long tile_rows = static_cast<long long>(APPEND_THREADS) * APPEND_ROWS;
    for (long long tile = blockIdx.y; tile * tile_rows < rows; tile += gridDim.y) {
        float xs[APPEND_ROWS][DSUB];
        long long dst[APPEND_ROWS];  // -1: nothing to write
#pragma unroll
        for (int r = 0; r < APPEND_ROWS; ++r) {
            const AppendRow<DSUB, T> row = row_at(tile * tile_rows + static_cast<long long>(r) * APPEND_THREADS + threadIdx.x);
            store_exact(row, load(row, xs[r]));
            flag_non_finite<DSUB>(xs[r], status);
            dst[r] = row.dst;
        }
        unsigned char code[APPEND_ROWS];
        pq_nearest_rows<DSUB, APPEND_ROWS>(xs, s_centroids, s_norms, code);
#pragma unroll
        for (int r = 0; r < APPEND_ROWS; ++r)
            if (dst[r] >= 0) pages[dst[r]] = code[r];
    }
}

template <typename T>
__global__ void __launch_bounds__(APPEND_THREADS)
append_exact_tokens(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_pages,
                    T* __restrict__ v_pages, long long page_stride, const int* __restrict__ block_table,
                    int max_blocks, const int4* __restrict__ tok, const int* __restrict__ slot_gen,
                    unsigned char* __restrict__ status, int n_tok, int nh_k, int D, int page_shift) {
  wait_for_previous_grid();
    constexpr int EPV = 16 / sizeof(T);  // elements per 16-byte vector
    const bool is_v = blockIdx.x != 0;
    const T* x = is_v ? v : k;
    T* pages = is_v ? v_pages : k_pages;
    const int vpr = D / EPV;  // vectors per (token, head) row
    const long long total = static_cast<long long>(n_tok) * nh_k * vpr;
    const int P = 1 << page_shift;
    for (long long i = static_cast<long long>(blockIdx.y) * APPEND_THREADS + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.y) * APPEND_THREADS) {
        const long long row = i / vpr;
        const int t = static_cast<int>(row / nh_k), h = static_cast<int>(row % nh_k);
        const int4 info = tok[t];  // slot, position, generation, (stays residual: unused)
        if (slot_gen[info.x] != info.z) {
            raise_flag(status, STATUS_STALE_SLOT);
            continue;
        }
        const int page = block_table[static_cast<long long>(info.x) * max_blocks + (info.y >> page_shift)];
        if (page < 0) {
            raise_flag(status, STATUS_NO_PAGE);
            continue;
        }
        const uint4 raw = reinterpret_cast<const uint4*>(x)[i];
        const T* vals = reinterpret_cast<const T*>(&raw);
        bool bad = false;
#pragma unroll
        for (int j = 0; j < EPV; ++j) bad |= !isfinite(to_float(vals[j]));
        if (bad) raise_flag(status, STATUS_NON_FINITE);
        const long long dst = static_cast<long long>(page) * page_stride +
                              (static_cast<long long>(h) * P + (info.y & (P - 1))) * D + (i % vpr) * EPV;
        *reinterpret_cast<uint4*>(pages + dst) = raw;
    }
}

__global__ void gather_page_table(const int* __restrict__ block_table, int max_blocks,
                                  const int* __restrict__ meta, int B, int* __restrict__ indices) {
  wait_for_previous_grid();
    const int b = blockIdx.x;
    const long long row = static_cast<long long>(meta[b]) * max_blocks;
    const int start = meta[B + b];
    const int count = meta[B + b + 1] - start;
    for (int j = threadIdx.x; j < count; j += blockDim.x) indices[start + j] = block_table[row + j];
}

__global__ void store_block_ids(int* __restrict__ block_table, int max_blocks, const int* __restrict__ meta, int B,
                                const int* __restrict__ ids) {
  wait_for_previous_grid();
    const int b = blockIdx.x;
    const long long row = static_cast<long long>(meta[b]) * max_blocks + meta[B + b];
    const int start = meta[2 * B + b];
    const int count = meta[2 * B + b + 1] - start;
    for (int j = threadIdx.x; j < count; j += blockDim.x) block_table[row + j] = ids[start + j];
}
