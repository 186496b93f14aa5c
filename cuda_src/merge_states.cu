// The ranks' attention states after the all-gather, put together in one launch (million_cupy.parallel).
// Sequence parallel, merge_rank_states: each rank attended over its own disjoint share of the keys (a
// sequence's segment), so the states are merged. Head parallel, assemble_rank_heads: each rank attended with its
// own heads, so its outputs go to their heads' places in the model's order. Each is one launch after the
// exchange instead of a dozen array operations (which cost more host time than the exchange itself).
//
// packed: `size` rank blocks of `stride` bytes; a block holds the rank's outputs (rows x d values of T, rows =
// batch x heads) and then its natural-log lse (rows floats, -inf where the rank holds none of a sequence; its
// outputs there are ignored).
#include "decode_common.cuh"

namespace mc {
namespace parallel {

#define kMergeNegInf (-__int_as_float(0x7f800000))  // NVRTC has no INFINITY without the host headers

// One thread per output element: the ranks' lse values of its row give the weights exp(lse_r - max).
template <typename T>
__global__ void merge_rank_states(const unsigned char* __restrict__ packed, long long stride, int size, int rows,
                                  int d, T* __restrict__ out, float* __restrict__ lse_out) {
  wait_for_previous_grid();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long long)rows * d) return;
  const int row = (int)(i / d);
  const long long lse_at = (long long)rows * d * sizeof(T);
  float mx = kMergeNegInf;
  for (int r = 0; r < size; ++r)
    mx = fmaxf(mx, reinterpret_cast<const float*>(packed + r * stride + lse_at)[row]);
  float wsum = 0.f, acc = 0.f;
  if (mx != kMergeNegInf) {
    for (int r = 0; r < size; ++r) {
      const float w = expf(reinterpret_cast<const float*>(packed + r * stride + lse_at)[row] - mx);
      if (w > 0.f) {  // a rank over no keys adds nothing, whatever its output holds
        wsum += w;
        acc = fmaf(w, to_float(reinterpret_cast<const T*>(packed + r * stride)[i]), acc);
      }
    }
  }
  out[i] = from_float<T>(wsum > 0.f ? acc / wsum : 0.f);
  if (i % d == 0) lse_out[row] = wsum > 0.f ? mx + logf(wsum) : kMergeNegInf;
}

// Head parallel: rank r's block (the layout above with rows = batch x per) holds heads r * per .. r * per + per
// - 1; out (batch x size * per x d) and lse_out (batch x size * per) take them in the model's head order. One
// thread per output element. Four array copies and two transposes did this before: 2 x H200, batch 8, host time
// to issue a step 2.71 -> 0.63 ms (8 layers, 1M tokens) and 7.6 -> 3.5 ms (32 layers, 32K tokens; with the
// cheaper bookkeeping of that change).
template <typename T>
__global__ void assemble_rank_heads(const unsigned char* __restrict__ packed, long long stride, int size, int batch,
                                    int per, int d, T* __restrict__ out, float* __restrict__ lse_out) {
  wait_for_previous_grid();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int heads = size * per;
  if (i >= (long long)batch * heads * d) return;
  const int e = (int)(i % d);
  const long long row = i / d;  // (b, head)
  const int head = (int)(row % heads), b = (int)(row / heads);
  const int r = head / per, h = head % per;
  const unsigned char* block = packed + r * stride;
  const long long local_row = (long long)b * per + h;
  out[i] = reinterpret_cast<const T*>(block)[local_row * d + e];
  if (e == 0) lse_out[row] = reinterpret_cast<const float*>(block + (long long)batch * per * d * sizeof(T))[local_row];
}

}  // namespace parallel
}  // namespace mc
