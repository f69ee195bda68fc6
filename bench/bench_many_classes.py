"""Many classes in bounded memory: N × D × C = 2,000,000 × 256 × 32,768 by default.

Prints ncfast's time and peak memory beyond the input, beside its floor measured
in the same run (the float64 class-pair Gram C×D @ D×C plus the float32 NCC GEMM
N×D @ D×C, numpy's BLAS on every thread) and the memory that a dense C×C route
(the full class-pair grid in float32, as the accumulator library researchers use
today allocates) would need before it even starts.

    .venv/bin/python -m bench.bench_many_classes [--rows N] [--features D] [--classes C]
"""
import argparse
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

import ncfast
from bench.data import positive_int
from bench.floor import gram_floor_seconds, ncc_floor_seconds
from bench.machine import machine_facts, result_path
from bench.memory import peak_memory, reset_peak_memory, resident_memory
from ncfast.dumps import write_json_atomically


def synthetic_vocabulary(num_rows, num_features, num_classes, *, seed=0, block=1 << 18):
    """Float32 rows around random class means, generated block by block (no float64 copy).

    Returns
    -------
    features : float32 array of shape (num_rows, num_features)
    labels : int64 array of shape (num_rows,), every class present
    """
    rng = np.random.default_rng(seed)
    class_means = rng.standard_normal((num_classes, num_features), dtype=np.float32)
    labels = np.concatenate([np.arange(num_classes),
                             rng.integers(0, num_classes, num_rows - num_classes)])
    features = np.empty((num_rows, num_features), np.float32)
    for start in range(0, num_rows, block):
        stop = min(start + block, num_rows)
        features[start:stop] = class_means[labels[start:stop]]
        features[start:stop] += 0.5 * rng.standard_normal((stop - start, num_features),
                                                           dtype=np.float32)
    return features, labels


def check_vocabulary_size(parser, num_rows, num_classes):
    """``parser.error`` unless ``synthetic_vocabulary`` can give every one of at least two
    classes a row."""
    if num_classes < 2 or num_rows < num_classes:
        parser.error(f"--classes {num_classes:,} with --rows {num_rows:,}: the synthetic rows "
                     "give every class a row, so they need at least 2 classes and as many rows "
                     "as classes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=2_000_000)
    parser.add_argument("--features", type=positive_int, default=256)
    parser.add_argument("--classes", type=positive_int, default=32_768)
    args = parser.parse_args(argv)
    check_vocabulary_size(parser, args.rows, args.classes)

    warm = synthetic_vocabulary(4096, args.features, 600, seed=1)
    ncfast.collapse(*warm)  # compile the kernels before anything is measured

    features, labels = synthetic_vocabulary(args.rows, args.features, args.classes)
    input_bytes = features.nbytes + labels.nbytes
    rss_with_input = resident_memory()
    reset_peak_memory()
    start = time.perf_counter()
    report = ncfast.collapse(features, labels, num_classes=args.classes)
    seconds = time.perf_counter() - start
    beyond_input = max(peak_memory() - rss_with_input, 0)
    dense_grid = args.classes ** 2 * 4
    gram_seconds = gram_floor_seconds(report.means)
    ncc_seconds = ncc_floor_seconds(features, report.means)
    floor = gram_seconds + ncc_seconds

    table = Table(title=f"ncfast, many classes: N={args.rows:,} × D={args.features} × "
                        f"C={args.classes:,} (route {report.route!r})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("input (features + labels)", f"{input_bytes / 2**30:.2f} GiB")
    table.add_row("ncfast time, both passes + metrics", f"{seconds:.1f} s")
    table.add_row("floor: float64 Gram + float32 NCC GEMM",
                  f"{floor:.1f} s ({gram_seconds:.1f} + {ncc_seconds:.1f})")
    table.add_row("ncfast / floor", f"{seconds / floor:.2f}×")
    table.add_row("ncfast peak memory beyond the input", f"{beyond_input / 2**30:.2f} GiB")
    table.add_row("dense C×C float32 grid alone", f"{dense_grid / 2**30:.2f} GiB")
    table.add_row("nc1 / ncc_accuracy / nc2_etf",
                  f"{report.nc1:.4g} / {report.ncc_accuracy:.4f} / {report.nc2_etf:.4f}")
    Console().print(table)
    print(f"load average {os.getloadavg()}")
    path = result_path("many-classes")
    write_json_atomically(path, {
        "shape": {"rows": args.rows, "features": args.features, "classes": args.classes},
        "route": report.route, "input_bytes": input_bytes, "seconds": seconds,
        "floor": {"gram_float64": gram_seconds, "ncc_float32": ncc_seconds, "total": floor},
        "peak_beyond_input_bytes": beyond_input, "dense_grid_bytes": dense_grid,
        "metrics": {"nc1": report.nc1, "ncc_accuracy": report.ncc_accuracy,
                    "nc2_etf": report.nc2_etf},
        "machine": machine_facts(), "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
