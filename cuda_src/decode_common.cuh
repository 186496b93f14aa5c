// Shared pieces of the decode-attention kernels: dtype conversion, fast exp2, async copies and vector
// loads of codes and values. Element conversion and sub-vector loads come from pq_common.cuh.
#pragma once
#include "pq_common.cuh"

namespace mc {

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 2^x with the hardware approximation (2 ulp; -inf gives +0): the softmax exponentials, whose inputs are
// differences from a running max (<= 0), need no range handling.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte global -> shared copy that does not pass through registers (sm_80+), and the wait for all of a
// thread's copies.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// A hint to bring the 128-byte line holding p into L2 (no register, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Loads from a 32-bit shared-window address. Table lookups computed this way compile to
// LDS [offset + uniform base] with no per-lookup add of the shared window's base (which sm_90 generic
// shared pointers carry in a register). volatile keeps them after the barrier that publishes the tables.
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}
template <int N>
__device__ __forceinline__ void lds_words(unsigned int addr, unsigned int (&w)[N]) {
  static_assert(N == 1 || N == 2 || N == 4, "1, 2 or 4 words");
  if constexpr (N == 1) {
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(w[0]) : "r"(addr));
  } else if constexpr (N == 2) {
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "r"(addr));
  } else {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(addr));
  }
}
__device__ __forceinline__ unsigned short lds_u16(unsigned int addr) {
  unsigned short v;
  asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}

// The vector type of BYTES bytes (8 or 16).
template <int BYTES> struct VecOf;
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

// Whether this CTA is the last of a split unit's `splits` CTAs to arrive, for every thread of the CTA; call it after
// the CTA's partial-state writes. The barrier orders every thread's writes before thread 0's release (releases are
// cumulative; CUTLASS's split-K semaphore relies on the same), and thread 0's acquire plus the second barrier order
// the last CTA's reads after every other split's release: no per-thread fences. `flag`: a shared int the call may
// overwrite. The last CTA sets *counter back to 0 once it is done with it (ready for the next launch and CUDA-graph
// replays). FLAG_BARRIERS: barriers between the flag's write and its reads; one orders them, and a kernel that
// compute-sanitizer racecheck misreads across one takes two (verify_attention_wgmma, see there).
template <int FLAG_BARRIERS = 1>
__device__ __forceinline__ bool last_split_to_arrive(int* counter, int splits, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int done;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(done) : "l"(counter) : "memory");
    *flag = done == splits - 1;
  }
#pragma unroll
  for (int i = 0; i < FLAG_BARRIERS; ++i) __syncthreads();
  return *flag;
}

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

// (byte k << 8) | low for low < 256, still one byte-permute (low's byte 1 supplies the zero high bytes).
__device__ __forceinline__ unsigned int code_byte_shl8_or(const unsigned int* w, int k, unsigned int low) {
  return __byte_perm(w[k >> 2], low, 0x5504u | ((unsigned)(k & 3) << 4));
}

}  // namespace mc
