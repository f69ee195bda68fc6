"""Per-stage profile of ncfast's two passes on one size.

Times each stage of pass 2 the way the size's kernel runs it, on one thread:
on the "classes" route (C' <= D) ``ncfast.kernels.cpu.residual_chunk`` (BLAS
limited to one thread, cache-sized blocks) or, for few columns,
``ncfast.kernels.narrow.narrow_chunk`` (tiles of rows, no BLAS); on the
"features" route (C' > D) the residuals, their coordinates in the eigenbasis of
``Sigma_B`` (NC1) and the tiled NCC and classifier searches of the far rows;
both passes end to end with every thread; and ``ncfast.collapse`` against the
floor of reading the features twice::

    python -m bench.profile --rows 1000000 --features 512 --classes 100
    python -m bench.profile --rows 200000 --features 768 --classes 1000

Stage times are summed over the blocks of one thread; with T threads the pass
takes about their total divided by T. Beside them, the full-width GEMM alone
(every row times ``[M~^T V | W^T]``, or ``[M~^T | W^T]`` on the "features"
route: the product the floor counts far from collapse) as the pass would run it
on every thread (each thread its own slice of rows, one single-threaded product
per block); and for the narrow kernel (C <= 32) its arithmetic alone, the kernel
run over rows that stay in cache, against one read: pass 2 cannot take less than
the longer of the two. Rows inside their NCC and classifier radii skip the far-row
products, so on collapsed features pass 2 multiplies only by ``M~^T V`` (or,
on the "features" route, by ``Sigma_B``'s eigenvectors); ``--spread 4`` makes
every row take the full route.
"""
import argparse
import time

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

import ncfast
from bench.data import SPREAD, collapsed_features, positive_float, positive_int
from bench.floor import best_seconds, read_bandwidth
from ncfast.accumulators import (ClassSums, ResidualStats, _eigen_coordinate_squares,
                                 runs_narrow_kernel)
from ncfast.geometry import Geometry
from ncfast.inputs import default_chunk_rows
from ncfast.kernels import cpu, narrow


def narrow_stage_times(features, labels, stats):
    """Seconds per stage of ``narrow.narrow_blocks`` on one thread, summed over all rows.

    Each stage runs on a block of ``cpu.block_rows(D)`` rows at a time, as
    ``stage_times`` does (the kernel interleaves them tile by tile, and calls
    the epilogue every ``narrow.BLOCK_ROWS`` rows; calls from Python per tile
    would cost more than the tile), and the classifier's rows are multiplied
    for a whole block when one of its rows lies beyond its radius.

    Returns
    -------
    dict
        ``residuals``; ``products`` (with ``M~^T V``, and ``W``); ``far rows``
        (``z = V a`` and the logits of the rows beyond their radii);
        ``epilogue``; in seconds.
    """
    route = stats.plan.classes_route()
    num_rows, num_features = features.shape
    num_means = route.present_classes.shape[0]
    num_logits = route.weights_t.shape[1]
    columns = narrow.padded_columns(route)
    block = cpu.block_rows(num_features)
    residuals = np.zeros((block, num_features), np.float32)
    products = np.zeros((block, columns.shape[0]), np.float32)
    far_coordinates = np.zeros((block, num_means), np.float32)
    far_mean_products = np.zeros((block, num_means), np.float32)
    far_logits = np.zeros((block, num_logits), np.float32)
    sq_norms = np.empty(block)
    partial = cpu.Pass2Sums(*(np.zeros_like(getattr(stats, name)) for name in stats.sum_names))
    corrupted = np.empty(0, np.uint8)
    totals = dict.fromkeys(("residuals", "products", "far rows", "epilogue"), 0.0)
    for first in range(0, num_rows, block):
        size = min(block, num_rows - first)
        block_labels = labels[first:first + size]
        marks = [time.perf_counter()]
        residuals[size:] = 0.0
        cpu.block_residuals(features[first:first + size], block_labels, route.label_rows,
                            route.means, residuals[:size], sq_norms[:size])
        marks.append(time.perf_counter())
        uncertain = num_logits and cpu.count_rows_beyond(
            sq_norms[:size], block_labels, route.label_rows, route.classifier_sq_radii)
        narrow.block_products(residuals,
                              columns if uncertain else narrow.mean_columns(columns, num_means),
                              products,
                              features[first + size:first + 2 * size])
        marks.append(time.perf_counter())
        coordinates = products[:size, :num_means]
        far_rows, far = narrow.rows_beyond(coordinates, sq_norms[:size], block_labels,
                                           route.label_rows, route.ncc_sq_radii, far_coordinates)
        narrow.mean_products(far_rows[:far], route.eigenvectors_t, far_mean_products)
        logits = products[:size, num_means:num_means + num_logits]
        if num_logits:
            logits, _ = narrow.rows_beyond(logits, sq_norms[:size], block_labels,
                                           route.label_rows, route.classifier_sq_radii,
                                           far_logits)
        marks.append(time.perf_counter())
        cpu.epilogue(features[first:first + size], coordinates, sq_norms[:size], block_labels,
                     corrupted, far_mean_products, logits, route, partial)
        marks.append(time.perf_counter())
        for name, begin, end in zip(totals, marks, marks[1:]):
            totals[name] += end - begin
    return totals


