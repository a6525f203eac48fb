// Forward and decode: one kernel that attends a tile of query rows to the shared prefix
// and/or a range of the rows' own keys, with an online softmax (FlashAttention-2's form).
//
// Each block has 4 warps and a 64-row query tile; warp w owns rows 16w..16w+15. Key and
// value tiles of 64 rows stream through a double buffer in shared memory (cp.async: tile
// t + 1 is in flight while tile t is computed), stored swizzled (mma.cuh) so every ldmatrix
// and every 16-byte copy is free of bank conflicts. Everything else lives in registers: Q's
// fragments (loaded once), S = Q K^T from mma.sync.m16n8k16, the running max and sum, and
// the O accumulator; P goes from S's accumulator layout straight into the A operand of
// O += P V. Only tiles on a boundary (the last, partial tile of a range; the causal
// diagonal; a window's edge; a padding mask) pay for masking. The shared prefix is one more
// key range: it is never copied per sequence.
#include "common.cuh"
#include "mma.cuh"


namespace reasoncache {

// kW warps per block, 16 query rows each: 4 (64-row tiles) in general, 1 when a problem has
// at most 16 rows (decode's own-cache pass at G x Nq <= 16), so no warp computes only padding.
template <typename T, int D, int kW = kWarps>
struct AttendSmem {
  // the Q tile, two K and two V tiles (the double buffer), 16 bytes for the merge's flag
  static constexpr size_t kTile = sizeof(T) * kBlockN * D;
  static constexpr size_t kBytes = sizeof(T) * 16 * kW * D + 4 * kTile + 16;
  // decode's merge reuses the K/V tiles for a [16 kW, kMaxParts] fp32 weight table
  static_assert(sizeof(float) * 16 * kW * kMaxParts <= 4 * kTile, "merge weights must fit in the K/V tiles");
};

// Issue the copies of rows [0, n) of a global [*, D] tile (row stride D) into a swizzled
// [kRows, D] shared tile; rows n.. are zero-filled. Completes at cp_async_wait.
template <typename T, int D, int kRows, int kNThreads>
__device__ __forceinline__ void async_tile(T* __restrict__ dst, const T* __restrict__ src, int n) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kNThreads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool ok = r < n;
    cp_async_16(dst + swizzle<D>(r, c), ok ? src + int64_t(r) * D + c : src, ok);
  }
}

// Merge p.n_parts normalised partials of rows [row0, row0 + nrows) of problem
// (b_base, h_base) by their log-sum-exp, in partial order, into p.final_out / final_lse.
// sW: a [nrows, kMaxParts] fp32 scratch tile for the weights; kNThreads threads per block.
template <typename T, int kNThreads>
__device__ void merge_partials(const FwdParams& p, float* sW, int row0, int nrows, int b_base, int h_base, int D) {
  const int64_t part_rows = int64_t(p.B) * p.Hq * p.Nq;
  for (int r = threadIdx.x; r < nrows; r += kNThreads) {
    int b, h, i;
    p.map.locate(row0 + r, b_base, h_base, b, h, i);
    const int64_t row = (int64_t(b) * p.Hq + h) * p.Nq + i;
    float m = -INFINITY;
    for (int s = 0; s < p.n_parts; ++s) m = fmaxf(m, __ldcg(p.part_lse + s * part_rows + row));
    float l = 0.f;
    for (int s = 0; s < p.n_parts; ++s) {
      const float w = m == -INFINITY ? 0.f : expf(__ldcg(p.part_lse + s * part_rows + row) - m);
      sW[r * kMaxParts + s] = w;
      l += w;
    }
    for (int s = 0; s < p.n_parts; ++s) sW[r * kMaxParts + s] = l > 0.f ? sW[r * kMaxParts + s] / l : 0.f;
    p.final_lse[row] = l > 0.f ? m + logf(l) : -INFINITY;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * D; idx += kNThreads) {
    const int r = idx / D, c = idx % D;
    int b, h, i;
    p.map.locate(row0 + r, b_base, h_base, b, h, i);
    const int64_t row = (int64_t(b) * p.Hq + h) * p.Nq + i;
    float acc = 0.f;
    for (int s = 0; s < p.n_parts; ++s) acc += sW[r * kMaxParts + s] * __ldcg(p.parts + (s * part_rows + row) * D + c);
    static_cast<T*>(p.final_out)[row * D + c] = from_float<T>(acc);
  }
}

