"""The CUDA backend: the two streaming passes and the pair sweep on a GPU, through CuPy.

``ncfast.collapse(..., device="cuda")`` (or GPU features) runs the engine
(``ncfast.engine.run``) on ``cuda_backend()``. Features
already on a GPU (CuPy arrays; torch CUDA tensors through DLPack, no copy)
are read in place. Host arrays, memmaps, ``.npy`` paths and chunk sources are
streamed through pinned buffers on two streams: while the kernels of one chunk
run on the compute stream, the next chunks are staged into the other buffers
and copied on a copy stream, so inputs larger than GPU memory work. Host
arrays already in page-locked memory (``torch.Tensor.pin_memory()``, CuPy's
pinned allocations) are copied from where they are, skipping the staging copy.

The accumulators stay on the device in float64; the host waits once per pass
(``# synchronize!``) to add them into the public ``ClassSums`` and
``ResidualStats`` the engine holds. The pass-2 state reads the public
``Pass2Plan`` (``ncfast.plan``) and keeps NC1's eigen-diagonal as the host
state does (one per stream); on the "features" route it keeps the float64 D×D
scatter of ``r`` instead, turned into the eigen-diagonal by one GEMM on the
device after the streams' scatters are added. The pair sweep runs on the device
(``ncfast.sweep.reduce_tile_xp`` with CuPy): only scalars and length-C
vectors come back.

Importing this module never imports CuPy (the kernels, ``ncfast.kernels.cuda``,
load on first use): ``ncfast.backends.select_backend`` imports it only when a
GPU is asked for.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ncfast import errors
from ncfast.backends import is_cupy_array, is_torch_cuda_tensor
from ncfast.backends.cpu import HostSource
from ncfast.inputs import (KERNEL_DTYPES, Chunk, LabelSummary, as_source, check_chunk_size,
                           check_features, check_labels, is_torch_tensor, to_kernel_features,
                           to_kernel_labels)
from ncfast.kernels.cpu import NO_ROW, add_compensated
from ncfast.plan import eigen_diagonal
from ncfast.sweep import reduce_tile_xp

_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked host memory

#: Bytes of float32 host rows per streamed chunk (each pinned buffer).
STREAM_CHUNK_BYTES = 64 << 20

#: Bytes of work buffers (residuals, GEMM output, float64 products) per pass-2
#: chunk of GPU-resident rows: large enough that launches never starve the GPU.
RESIDUAL_CHUNK_BYTES = 256 << 20

#: Streams (and pass-2 sums) that pass-2 chunks of GPU-resident rows
#: alternate between.
LANES = 2

#: Pinned buffers (each with its device twin) that streamed chunks cycle through:
#: while the kernels of one chunk run, the next ones are staged and copied.
STAGING_SLOTS = 3

#: Threads that stage a host chunk into pinned memory side by side.
STAGING_THREADS = min(8, os.cpu_count() or 1)

#: Pass 1 sums float64 rows less the first float64 row of the pass (``DeviceClassSums``),
#: but not its values at or beyond this magnitude (nor NaN or Inf): no shifted sum of
#: rows that can be measured then nears float64's range, and a NaN row still shows in
#: the sums.
SHIFT_LIMIT = 1e200


def _cupy():
    """The CuPy module, or a RuntimeError saying why the GPU backend cannot run."""
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(
            f"device='cuda' needs CuPy and a CUDA GPU, but CuPy cannot be imported ({error}): "
            "install it (pip install 'ncfast[gpu]') or pass device='cpu'") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        count, reason = 0, str(error)
    else:
        reason = "the CUDA runtime sees no device"
    if count == 0:
        raise RuntimeError(
            f"device='cuda' needs a CUDA GPU, but none is usable ({reason}); pass device='cpu'")
    return cupy


def _rows_for(num_bytes, row_bytes):
    return max(1, num_bytes // max(row_bytes, 1))


def _device_features(block):
    """A C-contiguous float32/float64 CuPy array of GPU rows (CuPy or torch), no copy when
    the dtype and layout allow (``_needs_conversion``)."""
    cupy = sys.modules["cupy"]
    torch_rows = is_torch_cuda_tensor(block)
    if torch_rows:
        block = block.detach()
    if not _needs_conversion(block):
        return cupy.from_dlpack(block) if torch_rows else block
    if torch_rows:
        torch = sys.modules["torch"]
        converted = block if block.dtype in (torch.float32, torch.float64) else block.float()
        converted = converted.contiguous()
        _keep_until_read(torch, converted)
        return cupy.from_dlpack(converted)
    if block.dtype not in (np.float32, np.float64):
        block = block.astype(np.float32 if block.dtype.itemsize <= 4 else np.float64)
    return cupy.ascontiguousarray(block)


def _needs_conversion(features):
    """Whether ``_device_features`` copies these GPU rows (CuPy or torch): a dtype other
    than float32 and float64, or a layout that is not C-contiguous."""
    if is_torch_cuda_tensor(features):
        torch = sys.modules["torch"]
        return features.dtype not in (torch.float32, torch.float64) or \
            not features.is_contiguous()
    return features.dtype not in (np.float32, np.float64) or not features.flags.c_contiguous


def _keep_until_read(torch, tensor):
    """Tell torch that CuPy's current stream reads ``tensor``, a copy torch made for one
    chunk (a conversion, or a contiguous copy).

    When the chunk is dropped the copy goes back to torch's caching allocator, which may
    hand its memory to the next chunk's conversion on torch's stream while the kernels on
    this chunk's stream still read it; with the use recorded, torch waits for them.
    """
    stream = sys.modules["cupy"].cuda.get_current_stream().ptr
    if stream != torch.cuda.current_stream(tensor.device).cuda_stream:
        tensor.record_stream(torch.cuda.ExternalStream(stream, device=tensor.device))


def _device_labels(labels):
    """Labels (host or GPU, any integer dtype) as a CuPy int64 array."""
    cupy = sys.modules["cupy"]
    if is_torch_cuda_tensor(labels):
        labels = cupy.from_dlpack(labels.detach().contiguous())
    if not is_cupy_array(labels):
        labels = to_kernel_labels(labels)
    return cupy.ascontiguousarray(cupy.asarray(labels, dtype=cupy.int64))


class ResidentSource:
    """Features already on a GPU, read in place in chunks of rows.

    Pass-1 chunks are all rows at once, unless the rows must be copied
    (``_needs_conversion``: then ``RESIDUAL_CHUNK_BYTES / (4 D)`` rows, so that no
    copy of the whole input is made); pass-2 chunks hold ``RESIDUAL_CHUNK_BYTES``
    of work buffers (``work_row_bytes`` per row, set by the pass-2 states) and
    alternate between ``LANES`` streams, so that the bandwidth-bound kernels of
    one overlap the GEMM of the other. Host labels are copied to the features'
    device.

    Parameters
    ----------
    features : CuPy array or torch CUDA tensor of shape (n_samples, n_features)
    labels, clean_labels : int arrays of shape (n_samples,), host or GPU
    chunk_size : int, optional
        Rows per chunk of both passes.
    """

    carries_clean_labels = False
    rereads = False

    def __init__(self, features, labels, clean_labels=None, *, chunk_size=None):
        cupy = sys.modules["cupy"]
        self.features = features
        self.num_rows, self.num_features = check_features(features)
        if labels is None:
            raise TypeError("labels is required with features on a GPU")
        device = features.device
        self.device = cupy.cuda.Device(
            device.index if is_torch_cuda_tensor(features) else device.id)
        with self.device:  # host labels would go to CuPy's current device, maybe another
            self.labels = _device_labels(check_labels(labels, self.num_rows))
            self.clean_labels = None
            if clean_labels is not None:
                self.clean_labels = _device_labels(
                    check_labels(clean_labels, self.num_rows, "clean_labels"))
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size, 1)
        self.copies_rows = _needs_conversion(features)
        self.work_row_bytes = 4 * self.num_features

    def context(self):
        """The features' device, and the caller's current stream (the features' producer's)."""
        return self.device

    def label_summary(self):
        """``ncfast.inputs.LabelSummary``, as ``ArraySource``'s."""
        cupy = sys.modules["cupy"]
        labels = self.labels if self.clean_labels is None else \
            cupy.concatenate([self.labels, self.clean_labels])
        max_label = int(labels.max())  # synchronize!
        first = int(labels.argmax())
        return LabelSummary(max_label, first % self.num_rows,
                            errors.LABEL if first < self.num_rows else errors.CLEAN_LABEL,
                            int(cupy.unique(labels[labels >= 0]).size))

    def chunks(self, pass_number):
        """Device chunks of pass ``pass_number``; pass 2's alternate between streams."""
        cupy = sys.modules["cupy"]
        rows = self.chunk_size
        if rows is None:
            rows = self.num_rows if pass_number == 1 and not self.copies_rows else \
                _rows_for(RESIDUAL_CHUNK_BYTES, self.work_row_bytes)
        main = cupy.cuda.get_current_stream()
        streams = [main]
        if pass_number == 2:
            streams += [cupy.cuda.Stream(non_blocking=True) for _ in range(LANES - 1)]
        ready = main.record()
        for side in streams[1:]:
            side.wait_event(ready)
        for index, start in enumerate(range(0, self.num_rows, rows)):
            stop = min(start + rows, self.num_rows)
            clean = None if self.clean_labels is None else self.clean_labels[start:stop]
            # The consumer's kernels for this chunk are queued on this lane's stream.
            with streams[index % len(streams)]:
                yield Chunk(_device_features(self.features[start:stop]),
                            self.labels[start:stop], clean, start)
        for side in streams[1:]:
            main.wait_event(side.record())

    def host_row(self, row):
        """Features (1, D), labels (1,) and clean labels (1,) or None of one row, on the host."""
        clean = None if self.clean_labels is None else self.clean_labels[row:row + 1].get()
        features = self.features[row:row + 1]
        features = features.detach().cpu() if is_torch_cuda_tensor(features) else features.get()
        return to_kernel_features(features), self.labels[row:row + 1].get(), clean


