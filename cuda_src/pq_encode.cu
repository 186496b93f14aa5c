// Product-quantization encoder: codes[row, m] = nearest centroid of x[row, m*DSUB : (m+1)*DSUB].
//
// Interface (million_cupy.codebook.encode launches it; other modules may too):
//   x          (n_rows, d) rows of T (float, __half, __nv_bfloat16), contiguous, d = M * DSUB,
//              base 16-byte aligned
//   centroids  float32 (num_heads, M, 256, DSUB) contiguous; row r uses codebook r % num_heads
//              (rows laid out (..., num_heads, d) with per-kv-head codebooks; num_heads = 1 shares one)
//   codes      uint8 (n_rows, M); n_rows must be a multiple of num_heads
//   launch     blockDim.x = PQ_ENCODE_THREADS (1-D), gridDim.x = M * num_heads * k for any k >= 1
//              (blocks stride over row tiles, so any k is correct; ceil(rows / tile) is fastest)
//
// Block b works on subspace m = b % M of head (b / M) % num_heads, so the M blocks that read the
// same rows run next to each other and x streams from DRAM about once (the other M - 1 reads of
// each sector hit L2). The block stages that subspace's 256 centroids in shared memory once,
// then each thread quantizes PQ_ENCODE_ROWS rows per tile.
#include "pq_common.cuh"

constexpr int PQ_ENCODE_THREADS = 128;
constexpr int PQ_ENCODE_ROWS = 4;

template <int DSUB, typename T>
__global__ void __launch_bounds__(PQ_ENCODE_THREADS)
pq_encode(const T* __restrict__ x, const float* __restrict__ centroids, unsigned char* __restrict__ codes,
          long long n_rows, int M, int num_heads) {
    wait_for_previous_grid();
    __shared__ __align__(16) float s_centroids[PQ_NUM_CENTROIDS * DSUB];
    __shared__ float s_norms[PQ_NUM_CENTROIDS];

    const int m = static_cast<int>(blockIdx.x % static_cast<unsigned>(M));
    const int head = static_cast<int>((blockIdx.x / static_cast<unsigned>(M)) % static_cast<unsigned>(num_heads));
    const unsigned blocks_per_tile = static_cast<unsigned>(M) * static_cast<unsigned>(num_heads);
    pq_load_codebook<DSUB>(centroids + (static_cast<long long>(head) * M + m) * (PQ_NUM_CENTROIDS * DSUB),
                           s_centroids, s_norms);

    const long long rows_per_head = n_rows / num_heads;
    const long long d = static_cast<long long>(M) * DSUB;
    const long long tile_rows = static_cast<long long>(blockDim.x) * PQ_ENCODE_ROWS;
    const unsigned tile_stride = max(gridDim.x / blocks_per_tile, 1u);  // never 0, even on a short grid
    for (long long tile = blockIdx.x / blocks_per_tile; tile * tile_rows < rows_per_head; tile += tile_stride) {
        float xs[PQ_ENCODE_ROWS][DSUB];
        long long row[PQ_ENCODE_ROWS];
#pragma unroll
        for (int r = 0; r < PQ_ENCODE_ROWS; ++r) {
            // Lanes of a warp take consecutive rows of the same head.
            const long long k = tile * tile_rows + static_cast<long long>(r) * blockDim.x + threadIdx.x;
            row[r] = k < rows_per_head ? k * num_heads + head : -1;
            if (row[r] >= 0) {
                pq_load_subvector<DSUB>(x + row[r] * d + m * DSUB, xs[r]);
            } else {
#pragma unroll
                for (int j = 0; j < DSUB; ++j) xs[r][j] = 0.f;
            }
        }
        unsigned char code[PQ_ENCODE_ROWS];
        pq_nearest_rows<DSUB, PQ_ENCODE_ROWS>(xs, s_centroids, s_norms, code);
#pragma unroll
        for (int r = 0; r < PQ_ENCODE_ROWS; ++r) {
            if (row[r] >= 0) codes[row[r] * M + m] = code[r];
        }
    }
}
