"""Pass 2 of the "classes" route for few classes: one read of each row, no BLAS.

With few means (C') and classifier rows (C_w), pass 2 multiplies each
residual by only ``C' + C_w`` columns, and BLAS, whose kernels are built for
wide products, runs products this narrow slower than this compiled loop
(docs/algorithm.md, pass 2). Here each worker thread takes a task of rows
and streams it in blocks of ``BLOCK_ROWS`` rows:
their residuals (``ncfast.kernels.cpu.block_residuals``) stay in the core's
L1 cache, a compiled product multiplies them by the columns a few rows
(``ROW_GROUP``, as the core's vector registers allow) and four columns at a
time while the next tile's rows are prefetched (``ncfast.kernels.prefetch``),
and the block goes on through the classes route's own far-row gathers and
epilogue. Every row is multiplied by the same code
whatever block it falls in, so results do not depend on the chunking; tasks
have a fixed number of rows and are added in task order, so they do not
depend on the thread count.
"""
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.core import codegen, config

from ncfast.kernels.cpu import (
    FASTMATH, NO_ROW, block_residuals, cheap_task_rows, count_rows_beyond, epilogue,
    gather_rows_beyond, run_pass2_tasks, thread_buffer)
from ncfast.kernels.prefetch import lines_per_share, prefetch_lines

#: Rows whose float32 residuals are multiplied together (``block_products``): they stay
#: in L1 (2 KiB a row at D = 512) while the columns are swept. A multiple of ``ROW_GROUP``.
TILE_ROWS = 8

#: Rows per call of the epilogue (a multiple of ``TILE_ROWS``): the far-row gathers and
#: the epilogue's scratch arrays are set up once per block, not per tile.
BLOCK_ROWS = 64

def compiles_for_avx512():
    """Whether Numba compiles the kernels for AVX-512 (32 vector registers, not 16).

    What Numba targets: ``NUMBA_CPU_FEATURES`` when set, else the host's features.
    """
    features = config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    return "+avx512f" in features.split(",")


