"""Numba CPU kernels for the two streaming passes, and the threads that run them.

Each kernel adds one block's contribution into caller-owned accumulators; the
caller (``ncfast.accumulators``) owns validation and the merge law. Status
codes: kernels never raise. A row with a label outside ``[0, C)`` or a
non-finite value is reported back by index so that Python can name it.

Threads. Both passes run serial ``nogil`` kernels on the module's worker
threads (created once, and again in a forked child), as many as
``numba.get_num_threads()`` (passed in by the caller), so no thread pool is
entered per kernel call. Pass 1 (``class_sums_chunk``) orders a chunk's rows
by class and cuts them into tasks of fixed rows; each class's rows are summed
in cache and added once per chunk, so pass 1 does not depend on the thread
count at all. Pass 2 (``residual_chunk``, bound by the float32 GEMM) cuts the
chunk into tasks of a fixed number of rows that the threads take as they
finish one; each task streams its rows in cache-sized blocks through
residuals, a single-threaded BLAS call and the epilogue, all in one compiled
call, in buffers each worker thread keeps. Task sums are added in task
order, so pass 2 does not depend on the thread count at all. On the "features"
route the tasks run ``coordinate_blocks`` the same way.
"""
import concurrent.futures
import contextlib
import importlib
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
from numba import njit
from threadpoolctl import ThreadpoolController

from ncfast.kernels.blas import sgemm
from ncfast.kernels.prefetch import HEAD_PREFETCH_AHEAD, prefetch_row_head

# Fast-math without nnan/ninf, so that the finiteness checks below still work.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

NO_ROW = np.iinfo(np.int64).max
FLOAT64_MAX = np.finfo(np.float64).max

#: A row farther than this from its class mean is refused as too large: pass 2
#: multiplies float32 residuals by vectors no longer than about 1e14 (built from
#: centred means and classifier rows whose entries are at most 1e10,
#: ``ncfast.geometry.SCALE_RANGE``), and the products must stay inside float32's 3.4e38.
MAX_RESIDUAL_NORM = 1e20
MAX_RESIDUAL_SQ_NORM = MAX_RESIDUAL_NORM ** 2

#: Bytes of float32 residuals per pass-2 block (within ``BLOCK_ROWS_RANGE``): BLAS packs
#: the D × C' right-hand side once per call, so more rows a call spread that cost. Against
#: 512 KiB (blocks a core's L2 would hold), 8 MiB took 2-9% less time at 1e5 × 2048 × 1000
#: (collapsed and far), 4e4 × 4096 × 1000 and 3e5 × 768 × 1000, and the same at
#: 1e6 × 512 × 100, in two alternated rounds on a machine with 2 MiB of L2 per core.
BLOCK_BYTES = 8 << 20

# The BLAS libraries of numpy and SciPy (the kernels' GEMMs call numpy's, ``blas.sgemm``;
# Numba's np.dot, SciPy's, so it is loaded first), limited to one thread inside the passes.
importlib.import_module("scipy.linalg.cython_blas")
_BLAS = ThreadpoolController()

#: The main thread's dense algebra (geometry, classifier offsets, metrics) up
#: to this many flops runs on one BLAS thread. After a multithreaded call
#: OpenBLAS's idle threads spin for about 0.1 s (measured: 0.1 s of CPU after
#: one 200×200 matmul), taking a core from the pass that follows; work this
#: small gains less than that from a second thread.
ONE_THREAD_DENSE_FLOPS = 2e9


_one_thread_lock = threading.Lock()
_one_thread_users = 0
_one_thread_limit = None


@contextlib.contextmanager
def one_blas_thread():
    """Context in which BLAS and LAPACK run on one thread.

    The limit is the process's, so contexts entered from several threads at
    once (Dask's threaded scheduler runs passes side by side) share it: the
    first sets it and the last to leave restores the thread counts found
    before. Each restoring its own entry's counts left BLAS on one thread for
    the rest of the process whenever two overlapped.
    """
    global _one_thread_users, _one_thread_limit
    with _one_thread_lock:
        if _one_thread_users == 0:
            _one_thread_limit = _BLAS.limit(limits=1, user_api="blas")
        _one_thread_users += 1
    try:
        yield
    finally:
        with _one_thread_lock:
            _one_thread_users -= 1
            if _one_thread_users == 0:
                _one_thread_limit.restore_original_limits()
                _one_thread_limit = None


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


@njit(nogil=True, cache=True)
def first_bad_label(labels, clean_labels, num_classes):
    """First row whose label (or clean label, when given) lies outside ``[0, C)``.

    Parameters
    ----------
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,) or (0,)
    num_classes : int

    Returns
    -------
    int
        The row, or ``NO_ROW``.
    """
    track_clean = clean_labels.shape[0] > 0
    for i in range(labels.shape[0]):
        if labels[i] < 0 or labels[i] >= num_classes:
            return i
        if track_clean and (clean_labels[i] < 0 or clean_labels[i] >= num_classes):
            return i
    return NO_ROW


@njit(nogil=True, cache=True)
def largest_label(labels):
    """The largest label and its first row, in one read without temporaries.

    Parameters
    ----------
    labels : int64 array of shape (n,)

    Returns
    -------
    label, row : int
        (-1, 0) when no label is at least 0.
    """
    largest, row = -1, 0
    for i in range(labels.shape[0]):
        if labels[i] > largest:
            largest, row = labels[i], i
    return largest, row


@njit(nogil=True, cache=True)
def mark_labels(labels, seen):
    """``seen[label] = True`` for every label at least 0 (``seen`` longer than the largest)."""
    for i in range(labels.shape[0]):
        if labels[i] >= 0:
            seen[labels[i]] = True


@njit(nogil=True, cache=True)
def first_non_finite_row(features):
    """First row holding a NaN or an infinity, or ``NO_ROW``."""
    for i in range(features.shape[0]):
        if not row_finite(features, i):
            return i
    return NO_ROW


@njit(nogil=True, cache=True, inline="always")
def row_finite(features, row):
    """Whether every value of ``features[row]`` is finite."""
    for j in range(features.shape[1]):
        if not finite(np.float64(features[row, j])):
            return False
    return True


#: Pass 1 reads a task's rows in their own order when the classes have on average at
#: least this many rows in a task; with more classes it orders the chunk's rows by class
#: first, so that each class's rows are summed in cache and its row of the sums touched
#: once per chunk, not once per task. (At 1e6 x 512 and 10 classes, rows read sorted by
#: class took 2.3x the time of rows in their order; with each row's head prefetched
#: (``prefetch.prefetch_row_head``) 1.4x: 0.170-0.182 s against 0.122-0.126 s.)
PIECE_MIN_ROWS = 8

#: With few classes, pass 1's tasks hold at least this many rows per class (whole
#: pass-2 tasks), so that adding each task's per-class sums costs little beside the read.
TASK_CLASS_ROWS = 64

