// Backward: the prefix's share of dq, then dk/dv (and the rest of dq) of the own keys,
// then the batch-summed prefix gradient.
//
// FlashAttention-2's recomputation from the forward's lse, on mma.sync + ldmatrix with
// every score, probability and accumulator in registers (layouts in mma.cuh), swizzled
// shared memory and cp.async double buffers for the tiles that stream.
//
// FA2's structure for the own keys: one block per key tile walks the query tiles that see
// it and runs 5 products per tile pair (S^T, dP^T, dV, dK, and dQ += dS K), where a
// separate dq pass would recompute S and dP (7). FA2 adds dq with float atomics, whose
// order varies run to run; here each key tile adds its share of a dq row tile in key-tile
// order, waiting for a per-row-tile flag the previous key tile sets (FA2/FA3's
// "deterministic" mode), so the backward stays bitwise deterministic. The prefix's share
// of dq (dq_kernel) is written first and initialises the flags; dq_finish_kernel scales
// and rounds at the end.
// The prefix gradient is summed over the batch inside the kernel: block (key tile, KV head,
// split s) walks sequences s, s + splits, ... and writes one fp32 partial
// [splits, Hkv, P, D]; the bindings add the partials in a fixed order.
#include "common.cuh"
#include "mma.cuh"


namespace reasoncache {

template <typename T, int D>
struct BwdSmem {
  // two [64, D] tiles loaded once, two double-buffered [64, D] tiles, and a double-buffered
  // lse and delta (64 rows each)
  static constexpr size_t kBytes = sizeof(T) * 6 * 64 * D + sizeof(float) * 4 * 64;
};

// Issue the copies of rows [0, n) of a global [*, D] tile into a swizzled [64, D] shared
// tile (rows n.. zero-filled). Completes at cp_async_wait.
template <typename T, int D>
__device__ __forceinline__ void async_rows(T* __restrict__ dst, const T* __restrict__ src, int n) {
  constexpr int kChunks = D / 8;
  // Not unrolled: the copies are asynchronous anyway, and unrolled, their 64-bit addresses
  // all live at once, next to dK and dV (pushing dk/dv bf16 D=128 on sm_90 to spill).
#pragma unroll 1
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool ok = r < n;
    cp_async_16(dst + swizzle<D>(r, c), ok ? src + int64_t(r) * D + c : src, ok);
  }
}

// acc[16 x 64] = A (rows 16w.. of the swizzled tile `a`) x B^T (the 64 rows of tile `b`):
// scores (or dP) of this warp's 16 rows against 64 keys (or, transposed, of its 16 keys
// against 64 query rows), 8 C tiles.
template <typename T, int D>
__device__ __forceinline__ void warp_scores(float (&acc)[8][4], const T* a, const T* b) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, mi = lane / 8, mr = lane % 8;
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  // Not unrolled over kk: only addresses depend on it, and unrolling lets the compiler
  // hoist every fragment load at once, which pushed dk/dv (2 x D/2 fp32 registers) to spill.
#pragma unroll 1
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + swizzle<D>(warp * 16 + mr + (mi & 1) * 8, kk * 16 + (mi >> 1) * 8));
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + swizzle<D>((j + (mi >> 1)) * 8 + mr, kk * 16 + (mi & 1) * 8));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_16816<T>(acc[j], af, b0);
      mma_16816<T>(acc[j + 1], af, b1);
    }
  }
}

// out[16 x D] += X (16 x 64, in C layout, packed to T: x[j] holds C tile j's rows g and
// g + 8) x the swizzled [64, D] tile `b` (its rows are X's columns).
template <typename T, int D>
__device__ __forceinline__ void warp_accumulate_packed(float (&out)[D / 8][4], const uint32_t (&x)[8][2], const T* b) {
  const int lane = threadIdx.x % 32, mi = lane / 8, mr = lane % 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {x[2 * kk][0], x[2 * kk][1], x[2 * kk + 1][0], x[2 * kk + 1][1]};
#pragma unroll
    for (int dj = 0; dj < D / 8; dj += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + swizzle<D>(kk * 16 + (mi & 1) * 8 + mr, (dj + (mi >> 1)) * 8));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_16816<T>(out[dj], a, b0);
      mma_16816<T>(out[dj + 1], a, b1);
    }
  }
}

