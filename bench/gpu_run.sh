#!/usr/bin/env bash
# The GPU checks, as stages that each fit one device call (under 8 minutes on an H100/H200)
# and can run as separate calls:
#
#   bash bench/gpu_run.sh smoke          device + versions, then `bench smoke` on the Triton kernels
#   bash bench/gpu_run.sh triton-tests   tests/test_gpu.py (Triton) and the op tests on the GPU
#   bash bench/gpu_run.sh bench          the kernel benchmark (Triton beside SDPA, FlexAttention)
#   bash bench/gpu_run.sh decode         the decode benchmark (Triton, torch, copied prefix)
#   bash bench/gpu_run.sh cuda           build reasoncache._C for this GPU, its tests, `bench smoke`
#   bash bench/gpu_run.sh sanitize       compute-sanitizer (memcheck, racecheck, synccheck, initcheck)
#                                        on the CUDA kernels at small odd shapes (after `cuda`)
#
# Results go to $OUT (the device tool's folder; default bench/results/gpu): JSON written as
# each shape or item finishes, logs, junit XML. A failing step is recorded and the stage
# goes on; Triton and CUDA never share a process (a fault in kernels that never ran on a GPU
# must not poison the other backend's results). Offline: installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout, kernels through reasoncache/kernels
py=python3
status=0
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record the exit code, go on
  local name="$1"; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -25 "$OUT/$name.log"
  echo "== $name: exit $rc" | tee -a "$OUT/stages.txt"
  [ "$rc" -eq 0 ] || status=1
}

case "$stage" in
  smoke)
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
      git rev-parse HEAD 2>/dev/null; } | tee "$OUT/device.txt"
    step smoke_triton $py -m bench smoke --backend triton --out "$OUT/smoke_triton.json"
    ;;
  triton-tests)
    step triton_tests $py -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_op.py -k "not cuda" \
      --junitxml "$OUT/triton_tests.xml"
    ;;
  bench)
    step kernel_bench $py -m bench kernel --device cuda --out "$OUT/kernel.json" \
      --methods reasoncache-triton,sdpa-concat-lower-right,sdpa-concat-mask,hydragen-flex,sdpa-flash,sdpa-cudnn
    ;;
  decode)
    step decode_bench $py -m bench decode --device cuda --backends triton,torch --out "$OUT/decode.json"
    ;;
  cuda)
    export MAX_JOBS="${MAX_JOBS:-16}" REASONCACHE_PTXAS_VERBOSE=1
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
    step cuda_build $py setup.py build_ext --inplace
    step cuda_tests $py -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py tests/test_gpu.py -k "cuda or ext" \
      --junitxml "$OUT/cuda_tests.xml"
    step smoke_cuda $py -m bench smoke --backend cuda --out "$OUT/smoke_cuda.json"
    ;;
  sanitize)
    for tool in memcheck racecheck synccheck initcheck; do
      extra=(); [ "$tool" = racecheck ] && extra=(--racecheck-report all)
      step "sanitize_$tool" compute-sanitizer --tool "$tool" ${extra[@]+"${extra[@]}"} --error-exitcode 1 \
        $py -m bench smoke --backend cuda --only errors --out "$OUT/sanitize_$tool.json"
    done
    ;;
  *)
    echo "usage: bash bench/gpu_run.sh smoke|triton-tests|bench|decode|cuda|sanitize" >&2
    exit 2
    ;;
esac
exit "$status"
