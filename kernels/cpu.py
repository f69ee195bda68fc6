"""Numba CPU kernels for the two streaming passes, and the threads that run them.

Each kernel adds one block's contribution into caller-owned accumulators; the
caller (``ncfast.accumulators``) owns validation and the merge law. Status
codes: kernels never raise. A row with a label outside ``[0, C)`` or a
non-finite value is reported back by index so that Python can name it.

Threads. Both passes run serial ``nogil`` kernels on the module's worker
threads (created once, and again in a forked child), as many as
``numba.get_num_threads()`` (passed in by the caller), so no thread pool is
entered per kernel call. Pass 1 (``class_sums_chunk``) reads one contiguous
slice of the chunk per thread, once; its thread-private sums are added in
slice order, so results depend on the thread count only through float64
rounding. Pass 2 (``residual_chunk``, bound by the float32 GEMM) cuts the
chunk into tasks of a fixed number of rows that the threads take as they
finish one; each task streams its rows in cache-sized blocks through
residuals, a single-threaded BLAS call and the epilogue, all in one compiled
call, in buffers each worker thread keeps. Task sums are added in task
order, so pass 2 does not depend on the thread count at all. ``residuals``
(the "features" route) is a parallel kernel over rows.
"""
import contextlib
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange
from threadpoolctl import ThreadpoolController

# Fast-math without nnan/ninf, so that the finiteness checks below still work.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

NO_ROW = np.iinfo(np.int64).max
FLOAT64_MAX = np.finfo(np.float64).max

#: Bytes of float32 residuals per pass-2 block: a block's residuals and GEMM
#: output stay in one core's L2 cache.
BLOCK_BYTES = 512 << 10

# The BLAS libraries of numpy and SciPy (Numba's np.dot calls SciPy's, so it is
# loaded first), limited to one thread inside the passes.
importlib.import_module("scipy.linalg.cython_blas")
_BLAS = ThreadpoolController()

#: The main thread's dense algebra (geometry, classifier offsets, metrics) up
#: to this many flops runs on one BLAS thread. After a multithreaded call
#: OpenBLAS's idle threads spin for about 0.1 s (measured: 0.1 s of CPU after
#: one 200×200 matmul), taking a core from the pass that follows; work this
#: small gains less than that from a second thread.
ONE_THREAD_DENSE_FLOPS = 2e9


def one_blas_thread():
    """Context in which BLAS and LAPACK run on one thread."""
    return _BLAS.limit(limits=1, user_api="blas")


def dense_blas(flops):
    """Context for the main thread's dense algebra of about ``flops`` flops.

    One BLAS thread up to ``ONE_THREAD_DENSE_FLOPS``, every thread beyond.
    """
    if flops <= ONE_THREAD_DENSE_FLOPS:
        return one_blas_thread()
    return contextlib.nullcontext()


#: Bounds on the rows of a pass-2 block. At least 256: at D = 2048 a block of 128 rows
#: left the GEMM 20% below its rate at 256 (BLAS packs the D × C' right-hand side once
#: per call; measured 51 against 62 GFLOP per CPU-second at 30,000 × 2048 × 1000).
BLOCK_ROWS_RANGE = (256, 1024)


