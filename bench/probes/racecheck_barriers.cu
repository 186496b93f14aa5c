// compute-sanitizer racecheck probe (bench/wgmma_barrier_check.py probe MODE): three warpgroups run rounds of
// {a wgmma over a shared B tile (mode & 2); a per-warpgroup barrier.cta.red.or (mode & 4)}, 2 rounds each or
// wgi + 1 (mode & 1), then __syncthreads, a write (by every fourth lane only with mode & 8; by the first warp of each
// warpgroup only with mode & 16, as the kernel's reference maxima are written), __syncthreads and a read of another
// warpgroup's entry: verify_attention_wgmma's ingredients around its final merge, race-free by construction, so
// racecheck should report 0 hazards for every mode (0-31).
#include <cuda_fp16.h>
extern "C" __global__ void __launch_bounds__(384, 1) k(int* out, int mode) {
  __shared__ __align__(128) unsigned char b_tile[32 * 16 * 2 * 8];
  __shared__ int t[384];
  const int tid = threadIdx.x;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wgi = warp >> 2;
  for (int e = tid; e < (int)sizeof(b_tile) / 4; e += 384) reinterpret_cast<int*>(b_tile)[e] = 0;
  __syncthreads();
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  const int n = (mode & 1) ? wgi + 1 : 2;
  const bool use_wgmma = mode & 2, use_red = mode & 4;
  float d[16];
  for (int i = 0; i < 16; ++i) d[i] = 0.f;
  const unsigned a[4] = {0u, 0u, 0u, 0u};
  const unsigned addr = (unsigned)__cvta_generic_to_shared(b_tile);
  const unsigned long long desc = (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(512 >> 4) << 16) |
                                  ((unsigned long long)(128 >> 4) << 32);
  int acc = 0;
  for (int i = 0; i < n; ++i) {
    if (use_wgmma) {
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, 1, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
                   "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                     "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    }
    if (use_red) {
      int r;
      asm volatile("{\n .reg .pred p, q;\n setp.ne.b32 p, %1, 0;\n barrier.cta.red.or.pred q, %2, 128, p;\n selp.b32 %0, 1, 0, q;\n}\n"
                   : "=r"(r) : "r"(tid & 1), "r"(1 + wgi) : "memory");
      acc += r;
    }
  }
  __syncthreads();
  const bool writer = (!(mode & 8) || (tid & 3) == 0) && (!(mode & 16) || (warp & 3) == 0);
  if (writer) t[tid] = tid * 2 + acc + (int)d[0];  // mode 8: lanes 0, 4, ..; mode 16: warps 0, 4 and 8
  __syncthreads();
  const int other = (tid + 128) % 384;  // the same lane of the next warpgroup (its first warp with mode 16)
  out[tid] = t[(mode & 16 ? (other & ~127) + (tid & 31) : other) & ~3];
}
