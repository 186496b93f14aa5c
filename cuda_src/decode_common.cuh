// Shared pieces of the decode-attention kernels: dtype conversion, vector loads,
// and the split-K state merge (FlashDecoding's log-sum-exp combine).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace mc {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Convert 16 bytes holding 16 / sizeof(T) values of T to floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* f) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 16 / (int)sizeof(T); ++i) f[i] = to_float(e[i]);
}

// N bytes (N >= 8, a multiple of 8; src aligned to min(N, 16)) from global memory into 32-bit words.
template <int N>
__device__ __forceinline__ void load_code_bytes(unsigned int* w, const unsigned char* __restrict__ src) {
  if constexpr (N >= 16) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);
      w[4 * i + 0] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else {
    static_assert(N == 8, "code chunks are at least 8 bytes");
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    w[0] = v.x; w[1] = v.y;
  }
}

// Byte k (compile-time after unrolling) of a word array.
__device__ __forceinline__ unsigned int code_byte(const unsigned int* w, int k) {
  return __byte_perm(w[k >> 2], 0u, 0x4440u | (unsigned)(k & 3));
}

// Byte k shifted left by 8, in the same single byte-permute instruction.
__device__ __forceinline__ unsigned int code_byte_shl8(const unsigned int* w, int k) {
  return __byte_perm(w[k >> 2], 0u, 0x4404u | ((unsigned)(k & 3) << 4));
}

}  // namespace mc
