"""Benchmark ``ncfast analyze`` on one large float32 ``.npy`` dump with a classifier.

Writes a features file (default 2,000,000 × 512 float32, 4.1 GB) with labels,
weights and bias, warms the page cache, then measures in separate processes:

- numpy: ``np.load`` of the whole file, and ``np.fromfile`` in 8 MiB blocks,
  each summed (the rates this machine reads it);
- the ncfast reader alone (``ncfast.readers``), the same blocks summed;
- ncfast: ``ncfast.analyze.analyze`` of the file with the classifier (two
  streaming passes), checked against ``ncfast.collapse`` on the same file;

and prints wall time, read rate and peak resident memory (the child's VmHWM)
side by side. The issue's bar: peak RSS under 1 GB, and a read rate (bytes
streamed per second over both passes) of at least 70% of numpy's; the file
size per whole analysis is printed too.

Each child warms the JIT first by analysing the first 8192 rows the same way.
Run: ``.venv/bin/python -m bench.bench_analyze [--rows N] [--dir DIR] [--keep]``
(the data file is deleted afterwards unless ``--keep``).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.data import existing_folder, positive_int
from bench.machine import machine_facts, result_path
from ncfast.dumps import write_json_atomically

# Child processes: each prints one JSON line with its timing and peak RSS. Peak RSS is
# VmHWM of the child's own address space: getrusage's ru_maxrss survives fork and exec, so
# it would report the parent's peak.
PEAK_RSS = """
def peak_rss():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
"""

NUMPY_READ = PEAK_RSS + """
import json, sys, time
import numpy as np
start = time.perf_counter()
array = np.load(sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "checksum": float(array[::4096].sum()),
                  "peak_rss": peak_rss()}))
"""

COLLAPSE_REFERENCE = """
import json, os, sys
import numpy as np
from ncfast import collapse
folder = sys.argv[1]
report = collapse(os.path.join(folder, "features.npy"), np.load(os.path.join(folder, "labels.npy")),
                  weights=np.load(os.path.join(folder, "weights.npy")),
                  bias=np.load(os.path.join(folder, "bias.npy")))
print(json.dumps({key: getattr(report, key) for key in
                  ("nc1", "nc3", "nc4", "accuracy", "ncc_accuracy", "num_samples")}))
"""

NUMPY_BLOCKS = PEAK_RSS + """
import json, sys, time
import numpy as np
start = time.perf_counter()
checksum = 0.0
with open(sys.argv[1], "rb") as stream:
    version = np.lib.format.read_magic(stream)
    shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                       np.lib.format.read_array_header_2_0)(stream)
    block_items = (8 << 20) // dtype.itemsize
    while (block := np.fromfile(stream, dtype=dtype, count=block_items)).size:
        checksum += float(block.sum(dtype=np.float64))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "checksum": checksum, "peak_rss": peak_rss()}))
"""

# The reader ``analyze`` streams through, alone: the same 8 MiB blocks, summed the same way.
NCFAST_READER = PEAK_RSS + """
import json, sys, time
import numpy as np
from ncfast.readers import read_file
start = time.perf_counter()
(features,) = read_file(sys.argv[1]).values()
block_rows = (8 << 20) // (4 * features.shape[1])
checksum = 0.0
for first in range(0, features.num_rows, block_rows):
    checksum += float(features.rows(first, first + block_rows).sum(dtype=np.float64))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "checksum": checksum, "peak_rss": peak_rss()}))
"""

NCFAST_ANALYZE = PEAK_RSS + """
import json, os, sys, tempfile, time
import numpy as np
from ncfast.analyze import analyze
folder = sys.argv[1]


def analyze_folder(data_folder):
    return analyze([os.path.join(data_folder, "features.npy")],
                   labels=os.path.join(data_folder, "labels.npy"),
                   weights=os.path.join(folder, "weights.npy"),
                   bias=os.path.join(folder, "bias.npy"), use_cache=False, progress=False)


# Warm the JIT on the first rows, through the same path (same array types, same kernels).
with tempfile.TemporaryDirectory() as warm:
    for name in ("features.npy", "labels.npy"):
        np.save(os.path.join(warm, name), np.load(os.path.join(folder, name), mmap_mode="r")[:8192])
    analyze_folder(warm)
start = time.perf_counter()
analysis = analyze_folder(folder)
elapsed = time.perf_counter() - start
assert not analysis.failures, analysis.failures
(row,) = analysis.rows
print(json.dumps({"seconds": elapsed, "row": {key: row[key] for key in
                  ("nc1", "nc3", "nc4", "accuracy", "ncc_accuracy", "num_samples")},
                  "peak_rss": peak_rss()}))