// The same with X in fp32 C layout, rounded to T on the way.
template <typename T, int D>
__device__ __forceinline__ void warp_accumulate(float (&out)[D / 8][4], const float (&x)[8][4], const T* b) {
  uint32_t packed[8][2];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    packed[j][0] = pack2<T>(x[j][0], x[j][1]);
    packed[j][1] = pack2<T>(x[j][2], x[j][3]);
  }
  warp_accumulate_packed<T, D>(out, packed, b);
}

template <int D>
__device__ __forceinline__ void zero(float (&acc)[D / 8][4]) {
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) acc[dj][0] = acc[dj][1] = acc[dj][2] = acc[dj][3] = 0.f;
}

// lse in the log2 domain, +inf for a row that sees nothing (so its p is 0).
__device__ __forceinline__ float lse2_of(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ---------------------------------------------------------------- dq (the prefix's share)
// grid (B * Hq, q tiles). Warp w owns query rows 16w..16w+15 and accumulates their dq over
// the prefix's key tiles (double-buffered), writes it unscaled to dq_accum, and sets the row
// tile's order flag to -1: no own-key tile has added yet.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  RC_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [64, D]
  T* sdO = sQ + 64 * D;                // [64, D]
  T* sK = sdO + 64 * D;                // [2][64, D]
  T* sV = sK + 2 * 64 * D;             // [2][64, D]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int G = p.Hq / p.Hkv;
  const int b = blockIdx.x / p.Hq, h = blockIdx.x % p.Hq, hkv = h / G;
  const int m0 = blockIdx.y * 64, nrows = min(64, p.Nq - m0);
  const int64_t qrow = (int64_t(b) * p.Hq + h) * p.Nq + m0;
  const int n_tiles = (p.P + 63) / 64;
  if (n_tiles > 0) {
    async_rows<T, D>(sQ, static_cast<const T*>(p.q) + qrow * D, nrows);
    async_rows<T, D>(sdO, static_cast<const T*>(p.dout) + qrow * D, nrows);
  }
  const int64_t prefix_base = int64_t(hkv) * p.P * D;
  auto issue = [&](int tile, int buf) {
    const int n0 = tile * 64, n = min(64, p.P - n0);
    async_rows<T, D>(sK + buf * 64 * D, static_cast<const T*>(p.pk) + prefix_base + int64_t(n0) * D, n);
    async_rows<T, D>(sV + buf * 64 * D, static_cast<const T*>(p.pv) + prefix_base + int64_t(n0) * D, n);
  };
  if (n_tiles > 0) issue(0, 0);
  cp_async_commit();

  float lse2[2], delta[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + g + 8 * rr;
    lse2[rr] = r < nrows ? lse2_of(p.lse[qrow + r]) : INFINITY;
    delta[rr] = r < nrows ? p.delta[qrow + r] : 0.f;
  }
  float dq[D / 8][4];
  zero<D>(dq);

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < n_tiles) issue(tile + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* kt = sK + buf * 64 * D;
    float s[8][4], dp[8][4];
    warp_scores<T, D>(dp, sdO, sV + buf * 64 * D);  // dP = dO V^T
    warp_scores<T, D>(s, sQ, kt);                    // S = Q K^T
    // Every row sees every prefix key; keys past P load as zeros, so their dS meets a zero
    // row of K and adds nothing: no mask.
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(s[j][e] * p.scale_log2 - lse2[e >> 1]) * (dp[j][e] - delta[e >> 1]);
    warp_accumulate<T, D>(dq, s, kt);  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + g + 8 * rr;
    float* out = p.dq_accum + (qrow + r) * D;
    if (r < nrows) {
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) store2(out + dj * 8 + 2 * t, dq[dj][2 * rr], dq[dj][2 * rr + 1]);
    }
  }
  if (threadIdx.x == 0) p.dq_order[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = -1;
#else
  __trap();
#endif
}

// dq = dq_accum * scale, rounded to T (n elements, even).
template <typename T>
__global__ void dq_finish_kernel(const BwdParams p, int64_t n) {
  for (int64_t i = 2 * (int64_t(blockIdx.x) * blockDim.x + threadIdx.x); i < n; i += 2 * int64_t(gridDim.x) * blockDim.x)
    store2(static_cast<T*>(p.dq) + i, __ldcg(p.dq_accum + i) * p.scale, __ldcg(p.dq_accum + i + 1) * p.scale);
}

