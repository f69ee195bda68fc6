"""Numba kernels for many classes: predictions over class tiles.

On the "features" route (C' > D, e.g. a vocabulary of classes) no C'×C'
matrix exists. Rows are centred, ``h~ = h - mu_G``, and each class tile is
one float32 GEMM; since ``||h - mu_k||^2 = ||h~||^2 - 2 h~.mu~_k + ||mu~_k||^2``,
the nearest centre is the argmin of ``||mu~_k||^2 - 2 h~.mu~_k``, and the
logits are ``W h~ + (W mu_G + b)``. ``fold_smallest`` folds one tile into each
row's few smallest scores, on the worker threads, so memory stays O(rows of a task ×
tile) per thread; ``settle_rows`` then decides the near ties among them in float64.
"""
import numpy as np
from numba import njit, prange

from ncfast.kernels.cpu import (
    FASTMATH, copy_row, exact_logit, exact_sq_distance, near_tie_threshold)


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


#: Smallest scores kept per row over the class tiles: the contenders that
#: ``settle_rows`` decides between in float64. A row with more contenders than this
#: within its threshold (means closer than float32 resolves) is decided over every class.
KEPT_SCORES = 8


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def fold_smallest(products, offsets, scale, tile_start, best_scores, best_indices):
    """Fold one class tile into each row's ``KEPT_SCORES`` smallest scores.

    The score of column k is ``offsets[k] + scale * products[i, k]``: for the
    nearest centre ``||mu~_k||^2 - 2 h~.mu~_k`` (``scale = -2``), for the
    classifier the negated logit ``-(w_c . mu_G + b_c) - w_c . h~`` (``scale = -1``).
    Each row's list stays sorted, a later column after an equal earlier one,
    so its first entry is the first argmin so far.

    Parameters
    ----------
    products : float32 array of shape (n, t), the tile's products with ``h~``
    offsets : float64 array of shape (t,)
    scale : float
    tile_start : int
        Index of the tile's first column among all columns.
    best_scores : float64 array of shape (n, KEPT_SCORES), updated (start at inf)
    best_indices : int64 array of shape (n, KEPT_SCORES), updated
    """
    num_rows, tile_size = products.shape
    last = best_scores.shape[1] - 1
    for i in range(num_rows):
        worst = best_scores[i, last]
        for k in range(tile_size):
            score = offsets[k] + scale * np.float64(products[i, k])
            if score < worst:
                place = last
                while place > 0 and best_scores[i, place - 1] > score:
                    best_scores[i, place] = best_scores[i, place - 1]
                    best_indices[i, place] = best_indices[i, place - 1]
                    place -= 1
                best_scores[i, place] = score
                best_indices[i, place] = tile_start + k
                worst = best_scores[i, last]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def settle_rows(features, rows, reference, bias, nearest, best_scores, best_indices, sq_norms,
                band, out_choices):
    """Each row's first nearest mean or first classifier argmax, in float64 where float32
    cannot decide.

    The contenders of a row are the kept scores within its near-tie threshold
    of the best (``ncfast.plan.near_tie_bands``); no score left out of the list
    can be within it unless the whole list is, and then every column contends.
    A lone contender is the answer; otherwise the contenders' exact scores are
    computed in float64 from the row (``exact_sq_distance`` or the negated
    ``exact_logit``) and the first smallest wins, so the answer depends on
    the row alone, as on the "classes" route (``ncfast.kernels.cpu.epilogue``).

    Parameters
    ----------
    features : array of shape (N, D), float32 or float64
    rows : int64 array of shape (n,), the rows of ``features`` searched
    reference : float64 array of shape (K, D), the present means or ``W``
    bias : float64 array of shape (K,) (unused when ``nearest``)
    nearest : bool
        True: scores of squared distances to ``reference``; False: negated logits.
    best_scores, best_indices : arrays of shape (n, KEPT_SCORES), from ``fold_smallest``
    sq_norms : float64 array of shape (N,), ``||r||^2`` of every row
    band : float64 array of shape (3,)
    out_choices : int64 array of shape (n,), written
    """
    kept = best_scores.shape[1]
    num_columns = reference.shape[0]
    for m in prange(rows.shape[0]):
        i = rows[m]
        best = best_scores[m, 0]
        limit = best + near_tie_threshold(band, sq_norms[i], best)
        contenders = 0
        for place in range(kept):
            if best_scores[m, place] <= limit:
                contenders += 1
        choice = best_indices[m, 0]
        if contenders > 1:
            every_column = contenders == kept and num_columns > kept
            row = np.empty(features.shape[1])
            copy_row(features, i, row)
            smallest = np.inf
            for place in range(num_columns if every_column else contenders):
                k = place if every_column else best_indices[m, place]
                if nearest:
                    value = exact_sq_distance(row, reference, k)
                else:
                    value = -exact_logit(row, reference, bias, k)
                if value < smallest or (value == smallest and k < choice):
                    choice, smallest = k, value
        out_choices[m] = choice
