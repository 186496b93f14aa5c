// PROBE, not library code (bench/probe_verify_wgmma.py builds, checks and times it): verify attention's token loop
// on Hopper warpgroup MMA (wgmma, sm_90a), to decide whether that redesign takes issue 16's q = 8 at M = 32 under
// 2x the one-token decode. D = 128, M = 32 (4 dims per subspace), 32 query rows per kv head (q = 8 at GQA 4), fp16,
// every 64-token step full: no mask, no residual ring, no page table, probe code layouts, the partial states
// merged on the host. Each warpgroup is a token stream of 64-token steps:
//   S^T = K Q^T    (m64 tokens x n32 rows x k128 dims; A = gathered K centroids in registers, B = Q in shared memory)
//   O^T += V^T P^T (m64 dims (x2) x n32 rows x k64 tokens; A = gathered V centroids in registers, B = P in shared)
// so a lane holds 16 scores and 32 O values, not verify_attention's 128: three warpgroups (12 warps) fit an SM.
// The softmax's reference maxima are shared by the warpgroup: a step's scores are exponentiated against them, and
// one barrier with an OR reduction (barrier.red.or) both publishes P and says whether any score passed them by
// the slack; only then (rare after the first step) do the warps exchange their row maxima and rescale.
// ptxas serializes every wgmma of a kernel (a wait after each) on any of these, all met on the way here:
//   C7520 a wgmma in a path it thinks divergent: the warp index is taken from a shuffle of lane 0 (uniform);
//   C7514 / C7515 accumulators read / written by other instructions while a wgmma may run: no wgmma is in flight
//     across the loop's back edge (S^T overlaps the V gathers, P V the next step's K gathers, each then waited);
//   register operands reused under a running wgmma: keep() pins them live until the wait that ends it.
#include <cuda_fp16.h>

