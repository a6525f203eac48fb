// Register-level tensor-core primitives with documented layouts (PTX ISA, "Warp-level matrix
// instructions"), the shared-memory swizzle, and asynchronous copies. The CPU emulator
// (emu/cuda_emu.h) implements the same functions with the same per-lane layouts.
//
// Fragments of mma.sync.m16n8k16 (row.col, fp32 accumulate), lane = 4 * g + t:
//   A (16 x 16, 4 regs of 2 elements): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8,  2 regs):               b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C (16 x 8,  4 fp32):               c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// Two C tiles side by side (16 x 16) are, element for element, the A operand of the next
// product: P = softmax(S) feeds P V without leaving registers (FlashAttention-2).
// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; register j of lane
// 4g + t holds row g, columns 2t..2t+1 of matrix j (.trans: rows 2t..2t+1 of column g).
#pragma once

#include <cstdint>
#include <type_traits>

namespace reasoncache {

// A [rows, D] tile of 16-bit elements in shared memory, stored in 16-byte chunks with
// chunk c of row r at position c ^ (r % 8). Any 8 consecutive rows at one logical chunk
// (an ldmatrix phase) and any 8 consecutive chunks of one row (a quarter-warp of 16-byte
// stores) then cover all 32 banks once: conflict-free. D is a multiple of 64 (>= 8 chunks).
template <int D>
__host__ __device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

}  // namespace reasoncache

#ifndef RC_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace reasoncache {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// d += a * b on tensor cores; T is half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(T) == 2 && std::is_same_v<T, half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// 16 bytes global -> shared without a register round trip; when !valid, the 16 bytes are
// zero-filled and nothing is read (src must still be a valid address to name).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two floats rounded to T, packed low-first into one 32-bit register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Element `hi` (0: the low half) of a register packed by pack2, as float.
template <typename T>
__device__ __forceinline__ float unpack(uint32_t reg, int hi) {
  const uint16_t bits = uint16_t(hi ? reg >> 16 : reg & 0xffffu);
  if constexpr (std::is_same_v<T, half>) return __half2float(__ushort_as_half(bits));
  else return __bfloat162float(__ushort_as_bfloat16(bits));
}

}  // namespace reasoncache
#endif
