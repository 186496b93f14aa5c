// Attention states of several ranks merged into one (million_cupy.parallel): each rank attended over its own
// disjoint share of the keys (a sequence's segment) and the all-gather brought every rank's partial state here.
// One thread per output element: the ranks' lse values of its row give the weights exp(lse_r - max), so the
// merge is one launch after the exchange instead of a dozen array operations (which cost more host time than the
// exchange itself).
//
// packed: `size` rank blocks of `stride` bytes; a block holds the rank's outputs (rows x d values of T, rows =
// batch x heads) and then its natural-log lse (rows floats, -inf where the rank holds none of a sequence; its
// outputs there are ignored).
#include "decode_common.cuh"

namespace mc {
namespace parallel {

#define kMergeNegInf (-__int_as_float(0x7f800000))  // NVRTC has no INFINITY without the host headers

template <typename T>
__global__ void merge_rank_states(const unsigned char* __restrict__ packed, long long stride, int size, int rows,
                                  int d, T* __restrict__ out, float* __restrict__ lse_out) {
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

}  // namespace parallel
}  // namespace mc