template <typename T, typename OutT, int D, int kW>
__global__ void __launch_bounds__(kW * 32) attend_kernel(const FwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  static_assert(kBlockN == 64, "the fragment loops assume 64-key tiles");
  constexpr int kBM = 16 * kW, kNT = 32 * kW;  // query rows and threads per block
  RC_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [BM, D], swizzled
  T* sK = sQ + kBM * D;                // [2][BN, D], swizzled
  T* sV = sK + 2 * kBlockN * D;        // [2][BN, D], swizzled
  int* sFlag = reinterpret_cast<int*>(sV + 2 * kBlockN * D);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int G = p.Hq / p.Hkv;
  const int split = blockIdx.x / p.problems_per_split, pz = blockIdx.x % p.problems_per_split;
  int b_base = 0, h_base = 0, hkv = 0;
  if (p.problem_kind == 0) {
    b_base = pz / p.Hq; h_base = pz % p.Hq; hkv = h_base / G;
  } else if (p.problem_kind == 1) {
    hkv = pz; h_base = hkv * G;
  } else {
    b_base = pz / p.Hkv; hkv = pz % p.Hkv; h_base = hkv * G;
  }
  const int row0 = blockIdx.y * kBM;
  if (row0 >= p.rows) return;
  const int nrows = min(kBM, p.rows - row0);

  // Q tile: rows may come from several (b, h) (decode), so each row has its own address.
  {
    constexpr int kChunks = D / 8;
    const T* q = static_cast<const T*>(p.q);
    for (int idx = threadIdx.x; idx < kBM * kChunks; idx += kNT) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const T* src = q;
      if (r < nrows) {
        int b, h, i;
        p.map.locate(row0 + r, b_base, h_base, b, h, i);
        src = q + ((int64_t(b) * p.Hq + h) * p.Nq + i) * D + c;
      }
      cp_async_16(sQ + swizzle<D>(r, c), src, r < nrows);
    }
  }

  // Key ranges: this split's share of the prefix, then of the own keys.
  int pre_lo = 0, pre_hi = 0, own_lo = 0, own_hi = 0;
  if (p.use_prefix) {
    pre_lo = split * p.prefix_chunk;
    pre_hi = min(p.P, pre_lo + p.prefix_chunk);
  }
  // Rows of this block span query positions [i_min, i_max] (all of them when the block mixes sequences).
  int i_min = 0, i_max = p.Nq - 1;
  if (p.problem_kind == 0) { i_min = row0; i_max = row0 + nrows - 1; }
  const int diag = p.Nk - p.Nq;
  if (p.use_own) {  // own keys need one batch index per block: problem kinds 0 and 2
    own_lo = split * p.own_chunk;
    own_hi = min(p.Nk, own_lo + p.own_chunk);
    if (p.causal) {  // skip key tiles no row of this block can see
      own_hi = min(own_hi, i_max + diag + 1);
      if (p.window > 0) own_lo = max(own_lo, i_min + diag - p.window + 1);
    }
  }
  const int n_pre = pre_hi > pre_lo ? (pre_hi - pre_lo + kBlockN - 1) / kBlockN : 0;
  const int n_own = own_hi > own_lo ? (own_hi - own_lo + kBlockN - 1) / kBlockN : 0;
  const int n_tiles = n_pre + n_own;
  const int64_t prefix_base = int64_t(hkv) * p.P * D;
  const int64_t own_base = (int64_t(b_base) * p.Hkv + hkv) * p.Nk * D;
  const uint8_t* kpm_row = p.kpm ? p.kpm + int64_t(b_base) * p.Nk : nullptr;

  // Tile `tile`'s first key n0 and length n within its range, and whether it is an own tile.
  auto tile_range = [&](int tile, int& n0, int& n) {
    const bool own = tile >= n_pre;
    n0 = own ? own_lo + (tile - n_pre) * kBlockN : pre_lo + tile * kBlockN;
    n = min(kBlockN, (own ? own_hi : pre_hi) - n0);
    return own;
  };
  auto issue = [&](int tile, int buf) {
    int n0, n;
    const bool own = tile_range(tile, n0, n);
    const T* ks = static_cast<const T*>(own ? p.k : p.pk) + (own ? own_base : prefix_base) + int64_t(n0) * D;
    const T* vs = static_cast<const T*>(own ? p.v : p.pv) + (own ? own_base : prefix_base) + int64_t(n0) * D;
    async_tile<T, D, kBlockN, kNT>(sK + buf * kBlockN * D, ks, n);
    async_tile<T, D, kBlockN, kNT>(sV + buf * kBlockN * D, vs, n);
  };
  if (n_tiles > 0) issue(0, 0);
  cp_async_commit();  // group 0: Q and the first K/V tile

  // This lane's two rows (g and g + 8 of its warp's 16) and their query positions.
  int rb[2] = {0, 0}, rh[2] = {0, 0}, ri[2] = {0, 0};
  bool row_ok[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + g + rr * 8;
    row_ok[rr] = r < nrows;
    if (row_ok[rr]) p.map.locate(row0 + r, b_base, h_base, rb[rr], rh[rr], ri[rr]);
  }

  uint32_t qf[D / 16][4];  // Q's A fragments, one per 16 columns
  float o[D / 8][4];       // O accumulator: D / 8 C tiles of 16 x 8
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (log2 domain) and this lane's partial sum
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj) o[dj][0] = o[dj][1] = o[dj][2] = o[dj][3] = 0.f;
  const int mi = lane / 8, mr = lane % 8;  // which 8x8 matrix of an ldmatrix.x4 this lane addresses, and its row

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < n_tiles) issue(tile + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed (the next one may still be in flight)
    __syncthreads();
    if (tile == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], sQ + swizzle<D>(warp * 16 + mr + (mi & 1) * 8, kk * 16 + (mi >> 1) * 8));
    }
    const T* kt = sK + buf * kBlockN * D;
    const T* vt = sV + buf * kBlockN * D;

    float s[kBlockN / 8][4];  // S = Q K^T: 8 C tiles of 16 x 8
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; j += 2) {
        uint32_t kb[4];  // B fragments of key tiles j and j + 1 at columns kk * 16..
        ldmatrix_x4(kb, kt + swizzle<D>((j + (mi >> 1)) * 8 + mr, kk * 16 + (mi & 1) * 8));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(s[j], qf[kk], b0);
        mma_16816<T>(s[j + 1], qf[kk], b1);
      }
    }

    int n0, n;
    const bool own = tile_range(tile, n0, n);
    // Interior tiles (every key visible to every row of the block) skip the mask.
    bool masked = n < kBlockN;
    if (own) {
      masked = masked || kpm_row != nullptr;
      if (p.causal) masked = masked || n0 + kBlockN - 1 > i_min + diag || (p.window > 0 && n0 <= i_max + diag - p.window);
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (masked) {
          const int c = j * 8 + 2 * t + (e & 1);
          const bool ok = c < n && (!own || own_visible(ri[e >> 1], n0 + c, p.Nq, p.Nk, p.causal, p.window, kpm_row));
          x = ok ? x : -INFINITY;
        }
        s[j][e] = x;
      }

    // Online softmax; a row's 64 scores are spread over the 4 lanes of a quad.
    float alpha[2], mu[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[rr], mx);
      mu[rr] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
      alpha[rr] = exp2f(m[rr] - mu[rr]);
      m[rr] = m_new;
      l[rr] *= alpha[rr];
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - mu[e >> 1]);
        l[e >> 1] += s[j][e];
      }
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj) {
      o[dj][0] *= alpha[0]; o[dj][1] *= alpha[0];
      o[dj][2] *= alpha[1]; o[dj][3] *= alpha[1];
    }

    // O += P V: two S tiles make one A fragment; V's B fragments come transposed.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dj = 0; dj < D / 8; dj += 2) {
        uint32_t vb[4];  // B fragments of output columns dj and dj + 1 at keys kk * 16..
        ldmatrix_x4_trans(vb, vt + swizzle<D>(kk * 16 + (mi & 1) * 8 + mr, (dj + (mi >> 1)) * 8));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(o[dj], a, b0);
        mma_16816<T>(o[dj + 1], a, b1);
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }
  cp_async_wait<0>();

  // out = O / l (0 for a row that saw nothing), lse = ln(sum exp) = ln2 * (m + log2 l).
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 1);
    l[rr] += __shfl_xor_sync(0xffffffffu, l[rr], 2);
    if (row_ok[rr]) {
      const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
      const int64_t row = ((int64_t(split) * p.B + rb[rr]) * p.Hq + rh[rr]) * p.Nq + ri[rr];
      OutT* out = static_cast<OutT*>(p.out) + row * D;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) store2(out + dj * 8 + 2 * t, o[dj][2 * rr] * inv, o[dj][2 * rr + 1] * inv);
      if (t == 0) p.lse[row] = l[rr] > 0.f ? (m[rr] + log2f(l[rr])) * kLn2 : -INFINITY;
    }
  }

  if (p.tickets != nullptr) {
    // Decode: the last split of this (problem, row tile) merges all partials (CUTLASS's
    // semaphore: fence, barrier, one atomic; the winner fences again and reads from L2).
    __threadfence();
    __syncthreads();  // also: no warp reads the K/V tiles any more, so the merge may reuse them
    int* ticket = p.tickets + int64_t(pz) * gridDim.y + blockIdx.y;
    const int splits = int(gridDim.x) / p.problems_per_split;
    if (threadIdx.x == 0) *sFlag = atomicAdd(ticket, 1) == splits - 1;
    __syncthreads();
    if (*sFlag) {
      __threadfence();
      merge_partials<T, kNT>(p, reinterpret_cast<float*>(sK), row0, nrows, b_base, h_base, D);
      if (threadIdx.x == 0) atomicExch(ticket, 0);  // ready for the next launch
    }
  }
