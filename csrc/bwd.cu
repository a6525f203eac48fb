// Backward: dq, then dk/dv of the own keys, then the batch-summed prefix gradient.
//
// Flash-attention-2 style recomputation from the forward's lse, without atomics: every
// output element is written by exactly one block in a fixed order, so the backward is
// bitwise deterministic. The prefix gradient is summed over the batch inside the kernel:
// block (key tile, KV head, split s) walks sequences s, s + splits, ... and writes one fp32
// partial [splits, Hkv, P, D]; the bindings add the partials in a fixed order.
#include "common.cuh"


namespace reasoncache {
using namespace nvcuda;

// o1 = a1 (16 x D) b1^T and o2 = a2 b2^T against the 64 rows of b1, b2: [16, 64] fp32 each
// (scores and their gradient dP, from the same tiles).
template <typename T, int D>
__device__ __forceinline__ void score_pair(const T* a1, const T* b1, float* o1, const T* a2, const T* b2, float* o2) {
  for (int nb = 0; nb < 4; ++nb) {
    AccFrag s, dp;
    wmma::fill_fragment(s, 0.f);
    wmma::fill_fragment(dp, 0.f);
    mma_rows<T, D / 16, wmma::col_major>(s, a1, D, b1 + nb * 16 * D, D, 16);
    mma_rows<T, D / 16, wmma::col_major>(dp, a2, D, b2 + nb * 16 * D, D, 16);
    wmma::store_matrix_sync(o1 + nb * 16, s, 64, wmma::mem_row_major);
    wmma::store_matrix_sync(o2 + nb * 16, dp, 64, wmma::mem_row_major);
  }
}

template <typename T, int D>
struct BwdSmem {
  // 4 [64, D] tiles in T, two [64, 64] fp32 score tiles, two [64, 64] T tiles, lse and delta
  static constexpr size_t kBytes =
      sizeof(T) * (4 * 64 * D + 2 * 64 * 64) + sizeof(float) * (2 * 64 * 64 + 2 * 64);
  static_assert(2 * 64 * 64 >= 64 * D, "the fp32 score tiles double as the output staging tile");
};

// Rows of [64, D] at the row-major address base + r * D, for r < rows; zero beyond.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int rows) {
  load_tile<T, D, 64>(dst, src, rows, D);
}

// Shared memory of both backward kernels: four [64, D] tiles, two [64, 64] tiles in T,
// two [64, 64] fp32 score tiles (later the fp32 staging tile of the output), lse and delta.
template <typename T, int D>
struct BwdTiles {
  T *t0, *t1, *t2, *t3, *h0, *h1;
  float *f0, *f1, *lse, *delta;
  __device__ __forceinline__ explicit BwdTiles(unsigned char* smem) {
    t0 = reinterpret_cast<T*>(smem);
    t1 = t0 + 64 * D;
    t2 = t1 + 64 * D;
    t3 = t2 + 64 * D;
    h0 = t3 + 64 * D;
    h1 = h0 + 64 * 64;
    f0 = reinterpret_cast<float*>(h1 + 64 * 64);
    f1 = f0 + 64 * 64;
    lse = f1 + 64 * 64;
    delta = lse + 64;
  }
};

