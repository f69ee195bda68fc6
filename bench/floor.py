"""The floor of the machine: memory read bandwidth, sgemm rate and the many-classes products.

ncfast reads the features twice and does one float32 GEMM of ``2·N·D·k``
flops in pass 2 (k = C, or 2C with a classifier; docs/algorithm.md). No
implementation can beat, per pass, the larger of the time to read the bytes
at the machine's read bandwidth and the time of its flops at the machine's
best sgemm rate; the floor of a run is that bound summed over the two passes.
"""
import time
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

#: Side of the square sgemm that measures the machine's peak rate.
SQUARE_SIDE = 4096
#: Bytes of the array that measures the machine's read bandwidth: far larger than the caches.
BANDWIDTH_BYTES = 1 << 30


@njit(parallel=True, cache=True, fastmath=True)
def _read_rows(rows):
    """Read every value of a 2-D float32 array once; the row sums keep the reads alive."""
    num_rows, num_columns = rows.shape
    row_sums = np.empty(num_rows, np.float32)
    for i in prange(num_rows):
        total = np.float32(0.0)
        for j in range(num_columns):
            total += rows[i, j]
        row_sums[i] = total
    return row_sums.sum()


def best_seconds(function, repeats):
    """Shortest wall time of ``repeats`` calls of ``function()``, in seconds."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(array, repeats=3):
    """Bytes per second at which every thread together reads ``array`` once.

    Parameters
    ----------
    array : float32 array of shape (n, D), C-contiguous, much larger than the caches
    repeats : int
        The best of this many reads counts.
    """
    _read_rows(array[:64])
    return array.nbytes / best_seconds(lambda: _read_rows(array), repeats)


def machine_read_bandwidth(repeats=5):
    """Bytes per second at which every thread reads a fresh ``BANDWIDTH_BYTES`` float32 array."""
    scratch = np.ones((BANDWIDTH_BYTES // (4 * 1024), 1024), np.float32)
    return read_bandwidth(scratch, repeats)


def gemm_rate(rows, inner, columns, repeats=3, dtype=np.float32):
    """Flop/s of numpy's BLAS, every thread, on ``rows × inner`` by ``inner × columns``
    (float32 by default)."""
    rng = np.random.default_rng(0)
    left = rng.standard_normal((rows, inner), dtype=dtype)
    right = rng.standard_normal((inner, columns), dtype=dtype)
    out = np.empty((rows, columns), dtype)
    np.matmul(left, right, out=out)
    return 2.0 * rows * inner * columns / best_seconds(
        lambda: np.matmul(left, right, out=out), repeats)


def sgemm_rate(num_features, num_outputs, rows=1 << 16, repeats=3):
    """Best float32 GEMM rate of numpy's BLAS, flop/s, and the shape that reached it.

    Measures a square ``SQUARE_SIDE`` GEMM and the tall-skinny shape of
    pass 2 (``rows × D`` times ``D × k``), every BLAS thread; the larger
    rate is the machine's.

    Returns
    -------
    rate : float
    shape : str
    """
    rates = {label: gemm_rate(*shape, repeats=repeats) for label, shape in {
        f"{SQUARE_SIDE}^3": (SQUARE_SIDE, SQUARE_SIDE, SQUARE_SIDE),
        f"{rows}x{num_features}x{num_outputs}": (rows, num_features, num_outputs)}.items()}
    shape = max(rates, key=rates.get)
    return rates[shape], shape


@dataclass(frozen=True)
class Floor:
    """Machine rates and the floor they give a problem size.

    Attributes
    ----------
    bandwidth : float
        Read bandwidth, bytes/s.
    sgemm : float
        Best sgemm rate, flop/s.
    sgemm_shape : str
        The GEMM shape that reached it.
    """

    bandwidth: float
    sgemm: float
    sgemm_shape: str

    def seconds(self, num_rows, num_features, num_outputs, itemsize=4):
        """Floor of the two passes: ``read + max(read, GEMM)``.

        Parameters
        ----------
        num_rows, num_features : int
        num_outputs : int
            Columns of the pass-2 GEMM (C, or 2C with a classifier).
        itemsize : int
            Bytes per feature value.
        """
        return self.bound(num_rows * num_features * itemsize,
                          2.0 * num_rows * num_features * num_outputs)

    def terms(self, pass_bytes, flops):
        """Seconds to read one pass's bytes, and seconds of ``flops`` at the sgemm rate."""
        return pass_bytes / self.bandwidth, flops / self.sgemm

    def bound(self, pass_bytes, flops):
        """Floor of two passes over ``pass_bytes`` each, the second also doing ``flops``.

        Pass 1 reads; pass 2 reads and multiplies, at best overlapped:
        ``read + max(read, GEMM)``.
        """
        read, gemm = self.terms(pass_bytes, flops)
        return read + max(read, gemm)


#: Columns of one timed tile of the float64 Gram floor, and rows of one timed block
#: of the float32 NCC GEMM floor: each product stays within a few hundred MiB.
GRAM_TILE = 2048
NCC_BLOCK_ROWS = 4096


def gram_floor_seconds(means, repeats=2):
    """Seconds of the float64 C×D @ D×C product, timed tile by tile (every BLAS thread)."""
    num_classes = means.shape[0]
    out = np.empty((num_classes, min(GRAM_TILE, num_classes)))

    def product():
        for start in range(0, num_classes, GRAM_TILE):
            stop = min(start + GRAM_TILE, num_classes)
            np.matmul(means, means[start:stop].T, out=out[:, :stop - start])

    return best_seconds(product, repeats)


def ncc_floor_seconds(features, means, repeats=2):
    """Seconds of the float32 N×D @ D×C product, from one timed block of rows scaled to N."""
    block = np.ascontiguousarray(features[:NCC_BLOCK_ROWS])
    means_t = np.ascontiguousarray(means.T, dtype=np.float32)
    out = np.empty((block.shape[0], means.shape[0]), np.float32)
    seconds = best_seconds(lambda: np.matmul(block, means_t, out=out), repeats)
    return seconds * features.shape[0] / block.shape[0]
