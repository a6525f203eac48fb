// pybind11 bindings of reasoncache._C: argument checks, then the kernel launches.
//
// Every check that can fail runs before any device work, in this order: dimensions and
// shapes, dtypes, layout (contiguous, 16-byte aligned), supported head dims, and last the
// device. A bad argument raises ValueError or TypeError naming it. The bindings require
// contiguous tensors and copy nothing; the CUDA backend (reasoncache/ops/backends.py)
// makes its inputs contiguous before it calls them.
#include <torch/extension.h>
#ifndef RC_EMULATE
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define RC_DEVICE_GUARD(t) const c10::cuda::CUDAGuard guard_((t).device())
#else  // CPU emulation for CI: tensors stay on the CPU, a pretend GPU of 4 SMs
#define RC_DEVICE_GUARD(t) (void)0
#endif

#include <array>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "params.h"

namespace reasoncache {
void launch_attend(const FwdParams& p, int dtype, bool out_fp32, int D, int problems, int splits);
void launch_bwd(const BwdParams& p, int dtype, int D);
size_t attend_smem_bytes(int dtype, int D);
size_t bwd_smem_bytes(int dtype, int D);
}  // namespace reasoncache
#ifdef RC_EMULATE
std::array<uint64_t, 4> rc_emu_smem_stats(bool reset);  // emu/emu_fwd.cpp
uint64_t rc_emu_extra_wavefronts(const std::vector<long>& offsets);
#endif

namespace {
namespace rc = reasoncache;
using at::Tensor;

std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_dims(const Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", layout, " (", dim, " dims), got shape ", shape_str(t));
}

void check_layout(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (strides ", t.strides(), " for shape ",
                    shape_str(t), "); call .contiguous() first");
  TORCH_CHECK_VALUE(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " must be 16-byte aligned (a view at an odd offset); call .clone() first");
}

int dtype_code(const Tensor& q) {
  if (q.scalar_type() == at::kHalf) return 0;
  if (q.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK_TYPE(false, "q must be float16 or bfloat16 for the CUDA kernels, got ", q.scalar_type(),
                   " (fp32 runs on the triton or torch backend)");
  return -1;
}

struct Dims {
  int64_t B, Hq, Hkv, Nq, Nk, P, D;
};

// The shared checks of fwd, decode and bwd: everything but the device, then the device.
Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                  const std::optional<Tensor>& kpm, int64_t window) {
  check_dims(q, "q", 4, "[B, Hq, Nq, D]");
  check_dims(k, "k", 4, "[B, Hkv, Nk, D]");
  check_dims(v, "v", 4, "[B, Hkv, Nk, D]");
  check_dims(pk, "prefix_k", 3, "[Hkv, P, D]");
  check_dims(pv, "prefix_v", 3, "[Hkv, P, D]");
  const Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), pk.size(1), q.size(3)};
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", shape_str(k), " and v ",
                    shape_str(v));
  TORCH_CHECK_VALUE(k.size(0) == d.B && k.size(3) == d.D, "k must be [B, Hkv, Nk, D] with B=", d.B, " and D=", d.D,
                    " from q ", shape_str(q), ", got ", shape_str(k));
  TORCH_CHECK_VALUE(d.Hkv > 0 && d.Hq % d.Hkv == 0, "q's heads (", d.Hq, ") must be a multiple of k's heads (",
                    d.Hkv, ")");
  TORCH_CHECK_VALUE(pk.sizes() == pv.sizes(), "prefix_k and prefix_v must have the same shape, got ",
                    shape_str(pk), " and ", shape_str(pv));
  TORCH_CHECK_VALUE(pk.size(0) == d.Hkv && pk.size(2) == d.D, "prefix_k must be [Hkv, P, D] with Hkv=", d.Hkv,
                    " and D=", d.D, ", got ", shape_str(pk));
  TORCH_CHECK_VALUE(window >= 0, "sliding_window must be >= 0 (0: no window), got ", window);
  dtype_code(q);
  const std::pair<const Tensor*, const char*> named[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}, {&pk, "prefix_k"},
                                                         {&pv, "prefix_v"}};
  for (const auto& [t, name] : named)
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                     t->scalar_type());
  for (const auto& [t, name] : named) check_layout(*t, name);
  if (kpm) {
    check_dims(*kpm, "key_padding_mask", 2, "[B, Nk]");
    TORCH_CHECK_VALUE(kpm->size(0) == d.B && kpm->size(1) == d.Nk, "key_padding_mask must be [B, Nk] = [", d.B,
                      ", ", d.Nk, "], got ", shape_str(*kpm));
    TORCH_CHECK_TYPE(kpm->scalar_type() == at::kBool, "key_padding_mask must be bool, got ", kpm->scalar_type());
    check_layout(*kpm, "key_padding_mask");
  }
  TORCH_CHECK_VALUE(d.D == 64 || d.D == 128, "head dim ", d.D,
                    " has no CUDA kernel (64 and 128 do); use backend='triton' or 'torch'");
  for (const auto& [t, name] : named) {
#ifndef RC_EMULATE
    TORCH_CHECK_VALUE(t->is_cuda(), name, " must be a CUDA tensor, got device ", t->device());
#endif
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " is on ", t->device(), " but q is on ", q.device());
  }
  if (kpm) TORCH_CHECK_VALUE(kpm->device() == q.device(), "key_padding_mask is on ", kpm->device(),
                              " but q is on ", q.device());