#: Rows multiplied in one sweep along D, by ``COLUMN_GROUP`` columns: ``ROW_GROUP ×
#: COLUMN_GROUP`` dot products whose running sums stay in vector registers. The row count
#: follows the two cores measured. On an Intel Xeon (Emerald Rapids, AVX-512), four rows
#: (``products_four_rows``) took 0.048 against 0.062 s with two for 62,500 tiles of 8 rows
#: of 512 by 10 columns on one thread with the rows in cache, and 0.096 against 0.120 s by
#: 20 columns (compiled for Haswell's 16 vector registers instead of 32, 0.049 against
#: 0.063-0.067 s and 0.084 against 0.109-0.113 s). On an AMD EPYC (Zen 3, AVX2 only),
#: 100,000 such tiles, best of five in each of two runs, two rows (``products_two_rows``)
#: took 0.153-0.166 against 0.183-0.185 s by 10 columns, 0.266-0.315 against 0.382-0.402 s
#: by 20 and 0.478-0.504 against 0.637-0.686 s by 32 (2026-12-02); sweeps of two rows by
#: five columns were faster at exactly 10 columns only, by six slower everywhere. So four
#: rows where Numba compiles for AVX-512, else two. Prefetching the next tile from memory
#: meanwhile (Xeon), 0.117 against 0.141-0.150 s by 20 columns, but only when the
#: prefetches go out in two shares a sweep (before it and after it): in one, their bursts
#: made pass 2 of 500,000 rows on one thread 7-9% slower collapsed; pass 2 of 1e6 × 512 ×
#: 10 on two threads (three alternations, medians) 0.270-0.276 against 0.283-0.316 s far
#: from collapse, 0.226-0.238 against 0.222-0.227 s collapsed, 1e6 × 256 × 10 far
#: 0.160-0.171 against 0.173-0.184 s. The last sweep may take ``COLUMN_PAIR`` columns (the
#: columns are padded to a multiple of it): ten means are then two sweeps of four and one
#: of two, not three of four (0.084-0.088 s against 0.100-0.102 s with two rows a sweep,
#: Xeon).
ROW_GROUP = 4 if compiles_for_avx512() else 2
COLUMN_GROUP = 4
COLUMN_PAIR = 2


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def products_four_rows(rows, columns, out, upcoming):
    """``out = rows @ columns.T`` in float32, four rows and ``COLUMN_GROUP`` columns at a
    time: ``block_products`` for cores with 32 vector registers.

    Each sweep's 16 dot products share their loads of the four rows and
    four columns and vectorize along D, so the product is bound by the
    core's multiply-adds, not its loads; a last sweep of ``COLUMN_PAIR``
    columns takes what is left. Every row is computed by the same
    instructions, in any place of its group. Meanwhile the rows the caller
    reads next are prefetched, a share before and after each sweep.
    The two sweeps are written out: as inlined helpers taking one row or
    column each (1-D views), the same products took 1.4-1.6× the time.

    Parameters
    ----------
    rows : float32 array of shape (b, D), b a multiple of 4
    columns : float32 array of shape (k, D), k a multiple of ``COLUMN_PAIR``
    out : float32 array of shape (b, k), written
    upcoming : 2-D array
        Rows to prefetch (the features of the next tile; may be empty).
    """
    num_rows, length = rows.shape
    num_columns = columns.shape[0]
    whole_groups = num_columns - num_columns % COLUMN_GROUP
    # Two shares of prefetches per sweep, one before and one after it.
    per_step = lines_per_share(upcoming, -(-num_columns // COLUMN_GROUP)
                               * (num_rows // 4) * 2)
    line_row = line_column = 0
    for k in range(0, whole_groups, COLUMN_GROUP):
        for i in range(0, num_rows, 4):
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
            first0 = first1 = first2 = first3 = np.float32(0.0)
            second0 = second1 = second2 = second3 = np.float32(0.0)
            third0 = third1 = third2 = third3 = np.float32(0.0)
            fourth0 = fourth1 = fourth2 = fourth3 = np.float32(0.0)
            for j in range(length):
                first, second = rows[i, j], rows[i + 1, j]
                third, fourth = rows[i + 2, j], rows[i + 3, j]
                column0, column1 = columns[k, j], columns[k + 1, j]
                column2, column3 = columns[k + 2, j], columns[k + 3, j]
                first0 += first * column0
                first1 += first * column1
                first2 += first * column2
                first3 += first * column3
                second0 += second * column0
                second1 += second * column1
                second2 += second * column2
                second3 += second * column3
                third0 += third * column0
                third1 += third * column1
                third2 += third * column2
                third3 += third * column3
                fourth0 += fourth * column0
                fourth1 += fourth * column1
                fourth2 += fourth * column2
                fourth3 += fourth * column3
            out[i, k], out[i, k + 1], out[i, k + 2], out[i, k + 3] = (
                first0, first1, first2, first3)
            out[i + 1, k], out[i + 1, k + 1], out[i + 1, k + 2], out[i + 1, k + 3] = (
                second0, second1, second2, second3)
            out[i + 2, k], out[i + 2, k + 1], out[i + 2, k + 2], out[i + 2, k + 3] = (
                third0, third1, third2, third3)
            out[i + 3, k], out[i + 3, k + 1], out[i + 3, k + 2], out[i + 3, k + 3] = (
                fourth0, fourth1, fourth2, fourth3)
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
    k = whole_groups
    if k < num_columns:
        for i in range(0, num_rows, 4):
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
            first0 = first1 = second0 = second1 = np.float32(0.0)
            third0 = third1 = fourth0 = fourth1 = np.float32(0.0)
            for j in range(length):
                first, second = rows[i, j], rows[i + 1, j]
                third, fourth = rows[i + 2, j], rows[i + 3, j]
                column0, column1 = columns[k, j], columns[k + 1, j]
                first0 += first * column0
                first1 += first * column1
                second0 += second * column0
                second1 += second * column1
                third0 += third * column0
                third1 += third * column1
                fourth0 += fourth * column0
                fourth1 += fourth * column1
            out[i, k], out[i, k + 1], out[i + 1, k], out[i + 1, k + 1] = (
                first0, first1, second0, second1)
            out[i + 2, k], out[i + 2, k + 1], out[i + 3, k], out[i + 3, k + 1] = (
                third0, third1, fourth0, fourth1)
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def products_two_rows(rows, columns, out, upcoming):
    """``out = rows @ columns.T`` in float32, two rows and ``COLUMN_GROUP`` columns at a
    time: ``block_products`` for cores with 16 vector registers.

    As ``products_four_rows`` (same parameters), with sweeps of 8 dot
    products, whose sums, rows and columns fit 16 registers; ``rows`` has an
    even number of rows.
    """
    num_rows, length = rows.shape
    num_columns = columns.shape[0]
    whole_groups = num_columns - num_columns % COLUMN_GROUP
    per_step = lines_per_share(upcoming, -(-num_columns // COLUMN_GROUP) * (num_rows // 2) * 2)
    line_row = line_column = 0
    for k in range(0, whole_groups, COLUMN_GROUP):
        for i in range(0, num_rows, 2):
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
            first0 = first1 = first2 = first3 = np.float32(0.0)
            second0 = second1 = second2 = second3 = np.float32(0.0)
            for j in range(length):
                first, second = rows[i, j], rows[i + 1, j]
                column0, column1 = columns[k, j], columns[k + 1, j]
                column2, column3 = columns[k + 2, j], columns[k + 3, j]
                first0 += first * column0
                first1 += first * column1
                first2 += first * column2
                first3 += first * column3
                second0 += second * column0
                second1 += second * column1
                second2 += second * column2
                second3 += second * column3
            out[i, k], out[i, k + 1], out[i, k + 2], out[i, k + 3] = (
                first0, first1, first2, first3)
            out[i + 1, k], out[i + 1, k + 1], out[i + 1, k + 2], out[i + 1, k + 3] = (
                second0, second1, second2, second3)
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
    k = whole_groups
    if k < num_columns:
        for i in range(0, num_rows, 2):
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)
            first0 = first1 = second0 = second1 = np.float32(0.0)
            for j in range(length):
                first, second = rows[i, j], rows[i + 1, j]
                column0, column1 = columns[k, j], columns[k + 1, j]
                first0 += first * column0
                first1 += first * column1
                second0 += second * column0
                second1 += second * column1
            out[i, k], out[i, k + 1], out[i + 1, k], out[i + 1, k + 1] = (
                first0, first1, second0, second1)
            line_row, line_column = prefetch_lines(upcoming, line_row, line_column, per_step)


#: The product of ``narrow_blocks``: ``ROW_GROUP`` rows a sweep.
block_products = products_four_rows if ROW_GROUP == 4 else products_two_rows


def padded_columns(route):
    """``[(M~^T V)^T; W]``: the columns every row is multiplied by, one per row.

    Returns
    -------
    float32 array of shape (k, D)
        The C' columns of ``M~^T V`` (the coordinates ``a``), then the C_w
        classifier rows, then a zero row when needed for a multiple of ``COLUMN_PAIR``.
    """
    columns = np.concatenate([route.projection_t.T, route.weights_t.T])
    padded = np.zeros((-(-columns.shape[0] // COLUMN_PAIR) * COLUMN_PAIR, columns.shape[1]),
                      np.float32)
    padded[:columns.shape[0]] = columns
    return padded


@njit(nogil=True, cache=True)
def mean_columns(columns, num_means):
    """The rows of ``padded_columns`` a row inside its classifier radius is multiplied by:
    the coordinates' columns, in whole ``COLUMN_PAIR``s."""
    return columns[:-(-num_means // COLUMN_PAIR) * COLUMN_PAIR]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def mean_products(coordinates, eigenvectors_t, out):
    """``z = V a`` of each row, in float32: the products of the residual with every centred
    mean (see ``ncfast.kernels.cpu.epilogue``).

    Parameters
    ----------
    coordinates : float32 array of shape (m, C'), ``a`` of each row
    eigenvectors_t : float32 array of shape (C', C'), ``V^T``
    out : float32 array of shape (>= m, C'), rows ``[0, m)`` written
    """
    num_rows, num_means = coordinates.shape[0], eigenvectors_t.shape[0]
    # Rows in pairs: each row's sum is a chain through ``out``, and two chains overlap.
    for i in range(0, num_rows - 1, 2):
        out[i, :] = 0.0
        out[i + 1, :] = 0.0
        for j in range(num_means):
            first, second = coordinates[i, j], coordinates[i + 1, j]
            for k in range(num_means):
                out[i, k] += first * eigenvectors_t[j, k]
                out[i + 1, k] += second * eigenvectors_t[j, k]
    if num_rows % 2:
        last = num_rows - 1
        out[last, :] = 0.0
        for j in range(num_means):
            for k in range(num_means):
                out[last, k] += coordinates[last, j] * eigenvectors_t[j, k]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def rows_beyond(values, sq_norms, labels, label_rows, sq_radii, out_rows):
    """The rows of ``values`` beyond their class's radius, in order, and how many.

    ``values`` itself when every row is beyond, else those rows copied into
    ``out_rows`` (``ncfast.kernels.cpu.gather_rows_beyond``, which see for the
    parameters).

    Returns
    -------
    rows : float32 array of shape (m, k), a view
    count : int
    """
    count = count_rows_beyond(sq_norms, labels, label_rows, sq_radii)
    if count == values.shape[0]:
        return values, count
    if count > 0:
        gather_rows_beyond(values, sq_norms, labels, label_rows, sq_radii, out_rows)
    return out_rows[:, :values.shape[1]], count


class NarrowBuffers(NamedTuple):
    """Scratch of one thread (float32): a tile of ``TILE_ROWS`` rows, a block of ``BLOCK_ROWS``.

    Attributes
    ----------
    residuals : array of shape (TILE_ROWS, D)
    products : array of shape (BLOCK_ROWS, k), the block times ``padded_columns``
    far_coordinates, far_mean_products : arrays of shape (BLOCK_ROWS, C')
    far_logits : array of shape (BLOCK_ROWS, C_w)
    """

    residuals: np.ndarray
    products: np.ndarray
    far_coordinates: np.ndarray
    far_mean_products: np.ndarray
    far_logits: np.ndarray


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def narrow_blocks(features, labels, corrupted, route, columns, buffers, out_sq_norms, sums):
    """Pass 2 of some rows on the "classes" route, on one thread, without BLAS.

    Per tile of ``TILE_ROWS`` rows: ``block_residuals``, then the products
    with ``columns`` (``block_products``): the coordinates
    ``a = (M~^T V)^T r``, and ``W r`` too when some row of the tile lies
    beyond its classifier radius (the last tile is padded with zero rows).
    Per block of ``BLOCK_ROWS`` rows: ``z = V a`` of the rows beyond their
    NCC radius, if any, and ``epilogue`` with those and the logits of the
    rows beyond their classifier radius (``rows_beyond``).

    Parameters
    ----------
    features, labels, corrupted : the rows (see ``ncfast.kernels.cpu.epilogue``)
    route : ClassesRoute
    columns : float32 array of shape (k, D), ``padded_columns(route)``
    buffers : NarrowBuffers
    out_sq_norms : float64 array of shape (n,), written as by
        ``ncfast.kernels.cpu.block_residuals`` up to the first bad tile
    sums : Pass2Sums
        Updated in place (see ``epilogue``).

    Returns
    -------
    bool
        False when a tile holds a bad row (flagged in ``out_sq_norms``); the
        sums are then incomplete.
    """
    num_rows = features.shape[0]
    num_means = route.present_classes.shape[0]
    num_logits = route.weights_t.shape[1]
    tile = buffers.residuals.shape[0]
    block = buffers.products.shape[0]
    residuals = buffers.residuals
    has_corrupted = corrupted.shape[0] > 0
    coordinates = buffers.products[:, :num_means]
    logits = buffers.products[:, num_means:num_means + num_logits]
    coordinate_columns = mean_columns(columns, num_means)
    for first in range(0, num_rows, block):
        size = min(block, num_rows - first)
        sq_norms = out_sq_norms[first:first + size]
        block_labels = labels[first:first + size]
        for start in range(0, size, tile):
            stop = min(start + tile, size)
            # Rows past the end multiply as zeros (their products are never read).
            residuals[stop - start:] = 0.0
            if block_residuals(features[first + start:first + stop], block_labels[start:stop],
                               route.label_rows, route.means, residuals[:stop - start],
                               sq_norms[start:stop]) != NO_ROW:
                return False
            tile_columns = coordinate_columns
            if num_logits > 0 and count_rows_beyond(
                    sq_norms[start:stop], block_labels[start:stop], route.label_rows,
                    route.classifier_sq_radii) > 0:
                tile_columns = columns
            # The next tile's rows load while this one's products are computed.
            block_products(residuals, tile_columns, buffers.products[start:start + tile],
                           features[first + stop:first + stop + tile])
        far_coordinates, far = rows_beyond(coordinates[:size], sq_norms, block_labels,
                                           route.label_rows, route.ncc_sq_radii,
                                           buffers.far_coordinates)
        mean_products(far_coordinates[:far], route.eigenvectors_t, buffers.far_mean_products)
        far_logits = logits
        if num_logits > 0:
            far_logits, _ = rows_beyond(logits[:size], sq_norms, block_labels, route.label_rows,
                                        route.classifier_sq_radii, buffers.far_logits)
        epilogue(features[first:first + size], coordinates[:size], sq_norms, block_labels,
                 corrupted[first:first + size] if has_corrupted else corrupted,
                 buffers.far_mean_products, far_logits, route, sums)
    return True


def narrow_chunk(features, labels, corrupted, route, sums, out_sq_norms, num_threads):
    """Pass 2 of one chunk on the "classes" route for few columns, on worker threads.

    As ``ncfast.kernels.cpu.residual_chunk`` (same parameters and returns), with
    ``narrow_blocks`` in place of BLAS blocks, in tasks of ``cheap_task_rows(D)`` rows.
    """
    num_rows, num_features = features.shape
    num_means = route.present_classes.shape[0]
    columns = padded_columns(route)
    shapes = {"residuals": (TILE_ROWS, num_features),
              "products": (BLOCK_ROWS, columns.shape[0]),
              "far_coordinates": (BLOCK_ROWS, num_means),
              "far_mean_products": (BLOCK_ROWS, num_means),
              "far_logits": (BLOCK_ROWS, route.weights_t.shape[1])}

    def run_rows(first, last, partial):
        buffers = NarrowBuffers(*(thread_buffer("narrow_" + name, shapes[name], np.float32)
                                  for name in NarrowBuffers._fields))
        return narrow_blocks(features[first:last], labels[first:last],
                             corrupted[first:last] if corrupted.shape[0] else corrupted,
                             route, columns, buffers, out_sq_norms[first:last], partial)

    return run_pass2_tasks(run_rows, num_rows, cheap_task_rows(num_features), sums,
                           num_threads)
