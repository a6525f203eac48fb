// A CPU emulator for the subset of CUDA the reasoncache kernels use, so CI can run the
// real kernel source (csrc/fwd.cu, csrc/bwd.cu) on a machine without a GPU and compare it
// with the PyTorch reference. Built only by tests/test_cuda_emulated.py (RC_EMULATE).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; __syncthreads and
// __syncwarp are barriers that switch fibers, so the barrier structure of the kernels is
// exercised as written (a missing barrier between a write and another thread's read shows
// up as a wrong result, since fibers only switch at barriers).
// - mma.sync, ldmatrix and cp.async (csrc/mma.cuh) are modelled exactly: each
//   lane holds only its own registers in the PTX ISA's fragment layouts, collectives trade
//   them through the warp, and cp.async copies land only at the cp.async.wait_group that
//   guarantees them. Every ldmatrix and cp.async is also run through a shared-memory bank
//   model (SmemStats), so tests can assert the swizzle is conflict-free.
// What it does not check: timing, coalescing, register pressure, and races no barrier orders.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// IEEE fp16 and bf16 with the GPU's bit layouts (they alias torch's tensors).
struct half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(half h) { return float(std::bit_cast<_Float16>(h.bits)); }
inline half __float2half_rn(float f) { return half{std::bit_cast<uint16_t>(static_cast<_Float16>(f))}; }
inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return {uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline void __trap() { std::abort(); }

namespace rc_emu {

constexpr size_t kStack = 256 * 1024;

// One cp.async: 16 bytes, zero-filled when !valid (the source is then not read).
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  bool done = false;
  unsigned collective = 0;                // warp-collective calls so far (their exchange slot's parity)
  std::vector<Copy> open;                 // cp.async issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed groups not yet waited for, oldest first
  unsigned copies_since_barrier = 0;      // this lane's cp.async since the last __syncthreads
};

// What one warp's lanes hand each other in a collective (ldmatrix, mma.sync). Two slots,
// used alternately: a lane can be at most one collective ahead of the slowest lane.
struct WarpExchange {
  const unsigned char* addr[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
};

// Shared-memory bank behaviour of the collective loads and the async copies (16 bytes per
// lane each, served 8 lanes at a time): requests seen, and wavefronts beyond the one a
// conflict-free request needs. Read by tests through the emulated extension.
struct SmemStats {
  uint64_t ldmatrix_requests = 0, ldmatrix_extra_wavefronts = 0;
  uint64_t cp_async_requests = 0, cp_async_extra_wavefronts = 0;
};
inline SmemStats stats;

// Extra wavefronts of one phase: 8 accesses of 16 bytes at these shared-memory offsets.
// A bank serves one 4-byte word per wavefront (the same word to several lanes is a broadcast).
inline uint64_t extra_wavefronts(const long* offsets, int n) {
  std::vector<long> words[32];
  size_t worst = 0;
  for (int i = 0; i < n; ++i)
    for (long w = offsets[i] / 4; w < offsets[i] / 4 + 4; ++w) {
      auto& ws = words[w % 32];
      bool seen = false;
      for (long x : ws) seen = seen || x == w;
      if (!seen) ws.push_back(w);
      worst = std::max(worst, ws.size());
    }
  return worst ? worst - 1 : 0;
}

// One stack per thread slot, allocated once (uninitialised) and reused by every block.
inline char* stack_for(int t) {
  static std::vector<char*> stacks;
  while (int(stacks.size()) <= t) stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  return stacks[t];
}

struct Block {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  int current = 0, nthreads = 0;
  unsigned block_gen = 0;
  int block_arrived = 0;
  unsigned warp_gen[32] = {};
  int warp_arrived[32] = {};
  float shfl[32][32];
  std::function<void()> body;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<WarpExchange> exchange;
  std::vector<std::vector<std::array<long, 32>>> copies;  // [warp][k-th cp.async of each lane][lane] smem offsets
  dim3 block_idx, block_dim, grid_dim;
  uint64_t progress = 0;
  std::string error;  // set by fail()
};
inline Block* g = nullptr;

// An error inside a kernel: C++ exceptions cannot cross the fibers' context switches, so
// the fiber records it, stops, and the scheduler (run_block) throws it.
[[noreturn]] inline void fail(const std::string& what) {
  g->error = "cuda_emu: " + what;
  g->fibers[g->current].done = true;
  ++g->progress;
  swapcontext(&g->fibers[g->current].ctx, &g->sched);
  std::abort();  // never resumed
}

inline void yield() {
  Fiber& f = g->fibers[g->current];
  swapcontext(&f.ctx, &g->sched);
}
inline int lane() { return int(g->fibers[g->current].tid.x % 32); }
inline int warp() { return int(g->fibers[g->current].tid.x / 32); }

// At a block barrier every lane's copies since the last one are known: the k-th cp.async of
// each lane of a warp were one instruction; count its phases' bank conflicts.
inline void account_copies() {
  for (auto& warp_copies : g->copies) {
    for (auto& lanes : warp_copies)
      for (int ph = 0; ph < 4; ++ph) {
        long offs[8];
        int n = 0;
        for (int l = 8 * ph; l < 8 * ph + 8; ++l)
          if (lanes[l] >= 0) offs[n++] = lanes[l];
        if (n == 0) continue;
        ++stats.cp_async_requests;
        stats.cp_async_extra_wavefronts += extra_wavefronts(offs, n);
      }
    warp_copies.clear();
  }
  for (auto& f : g->fibers) f.copies_since_barrier = 0;
}

inline void syncthreads() {
  const unsigned gen = g->block_gen;
  if (++g->block_arrived == g->nthreads) {
    account_copies();
    g->block_arrived = 0;
    ++g->block_gen;
    ++g->progress;
  } else {
    while (g->block_gen == gen) yield();
  }
}
inline void syncwarp() {
  const int w = warp();
  const int size = std::min(32, g->nthreads - 32 * w);
  const unsigned gen = g->warp_gen[w];
  if (++g->warp_arrived[w] == size) {
    g->warp_arrived[w] = 0;
    ++g->warp_gen[w];
    ++g->progress;
  } else {
    while (g->warp_gen[w] == gen) yield();
  }
}

inline void fiber_main() {
  g->body();
  g->fibers[g->current].done = true;
  ++g->progress;
  swapcontext(&g->fibers[g->current].ctx, &g->sched);
}

// Run one block: resume the fibers round-robin until all are done; fail on a deadlock
// (a barrier some threads never reach).
inline void run_block(Block& b) {
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_for(t);
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    f.tid = dim3(unsigned(t));
    makecontext(&f.ctx, fiber_main, 0);
  }
  int done = 0;
  while (done < b.nthreads) {
    const uint64_t before = b.progress;
    done = 0;
    for (int t = 0; t < b.nthreads; ++t) {
      if (b.fibers[t].done) {
        ++done;
        continue;
      }
      b.current = t;
      swapcontext(&b.sched, &b.fibers[t].ctx);
      if (!b.error.empty()) throw std::runtime_error(b.error);
    }
    if (b.progress == before && done < b.nthreads)
      throw std::runtime_error("cuda_emu: deadlock (a barrier that not every thread of the block reaches)");
  }
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, const Args&... args) {
  constexpr size_t kMaxSmem = 227 * 1024;  // sm_90 opt-in limit
  if (smem_bytes > kMaxSmem) throw std::runtime_error("cuda_emu: kernel asks for more shared memory than sm_90 has");
  if (grid.y > 65535 || grid.z > 65535 || block.x * block.y * block.z > 1024)
    throw std::runtime_error("cuda_emu: launch configuration exceeds CUDA limits");
  std::vector<unsigned char> shared(smem_bytes + 256);
  unsigned char* aligned =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared.data()) + 255) & ~uintptr_t(255));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        // stale shared memory from the previous block, as on a GPU: never zeroed
        Block b;
        b.nthreads = int(block.x);
        b.fibers.resize(block.x);
        b.smem = aligned;
        b.smem_bytes = smem_bytes;
        b.exchange.resize((block.x + 31) / 32);
        b.copies.resize((block.x + 31) / 32);
        b.block_idx = dim3(x, y, z);
        b.block_dim = block;
        b.grid_dim = grid;
        b.body = [&] { kernel(args...); };
        Block* saved = g;
        g = &b;
        try {
          run_block(b);
        } catch (...) {
          g = saved;
          throw;
        }
        g = saved;
      }
}

}  // namespace rc_emu

