// The kernel source compiled for the CPU emulator (csrc/emu/cuda_emu.h); see tests/test_cuda_emulated.py.
#include "../fwd.cu"
