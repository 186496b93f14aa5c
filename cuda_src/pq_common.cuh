// Shared product-quantization device helpers: element conversion, sub-vector loads,
// per-subspace codebook staging in shared memory, and the nearest-centroid search.
//
// Self-contained (only CUDA's fp16/bf16 headers) so every kernel that quantizes
// (pq_encode.cu, the cache flush) includes it and produces the same codes.
//
// Numerics: distances are ||c||^2 - 2 x.c in fp32 (||x||^2 is the same for every
// centroid and is dropped). Against the float64 reference (sum((x - c)^2)) this can
// pick a different centroid only on near-ties, where the two distances differ by
// about fp32 rounding of ||x||^2 + ||c||^2; the chosen centroid is then still
// nearest up to that rounding. Ties in the computed distance go to the lowest index and
// a NaN sub-vector gets code 0, both as in the reference (numpy argmin).
#ifndef MILLION_CUPY_PQ_COMMON_CUH
#define MILLION_CUPY_PQ_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// 8-bit codes: every codebook has exactly 256 centroids per subspace.
constexpr int PQ_NUM_CENTROIDS = 256;

// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic-stream-serialization attribute
// (kernels.BoundLaunch, MILLION_CUPY_PDL=1) is scheduled while the previous kernel of its stream is still running,
// so that its launch and block dispatch overlap that kernel's tail; every kernel here therefore opens with this
// call, before any memory access: it waits until the previous grid has completed and its writes are visible,
// then lets the next kernel be scheduled in turn (only after the wait, so that a kernel launched early never
// overlaps the grid before the previous one). Without the attribute, or below sm_90, both are no-ops.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// N elements of T read as one aligned access (at most 16 bytes of alignment, so
// 32-byte float8 sub-vectors become two 16-byte loads).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) PqVec {
    T v[N];
};

// Load DSUB consecutive elements of type T starting at p, converted to float.
// p must be aligned to min(16, DSUB * sizeof(T)) bytes: true for any sub-vector of a
// row of d = M * DSUB elements when the row starts 16-byte aligned.
template <int DSUB, typename T>
__device__ __forceinline__ void pq_load_subvector(const T* __restrict__ p, float (&x)[DSUB]) {
    const PqVec<T, DSUB> v = *reinterpret_cast<const PqVec<T, DSUB>*>(p);
#pragma unroll
    for (int j = 0; j < DSUB; ++j) x[j] = to_float(v.v[j]);
}

// One centroid from shared memory: a single vector load where DSUB allows (every
// thread reads the same address, so these are broadcasts, free of bank conflicts).
template <int DSUB>
__device__ __forceinline__ void pq_load_centroid(const float* __restrict__ p, float (&c)[DSUB]) {
    static_assert(DSUB == 1 || DSUB == 2 || DSUB == 4 || DSUB == 8, "dsub must be 1, 2, 4 or 8");
    if constexpr (DSUB % 4 == 0) {
#pragma unroll
        for (int k = 0; k < DSUB / 4; ++k) {
            const float4 v = reinterpret_cast<const float4*>(p)[k];
            c[4 * k + 0] = v.x;
            c[4 * k + 1] = v.y;
            c[4 * k + 2] = v.z;
            c[4 * k + 3] = v.w;
        }
    } else if constexpr (DSUB == 2) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        c[0] = v.x;
        c[1] = v.y;
    } else {
        c[0] = p[0];
    }
}

// Stage one subspace's codebook in shared memory: s_centroids[c * DSUB + j] = centroids[c * DSUB + j]
// and s_norms[c] = ||centroid c||^2 (fp32). `centroids` points at that subspace's C x DSUB float32
// block in global memory (any 4-byte alignment). s_centroids must be 16-byte aligned
// (declare it `__shared__ __align__(16) float s[PQ_NUM_CENTROIDS * DSUB]`).
// Every thread of the block must call it (any block shape); it ends with __syncthreads().
template <int DSUB>
__device__ __forceinline__ void pq_load_codebook(const float* __restrict__ centroids,
                                                 float* __restrict__ s_centroids,
                                                 float* __restrict__ s_norms) {
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nthreads = blockDim.x * blockDim.y * blockDim.z;
    for (int c = tid; c < PQ_NUM_CENTROIDS; c += nthreads) {
        float norm = 0.f;
#pragma unroll
        for (int j = 0; j < DSUB; ++j) {
            const float v = centroids[c * DSUB + j];
            s_centroids[c * DSUB + j] = v;
            norm = fmaf(v, v, norm);
        }
        s_norms[c] = norm;
    }
    __syncthreads();
}

