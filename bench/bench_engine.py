"""The report at GEMM speed: many classes against their floor, and report assembly alone.

Two measurements, each beside its floor measured in the same run:

1. ``collapse`` on N × D × C collapsed features (class means ``randn``, within-class
   std 0.5, every class present; default 100,000 × 256 × 16,384), with the time of
   each stage (pass 1, finalize, the pass-2 plan and its pair sweep, pass 2, the
   metrics). Floor: the float64 class-pair Gram (C×D @ D×C) plus the float32 NCC
   GEMM (N×D @ D×C), both timed with numpy's BLAS on every thread now.
2. Report assembly alone (finalize, plan, metrics; the passes are not timed) at
   C = 1000, D = 2048 with a classifier, in wall and process CPU seconds. Floor: the
   float64 Gram ``M~ M~^T``, the eigendecomposition of the Gram (LAPACK on one thread,
   as ncfast runs it) and ``M~^T V``, one after the other (each needs the one before;
   the classifier products ``M~ W^T`` and ``W W^T``, also timed, can run beside the
   eigendecomposition).

    .venv/bin/python -m bench.bench_engine [--rows N] [--features D] [--classes C]
        [--assembly-classes C] [--assembly-features D] [--repeats K]

Prints a table and writes ``bench/results/engine-<UTC time>.json`` (with the load average).
"""
import argparse
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table

import ncfast
from bench.bench_many_classes import check_vocabulary_size, synthetic_vocabulary
from bench.data import collapsed_features, positive_int
from bench.floor import best_seconds, gram_floor_seconds, ncc_floor_seconds
from bench.machine import result_path
from ncfast.dumps import write_json_atomically
from ncfast.geometry import symmetric_eigh
from ncfast.metrics import collapse_metrics
from ncfast.plan import build_plan