#define threadIdx (rc_emu::g->fibers[rc_emu::g->current].tid)
#define blockIdx (rc_emu::g->block_idx)
#define blockDim (rc_emu::g->block_dim)
#define gridDim (rc_emu::g->grid_dim)
inline void __syncthreads() { rc_emu::syncthreads(); }
// Blocks run one after another and fibers switch only at barriers, so atomics are plain
// read-modify-writes and fences have nothing to order.
inline void __threadfence() {}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}
inline float __ldcg(const float* p) { return *p; }
namespace rc_emu {
// Blocks run one at a time in launch order here, so a flag an earlier block sets is set
// by now; one that is not would be waited for forever on a GPU as well (or by a later
// block: an ordering bug either way).
inline void expect_flag(const int* flag, int value) {
  if (*flag != value)
    fail("a block waits for a flag no earlier block set (" + std::to_string(*flag) + " != " + std::to_string(value) +
         ")");
}
}  // namespace rc_emu
inline void __syncwarp(unsigned = 0xffffffffu) { rc_emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const int w = rc_emu::warp(), l = rc_emu::lane();
  rc_emu::g->shfl[w][l] = v;
  rc_emu::syncwarp();
  const float r = rc_emu::g->shfl[w][l ^ mask];
  rc_emu::syncwarp();
  return r;
}


