"""``ncfast.dask.collapse``: the two passes over a ``dask.array``, reduced as sums.

Each block of rows runs ncfast's own kernels where it lives (a worker of a
``distributed.Client``, or a thread of Dask's local scheduler); only the pass
states travel and are added together in a tree. Between the passes the
client finalizes pass 1 once, and the empty pass-2 state built on those class
means (the ``Geometry``) enters the graph as one task that every block of
pass 2 reads: each worker receives it once.

Requires the ``dask`` extra (``pip install ncfast[dask]``); ``import ncfast``
never imports Dask.
"""
import copy
import functools
import operator
import threading
import uuid

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback

from ncfast import errors
from ncfast.accumulators import ClassSums
from ncfast.engine import (NOISE_WITH_MEANS, ResidualPass, check_ood_layout, check_options,
                           finalize_pass1, geometry_from_means_option, ood_mean_of,
                           resolve_num_classes)
from ncfast.geometry import PINV_RTOL
from ncfast.inputs import (ArraySource, LabelSummary, check_features, check_labels,
                           is_torch_tensor, numpy_view)
from ncfast.kernels.cpu import scratch_scope
from ncfast.plan import check_classifier
from ncfast.progress import stage_progress

#: Blocks whose states one reduction task adds together.
SPLIT_EVERY = 8

# The kernels are parallel over all of numba's threads already; blocks that a
# worker runs on several threads take turns rather than oversubscribe the cores
# (and numba's workqueue layer must not be entered from two threads at once).
_KERNEL_LOCK = threading.Lock()


def collapse(features, labels, *, num_classes=None, weights=None, bias=None, means=None,
             clean_labels=None, global_mean="classes", chunk_size=None, empty_classes="warn",
             pinv_rtol=PINV_RTOL, ood=None, split_every=SPLIT_EVERY, scheduler=None,
             progress=False):
    """Measure neural collapse of a Dask array in two passes of block tasks.

    Runs on the active ``distributed.Client`` if there is one (Dask's default
    scheduler otherwise, or ``scheduler``). Each block is cut into kernel
    chunks of ``chunk_size`` rows from its first row. When every block starts
    on a multiple of ``chunk_size``, the kernels see the same chunks as
    ``ncfast.collapse(..., chunk_size=chunk_size)`` and the reports differ
    only by the order of the float64 sums; other block sizes change which rows
    share a float32 GEMM call and where in it, whose rounding BLAS may vary
    with the call's shape and a row's place (NC1 then agrees to float32
    rounding averaged over the rows, about 1e-9 relative on test data).

    Parameters
    ----------
    features : dask array of shape (n_samples, n_features)
        Any float dtype, e.g. ``da.from_zarr(...)``, an HDF5 dataset through
        ``da.from_array``, or ``da.concatenate`` of memory-mapped ``.npy``
        files. Blocks may have any number of rows; the feature axis is
        rechunked to one block if it is split. A numpy array or torch CPU
        tensor is wrapped by ``da.asarray``.
    labels : int array of shape (n_samples,), dask, numpy or torch (CPU)
        Class of each row; rechunked to the row blocks of ``features``.
    num_classes : int, optional
        Number of classes C; defaults to the largest label + 1 (one extra
        pass over the labels).
    weights : array of shape (C, n_features), optional
        Last-layer classifier ``W``; enables NC3, NC4 and accuracy.
    bias : array of shape (C,), optional
    means : array of shape (C, n_features) or CollapseReport, optional
        Measure against these class means instead of the features' own
        (held-out features); pass 1 is skipped.
    clean_labels : int array of shape (n_samples,), dask, numpy or torch (CPU), optional
        True labels when ``labels`` are noisy: enables the label-noise metrics.
    global_mean : {"classes", "samples"}
    chunk_size : int, optional
        Rows per kernel call inside a block (bounds a worker's scratch memory).
    empty_classes : {"warn", "ignore", "raise"}
    pinv_rtol : float
        As in ``ncfast.collapse``.
    ood : array of shape (n_ood, n_features) or (n_features,), optional
        Out-of-distribution features or their mean, as in ``ncfast.collapse``
        (enables ``nc5``); a Dask array of rows is averaged by its own block tasks.
    split_every : int
        Fan-in of the tree that adds the block states.
    scheduler : str or callable, optional
        Passed to ``dask.compute`` (e.g. ``"threads"``, ``"sync"``).
    progress : bool or ncfast.StageProgress
        As in ``ncfast.collapse``: the rows of each pass and the class-pair tiles.
        Dask's local schedulers count a block's rows when its task ends; a
        ``distributed.Client`` runs the tasks elsewhere, and a pass's rows are
        counted when it returns (its dashboard shows the tasks).

    Returns
    -------
    CollapseReport
    """
    check_options(empty_classes=empty_classes, pinv_rtol=pinv_rtol, global_mean=global_mean)
    shown = stage_progress(progress)
    if isinstance(split_every, bool) or not isinstance(split_every, int) or split_every < 2:
        raise ValueError(f"split_every must be an int of at least 2; found {split_every!r}")
    if clean_labels is not None and means is not None:
        raise ValueError(NOISE_WITH_MEANS)
    features, labels, clean_labels = _aligned_blocks(features, labels, clean_labels)
    compute = functools.partial(dask.compute, scheduler=scheduler)
    num_classes = resolve_num_classes(
        num_classes, _DaskLabels(labels, clean_labels, compute), means,
        num_features=features.shape[1], label_noise=clean_labels is not None)
    check_classifier(weights, bias, num_classes, features.shape[1], copy=False)  # before pass 1
    ood_mean = None if ood is None else _ood_mean(ood, features.shape[1], compute)
    blocks = _row_blocks(features, labels, clean_labels)
    block_rows = features.chunks[0]

    with shown:
        clean_geometry = None
        if means is None:
            partial_sums = [dask.delayed(pass1_block, pure=True)(
                *block, num_classes=num_classes, chunk_size=chunk_size) for block in blocks]
            with shown.stage("pass 1: class sums", features.shape[0]) as rows_done, \
                    _RowsDone(partial_sums, block_rows, rows_done):
                (class_sums,) = compute(_tree_sum(partial_sums, _add_class_sums, split_every))
            geometry, clean_geometry = finalize_pass1(class_sums, global_mean=global_mean,
                                                      empty_classes=empty_classes)
        else:
            geometry = geometry_from_means_option(means, num_classes, features.shape[1],
                                                  global_mean)

        residual_pass = ResidualPass(geometry, clean_geometry, weights=weights, bias=bias,
                                     progress=shown)
        empty_pass = dask.delayed(residual_pass, name=f"ncfast-empty-pass2-{uuid.uuid4().hex}")
        partial_arrays = [dask.delayed(pass2_block, pure=True)(
            empty_pass, *block, chunk_size=chunk_size) for block in blocks]
        with shown.stage("pass 2: residuals", features.shape[0]) as rows_done, \
                _RowsDone(partial_arrays, block_rows, rows_done):
            (totals,) = compute(_tree_sum(partial_arrays, _add_arrays, split_every))
    for state_array, total in zip(residual_pass.sum_arrays(), totals):
        state_array += total
    return residual_pass.report(pinv_rtol=pinv_rtol, ood_mean=ood_mean)


