"""Benchmark ``ncfast.dask.collapse`` on a zarr array: 2-worker LocalCluster vs one process.

Writes an uncompressed float32 zarr array (default 8 GB: 7,812,500 × 256, 100
classes, blocks of 65,536 rows) with its labels, reads it once to warm the
page cache, then measures with a classifier:

- one process: ``ncfast.collapse`` over the zarr blocks (a re-iterable of
  ``(features, labels)`` blocks), in a fresh process, with 2 kernel threads
  (the default here) and with 1 (faster when other jobs load the cores);
- Dask: ``ncfast.dask.collapse(da.from_zarr(...))`` on a ``LocalCluster`` of 2
  worker processes with 1 thread each (kernels and BLAS on 1 thread each, so
  both runs use the machine's 2 cores),

and prints wall time and the peak resident memory of each process (each
Dask worker, and the client that builds the graph) side by side. Both reports
must agree to 1e-10 relative (the blocks and kernel chunks are the same). The
issue's bar: the Dask run takes at most 30% longer than the faster single
process.

Run: ``.venv/bin/python -m bench.bench_dask [--gigabytes 8] [--dir DIR] [--keep]``
(the data is deleted afterwards unless ``--keep``).
"""
import argparse
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.checks import REORDERED_RTOL, worst_metric_error
from bench.data import existing_folder, positive_float
from bench.machine import machine_facts, result_path
from bench.memory import peak_memory, reset_peak_memory
from ncfast.dumps import write_json_atomically

NUM_FEATURES = 256
NUM_CLASSES = 100
BLOCK_ROWS = 65536

#: Environment of the Dask workers: one kernel and BLAS thread per worker thread.
ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}

#: The Dask run may take this much longer than the single process (issue 7).
OVERHEAD_BAR = 1.3


def synthetic_classifier(seed=0):
    """Class means (C, D) that the rows scatter around, and a classifier near them."""
    rng = np.random.default_rng(seed)
    means = 4.0 * rng.standard_normal((NUM_CLASSES, NUM_FEATURES)).astype(np.float32)
    weights = means + rng.standard_normal(means.shape)
    bias = 0.1 * rng.standard_normal(NUM_CLASSES)
    return means, weights, bias


def write_zarr(folder, num_rows):
    """Features and labels as zarr arrays, one block of rows at a time."""
    import zarr

    means, _, _ = synthetic_classifier()
    features = zarr.create_array(os.path.join(folder, "features.zarr"),
                                 shape=(num_rows, NUM_FEATURES), chunks=(BLOCK_ROWS, NUM_FEATURES),
                                 dtype="float32", compressors=None)
    labels = zarr.create_array(os.path.join(folder, "labels.zarr"), shape=(num_rows,),
                               chunks=(BLOCK_ROWS,), dtype="int64", compressors=None)
    rng = np.random.default_rng(1)
    block = np.empty((BLOCK_ROWS, NUM_FEATURES), np.float32)
    for start in range(0, num_rows, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, num_rows)
        block_labels = rng.integers(0, NUM_CLASSES, stop - start)
        rows = block[:stop - start]
        rng.standard_normal(rows.shape, dtype=np.float32, out=rows)
        rows *= 0.5
        rows += means[block_labels]
        features[start:stop] = rows
        labels[start:stop] = block_labels


class ZarrBlocks:
    """``(features, labels)`` blocks of the zarr arrays, re-iterable: the single-process input."""

    def __init__(self, folder):
        import zarr

        self.features = zarr.open_array(os.path.join(folder, "features.zarr"), mode="r")
        self.labels = zarr.open_array(os.path.join(folder, "labels.zarr"), mode="r")

    def __iter__(self):
        for start in range(0, self.features.shape[0], BLOCK_ROWS):
            yield (self.features[start:start + BLOCK_ROWS],
                   self.labels[start:start + BLOCK_ROWS])


def warm_kernels():
    """Load ncfast's compiled kernels (from numba's cache) on a few rows."""
    import ncfast

    rng = np.random.default_rng(0)
    ncfast.collapse(rng.standard_normal((512, 8)).astype(np.float32), np.arange(512) % 4,
                    weights=rng.standard_normal((4, 8)))


def _single_process(folder, answers):
    import ncfast

    _, weights, bias = synthetic_classifier()
    warm_kernels()
    reset_peak_memory()
    start = time.perf_counter()
    report = ncfast.collapse(ZarrBlocks(folder), num_classes=NUM_CLASSES, weights=weights,
                             bias=bias)
    answers.put({"seconds": time.perf_counter() - start, "peak_bytes": peak_memory(),
                 "metrics": report.metrics()})