namespace probe {
constexpr int D = 128, M = 32, ROWS = 32, STEP = 64;
constexpr int K_REGION = 12, K_ROW = 48;                 // 8-byte entries (session 17's K table, two-word centroids)
constexpr int K_TABLE = 256 * K_ROW * 8;                 // 98,304 bytes
constexpr int V_TABLE = 256 * M * 8;                     // 65,536 bytes
constexpr int Q_BYTES = ROWS * D * 2;                    // 8,192 bytes
constexpr int P_BYTES_MAX = 8 * 528;                     // per buffer: 8 core-matrix columns LBO apart
constexpr float SLACK = 8.f;
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ unsigned long long desc(unsigned addr, int lbo, int sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
         ((unsigned long long)(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps a wgmma register operand live (and unmoved) up to here: after the wait that ends its MMA, so that ptxas does
// not reuse its registers while the MMA may still read them (which it would fence with a wait after every wgmma).
__device__ __forceinline__ void keep(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void keep(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void bar_sync(int id) { asm volatile("barrier.cta.sync %0, 128;" ::"r"(id) : "memory"); }
__device__ __forceinline__ bool bar_any(int id, bool pred) {
  int r;
  asm volatile("{\n .reg .pred p, q;\n setp.ne.b32 p, %1, 0;\n barrier.cta.red.or.pred q, %2, 128, p;\n"
               " selp.b32 %0, 1, 0, q;\n}\n"
               : "=r"(r) : "r"((int)pred), "r"(id) : "memory");
  return r != 0;
}
// d (64 x 32 f32 fragment) := A x B (wgmma_n32_first: the accumulator registers are only written, so no other
// instruction defines them in the MMA's stage) or += A x B (wgmma_n32); A in registers, B in shared memory (K-major,
// a descriptor).
#define PROBE_WGMMA_N32(NAME, OUT, SCALE_D)                                                                      \
  __device__ __forceinline__ void NAME(float(&d)[16], const unsigned(&a)[4], unsigned long long b) {             \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, " SCALE_D ", 0;\n"                                        \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "                                          \
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n" \
                 : OUT(d[0]), OUT(d[1]), OUT(d[2]), OUT(d[3]), OUT(d[4]), OUT(d[5]), OUT(d[6]), OUT(d[7]),        \
                   OUT(d[8]), OUT(d[9]), OUT(d[10]), OUT(d[11]), OUT(d[12]), OUT(d[13]), OUT(d[14]), OUT(d[15])   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));                                         \
  }
PROBE_WGMMA_N32(wgmma_n32_first, "=f", "0")
PROBE_WGMMA_N32(wgmma_n32, "+f", "1")
#undef PROBE_WGMMA_N32
__device__ __forceinline__ uint2 ldg_nc(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned ldg_nc(const unsigned* p) {
  unsigned v;
  asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
template <int OFF> __device__ __forceinline__ uint2 lds64(unsigned addr) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2+%3];" : "=r"(v.x), "=r"(v.y) : "r"(addr), "n"(OFF));
  return v;
}
__device__ __forceinline__ unsigned pack(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const unsigned*>(&h);
}
// B-operand tiles (Q and P, [n row][k]) K-major without swizzle: core matrices of 8 rows x 16 bytes, 4 per 8 k
// (one per 8 rows, SBO 128 bytes apart), 8-k groups LBO = 512 bytes apart.
__device__ __forceinline__ unsigned b_tile_offset(int n, int k) {
  return ((k >> 3) * 4 + (n >> 3)) * 128 + (n & 7) * 16 + (k & 7) * 2;
}
}  // namespace probe

using namespace probe;

// One warpgroup: D (64 x 32) = A (64 x 16, row-major) x B (16 x 32, [k][n]) through the same fragment and descriptor
// conventions as the probe, with LBO / SBO given, so the host can check them.
extern "C" __global__ void wgmma_selftest(const __half* A, const __half* B, float* Dout, int lbo, int sbo) {
  __shared__ __align__(128) unsigned char bs[16 * 32 * 2];
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, i4 = lane & 3;
  for (int idx = tid; idx < 16 * 32; idx += 128) {
    const int k = idx / 32, n = idx % 32;
    *reinterpret_cast<__half*>(bs + b_tile_offset(n, k)) = B[idx];
  }
  __syncthreads();
  fence_async_smem();
  auto pair = [&](int r, int c) {
    const __half2 h = __halves2half2(A[r * 16 + c], A[r * 16 + c + 1]);
    return *reinterpret_cast<const unsigned*>(&h);
  };
  const unsigned a[4] = {pair(16 * w + g, 2 * i4), pair(16 * w + g + 8, 2 * i4), pair(16 * w + g, 2 * i4 + 8),
                         pair(16 * w + g + 8, 2 * i4 + 8)};
  float d[16];
  for (int i = 0; i < 16; ++i) d[i] = 0.f;
  wg_fence();
  wgmma_n32_first(d, a, desc(smem_addr(bs), lbo, sbo));
  wg_commit();
  wg_wait<0>();
  for (int n8 = 0; n8 < 4; ++n8)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * w + g + (e >= 2 ? 8 : 0), c = 8 * n8 + 2 * i4 + (e & 1);
      Dout[r * 32 + c] = d[4 * n8 + e];
    }
}

// Inputs (probe layouts): q [unit][32 rows][128]; k_cb, v_cb [unit][256 codes][32 m][4] fp16; k_codes
// [unit][T][32]; v_codes [unit][T / 16][32 m][16 tokens]. Unit u's tokens [0, T) go to `splits` CTAs; warpgroup wg of
// a CTA takes steps wg, wg + NWG, ... Outputs per (CTA, warpgroup): part_o [.][32 rows][128] (unnormalized),
// part_m [.][32] (log2-domain reference max), part_l [.][4 warps][32].
template <int NWG, int P_LBO, int K_ROTATIONS>
__device__ __forceinline__ void verify_wgmma_body(
    const __half* __restrict__ q, const __half* __restrict__ k_cb, const __half* __restrict__ v_cb,
    const unsigned char* __restrict__ k_codes, const unsigned char* __restrict__ v_codes, int T, int splits,
    float scale_log2, float* __restrict__ part_o, float* __restrict__ part_m, float* __restrict__ part_l) {
  constexpr int NT = 128 * NWG;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* k_tab = smem;
  unsigned char* v_tab = smem + K_TABLE;
  unsigned char* q_s = v_tab + V_TABLE;
  unsigned char* p_s = q_s + Q_BYTES;                        // [wg][2][P_BYTES]
  float* red = reinterpret_cast<float*>(p_s + NWG * 2 * P_BYTES_MAX);  // [wg][4 warps][32 rows]
  const int tid = threadIdx.x, lane = tid & 31;
  // warp-uniform as far as the compiler knows (a shuffle from lane 0), so that the loops over a warpgroup's steps
  // are not divergent paths (ptxas serializes wgmma in those)
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0), wg = warp >> 2, w = warp & 3;
  const int g = lane >> 2, i4 = lane & 3;
  const int unit = blockIdx.x / splits, split = blockIdx.x % splits;
  const int t_begin = (int)((long long)T * split / splits), t_end = (int)((long long)T * (split + 1) / splits);

  // ---- tables: K [code][4 regions of 12 entries] (slot t of group m / 8 at t, slot 0 again at 8); V
  // [m / 4][code][m % 4]; Q^T as the S^T product's B tile, k order (kb, 2 i4 + e, + 8 half) = dim 4 (8 i4 + kb) + 2 half + e
  {
    const uint2* kc = reinterpret_cast<const uint2*>(k_cb) + (long long)unit * 256 * M;
    const uint2* vc = reinterpret_cast<const uint2*>(v_cb) + (long long)unit * 256 * M;
    uint2* kt = reinterpret_cast<uint2*>(k_tab);
    uint2* vt = reinterpret_cast<uint2*>(v_tab);
    for (int e = tid; e < 256 * M; e += NT) {
      const int c = e / M, m = e % M;
      const uint2 x = kc[e], y = vc[e];
      const int t = m & 7;
      kt[c * K_ROW + K_REGION * (m >> 3) + t] = x;
      if (t < K_ROTATIONS - 1) kt[c * K_ROW + K_REGION * (m >> 3) + 8 + t] = x;
      vt[((m >> 2) * 256 + c) * 4 + (m & 3)] = y;
    }
    const __half* qu = q + (long long)unit * ROWS * D;
    for (int e = tid; e < ROWS * D; e += NT) {
      const int n = e / D, d = e % D;
      const int m = d >> 2, i = m >> 3, kb = m & 7, half = (d & 3) >> 1, bit = d & 1;
      const int k = 8 * half + 2 * i + bit;
      *reinterpret_cast<__half*>(q_s + kb * 1024 + b_tile_offset(n, k)) = qu[e];
    }
  }
  __syncthreads();
  fence_async_smem();

  const int bar_id = 1 + wg;
  unsigned char* my_p = p_s + wg * 2 * P_BYTES_MAX;
  // S^T row g is token sigma(g) of the warp's 16, row g + 8 the next one, so that a lane's two scores of a row are
  // the adjacent k pair (2 g, 2 g + 1) of P^T; P^T's k order within 16 tokens puts tokens 4 i4 .. 4 i4 + 3 at the
  // V fragment's k = 2 i4, 2 i4 + 1, 2 i4 + 8, 2 i4 + 9.
  const int sigma = g < 4 ? 4 * g : 4 * (g - 4) + 2;
  static_assert(K_ROTATIONS == 2 || K_ROTATIONS == 4, "K_ROTATIONS");
  const int k_rot = g & (K_ROTATIONS - 1);
  const unsigned k_lane = smem_addr(k_tab) + (K_REGION * i4 + k_rot) * 8;
  const unsigned k_sel = 0x3210u + 0x1111u * (unsigned)k_rot;
  const int mv = 8 * w + g;  // V subspace of the lane
  const unsigned v_lane = smem_addr(v_tab) + (((mv >> 2) * 256) * 4 + (mv & 3)) * 8;
  const unsigned char* kcodes = k_codes + (long long)unit * T * M + 8 * i4;
  const unsigned char* vcodes = v_codes + (long long)unit * T * M + mv * 16 + 4 * i4;
  const unsigned q_base = smem_addr(q_s);

  float o[2][16];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 16; ++i) o[mt][i] = 0.f;
  float ref[8], lsum[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) ref[j] = NEG_INF, lsum[j] = 0.f;

  constexpr int SSTRIDE = NWG * STEP;
  int x0 = t_begin + wg * STEP;
  uint2 kcode[2];
  unsigned vcode[4];
  auto load_k_codes = [&](int x) {
    if (x >= t_end) return;
    const int t0 = x + 16 * w + sigma;
    kcode[0] = ldg_nc(reinterpret_cast<const uint2*>(kcodes + (long long)t0 * M));
    kcode[1] = ldg_nc(reinterpret_cast<const uint2*>(kcodes + (long long)(t0 + 1) * M));
  };
  auto load_v_codes = [&](int x) {
    if (x >= t_end) return;
#pragma unroll
    for (int kb = 0; kb < 4; ++kb)
      vcode[kb] = ldg_nc(reinterpret_cast<const unsigned*>(vcodes + (long long)((x >> 4) + kb) * M * 16));
  };
  // K fragments of the step whose codes are in kcode: slot (v + k_rot) mod 8 at gather v, rotated back
  unsigned ka[8][4];
  auto gather_k = [&]() {
#pragma unroll
    for (int tk = 0; tk < 2; ++tk) {
      const unsigned y0 = __byte_perm(kcode[tk].x, kcode[tk].y, k_sel), y1 = __byte_perm(kcode[tk].y, kcode[tk].x, k_sel);
      uint2 kf[8];
#define KG(V) kf[V] = lds64<8 * V>(k_lane + ((((V) < 4 ? y0 : y1) >> (8 * ((V) & 3))) & 255u) * (K_ROW * 8));
      KG(0) KG(1) KG(2) KG(3) KG(4) KG(5) KG(6) KG(7)
#undef KG
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint2 c = (k_rot & 1) ? kf[(s + 7) & 7] : kf[s];
        if constexpr (K_ROTATIONS == 4) {
          const uint2 c2 = (k_rot & 1) ? kf[(s + 5) & 7] : kf[(s + 6) & 7];
          c = (k_rot & 2) ? c2 : c;
        }
        ka[s][tk] = c.x;       // row g / g + 8, k 2 i4 .. : dims 4 m, 4 m + 1
        ka[s][2 + tk] = c.y;   // k 2 i4 + 8 .. : dims 4 m + 2, 4 m + 3
      }
    }
  };
  load_k_codes(x0);
  load_v_codes(x0);
  gather_k();
  int buf = 0;
  // No wgmma is in flight across the loop's back edge (ptxas serializes every wgmma of a kernel whose accumulators
  // are touched while one may be): S^T(i) runs under the V gathers, P V(i) under the K gathers of step i + 1.
  for (; x0 < t_end; x0 += SSTRIDE, buf ^= 1) {
    float s[16];
#pragma unroll
    for (int kb = 0; kb < 8; ++kb)
#pragma unroll
      for (int e = 0; e < 4; ++e) keep(ka[kb][e]);
    wg_fence();
#pragma unroll
    for (int kb = 0; kb < 8; ++kb) {
      const unsigned long long b = desc(q_base + kb * 1024, 512, 128);
      if (kb == 0) wgmma_n32_first(s, ka[kb], b); else wgmma_n32(s, ka[kb], b);
    }
    wg_commit();
    load_k_codes(x0 + SSTRIDE);
    unsigned va[2][4][4];
    // ---- V fragments: subspace mv of tokens 4 i4 .. 4 i4 + 3 of each 16-token block ----
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      uint2 c[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) c[u] = lds64<0>(v_lane + ((vcode[kb] >> (8 * u)) & 255u) * 32);
      va[0][kb][0] = __byte_perm(c[0].x, c[1].x, 0x5410);
      va[0][kb][1] = __byte_perm(c[0].x, c[1].x, 0x7632);
      va[0][kb][2] = __byte_perm(c[2].x, c[3].x, 0x5410);
      va[0][kb][3] = __byte_perm(c[2].x, c[3].x, 0x7632);
      va[1][kb][0] = __byte_perm(c[0].y, c[1].y, 0x5410);
      va[1][kb][1] = __byte_perm(c[0].y, c[1].y, 0x7632);
      va[1][kb][2] = __byte_perm(c[2].y, c[3].y, 0x5410);
      va[1][kb][3] = __byte_perm(c[2].y, c[3].y, 0x7632);
    }
    load_v_codes(x0 + SSTRIDE);
    wg_wait<0>();  // S^T
#pragma unroll
    for (int kb = 0; kb < 8; ++kb)
#pragma unroll
      for (int e = 0; e < 4; ++e) keep(ka[kb][e]);
#pragma unroll
    for (int i = 0; i < 16; ++i) keep(s[i]);

    // ---- softmax against the warpgroup's reference maxima; P^T into this step's buffer ----
    unsigned char* pb = my_p + buf * P_BYTES_MAX;
    const unsigned p_lane = (unsigned)((2 * i4) * 16 + (g & 3) * 4);
    const int kc = 2 * w + (g >> 2);
    bool exceed = false;
    float p[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int j = 2 * (i >> 2) + (i & 1);
      const float x = fmaf(s[i], scale_log2, -ref[j]);
      exceed |= x > SLACK;
      p[i] = exp2f(x);
    }
    auto store_p = [&]() {  // P^T's words (rows 8 n8 + 2 i4 + e, tokens sigma(g), sigma(g) + 1), made visible to wgmma
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          *reinterpret_cast<unsigned*>(pb + kc * P_LBO + n8 * 128 + p_lane + e * 16) =
              pack(p[4 * n8 + e], p[4 * n8 + 2 + e]);
      fence_async_smem();
    };
    store_p();
    if (bar_any(bar_id, exceed)) {
      float mx[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n8 = j >> 1, e = j & 1;
        mx[j] = fmaxf(s[4 * n8 + e], s[4 * n8 + 2 + e]);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], off));
      }
      float* my_red = red + wg * 4 * ROWS;
      if (g == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j) my_red[w * ROWS + 8 * (j >> 1) + 2 * i4 + (j & 1)] = mx[j];
      }
      bar_sync(bar_id);
      float alpha[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int r = 8 * (j >> 1) + 2 * i4 + (j & 1);
        const float m4 = fmaxf(fmaxf(my_red[r], my_red[ROWS + r]), fmaxf(my_red[2 * ROWS + r], my_red[3 * ROWS + r]));
        const float nr = fmaxf(ref[j], m4 * scale_log2);
        alpha[j] = exp2f(ref[j] - nr);
        ref[j] = nr;
        lsum[j] *= alpha[j];
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < 16; ++i) o[mt][i] *= alpha[2 * (i >> 2) + (i & 1)];
#pragma unroll
      for (int i = 0; i < 16; ++i) p[i] = exp2f(fmaf(s[i], scale_log2, -ref[2 * (i >> 2) + (i & 1)]));
      store_p();
      bar_sync(bar_id);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) lsum[2 * (i >> 2) + (i & 1)] += p[i];

    // ---- O^T += V^T P^T ----
    const unsigned pbase = smem_addr(pb);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 16; ++i) keep(o[mt][i]);  // the rescale's products stay before the stage opens
    wg_fence();
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        wgmma_n32(o[mt], va[mt][kb], desc(pbase + kb * 2 * P_LBO, P_LBO, 128));
      }
    wg_commit();
    if (x0 + SSTRIDE < t_end) gather_k();
    wg_wait<0>();  // P V
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kb = 0; kb < 4; ++kb)
#pragma unroll
        for (int e = 0; e < 4; ++e) keep(va[mt][kb][e]);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 16; ++i) keep(o[mt][i]);
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 16; ++i) keep(o[mt][i]);

  // ---- this warpgroup's state ----
  const long long part = (long long)blockIdx.x * NWG + wg;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = 8 * (i >> 2) + 2 * i4 + (i & 1);
      const int dim = 4 * mv + 2 * mt + ((i & 3) >= 2 ? 1 : 0);
      part_o[(part * ROWS + r) * D + dim] = o[mt][i];
    }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) lsum[j] += __shfl_xor_sync(0xffffffffu, lsum[j], off);
    const int r = 8 * (j >> 1) + 2 * i4 + (j & 1);
    if (g == 0) {
      part_l[(part * 4 + w) * ROWS + r] = lsum[j];
      if (w == 0) part_m[part * ROWS + r] = ref[j];
    }
  }
}