def block_rows(num_features):
    """Rows per pass-2 block: ``BLOCK_BYTES`` of float32 residuals, within ``BLOCK_ROWS_RANGE``."""
    return int(np.clip(BLOCK_BYTES // (4 * max(num_features, 1)), *BLOCK_ROWS_RANGE))


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def finite(value):
    """Whether a float64 is neither NaN nor infinite.

    Not ``np.isfinite``: inside these fast-math kernels LLVM dropped that test
    of a sum whose terms the loop also stores (found by the NaN tests, in
    ``class_sums``). NaN and Inf fail this comparison.
    """
    return abs(value) <= FLOAT64_MAX


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def class_sums(features, labels, clean_labels, counts, sums, clean_counts, clean_sums):
    """Add per-class counts and float64 sums of a block of rows, on one thread.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,) or (0,)
        When non-empty, rows whose label equals their clean label are also
        added to ``clean_counts`` and ``clean_sums``.
    counts : int64 array of shape (C,), updated in place
    sums : float64 array of shape (C, D), updated in place
    clean_counts, clean_sums : same shapes, updated in place (unused when
        ``clean_labels`` is empty)

    Returns
    -------
    bad_label_row, bad_value_row : int
        First row (in the block) with a label outside ``[0, C)`` (either label
        array), and first row with a NaN or Inf; ``NO_ROW`` when there is none.
        A row with a bad label is skipped; a row with a bad value is added
        (one read of each row), so the sums are only usable when there is
        none: ``class_sums_chunk`` then discards them.
    """
    num_rows, num_features = features.shape
    num_classes = counts.shape[0]
    track_clean = clean_labels.shape[0] > 0
    bad_label = NO_ROW
    bad_value = NO_ROW
    for i in range(num_rows):
        label = labels[i]
        clean = label
        if track_clean:
            clean = clean_labels[i]
        if label < 0 or label >= num_classes or clean < 0 or clean >= num_classes:
            bad_label = min(bad_label, i)
            continue
        counts[label] += 1
        row_total = 0.0
        for j in range(num_features):
            value = np.float64(features[i, j])
            sums[label, j] += value
            row_total += value
        if not finite(row_total):
            bad_value = min(bad_value, i)
        if track_clean and clean == label:
            clean_counts[label] += 1
            for j in range(num_features):
                clean_sums[label, j] += features[i, j]
    return bad_label, bad_value


def class_sums_chunk(features, labels, clean_labels, counts, sums, clean_counts, clean_sums,
                     num_threads):
    """``class_sums`` of one chunk, threaded over contiguous row slices; all or nothing.

    Each slice adds into zeroed arrays of its worker thread's
    (``staging_arrays``), which are added to the given arrays in slice order
    only when no row of the chunk is bad: a chunk that fails leaves the state
    as it was. Only the classes a slice has rows of are added and zeroed
    again when they are fewer than half of them, so that with many classes a
    chunk costs its rows, not C × D. (Slices of columns would need no
    copies, but two cores reading alternate halves of every row pull the
    whole of it from memory: measured 2.5x slower.) Parameters and returns as
    ``class_sums``, plus ``num_threads``; bad rows are numbered within the
    chunk.
    """
    totals = (counts, sums, clean_counts, clean_sums)

    def run_slice(start, stop):
        staged = staging_arrays(totals)
        bad_rows = class_sums(features[start:stop], labels[start:stop],
                              clean_labels[start:stop] if clean_labels.shape[0] else
                              clean_labels, *staged.arrays)
        return staged, [NO_ROW if row == NO_ROW else start + row for row in bad_rows]

    results = run_slices(run_slice, features.shape[0], num_threads)
    bad_rows = tuple(min(rows) for rows in zip(*(bad_rows for _, bad_rows in results)))
    for staged, _ in results:
        # Every row added counts, and a clean row is a row of its class.
        touched = np.flatnonzero(staged.arrays[0])
        rows = slice(None) if 2 * touched.size > counts.shape[0] else touched
        for total, part in zip(totals, staged.arrays):
            if total.shape[0] == 0:  # clean rows not tracked
                continue
            if bad_rows == (NO_ROW, NO_ROW):
                total[rows] += part[rows]
            part[rows] = 0
        staged.in_use = False
    return bad_rows


class Staging:
    """Zeroed arrays a worker thread adds one slice of a chunk into (``staging_arrays``).

    Attributes
    ----------
    arrays : tuple of arrays
    in_use : bool
        Holding a slice that is not yet added (and zeroed again).
    """

    def __init__(self, arrays):
        self.arrays = arrays
        self.in_use = False


def staging_arrays(totals):
    """Zeroed arrays shaped as ``totals``, kept by the calling thread from chunk to chunk.

    A fresh array is written page by page, and in a virtual machine each first
    write of a page costs microseconds (measured: 0.3 s for the 2,000 rows of
    a 32,000 × 4096 float64 copy), so each worker thread keeps its own and the
    caller zeroes the rows it used. A thread asked again while its arrays hold
    a slice not yet added (it ran two slices of one chunk) gets fresh ones.

    Parameters
    ----------
    totals : tuple of arrays
        The state's arrays (shapes and dtypes).

    Returns
    -------
    Staging
        Marked in use; the caller adds it, zeroes it and clears ``in_use``.
    """
    staged = getattr(_thread_buffers, "staging", None)
    fits = staged is not None and not staged.in_use and all(
        part.shape == total.shape and part.dtype == total.dtype
        for part, total in zip(staged.arrays, totals))
    if not fits:
        staged = Staging(tuple(np.zeros(total.shape, total.dtype) for total in totals))
        if getattr(_thread_buffers, "staging", None) is None or \
                not _thread_buffers.staging.in_use:
            _thread_buffers.staging = staged
    staged.in_use = True
    return staged


_workers = None
_workers_lock = threading.Lock()
_thread_buffers = threading.local()


def _forget_workers():
    """In a forked child the parent's worker threads do not exist: start afresh."""
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_workers)


def _worker_pool():
    """The module's worker threads, one per thread Numba may use, created on first use.

    Threads started per chunk cost about 0.4 ms each time, and a new thread
    starts with cold buffers; these live as long as the process.
    """
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS,
                                          thread_name_prefix="ncfast")
        return _workers