def run_single_process(folder, env):
    """``ncfast.collapse`` over the zarr blocks in a fresh process with ``env`` added."""
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    process = context.Process(target=_single_process, args=(folder, answers))
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    while True:  # the child's error, if any, is printed by the child itself
        try:
            answer = answers.get(timeout=1.0)
            break
        except queue.Empty:
            if not process.is_alive() and answers.empty():
                sys.exit(f"bench_dask: the single-process run failed (exit code "
                         f"{process.exitcode}; its error is above)")
    process.join()
    return answer


def run_dask(folder):
    """``ncfast.dask.collapse`` on a LocalCluster of 2 single-threaded worker processes."""
    import dask.array as da
    import distributed

    import ncfast.dask

    _, weights, bias = synthetic_classifier()
    features = da.from_zarr(os.path.join(folder, "features.zarr"))
    labels = da.from_zarr(os.path.join(folder, "labels.zarr"))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", env=ONE_THREAD) as cluster, \
            distributed.Client(cluster) as client:
        client.run(warm_kernels)
        client.run(reset_peak_memory)
        reset_peak_memory()
        start = time.perf_counter()
        report = ncfast.dask.collapse(features, labels, num_classes=NUM_CLASSES,
                                      weights=weights, bias=bias)
        seconds = time.perf_counter() - start
        worker_peaks = client.run(peak_memory)
    return {"seconds": seconds, "worker_peak_bytes": sorted(worker_peaks.values()),
            "client_peak_bytes": peak_memory(), "metrics": report.metrics()}


def read_once(folder):
    """Read every block once, so that both runs find the data in the page cache."""
    start = time.perf_counter()
    for features, _ in ZarrBlocks(folder):
        features.sum()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=positive_float, default=8.0,
                        help="size of the float32 features (default 8)")
    parser.add_argument("--dir", default=None, type=existing_folder,
                        help="existing folder for the data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    args = parser.parse_args(argv)
    num_rows = int(args.gigabytes * 1e9) // (4 * NUM_FEATURES)
    if num_rows < NUM_CLASSES:
        parser.error(f"--gigabytes {args.gigabytes:g} holds {num_rows} rows of {NUM_FEATURES} "
                     f"features; the benchmark needs at least {NUM_CLASSES} (one a class)")
    folder = tempfile.mkdtemp(prefix="ncfast_bench_dask_", dir=args.dir)
    try:
        start = time.perf_counter()
        write_zarr(folder, num_rows)
        gigabytes = num_rows * NUM_FEATURES * 4 / 1e9
        print(f"wrote {num_rows:,} x {NUM_FEATURES} float32 ({gigabytes:.2f} GB), {NUM_CLASSES} "
              f"classes, blocks of {BLOCK_ROWS:,} rows, in {time.perf_counter() - start:.0f} s; "
              f"read once in {read_once(folder):.1f} s")
        singles = {"one process, 2 kernel threads": run_single_process(folder, {}),
                   "one process, 1 kernel thread": run_single_process(folder, ONE_THREAD)}
        spread = run_dask(folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder)
    worst = max(worst_metric_error(spread["metrics"], single["metrics"])
                for single in singles.values())
    gib = 2.0 ** 30
    print(f"{'run':<34}{'seconds':>9}{'peak RSS per process':>28}")
    for name, single in singles.items():
        print(f"{name:<34}{single['seconds']:>9.1f}{single['peak_bytes'] / gib:>23.2f} GiB")
    workers = " + ".join(f"{peak / gib:.2f}" for peak in spread["worker_peak_bytes"])
    print(f"{'Dask, 2 workers x 1 thread':<34}{spread['seconds']:>9.1f}"
          f"{workers:>23} GiB (workers)")
    print(f"{'':<43}{spread['client_peak_bytes'] / gib:>23.2f} GiB (client)")
    fastest = min(single["seconds"] for single in singles.values())
    overhead = spread["seconds"] / fastest
    print(f"Dask / faster single process: {overhead:.2f}x (bar: {OVERHEAD_BAR:.1f}x); largest "
          f"relative metric difference {worst:.1e}")
    if not worst <= REORDERED_RTOL:
        sys.exit(f"bench_dask: the Dask and single-process reports differ by {worst:.2e} "
                 f"relative (more than {REORDERED_RTOL:g}): a wrong result, not timed")
    record = {"single": {name: single["seconds"] for name, single in singles.items()},
              "dask": spread["seconds"], "ratio": overhead, "max_relative_difference": worst}
    print(json.dumps(record))
    path = result_path("dask")
    write_json_atomically(path, {
        **record, "rows": num_rows, "features": NUM_FEATURES, "classes": NUM_CLASSES,
        "single_peak_bytes": {name: single["peak_bytes"] for name, single in singles.items()},
        "dask_worker_peak_bytes": spread["worker_peak_bytes"],
        "client_peak_bytes": spread["client_peak_bytes"], "machine": machine_facts()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
