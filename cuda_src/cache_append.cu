// PagedPQCache device helpers (million_cupy/cache.py launches them):
//
// ring_append<W>      the decode hot path: copies the new residual tokens of K and V into the
//                     per-layer residual rings in one launch.
//   k, v              (n_src, nh_k, row_words) words of type W, contiguous (the cache dtype viewed as W)
//   ring_k, ring_v    (max_seqs, nh_k, R, row_words) one layer's rings, contiguous
//   idx               int32 (3, n): ring row (sequence slot), ring slot, source token row of each copy
//   launch            1-D, any grid (grid-stride loop over n * nh_k * row_words words)
//   W is the widest of uint4 / uint2 / unsigned int / unsigned short that divides the row size
//   and the alignment of every base pointer (the caller picks it).
//
// gather_page_table   the CSR indices of PagedPQCache.page_table: one block per sequence copies
//                     the first (indptr[b+1] - indptr[b]) entries of its block-table row.
//   block_table       int32 (max_seqs, max_blocks) contiguous
//   meta              int32 (2B + 1): seq_ids (B) then indptr (B + 1)
//   indices           int32 (indptr[B])
//   launch            gridDim.x = B, any 1-D blockDim.x

template <typename W>
__global__ void ring_append(const W* __restrict__ k, const W* __restrict__ v, W* __restrict__ ring_k,
                            W* __restrict__ ring_v, const int* __restrict__ idx, int n, int nh_k, int R,
                            int row_words) {
    const long long per_token = static_cast<long long>(nh_k) * row_words;
    const long long total = per_token * n;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const int j = static_cast<int>(i / per_token);
        const long long within = i - j * per_token;  // = h * row_words + w
        const long long h = within / row_words;
        const long long w = within - h * row_words;
        const long long seq = idx[j];
        const long long slot = idx[n + j];
        const long long src = idx[2 * n + j];
        const long long dst = ((seq * nh_k + h) * R + slot) * row_words + w;
        const long long from = src * per_token + within;
        ring_k[dst] = k[from];
        ring_v[dst] = v[from];
    }
}

__global__ void gather_page_table(const int* __restrict__ block_table, int max_blocks,
                                  const int* __restrict__ meta, int B, int* __restrict__ indices) {
    const int b = blockIdx.x;
    const long long row = static_cast<long long>(meta[b]) * max_blocks;
    const int start = meta[B + b];
    const int count = meta[B + b + 1] - start;
    for (int j = threadIdx.x; j < count; j += blockDim.x) indices[start + j] = block_table[row + j];
}
