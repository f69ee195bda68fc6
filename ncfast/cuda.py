"""GPU backend: the two streaming passes on a CUDA device, through CuPy.

``ncfast.collapse(..., device="cuda")`` lands in ``collapse_on_gpu``. Features
already on a GPU (CuPy arrays; torch CUDA tensors through DLPack, no copy)
are read in place. Host arrays, memmaps, ``.npy`` paths and chunk sources are
streamed through pinned buffers on two streams: while the kernels of one chunk
run on the compute stream, the next chunks are staged into the other buffers
and copied on a copy stream, so inputs larger than GPU memory work. Host
arrays already in page-locked memory (``torch.Tensor.pin_memory()``, CuPy's
pinned allocations) are copied from where they are, skipping the staging copy.

The accumulators stay on the device in float64; the host waits once per pass
(``# synchronize!``) to add them into the same ``ClassSums`` and
``ResidualStats`` the CPU backend builds, and the shared finalize and metric
algebra (``ncfast.api.finalize_pass1``, ``ncfast.metrics``) do the rest.

Importing this module never imports CuPy: backend detection reads
``sys.modules``, and the kernels (``ncfast.kernels.cuda``) load on first use.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ncfast.accumulators import ClassSums, _raise_bad_rows
from ncfast.api import (ResidualPass, finalize_pass1, geometry_from_means_option,
                        resolve_num_classes)
from ncfast.geometry import PINV_RTOL
from ncfast.kernels.cpu import NO_ROW
from ncfast.inputs import (KERNEL_DTYPES, Chunk, _is_torch_tensor, as_source,
                           carries_clean_labels, check_chunk_size, check_features, check_labels,
                           num_features_of, to_kernel_features, to_kernel_labels)

DEVICES = ("auto", "cpu", "cuda")

_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: page-locked host memory

#: Bytes of float32 host rows per streamed chunk (each pinned buffer).
STREAM_CHUNK_BYTES = 64 << 20

#: Bytes of work buffers (residuals, GEMM output, float64 products) per pass-2
#: chunk of GPU-resident rows: large enough that launches never starve the GPU.
RESIDUAL_CHUNK_BYTES = 256 << 20

#: Streams (and scatter accumulators) that pass-2 chunks of GPU-resident rows
#: alternate between.
LANES = 2

#: Pinned buffers (each with its device twin) that streamed chunks cycle through:
#: while the kernels of one chunk run, the next ones are staged and copied.
STAGING_SLOTS = 3

#: Threads that stage a host chunk into pinned memory side by side.
STAGING_THREADS = min(8, os.cpu_count() or 1)


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


def _torch_cuda_tensor(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and obj.device.type == "cuda"


def _cupy_array(obj):
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(obj, cupy.ndarray)


def is_device_array(obj):
    """True for a CuPy array or a torch CUDA tensor (checked without importing either)."""
    return _cupy_array(obj) or _torch_cuda_tensor(obj)


def runs_on_gpu(device, features):
    """Whether ``collapse`` runs on the GPU for this ``device`` and these features.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"}
        "auto": where the features are (GPU arrays on their GPU, host data on
        the CPU); "cuda": on the GPU, streaming host data to it.
    features : the ``features`` argument of ``collapse``

    Raises
    ------
    RuntimeError
        ``device="cuda"`` without CuPy or without a usable GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}; found {device!r}")
    on_device = is_device_array(features)
    if device == "cpu" and on_device:
        raise ValueError(
            "features are on a GPU but device='cpu'; pass device='cuda' (or 'auto'), or move "
            "them to host memory (.get() for CuPy, .cpu() for torch)")
    if device == "cuda" or on_device:
        _cupy()
        return True
    return False