#: Rows of the block ``narrow_in_cache_seconds`` runs over and over: two epilogue blocks,
#: 256 KiB of float32 rows at D = 512, in the core's L2 cache.
CACHED_ROWS = 2 * narrow.BLOCK_ROWS


@njit(nogil=True)
def _narrow_blocks_again(repeats, features, labels, corrupted, route, columns, buffers,
                         sq_norms, sums):
    """``narrow.narrow_blocks`` over the same rows ``repeats`` times, in compiled code (a
    call from Python per block would cost more than the block)."""
    for _ in range(repeats):
        narrow.narrow_blocks(features, labels, corrupted, route, columns, buffers, sq_norms,
                             sums)


def cached_kernel_arguments(features, labels, stats):
    """The arguments of ``narrow.narrow_blocks`` over the first ``CACHED_ROWS`` rows, with
    buffers and pass-2 sums of their own (the sums are the last)."""
    route = stats.plan.classes_route()
    columns = narrow.padded_columns(route)
    num_means = route.present_classes.shape[0]
    rows = min(CACHED_ROWS, len(features))
    buffers = narrow.NarrowBuffers(
        residuals=np.zeros((narrow.TILE_ROWS, features.shape[1]), np.float32),
        products=np.zeros((narrow.BLOCK_ROWS, columns.shape[0]), np.float32),
        far_coordinates=np.zeros((narrow.BLOCK_ROWS, num_means), np.float32),
        far_mean_products=np.zeros((narrow.BLOCK_ROWS, num_means), np.float32),
        far_logits=np.zeros((narrow.BLOCK_ROWS, route.weights_t.shape[1]), np.float32))
    sums = cpu.Pass2Sums(*(np.zeros_like(getattr(stats, name)) for name in stats.sum_names))
    return (features[:rows], np.asarray(labels[:rows], np.int64), np.empty(0, np.uint8), route,
            columns, buffers, np.empty(rows), sums)