// lse (log2 domain; +inf for a row that sees nothing, so its p is 0) and delta of 64 rows.
__device__ __forceinline__ void load_row_stats(float* sLse, float* sDelta, const BwdParams& p, int64_t qrow,
                                               int nrows) {
  for (int r = threadIdx.x; r < 64; r += kThreads) {
    const float l = r < nrows ? p.lse[qrow + r] : -INFINITY;
    sLse[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    sDelta[r] = r < nrows ? p.delta[qrow + r] : 0.f;
  }
}

// ---------------------------------------------------------------- dq
// grid (B * Hq, q tiles). Warp w owns query rows 16w..16w+15 and accumulates their dq.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  RC_DYNAMIC_SMEM(smem);
  const BwdTiles<T, D> sm(smem);
  T *sQ = sm.t0, *sdO = sm.t1, *sK = sm.t2, *sV = sm.t3, *sdS = sm.h0;  // sdS: [64 rows, 64 keys]
  float *sS = sm.f0, *sdP = sm.f1, *sLse = sm.lse, *sDelta = sm.delta;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.Hq / p.Hkv;
  const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hkv = h / G;
  const int m0 = blockIdx.y * 64, nrows = min(64, p.Nq - m0);
  const int64_t qrow = (int64_t(b) * p.Hq + h) * p.Nq + m0;
  load_rows<T, D>(sQ, static_cast<const T*>(p.q) + qrow * D, nrows);
  load_rows<T, D>(sdO, static_cast<const T*>(p.dout) + qrow * D, nrows);
  load_row_stats(sLse, sDelta, p, qrow, nrows);
  AccFrag acc[D / 16];
#pragma unroll
  for (int db = 0; db < D / 16; ++db) wmma::fill_fragment(acc[db], 0.f);
  const int lr = lane >> 1, half_ = lane & 1, wr = warp * 16 + lr, ri = m0 + wr;

  auto tile = [&](const T* ksrc, const T* vsrc, int n, bool own, int n0, const uint8_t* kpm_row) {
    __syncthreads();
    load_rows<T, D>(sK, ksrc, n);
    load_rows<T, D>(sV, vsrc, n);
    __syncthreads();
    score_pair<T, D>(sQ + warp * 16 * D, sK, sS + warp * 16 * 64, sdO + warp * 16 * D, sV, sdP + warp * 16 * 64);
    __syncwarp();
    for (int c = half_ * 32; c < half_ * 32 + 32; ++c) {
      const bool ok = wr < nrows && c < n && (!own || own_visible(ri, n0 + c, p.Nq, p.Nk, p.causal, p.window, kpm_row));
      const float pr = ok ? exp2f(sS[wr * 64 + c] * p.scale_log2 - sLse[wr]) : 0.f;
      sdS[wr * 64 + c] = from_float<T>(pr * (sdP[wr * 64 + c] - sDelta[wr]));
    }
    __syncwarp();
#pragma unroll
    for (int db = 0; db < D / 16; ++db)
      mma_rows<T, 4, wmma::row_major>(acc[db], sdS + warp * 16 * 64, 64, sK + db * 16, D, 16 * D);
  };

  if (p.P > 0) {
    const T* pk = static_cast<const T*>(p.pk) + int64_t(hkv) * p.P * D;
    const T* pv = static_cast<const T*>(p.pv) + int64_t(hkv) * p.P * D;
    for (int n0 = 0; n0 < p.P; n0 += 64) tile(pk + n0 * D, pv + n0 * D, min(64, p.P - n0), false, 0, nullptr);
  }
  {
    const int64_t base = (int64_t(b) * p.Hkv + hkv) * p.Nk * D;
    const uint8_t* kpm_row = p.kpm ? p.kpm + int64_t(b) * p.Nk : nullptr;
    int lo = 0, hi = p.Nk;
    if (p.causal) {
      hi = min(hi, m0 + nrows - 1 + p.Nk - p.Nq + 1);
      if (p.window > 0) lo = max(lo, m0 + p.Nk - p.Nq - p.window + 1);
    }
    for (int n0 = lo; n0 < hi; n0 += 64)
      tile(static_cast<const T*>(p.k) + base + int64_t(n0) * D, static_cast<const T*>(p.v) + base + int64_t(n0) * D,
           min(64, hi - n0), true, n0, kpm_row);
  }

  __syncthreads();  // the score tiles become the fp32 staging tile for dq
  float* stage = sS;
#pragma unroll
  for (int db = 0; db < D / 16; ++db) {
    for (int t = 0; t < acc[db].num_elements; ++t) acc[db].x[t] *= p.scale;
    wmma::store_matrix_sync(stage + warp * 16 * D + db * 16, acc[db], D, wmma::mem_row_major);
  }
  __syncwarp();
  if (wr < nrows) {
    T* dq = static_cast<T*>(p.dq) + (qrow + wr) * D;
    for (int c = half_ * (D / 2); c < (half_ + 1) * (D / 2); ++c) dq[c] = from_float<T>(stage[wr * D + c]);
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------- dk, dv (own keys and prefix)
// Own keys: grid (B * Hkv, key tiles), one sequence per block, writes dk / dv.
// Prefix:   grid (splits * Hkv, prefix tiles), sequences split, split + splits, ...,
//           writes fp32 partials. Warp w owns keys 16w..16w+15 of the 64-key tile.
template <typename T, int D, bool kPrefix>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  RC_DYNAMIC_SMEM(smem);
  const BwdTiles<T, D> sm(smem);
  T *sK = sm.t0, *sV = sm.t1, *sQ = sm.t2, *sdO = sm.t3, *sPt = sm.h0, *sdSt = sm.h1;  // [64 keys, 64 rows]
  float *sSt = sm.f0, *sdPt = sm.f1, *sLse = sm.lse, *sDelta = sm.delta;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int G = p.Hq / p.Hkv;
  const int outer = blockIdx.x / p.Hkv, hkv = blockIdx.x % p.Hkv;  // outer: batch (own) or split (prefix)
  const int n0 = blockIdx.y * 64;
  const int nkeys = kPrefix ? p.P : p.Nk;
  const int n = min(64, nkeys - n0);
  const int64_t kbase = kPrefix ? (int64_t(hkv) * p.P + n0) * D : ((int64_t(outer) * p.Hkv + hkv) * p.Nk + n0) * D;
  load_rows<T, D>(sK, static_cast<const T*>(kPrefix ? p.pk : p.k) + kbase, n);
  load_rows<T, D>(sV, static_cast<const T*>(kPrefix ? p.pv : p.v) + kbase, n);

  AccFrag dk[D / 16], dv[D / 16];
#pragma unroll
  for (int db = 0; db < D / 16; ++db) {
    wmma::fill_fragment(dk[db], 0.f);
    wmma::fill_fragment(dv[db], 0.f);
  }
  const int lr = lane >> 1, half_ = lane & 1, wk = warp * 16 + lr, j = n0 + wk;  // this lane's key

  // Query tiles that can see this key tile (own keys under the causal / window rule).
  int m_lo = 0, m_hi = p.Nq;
  if (!kPrefix && p.causal) {
    m_lo = max(0, n0 - (p.Nk - p.Nq));
    if (p.window > 0) m_hi = min(m_hi, n0 + n - 1 - (p.Nk - p.Nq) + p.window);
  }
  m_lo = (m_lo / 64) * 64;

  const int b_step = kPrefix ? p.splits : p.B;  // own keys: the one sequence `outer`
  for (int b = outer; b < p.B; b += b_step) {
    const uint8_t* kpm_row = (!kPrefix && p.kpm) ? p.kpm + int64_t(b) * p.Nk : nullptr;
    for (int g = 0; g < G; ++g) {
      const int h = hkv * G + g;
      for (int m0 = m_lo; m0 < m_hi; m0 += 64) {
        const int nrows = min(64, p.Nq - m0);
        const int64_t qrow = (int64_t(b) * p.Hq + h) * p.Nq + m0;
        __syncthreads();
        load_rows<T, D>(sQ, static_cast<const T*>(p.q) + qrow * D, nrows);
        load_rows<T, D>(sdO, static_cast<const T*>(p.dout) + qrow * D, nrows);
        load_row_stats(sLse, sDelta, p, qrow, nrows);
        __syncthreads();
        // S^T = K Q^T and dP^T = V dO^T for this warp's keys
        score_pair<T, D>(sK + warp * 16 * D, sQ, sSt + warp * 16 * 64, sV + warp * 16 * D, sdO, sdPt + warp * 16 * 64);
        __syncwarp();
        for (int c = half_ * 32; c < half_ * 32 + 32; ++c) {  // c: query row m0 + c
          const bool ok =
              wk < n && c < nrows && (kPrefix || own_visible(m0 + c, j, p.Nq, p.Nk, p.causal, p.window, kpm_row));
          const float pr = ok ? exp2f(sSt[wk * 64 + c] * p.scale_log2 - sLse[c]) : 0.f;
          sPt[wk * 64 + c] = from_float<T>(pr);
          sdSt[wk * 64 + c] = from_float<T>(pr * (sdPt[wk * 64 + c] - sDelta[c]));
        }
        __syncwarp();
#pragma unroll
        for (int db = 0; db < D / 16; ++db) {
          mma_rows<T, 4, wmma::row_major>(dv[db], sPt + warp * 16 * 64, 64, sdO + db * 16, D, 16 * D);
          mma_rows<T, 4, wmma::row_major>(dk[db], sdSt + warp * 16 * 64, 64, sQ + db * 16, D, 16 * D);
        }
      }
    }
  }

  __syncthreads();  // the score tiles become the fp32 staging tile
  float* stage = sSt;
  // Unrolled over both accumulators by name: a runtime pointer to either array would push
  // them to local memory.
  auto write = [&](AccFrag(&acc)[D / 16], float mul, float* part, void* grad) {
#pragma unroll
    for (int db = 0; db < D / 16; ++db) {
      for (int t = 0; t < acc[db].num_elements; ++t) acc[db].x[t] *= mul;
      wmma::store_matrix_sync(stage + warp * 16 * D + db * 16, acc[db], D, wmma::mem_row_major);
    }
    __syncwarp();
    if (wk < n) {
      for (int c = half_ * (D / 2); c < (half_ + 1) * (D / 2); ++c) {
        const float x = stage[wk * D + c];
        if (kPrefix)
          part[((int64_t(outer) * p.Hkv + hkv) * p.P + j) * D + c] = x;
        else
          static_cast<T*>(grad)[((int64_t(outer) * p.Hkv + hkv) * p.Nk + j) * D + c] = from_float<T>(x);
      }
    }
    __syncwarp();
  };
  write(dk, p.scale, p.dpk_part, p.dk);
  write(dv, 1.f, p.dpv_part, p.dv);
#else
  __trap();
#endif
}

template <typename K>
static void launch_kernel(K kernel, size_t smem, dim3 grid, const BwdParams& p) {
  if (grid.x == 0 || grid.y == 0) return;
  RC_LAUNCH(kernel, grid, kThreads, smem, p);
}

template <typename T, int D>
static void launch_all(const BwdParams& p) {
  constexpr size_t smem = BwdSmem<T, D>::kBytes;
  const auto tiles = [](int n) { return unsigned((n + 63) / 64); };
  launch_kernel(dq_kernel<T, D>, smem, dim3(p.B * p.Hq, tiles(p.Nq)), p);
  launch_kernel(dkdv_kernel<T, D, false>, smem, dim3(p.B * p.Hkv, tiles(p.Nk)), p);
  launch_kernel(dkdv_kernel<T, D, true>, smem, dim3(p.splits * p.Hkv, tiles(p.P)), p);
}

void launch_bwd(const BwdParams& p, int dtype, int D) {
  TORCH_CHECK((p.Nq + 63) / 64 <= 65535 && (p.Nk + 63) / 64 <= 65535 && (p.P + 63) / 64 <= 65535,
              "reasoncache: sequence too long for the backward grid");
  if (dtype == 0 && D == 64) launch_all<half, 64>(p);
  else if (dtype == 0 && D == 128) launch_all<half, 128>(p);
  else if (dtype == 1 && D == 64) launch_all<__nv_bfloat16, 64>(p);
  else if (dtype == 1 && D == 128) launch_all<__nv_bfloat16, 128>(p);
  else TORCH_CHECK(false, "reasoncache: no backward kernel for dtype code ", dtype, " and head dim ", D);
}

// Dynamic shared memory one backward block needs (0 for an unsupported combination).
size_t bwd_smem_bytes(int dtype, int D) {
  if (dtype == 0 && D == 64) return BwdSmem<half, 64>::kBytes;
  if (dtype == 0 && D == 128) return BwdSmem<half, 128>::kBytes;
  if (dtype == 1 && D == 64) return BwdSmem<__nv_bfloat16, 64>::kBytes;
  if (dtype == 1 && D == 128) return BwdSmem<__nv_bfloat16, 128>::kBytes;
  return 0;
}

}  // namespace reasoncache