// Nearest centroid of ROWS sub-vectors at once (each shared-memory centroid read is reused
// ROWS times, which is what keeps the search ALU-bound rather than LDS-bound).
// dist = ||c||^2 + sum_j (-2 x_j) c_j, an fp32 FMA chain; -2x is exact, so this is
// ||c||^2 - 2 x.c with one rounding per term. Strict `<` in index order: ties and NaN keep the
// lowest index. s_centroids / s_norms as filled by pq_load_codebook.
template <int DSUB, int ROWS>
__device__ __forceinline__ void pq_nearest_rows(const float (&x)[ROWS][DSUB],
                                                const float* __restrict__ s_centroids,
                                                const float* __restrict__ s_norms,
                                                unsigned char (&code)[ROWS]) {
    float xm2[ROWS][DSUB];
    float best[ROWS];
    int best_idx[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int j = 0; j < DSUB; ++j) xm2[r][j] = -2.f * x[r][j];
        best[r] = __int_as_float(0x7f800000);  // +inf
        best_idx[r] = 0;
    }
#pragma unroll 4
    for (int c = 0; c < PQ_NUM_CENTROIDS; ++c) {
        float cv[DSUB];
        pq_load_centroid<DSUB>(s_centroids + c * DSUB, cv);
        const float norm = s_norms[c];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float dist = norm;
#pragma unroll
            for (int j = 0; j < DSUB; ++j) dist = fmaf(xm2[r][j], cv[j], dist);
            if (dist < best[r]) {
                best[r] = dist;
                best_idx[r] = c;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) code[r] = static_cast<unsigned char>(best_idx[r]);
}

// Nearest centroid of one sub-vector searched by a group of LANES consecutive lanes of a warp (LANES in
// {2, 4, 8, 16, 32}; every lane of the warp calls it, each group with its own x): lane l of a group scans
// centroids l, l + LANES, ..., then the group's bests are reduced lexicographically on (distance, index).
// Each distance is computed exactly as in pq_nearest_rows and the reduction keeps the lowest index among
// equal distances (NaN never wins), so the code is the one pq_nearest_rows gives, at a fraction of its
// latency: for encoding a few rows at once (a decode step's new tokens). Every lane gets its group's code.
template <int DSUB, int LANES>
__device__ __forceinline__ unsigned char pq_nearest_lanes(const float (&x)[DSUB],
                                                          const float* __restrict__ s_centroids,
                                                          const float* __restrict__ s_norms) {
    static_assert(LANES >= 2 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "LANES: a power of two in [2, 32]");
    const int lane = threadIdx.x & (LANES - 1);
    float xm2[DSUB];
#pragma unroll
    for (int j = 0; j < DSUB; ++j) xm2[j] = -2.f * x[j];
    float best = __int_as_float(0x7f800000);  // +inf
    int best_idx = 0;
#pragma unroll 8
    for (int k = 0; k < PQ_NUM_CENTROIDS / LANES; ++k) {
        const int c = lane + LANES * k;
        float cv[DSUB];
        pq_load_centroid<DSUB>(s_centroids + c * DSUB, cv);
        float dist = s_norms[c];
#pragma unroll
        for (int j = 0; j < DSUB; ++j) dist = fmaf(xm2[j], cv[j], dist);
        if (dist < best) {
            best = dist;
            best_idx = c;
        }
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, best, off);
        const int other_idx = __shfl_xor_sync(0xffffffffu, best_idx, off);
        if (other < best || (other == best && other_idx < best_idx)) {
            best = other;
            best_idx = other_idx;
        }
    }
    return static_cast<unsigned char>(best_idx);
}

// Nearest centroid of one sub-vector (see pq_nearest_rows).
template <int DSUB>
__device__ __forceinline__ unsigned char pq_nearest(const float (&x)[DSUB],
                                                    const float* __restrict__ s_centroids,
                                                    const float* __restrict__ s_norms) {
    float rows[1][DSUB];
#pragma unroll
    for (int j = 0; j < DSUB; ++j) rows[0][j] = x[j];
    unsigned char code[1];
    pq_nearest_rows<DSUB, 1>(rows, s_centroids, s_norms, code);
    return code[0];
}

#endif  // MILLION_CUPY_PQ_COMMON_CUH