// ---------------------------------------------------------------- mma.cuh, emulated
// The register-level primitives of csrc/mma.cuh with the PTX ISA's per-lane layouts: each
// lane holds only its own fragment registers, and a collective exchanges them through the
// warp's slot between two halves of a __syncwarp, as the hardware does through its
// crossbar. cp.async copies are held back until the cp.async.wait_group that guarantees
// them (the latest moment the hardware may complete them), so a read before the right
// wait sees stale shared memory here.
namespace rc_emu {
inline Fiber& self() { return g->fibers[g->current]; }
inline const unsigned char* smem_checked(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < g->smem || c + bytes > g->smem + g->smem_bytes) fail(std::string(what) + " outside the block's shared memory");
  if (reinterpret_cast<uintptr_t>(c) % 16 != 0) fail(std::string(what) + " address not 16-byte aligned");
  return c;
}
inline uint16_t load16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
template <typename T>
inline float bits_to_float(uint16_t b) {
  if constexpr (std::is_same_v<T, half>) return __half2float(half{b});
  else return __bfloat162float(__nv_bfloat16{b});
}
// Element `half_` (0: low) of a register holding two 16-bit values.
template <typename T>
inline float elem(uint32_t reg, int half_) {
  return bits_to_float<T>(uint16_t(half_ ? reg >> 16 : reg & 0xffffu));
}

template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  WarpExchange& x = g->exchange[warp()];
  const int slot = self().collective++ & 1, ln = lane();
  x.addr[slot][ln] = smem_checked(row_ptr, 16, "ldmatrix row");
  syncwarp();
  if (ln == 0) {
    for (int j = 0; j < 4; ++j) {
      long offs[8];
      for (int i = 0; i < 8; ++i) offs[i] = long(x.addr[slot][8 * j + i] - g->smem);
      ++stats.ldmatrix_requests;
      stats.ldmatrix_extra_wavefronts += extra_wavefronts(offs, 8);
    }
  }
  const int gq = ln / 4, tq = ln % 4;
  for (int j = 0; j < 4; ++j) {
    const unsigned char* const* rows = x.addr[slot] + 8 * j;
    if (!kTrans) {
      r[j] = uint32_t(load16(rows[gq] + 4 * tq)) | uint32_t(load16(rows[gq] + 4 * tq + 2)) << 16;
    } else {
      r[j] = uint32_t(load16(rows[2 * tq] + 2 * gq)) | uint32_t(load16(rows[2 * tq + 1] + 2 * gq)) << 16;
    }
  }
}
}  // namespace rc_emu

namespace reasoncache {
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace rc_emu;
  WarpExchange& x = g->exchange[warp()];
  const int slot = self().collective++ & 1, ln = lane();
  std::memcpy(x.a[slot][ln], a, sizeof(a));
  std::memcpy(x.b[slot][ln], b, sizeof(b));
  syncwarp();
  // A(row, k) and B(k, n) gathered from the lanes that hold them (layouts in mma.cuh).
  auto A = [&](int row, int k) {
    const int reg = (row >= 8) + 2 * (k >= 8);
    return elem<T>(x.a[slot][4 * (row % 8) + (k % 8) / 2][reg], k % 2);
  };
  auto B = [&](int k, int n) { return elem<T>(x.b[slot][4 * n + (k % 8) / 2][k >= 8], k % 2); };
  const int gq = ln / 4, tq = ln % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = gq + 8 * (e >> 1), col = 2 * tq + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) { rc_emu::ldmatrix_x4<false>(r, row_ptr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) { rc_emu::ldmatrix_x4<true>(r, row_ptr); }

inline void cp_async_16(void* dst, const void* src, bool valid) {
  using namespace rc_emu;
  auto* d = const_cast<unsigned char*>(smem_checked(dst, 16, "cp.async destination"));
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
  Fiber& f = self();
  f.open.push_back({d, static_cast<const unsigned char*>(src), valid});
  auto& seq = g->copies[warp()];
  if (seq.size() <= f.copies_since_barrier) {
    seq.emplace_back();
    seq.back().fill(-1);
  }
  seq[f.copies_since_barrier++][lane()] = long(d - g->smem);
}
inline void cp_async_commit() {
  rc_emu::Fiber& f = rc_emu::self();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  rc_emu::Fiber& f = rc_emu::self();
  while (f.groups.size() > size_t(N)) {
    for (const auto& c : f.groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    f.groups.erase(f.groups.begin());
  }
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, half>) return uint32_t(__float2half_rn(lo).bits) | uint32_t(__float2half_rn(hi).bits) << 16;
  else return uint32_t(__float2bfloat16_rn(lo).bits) | uint32_t(__float2bfloat16_rn(hi).bits) << 16;
}
template <typename T>
inline float unpack(uint32_t reg, int hi) {
  return rc_emu::elem<T>(reg, hi);
}
}  // namespace reasoncache