def _page_locked(features):
    """Whether host features (numpy array or torch CPU tensor) are float32/float64 rows in
    page-locked memory, which the GPU copies from where they are (other dtypes are
    converted per chunk into ordinary memory). Asked once per input: the query is slow
    on ordinary memory."""
    if is_torch_tensor(features):
        torch = sys.modules["torch"]
        return features.dtype in (torch.float32, torch.float64) and features.is_pinned()
    if not isinstance(features, np.ndarray) or features.dtype not in KERNEL_DTYPES or \
            features.size == 0:
        return False
    runtime = sys.modules["cupy"].cuda.runtime
    try:
        attributes = runtime.pointerGetAttributes(features.ctypes.data)
    except runtime.CUDARuntimeError:
        return False
    return attributes.type == _CUDA_MEMORY_TYPE_HOST


def parallel_copy(destination, source, pool):
    """``destination[...] = source`` in row blocks on the threads of ``pool`` (numpy
    releases the GIL while copying)."""
    bounds = np.linspace(0, len(source), STAGING_THREADS + 1).astype(int)
    list(pool.map(lambda start, stop: np.copyto(destination[start:stop], source[start:stop]),
                  bounds[:-1], bounds[1:]))


class _StagingSlot:
    """One pinned host buffer and its device twin, with the events that guard reuse."""

    #: Alignment of each array inside the buffers (bytes).
    ALIGNMENT = 256

    def __init__(self, cupy):
        self.cupy = cupy
        self.capacity = 0
        self.copied = cupy.cuda.Event(disable_timing=True)  # its copy to the device landed
        self.consumed = cupy.cuda.Event(disable_timing=True)  # kernels reading it finished
        self.copied.record()
        self.consumed.record()

    def _reserve(self, nbytes):
        if nbytes <= self.capacity:
            return
        self.pinned = np.frombuffer(self.cupy.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)
        self.device = self.cupy.empty(nbytes, self.cupy.uint8)
        self.capacity = nbytes
        # Fresh device memory may come from buffers that queued kernels still read.
        self.consumed.record()

    def upload(self, arrays, page_locked, pool, copy_stream):
        """Copy host arrays (None entries pass through) to the device on ``copy_stream``;
        return their device views. Arrays flagged in ``page_locked`` are copied from
        where they are; the others are first staged into the pinned buffer."""
        cupy = self.cupy
        runtime = cupy.cuda.runtime
        starts, end = [], 0
        for array in arrays:
            starts.append(end)
            if array is not None:
                end += -(-array.nbytes // self.ALIGNMENT) * self.ALIGNMENT
        self.copied.synchronize()  # synchronize! the pinned buffer's previous copy must land
        self._reserve(max(end, 1))
        copy_stream.wait_event(self.consumed)
        device_views = []
        for array, locked, start in zip(arrays, page_locked, starts):
            if array is None:
                device_views.append(None)
                continue
            window = slice(start, start + array.nbytes)
            host = array
            if not locked:
                host = self.pinned[window].view(array.dtype).reshape(array.shape)
                parallel_copy(host, array, pool)
            runtime.memcpyAsync(self.device.data.ptr + start, host.ctypes.data, array.nbytes,
                                runtime.memcpyHostToDevice, copy_stream.ptr)
            device_views.append(self.device[window].view(array.dtype).reshape(array.shape))
        self.copied.record(copy_stream)
        return device_views


class StreamedSource:
    """Host rows (arrays, memmaps, ``.npy`` paths, chunk sources) streamed to the GPU.

    ``STAGING_SLOTS`` pinned buffers take turns: chunk k+1 is staged and
    copied on the copy stream while the kernels of chunk k run on the compute
    stream.

    Parameters
    ----------
    features, labels, clean_labels, chunk_size
        As for ``ncfast.collapse``; chunks default to ``STREAM_CHUNK_BYTES``.
    """

    def __init__(self, features, labels, clean_labels=None, *, chunk_size=None):
        cupy = sys.modules["cupy"]
        self.host = HostSource(as_source(features, labels, clean_labels, chunk_size=chunk_size))
        # Rows of an array in page-locked memory are copied in place, chunk by chunk.
        self.page_locked = (_page_locked(getattr(self.host.host, "features", None)), False,
                            False)
        if chunk_size is None:
            self.host.host.chunk_size = _rows_for(STREAM_CHUNK_BYTES, 4 * self.num_features)
        self.device = cupy.cuda.Device()
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)
        self.compute_stream = cupy.cuda.Stream(non_blocking=True)
        self._slots = [_StagingSlot(cupy) for _ in range(STAGING_SLOTS)]
        self.work_row_bytes = 4 * self.num_features

    @property
    def num_features(self):
        return self.host.num_features

    @property
    def num_rows(self):
        return self.host.num_rows

    @property
    def carries_clean_labels(self):
        return self.host.carries_clean_labels

    @property
    def rereads(self):
        return self.host.rereads

    def context(self):
        """The current device, with the compute stream current."""
        return _Both(self.device, self.compute_stream)

    def label_summary(self):
        return self.host.label_summary()

    def chunks(self, pass_number):
        """Chunks of device rows, copied through the pinned buffers (the host chunks set
        the size, the same in both passes)."""
        with ThreadPoolExecutor(STAGING_THREADS) as pool:
            for index, chunk in enumerate(self.host.chunks(pass_number)):
                slot = self._slots[index % len(self._slots)]
                features, labels, clean = slot.upload(
                    (chunk.features, chunk.labels, chunk.clean_labels), self.page_locked, pool,
                    self.copy_stream)
                self.compute_stream.wait_event(slot.copied)
                yield Chunk(features, labels, clean, chunk.offset)
                slot.consumed.record(self.compute_stream)

    def host_row(self, row):
        """Features (1, D), labels (1,) and clean labels (1,) or None of one row."""
        for chunk in self.host.chunks(2):
            if chunk.offset <= row < chunk.offset + len(chunk.labels):
                i = row - chunk.offset
                clean = None if chunk.clean_labels is None else chunk.clean_labels[i:i + 1]
                return chunk.features[i:i + 1], chunk.labels[i:i + 1], clean
        raise IndexError(f"row {row} is beyond the source's rows")