def _rows_for(num_bytes, row_bytes):
    return max(1, num_bytes // max(row_bytes, 1))


def _device_features(block):
    """A C-contiguous float32/float64 CuPy array of GPU rows (CuPy or torch), no copy when
    the dtype and layout allow."""
    cupy = sys.modules["cupy"]
    if _torch_cuda_tensor(block):
        torch = sys.modules["torch"]
        block = block.detach()
        if block.dtype not in (torch.float32, torch.float64):
            block = block.float()
        return cupy.ascontiguousarray(cupy.from_dlpack(block.contiguous()))
    if block.dtype not in (np.float32, np.float64):
        block = block.astype(np.float32 if block.dtype.itemsize <= 4 else np.float64)
    return cupy.ascontiguousarray(block)


def _device_labels(labels):
    """Labels (host or GPU, any integer dtype) as a CuPy int64 array."""
    cupy = sys.modules["cupy"]
    if _torch_cuda_tensor(labels):
        labels = cupy.from_dlpack(labels.detach().contiguous())
    if not _cupy_array(labels):
        labels = to_kernel_labels(labels)
    return cupy.ascontiguousarray(cupy.asarray(labels, dtype=cupy.int64))


class ResidentSource:
    """Features already on a GPU, read in place in chunks of rows.

    Parameters
    ----------
    features : CuPy array or torch CUDA tensor of shape (n_samples, n_features)
    labels, clean_labels : int arrays of shape (n_samples,), host or GPU
    chunk_size : int, optional
        Rows per chunk; by default pass 1 reads all rows at once and pass 2
        sizes its chunks to ``RESIDUAL_CHUNK_BYTES`` of work buffers.
    """

    def __init__(self, features, labels, clean_labels=None, *, chunk_size=None):
        cupy = sys.modules["cupy"]
        self.features = features
        self.num_rows, self.num_features = check_features(features)
        if labels is None:
            raise TypeError("labels is required with features on a GPU")
        self.labels = _device_labels(check_labels(labels, self.num_rows))
        self.clean_labels = None
        if clean_labels is not None:
            self.clean_labels = _device_labels(
                check_labels(clean_labels, self.num_rows, "clean_labels"))
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size, 1)
        device = features.device
        self.device = cupy.cuda.Device(device.index if _torch_cuda_tensor(features) else device.id)
        self.compute_stream = None  # the caller's current stream: the features' producer's

    def max_label(self):
        """Largest label (and clean label)."""
        labels = [self.labels] + ([] if self.clean_labels is None else [self.clean_labels])
        return max(int(array.max()) for array in labels)

    def chunks(self, work_row_bytes=None):
        """Chunks of device rows: all rows when ``work_row_bytes`` is None (pass 1), else
        rows whose pass-2 work buffers take ``RESIDUAL_CHUNK_BYTES``."""
        rows = self.chunk_size
        if rows is None:
            rows = self.num_rows if work_row_bytes is None else \
                _rows_for(RESIDUAL_CHUNK_BYTES, work_row_bytes)
        for start in range(0, self.num_rows, rows):
            stop = min(start + rows, self.num_rows)
            clean = None if self.clean_labels is None else self.clean_labels[start:stop]
            yield Chunk(_device_features(self.features[start:stop]), self.labels[start:stop],
                        clean, start)

    def host_row(self, row):
        """Features (1, D), labels (1,) and clean labels (1,) or None of one row, on the host."""
        clean = None if self.clean_labels is None else self.clean_labels[row:row + 1].get()
        features = self.features[row:row + 1]
        features = features.detach().cpu() if _torch_cuda_tensor(features) else features.get()
        return to_kernel_features(features), self.labels[row:row + 1].get(), clean


def _page_locked(features):
    """Whether host features (numpy array or torch CPU tensor) are float32/float64 rows in
    page-locked memory, which the GPU copies from where they are (other dtypes are
    converted per chunk into ordinary memory). Asked once per input: the query is slow
    on ordinary memory."""
    if _is_torch_tensor(features):
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


def _parallel_copy(destination, source, pool):
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
                _parallel_copy(host, array, pool)
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
        self.host = as_source(features, labels, clean_labels, chunk_size=chunk_size)
        # Rows of an array in page-locked memory are copied in place, chunk by chunk.
        self.page_locked = (_page_locked(getattr(self.host, "features", None)), False, False)
        if chunk_size is None:
            self.host.chunk_size = _rows_for(STREAM_CHUNK_BYTES, 4 * num_features_of(self.host))
        self.device = cupy.cuda.Device()
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)
        self.compute_stream = cupy.cuda.Stream(non_blocking=True)
        self._slots = [_StagingSlot(cupy) for _ in range(STAGING_SLOTS)]

    @property
    def num_features(self):
        return num_features_of(self.host)

    def chunks(self, work_row_bytes=None):
        """Chunks of device rows, copied through the pinned buffers (the argument, used by
        ``ResidentSource``, is ignored: the host chunks set the size)."""
        with ThreadPoolExecutor(STAGING_THREADS) as pool:
            for index, chunk in enumerate(self.host):
                slot = self._slots[index % len(self._slots)]
                features, labels, clean = slot.upload(
                    (chunk.features, chunk.labels, chunk.clean_labels), self.page_locked, pool,
                    self.copy_stream)
                self.compute_stream.wait_event(slot.copied)
                yield Chunk(features, labels, clean, chunk.offset)
                slot.consumed.record(self.compute_stream)

    def host_row(self, row):
        """Features (1, D), labels (1,) and clean labels (1,) or None of one row."""
        for chunk in self.host:
            if chunk.offset <= row < chunk.offset + len(chunk.labels):
                i = row - chunk.offset
                clean = None if chunk.clean_labels is None else chunk.clean_labels[i:i + 1]
                return chunk.features[i:i + 1], chunk.labels[i:i + 1], clean
        raise IndexError(f"row {row} is beyond the source's rows")