#define PROBE_ENTRY(NAME, NWG, P_LBO, KR)                                                                        \
  extern "C" __global__ void __launch_bounds__(128 * NWG, 1) NAME(                                             \
      const __half* q, const __half* k_cb, const __half* v_cb, const unsigned char* k_codes,                   \
      const unsigned char* v_codes, int T, int splits, float scale_log2, float* part_o, float* part_m,         \
      float* part_l) {                                                                                          \
    verify_wgmma_body<NWG, P_LBO, KR>(q, k_cb, v_cb, k_codes, v_codes, T, splits, scale_log2, part_o, part_m,      \
                                  part_l);                                                                      \
  }
// Three warpgroups (168 registers, a few words spilled) and two (189 registers). P's 8-token columns 528 bytes
// apart put a P store's two columns 4 banks apart (conflict-free; ncu counted 2.9-way conflicts on the P stores
// with 512), yet the two measured the same (H100, session 38): the gathers' loads, not P's stores, fill the pipe.
PROBE_ENTRY(verify_wgmma3, 3, 528, 2)
PROBE_ENTRY(verify_wgmma2, 2, 528, 2)
PROBE_ENTRY(verify_wgmma3_p512, 3, 512, 2)
// K gathers without bank conflicts: 4 rotations (slot group i4's regions sit 4 banks pairs apart, each lane of a
// half-warp on its own bank pair), for one more layer of selects rotating the centroids back
PROBE_ENTRY(verify_wgmma3_k4, 3, 512, 4)
PROBE_ENTRY(verify_wgmma2_k4, 2, 512, 4)
