#!/bin/bash
# One call on a GPU machine, from the repository root: the GPU tests, then the GPU
# benchmarks, each under its own time limit, logs in $OUT as they are written.
# The machine's python3 needs CuPy, torch, numba, pytest and pytest-timeout; ncfast runs
# from the source tree, laid out as pyproject installs it (the kernels as ncfast.kernels,
# through a link that .gitignore names).
#
#   bench/device_check.sh tests quick    # the GPU tests, then small benchmarks
#   bench/device_check.sh tests full     # the GPU tests, then the GPU grid's shapes
#   bench/device_check.sh profile        # cProfile of collapse, resident and streamed
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ln -sfn ../kernels ncfast/kernels
OUT=${OUT:-/tmp/ncfast-device}
mkdir -p "$OUT"
{ nvidia-smi -L; nvidia-smi --query-gpu=clocks.sm,clocks.mem,memory.used --format=csv
  python3 -c "import cupy, torch, numba, numpy; print('cupy', cupy.__version__,
  'torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
for stage in "$@"; do
  case $stage in
    tests)
      timeout 200 python3 -m pytest -q -p no:randomly -p no:cacheprovider --timeout 45 \
        --junitxml "$OUT/gpu_tests.xml" -rfE --tb=short tests/test_cuda.py \
        tests/test_cuda_compile.py "tests/test_monitor.py::test_cuda_model_gives_the_cpu_report" \
        > "$OUT/gpu_tests.log" 2>&1
      tail -40 "$OUT/gpu_tests.log" ;;
    quick)
      timeout 150 python3 -m bench.bench_gpu --resident 2e6x512x100,2e5x256x8192 \
        --streamed 2e6x512x100 --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
      tail -32 "$OUT/bench_gpu.log" ;;
    full)
      timeout 330 python3 -m bench.bench_gpu --json "$OUT/bench_gpu.json" \
        > "$OUT/bench_gpu.log" 2>&1
      tail -32 "$OUT/bench_gpu.log" ;;
    profile)
      for shape in "2000000 256 32768" "2000000 2048 1000"; do
        timeout 60 python3 -m bench.profile_gpu $shape --lines 30 2>&1
      done > "$OUT/profile.log"
      timeout 60 python3 -m bench.profile_gpu 2000000 512 100 --placement pageable \
        --lines 30 > "$OUT/profile_pageable.log" 2>&1
      grep -h "^collapse" "$OUT/profile.log" "$OUT/profile_pageable.log" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