def _first_non_finite_row(source):
    """Global index of the first row holding a NaN or Inf, or ``NO_ROW`` (a scan of the
    source, run only when the pass-1 sums show one)."""
    cupy = sys.modules["cupy"]
    for chunk in source.chunks():
        bad = ~cupy.isfinite(chunk.features).all(axis=1)
        if bad.any():
            return chunk.offset + int(bad.argmax())
    return NO_ROW


class DeviceClassSums:
    """Pass-1 state on the device: per-class counts and float64 sums.

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

    def update(self, chunk):
        """Add one device ``Chunk`` (clean labels exactly when tracking clean rows)."""
        codes = self._kernels.cupy.empty(chunk.labels.shape, self._kernels.cupy.int32)
        self._kernels.label_codes(chunk.labels, chunk.clean_labels, self.num_classes,
                                  chunk.offset, codes, self.bad_label_row)
        self._kernels.class_sums(chunk.features, codes, self.counts, self.sums,
                                 self.clean_counts, self.clean_sums)
        return self

    def to_host(self, source):
        """The equal host ``ClassSums``; raises naming the first bad row, if any.

        Waits for the device once.
        """
        bad_label_row = int(self.bad_label_row.get()[0])  # synchronize!
        host = ClassSums(self.num_classes, self.num_features,
                         track_clean=self.clean_counts is not None)
        host.counts += self.counts.get().astype(np.int64)
        host.sums += self.sums.get()
        if host.track_clean:
            host.clean_counts += self.clean_counts.get().astype(np.int64)
            host.clean_sums += self.clean_sums.get()
        bad_value_row = NO_ROW if np.isfinite(host.sums).all() else _first_non_finite_row(source)
        row = min(bad_label_row, bad_value_row)
        if row != NO_ROW:
            features, labels, clean = source.host_row(row)
            _raise_bad_rows(row, 0 if row == bad_label_row else NO_ROW,
                            0 if row == bad_value_row else NO_ROW, self.num_classes, labels,
                            features, clean)
        return host


class DeviceResidualStats:
    """Pass-2 state on the device for one host ``ResidualStats`` (same geometry,
    classifier and route), added into it by ``add_to_host``.

    Per chunk: residuals from the float64 means with ``||r||^2``; one float32
    GEMM against ``[M~^T | W^T]`` (of the residuals on the "classes" route, of
    the centred rows on the "features" route); the fused epilogue; the float64
    scatter by ``dgemm``.

    Parameters
    ----------
    host_stats : ResidualStats
        Supplies the geometry and the prepared float32/float64 matrices.
    """

    _TALLIES = ("counts", "sq_norm_sums", "norm_sums", "ncc_hits", "classifier_hits", "totals")

    def __init__(self, host_stats):
        from ncfast.kernels import cuda as kernels
        cupy = kernels.cupy
        self._kernels = kernels
        self.host_stats = host_stats
        geometry = host_stats.geometry
        self.route = host_stats.route
        self.num_means = geometry.present.size
        self.label_rows = cupy.asarray(geometry.label_rows)
        self.present = cupy.asarray(geometry.present)
        self.means = cupy.asarray(host_stats._present_means)
        if self.route == "classes":
            # The device epilogue takes z = M~ r itself (not its eigenbasis
            # coordinates, as the host does) and sums the C'×C' scatter.
            projection_t = geometry.centred.T
            if host_stats.weights is not None:
                projection_t = np.concatenate([projection_t, host_stats.weights.T], axis=1)
            self.distance_offsets = cupy.asarray(geometry.mean_sq_distances)
            self.logit_offsets = cupy.asarray(host_stats._logit_offsets)
        else:
            projection_t = host_stats._centred_t
            self.logit_offsets = cupy.zeros(0)
            if host_stats.weights is not None:
                projection_t = np.concatenate([projection_t, host_stats._weights_t], axis=1)
                self.logit_offsets = cupy.asarray(host_stats._classifier_offsets)
            self.distance_offsets = cupy.asarray(geometry.centred_sq_norms)
            self.global_mean = cupy.asarray(geometry.global_mean[None, :])
            self.centre_rows = cupy.zeros(1, cupy.int64)
        self.projection_t = cupy.asarray(np.ascontiguousarray(projection_t, np.float32))
        num_classes = geometry.num_classes
        scatter_size = self.num_means if self.route == "classes" else geometry.num_features
        self.scatters = [cupy.zeros((scatter_size, scatter_size)) for _ in range(LANES)]
        self.tallies = {name: cupy.zeros(num_classes, cupy.uint64) for name in
                        ("counts", "ncc_hits", "classifier_hits")}
        self.tallies.update(sq_norm_sums=cupy.zeros(num_classes), norm_sums=cupy.zeros(num_classes),
                            totals=cupy.zeros(3, cupy.uint64))
        self.bad_row = cupy.full(1, NO_ROW, cupy.int64)

    @property
    def work_row_bytes(self):
        """Bytes of work buffers per row of a chunk."""
        num_features, width = self.projection_t.shape
        if self.route == "classes":
            return 4 * num_features + 4 * width + 8 * self.num_means
        return 16 * num_features + 4 * width

    def update(self, features, labels, *, include=None, corrupted=None, row_offset=0, lane=0):
        """Add device rows, on the current stream.

        Parameters
        ----------
        features : cupy float32 or float64 array of shape (n, D)
        labels : cupy int64 array of shape (n,)
        include : cupy bool array of shape (n,), optional
            Rows to add; the others contribute nothing.
        corrupted : cupy bool array of shape (n,), optional
            Rows whose training label is wrong (label noise).
        row_offset : int
            Global index of the first row (bad-row reports).
        lane : int
            Which of the ``LANES`` scatter accumulators to add into: chunks
            updated concurrently on different streams use different lanes
            (the per-class tallies are added atomically).
        """
        kernels, cupy = self._kernels, self._kernels.cupy
        num_rows, num_features = features.shape
        if include is not None:
            include = include.view(cupy.uint8)
        if corrupted is not None:
            corrupted = corrupted.view(cupy.uint8)
        residuals = cupy.empty((num_rows, num_features), cupy.float32)
        sq_norms = cupy.empty(num_rows)
        products = cupy.empty((num_rows, self.projection_t.shape[1]), cupy.float32)
        if self.route == "classes":
            kernels.residuals(features, labels, include, self.label_rows, self.means, row_offset,
                              residuals, None, sq_norms, self.bad_row)
            kernels.matmul_f32(residuals, self.projection_t, products)
            mean_products = cupy.empty((num_rows, self.num_means))
            kernels.epilogue(products, self.num_means, sq_norms, labels, self.label_rows,
                             self.present, self.distance_offsets, True, self.logit_offsets,
                             corrupted, self.tallies, mean_products)
            kernels.add_gram(mean_products, self.scatters[lane])
            return self
        residuals64 = cupy.empty((num_rows, num_features))
        kernels.residuals(features, labels, include, self.label_rows, self.means, row_offset,
                          residuals, residuals64, sq_norms, self.bad_row)
        centred = cupy.empty((num_rows, num_features), cupy.float32)
        kernels.residuals(features, None, None, self.centre_rows, self.global_mean, row_offset,
                          centred, None, cupy.empty(num_rows), None)
        kernels.matmul_f32(centred, self.projection_t, products)
        kernels.epilogue(products, self.num_means, sq_norms, labels, self.label_rows,
                         self.present, self.distance_offsets, False, self.logit_offsets,
                         corrupted, self.tallies, None)
        kernels.add_gram(residuals64, self.scatters[lane])
        return self

    def first_bad_row(self):
        """Global index of the first row whose label has no mean or that holds a NaN or
        Inf, or ``NO_ROW``."""
        return int(self.bad_row.get()[0])

    def add_to_host(self):
        """Add the device sums into ``host_stats`` (waits for the device)."""
        host = self.host_stats
        for scatter in self.scatters:
            if self.route == "classes":
                host.add_mean_scatter(scatter.get())
            else:
                host.scatter += scatter.get()
        for name in self._TALLIES:
            tally = getattr(host, name)
            tally += self.tallies[name].get().astype(tally.dtype)


class DeviceResidualPass:
    """Pass 2 on the device for a host ``ResidualPass``: every row, and with label
    noise the clean rows and the corrupted rows under their true label, as in
    ``ResidualPass.update``.

    Parameters
    ----------
    residual_pass : ResidualPass
        The host state the device sums are added into.
    """

    def __init__(self, residual_pass):
        self.residual_pass = residual_pass
        self.stats = DeviceResidualStats(residual_pass.stats)
        self.clean_stats = self.corrupted_stats = None
        if residual_pass.has_noise:
            self.clean_stats = DeviceResidualStats(residual_pass.clean_stats)
            self.corrupted_stats = DeviceResidualStats(residual_pass.corrupted_stats)

    def _all_stats(self):
        return [s for s in (self.stats, self.clean_stats, self.corrupted_stats) if s is not None]

    @property
    def work_row_bytes(self):
        return max(stats.work_row_bytes for stats in self._all_stats())

    def update(self, chunk, lane=0):
        """Add one device ``Chunk`` on the current stream, into scatter ``lane``."""
        if self.clean_stats is None:
            self.stats.update(chunk.features, chunk.labels, row_offset=chunk.offset, lane=lane)
            return self
        corrupted = chunk.labels != chunk.clean_labels
        self.stats.update(chunk.features, chunk.labels, corrupted=corrupted,
                          row_offset=chunk.offset, lane=lane)
        self.clean_stats.update(chunk.features, chunk.labels, include=~corrupted,
                                row_offset=chunk.offset, lane=lane)
        # Memorization needs the clean mean of the true class (as ResidualPass.update).
        measurable = corrupted & (self.clean_stats.label_rows[chunk.clean_labels] >= 0)
        self.corrupted_stats.update(chunk.features, chunk.clean_labels, include=measurable,
                                    row_offset=chunk.offset, lane=lane)
        return self

    def add_to_host(self, source, stream):
        """Add every device sum into the host ``ResidualPass``; raises naming the first bad
        row, if any. Waits for the device once."""
        stream.synchronize()  # synchronize!
        bad_row = min(stats.first_bad_row() for stats in self._all_stats())
        host_stats = self.residual_pass.stats
        if bad_row != NO_ROW:
            features, labels, _ = source.host_row(bad_row)
            label = int(labels[0])
            label_rows = host_stats.geometry.label_rows
            has_mean = 0 <= label < label_rows.size and label_rows[label] >= 0
            host_stats._raise_bad_row(features, labels, np.array([np.nan if has_mean else -1.0]),
                                      bad_row)
        for stats in self._all_stats():
            stats.add_to_host()
        return self.residual_pass


def collapse_on_gpu(features, labels=None, *, num_classes=None, weights=None, bias=None,
                    means=None, clean_labels=None, global_mean="classes", chunk_size=None,
                    empty_classes="warn", pinv_rtol=PINV_RTOL):
    """``ncfast.collapse`` on the GPU; same parameters and result (see there).

    Returns
    -------
    CollapseReport
    """
    cupy = _cupy()
    if is_device_array(features):
        source = ResidentSource(features, labels, clean_labels, chunk_size=chunk_size)
        has_noise = clean_labels is not None
        num_classes = resolve_num_classes(num_classes, source, means)
    else:
        source = StreamedSource(features, labels, clean_labels, chunk_size=chunk_size)
        has_noise = clean_labels is not None or carries_clean_labels(source.host)
        num_classes = resolve_num_classes(num_classes, source.host, means)
    stream = source.compute_stream or cupy.cuda.get_current_stream()
    with source.device, stream:
        clean_geometry = None
        if means is None:
            class_sums = DeviceClassSums(num_classes, source.num_features, track_clean=has_noise)
            for chunk in source.chunks():
                class_sums.update(chunk)
            geometry, clean_geometry = finalize_pass1(
                class_sums.to_host(source), global_mean=global_mean, empty_classes=empty_classes)
        else:
            if has_noise:
                raise ValueError(
                    "clean_labels needs the clean-row means of these features, so it cannot be "
                    "combined with means=; measure label noise on the training features")
            geometry = geometry_from_means_option(means, num_classes, source.num_features,
                                                  global_mean)
        residual_pass = ResidualPass(geometry, clean_geometry, weights=weights, bias=bias)
        device_pass = DeviceResidualPass(residual_pass)
        # GPU-resident chunks alternate between two streams, so that the bandwidth-bound
        # kernels of one overlap the GEMM of the other; streamed chunks arrive in order
        # on the compute stream.
        streams = [stream]
        if isinstance(source, ResidentSource):
            streams += [cupy.cuda.Stream(non_blocking=True) for _ in range(LANES - 1)]
        ready = stream.record()
        for side in streams[1:]:
            side.wait_event(ready)
        for index, chunk in enumerate(source.chunks(device_pass.work_row_bytes)):
            lane = index % len(streams)
            with streams[lane]:
                device_pass.update(chunk, lane)
        for side in streams[1:]:
            stream.wait_event(side.record())
        device_pass.add_to_host(source, stream)
    return residual_pass.report(global_mean=global_mean, pinv_rtol=pinv_rtol)
