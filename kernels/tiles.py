"""Numba kernels for many classes: predictions over class tiles.

On the "features" route (C' > D, e.g. a vocabulary of classes) no C'×C'
matrix exists. Rows are centred, ``h~ = h - mu_G``, and each class tile is
one float32 GEMM; since ``||h - mu_k||^2 = ||h~||^2 - 2 h~.mu~_k + ||mu~_k||^2``,
the nearest centre is the argmin of ``||mu~_k||^2 - 2 h~.mu~_k``, and the
logits are ``W h~ + (W mu_G + b)``. Each kernel folds one tile into a running
best per row, on the worker threads, so memory stays O(rows of a task × tile) per thread.
"""
import numpy as np
from numba import njit, prange

from ncfast.kernels.cpu import FASTMATH


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def centre_rows(features, rows, global_mean, out_centred):
    """``h~ = h - mu_G`` of some rows in float64, stored as float32.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    rows : int64 array of shape (m,), the rows to centre
    global_mean : float64 array of shape (D,)
    out_centred : float32 array of shape (m, D), written: row k is row ``rows[k]`` centred
    """
    num_features = features.shape[1]
    for k in prange(rows.shape[0]):
        i = rows[k]
        for j in range(num_features):
            out_centred[k, j] = features[i, j] - global_mean[j]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def nearest_in_tile(products, mean_sq_norms, tile_start, best_scores, best_rows):
    """Fold one class tile into the running nearest class mean of each row.

    Parameters
    ----------
    products : float32 array of shape (n, t), ``h~ . mu~_k`` for the tile's classes
    mean_sq_norms : float64 array of shape (t,), ``||mu~_k||^2``
    tile_start : int
        Index (among the classes with a mean) of the tile's first class.
    best_scores : float64 array of shape (n,), updated: ``min ||mu~_k||^2 - 2 h~.mu~_k``
    best_rows : int64 array of shape (n,), updated: the argmin's index
    """
    num_rows, tile_size = products.shape
    for i in range(num_rows):
        for k in range(tile_size):
            score = mean_sq_norms[k] - 2.0 * np.float64(products[i, k])
            if score < best_scores[i]:
                best_scores[i] = score
                best_rows[i] = tile_start + k


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def largest_in_tile(products, offsets, tile_start, best_logits, best_classes):
    """Fold one class tile into the running classifier argmax of each row.

    Parameters
    ----------
    products : float32 array of shape (n, t), ``w_c . h~`` for the tile's classes
    offsets : float64 array of shape (t,), ``w_c . mu_G + b_c``
    tile_start : int
        Class of the tile's first column.
    best_logits : float64 array of shape (n,), updated
    best_classes : int64 array of shape (n,), updated: the argmax class
    """
    num_rows, tile_size = products.shape
    for i in range(num_rows):
        for c in range(tile_size):
            logit = np.float64(products[i, c]) + offsets[c]
            if logit > best_logits[i]:
                best_logits[i] = logit
                best_classes[i] = tile_start + c