class _Both:
    """Two context managers entered together (a device and a stream)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __enter__(self):
        self.first.__enter__()
        self.second.__enter__()

    def __exit__(self, *exc):
        self.second.__exit__(*exc)
        self.first.__exit__(*exc)


def _first_non_finite_row(source):
    """Global index of the first row holding a NaN or Inf, or ``NO_ROW`` (a scan of the
    source, run only when the pass-1 sums show one)."""
    cupy = sys.modules["cupy"]
    for chunk in source.chunks(1):
        bad = ~cupy.isfinite(chunk.features).all(axis=1)
        if bad.any():
            return chunk.offset + int(bad.argmax())
    return NO_ROW


class DeviceClassSums:
    """Pass-1 state on the device: per-class counts and float64 sums.

    Float64 rows are summed less the first float64 row the state sees
    (``shift``), and ``counts × shift`` over those rows is added back once, in
    ``add_to_host``. A running float64 sum of rows far from the origin rounds by
    the ulp of its growing total, in one direction: the kernel's blocks each add
    their partial sums into the totals, and at 25,000 rows a class 1e12 from the
    origin, spread 0.1, that moved the means by up to 0.024 and ``Tr Σ_W`` by
    0.45% (a float64 simulation of the kernel's order of additions on an H200's
    132 multiprocessors); less the shift, by the means' own rounding. The shift
    is one for the whole pass: added back per chunk, it would make the totals
    large again, and the next chunk's partial sums would round on them (0.15% at
    chunks of 7,000 rows in the same simulation). Float32 rows are added as they
    are: their float64 sums are exact.

    Parameters
    ----------
    num_classes, num_features : int
    track_clean : bool
        Also sum the clean rows (label equal to the clean label).
    """

    def __init__(self, num_classes, num_features, *, track_clean=False):
        from ncfast.kernels import cuda as kernels
        cupy = kernels.cupy
        self._kernels = kernels
        self.num_classes, self.num_features = num_classes, num_features
        self.counts = cupy.zeros(num_classes, cupy.uint64)
        self.sums = cupy.zeros((num_classes, num_features))
        self.clean_counts = cupy.zeros(num_classes, cupy.uint64) if track_clean else None
        self.clean_sums = cupy.zeros((num_classes, num_features)) if track_clean else None
        self.bad_label_row = cupy.full(1, NO_ROW, cupy.int64)
        # The float64 rows' shift, and how many rows of each class were summed less it.
        self.shift = self.shifted_counts = self.shifted_clean_counts = None

    def update(self, features, labels, clean_labels=None, *, row_offset=0):
        """Add one chunk of device rows (clean labels exactly when tracking clean rows)."""
        cupy = self._kernels.cupy
        shifted = features.dtype == np.float64 and features.shape[0] > 0
        if shifted:
            if self.shift is None:
                first = features[0]
                self.shift = cupy.where(cupy.abs(first) < SHIFT_LIMIT, first, 0.0)
                self.shifted_counts = cupy.zeros_like(self.counts)
                if self.clean_counts is not None:
                    self.shifted_clean_counts = cupy.zeros_like(self.clean_counts)
            self.shifted_counts -= self.counts
            if self.clean_counts is not None:
                self.shifted_clean_counts -= self.clean_counts
        codes = cupy.empty(labels.shape, cupy.int32)
        self._kernels.label_codes(labels, clean_labels, self.num_classes, row_offset, codes,
                                  self.bad_label_row)
        self._kernels.class_sums(features, codes, self.counts, self.sums, self.clean_counts,
                                 self.clean_sums, self.shift if shifted else None)
        if shifted:  # this chunk's rows: the counts after less the counts before
            self.shifted_counts += self.counts
            if self.clean_counts is not None:
                self.shifted_clean_counts += self.clean_counts
        return self

    def add_to_host(self, class_sums, source):
        """Add the device sums into the host ``ClassSums``; raise for the first bad row.

        Waits for the device once.
        """
        bad_label_row = int(self.bad_label_row.get()[0])  # synchronize!
        counts, sums = self.counts.get().astype(np.int64), self.sums.get()
        bad_value_row = NO_ROW if np.isfinite(sums).all() else _first_non_finite_row(source)
        row = min(bad_label_row, bad_value_row)
        if row != NO_ROW:
            features, labels, clean = source.host_row(row)
            errors.raise_bad_row(row, labels, clean, features, num_classes=self.num_classes)
        class_sums.counts += counts
        add_compensated(class_sums.sums, class_sums.sum_errors,
                        self._shifted_back(sums, self.shifted_counts))
        if class_sums.track_clean:
            class_sums.clean_counts += self.clean_counts.get().astype(np.int64)
            add_compensated(class_sums.clean_sums, class_sums.clean_sum_errors,
                            self._shifted_back(self.clean_sums.get(), self.shifted_clean_counts))

    def _shifted_back(self, sums, shifted_counts):
        """Host ``sums`` with ``shifted_counts × shift`` added back (``sums`` itself without
        a shift)."""
        if self.shift is None:
            return sums
        return sums + shifted_counts.get().astype(np.float64)[:, None] * self.shift.get()


def split_by_radii(xp, labels, sq_norms, label_rows, ncc_sq_radii, classifier_sq_radii):
    """The counted rows of a chunk by where they lie around their class mean (the
    "features" route's pass 2; see ``ncfast.plan.Pass2Plan``).

    Parameters
    ----------
    xp : array namespace (numpy or cupy)
    labels : int64 array of shape (n,)
    sq_norms : float64 array of shape (n,), ``||r||^2``; negative (a row left out or
        without a mean) or NaN (reported bad) for rows that are not counted
    label_rows : int64 array of shape (C,)
    ncc_sq_radii : float64 array of shape (C',)
    classifier_sq_radii : float64 array of shape (C',), or None without a classifier

    Returns
    -------
    inside : int64 array, ascending
        Rows strictly inside both radii: nearest their own mean, predicted by the
        classifier as their mean is.
    beyond_ncc : int64 array, ascending
        Rows beyond their NCC radius: searched over every class mean (and logit).
    beyond_classifier : int64 array, ascending
        Rows inside their NCC radius but beyond their classifier radius: searched over
        every logit.
    """
    counted = sq_norms >= 0.0
    mean_rows = label_rows[xp.where(counted, labels, 0)]
    near = counted & (sq_norms < ncc_sq_radii[mean_rows])
    beyond_ncc = xp.flatnonzero(counted & ~near)
    if classifier_sq_radii is None:
        return xp.flatnonzero(near), beyond_ncc, beyond_ncc[:0]
    certain = sq_norms < classifier_sq_radii[mean_rows]
    return (xp.flatnonzero(near & certain), beyond_ncc, xp.flatnonzero(near & ~certain))


def tally_rows_inside(xp, tallies, rows, labels, sq_norms, label_rows, mean_predictions,
                      corrupted):
    """Add rows inside both radii to the pass-2 tallies: each is nearest its own class
    mean, and the classifier predicts for it what it predicts for that mean (the rules of
    ``ncfast.kernels.cpu.tally_rows``).

    Parameters
    ----------
    xp : array namespace (numpy or cupy)
    tallies : dict of arrays, updated (see ``ncfast.kernels.cuda.epilogue``)
    rows : int64 array of shape (m,), from ``split_by_radii``
    labels, sq_norms, label_rows : as for ``split_by_radii``
    mean_predictions : int64 array of shape (C',), the classifier's prediction of each
        mean, or None without a classifier
    corrupted : uint8 array of shape (n,), or None
    """
    if rows.size == 0:
        return
    num_classes = tallies["counts"].shape[0]
    row_labels, row_sq_norms = labels[rows], sq_norms[rows]

    def add_per_class(names, weights=None):
        sums = xp.bincount(row_labels, weights=weights, minlength=num_classes)
        for name in names:
            tallies[name] += sums.astype(tallies[name].dtype)

    add_per_class(("counts", "ncc_hits"))  # every row is nearest its own class mean
    add_per_class(("sq_norm_sums",), row_sq_norms)
    add_per_class(("norm_sums",), xp.sqrt(row_sq_norms))
    hits = xp.ones(rows.size, bool)  # the prediction is the label
    disagreements = xp.zeros((), xp.int64)
    if mean_predictions is not None:
        hits = mean_predictions[label_rows[row_labels]] == row_labels
        add_per_class(("classifier_hits",), hits.astype(xp.float64))
        disagreements = (~hits).sum()
    flags = xp.zeros(rows.size, bool) if corrupted is None else corrupted[rows] != 0
    totals = xp.stack([disagreements, flags.sum(), (flags & hits).sum()])
    tallies["totals"] += totals.astype(tallies["totals"].dtype)


class LaneSums(NamedTuple):
    """The pass-2 sums of the chunks that one stream runs.

    Attributes
    ----------
    nc1_state : cupy float64 array
        On the "classes" route NC1's eigen-diagonal itself, ``sum a_j^2`` of the
        coordinates ``a = V^T M~ r`` (shape (C',)); on the "features" route the D×D
        scatter of ``r``.
    tallies : dict of cupy arrays
        ``counts``, ``ncc_hits``, ``classifier_hits`` (uint64, (C,)), ``sq_norm_sums``,
        ``norm_sums`` (float64, (C,)), ``totals`` (uint64, (3,)); see
        ``ncfast.kernels.cuda.epilogue``.
    """

    nc1_state: object
    tallies: dict


class DeviceResidualStats:
    """Pass-2 state on the device for one host ``ResidualStats`` (same plan), added into
    it by ``add_to_host``.

    Per chunk on the "classes" route, as the host kernels: residuals from the
    float64 means with ``||r||^2``; one float32 GEMM of the residuals against
    ``[M~^T V | W^T]``, whose first columns are the coordinates ``a = V^T M~ r``
    in the Gram's eigenbasis, each rounded against its own scale; ``sum a_j^2``
    in float64, NC1's eigen-diagonal; ``z = V a`` by a second GEMM, for the
    nearest class centre; the fused epilogue. (A float32 ``z = M~ r`` rotated
    afterwards carries ``eps32 ||r|| ||M~||`` into every coordinate, which NC1
    divides by ``lambda_j^2``: emulated on 6,000 rows whose means' span has three
    directions shrunk 1e4-fold, ``pinv_condition`` 2e8, that NC1 came out 4.96
    times its value; the arithmetic above gives the host's, 1.1e-5 off.) On the
    "features" route: residuals, their float64 D×D scatter by ``dgemm``, and a
    float32 GEMM of the centred rows against ``[M~^T | W^T]``.
    The sums are kept per stream the chunks arrive on (``LaneSums``):
    ``add_to_host`` adds them, and on the "features" route turns the scatter into
    the eigen-diagonal ``diag(U^T S U)`` in the eigenbasis of ``Sigma_B``
    (``ResidualStats.eigen_scatter``), one GEMM on the device.

    On the "features" route the GEMM and the epilogue see only the rows beyond
    their NCC or classifier radius (``Pass2Plan.ncc_sq_radii``,
    ``classifier_sq_radii``; ``split_by_radii``), gathered in batches of
    ``RESIDUAL_CHUNK_BYTES`` of work buffers: every class mean and logit for the
    rows beyond their NCC radius, the logits alone for the others. A row inside a
    radius is nearest its own mean, or predicted by the classifier as its mean
    is (``tally_rows_inside``), as on the CPU.

    Parameters
    ----------
    host_stats : ResidualStats
        Its ``plan`` supplies the means, projections and offsets.
    """

    _TALLIES = ("counts", "sq_norm_sums", "norm_sums", "ncc_hits", "classifier_hits", "totals")

    def __init__(self, host_stats):
        from ncfast.kernels import cuda as kernels
        cupy = kernels.cupy
        self._kernels = kernels
        self.host_stats = host_stats
        plan = host_stats.plan
        geometry = plan.geometry
        self.route = plan.route
        self.num_means = geometry.present.size
        self.label_rows = cupy.asarray(geometry.label_rows)
        self.present = cupy.asarray(geometry.present)
        self.means = cupy.asarray(plan.present_means)
        # [M~^T V | W^T] ("classes" route) or [M~^T | W^T] ("features" route), float32.
        columns = [plan.projection_t] + ([plan.weights_t] if plan.has_classifier else [])
        self.projection_t = cupy.concatenate([cupy.asarray(block) for block in columns], axis=1)
        if self.route == "classes":
            self.eigenvectors_t = cupy.asarray(plan.eigenvectors_t)  # V^T, float32
            self.distance_offsets = cupy.asarray(geometry.mean_sq_distances)
        else:
            self.distance_offsets = cupy.asarray(geometry.centred_sq_norms)
            self.eigenvectors = cupy.asarray(geometry.between_spectrum[1])
            self.global_mean = cupy.asarray(geometry.global_mean[None, :])
            self.centre_rows = cupy.zeros(1, cupy.int64)
            self.ncc_sq_radii = cupy.asarray(plan.ncc_sq_radii)
            self.classifier_sq_radii = self.mean_predictions = self.weights_t = None
            if plan.has_classifier:
                self.classifier_sq_radii = cupy.asarray(plan.classifier_sq_radii)
                self.mean_predictions = cupy.asarray(plan.mean_predictions)
                self.weights_t = self.projection_t[:, self.num_means:].copy()
        self.logit_offsets = cupy.asarray(plan.logit_offsets)
        self.nc1_shape = ((self.num_means,) if self.route == "classes"
                              else (geometry.num_features, geometry.num_features))
        self.lanes = {}  # stream pointer -> that stream's LaneSums
        self.bad_row = cupy.full(1, NO_ROW, cupy.int64)

    @property
    def work_row_bytes(self):
        """Bytes of work buffers per row of a chunk."""
        num_features, width = self.projection_t.shape
        if self.route == "classes":  # residuals, products, a, z, a and a^2 in float64
            return 4 * num_features + 4 * width + 24 * self.num_means
        return 12 * num_features + 32

    def _lane(self):
        """The sums of the current stream. Chunks on different streams run concurrently,
        and an array operation such as ``tallies += counts`` (``tally_rows_inside``) is no
        atomic update: two streams adding into one array would lose rows."""
        cupy = self._kernels.cupy
        stream = cupy.cuda.get_current_stream().ptr
        if stream not in self.lanes:
            num_classes = self.label_rows.shape[0]
            tallies = {name: cupy.zeros(num_classes, cupy.uint64)
                       for name in ("counts", "ncc_hits", "classifier_hits")}
            tallies.update(sq_norm_sums=cupy.zeros(num_classes),
                           norm_sums=cupy.zeros(num_classes), totals=cupy.zeros(3, cupy.uint64))
            self.lanes[stream] = LaneSums(cupy.zeros(self.nc1_shape), tallies)
        return self.lanes[stream]

    def update(self, features, labels, corrupted=None, *, include=None, row_offset=0):
        """Add device rows, on the current stream.

        Parameters
        ----------
        features : cupy float32 or float64 array of shape (n, D)
        labels : cupy int64 array of shape (n,)
        corrupted : cupy bool array of shape (n,), optional
            Rows whose training label is wrong (label noise).
        include : cupy bool array of shape (n,), optional
            Rows to add; the others contribute nothing.
        row_offset : int
            Global index of the first row (bad-row reports).
        """
        kernels, cupy = self._kernels, self._kernels.cupy
        num_rows, num_features = features.shape
        if include is not None:
            include = include.view(cupy.uint8)
        if corrupted is not None:
            corrupted = corrupted.view(cupy.uint8)
        lane = self._lane()
        residuals = cupy.empty((num_rows, num_features), cupy.float32)
        sq_norms = cupy.empty(num_rows)
        if self.route == "classes":
            kernels.residuals(features, labels, include, self.label_rows, self.means, row_offset,
                              residuals, None, sq_norms, self.bad_row)
            products = cupy.empty((num_rows, self.projection_t.shape[1]), cupy.float32)
            kernels.matmul_f32(residuals, self.projection_t, products)
            del residuals
            # Rows left out, or without a mean, have zero residuals: their a is 0.
            coordinates = cupy.ascontiguousarray(products[:, :self.num_means])
            coordinates64 = coordinates.astype(cupy.float64)
            lane.nc1_state += (coordinates64 * coordinates64).sum(axis=0)
            mean_products = cupy.empty_like(coordinates)
            kernels.matmul_f32(coordinates, self.eigenvectors_t, mean_products)  # z = V a
            products[:, :self.num_means] = mean_products
            del coordinates, coordinates64, mean_products
            kernels.epilogue(products, self.num_means, sq_norms, labels, self.label_rows,
                             self.present, self.distance_offsets, True, self.logit_offsets,
                             corrupted, lane.tallies)
            return self
        residuals64 = cupy.empty((num_rows, num_features))
        kernels.residuals(features, labels, include, self.label_rows, self.means, row_offset,
                          residuals, residuals64, sq_norms, self.bad_row)
        kernels.add_gram(residuals64, lane.nc1_state)
        del residuals, residuals64
        inside, beyond_ncc, beyond_classifier = split_by_radii(
            cupy, labels, sq_norms, self.label_rows, self.ncc_sq_radii,
            self.classifier_sq_radii)
        tally_rows_inside(cupy, lane.tallies, inside, labels, sq_norms, self.label_rows,
                          self.mean_predictions, corrupted)
        chunk = (features, labels, sq_norms, corrupted, row_offset)
        self._search(chunk, beyond_ncc, self.projection_t, self.num_means, lane)
        if beyond_classifier.size:
            self._search(chunk, beyond_classifier, self.weights_t, 0, lane)
        return self

    def _search(self, chunk, rows, columns_t, num_means, lane):
        """"features" route: ``rows`` of a chunk, centred, multiplied by ``columns_t``
        (``[M~^T | W^T]``, or ``W^T`` alone with ``num_means = 0``) in batches of
        ``RESIDUAL_CHUNK_BYTES`` of work buffers, and tallied by the epilogue."""
        kernels, cupy = self._kernels, self._kernels.cupy
        features, labels, sq_norms, corrupted, row_offset = chunk
        num_features, width = columns_t.shape
        batch_rows = _rows_for(RESIDUAL_CHUNK_BYTES, 12 * num_features + 4 * width + 16)
        for start in range(0, rows.size, batch_rows):
            batch = rows[start:start + batch_rows]
            every_row = batch.size == labels.size  # then in order: no gather needed
            centred = cupy.empty((batch.size, num_features), cupy.float32)
            kernels.residuals(features if every_row else features[batch], None, None,
                              self.centre_rows, self.global_mean, row_offset, centred, None,
                              cupy.empty(batch.size), None)
            products = cupy.empty((batch.size, width), cupy.float32)
            kernels.matmul_f32(centred, columns_t, products)
            kernels.epilogue(products, num_means, sq_norms if every_row else sq_norms[batch],
                             labels if every_row else labels[batch], self.label_rows,
                             self.present, self.distance_offsets, False, self.logit_offsets,
                             corrupted if corrupted is None or every_row else corrupted[batch],
                             lane.tallies)

    def first_bad_row(self):
        """Global index of the first row whose label has no mean or that holds a NaN or
        Inf, or ``NO_ROW``."""
        return int(self.bad_row.get()[0])

    def add_to_host(self):
        """Add the device sums of every stream into the host ``ResidualStats`` (waits for
        the device)."""
        host = self.host_stats
        lanes = list(self.lanes.values())
        if not lanes:
            return
        nc1_state = sum(lane.nc1_state for lane in lanes)
        if self.route == "features":
            nc1_state = eigen_diagonal(nc1_state, self.eigenvectors)
        host.eigen_scatter += nc1_state.get()
        for name in self._TALLIES:
            tally = getattr(host, name)
            tally += sum(lane.tallies[name] for lane in lanes).get().astype(tally.dtype)


class CudaBackend:
    """CuPy kernels and arrays on the current CUDA device (see ``ncfast.backends``)."""

    name = "cuda"
    #: Classes per side of a pair-sweep tile: large tiles keep the GPU busy.
    pair_tile = 4096

    def __init__(self, cupy):
        self.xp = cupy

    @staticmethod
    def map_tasks(function, num_tasks):
        """Tiles one after another: each one's kernels already fill the device."""
        return [function(task) for task in range(num_tasks)]

    def reduce_tile(self, dots, tile, rows, cols):
        return reduce_tile_xp(self.xp, dots, tile, rows, cols)

    def symmetric_eigh(self, matrix):
        """The plan's eigendecomposition of a host float64 symmetric matrix by cuSOLVER,
        returned to the host (``ncfast.geometry.symmetric_eigh``'s contract)."""
        eigenvalues, eigenvectors = self.xp.linalg.eigh(self.xp.asarray(matrix))
        return eigenvalues.get(), eigenvectors.get()

    @staticmethod
    def source(features, labels, clean_labels=None, *, chunk_size=None):
        """GPU features in place; anything else streamed from the host."""
        if is_cupy_array(features) or is_torch_cuda_tensor(features):
            return ResidentSource(features, labels, clean_labels, chunk_size=chunk_size)
        return StreamedSource(features, labels, clean_labels, chunk_size=chunk_size)

    @staticmethod
    def pass1_state(class_sums):
        return DeviceClassSums(class_sums.num_classes, class_sums.num_features,
                               track_clean=class_sums.track_clean)

    @staticmethod
    def finish_pass1(state, class_sums, source):
        state.add_to_host(class_sums, source)

    @staticmethod
    def pass2_states(residual_pass, source):
        """Device twins of the host states; pass-2 chunks sized by their work buffers."""
        states = {part: DeviceResidualStats(stats)
                  for part, stats in residual_pass.parts().items()}
        source.work_row_bytes = max(state.work_row_bytes for state in states.values())
        return states

    def finish_pass2(self, states, residual_pass, source):
        """Add every device sum into the host states; raise for the first bad row."""
        self.xp.cuda.get_current_stream().synchronize()  # synchronize!
        bad_row = min(state.first_bad_row() for state in states.values())
        if bad_row != NO_ROW:
            features, labels, _ = source.host_row(bad_row)
            geometry = residual_pass.stats.geometry
            errors.raise_bad_row(bad_row, labels, None, features,
                                 num_classes=geometry.num_classes,
                                 label_rows=geometry.label_rows)
        for state in states.values():
            state.add_to_host()


def cuda_backend():
    """The CUDA backend, or a RuntimeError saying why it cannot run here."""
    return CudaBackend(_cupy())