class _RowsDone(Callback):
    """Counts a pass's rows into its progress stage as the block tasks end.

    Dask's local schedulers call ``_posttask`` as each task ends; a
    ``distributed.Client`` runs the tasks on its workers and calls nothing here,
    so the rows not yet counted are counted when the pass's compute returns.

    Parameters
    ----------
    block_tasks : list of dask.delayed.Delayed
        One task per row block.
    block_rows : tuple of int
        Rows of each block.
    rows_done : callable
        The stage's ``advance(rows)``.
    """

    def __init__(self, block_tasks, block_rows, rows_done):
        super().__init__()
        self.rows_to_come = {task.key: rows for task, rows in zip(block_tasks, block_rows)}
        self.rows_done = rows_done

    def _posttask(self, key, result, dsk, state, worker_id):
        rows = self.rows_to_come.pop(key, 0)
        if rows:
            self.rows_done(rows)

    def __exit__(self, *exc_info):
        super().__exit__(*exc_info)
        rows = sum(self.rows_to_come.values())
        if exc_info[0] is None and rows:
            self.rows_done(rows)


def _ood_mean(ood, num_features, compute):
    """``ncfast.engine.ood_mean_of`` of ``collapse``'s ``ood=``; the rows of a Dask array
    are summed in float64 and counted by its block tasks (``compute``), after their layout
    is checked (a filtered array's number of rows is unknown until they are counted)."""
    if isinstance(ood, da.Array):
        check_ood_layout(ood.shape, ood.dtype, num_features)
        if ood.ndim == 2:
            sums, num_rows = compute(ood.sum(axis=0, dtype=np.float64),
                                     da.ones_like(ood[:, 0], dtype=np.int64).sum())
            check_ood_layout((num_rows, num_features), ood.dtype, num_features)
            return ood_mean_of(sums / num_rows, num_features)
        (ood,) = compute(ood)
    return ood_mean_of(ood, num_features)


class _DaskLabels:
    """The labels of a Dask analysis, summarized by one ``dask.compute``."""

    def __init__(self, labels, clean_labels, compute):
        self.arrays = [array for array in (labels, clean_labels) if array is not None]
        self.compute = compute

    def label_summary(self):
        """``ncfast.inputs.LabelSummary``, as ``ArraySource``'s."""
        tops, rows, distinct = [], [], []
        for array in map(_without_empty_blocks, self.arrays):
            tops.append(array.max())
            rows.append(array.argmax())
            distinct.append(da.unique(array[array >= 0]))
        tops, rows, distinct = self.compute(tops, rows, distinct)
        best = int(np.argmax(tops))  # the labels come first: a tie names a label
        return LabelSummary(int(tops[best]), int(rows[best]),
                            errors.LABEL if best == 0 else errors.CLEAN_LABEL,
                            int(np.unique(np.concatenate(distinct)).size))


