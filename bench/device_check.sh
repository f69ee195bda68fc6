#!/bin/bash
# One call on a lent GPU (the device tool, from the repository root): the GPU tests, then
# the GPU benchmarks, each under its own time limit, logs in $OUT as they are written.
# The machine's python3 has CuPy, torch, numba and pytest; ncfast runs from the source
# tree, laid out as pyproject installs it (the kernels as ncfast.kernels).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ln -sfn ../kernels ncfast/kernels
OUT=${OUT:-/tmp/ncfast-device}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import cupy, torch, numba, numpy; print('cupy', cupy.__version__,
  'torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"; } \
  2>&1 | tee "$OUT/device.txt"
timeout 190 python3 -m pytest -q -p no:randomly -p no:cacheprovider --timeout 150 \
  tests/test_cuda.py tests/test_cuda_compile.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 140 python3 -m bench.bench_gpu_classes 2>&1 | tee "$OUT/gpu_classes.log"
timeout 130 python3 bench/bench_gpu.py --rows 2000000 --cpu-rows 100000 2>&1 \
  | tee "$OUT/bench_gpu.log" | tail -25
timeout 60 python3 -m pytest -q -p no:randomly -p no:cacheprovider --timeout 50 \
  tests/test_monitor.py -k cuda 2>&1 | tee "$OUT/gpu_torch_tests.log" | tail -5