#ifndef RC_EMULATE
  const auto cap = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK_VALUE(cap->major >= 8, "the CUDA kernels need compute capability 8.0 or newer, ", cap->name, " is ",
                    cap->major, ".", cap->minor);
#endif
  return d;
}

rc::FwdParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk, const Tensor& pv,
                          const std::optional<Tensor>& kpm, const Dims& d, bool causal, double scale,
                          int64_t window) {
  rc::FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.pk = pk.data_ptr();
  p.pv = pv.data_ptr();
  p.kpm = kpm ? reinterpret_cast<const uint8_t*>(kpm->data_ptr<bool>()) : nullptr;
  p.B = d.B, p.Hq = d.Hq, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nk = d.Nk, p.P = d.P;
  p.causal = causal;
  p.window = causal ? int(window) : 0;
  p.scale_log2 = float(scale) * rc::kLog2e;
  return p;
}

// Zeroed int32 tickets for decode's in-kernel merge: allocated once per device and grown
// when needed; the kernel leaves every ticket at 0. Two decode launches on one device must
// not run concurrently on different streams (they share them).
Tensor decode_tickets(const Tensor& like, int64_t n) {
  static std::mutex mu;
  // Never destroyed: a static tensor freed after the CUDA allocator at exit would crash.
  static auto* by_device = new std::map<std::string, Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  Tensor& t = (*by_device)[like.device().str()];
  if (!t.defined() || t.numel() < n)
    t = at::zeros({std::max<int64_t>(n, 1024)}, like.options().dtype(at::kInt));
  return t;
}

// out [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32.
std::vector<Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                        const Tensor& prefix_v, const std::optional<Tensor>& key_padding_mask, bool causal,
                        double softmax_scale, int64_t sliding_window) {
  const Dims d = check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, sliding_window);
  RC_DEVICE_GUARD(q);
  auto out = at::empty_like(q);
  auto lse = at::empty({d.B, d.Hq, d.Nq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  auto p = base_params(q, k, v, prefix_k, prefix_v, key_padding_mask, d, causal, softmax_scale, sliding_window);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.rows = int(d.Nq);
  p.map = {1, int(d.Nq)};
  p.problem_kind = 0;
  p.problems_per_split = int(d.B * d.Hq);
  p.use_prefix = d.P > 0;
  p.use_own = d.Nk > 0;
  p.own_chunk = int(d.Nk);
  p.prefix_chunk = int(d.P);
  rc::launch_attend(p, dtype_code(q), false, int(d.D), int(d.B * d.Hq), 1);
  return {out, lse};
}

// Decode (Nq <= 16). Prefix pass: every sequence's queries of a KV head form one tile
// problem (Hydragen's inter-sequence batching), so each prefix tile is read once per
// 64 query rows of the whole batch, not once per sequence; the prefix is split across
// blocks when there are too few row tiles to fill the GPU. Own-cache pass: one problem
// per (sequence, KV head), its cache split across `num_splits` blocks. All parts merge
// by their log-sum-exp inside the own pass (its last split per tile), so decode is two
// launches and no torch ops.
std::vector<Tensor> decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prefix_k,
                           const Tensor& prefix_v, const std::optional<Tensor>& key_padding_mask, bool causal,
                           double softmax_scale, int64_t sliding_window, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.dim() != 4 || (q.size(2) >= 1 && q.size(2) <= 16),
                    "decode takes 1..16 queries per sequence, got Nq=", q.size(2));
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: choose), got ", num_splits);
  const Dims d = check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, sliding_window);
  RC_DEVICE_GUARD(q);
  const int64_t G = d.Hq / d.Hkv;
#ifndef RC_EMULATE
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#else
  const int64_t sms = 4;