// Query rows [m_lo, m_hi) that can see own-key tile [n0, n0 + n), m_lo rounded down to a
// row tile: the rows dkdv_kernel walks for that tile, hence which key tiles add to a dq row
// tile (a contiguous run of key tiles: both bounds grow with n0).
__device__ __forceinline__ void rows_seeing(const BwdParams& p, int n0, int n, int& m_lo, int& m_hi) {
  const int diag = p.Nk - p.Nq;
  m_lo = 0;
  m_hi = p.Nq;
  if (p.causal) {
    m_lo = max(0, n0 - diag);
    if (p.window > 0) m_hi = min(m_hi, n0 + n - 1 - diag + p.window);
  }
  m_lo = (m_lo / 64) * 64;
}

// dQ += dS K for one (own-key tile, query tile) pair, added to dq_accum after the previous
// key tile's share (key-tile order: bitwise deterministic). dsp: this warp's dS^T rows
// (keys 16w.. x 64 query rows) packed to T; sdst: the query tile's shared buffer, free once
// every warp is done with Q, which takes dS^T so the warps can trade rows for keys.
template <typename T, int D>
__device__ __forceinline__ void add_dq(const BwdParams& p, const uint32_t (&dsp)[8][2], T* sdst, const T* sK, int w,
                                       int b, int m0, int nrows, int m_tiles, int n0) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, mi = lane / 8, mr = lane % 8;
  const int G = p.Hq / p.Hkv, hkv = blockIdx.x % p.Hkv;
  const int h = hkv * G + (w / m_tiles) % G;
  __syncthreads();  // every warp has read Q for dK
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)  // [64 keys, 64 rows], swizzled as a D=64 tile
      *reinterpret_cast<uint32_t*>(sdst + swizzle<64>(warp * 16 + g + 8 * rr, j * 8 + 2 * t)) = dsp[j][rr];
  // The previous key tile added to this row tile iff this row tile is among the rows it sees.
  int prev = -1;
  if (blockIdx.y > 0) {
    int lo, hi;
    rows_seeing(p, n0 - 64, 64, lo, hi);
    if (m0 >= lo && m0 < hi) prev = int(blockIdx.y) - 1;
  }
  int* order = p.dq_order + (int64_t(b) * p.Hq + h) * ((p.Nq + 63) / 64) + m0 / 64;
  wait_for_flag(order, prev);  // its barrier also publishes dS^T
  float* rows = p.dq_accum + ((int64_t(b) * p.Hq + h) * p.Nq + m0) * D;
  // 16 output columns at a time, the A fragments of dS (query rows 16w.. x 64 keys: dS^T's
  // tile read transposed) reloaded for each: dK and dV hold 2 x D/2 registers meanwhile.
#pragma unroll 1
  for (int dj = 0; dj < D / 8; dj += 2) {
    float c[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t af[4], bf[4];
      ldmatrix_x4_trans(af, sdst + swizzle<64>(kk * 16 + (mi >> 1) * 8 + mr, warp * 16 + (mi & 1) * 8));
      ldmatrix_x4_trans(bf, sK + swizzle<D>(kk * 16 + (mi & 1) * 8 + mr, (dj + (mi >> 1)) * 8));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_16816<T>(c[0], af, b0);
      mma_16816<T>(c[1], af, b1);
    }
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int r = warp * 16 + g + 8 * rr;
        float* a = rows + int64_t(r) * D + (dj + x) * 8 + 2 * t;
        if (r < nrows) store2(a, __ldcg(a) + c[x][2 * rr], __ldcg(a + 1) + c[x][2 * rr + 1]);
      }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicExch(order, int(blockIdx.y));
}