def narrow_in_cache_seconds(features, labels, stats, repeats):
    """Seconds of the narrow kernel's arithmetic alone for all rows, on every thread.

    The kernel runs on one thread over the first ``CACHED_ROWS`` rows, which
    stay in cache, until it has processed as many rows as ``features`` holds;
    the best of ``repeats`` such runs is divided by the thread count (the
    threads share no data in pass 2). Pass 2 from memory cannot take less
    than this or one read of the rows, whichever is longer.
    """
    arguments = cached_kernel_arguments(features, labels, stats)
    rows = len(arguments[0])
    times = -(-len(features) // rows)
    _narrow_blocks_again(1, *arguments)
    one_thread = best_seconds(lambda: _narrow_blocks_again(times, *arguments), repeats)
    return one_thread * len(features) / (times * rows) / numba.get_num_threads()


def least_collapse_seconds(read_seconds, arithmetic_seconds):
    """The least time two passes allow: pass 1 at one read, pass 2 at the longer of one
    read and its arithmetic alone (``narrow_in_cache_seconds``)."""
    return read_seconds + max(read_seconds, arithmetic_seconds)


def stage_times(features, labels, stats):
    """Seconds per pass-2 stage of the BLAS kernel on one thread, summed over all blocks.

    Returns
    -------
    dict
        ``residuals``; ``gemm`` (``R M~^T V``); ``far NCC`` and ``far
        classifier`` (gathering the rows beyond their NCC or classifier radius
        and their GEMM); ``epilogue``; in seconds.
    """
    route = stats.plan.classes_route()
    num_rows, num_features = features.shape
    num_means = route.present_classes.shape[0]
    num_logits = route.weights_t.shape[1]
    block = cpu.block_rows(num_features)
    buffers = cpu.Pass2Buffers(
        residuals=np.zeros((block, num_features), np.float32),
        products=np.empty((block, num_means), np.float32),
        far_coordinates=np.zeros((block, num_means), np.float32),
        far_mean_products=np.zeros((block, num_means), np.float32),
        far_residuals=np.zeros((block, num_features), np.float32),
        far_logits=np.zeros((block, num_logits), np.float32))
    sq_norms = np.empty(block)
    partial = cpu.Pass2Sums(*(np.zeros_like(getattr(stats, name)) for name in stats.sum_names))
    corrupted = np.empty(0, np.uint8)
    totals = dict.fromkeys(("residuals", "gemm", "far NCC", "far classifier", "epilogue"), 0.0)
    with threadpool_limits(1, user_api="blas"):
        for first in range(0, num_rows, block):
            last = min(first + block, num_rows)
            size = last - first
            block_labels = labels[first:last]
            marks = [time.perf_counter()]
            cpu.block_residuals(features[first:last], block_labels, route.label_rows,
                                route.means, buffers.residuals[:size], sq_norms[:size])
            marks.append(time.perf_counter())
            np.matmul(buffers.residuals, route.projection_t, out=buffers.products)
            marks.append(time.perf_counter())
            if cpu.gather_rows_beyond(buffers.products[:size], sq_norms[:size], block_labels,
                                      route.label_rows, route.ncc_sq_radii,
                                      buffers.far_coordinates) > 0:
                np.matmul(buffers.far_coordinates, route.eigenvectors_t,
                          out=buffers.far_mean_products)
            marks.append(time.perf_counter())
            uncertain = num_logits and cpu.count_rows_beyond(
                sq_norms[:size], block_labels, route.label_rows, route.classifier_sq_radii)
            if uncertain == size:
                np.matmul(buffers.residuals, route.weights_t, out=buffers.far_logits)
            elif uncertain > 0:
                cpu.gather_rows_beyond(buffers.residuals[:size], sq_norms[:size], block_labels,
                                       route.label_rows, route.classifier_sq_radii,
                                       buffers.far_residuals)
                np.matmul(buffers.far_residuals, route.weights_t, out=buffers.far_logits)
            marks.append(time.perf_counter())
            cpu.epilogue(features[first:last], buffers.products[:size], sq_norms[:size],
                         block_labels, corrupted, buffers.far_mean_products,
                         buffers.far_logits, route, partial)
            marks.append(time.perf_counter())
            for name, begin, end in zip(totals, marks, marks[1:]):
                totals[name] += end - begin
    return totals


def features_stage_times(features, labels, stats):
    """Seconds per pass-2 stage of the "features" route (C' > D) on one thread, summed over
    the chunks of ``default_chunk_rows(D)`` rows.

    Each stage calls the function the route runs (``ResidualStats._update_features_route``),
    with Numba and BLAS limited to one thread.

    Returns
    -------
    dict
        ``residuals and coordinates`` (per block the residuals and ``R U``, the NC1
        state, ``_eigen_coordinate_squares``); ``far NCC`` and ``far classifier``
        (centring the rows beyond their radius and folding their products with
        the centred means or ``W`` tile by tile); ``tally``; in seconds.
    """
    geometry, plan = stats.geometry, stats.plan
    chunk = default_chunk_rows(features.shape[1])
    totals = dict.fromkeys(("residuals and coordinates", "far NCC", "far classifier", "tally"),
                           0.0)
    tallies = [np.zeros_like(getattr(stats, name)) for name in
               ("counts", "sq_norm_sums", "norm_sums", "ncc_hits", "classifier_hits", "totals")]
    corrupted = np.empty(0, np.uint8)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            for first in range(0, len(features), chunk):
                rows, row_labels = features[first:first + chunk], labels[first:first + chunk]
                num_rows = len(rows)
                marks = [time.perf_counter()]
                sq_norms = np.zeros(num_rows)
                _eigen_coordinate_squares(rows, row_labels, geometry.label_rows,
                                          plan.present_means, plan.between_basis, sq_norms,
                                          np.zeros(features.shape[1]))
                marks.append(time.perf_counter())
                far, centred, ncc_predictions = stats._nearest_centres(rows, row_labels, sq_norms)
                marks.append(time.perf_counter())
                classifier_predictions = stats._classifier_predictions(rows, row_labels, sq_norms,
                                                                       far, centred)
                marks.append(time.perf_counter())
                cpu.tally_rows(sq_norms, row_labels, ncc_predictions, classifier_predictions,
                               corrupted, *tallies)
                marks.append(time.perf_counter())
                for name, begin, end in zip(totals, marks, marks[1:]):
                    totals[name] += end - begin
    finally:
        numba.set_num_threads(threads)
    return totals


def gemm_only_seconds(features, projection_t, num_threads, repeats):
    """Best seconds of pass 2's float32 GEMM alone, on ``num_threads`` threads.

    Runs on the pass's own worker threads (``cpu.run_tasks``, BLAS on one
    thread each), one contiguous slice of rows per thread, one product per
    block of ``cpu.block_rows`` rows (the last of a slice may be shorter), as
    ``residual_chunk`` multiplies the residuals: every row once.
    """
    block = cpu.block_rows(features.shape[1])
    slice_rows = -(-len(features) // num_threads)

    def multiply(task):
        products = np.empty((block, projection_t.shape[1]), np.float32)
        stop = min((task + 1) * slice_rows, len(features))
        for first in range(task * slice_rows, stop, block):
            rows = features[first:min(first + block, stop)]
            np.matmul(rows, projection_t, out=products[:len(rows)])

    return best_seconds(lambda: cpu.run_tasks(multiply, num_threads, num_threads), repeats)


def pass_times(features, labels, num_classes, weights, bias, repeats):
    """Best seconds of pass 1 and pass 2 over ``repeats`` runs, every thread."""
    chunk = default_chunk_rows(features.shape[1])
    chunks = [(features[start:start + chunk], labels[start:start + chunk])
              for start in range(0, len(features), chunk)]
    sums = ClassSums(num_classes, features.shape[1])

    def pass1():
        nonlocal sums
        sums = ClassSums(num_classes, features.shape[1])
        for rows, row_labels in chunks:
            sums.update(rows, row_labels)

    first = best_seconds(pass1, repeats)
    geometry = Geometry.from_class_sums(sums.counts, sums.sums)

    def pass2():
        stats = ResidualStats(geometry, weights=weights, bias=bias)
        for rows, row_labels in chunks:
            stats.update(rows, row_labels)

    return first, best_seconds(pass2, repeats), geometry


@njit(parallel=True, cache=True, fastmath=True)
def _plain_class_sums(features, labels, num_classes, num_slices):
    """Float64 class sums of float32 rows by the plainest loop: ``num_slices`` slices of
    rows in parallel, each row added to its class's row of its slice's own sums, in row
    order; the slices' sums are added at the end.

    Returns
    -------
    float64 array of shape (C, D)
    """
    num_rows, num_features = features.shape
    slice_sums = np.zeros((num_slices, num_classes, num_features))
    per_slice = -(-num_rows // num_slices)
    for part in prange(num_slices):
        for i in range(part * per_slice, min((part + 1) * per_slice, num_rows)):
            label = labels[i]
            for j in range(num_features):
                slice_sums[part, label, j] += np.float64(features[i, j])
    return slice_sums.sum(axis=0)


def plain_class_sums_seconds(features, labels, num_classes, repeats):
    """Best seconds of ``_plain_class_sums`` on every thread: what pass 1's arithmetic
    costs in the simplest loop, beside a read of the same rows (one slice per thread)."""
    labels = np.asarray(labels, np.int64)
    threads = numba.get_num_threads()
    _plain_class_sums(features[:64], labels[:64], num_classes, threads)
    return best_seconds(lambda: _plain_class_sums(features, labels, num_classes, threads),
                        repeats)


def collapse_and_floor(features, labels, weights, bias, repeats):
    """Best seconds of ``ncfast.collapse``, and the floor of reading the features twice
    (``2 × nbytes / read_bandwidth``), measured one after the other."""
    total = best_seconds(lambda: ncfast.collapse(features, labels, weights=weights, bias=bias),
                         repeats)
    return total, 2 * features.nbytes / read_bandwidth(features, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=1_000_000)
    parser.add_argument("--features", type=positive_int, default=512)
    parser.add_argument("--classes", type=positive_int, default=100)
    parser.add_argument("--no-classifier", action="store_true")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--spread", type=positive_float, default=SPREAD,
                        help="within-class standard deviation (see bench.data)")
    args = parser.parse_args(argv)
    features, labels, weights, bias = collapsed_features(
        args.rows, args.features, args.classes, classifier=not args.no_classifier,
        spread=args.spread)
    warm = slice(0, 4096)
    pass_times(features[warm], labels[warm], args.classes, weights, bias, 1)
    first, second, geometry = pass_times(features, labels, args.classes, weights, bias,
                                         args.repeats)
    total, floor = collapse_and_floor(features, labels, weights, bias, args.repeats)
    plain = plain_class_sums_seconds(features, labels, args.classes, args.repeats)
    stats = ResidualStats(geometry, weights=weights, bias=bias)
    if stats.route == "features":
        kernel, kernel_stage_times = "features (BLAS)", features_stage_times
    elif runs_narrow_kernel(stats.plan.classes_route()):
        kernel, kernel_stage_times = "narrow", narrow_stage_times
    else:
        kernel, kernel_stage_times = "BLAS", stage_times
    stages = min((kernel_stage_times(features, labels, stats) for _ in range(args.repeats)),
                 key=lambda times: sum(times.values()))
    print(f"N={args.rows} D={args.features} C={args.classes} "
          f"classifier={not args.no_classifier} threads={numba.get_num_threads()} "
          f"block={cpu.block_rows(args.features)} rows "
          f"chunk={default_chunk_rows(args.features)} rows "
          f"route={stats.route} pass-2 kernel={kernel}")
    print(f"collapse: {total:.3f} s = {total / floor:.2f}x the two-read floor of {floor:.3f} s")
    print(f"pass 1 (class sums): {first:.3f} s   pass 2: {second:.3f} s   "
          f"(one read: {floor / 2:.3f} s; the plainest float64 class-sum loop, rows in "
          f"order: {plain:.3f} s)")
    print("pass 2 stages on one thread: " + "  ".join(
        f"{name} {seconds:.3f} s" for name, seconds in stages.items()))
    if kernel == "narrow":
        arithmetic = narrow_in_cache_seconds(features, labels, stats, args.repeats)
        read = floor / 2
        print(f"narrow kernel with its rows in cache (its arithmetic alone) on "
              f"{numba.get_num_threads()} threads: {arithmetic:.3f} s = "
              f"{arithmetic / read:.2f}x one read; collapse at best {read:.3f} + "
              f"{max(arithmetic, read):.3f} s = "
              f"{least_collapse_seconds(read, arithmetic) / floor:.2f}x the two-read floor")
    # The product the floor counts far from collapse: every row times [M~^T V | W^T]
    # ("classes" route) or [M~^T | W^T] ("features" route: the centred means).
    full_projection_t = np.ascontiguousarray(
        np.concatenate([stats.plan.projection_t, stats.plan.weights_t], axis=1))
    gemm = gemm_only_seconds(features, full_projection_t, numba.get_num_threads(),
                             args.repeats)
    flops = 2.0 * args.rows * args.features * full_projection_t.shape[1]
    means = "M~^T V" if stats.route == "classes" else "M~^T"
    print(f"full-width GEMM alone (every row × [{means} | W^T]) on {numba.get_num_threads()} "
          f"threads: {gemm:.3f} s ({flops / gemm / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
