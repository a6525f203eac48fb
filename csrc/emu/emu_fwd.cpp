// The kernel source compiled for the CPU emulator (csrc/emu/cuda_emu.h); see tests/test_cuda_emulated.py.
#include "../fwd.cu"

// The emulator's shared-memory bank counters (SmemStats), for the bindings, which do not
// include the emulator's header: requests and extra wavefronts of ldmatrix, then cp.async.
std::array<uint64_t, 4> rc_emu_smem_stats(bool reset) {
  const auto s = rc_emu::stats;
  if (reset) rc_emu::stats = {};
  return {s.ldmatrix_requests, s.ldmatrix_extra_wavefronts, s.cp_async_requests, s.cp_async_extra_wavefronts};
}

// Extra wavefronts of one 8-lane phase of 16-byte shared-memory accesses at these byte offsets.
uint64_t rc_emu_extra_wavefronts(const std::vector<long>& offsets) {
  return rc_emu::extra_wavefronts(offsets.data(), int(offsets.size()));
}