// ---------------------------------------------------------------- dk, dv (own keys and prefix)
// Own keys: grid (B * Hkv, key tiles), one sequence per block, writes dk / dv.
// Prefix:   grid (splits * Hkv, prefix tiles), sequences split, split + splits, ...,
//           writes fp32 partials. Warp w owns keys 16w..16w+15 of the 64-key tile and
//           computes everything transposed (keys as rows): S^T = K Q^T, dP^T = V dO^T, then
//           dV += P^T dO and dK += dS^T Q take P^T and dS^T straight from registers.
template <typename T, int D, bool kPrefix>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  RC_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem);  // [64, D]
  T* sV = sK + 64 * D;                 // [64, D]
  T* sQ = sV + 64 * D;                 // [2][64, D]
  T* sdO = sQ + 2 * 64 * D;            // [2][64, D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * 64 * D);  // [2][64], log2 domain
  float* sDelta = sLse + 2 * 64;                             // [2][64]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int G = p.Hq / p.Hkv;
  const int outer = blockIdx.x / p.Hkv, hkv = blockIdx.x % p.Hkv;  // outer: batch (own) or split (prefix)
  const int n0 = blockIdx.y * 64;
  const int n = min(64, (kPrefix ? p.P : p.Nk) - n0);
  const int64_t kbase = kPrefix ? (int64_t(hkv) * p.P + n0) * D : ((int64_t(outer) * p.Hkv + hkv) * p.Nk + n0) * D;
  async_rows<T, D>(sK, static_cast<const T*>(kPrefix ? p.pk : p.k) + kbase, n);
  async_rows<T, D>(sV, static_cast<const T*>(kPrefix ? p.pv : p.v) + kbase, n);

  // Query tiles that can see this key tile (own keys under the causal / window rule).
  const int diag = p.Nk - p.Nq;
  int m_lo = 0, m_hi = p.Nq;
  if (!kPrefix) rows_seeing(p, n0, n, m_lo, m_hi);
  const int m_tiles = m_hi > m_lo ? (m_hi - m_lo + 63) / 64 : 0;
  // Work items: (sequence, query head of the group, query tile), sequence-major.
  const int b_step = kPrefix ? p.splits : p.B;  // own keys: the one sequence `outer`
  const int n_seq = outer < p.B ? (p.B - outer + b_step - 1) / b_step : 0;
  const int n_work = n_seq * G * m_tiles;
  auto locate = [&](int w, int& b, int& m0) {
    b = outer + (w / (G * m_tiles)) * b_step;
    m0 = m_lo + (w % m_tiles) * 64;
    const int h = hkv * G + (w / m_tiles) % G;
    return (int64_t(b) * p.Hq + h) * p.Nq + m0;  // the tile's first row of q / dout / lse
  };
  auto issue = [&](int w, int buf) {
    int b, m0;
    const int64_t qrow = locate(w, b, m0);
    const int nrows = min(64, p.Nq - m0);
    async_rows<T, D>(sQ + buf * 64 * D, static_cast<const T*>(p.q) + qrow * D, nrows);
    async_rows<T, D>(sdO + buf * 64 * D, static_cast<const T*>(p.dout) + qrow * D, nrows);
    // lse / delta rows are not 16-byte aligned in general: plain loads (the buffer is free:
    // the barrier that ended the previous use of it has passed).
    for (int r = threadIdx.x; r < 64; r += kThreads) {
      sLse[buf * 64 + r] = r < nrows ? lse2_of(p.lse[qrow + r]) : INFINITY;
      sDelta[buf * 64 + r] = r < nrows ? p.delta[qrow + r] : 0.f;
    }
  };
  if (n_work > 0) issue(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
  zero<D>(dk);
  zero<D>(dv);
  int kj[2];  // this lane's two keys
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) kj[rr] = n0 + warp * 16 + g + 8 * rr;

  for (int w = 0; w < n_work; ++w) {
    const int buf = w & 1;
    if (w + 1 < n_work) issue(w + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* qt = sQ + buf * 64 * D;
    const T* dot = sdO + buf * 64 * D;
    const float* lse_t = sLse + buf * 64;
    const float* delta_t = sDelta + buf * 64;
    int b, m0;
    locate(w, b, m0);
    const int nrows = min(64, p.Nq - m0);
    const uint8_t* kpm_row = (!kPrefix && p.kpm) ? p.kpm + int64_t(b) * p.Nk : nullptr;

    // Rows past nrows have q = dO = 0 and lse = +inf: they add nothing. Masks are for the
    // causal / window / padding rule, on tiles where it cuts.
    bool masked = false;
    if (!kPrefix) {
      masked = kpm_row != nullptr;
      if (p.causal) masked = masked || n0 + n - 1 > m0 + diag || (p.window > 0 && n0 <= m0 + nrows - 1 + diag - p.window);
    }
    // P^T, rounded to T once: it is both dV's A operand and dS^T's factor. Keeping it packed
    // (16 registers, not 32) is what lets dK and dV (2 x D/2 fp32 each) stay in registers.
    uint32_t pt[8][2];
    {
      float st[8][4];
      warp_scores<T, D>(st, sK, qt);  // S^T = K Q^T
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = j * 8 + 2 * t + (e & 1);  // query row m0 + c
          float pr = exp2f(st[j][e] * p.scale_log2 - lse_t[c]);
          if (masked) pr = own_visible(m0 + c, kj[e >> 1], p.Nq, p.Nk, p.causal, p.window, kpm_row) ? pr : 0.f;
          st[j][e] = pr;
        }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        pt[j][0] = pack2<T>(st[j][0], st[j][1]);
        pt[j][1] = pack2<T>(st[j][2], st[j][3]);
      }
    }
    warp_accumulate_packed<T, D>(dv, pt, dot);  // dV += P^T dO
    float dst[8][4];
    warp_scores<T, D>(dst, sV, dot);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = j * 8 + 2 * t + (e & 1);
        dst[j][e] = unpack<T>(pt[j][e >> 1], e & 1) * (dst[j][e] - delta_t[c]);  // dS^T
      }
    uint32_t dsp[8][2];  // dS^T rounded to T: dK's and (own keys) dQ's operand
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      dsp[j][0] = pack2<T>(dst[j][0], dst[j][1]);
      dsp[j][1] = pack2<T>(dst[j][2], dst[j][3]);
    }
    warp_accumulate_packed<T, D>(dk, dsp, qt);  // dK += dS^T Q
    if constexpr (!kPrefix) add_dq<T, D>(p, dsp, const_cast<T*>(qt), sK, w, b, m0, nrows, m_tiles, n0);
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int j = kj[rr];
    if (j >= n0 + n) {
    } else if (kPrefix) {
      float* pk = p.dpk_part + ((int64_t(outer) * p.Hkv + hkv) * p.P + j) * D;
      float* pv = p.dpv_part + ((int64_t(outer) * p.Hkv + hkv) * p.P + j) * D;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        store2(pk + dj * 8 + 2 * t, dk[dj][2 * rr] * p.scale, dk[dj][2 * rr + 1] * p.scale);
        store2(pv + dj * 8 + 2 * t, dv[dj][2 * rr], dv[dj][2 * rr + 1]);
      }
    } else {
      const int64_t row = ((int64_t(outer) * p.Hkv + hkv) * p.Nk + j) * D;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        store2(static_cast<T*>(p.dk) + row + dj * 8 + 2 * t, dk[dj][2 * rr] * p.scale, dk[dj][2 * rr + 1] * p.scale);
        store2(static_cast<T*>(p.dv) + row + dj * 8 + 2 * t, dv[dj][2 * rr], dv[dj][2 * rr + 1]);
      }
    }
  }
#else
  __trap();
#endif
}

template <typename K, typename... Args>
static void launch_kernel(K kernel, size_t smem, dim3 grid, const BwdParams& p, int threads = kThreads,
                          Args... args) {
  if (grid.x == 0 || grid.y == 0) return;
  RC_LAUNCH(kernel, grid, threads, smem, p, args...);
}

template <typename T, int D>
static void launch_all(const BwdParams& p) {
  constexpr size_t smem = BwdSmem<T, D>::kBytes;
  const auto tiles = [](int n) { return unsigned((n + 63) / 64); };
  launch_kernel(dq_kernel<T, D>, smem, dim3(p.B * p.Hq, tiles(p.Nq)), p);  // also resets the order flags
  launch_kernel(dkdv_kernel<T, D, false>, smem, dim3(p.B * p.Hkv, tiles(p.Nk)), p);
  const int64_t n = int64_t(p.B) * p.Hq * p.Nq * D;
  launch_kernel(dq_finish_kernel<T>, 0, dim3(unsigned(std::min<int64_t>((n / 2 + 255) / 256, 4096))), p, 256, n);
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
