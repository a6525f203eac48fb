// Shared pieces of the prefix-attention CUDA kernels: parameter structs, element
// conversions, the output store and the masking rule.
//
// Layout conventions (every tensor contiguous: the bindings require it, backends.py makes it so):
//   q, out, dout, dq  [B, Hq, Nq, D]      k, v, dk, dv  [B, Hkv, Nk, D]
//   prefix_k/v        [Hkv, P, D]         lse, delta    [B, Hq, Nq] fp32
// Scores live in the log2 domain: s2 = (q . k) * scale * log2(e), so exp2 replaces exp.
#pragma once

#ifdef RC_EMULATE  // CPU emulation for CI (csrc/emu/cuda_emu.h)
#include "emu/cuda_emu.h"
#define RC_DYNAMIC_SMEM(name) unsigned char* name = rc_emu::g->smem
#define RC_LAUNCH(kernel, grid, threads, smem, ...) rc_emu::launch(kernel, grid, dim3(threads), smem, __VA_ARGS__)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define RC_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define RC_LAUNCH(kernel, grid, threads, smem, ...)                                                         \
  do {                                                                                                      \
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));  \
    kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);                         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                         \
  } while (0)
#endif
#include <c10/util/Exception.h>

#include <cstdint>

#include "params.h"

namespace reasoncache {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;             // warps per block; each owns 16 rows of a 64-row tile
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // query rows per tile
constexpr int kBlockN = 64;           // keys per tile

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<half>(half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ half from_float<half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

// Two adjacent output elements (columns c, c + 1 of one row), rounded to OutT.
template <typename OutT>
__device__ __forceinline__ void store2(OutT* dst, float a, float b) {
  dst[0] = from_float<OutT>(a);
  dst[1] = from_float<OutT>(b);
}

// Block until *flag == value, written by an earlier block (in launch order) and published
// with __threadfence before it. Thread 0 waits; the barrier releases the block. Progress
// relies on blocks being dispatched in increasing linear index, as FA2/FA3's deterministic
// backward does: the block waited for always has the lower index.
__device__ __forceinline__ void wait_for_flag(int* flag, int value) {
#ifdef RC_EMULATE
  rc_emu::expect_flag(flag, value);
#else
  if (threadIdx.x == 0) {
    while (atomicCAS(flag, value, value) != value) {
    }
    __threadfence();
  }
#endif
  __syncthreads();
}

// The op's visibility rule for own keys (reference.causal_visibility): query i sees key j
// iff j <= i + nk - nq and, with a window W > 0, j > i + nk - nq - W; padded keys never.
__device__ __forceinline__ bool own_visible(int i, int j, int nq, int nk, bool causal, int window,
                                            const uint8_t* __restrict__ kpm_row) {
  if (kpm_row != nullptr && !kpm_row[j]) return false;
  if (!causal) return true;
  const int diag = i + nk - nq;
  return j <= diag && (window <= 0 || j > diag - window);
}

}  // namespace reasoncache
