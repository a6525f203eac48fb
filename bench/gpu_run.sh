#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the GPU tests (Triton and
# CUDA against the fp64 oracle), then the kernel and decode benchmarks. Results go to
# $OUT (default bench/results/gpu): copy the JSON into bench/results/ and commit it.
# Offline-safe: installs nothing from a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)" | tee -a "$OUT/device.txt"
export MAX_JOBS="${MAX_JOBS:-16}" REASONCACHE_TEST_ON_GPU=1
(time python3 -m pip install --no-build-isolation --no-deps --no-index -e .) > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python3 -m pytest -q tests/test_gpu.py tests/test_cuda_ext.py -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -30
python3 -m bench kernel --device cuda --out "$OUT/kernel.json" 2>&1 | tail -60 | tee "$OUT/kernel.txt"
python3 -m bench decode --device cuda --out "$OUT/decode.json" 2>&1 | tail -40 | tee "$OUT/decode.txt"
