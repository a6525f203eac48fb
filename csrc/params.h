// Kernel parameter blocks, shared by the host bindings (C++) and the kernels (CUDA).
#pragma once

#include <cstdint>

namespace reasoncache {

constexpr float kLog2e = 1.4426950408889634f;

// Where a block's query rows come from. Row r of problem z maps to
//   bb = r / (group * nq), g = (r / nq) % group, i = r % nq,
//   batch b = b_base + bb, query head h = h_base + g, query position i.
// Plain forward: one problem per (b, hq), group = 1. Decode's prefix pass: one problem
// per KV head holding every sequence's queries of that head (Hydragen's inter-sequence
// batching), so the prefix is read once per batch. Decode's own-cache pass: one problem
// per (split, b, KV head).
struct RowMap {
  int group, nq;
#ifdef __CUDACC__
  __device__ __forceinline__
#else
  inline  // the CPU emulator (RC_EMULATE) and host code
#endif
  void locate(int r, int b_base, int h_base, int& b, int& h, int& i) const {
    b = b_base + r / (group * nq);
    h = h_base + (r / nq) % group;
    i = r % nq;
  }
};

struct FwdParams {
  const void *q, *k, *v, *pk, *pv;
  const uint8_t* kpm;  // [B, Nk] or nullptr
  void* out;           // [S, B, Hq, Nq, D] where S = number of key splits (1 unless decoding)
  float* lse;          // [S, B, Hq, Nq]
  int B, Hq, Hkv, Nq, Nk, P;
  int rows;            // rows per problem
  int problems_per_split;
  RowMap map;
  int problem_kind;    // 0: per (b, hq); 1: per hkv (all batches); 2: per (b, hkv)
  bool use_prefix, use_own, causal;
  int window;
  int own_chunk;       // own keys per split (decode); Nk otherwise
  int prefix_chunk;    // prefix keys per split (decode); P otherwise
  float scale_log2;    // softmax scale * log2(e)
  // Decode's own pass merges every partial in the kernel: the last split of a (problem,
  // row tile) to finish (counted in `tickets`, which it leaves at 0) merges the n_parts
  // partials (prefix splits, then own splits) into final_out / final_lse. nullptr: no merge.
  int* tickets;        // [problems x row tiles]
  int n_parts;         // <= kMaxParts
  const float* parts;     // [n_parts, B, Hq, Nq, D]
  const float* part_lse;  // [n_parts, B, Hq, Nq]
  void* final_out;     // [B, Hq, Nq, D], the input dtype
  float* final_lse;    // [B, Hq, Nq]
};

// The in-kernel merge keeps one weight per (row, partial) in a 64 x 64 shared tile.
constexpr int kMaxParts = 64;

// Query rows per block of the forward/decode kernel for a problem of `rows` rows: one warp
// (16 rows) when that covers it, else four (64 rows).
constexpr int attend_row_tile(int rows) { return rows <= 16 ? 16 : 64; }

struct BwdParams {
  const void *q, *k, *v, *pk, *pv, *dout;
  const uint8_t* kpm;
  const float *lse, *delta;  // lse natural log; delta = rowsum(dout * out) - dlse
  void *dq, *dk, *dv;
  float *dpk_part, *dpv_part;  // [splits, Hkv, P, D]
  // dq in fp32, unscaled: the prefix's share written by dq_kernel, then each own-key tile's
  // share added by dkdv_kernel in key-tile order (dq_order[row tile] = the last tile that
  // added; dq_kernel sets it to -1), then scaled and rounded by dq_finish_kernel.
  float* dq_accum;  // [B, Hq, Nq, D]
  int* dq_order;    // [B, Hq, ceil(Nq / 64)]
  int B, Hq, Hkv, Nq, Nk, P, splits;
  bool causal;
  int window;
  float scale, scale_log2;
};

}  // namespace reasoncache