#endif
  // Split a key range of n keys over enough blocks to reach ~2 blocks per SM, >= 256 keys
  // each, at most kMaxParts / 2 splits (the in-kernel merge holds kMaxParts weights a row).
  auto chunk_for = [&](int64_t n, int64_t blocks, int64_t splits) {
    if (splits == 0) splits = std::max<int64_t>(1, std::min<int64_t>((2 * sms + blocks - 1) / blocks, (n + 255) / 256));
    splits = std::min<int64_t>(splits, rc::kMaxParts / 2);
    return std::max<int64_t>(64, ((n + splits - 1) / splits + 63) / 64 * 64);
  };
  auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({d.B, d.Hq, d.Nq}, f32);
  if (q.numel() == 0) return {out, lse};
  const int64_t pre_rows = d.B * G * d.Nq;
  const int64_t pre_bm = rc::attend_row_tile(int(std::min<int64_t>(pre_rows, 64)));
  const int64_t pre_tiles = (pre_rows + pre_bm - 1) / pre_bm;
  const int64_t pre_chunk = d.P > 0 ? chunk_for(d.P, d.Hkv * pre_tiles, 0) : 1;
  const int64_t pre_splits = d.P > 0 ? (d.P + pre_chunk - 1) / pre_chunk : 0;
  const int64_t own_bm = rc::attend_row_tile(int(G * d.Nq));
  const int64_t own_tiles = (G * d.Nq + own_bm - 1) / own_bm;
  const int64_t own_chunk = d.Nk > 0 ? chunk_for(d.Nk, d.B * d.Hkv * own_tiles, num_splits) : 1;
  // The own pass always runs (with Nk = 0, one empty split): its last split merges.
  const int64_t own_splits = d.Nk > 0 ? (d.Nk + own_chunk - 1) / own_chunk : 1;
  const int64_t parts_n = pre_splits + own_splits;
  // Every partial row is written by exactly one block, so nothing needs initialising.
  auto parts = at::empty({parts_n, d.B, d.Hq, d.Nq, d.D}, f32);
  auto lses = at::empty({parts_n, d.B, d.Hq, d.Nq}, f32);
  auto p = base_params(q, k, v, prefix_k, prefix_v, key_padding_mask, d, causal, softmax_scale, sliding_window);
  p.map = {int(G), int(d.Nq)};
  if (pre_splits > 0) {
    auto pp = p;
    pp.out = parts.data_ptr();
    pp.lse = lses.data_ptr<float>();
    pp.rows = int(pre_rows);
    pp.problem_kind = 1;
    pp.problems_per_split = int(d.Hkv);
    pp.use_prefix = true;
    pp.use_own = false;
    pp.prefix_chunk = int(pre_chunk);
    rc::launch_attend(pp, dtype_code(q), true, int(d.D), int(d.Hkv), int(pre_splits));
  }
  auto po = p;
  po.out = parts[pre_splits].data_ptr();
  po.lse = lses[pre_splits].data_ptr<float>();
  po.rows = int(G * d.Nq);
  po.problem_kind = 2;
  po.problems_per_split = int(d.B * d.Hkv);
  po.use_prefix = false;
  po.use_own = true;
  po.own_chunk = int(own_chunk);
  po.tickets = decode_tickets(q, d.B * d.Hkv * own_tiles).data_ptr<int>();
  po.n_parts = int(parts_n);
  po.parts = parts.data_ptr<float>();
  po.part_lse = lses.data_ptr<float>();
  po.final_out = out.data_ptr();
  po.final_lse = lse.data_ptr<float>();
  rc::launch_attend(po, dtype_code(q), true, int(d.D), int(d.B * d.Hkv), int(own_splits));
  return {out, lse};
}