def thread_buffer(name, shape, dtype):
    """A scratch array of the calling thread's, kept from call to call.

    Fresh memory is slow to write the first time (in this virtual machine
    about 20 ms more for each 64 MiB), so chunk-sized scratch is kept.

    Parameters
    ----------
    name : str
        Which of the thread's buffers.
    shape : tuple of int
    dtype : numpy dtype

    Returns
    -------
    ndarray, C-contiguous
        The first ``shape[0]`` rows of the thread's buffer, which grows when it
        has fewer rows or other columns or dtype; uninitialised on first use,
        otherwise as the thread's last use left it.
    """
    buffer = getattr(_thread_buffers, name, None)
    if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != tuple(shape[1:]) \
            or buffer.dtype != dtype:
        buffer = np.empty(shape, dtype)
        setattr(_thread_buffers, name, buffer)
    return buffer[:shape[0]]


def run_tasks(function, num_tasks, num_threads):
    """``function(task)`` for every task in ``range(num_tasks)``, on worker threads.

    Up to ``num_threads`` worker threads each take the next task as soon as
    they finish one, so a core slowed by other work does not hold the rest
    back. Returns the results in task order. Kernels called by ``function``
    must be ``nogil``; BLAS runs single-threaded.
    """
    results = [None] * num_tasks
    # Under the GIL, next() on a shared range iterator hands each task out once.
    tasks = iter(range(num_tasks))

    def run():
        for task in tasks:
            results[task] = function(task)

    workers = min(max(num_threads, 1), num_tasks)
    with one_blas_thread():
        if workers <= 1:
            run()
        else:
            pool = _worker_pool()
            for future in [pool.submit(run) for _ in range(workers)]:
                future.result()
    return results