#else
  __trap();  // the bindings refuse GPUs below sm_80
#endif
}

template <typename T, typename OutT, int D>
static void launch(const FwdParams& p, int problems, int splits) {
  const int bm = attend_row_tile(p.rows);
  const dim3 grid(problems * splits, (p.rows + bm - 1) / bm);
  TORCH_CHECK(grid.y <= 65535, "reasoncache: too many query rows per problem (", p.rows, ")");
  if (bm == 16) {
    auto kernel = attend_kernel<T, OutT, D, 1>;
    RC_LAUNCH(kernel, grid, 32, (AttendSmem<T, D, 1>::kBytes), p);
  } else {
    auto kernel = attend_kernel<T, OutT, D, kWarps>;
    RC_LAUNCH(kernel, grid, kThreads, (AttendSmem<T, D, kWarps>::kBytes), p);
  }
}

// dtype: 0 fp16, 1 bf16. out_fp32: partial outputs for decode's log-sum-exp merge.
void launch_attend(const FwdParams& p, int dtype, bool out_fp32, int D, int problems, int splits) {
#define RC_DISPATCH(T, HD)                                    \
  if (out_fp32) launch<T, float, HD>(p, problems, splits);   \
  else launch<T, T, HD>(p, problems, splits);
  if (dtype == 0 && D == 64) { RC_DISPATCH(half, 64) }
  else if (dtype == 0 && D == 128) { RC_DISPATCH(half, 128) }
  else if (dtype == 1 && D == 64) { RC_DISPATCH(__nv_bfloat16, 64) }
  else if (dtype == 1 && D == 128) { RC_DISPATCH(__nv_bfloat16, 128) }
  else TORCH_CHECK(false, "reasoncache: no forward kernel for dtype code ", dtype, " and head dim ", D);
#undef RC_DISPATCH
}

// Dynamic shared memory one forward/decode block needs (its 64-row tile, the larger; 0 for
// an unsupported combination).
size_t attend_smem_bytes(int dtype, int D) {
  if (dtype == 0 && D == 64) return AttendSmem<half, 64>::kBytes;
  if (dtype == 0 && D == 128) return AttendSmem<half, 128>::kBytes;
  if (dtype == 1 && D == 64) return AttendSmem<__nv_bfloat16, 64>::kBytes;
  if (dtype == 1 && D == 128) return AttendSmem<__nv_bfloat16, 128>::kBytes;
  return 0;
}

}  // namespace reasoncache