// dq, dk, dv (inputs' dtype), dprefix_k, dprefix_v (fp32, summed over the batch).
std::vector<Tensor> bwd(const Tensor& dout, const std::optional<Tensor>& dlse, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& prefix_k, const Tensor& prefix_v,
                        const std::optional<Tensor>& key_padding_mask, const Tensor& out, const Tensor& lse,
                        bool causal, double softmax_scale, int64_t sliding_window) {
  check_dims(dout, "dout", 4, "[B, Hq, Nq, D]");
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes(), "dout must have q's shape ", shape_str(q), ", got ",
                    shape_str(dout));
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have q's shape ", shape_str(q), ", got ", shape_str(out));
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    "lse must be [B, Hq, Nq] from q ", shape_str(q), ", got ", shape_str(lse));
  if (dlse)
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), "dlse must have lse's shape ", shape_str(lse), ", got ",
                      shape_str(*dlse));
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type(), "dout must have q's dtype ", q.scalar_type(), ", got ",
                   dout.scalar_type());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_layout(dout, "dout");
  check_layout(lse, "lse");
  const Dims d = check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, sliding_window);
  TORCH_CHECK_VALUE(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "dout, out and lse must be on q's device ", q.device());
  RC_DEVICE_GUARD(q);
  auto delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (dlse) delta = delta - dlse->to(at::kFloat);
  delta = delta.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(d.B, 16));
  auto f32 = q.options().dtype(at::kFloat);
  auto dpk_part = at::empty({splits, d.Hkv, d.P, d.D}, f32), dpv_part = at::empty({splits, d.Hkv, d.P, d.D}, f32);
  if (q.numel() == 0 || d.B == 0) {
    return {dq.zero_(), dk.zero_(), dv.zero_(), at::zeros_like(prefix_k), at::zeros_like(prefix_v)};
  }
  rc::BwdParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.pk = prefix_k.data_ptr(), p.pv = prefix_v.data_ptr(), p.dout = dout.data_ptr();
  p.kpm = key_padding_mask ? reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr<bool>()) : nullptr;
  p.lse = lse.data_ptr<float>(), p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dpk_part = dpk_part.data_ptr<float>(), p.dpv_part = dpv_part.data_ptr<float>();
  auto dq_accum = at::empty(q.sizes(), f32);
  auto dq_order = at::empty({d.B, d.Hq, (d.Nq + 63) / 64}, q.options().dtype(at::kInt));
  p.dq_accum = dq_accum.data_ptr<float>(), p.dq_order = dq_order.data_ptr<int>();
  p.B = d.B, p.Hq = d.Hq, p.Hkv = d.Hkv, p.Nq = d.Nq, p.Nk = d.Nk, p.P = d.P, p.splits = int(splits);
  p.causal = causal;
  p.window = causal ? int(sliding_window) : 0;
  p.scale = float(softmax_scale);
  p.scale_log2 = float(softmax_scale) * rc::kLog2e;
  rc::launch_bwd(p, dtype_code(q), int(d.D));
  // fixed-order sum of the per-split partials: deterministic
  return {dq, dk, dv, dpk_part.sum(0).to(prefix_k.scalar_type()), dpv_part.sum(0).to(prefix_v.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "reasoncache CUDA kernels: prefix-augmented flash attention (forward, backward, decode)";
  m.def("fwd", &fwd, "out, lse = fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, "
                     "sliding_window)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("softmax_scale"), py::arg("sliding_window"));
  m.def("decode", &decode, "out, lse = decode(..., num_splits=0): Nq <= 16, Hydragen-batched prefix, split-KV own cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("softmax_scale"), py::arg("sliding_window"),
        py::arg("num_splits") = 0);
  m.def("bwd", &bwd, "dq, dk, dv, dprefix_k, dprefix_v = bwd(dout, dlse, q, k, v, prefix_k, prefix_v, "
                     "key_padding_mask, out, lse, causal, softmax_scale, sliding_window)",
        py::arg("dout"), py::arg("dlse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"),
        py::arg("prefix_v"), py::arg("key_padding_mask"), py::arg("out"), py::arg("lse"), py::arg("causal"),
        py::arg("softmax_scale"), py::arg("sliding_window"));
  m.def(
      "smem_bytes",
      [](const std::string& kernel, bool bf16, int64_t head_dim) -> int64_t {
        TORCH_CHECK_VALUE(kernel == "fwd" || kernel == "bwd", "kernel must be 'fwd' or 'bwd', got '", kernel, "'");
        const int code = bf16 ? 1 : 0;
        return int64_t(kernel == "fwd" ? rc::attend_smem_bytes(code, int(head_dim)) : rc::bwd_smem_bytes(code, int(head_dim)));
      },
      "bytes of dynamic shared memory one block of the 'fwd' (forward and decode) or 'bwd' kernels needs for "
      "bf16 (else fp16) at head_dim; 0 where there is no kernel",
      py::arg("kernel"), py::arg("bf16"), py::arg("head_dim"));
#ifdef RC_EMULATE
  m.def(
      "smem_stats",
      [](bool reset) {
        const auto s = rc_emu_smem_stats(reset);
        return std::map<std::string, uint64_t>{{"ldmatrix_requests", s[0]},
                                               {"ldmatrix_extra_wavefronts", s[1]},
                                               {"cp_async_requests", s[2]},
                                               {"cp_async_extra_wavefronts", s[3]}};
      },
      "the emulator's shared-memory bank counts since the last reset (then resets them if `reset`)",
      py::arg("reset") = false);
  m.def("extra_wavefronts", &rc_emu_extra_wavefronts,
        "wavefronts beyond the first that 16-byte accesses at these shared-memory byte offsets need",
        py::arg("offsets"));
#endif
}