"""


def write_dump(folder, num_rows, num_features, num_classes, block_rows=65536):
    """Features with class structure, written block by block (never whole in memory)."""
    rng = np.random.default_rng(0)
    class_means = rng.normal(size=(num_classes, num_features)).astype(np.float32) * 2.0
    labels = rng.integers(0, num_classes, num_rows)
    features = np.lib.format.open_memmap(os.path.join(folder, "features.npy"), mode="w+",
                                         dtype=np.float32, shape=(num_rows, num_features))
    for start in range(0, num_rows, block_rows):
        stop = min(start + block_rows, num_rows)
        block = rng.standard_normal((stop - start, num_features), dtype=np.float32)
        block += class_means[labels[start:stop]]
        features[start:stop] = block
    features.flush()
    del features
    np.save(os.path.join(folder, "labels.npy"), labels)
    np.save(os.path.join(folder, "weights.npy"),
            class_means + 0.5 * rng.normal(size=class_means.shape))
    np.save(os.path.join(folder, "bias.npy"), rng.normal(size=num_classes))


def run_child(code, *args):
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=2_000_000)
    parser.add_argument("--features", type=positive_int, default=512)
    parser.add_argument("--classes", type=positive_int, default=10)
    parser.add_argument("--dir", default=None, type=existing_folder,
                        help="existing folder for the data (default: a temp dir)")
    parser.add_argument("--repeats", type=positive_int, default=2, help="best of this many runs")
    parser.add_argument("--keep", action="store_true", help="keep the data file")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="ncfast-bench-", dir=args.dir)
    path = os.path.join(folder, "features.npy")
    try:
        start = time.perf_counter()
        write_dump(folder, args.rows, args.features, args.classes)
        size = os.path.getsize(path)
        print(f"wrote {path}: {args.rows:,} x {args.features} float32, {size / 1e9:.2f} GB, "
              f"C={args.classes}, in {time.perf_counter() - start:.0f} s")
        run_child(NUMPY_READ, path)  # warm the page cache
        best = {}
        for name, code, argument in (("numpy np.load (1 read)", NUMPY_READ, path),
                                     ("numpy np.fromfile blocks + sum", NUMPY_BLOCKS, path),
                                     ("ncfast reader blocks + sum", NCFAST_READER, path),
                                     ("ncfast analyze (2 passes)", NCFAST_ANALYZE, folder)):
            runs = [run_child(code, argument) for _ in range(args.repeats)]
            best[name] = min(runs, key=lambda run: run["seconds"])
            best[name]["worst_rss"] = max(run["peak_rss"] for run in runs)
        ncfast_best = best["ncfast analyze (2 passes)"]
        print(f"{'':34}{'seconds':>9}{'GB/s':>9}{'peak RSS':>14}")
        for name, run in best.items():
            passes = 2 if name.startswith("ncfast analyze") else 1
            print(f"{name:34}{run['seconds']:9.2f}{passes * size / run['seconds'] / 1e9:9.2f}"
                  f"{run['worst_rss'] / 2**30:10.2f} GiB")
        reader_rate = size / best["ncfast reader blocks + sum"]["seconds"]
        blocks_rate = size / best["numpy np.fromfile blocks + sum"]["seconds"]
        print(f"ncfast reader / numpy block reads: {reader_rate / blocks_rate:.0%}")
        ncfast_rate = 2 * size / ncfast_best["seconds"]  # bytes streamed over both passes
        for name in ("numpy np.load (1 read)", "numpy np.fromfile blocks + sum"):
            numpy_rate = size / best[name]["seconds"]
            print(f"ncfast read rate / {name}: {ncfast_rate / numpy_rate:.0%} (bar: >= 70%); "
                  f"file per whole analysis: {best[name]['seconds'] / ncfast_best['seconds']:.0%}")
        print(f"ncfast peak RSS {ncfast_best['worst_rss'] / 2**30:.2f} GiB (bar: < 1 GB); "
              f"metrics: {ncfast_best['row']}")
        reference = run_child(COLLAPSE_REFERENCE, folder)
        for key, expected in reference.items():
            assert np.isclose(ncfast_best["row"][key], expected, rtol=1e-9, atol=0), key
        print("metrics equal ncfast.collapse on the same file (rtol 1e-9)")
        path = result_path("analyze")
        write_json_atomically(path, {
            "rows": args.rows, "features": args.features, "classes": args.classes,
            "file_bytes": size, "best": best, "machine": machine_facts()})
        print(f"wrote {path}")
        assert ncfast_best["worst_rss"] < 1e9, "peak RSS over 1 GB"
    finally:
        if not args.keep:
            for name in ("features.npy", "labels.npy", "weights.npy", "bias.npy"):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            os.rmdir(folder)


if __name__ == "__main__":
    main()