def _without_empty_blocks(array):
    """A 1-D dask array without its blocks of no rows (Dask's max and argmax refuse them)."""
    return array.rechunk((tuple(size for size in array.chunks[0] if size),))


def _dask_array(array, what):
    """``array`` as a Dask array whose block sizes Dask knows (a ValueError otherwise); a
    torch tensor is first viewed as numpy (``ncfast.inputs.numpy_view``), which Dask
    cannot do itself."""
    if is_torch_tensor(array):
        array = numpy_view(array, what)
    array = da.asarray(array)
    if any(np.isnan(size) for size in array.shape):
        raise ValueError(
            f"{what} has unknown block sizes (shape {array.shape}); call "
            f"{what}.compute_chunk_sizes() first")
    return array


def _aligned_blocks(features, labels, clean_labels):
    """Features with whole rows per block; labels rechunked to the same row blocks."""
    features = _dask_array(features, "features")
    num_rows, _ = check_features(features)
    if features.numblocks[1] > 1:
        features = features.rechunk({1: -1})
    aligned = []
    for array, what in ((labels, "labels"), (clean_labels, "clean_labels")):
        if array is not None:
            array = check_labels(_dask_array(array, what), num_rows, what)
            array = array.rechunk((features.chunks[0],))
        aligned.append(array)
    return features, *aligned


def _row_blocks(features, labels, clean_labels):
    """Per row block, ``(features, labels, clean_labels, row_offset)``: delayed blocks."""
    offsets = np.concatenate([[0], np.cumsum(features.chunks[0][:-1])]).astype(int)
    feature_blocks = features.to_delayed().ravel()
    label_blocks = labels.to_delayed().ravel()
    clean_blocks = [None] * len(offsets) if clean_labels is None else \
        clean_labels.to_delayed().ravel()
    return list(zip(feature_blocks, label_blocks, clean_blocks, offsets.tolist()))


def _block_chunks(features, labels, clean_labels, row_offset, chunk_size):
    """The validated chunks of one block, offsets counted from the first row of the input."""
    if features.shape[0] == 0:
        return
    yield from ArraySource(features, labels, clean_labels, chunk_size=chunk_size,
                           row_offset=row_offset)


def pass1_block(features, labels, clean_labels, row_offset, *, num_classes, chunk_size):
    """Pass 1 of one block: its ``ClassSums``.

    Parameters
    ----------
    features : array of shape (n, D)
    labels : int array of shape (n,)
    clean_labels : int array of shape (n,), or None
    row_offset : int
        Index of the block's first row in the whole input (error messages).
    num_classes : int
    chunk_size : int or None
    """
    class_sums = ClassSums(num_classes, features.shape[1], track_clean=clean_labels is not None)
    with _KERNEL_LOCK, scratch_scope():  # a worker process keeps no scratch between blocks
        for chunk in _block_chunks(features, labels, clean_labels, row_offset, chunk_size):
            class_sums.update(chunk.features, chunk.labels, chunk.clean_labels,
                              row_offset=chunk.offset)
    return class_sums


def pass2_block(empty_pass, features, labels, clean_labels, row_offset, *, chunk_size):
    """Pass 2 of one block: the arrays of its ``ResidualPass`` state.

    Parameters
    ----------
    empty_pass : ResidualPass
        The empty state on the finalized class means; shared, so copied here.
    features, labels, clean_labels, row_offset, chunk_size
        As in ``pass1_block``.

    Returns
    -------
    list of arrays
        ``ResidualPass.sum_arrays()`` of the block: only these travel.
    """
    residual_pass = copy.deepcopy(empty_pass)
    with _KERNEL_LOCK, scratch_scope():  # a worker process keeps no scratch between blocks
        for chunk in _block_chunks(features, labels, clean_labels, row_offset, chunk_size):
            residual_pass.update(chunk.features, chunk.labels, chunk.clean_labels,
                                   row_offset=chunk.offset)
    return residual_pass.sum_arrays()


def _add_class_sums(*states):
    return functools.reduce(operator.add, states)


def _add_arrays(*array_lists):
    return [functools.reduce(np.add, arrays) for arrays in zip(*array_lists)]


def _tree_sum(parts, add, split_every):
    """A delayed sum of ``parts`` by ``add`` over groups of ``split_every``, level by level."""
    while len(parts) > 1:
        parts = [dask.delayed(add, pure=True)(*parts[start:start + split_every])
                 for start in range(0, len(parts), split_every)]
    return parts[0]