def run_slices(function, length, num_threads):
    """``function(start, stop)`` over ``num_threads`` contiguous slices of ``range(length)``.

    As ``run_tasks``, one task per slice; returns the results in slice order.
    """
    slice_length = max(1, -(-length // max(num_threads, 1)))
    starts = range(0, max(length, 1), slice_length)
    return run_tasks(lambda task: function(starts[task], min(starts[task] + slice_length, length)),
                     len(starts), num_threads)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _residual_row(features, labels, label_rows, means, out_residuals, out_sq_norms, i):
    """Residual and squared norm of row ``i``; return False for a bad row (see ``residuals``)."""
    num_features = features.shape[1]
    label = labels[i]
    row = -1
    if label >= 0 and label < label_rows.shape[0]:
        row = label_rows[label]
    if row < 0:
        for j in range(num_features):
            out_residuals[i, j] = 0.0
        out_sq_norms[i] = -1.0
        return False
    sq_norm = 0.0
    for j in range(num_features):
        residual = features[i, j] - means[row, j]
        out_residuals[i, j] = residual
        sq_norm += residual * residual
    if not finite(sq_norm):
        out_sq_norms[i] = np.nan
        return False
    out_sq_norms[i] = sq_norm
    return True


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def residuals(features, labels, label_rows, means, out_residuals, out_sq_norms):
    """Residuals ``r_i = h_i - mu_{y_i}`` from float64 means, with ``||r_i||^2``.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    label_rows : int64 array of shape (C,)
        Row of ``means`` for each class, -1 for a class without a mean.
    means : float64 array of shape (C', D)
    out_residuals : float32 array of shape (n, D), written
    out_sq_norms : float64 array of shape (n,), written: ``||r_i||^2`` in
        float64, NaN for a row with a non-finite value, -1 for a row whose
        label is out of range or has no mean (its residual is set to zero).
    """
    for i in prange(features.shape[0]):
        _residual_row(features, labels, label_rows, means, out_residuals, out_sq_norms, i)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def block_residuals(features, labels, label_rows, means, out_residuals, out_sq_norms):
    """``residuals`` on one thread, without the GIL; return the first bad row or ``NO_ROW``."""
    first_bad = NO_ROW
    for i in range(features.shape[0]):
        if not _residual_row(features, labels, label_rows, means, out_residuals, out_sq_norms,
                             i):
            first_bad = min(first_bad, i)
    return first_bad


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def tally_row(label, sq_norm, ncc_prediction, classifier_prediction, corrupted_row, counts,
              sq_norm_sums, norm_sums, ncc_hits, classifier_hits, totals):
    """Add one row's spread and predictions to the per-class tallies.

    Parameters
    ----------
    label : int
    sq_norm : float, ``||r||^2``
    ncc_prediction : int, nearest class centre
    classifier_prediction : int, classifier argmax, or -1 without a classifier
    corrupted_row : bool, the row's training label is known to be wrong
    counts, ncc_hits, classifier_hits : int64 arrays of shape (C,), updated
    sq_norm_sums, norm_sums : float64 arrays of shape (C,), updated
    totals : int64 array of shape (3,), updated: NCC/classifier
        disagreements, corrupted rows, corrupted rows predicted as their
        (noisy) label (by the classifier if there is one, else by NCC)
    """
    counts[label] += 1
    sq_norm_sums[label] += sq_norm
    norm_sums[label] += np.sqrt(sq_norm)
    if ncc_prediction == label:
        ncc_hits[label] += 1
    prediction = ncc_prediction
    if classifier_prediction >= 0:
        if classifier_prediction != ncc_prediction:
            totals[0] += 1
        prediction = classifier_prediction
        if prediction == label:
            classifier_hits[label] += 1
    if corrupted_row:
        totals[1] += 1
        if prediction == label:
            totals[2] += 1


#: Values that ``first_argmin`` screens with one vector compare: a vector
#: register of float64.
ARGMIN_GROUP = 8


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def first_argmin(values):
    """Index of the first smallest value of ``values`` (which holds no NaN).

    A running minimum over single values is a chain of dependent, poorly
    predicted branches. Here each group of ``ARGMIN_GROUP`` values is
    screened against the running minimum by one vector compare, and only a
    group holding a smaller value is scanned (a few groups per call).

    Parameters
    ----------
    values : float64 array of shape (n,), n >= 1
    """
    num_values = values.shape[0]
    smallest = values[0]
    index = 0
    full = num_values - num_values % ARGMIN_GROUP
    for start in range(0, full, ARGMIN_GROUP):
        smaller = False
        for k in range(start, start + ARGMIN_GROUP):
            smaller |= values[k] < smallest
        if smaller:
            for k in range(start, start + ARGMIN_GROUP):
                if values[k] < smallest:
                    smallest = values[k]
                    index = k
    for k in range(full, num_values):
        if values[k] < smallest:
            smallest = values[k]
            index = k
    return index


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def beyond_radius(sq_norm, sq_radius):
    """Whether a row is not strictly inside a radius around its class mean (a NaN norm
    counts as beyond): it then needs the full computation for that prediction."""
    return not sq_norm < sq_radius


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def count_rows_beyond(sq_norms, labels, label_rows, sq_radii):
    """How many rows lie beyond their class's radius (see ``gather_rows_beyond``)."""
    count = 0
    for i in range(sq_norms.shape[0]):
        if beyond_radius(sq_norms[i], sq_radii[label_rows[labels[i]]]):
            count += 1
    return count


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def gather_rows_beyond(values, sq_norms, labels, label_rows, sq_radii, out_rows):
    """Copy, in order, the rows of ``values`` whose residual lies beyond its class's radius.

    Parameters
    ----------
    values : float32 array of shape (n, k)
    sq_norms : float64 array of shape (n,), ``||r_i||^2``
    labels, label_rows : see ``epilogue``
    sq_radii : float64 array of shape (C',), squared radius per mean row
    out_rows : float32 array of shape (m >= n, k); rows ``[0, count)``
        written, the rest zeroed when ``count > 0`` (the GEMM that follows
        has one fixed shape)

    Returns
    -------
    count : int
    """
    count = 0
    for i in range(values.shape[0]):
        if beyond_radius(sq_norms[i], sq_radii[label_rows[labels[i]]]):
            out_rows[count, :] = values[i, :]
            count += 1
    if count > 0:
        out_rows[count:] = 0.0
    return count


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def epilogue(products, sq_norms, labels, corrupted, far_mean_products, far_logits, route,
             sums):
    """Fused pass over one block's GEMM output: NC1 scatter, NCC, classifier argmax, tallies.

    ``products`` holds ``a = V^T z``, the coordinates of ``z = M~ r`` in the
    Gram eigenbasis ``V``; their squares are summed into ``eigen_scatter``
    (all NC1 needs, see ``ResidualStats``). The nearest class centre of a
    row inside its NCC radius is its own mean (``Geometry.ncc_sq_radii``).
    For the other rows ``far_mean_products`` holds ``z = V a``, and the
    squared distance to mean k is ``||r||^2 + 2 (z_y - z_k) + K[y, k]``
    (docs/algorithm.md, pass 2): its argmin over k is that of ``K[y, k] - 2 z_k``.
    The classifier's prediction of a row inside its classifier radius is
    that of its class mean (``mean_predictions``); for the other rows
    ``far_logits`` holds ``W r``, the logits are ``W r + (W mu_y + b)``, and
    their first argmax is the first argmin of their negation. Runs on one
    thread, without the GIL.

    Parameters
    ----------
    products : float32 array of shape (n, C'), ``R M~^T V``
    sq_norms : float64 array of shape (n,), ``||r_i||^2``
    labels : int64 array of shape (n,), every label has a mean
    corrupted : uint8 array of shape (n,) or (0,); rows whose training label
        is wrong (label-noise runs)
    far_mean_products : float32 array of shape (m, C'), ``z`` of the rows
        beyond their NCC radius, in row order
    far_logits : float32 array of shape (m, C_w), ``W r`` of the rows beyond
        their classifier radius, in row order
    route : ClassesRoute
        The pass-2 plan's arrays.
    sums : Pass2Sums
        Updated: ``eigen_scatter`` with ``sum a^2``, the per-class tallies.
    """
    num_means = route.present_classes.shape[0]
    num_logits = route.logit_offsets.shape[1]
    has_corrupted = corrupted.shape[0] > 0
    scores = np.empty(num_means)
    negated_logits = np.empty(num_logits)
    far = uncertain = 0
    for i in range(products.shape[0]):
        row = route.label_rows[labels[i]]
        for j in range(num_means):
            coordinate = np.float64(products[i, j])
            sums.eigen_scatter[j] += coordinate * coordinate

        best_k = row
        if beyond_radius(sq_norms[i], route.ncc_sq_radii[row]):
            for k in range(num_means):
                scores[k] = route.mean_sq_distances[row, k] - 2.0 * np.float64(far_mean_products[far, k])
            best_k = first_argmin(scores)
            far += 1

        best_c = -1
        if num_logits > 0:
            best_c = route.mean_predictions[row]
            if beyond_radius(sq_norms[i], route.classifier_sq_radii[row]):
                for c in range(num_logits):
                    negated_logits[c] = -(np.float64(far_logits[uncertain, c])
                                          + route.logit_offsets[row, c])
                best_c = first_argmin(negated_logits)
                uncertain += 1

        tally_row(labels[i], sq_norms[i], route.present_classes[best_k], best_c,
                  has_corrupted and corrupted[i] != 0, sums.counts, sums.sq_norm_sums,
                  sums.norm_sums, sums.ncc_hits, sums.classifier_hits, sums.totals)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def residual_blocks(features, labels, corrupted, route, buffers, out_sq_norms, sums):
    """Pass 2 of some rows on the "classes" route, on one thread, in cache-sized blocks.

    Per block of ``b = buffers.residuals.shape[0]`` rows: ``block_residuals``;
    one float32 GEMM ``R M~^T V`` (BLAS, through ``np.dot``); for the rows
    beyond their NCC radius, if any, ``z = V a`` by a second GEMM; for the
    rows beyond their classifier radius, if any, ``W r`` by a third
    (``gather_rows_beyond``); ``epilogue``. Each GEMM has one shape for every
    block (the last block and the gathered rows are padded with zero rows),
    so that BLAS computes every row the same way however the rows are split.

    Parameters
    ----------
    features, labels, corrupted : the rows (see ``epilogue``)
    route : ClassesRoute
        The pass-2 plan's arrays.
    buffers : Pass2Buffers
        Scratch of ``b`` rows.
    out_sq_norms : float64 array of shape (n,), written as by ``residuals``
        up to the first bad block
    sums : Pass2Sums
        Updated in place (see ``epilogue``).

    Returns
    -------
    bool
        False when a block holds a bad row (flagged in ``out_sq_norms``); the
        sums are then incomplete.
    """
    num_rows = features.shape[0]
    block = buffers.residuals.shape[0]
    has_corrupted = corrupted.shape[0] > 0
    has_classifier = route.weights_t.shape[1] > 0
    residual_buffer = buffers.residuals
    for first in range(0, num_rows, block):
        last = min(first + block, num_rows)
        size = last - first
        sq_norms = out_sq_norms[first:last]
        block_labels = labels[first:last]
        residual_buffer[size:] = 0.0
        if block_residuals(features[first:last], block_labels, route.label_rows, route.means,
                           residual_buffer[:size], sq_norms) != NO_ROW:
            return False
        np.dot(residual_buffer, route.projection_t, buffers.products)
        far = count_rows_beyond(sq_norms, block_labels, route.label_rows, route.ncc_sq_radii)
        if far == size:  # the gathered rows would be the block itself
            np.dot(buffers.products, route.eigenvectors_t, buffers.far_mean_products)
        elif far > 0:
            gather_rows_beyond(buffers.products[:size], sq_norms, block_labels,
                               route.label_rows, route.ncc_sq_radii, buffers.far_coordinates)
            np.dot(buffers.far_coordinates, route.eigenvectors_t, buffers.far_mean_products)
        if has_classifier:
            uncertain = count_rows_beyond(sq_norms, block_labels, route.label_rows,
                                          route.classifier_sq_radii)
            if uncertain == size:  # the gathered rows would be the block itself
                np.dot(residual_buffer, route.weights_t, buffers.far_logits)
            elif uncertain > 0:
                gather_rows_beyond(residual_buffer[:size], sq_norms, block_labels,
                                   route.label_rows, route.classifier_sq_radii,
                                   buffers.far_residuals)
                np.dot(buffers.far_residuals, route.weights_t, buffers.far_logits)
        epilogue(buffers.products[:size], sq_norms, block_labels,
                 corrupted[first:last] if has_corrupted else corrupted,
                 buffers.far_mean_products, buffers.far_logits, route, sums)
    return True


class ClassesRoute(NamedTuple):
    """The pass-2 plan's arrays that the "classes" route kernels read.

    Attributes
    ----------
    label_rows : int64 array of shape (C,), row of each class among the means, -1
    present_classes : int64 array of shape (C',), class of each mean row
    means : float64 array of shape (C', D)
    projection_t : float32 array of shape (D, C'), ``M~^T V``
    ncc_sq_radii : float64 array of shape (C',)
    mean_sq_distances : float64 array of shape (C', C'), ``||mu_a - mu_b||^2``
    eigenvectors_t : float32 array of shape (C', C'), ``V^T``
    weights_t : float32 array of shape (D, C_w), ``W^T`` (C_w = 0 without a classifier)
    logit_offsets : float64 array of shape (C', C_w), ``W mu_a + b``
    mean_predictions : int64 array of shape (C',), first argmax of each row of
        ``logit_offsets``
    classifier_sq_radii : float64 array of shape (C',)
    """

    label_rows: np.ndarray
    present_classes: np.ndarray
    means: np.ndarray
    projection_t: np.ndarray
    ncc_sq_radii: np.ndarray
    mean_sq_distances: np.ndarray
    eigenvectors_t: np.ndarray
    weights_t: np.ndarray
    logit_offsets: np.ndarray
    mean_predictions: np.ndarray
    classifier_sq_radii: np.ndarray


class Pass2Sums(NamedTuple):
    """The sums pass 2 adds into on the "classes" route (``ResidualStats``'s arrays).

    Attributes
    ----------
    eigen_scatter : float64 array of shape (C',), ``sum a^2``
    counts, ncc_hits, classifier_hits : int64 arrays of shape (C,)
    sq_norm_sums, norm_sums : float64 arrays of shape (C,), ``sum ||r||^2``, ``sum ||r||``
    totals : int64 array of shape (3,): rows where NCC and classifier disagree,
        corrupted rows, corrupted rows predicted as their (noisy) label
    """

    eigen_scatter: np.ndarray
    counts: np.ndarray
    sq_norm_sums: np.ndarray
    norm_sums: np.ndarray
    ncc_hits: np.ndarray
    classifier_hits: np.ndarray
    totals: np.ndarray


class Pass2Buffers(NamedTuple):
    """Scratch of one pass-2 block of ``b`` rows (float32).

    Attributes
    ----------
    residuals, far_residuals : arrays of shape (b, D)
    products, far_coordinates, far_mean_products : arrays of shape (b, C')
    far_logits : array of shape (b, C_w)
    """

    residuals: np.ndarray
    products: np.ndarray
    far_coordinates: np.ndarray
    far_mean_products: np.ndarray
    far_residuals: np.ndarray
    far_logits: np.ndarray


#: Pass-2 blocks per task: worker threads take tasks of this many blocks as they
#: finish one, and each task sums into its own small partial state. A chunk of
#: 64 MiB then holds at least 4 tasks, so that the threads finish it together.
TASK_BLOCKS = 8


def residual_chunk(features, labels, corrupted, route, sums, out_sq_norms, num_threads):
    """Pass 2 of one chunk on the "classes" route (C' <= D), on worker threads.

    The chunk is cut into tasks of ``TASK_BLOCKS`` blocks of ``block_rows(D)``
    rows, independent of the thread count; ``num_threads`` worker threads
    take tasks as they finish one (``run_tasks``) and run
    ``residual_blocks`` in buffers each worker thread keeps. Each task sums
    into its own partial state; these are added to ``sums`` in task order,
    and only when no row is bad, so the result does not depend on the thread
    count.

    Parameters
    ----------
    features, labels, corrupted : the chunk (see ``epilogue``)
    route : ClassesRoute
    sums : Pass2Sums
        Updated in place.
    out_sq_norms : float64 array of shape (n,), zeros; written as by
        ``residuals`` up to each task's first bad block.
    num_threads : int

    Returns
    -------
    bool
        True when every row was good and ``sums`` were updated; False when
        some row was bad (``out_sq_norms`` flags it) and nothing was added.
    """
    num_rows, num_features = features.shape
    num_means = route.present_classes.shape[0]
    rows = block_rows(num_features)
    task_rows = rows * TASK_BLOCKS
    shapes = {"residuals": num_features, "products": num_means, "far_coordinates": num_means,
              "far_mean_products": num_means, "far_residuals": num_features,
              "far_logits": route.weights_t.shape[1]}

    def run_rows(first, last, partial):
        buffers = Pass2Buffers(*(thread_buffer(name, (rows, shapes[name]), np.float32)
                                 for name in Pass2Buffers._fields))
        return residual_blocks(features[first:last], labels[first:last],
                               corrupted[first:last] if corrupted.shape[0] else corrupted,
                               route, buffers, out_sq_norms[first:last], partial)

    return run_pass2_tasks(run_rows, num_rows, task_rows, sums, num_threads)


def run_pass2_tasks(run_rows, num_rows, task_rows, sums, num_threads):
    """Pass 2 of a chunk in tasks of ``task_rows`` rows on worker threads; all or nothing.

    Each task sums into its own zeroed ``Pass2Sums``; the partial sums are
    added to ``sums`` in task order, and only when every task succeeded, so
    the result does not depend on the thread count.

    Parameters
    ----------
    run_rows : callable
        ``run_rows(first, last, partial)`` adds rows ``[first, last)`` into
        ``partial`` and returns False for a bad row.
    num_rows, task_rows : int
    sums : Pass2Sums
        Updated in place.
    num_threads : int

    Returns
    -------
    bool
        False when some task found a bad row (nothing added).
    """
    def run_task(task):
        first, last = task * task_rows, min((task + 1) * task_rows, num_rows)
        partial = Pass2Sums(*(np.zeros_like(total) for total in sums))
        return partial if run_rows(first, last, partial) else None

    partials = run_tasks(run_task, -(-num_rows // task_rows), num_threads)
    if any(partial is None for partial in partials):
        return False
    for partial in partials:
        for total, part in zip(sums, partial):
            total += part
    return True