#: Rows sorted by class: pass 1 adds four rows of one piece in one sweep along D, as
#: ``(a + b) + (c + d)`` in float64, prefetching the heads of the rows two groups on. Four
#: rows then stream from memory at once, and the piece's row of sums is read and written
#: once per four rows. Pass 1 on two threads over every chunk of 1000 classes (best of
#: four), four rows a sweep against one: 1e6 × 768 0.165-0.173 against 0.201-0.221 s (the
#: read alone 0.091-0.099 s), 1e5 × 2048 0.041 against 0.051-0.054 s, 1e6 × 512 0.110
#: against 0.127 s; 1e5 × 4096 in 4000 classes 0.150-0.153 against 0.162-0.172 s. Eight
#: rows a sweep: 0.158, 0.043-0.045, 0.107 and 0.152-0.159 s.
#: (``sum_sorted_groups`` writes the sweep out for four rows.)
GROUP_ROWS = 4


def pass1_task_rows(num_features, num_classes):
    """Rows per pass-1 task: ``task_rows(D)``, or with few classes (at least
    ``PIECE_MIN_ROWS`` rows per class in such a task, rows read in their own order)
    the multiple of ``cheap_task_rows(D)`` that holds ``TASK_CLASS_ROWS`` rows per
    class. Independent of the thread count."""
    rows = task_rows(num_features)
    if num_classes * PIECE_MIN_ROWS > rows:
        return rows
    cheap = cheap_task_rows(num_features)
    return cheap * -(-num_classes * TASK_CLASS_ROWS // cheap)


#: Float64 columns of the pieces' scratch rows are padded to whole cache lines, so that
#: two threads never write one line.
PIECE_ALIGN = 8


class ChunkPieces(NamedTuple):
    """How pass 1 cuts a chunk (``class_pieces``): tasks of ``pass1_task_rows(D, C)`` rows
    (positions of ``order`` when the rows are sorted by class), and pieces, the rows of one
    class in one task, numbered by class, then task.

    Attributes
    ----------
    order : int64 array of shape (n,), row read at each position; (0,) when the rows
        are read in their own order
    row_pieces : int64 array of shape (n,), piece of the row at each position; (0,)
        when the rows are read in their own order
    piece_index : int64 array of shape (C, T), piece of each class in each task (-1:
        none), when the rows are read in their own order; (0, 0) otherwise
    classes : int64 array of shape (P,), class of each piece
    counts : int64 array of shape (P,), rows of each piece
    clean_counts : int64 array of shape (P,) or (0,), rows of each piece whose label
        equals their clean label (when clean labels are given)
    task_starts : int64 array of shape (T + 1,), where each task's pieces begin in
        ``task_pieces``
    task_pieces : int64 array of shape (P,), the pieces, task by task
    """

    order: np.ndarray
    row_pieces: np.ndarray
    piece_index: np.ndarray
    classes: np.ndarray
    counts: np.ndarray
    clean_counts: np.ndarray
    task_starts: np.ndarray
    task_pieces: np.ndarray


@njit(cache=True)
def counting_sort(keys, num_keys):
    """The stable order of integer keys in ``[0, num_keys)``.

    Returns
    -------
    order : int64 array of shape (n,), the positions of ``keys`` by key, in
        their own order within a key
    starts : int64 array of shape (num_keys + 1,), where each key's positions
        begin in ``order`` (and the end)
    """
    starts = np.zeros(num_keys + 1, np.int64)
    for position in range(keys.shape[0]):
        starts[keys[position] + 1] += 1
    for key in range(num_keys):
        starts[key + 1] += starts[key]
    order = np.empty(keys.shape[0], np.int64)
    filled = starts[:-1].copy()
    for position in range(keys.shape[0]):
        order[filled[keys[position]]] = position
        filled[keys[position]] += 1
    return order, starts


@njit(cache=True)
def class_pieces(labels, clean_labels, num_classes, rows_per_task):
    """Cut a chunk into tasks and pieces (``ChunkPieces``' fields, in order).

    With few classes (at least ``PIECE_MIN_ROWS`` rows per class and task on
    average) the rows are read in their own order, and a table gives the piece
    of each class in each task (C × T <= n / PIECE_MIN_ROWS): no array of a
    value per row is written, and the rows are counted in one pass (the arrays
    per row took 1.2 ms of the main thread per chunk of 131,072 rows, while the
    workers waited; now 0.13 ms). Otherwise ``order`` sorts the rows
    by class (a stable counting sort), so that a class's rows are consecutive
    and span as few tasks as possible, and ``row_pieces`` numbers each run of
    one class within one task.

    Parameters
    ----------
    labels : int64 array of shape (n,), every label in ``[0, C)``
    clean_labels : int64 array of shape (n,) or (0,)
    num_classes, rows_per_task : int
    """
    num_rows = labels.shape[0]
    num_tasks = -(-num_rows // rows_per_task)
    track_clean = clean_labels.shape[0] > 0
    if num_classes * PIECE_MIN_ROWS <= rows_per_task:
        # Rows (and clean rows) of each class in each task, in one pass over the rows.
        table_counts = np.zeros((num_classes, num_tasks), np.int64)
        table_clean_counts = np.zeros((num_classes, num_tasks) if track_clean else (0, 0),
                                      np.int64)
        for task in range(num_tasks):
            for k in range(task * rows_per_task, min((task + 1) * rows_per_task, num_rows)):
                table_counts[labels[k], task] += 1
                if track_clean and clean_labels[k] == labels[k]:
                    table_clean_counts[labels[k], task] += 1
        piece_index = np.full((num_classes, num_tasks), -1, np.int64)
        classes = np.empty(num_classes * num_tasks, np.int64)
        piece_tasks = np.empty(num_classes * num_tasks, np.int64)
        counts = np.empty(num_classes * num_tasks, np.int64)
        clean_counts = np.empty(num_classes * num_tasks if track_clean else 0, np.int64)
        num_pieces = 0
        for c in range(num_classes):
            for task in range(num_tasks):
                if table_counts[c, task] > 0:
                    piece_index[c, task] = num_pieces
                    classes[num_pieces] = c
                    piece_tasks[num_pieces] = task
                    counts[num_pieces] = table_counts[c, task]
                    if track_clean:
                        clean_counts[num_pieces] = table_clean_counts[c, task]
                    num_pieces += 1
        counts = counts[:num_pieces]
        clean_counts = clean_counts[:num_pieces if track_clean else 0]
        order = row_pieces = np.empty(0, np.int64)
    else:
        order, _ = counting_sort(labels, num_classes)
        row_pieces = np.empty(num_rows, np.int64)
        classes = np.empty(num_rows, np.int64)
        piece_tasks = np.empty(num_rows, np.int64)
        num_pieces = 0
        for k in range(num_rows):
            label = labels[order[k]]
            if k % rows_per_task == 0 or label != classes[num_pieces - 1]:
                classes[num_pieces] = label
                piece_tasks[num_pieces] = k // rows_per_task
                num_pieces += 1
            row_pieces[k] = num_pieces - 1
        counts = np.zeros(num_pieces, np.int64)
        clean_counts = np.zeros(num_pieces if track_clean else 0, np.int64)
        for k in range(num_rows):
            counts[row_pieces[k]] += 1
            if track_clean and clean_labels[order[k]] == labels[order[k]]:
                clean_counts[row_pieces[k]] += 1
        piece_index = np.empty((0, 0), np.int64)
    task_pieces, task_starts = counting_sort(piece_tasks[:num_pieces], num_tasks)
    return (order, row_pieces, piece_index, classes[:num_pieces], counts, clean_counts,
            task_starts, task_pieces)


@njit(nogil=True, cache=True)
def pieces_finite(piece_sums, pieces, task, num_features):
    """Whether the sums of every piece of ``task`` are finite (``sum_pieces``)."""
    for k in range(pieces.task_starts[task], pieces.task_starts[task + 1]):
        for j in range(num_features):
            if not finite(piece_sums[pieces.task_pieces[k], j]):
                return False
    return True


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def sum_sorted_groups(features, labels, clean_labels, pieces, first, last, out_sums,
                      out_clean_sums):
    """Add the rows at sorted positions ``[first, last)`` (``pieces.order``) into their
    pieces' sums, ``GROUP_ROWS`` rows of one piece a sweep (``sum_pieces``'s loop for
    float32 rows sorted by class; the other parameters are ``sum_pieces``')."""
    num_rows, num_features = features.shape
    track_clean = clean_labels.shape[0] > 0
    k = first
    while k < last:
        row = pieces.order[k]
        piece = pieces.row_pieces[k]
        # A task's pieces are runs of sorted positions: the group is one piece when its
        # last row is.
        if k + GROUP_ROWS <= last and pieces.row_pieces[k + GROUP_ROWS - 1] == piece:
            second, third, fourth = pieces.order[k + 1], pieces.order[k + 2], pieces.order[k + 3]
            for ahead in range(k + 2 * GROUP_ROWS, min(k + 3 * GROUP_ROWS, num_rows)):
                prefetch_row_head(features, pieces.order[ahead])
            for j in range(num_features):
                out_sums[piece, j] += ((np.float64(features[row, j])
                                        + np.float64(features[second, j]))
                                       + (np.float64(features[third, j])
                                          + np.float64(features[fourth, j])))
            step = GROUP_ROWS
        else:
            if k + HEAD_PREFETCH_AHEAD < num_rows:
                prefetch_row_head(features, pieces.order[k + HEAD_PREFETCH_AHEAD])
            for j in range(num_features):
                out_sums[piece, j] += np.float64(features[row, j])
            step = 1
        if track_clean:
            for position in range(k, k + step):
                row = pieces.order[position]
                if clean_labels[row] == labels[row]:
                    for j in range(num_features):
                        out_clean_sums[piece, j] += features[row, j]
        k += step


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def sum_pieces(features, labels, clean_labels, pieces, task, rows_per_task, check_each_row,
               out_sums, out_clean_sums, out_shift_rows):
    """Float64 sums, per piece, of one task's rows (``ChunkPieces``), on one thread; the
    task's pieces are written whole. Float32 rows sorted by class are added
    ``GROUP_ROWS`` of one piece at a time (``sum_sorted_groups``).

    NaN and Inf are found from sums. No float64 sum of float32 values
    (at most 3.4e38 each) overflows, so a piece's sum is finite exactly when
    its values are, and only a task whose sums are not is read again to name
    its first bad row. Finite float64 values can overflow a sum, so with
    ``check_each_row`` each row's total is checked instead, and a row whose
    total overflows counts as bad (at 1e6 × 512 float32, the totals took
    5-9% of the pass).

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,) or (0,)
        When non-empty, the rows whose label equals their clean label are also
        summed into ``out_clean_sums``.
    pieces : ChunkPieces
    task, rows_per_task : int
    check_each_row : bool
        Check each row's float64 total (float64 features), not the sums; and sum the
        rows less a row of their piece (its first).
    out_sums : float64 array of shape (P, >= D)
    out_clean_sums : same shape, or (0, >= D) without clean labels
    out_shift_rows : int64 array of shape (P,), or (0,) without ``check_each_row``
        The row each piece's rows are summed less of (scratch).

    Returns
    -------
    int
        First row (in the chunk) of the task with a NaN or Inf, or ``NO_ROW``.
    """
    num_rows, num_features = features.shape
    track_clean = clean_labels.shape[0] > 0
    in_row_order = pieces.order.shape[0] == 0
    for k in range(pieces.task_starts[task], pieces.task_starts[task + 1]):
        out_sums[pieces.task_pieces[k], :] = 0.0
        if track_clean:
            out_clean_sums[pieces.task_pieces[k], :] = 0.0
        if check_each_row:
            out_shift_rows[pieces.task_pieces[k]] = -1
    # Float64 rows are summed less the first row of their piece, which is added back once
    # per piece at the end. A running float64 sum of rows far from 0 rounds at each step by
    # the ulp of its growing total, and these errors add up in one direction: at 25,000 rows
    # a class 1e12 from the origin, spread 0.1, Tr Sigma_W came out 17 times its value.
    # Differences from a row of the class are about the spread and round by its ulp; a
    # piece of one row is summed exactly. (A float64 sum of float32 values is exact at any
    # offset they can hold, so float32 rows need no shift.) The second stream of values
    # costs: pass 1 of 400,000 × 512 float64 rows of 100 classes took 0.127-0.133 s against
    # 0.095-0.104 s (collapse 0.47-0.51 against 0.42-0.43 s), two threads, alternated.
    bad_value = NO_ROW
    first, last = task * rows_per_task, min((task + 1) * rows_per_task, num_rows)
    if in_row_order or check_each_row:
        for k in range(first, last):
            if in_row_order:
                i = k
                piece = pieces.piece_index[labels[k], task]
            else:
                i = pieces.order[k]
                piece = pieces.row_pieces[k]
                if k + HEAD_PREFETCH_AHEAD < num_rows:
                    prefetch_row_head(features, pieces.order[k + HEAD_PREFETCH_AHEAD])
            clean = track_clean and clean_labels[i] == labels[i]
            if check_each_row:
                if out_shift_rows[piece] < 0:
                    out_shift_rows[piece] = i
                shift_row = out_shift_rows[piece]
                row_total = 0.0
                for j in range(num_features):
                    value = np.float64(features[i, j])
                    out_sums[piece, j] += value - features[shift_row, j]
                    row_total += value
                if not finite(row_total):
                    bad_value = min(bad_value, i)
                if clean:
                    for j in range(num_features):
                        out_clean_sums[piece, j] += features[i, j] - features[shift_row, j]
            else:
                for j in range(num_features):
                    out_sums[piece, j] += np.float64(features[i, j])
                if clean:
                    for j in range(num_features):
                        out_clean_sums[piece, j] += features[i, j]
    else:
        sum_sorted_groups(features, labels, clean_labels, pieces, first, last, out_sums,
                          out_clean_sums)
    if check_each_row:
        for k in range(pieces.task_starts[task], pieces.task_starts[task + 1]):
            piece = pieces.task_pieces[k]
            shift_row = out_shift_rows[piece]
            for j in range(num_features):
                out_sums[piece, j] += pieces.counts[piece] * features[shift_row, j]
                if track_clean:
                    out_clean_sums[piece, j] += (pieces.clean_counts[piece]
                                                 * features[shift_row, j])
        return bad_value
    if pieces_finite(out_sums, pieces, task, num_features):
        return bad_value
    for k in range(first, last):
        i = k if in_row_order else pieces.order[k]
        if not row_finite(features, i):
            bad_value = min(bad_value, i)
    return bad_value


@njit(nogil=True, cache=True)
def add_compensated(totals, errors, values):
    """``totals += values``, the rounding error of each addition added to ``errors``.

    Each addition is Knuth's TwoSum: ``t = a + b`` and its exact error
    ``(a - (t - (t - a))) + (b - (t - a))``, so ``totals + errors`` stays the
    sum of everything added to about float64's precision squared, however
    many additions. Compiled without fast-math, which would reassociate the
    error away. A running float64 total of rows far from the origin rounds by
    the ulp of the total at each addition, and those errors do not cancel: fed
    in chunks of 8 rows, 20,000 rows 1e6 from the origin with a spread of 1e-7
    had class variances 0.60% off, against 5e-7 in one chunk.

    Parameters
    ----------
    totals, errors, values : float64 arrays of one 2-D shape; ``totals`` and ``errors``
        updated in place
    """
    for i in range(totals.shape[0]):
        for j in range(totals.shape[1]):
            total, value = totals[i, j], values[i, j]
            new_total = total + value
            value_part = new_total - total
            error = (total - (new_total - value_part)) + (value - value_part)
            if error != 0.0:  # the errors of exact sums (float32 rows) stay untouched zeros
                errors[i, j] += error
            totals[i, j] = new_total


@njit(nogil=True, cache=True)
def add_pieces(pieces, first_piece, last_piece, piece_sums, piece_clean_sums, counts, sums,
               sum_errors, clean_counts, clean_sums, clean_sum_errors):
    """Add pieces ``[first_piece, last_piece)`` into their classes' counts and sums
    (``add_compensated``), in piece order (the clean ones too when ``clean_counts`` is
    non-empty)."""
    num_features = sums.shape[1]
    track_clean = clean_counts.shape[0] > 0
    for piece in range(first_piece, last_piece):
        label = pieces.classes[piece]
        counts[label] += pieces.counts[piece]
        add_compensated(sums[label:label + 1], sum_errors[label:label + 1],
                        piece_sums[piece:piece + 1, :num_features])
        if track_clean:
            clean_counts[label] += pieces.clean_counts[piece]
            add_compensated(clean_sums[label:label + 1], clean_sum_errors[label:label + 1],
                            piece_clean_sums[piece:piece + 1, :num_features])


#: Names of pass 1's scratch (``thread_buffer``): the pieces' sums, and the clean rows'.
PASS1_SCRATCH = ("piece_sums", "piece_clean_sums")


def class_sums_chunk(features, labels, clean_labels, counts, sums, sum_errors, clean_counts,
                     clean_sums, clean_sum_errors, num_threads):
    """Add per-class counts and float64 sums of one chunk, on worker threads; all or nothing.

    The chunk is cut into tasks of ``pass1_task_rows(D, C)`` rows, and each task into
    pieces of one class (``class_pieces``; with many classes the rows are
    ordered by class first). The worker threads sum the pieces into scratch
    kept from chunk to chunk (at most twice the chunk's bytes); only when no
    row of the chunk is bad are the pieces added to the given arrays, each
    class's in task order, by tasks of whole classes. So a chunk that fails
    leaves the state as it was, and the result does not depend on the thread
    count at all.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,) or (0,)
        When non-empty, rows whose label equals their clean label are also
        added to ``clean_counts`` and ``clean_sums``.
    counts : int64 array of shape (C,), updated in place
    sums, sum_errors : float64 arrays of shape (C, D), updated in place
        (``add_compensated``)
    clean_counts, clean_sums, clean_sum_errors : same shapes, updated in place (empty
        when ``clean_labels`` is empty)
    num_threads : int

    Returns
    -------
    bad_label_row, bad_value_row : int
        First row (in the chunk) with a label outside ``[0, C)`` (either label
        array), and first row before it with a NaN or Inf; ``NO_ROW`` when
        there is none. Nothing is added when either is a row.
    """
    num_rows, num_features = features.shape
    bad_label = first_bad_label(labels, clean_labels, counts.shape[0])
    if bad_label != NO_ROW:
        return bad_label, first_non_finite_row(features[:bad_label])
    rows_per_task = pass1_task_rows(num_features, counts.shape[0])
    pieces = ChunkPieces(*class_pieces(labels, clean_labels, counts.shape[0], rows_per_task))
    num_pieces = pieces.classes.shape[0]
    columns = -(-num_features // PIECE_ALIGN) * PIECE_ALIGN
    piece_sums = thread_buffer(PASS1_SCRATCH[0], (num_pieces, columns), np.float64)
    piece_clean_sums = thread_buffer(PASS1_SCRATCH[1], (pieces.clean_counts.shape[0], columns),
                                     np.float64)
    check_each_row = features.dtype != np.float32
    shift_rows = np.empty(num_pieces if check_each_row else 0, np.int64)
    bad_value = min(run_tasks(lambda task: sum_pieces(features, labels, clean_labels, pieces,
                                                      task, rows_per_task, check_each_row,
                                                      piece_sums, piece_clean_sums,
                                                      shift_rows),
                              pieces.task_starts.shape[0] - 1, num_threads), default=NO_ROW)
    if bad_value == NO_ROW:
        # Tasks of about as many classes, each adding all the pieces of its classes: one
        # per TASK_BYTES of pieces (handing a task to another thread costs about 0.1 ms).
        class_firsts = np.flatnonzero(np.diff(pieces.classes, prepend=-1))
        num_tasks = min(-(-piece_sums.nbytes // TASK_BYTES), 4 * max(num_threads, 1))
        step = max(1, -(-class_firsts.size // max(num_tasks, 1)))
        add_starts = np.append(class_firsts[::step], num_pieces)
        run_tasks(lambda task: add_pieces(pieces, add_starts[task], add_starts[task + 1],
                                          piece_sums, piece_clean_sums, counts, sums,
                                          sum_errors, clean_counts, clean_sums,
                                          clean_sum_errors),
                  add_starts.size - 1, num_threads)
    return NO_ROW, bad_value


_workers = None
_workers_lock = threading.Lock()
_worker_marks = threading.local()
_local_scratch = threading.local()
#: Every living thread's ``_ThreadScratch`` (a thread's goes when the thread ends), and
#: how many ``scratch_scope`` contexts are open.
_every_scratch = weakref.WeakSet()
_scratch_lock = threading.Lock()
_scratch_scopes = 0


def _forget_workers():
    """In a forked child the parent's worker threads do not exist: start afresh (the
    one-thread BLAS contexts and scratch scopes they were in too, their scratch, and the
    forking thread is no worker)."""
    global _workers, _workers_lock, _worker_marks
    global _one_thread_lock, _one_thread_users, _one_thread_limit
    global _local_scratch, _every_scratch, _scratch_lock, _scratch_scopes
    _workers, _workers_lock, _worker_marks = None, threading.Lock(), threading.local()
    _one_thread_lock, _one_thread_users, _one_thread_limit = threading.Lock(), 0, None
    _local_scratch, _every_scratch = threading.local(), weakref.WeakSet()
    _scratch_lock, _scratch_scopes = threading.Lock(), 0


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
                                          thread_name_prefix="ncfast",
                                          initializer=_mark_worker_thread)
        return _workers


def _mark_worker_thread():
    _worker_marks.is_worker = True


def _on_worker_thread():
    """Whether the calling thread is one of the module's worker threads."""
    return getattr(_worker_marks, "is_worker", False)


class _ThreadScratch:
    """One thread's scratch arrays, by name (``thread_buffer``)."""

    def __init__(self):
        self.buffers = {}


def thread_buffer(name, shape, dtype):
    """A scratch array of the calling thread's, kept from call to call within a run.

    Fresh memory is slow to write the first time (in this virtual machine
    about 20 ms more for each 64 MiB), so chunk-sized scratch is kept while a
    run goes on, and dropped when it ends (``scratch_scope``): pass 1's pieces
    and the far rows' centred copy reach twice a chunk's bytes, which a
    process that goes on training should not hold.

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
    scratch = getattr(_local_scratch, "scratch", None)
    if scratch is None:
        scratch = _local_scratch.scratch = _ThreadScratch()
        with _scratch_lock:
            _every_scratch.add(scratch)
    buffer = scratch.buffers.get(name)
    if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != tuple(shape[1:]) \
            or buffer.dtype != dtype:
        buffer = np.empty(shape, dtype)
        scratch.buffers[name] = buffer
    return buffer[:shape[0]]


@contextlib.contextmanager
def scratch_scope():
    """Context of one run (both passes of an analysis): inside, the threads keep their
    scratch from chunk to chunk; when the last scope open in the process closes, every
    thread's scratch is dropped (``release_scratch``).

    Scopes may nest and overlap across threads: the scratch is dropped only when
    none is open. Dropping never frees a buffer a kernel still holds: it lives
    until the kernel lets go, and the thread's next call starts a fresh one.
    """
    global _scratch_scopes
    with _scratch_lock:
        _scratch_scopes += 1
    try:
        yield
    finally:
        with _scratch_lock:
            # Never below 0: a forked child starts at 0 inside its parent's scope.
            _scratch_scopes = max(_scratch_scopes - 1, 0)
        release_scratch()


def release_scratch():
    """Drop every thread's kept scratch, unless a ``scratch_scope`` is open (public as
    ``ncfast.release_scratch``).

    Outside a scope the streaming states (``ClassSums.update``,
    ``ResidualStats.update``) keep their threads' scratch between calls, so
    that a chunk does not pay for fresh memory; ``DistributedCollapse`` calls
    this when its report is made.
    """
    with _scratch_lock:
        if _scratch_scopes == 0:
            for scratch in _every_scratch:
                scratch.buffers.clear()


def release_pass1_scratch():
    """Drop pass 1's scratch (``PASS1_SCRATCH``, up to twice a chunk's bytes) from every
    thread, scope or not: called when pass 1 ends, so that it is gone before the class
    means' tables are formed. Another run's pass 1 going on meanwhile only allocates its
    pieces again at its next chunk."""
    with _scratch_lock:
        for scratch in _every_scratch:
            for name in PASS1_SCRATCH:
                scratch.buffers.pop(name, None)


def scratch_bytes():
    """Bytes of scratch every thread keeps now (``thread_buffer``)."""
    with _scratch_lock:
        return sum(buffer.nbytes for scratch in _every_scratch
                   for buffer in list(scratch.buffers.values()))


def run_tasks(function, num_tasks, num_threads):
    """``function(task)`` for every task in ``range(num_tasks)``, on worker threads.

    Each of up to ``num_threads`` worker threads takes the tasks of its own
    contiguous span of ``range(num_tasks)`` in order, then helps with the
    span that has the most tasks left, from its end, so a core slowed by other
    work does not hold the rest back. Tasks are rows in order, so each thread
    streams its own region of memory: two threads summing 1e6 × 512 float32
    rows by class in alternate tasks of 4 MiB took 0.16 s, each its own half 0.13 s.
    Returns the results in task order. When a task raises, the workers take
    no further task, and the first error is raised once every worker has
    stopped. Kernels called by ``function`` must be ``nogil``; BLAS runs
    single-threaded. Called from a task (on a worker thread), the tasks run
    one after another on that thread: waiting for the pool there would wait
    for the very threads that wait.
    """
    results = [None] * num_tasks
    workers = min(max(num_threads, 1), num_tasks)
    bounds = [num_tasks * worker // max(workers, 1) for worker in range(workers + 1)]
    fronts, backs = bounds[:-1], bounds[1:]
    failed = False
    lock = threading.Lock()

    def next_task(worker):
        with lock:
            if failed:
                return None
            if fronts[worker] < backs[worker]:
                fronts[worker] += 1
                return fronts[worker] - 1
            span = max(range(workers), key=lambda other: backs[other] - fronts[other])
            if fronts[span] < backs[span]:
                backs[span] -= 1
                return backs[span]
            return None

    def run(worker):
        nonlocal failed
        try:
            while (task := next_task(worker)) is not None:
                results[task] = function(task)
        except BaseException:
            with lock:
                failed = True  # the other workers take no further task
            raise

    with one_blas_thread():
        if workers <= 1 or _on_worker_thread():
            for task in range(num_tasks):
                results[task] = function(task)
        else:
            pool = _worker_pool()
            futures = [pool.submit(run, worker) for worker in range(workers)]
            # Every worker has stopped before the first error (if any) is raised: none
            # writes into the caller's buffers after it regains control.
            concurrent.futures.wait(futures)
            for future in futures:
                future.result()
    return results


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def block_residuals(features, labels, label_rows, means, out_residuals, out_sq_norms):
    """Residuals ``r_i = h_i - mu_{y_i}`` from float64 means, with ``||r_i||^2``, on one
    thread without the GIL.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    label_rows : int64 array of shape (C,)
        Row of ``means`` for each class, -1 for a class without a mean.
    means : float64 array of shape (C', D)
    out_residuals : float32 array of shape (n, D), written (not for a row
        whose label is out of range or has no mean: the callers stop at a bad row)
    out_sq_norms : float64 array of shape (n,), written: ``||r_i||^2`` in
        float64, NaN for a row with a non-finite value or farther than
        ``MAX_RESIDUAL_NORM`` from its mean, -1 for a row whose
        label is out of range or has no mean.

    Returns
    -------
    int
        The first bad row, or ``NO_ROW``.
    """
    # One loop, without a per-row helper: through an inlined helper the same arithmetic
    # took 0.149-0.165 s per million rows of 512 values on two threads, here 0.127-0.136 s.
    num_features = features.shape[1]
    first_bad = NO_ROW
    for i in range(features.shape[0]):
        label = labels[i]
        row = -1
        if label >= 0 and label < label_rows.shape[0]:
            row = label_rows[label]
        if row < 0:
            out_sq_norms[i] = -1.0
            first_bad = min(first_bad, i)
            continue
        sq_norm = 0.0
        for j in range(num_features):
            residual = features[i, j] - means[row, j]
            out_residuals[i, j] = residual
            sq_norm += residual * residual
        if sq_norm <= MAX_RESIDUAL_SQ_NORM:
            out_sq_norms[i] = sq_norm
        else:  # NaN, Inf, or beyond float32's products
            out_sq_norms[i] = np.nan
            first_bad = min(first_bad, i)
    return first_bad


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tally_rows(sq_norms, labels, ncc_predictions, classifier_predictions, corrupted, counts,
               sq_norm_sums, norm_sums, ncc_hits, classifier_hits, totals):
    """Add rows' spreads and predictions to the per-class tallies, in row order, on one thread.

    A few nanoseconds a row. The rows of a block are tallied in one call: the
    epilogue with a per-row helper taking these arrays (inlined by Numba) took
    0.037 s per million rows in cache, with this loop 0.0066 s.

    Parameters
    ----------
    sq_norms : float64 array of shape (n,), ``||r_i||^2``
    labels : int64 array of shape (n,)
    ncc_predictions : int64 array of shape (n,), nearest class centre
    classifier_predictions : int64 array of shape (n,) or (0,) without a classifier
    corrupted : uint8 array of shape (n,) or (0,), rows whose training label is
        known to be wrong
    counts, ncc_hits, classifier_hits : int64 arrays of shape (C,), updated
    sq_norm_sums, norm_sums : float64 arrays of shape (C,), updated
    totals : int64 array of shape (3,), updated: NCC/classifier disagreements,
        corrupted rows, corrupted rows predicted as their (noisy) label (by the
        classifier if there is one, else by NCC)
    """
    has_classifier = classifier_predictions.shape[0] > 0
    has_corrupted = corrupted.shape[0] > 0
    for i in range(labels.shape[0]):
        label = labels[i]
        counts[label] += 1
        sq_norm_sums[label] += sq_norms[i]
        norm_sums[label] += np.sqrt(sq_norms[i])
        prediction = ncc_predictions[i]
        if prediction == label:
            ncc_hits[label] += 1
        if has_classifier:
            if classifier_predictions[i] != prediction:
                totals[0] += 1
            prediction = classifier_predictions[i]
            if prediction == label:
                classifier_hits[label] += 1
        if has_corrupted and corrupted[i] != 0:
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


#: Relative float64 rounding of a score's last operations (its float32 product converted
#: and added to a float64 offset), added to a near-tie threshold in ``near_tie_threshold``.
SCORE_ROUNDING = 8.0 * 2.0 ** -53


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def near_tie_threshold(band, sq_norm, best_score):
    """How far above a row's best float32-route score another score may lie and still
    be the exact best (``ncfast.plan.near_tie_bands``).

    Parameters
    ----------
    band : float64 array of shape (3,), ``(q2, q1, q0)``
    sq_norm : float
        ``||r||^2`` of the row.
    best_score : float
        The smallest score (a squared-distance score, or a negated logit).
    """
    norm = np.sqrt(sq_norm)
    return (band[0] * norm + band[1]) * norm + band[2] + SCORE_ROUNDING * abs(best_score)


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def copy_row(features, i, out_row):
    """Row ``i`` of ``features`` into the float64 scratch ``out_row`` (exact), so that
    the float64 scores below run the same code whatever the chunk's dtype and layout."""
    for j in range(out_row.shape[0]):
        out_row[j] = features[i, j]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def exact_sq_distance(row, means, k):
    """``||h - mu_k||^2`` in float64 from the row itself (``row`` from ``copy_row``)."""
    sq_distance = 0.0
    for j in range(row.shape[0]):
        difference = row[j] - means[k, j]
        sq_distance += difference * difference
    return sq_distance


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def exact_logit(row, weights, bias, c):
    """``w_c . h + b_c`` in float64 from the row itself (``row`` from ``copy_row``)."""
    logit = 0.0
    for j in range(row.shape[0]):
        logit += weights[c, j] * row[j]
    return logit + bias[c]


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def has_rival(scores, best, limit):
    """Whether a score other than ``scores[best]`` is at most ``limit`` (one branch-free
    sweep: most rows have none)."""
    rivals = 0
    for k in range(scores.shape[0]):
        rivals += scores[k] <= limit
    return rivals > 1


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def settle_nearest(features, i, means, scores, best, threshold):
    """The first nearest mean of row ``i``, decided in float64 where float32 cannot.

    ``scores`` are the float32 route's scores of every mean (smaller is
    nearer, each within half of ``threshold`` of an exact score shifted by a
    constant of the row, ``ncfast.plan.near_tie_bands``). A mean whose score
    is more than ``threshold`` above the best cannot be the nearest; when
    ``best`` is the only one within it, it is the answer; otherwise the
    contenders' squared distances are computed in float64 from the row and
    the first smallest wins. The result depends on the row alone, not on the
    rounding of the block the row was multiplied in.

    Parameters
    ----------
    features : array of shape (n, D)
    i : int
    means : float64 array of shape (C', D)
    scores : float64 array of shape (C',)
    best : int, first argmin of ``scores``
    threshold : float, ``near_tie_threshold``

    Returns
    -------
    int
    """
    limit = scores[best] + threshold
    if not has_rival(scores, best, limit):
        return best
    row = np.empty(features.shape[1])
    copy_row(features, i, row)
    choice, smallest = best, np.inf
    for k in range(scores.shape[0]):
        if scores[k] <= limit:
            sq_distance = exact_sq_distance(row, means, k)
            if sq_distance < smallest:
                choice, smallest = k, sq_distance
    return choice


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def settle_largest(features, i, weights, bias, negated_logits, best, threshold):
    """The classifier's first argmax for row ``i``, decided in float64 where float32 cannot.

    As ``settle_nearest``, on the negated float32-route logits, with the
    contenders' logits ``w_c . h + b_c`` computed in float64 from the row.

    Parameters
    ----------
    features : array of shape (n, D)
    i : int
    weights : float64 array of shape (C, D)
    bias : float64 array of shape (C,)
    negated_logits : float64 array of shape (C,)
    best : int, first argmin of ``negated_logits``
    threshold : float, ``near_tie_threshold``

    Returns
    -------
    int
    """
    limit = negated_logits[best] + threshold
    if not has_rival(negated_logits, best, limit):
        return best
    row = np.empty(features.shape[1])
    copy_row(features, i, row)
    choice, largest = best, -np.inf
    for c in range(negated_logits.shape[0]):
        if negated_logits[c] <= limit:
            logit = exact_logit(row, weights, bias, c)
            if logit > largest:
                choice, largest = c, logit
    return choice


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
def epilogue(features, products, sq_norms, labels, corrupted, far_mean_products, far_logits,
             route, sums):
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
    their first argmax is the first argmin of their negation. Where another
    mean or class comes within the float32 route's rounding of the best, the
    decision is taken in float64 from the row (``settle_nearest``,
    ``settle_largest``), so that it does not depend on the block. Runs on
    one thread, without the GIL.

    Parameters
    ----------
    features : array of shape (n, D), the rows themselves
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
    num_rows = products.shape[0]
    num_means = route.present_classes.shape[0]
    num_logits = route.logit_offsets.shape[1]
    scores = np.empty(num_means)
    negated_logits = np.empty(num_logits)
    ncc_predictions = np.empty(num_rows, np.int64)
    classifier_predictions = np.empty(num_rows if num_logits > 0 else 0, np.int64)
    far = uncertain = 0
    for i in range(num_rows):
        row = route.label_rows[labels[i]]
        for j in range(num_means):
            coordinate = np.float64(products[i, j])
            sums.eigen_scatter[j] += coordinate * coordinate

        best_k = row
        if beyond_radius(sq_norms[i], route.ncc_sq_radii[row]):
            for k in range(num_means):
                scores[k] = route.mean_sq_distances[row, k] - 2.0 * np.float64(far_mean_products[far, k])
            best_k = first_argmin(scores)
            threshold = near_tie_threshold(route.ncc_band, sq_norms[i], scores[best_k])
            if has_rival(scores, best_k, scores[best_k] + threshold):
                best_k = settle_nearest(features, i, route.means, scores, best_k, threshold)
            far += 1

        ncc_predictions[i] = route.present_classes[best_k]

        if num_logits > 0:
            best_c = route.mean_predictions[row]
            if beyond_radius(sq_norms[i], route.classifier_sq_radii[row]):
                for c in range(num_logits):
                    negated_logits[c] = -(np.float64(far_logits[uncertain, c])
                                          + route.logit_offsets[row, c])
                best_c = first_argmin(negated_logits)
                threshold = near_tie_threshold(route.classifier_band, sq_norms[i],
                                               negated_logits[best_c])
                if has_rival(negated_logits, best_c, negated_logits[best_c] + threshold):
                    best_c = settle_largest(features, i, route.weights, route.bias,
                                            negated_logits, best_c, threshold)
                uncertain += 1
            classifier_predictions[i] = best_c

    tally_rows(sq_norms, labels, ncc_predictions, classifier_predictions, corrupted,
               sums.counts, sums.sq_norm_sums, sums.norm_sums, sums.ncc_hits,
               sums.classifier_hits, sums.totals)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def residual_blocks(features, labels, corrupted, route, buffers, out_sq_norms, sums):
    """Pass 2 of some rows on the "classes" route, on one thread, in cache-sized blocks.

    Per block of ``b = buffers.residuals.shape[0]`` rows: ``block_residuals``;
    one float32 GEMM ``R M~^T V`` (BLAS, ``blas.sgemm``); for the rows
    beyond their NCC radius, if any, ``z = V a`` by a second GEMM; for the
    rows beyond their classifier radius, if any, ``W r`` by a third
    (``gather_rows_beyond``); ``epilogue``. Each GEMM has one shape for every
    block (the last block and the gathered rows are padded with zero rows):
    BLAS rounds different shapes differently (and a row by its place in the
    block, which only the chunking moves).

    Parameters
    ----------
    features, labels, corrupted : the rows (see ``epilogue``)
    route : ClassesRoute
        The pass-2 plan's arrays.
    buffers : Pass2Buffers
        Scratch of ``b`` rows.
    out_sq_norms : float64 array of shape (n,), written as by ``block_residuals``
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
        sgemm(residual_buffer, route.projection_t, buffers.products)
        far = count_rows_beyond(sq_norms, block_labels, route.label_rows, route.ncc_sq_radii)
        if far == size:  # the gathered rows would be the block itself
            sgemm(buffers.products, route.eigenvectors_t, buffers.far_mean_products)
        elif far > 0:
            gather_rows_beyond(buffers.products[:size], sq_norms, block_labels,
                               route.label_rows, route.ncc_sq_radii, buffers.far_coordinates)
            sgemm(buffers.far_coordinates, route.eigenvectors_t, buffers.far_mean_products)
        if has_classifier:
            uncertain = count_rows_beyond(sq_norms, block_labels, route.label_rows,
                                          route.classifier_sq_radii)
            if uncertain == size:  # the gathered rows would be the block itself
                sgemm(residual_buffer, route.weights_t, buffers.far_logits)
            elif uncertain > 0:
                gather_rows_beyond(residual_buffer[:size], sq_norms, block_labels,
                                   route.label_rows, route.classifier_sq_radii,
                                   buffers.far_residuals)
                sgemm(buffers.far_residuals, route.weights_t, buffers.far_logits)
        epilogue(features[first:last], buffers.products[:size], sq_norms, block_labels,
                 corrupted[first:last] if has_corrupted else corrupted,
                 buffers.far_mean_products, buffers.far_logits, route, sums)
    return True


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def coordinate_blocks(features, labels, label_rows, means, basis, block, products,
                      out_sq_norms, out_sums):
    """Pass 2's NC1 state of some rows on the "features" route, on one thread.

    Per block of ``b = block.shape[0]`` rows: ``block_residuals`` into
    ``block`` (the last block padded with zero rows, so that every GEMM has
    one shape, as in ``residual_blocks``), one float32 GEMM by ``basis`` (BLAS,
    ``blas.sgemm``), and the squares of the products summed in float64:
    ``sum_i (r_i . u_j)^2`` for every column ``u_j`` of ``basis``, the
    residuals' squared coordinates in the eigenbasis of ``Sigma_B``.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    label_rows, means : as for ``block_residuals``
    basis : float32 array of shape (D, K), C-contiguous
    block : float32 array of shape (b, D), scratch
    products : float32 array of shape (b, K), scratch
    out_sq_norms : float64 array of shape (n,), written as by ``block_residuals``
        up to the first bad block
    out_sums : float64 array of shape (K,), updated in place

    Returns
    -------
    int
        The first bad row (``out_sums`` then incomplete), or ``NO_ROW``.
    """
    num_rows = features.shape[0]
    block_size = block.shape[0]
    for first in range(0, num_rows, block_size):
        size = min(block_size, num_rows - first)
        block[size:] = 0.0
        bad = block_residuals(features[first:first + size], labels[first:first + size],
                              label_rows, means, block[:size], out_sq_norms[first:first + size])
        if bad != NO_ROW:
            return first + bad
        sgemm(block, basis, products)
        for i in range(size):
            for j in range(products.shape[1]):
                coordinate = np.float64(products[i, j])
                out_sums[j] += coordinate * coordinate
    return NO_ROW


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
    weights : float64 array of shape (C_w, D), ``W``
    bias : float64 array of shape (C_w,)
    ncc_band, classifier_band : float64 arrays of shape (3,)
        Coefficients of ``near_tie_threshold`` (``ncfast.plan.near_tie_bands``).
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
    weights: np.ndarray
    bias: np.ndarray
    ncc_band: np.ndarray
    classifier_band: np.ndarray


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


class CoordinateSums(NamedTuple):
    """The sum pass 2 adds into on the "features" route (``ResidualStats.eigen_scatter``).

    Attributes
    ----------
    eigen_scatter : float64 array of shape (D,), ``sum_i (U^T r_i)^2``
    """

    eigen_scatter: np.ndarray


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


#: Bytes of float32 features per pass-2 task, and at most blocks per task: worker
#: threads take tasks as ``run_tasks`` hands them out, and each task sums into its own
#: small partial state. A chunk of 256 MiB (``ncfast.inputs.CHUNK_TARGET_BYTES``) then
#: holds at least 32 tasks (one block of up to ``BLOCK_BYTES`` each where blocks are that
#: large), so that the threads finish it together (at D = 2048 and 64 MiB chunks, tasks
#: of 16 MiB left one core idle for 0.03 s of each 0.28 s chunk on average, and the
#: short last chunk ran on one core; at D = 768 and 256 MiB chunks they still took 2–8%
#: longer than tasks of 4 MiB).
TASK_BYTES = 4 << 20
MAX_TASK_BLOCKS = 8

#: Bytes of float32 features per task where a row costs little more than its read: pass 1
#: with the rows in their own order (few classes) and pass 2's narrow kernel
#: (``ncfast.kernels.narrow``). Handing out a task costs about 40 µs of Python with the
#: caches cold, which tasks of ``TASK_BYTES`` (0.5-1 ms of such work) pay 64 times a
#: chunk of 256 MiB. At 1e6 × 512 × 10 with a classifier (median of 12 alternations, in
#: one process), 16 MiB against 4 MiB: pass 1 0.143 against 0.155 s collapsed and 0.157
#: against 0.172 s far from collapse; pass 2 0.238 against 0.251 s and 0.324 against
#: 0.367 s. 8 MiB was between; 32 MiB no faster.
CHEAP_TASK_BYTES = 16 << 20


def task_rows(num_features):
    """Rows per pass-2 task: whole blocks of ``block_rows(D)`` rows, at least one, at most
    ``MAX_TASK_BLOCKS``, and no more than ``TASK_BYTES`` of float32 features beyond one
    block. Independent of the thread count."""
    rows = block_rows(num_features)
    return rows * int(np.clip(TASK_BYTES // (4 * max(num_features, 1) * rows), 1,
                              MAX_TASK_BLOCKS))


def cheap_task_rows(num_features):
    """Rows per task where a row costs little more than its read (``CHEAP_TASK_BYTES``):
    whole multiples of ``task_rows(D)``, at least one. Independent of the thread count."""
    rows = task_rows(num_features)
    return rows * max(1, CHEAP_TASK_BYTES // (4 * max(num_features, 1) * rows))


def residual_chunk(features, labels, corrupted, route, sums, out_sq_norms, num_threads):
    """Pass 2 of one chunk on the "classes" route (C' <= D), on worker threads.

    The chunk is cut into tasks of ``task_rows(D)`` rows (whole blocks of
    ``block_rows(D)`` rows), independent of the thread count; ``num_threads`` worker threads
    take tasks as ``run_tasks`` hands them out and run
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
        ``block_residuals`` up to each task's first bad block.
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
    shapes = {"residuals": num_features, "products": num_means, "far_coordinates": num_means,
              "far_mean_products": num_means, "far_residuals": num_features,
              "far_logits": route.weights_t.shape[1]}

    def run_rows(first, last, partial):
        buffers = Pass2Buffers(*(thread_buffer(name, (rows, shapes[name]), np.float32)
                                 for name in Pass2Buffers._fields))
        return residual_blocks(features[first:last], labels[first:last],
                               corrupted[first:last] if corrupted.shape[0] else corrupted,
                               route, buffers, out_sq_norms[first:last], partial)

    return run_pass2_tasks(run_rows, num_rows, task_rows(num_features), sums, num_threads)


def run_pass2_tasks(run_rows, num_rows, rows_per_task, sums, num_threads):
    """Pass 2 of a chunk in tasks of ``rows_per_task`` rows on worker threads; all or nothing.

    Each task sums into its own zeroed copy of ``sums``; the partial sums are
    added to ``sums`` in task order, and only when every task succeeded, so
    the result does not depend on the thread count.

    Parameters
    ----------
    run_rows : callable
        ``run_rows(first, last, partial)`` adds rows ``[first, last)`` into
        ``partial`` and returns False for a bad row.
    num_rows, rows_per_task : int
    sums : Pass2Sums or CoordinateSums
        Updated in place.
    num_threads : int

    Returns
    -------
    bool
        False when some task found a bad row (nothing added).
    """
    num_tasks = -(-num_rows // rows_per_task)
    # The tasks' partial sums, zeroed at once: a zeroed copy made by each task cost it
    # about 30 µs of Python (on two threads) beside a kernel of 0.8 ms.
    partials = [np.zeros((num_tasks,) + total.shape, total.dtype) for total in sums]

    def run_task(task):
        first, last = task * rows_per_task, min((task + 1) * rows_per_task, num_rows)
        return run_rows(first, last, type(sums)(*(partial[task] for partial in partials)))

    if not all(run_tasks(run_task, num_tasks, num_threads)):
        return False
    for total, partial in zip(sums, partials):
        for part in partial:
            total += part
    return True
