// Forward and decode: one kernel that attends a tile of query rows to the shared prefix
// and/or a range of the rows' own keys, with an online softmax (flash attention).
//
// Each block has 4 warps and a 64-row query tile; warp w owns rows 16w..16w+15. Per key
// tile (64 keys) a warp computes S = Q K^T on tensor cores (WMMA, fp32 accumulate) into
// shared memory, updates its rows' running max and sum, writes P in the input dtype, and
// accumulates O += P V into an fp32 shared tile. The shared prefix is one more key range:
// it is never copied per sequence.
#include "common.cuh"


namespace reasoncache {
using namespace nvcuda;

template <typename T, int D>
struct AttendSmem {
  static constexpr size_t kBytes = sizeof(T) * (kBlockM * D + 2 * kBlockN * D + kBlockM * kBlockN) +
                                   sizeof(float) * (kBlockM * kBlockN + kBlockM * D + 3 * kBlockM);
};

// Merge p.n_parts normalised partials of rows [row0, row0 + nrows) of problem
// (b_base, h_base) by their log-sum-exp, in partial order, into p.final_out / final_lse.
// sW: a [kBlockM, kMaxParts] fp32 scratch tile for the weights.
template <typename T>
__device__ void merge_partials(const FwdParams& p, float* sW, int row0, int nrows, int b_base, int h_base, int D) {
  const int64_t part_rows = int64_t(p.B) * p.Hq * p.Nq;
  for (int r = threadIdx.x; r < nrows; r += kThreads) {
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
  for (int idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    int b, h, i;
    p.map.locate(row0 + r, b_base, h_base, b, h, i);
    const int64_t row = (int64_t(b) * p.Hq + h) * p.Nq + i;
    float acc = 0.f;
    for (int s = 0; s < p.n_parts; ++s) acc += sW[r * kMaxParts + s] * __ldcg(p.parts + (s * part_rows + row) * D + c);
    static_cast<T*>(p.final_out)[row * D + c] = from_float<T>(acc);
  }
}

template <typename T, typename OutT, int D>
__global__ void __launch_bounds__(kThreads) attend_kernel(const FwdParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  RC_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem);        // [BM, D]
  T* sK = sQ + kBlockM * D;                  // [BN, D]
  T* sV = sK + kBlockN * D;                  // [BN, D]
  T* sP = sV + kBlockN * D;                  // [BM, BN]
  float* sS = reinterpret_cast<float*>(sP + kBlockM * kBlockN);  // [BM, BN]
  float* sO = sS + kBlockM * kBlockN;        // [BM, D]
  float* sM = sO + kBlockM * D;              // [BM] running max, log2 domain
  float* sL = sM + kBlockM;                  // [BM] running sum
  float* sAlpha = sL + kBlockM;              // [BM] this tile's rescale factor

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  const int row0 = blockIdx.y * kBlockM;
  if (row0 >= p.rows) return;
  const int nrows = min(kBlockM, p.rows - row0);

  // Q tile: rows may come from several (b, h) (decode), so each row has its own address.
  {
    constexpr int kVec = 16 / sizeof(T), kPerRow = D / kVec;
    const T* q = static_cast<const T*>(p.q);
    for (int idx = threadIdx.x; idx < kBlockM * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (r < nrows) {
        int b, h, i;
        p.map.locate(row0 + r, b_base, h_base, b, h, i);
        val = *reinterpret_cast<const uint4*>(q + ((int64_t(b) * p.Hq + h) * p.Nq + i) * D + c);
      }
      *reinterpret_cast<uint4*>(sQ + r * D + c) = val;
    }
  }
  for (int idx = threadIdx.x; idx < kBlockM * D; idx += kThreads) sO[idx] = 0.f;
  for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
    sM[r] = -INFINITY;
    sL[r] = 0.f;
  }

  // This lane's softmax row and half of the key tile.
  const int lr = lane >> 1, half_ = lane & 1, wr = warp * 16 + lr;
  int rb = 0, rh = 0, ri = 0;
  const bool row_ok = wr < nrows;
  if (row_ok) p.map.locate(row0 + wr, b_base, h_base, rb, rh, ri);