def staged_collapse(features, labels, num_classes, weights=None):
    """One analysis through the public pieces, with the seconds of each stage."""
    seconds = {}
    start = time.perf_counter()
    class_sums = ncfast.ClassSums(num_classes, features.shape[1]).update(features, labels)
    seconds["pass 1"] = time.perf_counter() - start
    start = time.perf_counter()
    geometry, _ = ncfast.finalize_pass1(class_sums)
    seconds["finalize"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = build_plan(geometry, weights)
    seconds["plan (pair sweep)"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = ncfast.ResidualStats(plan).update(features, labels)
    seconds["pass 2"] = time.perf_counter() - start
    start = time.perf_counter()
    collapse_metrics(stats, pinv_rtol=ncfast.geometry.PINV_RTOL)
    seconds["metrics"] = time.perf_counter() - start
    return seconds


def assembly_case(num_classes, num_features):
    """Pass 1 and pass 2 of collapsed features at C, D with a classifier, for the assembly.

    Returns
    -------
    class_sums : ClassSums
    stats : ResidualStats
    weights : float64 array of shape (C, D)
    bias : float64 array of shape (C,)
    """
    features, labels, weights, bias = collapsed_features(20 * num_classes, num_features,
                                                         num_classes)
    class_sums = ncfast.ClassSums(num_classes, num_features).update(features, labels)
    geometry, _ = ncfast.finalize_pass1(class_sums)
    stats = ncfast.ResidualStats(build_plan(geometry, weights, bias)).update(features, labels)
    return class_sums, stats, weights, bias


def assembly_seconds(num_classes, num_features, repeats):
    """Best seconds of finalize + plan + metrics at C, D with a classifier (passes untimed).

    Returns
    -------
    dict
        Wall seconds of ``finalize``, ``plan``, ``metrics`` and their ``total`` in
        the fastest repeat, and ``cpu``: the process CPU seconds of that repeat.
    """
    class_sums, stats, weights, bias = assembly_case(num_classes, num_features)
    best = {}
    for _ in range(repeats):
        cpu_start = time.process_time()
        start = time.perf_counter()
        geometry, _ = ncfast.finalize_pass1(class_sums)
        finalized = time.perf_counter()
        plan = build_plan(geometry, weights, bias)
        planned = time.perf_counter()
        stats.plan = plan
        collapse_metrics(stats, pinv_rtol=ncfast.geometry.PINV_RTOL)
        done = time.perf_counter()
        times = {"finalize": finalized - start, "plan": planned - finalized,
                 "metrics": done - planned, "total": done - start,
                 "cpu": time.process_time() - cpu_start}
        if not best or times["total"] < best["total"]:
            best = times
    return best


def assembly_floor_seconds(num_classes, num_features, repeats):
    """The float64 products and the eigendecomposition of the assembly, each timed alone.

    Returns
    -------
    dict
        Best seconds of the ``gram`` ``M~ M~^T``, the ``classifier products``
        ``M~ W^T`` and ``W W^T`` and the ``projection`` ``M~^T V`` (numpy's BLAS on
        every thread), the ``eigendecomposition`` of the Gram on one thread, and the
        ``floor``: gram + eigendecomposition + projection.
    """
    class_sums, _, weights, _ = assembly_case(num_classes, num_features)
    geometry, _ = ncfast.finalize_pass1(class_sums)
    centred, gram = geometry.centred, geometry.gram
    eigenvectors = geometry.gram_eigenvectors
    seconds = {
        "gram": best_seconds(lambda: centred @ centred.T, repeats),
        "classifier products": best_seconds(lambda: (centred @ weights.T, weights @ weights.T),
                                            repeats),
        "eigendecomposition": best_seconds(lambda: symmetric_eigh(gram), repeats),
        "projection": best_seconds(lambda: centred.T @ eigenvectors, repeats),
    }
    seconds["floor"] = seconds["gram"] + seconds["eigendecomposition"] + seconds["projection"]
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=100_000)
    parser.add_argument("--features", type=positive_int, default=256)
    parser.add_argument("--classes", type=positive_int, default=16_384)
    parser.add_argument("--assembly-classes", type=positive_int, default=1000)
    parser.add_argument("--assembly-features", type=positive_int, default=2048)
    parser.add_argument("--repeats", type=positive_int, default=2)
    args = parser.parse_args(argv)
    check_vocabulary_size(parser, args.rows, args.classes)
    if not 2 <= args.assembly_classes <= args.assembly_features:
        parser.error(f"--assembly-classes {args.assembly_classes} with --assembly-features "
                     f"{args.assembly_features}: the assembly measures the classes route, which "
                     "needs at least 2 classes and no more than features")
    console = Console()
    load_before = os.getloadavg()
    console.print(f"load average {load_before}")

    ncfast.collapse(*synthetic_vocabulary(4096, args.features, 600, seed=1))  # compile
    features, labels = synthetic_vocabulary(args.rows, args.features, args.classes)
    ncfast.collapse(features[:20_000], labels[:20_000], num_classes=args.classes,
                    empty_classes="ignore")  # warm the tile sizes of this shape
    collapse_seconds = best_seconds(
        lambda: ncfast.collapse(features, labels, num_classes=args.classes), args.repeats)
    stages = staged_collapse(features, labels, args.classes)
    means = ncfast.ClassSums(args.classes, args.features).update(features, labels).sums
    means /= np.bincount(labels, minlength=args.classes)[:, None]
    gram_seconds = gram_floor_seconds(means)
    ncc_seconds = ncc_floor_seconds(features, means)
    floor = gram_seconds + ncc_seconds
    assembly = assembly_seconds(args.assembly_classes, args.assembly_features, args.repeats)
    assembly_floor = assembly_floor_seconds(args.assembly_classes, args.assembly_features,
                                            args.repeats)

    shape = f"{args.rows:,} × {args.features} × {args.classes:,}"
    table = Table(title=f"ncfast engine: collapse at {shape} (collapsed), report assembly at "
                        f"C={args.assembly_classes}, D={args.assembly_features}")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("vs floor", justify="right")
    table.add_row(f"collapse {shape}", f"{collapse_seconds:.2f}",
                  f"{collapse_seconds / floor:.2f}×")
    for stage, seconds in stages.items():
        table.add_row(f"  {stage}", f"{seconds:.2f}", "")
    table.add_row("floor: float64 C×D @ D×C Gram + float32 N×D @ D×C NCC GEMM", f"{floor:.2f}",
                  "1.00×")
    table.add_row("  float64 Gram", f"{gram_seconds:.2f}", "")
    table.add_row("  float32 NCC GEMM", f"{ncc_seconds:.2f}", "")
    table.add_row(f"report assembly, C={args.assembly_classes}, D={args.assembly_features}, "
                  "classifier", f"{assembly['total']:.3f}",
                  f"{assembly['total'] / assembly_floor['floor']:.2f}×")
    for stage in ("finalize", "plan", "metrics"):
        table.add_row(f"  {stage}", f"{assembly[stage]:.3f}", "")
    table.add_row("  process CPU time (every thread)", f"{assembly['cpu']:.3f}", "")
    table.add_row("floor: float64 Gram + its eigendecomposition (one thread) + M~^T V",
                  f"{assembly_floor['floor']:.3f}", "1.00×")
    for piece in ("gram", "eigendecomposition", "projection", "classifier products"):
        table.add_row(f"  {piece}", f"{assembly_floor[piece]:.3f}", "")
    console.print(table)

    path = result_path("engine")
    write_json_atomically(path, {
        "shape": {"rows": args.rows, "features": args.features, "classes": args.classes},
        "collapse_seconds": collapse_seconds, "stages": stages,
        "floor": {"gram_float64": gram_seconds, "ncc_float32": ncc_seconds, "total": floor},
        "assembly": {"classes": args.assembly_classes, "features": args.assembly_features,
                     **assembly, "floor": assembly_floor},
        "cpu_count": os.cpu_count(), "numba_threads": ncfast.kernels.cpu.numba.get_num_threads(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