  auto tile = [&](const T* ksrc, const T* vsrc, int n, bool own, int n0, const uint8_t* kpm_row) {
    __syncthreads();  // every warp is done with the previous sK / sV
    load_tile<T, D, kBlockN>(sK, ksrc, n, D);
    load_tile<T, D, kBlockN>(sV, vsrc, n, D);
    __syncthreads();
    for (int nb = 0; nb < kBlockN / 16; ++nb) {  // S = Q K^T
      AccFrag acc;
      wmma::fill_fragment(acc, 0.f);
      mma_rows<T, D / 16, wmma::col_major>(acc, sQ + warp * 16 * D, D, sK + nb * 16 * D, D, 16);
      wmma::store_matrix_sync(sS + warp * 16 * kBlockN + nb * 16, acc, kBlockN, wmma::mem_row_major);
    }
    __syncwarp();
    float* srow = sS + wr * kBlockN;
    T* prow = sP + wr * kBlockN;
    float mx = -INFINITY;
    for (int c = half_ * 32; c < half_ * 32 + 32; ++c) {
      const bool ok = row_ok && c < n && (!own || own_visible(ri, n0 + c, p.Nq, p.Nk, p.causal, p.window, kpm_row));
      const float s = ok ? srow[c] * p.scale_log2 : -INFINITY;
      srow[c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = sM[wr];
    const float m_new = fmaxf(m_old, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet
    const float alpha = exp2f(m_old - m_use);
    float sum = 0.f;
    for (int c = half_ * 32; c < half_ * 32 + 32; ++c) {
      const float e = exp2f(srow[c] - m_use);
      sum += e;
      prow[c] = from_float<T>(e);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (half_ == 0) {
      sM[wr] = m_new;
      sL[wr] = sL[wr] * alpha + sum;
      sAlpha[wr] = alpha;
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * D; idx += 32) sO[warp * 16 * D + idx] *= sAlpha[warp * 16 + idx / D];
    __syncwarp();
#pragma unroll
    for (int db = 0; db < D / 16; ++db) {
      AccFrag acc;  // O += P V
      wmma::load_matrix_sync(acc, sO + warp * 16 * D + db * 16, D, wmma::mem_row_major);
      mma_rows<T, kBlockN / 16, wmma::row_major>(acc, sP + warp * 16 * kBlockN, kBlockN, sV + db * 16, D, 16 * D);
      wmma::store_matrix_sync(sO + warp * 16 * D + db * 16, acc, D, wmma::mem_row_major);
    }
    __syncwarp();
  };

  __syncthreads();
  if (p.use_prefix) {
    const T* pk = static_cast<const T*>(p.pk) + int64_t(hkv) * p.P * D;
    const T* pv = static_cast<const T*>(p.pv) + int64_t(hkv) * p.P * D;
    const int lo = split * p.prefix_chunk, hi = min(p.P, lo + p.prefix_chunk);
    for (int n0 = lo; n0 < hi; n0 += kBlockN) tile(pk + n0 * D, pv + n0 * D, min(kBlockN, hi - n0), false, 0, nullptr);
  }
  if (p.use_own) {
    // Own keys need one batch index per block: problem kinds 0 and 2.
    const int64_t base = (int64_t(b_base) * p.Hkv + hkv) * p.Nk * D;
    const T* k = static_cast<const T*>(p.k) + base;
    const T* v = static_cast<const T*>(p.v) + base;
    const uint8_t* kpm_row = p.kpm ? p.kpm + int64_t(b_base) * p.Nk : nullptr;
    int lo = split * p.own_chunk, hi = min(p.Nk, lo + p.own_chunk);
    if (p.causal) {  // skip key tiles no row of this block can see
      int i_min = 0, i_max = p.Nq - 1;
      if (p.problem_kind == 0) { i_min = row0; i_max = row0 + nrows - 1; }
      hi = min(hi, i_max + p.Nk - p.Nq + 1);
      if (p.window > 0) lo = max(lo, i_min + p.Nk - p.Nq - p.window + 1);
    }
    for (int n0 = lo; n0 < hi; n0 += kBlockN)
      tile(k + int64_t(n0) * D, v + int64_t(n0) * D, min(kBlockN, hi - n0), true, n0, kpm_row);
  }

  // out = O / l (0 for a row that saw nothing), lse = ln(sum exp) = ln2 * (m + log2 l).
  if (row_ok) {
    const float l = sL[wr];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int64_t row = ((int64_t(split) * p.B + rb) * p.Hq + rh) * p.Nq + ri;
    OutT* out = static_cast<OutT*>(p.out) + row * D;
    for (int c = half_ * (D / 2); c < (half_ + 1) * (D / 2); ++c) out[c] = from_float<OutT>(sO[wr * D + c] * inv);
    if (half_ == 0) p.lse[row] = l > 0.f ? (sM[wr] + log2f(l)) * kLn2 : -INFINITY;
  }

  if (p.tickets != nullptr) {
    // Decode: the last split of this (problem, row tile) merges all partials (CUTLASS's
    // semaphore: fence, barrier, one atomic; the winner fences again and reads from L2).
    __threadfence();
    __syncthreads();
    int* ticket = p.tickets + int64_t(pz) * gridDim.y + blockIdx.y;
    const int splits = int(gridDim.x) / p.problems_per_split;
    if (threadIdx.x == 0) sAlpha[0] = atomicAdd(ticket, 1) == splits - 1 ? 1.f : 0.f;
    __syncthreads();
    if (sAlpha[0] != 0.f) {
      __threadfence();
      merge_partials<T>(p, sS, row0, nrows, b_base, h_base, D);
      if (threadIdx.x == 0) atomicExch(ticket, 0);  // ready for the next launch
    }
  }
#else
  __trap();  // the bindings refuse GPUs below sm_80
#endif
}

template <typename T, typename OutT, int D>
static void launch(const FwdParams& p, dim3 grid) {
  constexpr size_t smem = AttendSmem<T, D>::kBytes;
  auto kernel = attend_kernel<T, OutT, D>;
  RC_LAUNCH(kernel, grid, kThreads, smem, p);
}

// dtype: 0 fp16, 1 bf16. out_fp32: partial outputs for decode's log-sum-exp merge.
void launch_attend(const FwdParams& p, int dtype, bool out_fp32, int D, int problems, int splits) {
  const dim3 grid(problems * splits, (p.rows + kBlockM - 1) / kBlockM);
  TORCH_CHECK(grid.y <= 65535, "reasoncache: too many query rows per problem (", p.rows, ")");
#define RC_DISPATCH(T, HD)                       \
  if (out_fp32) launch<T, float, HD>(p, grid);   \
  else launch<T, T, HD>(p, grid);
  if (dtype == 0 && D == 64) { RC_DISPATCH(half, 64) }
  else if (dtype == 0 && D == 128) { RC_DISPATCH(half, 128) }
  else if (dtype == 1 && D == 64) { RC_DISPATCH(__nv_bfloat16, 64) }
  else if (dtype == 1 && D == 128) { RC_DISPATCH(__nv_bfloat16, 128) }
  else TORCH_CHECK(false, "reasoncache: no forward kernel for dtype code ", dtype, " and head dim ", D);
#undef RC_DISPATCH
}

// Dynamic shared memory one forward/decode block needs (0 for an unsupported combination).
size_t attend_smem_bytes(int dtype, int D) {
  if (dtype == 0 && D == 64) return AttendSmem<half, 64>::kBytes;
  if (dtype == 0 && D == 128) return AttendSmem<half, 128>::kBytes;
  if (dtype == 1 && D == 64) return AttendSmem<__nv_bfloat16, 64>::kBytes;
  if (dtype == 1 && D == 128) return AttendSmem<__nv_bfloat16, 128>::kBytes;
  return 0;
}

}  // namespace reasoncache
