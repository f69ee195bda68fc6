"""Numba kernels over pairs of classes: the pair sweep's tiles and the classifier radii.

``ncfast.sweep`` computes, per tile pair ``I <= J`` of classes, the float64 products
``[M~_I; W_I] [M~_J; W_J]^T`` and hands them here. ``reduce_tile`` turns their
entries into the sums every class-pair metric needs (``SLOTS`` names them)
and per-class minima, sums and top logits (``TileSide``), in one read of the
tile. ``ncfast.sweep`` has the same reduction in array-namespace form
(``reduce_tile_xp``), which the CUDA backend runs and the tests compare
against this one.

``classifier_sq_radii`` reduces the (class mean, class) logit gaps of the pass-2
plan (``ncfast.plan.classifier_radii``) in one read.
"""
import math
from typing import NamedTuple

import numpy as np
from numba import njit

from ncfast.kernels.cpu import FASTMATH, FLOAT64_MAX, finite

#: Names of the entries of a tile's sums vector, in order.
SLOTS = (
    "pairs",            # pairs a < b in the tile
    "cos_shift", "cos_sum", "cos_sq_sum",          # cos(mu~_a, mu~_b) - shift, and squared
    "maxangle_sum",     # |cos + 1/(C'-1)|
    "log_shift", "log_sum", "log_sq_sum",          # log kernel -log ||u_a - u_b||
    "riesz_shift", "riesz_sum", "riesz_sq_sum",    # Riesz kernel sign(s) ||u_a - u_b||^-s
    "distance_sum",     # ||mu_a - mu_b||
    "etf_residual",     # sum over ordered pairs of (G_ab - etf_scale E_ab)^2, G = M~ M~^T
    "uncentred_off_sq",  # sum over ordered pairs a != b of (mu_a . mu_b)^2
    "uncentred_sq",     # the same with a = b included
    "cos_w_shift", "cos_w_sum", "cos_w_sq_sum",    # cos(w_a, w_b)
    "maxangle_w_sum",
    "etf_residual_w",   # sum over ordered pairs of (w_a . mu~_b - etf_scale_w E_ab)^2
    "etf_residual_ww",  # sum over ordered pairs of (w_a . w_b - etf_scale_ww E_ab)^2
    "log_infinite",     # pairs whose log kernel is +inf (coinciding unit means), not in its sums
    "riesz_infinite",   # pairs whose Riesz kernel is +inf (coinciding, or beyond float64)
)
SLOT = {name: index for index, name in enumerate(SLOTS)}

#: Squared distances between unit class means at or below this are rounding, not
#: geometry: from a Gram entry, ``2 - 2 cos`` carries an absolute error of a few
#: float64 eps, so such pairs count as coinciding (an infinite log kernel).
UNIT_SQ_DISTANCE_FLOOR = 16 * np.finfo(np.float64).eps

#: Squared distances between centred means below this share of ``||mu~_a||^2 + ||mu~_b||^2``
#: are taken from the means' difference, not from the Gram entry: ``||a||^2 + ||b||^2 -
#: 2 a.b`` carries an absolute error of a few float64 eps of that sum (more for long
#: GEMM dot products), which 1 / d^2 (CDNV) would magnify without bound as two means
#: close in. Beyond the share it costs at most about 1e-13 of d^2 (times the dot
#: product's length in eps, at worst); pairs this close are rare, each costs D flops.
CLOSE_SQ_DISTANCE_SHARE = 1e-2

# The kernels' logarithm, without calls so that its loops vectorize (with
# error_model="numpy": Numba's default checks every division for zero, a branch
# that stops vectorization): Numba's
# ``math.log`` is a libm call per value (no SVML in llvmlite's wheels), which
# cost more than the tile's GEMM. ``x = m 2^e`` from the bits of x, then
# ``log m = 2 atanh((m - 1) / (m + 1))`` by its series for m in [sqrt(1/2), sqrt(2)):
# twelve terms leave a relative error below 1e-16 (|s| <= 0.172).
_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_MANTISSA_BITS = 0x000FFFFFFFFFFFFF
_ONE_BITS = 0x3FF0000000000000
_TWO_52 = 2.0 ** 52
_TWO_52_BITS = 0x4330000000000000  # the bits of 2^52: 2^52 + e for e < 2^52 in its mantissa


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def logs(values, out, scratch):
    """``out[j] = log(values[j])`` for positive normal float64 values (vectorized loops).

    Integer operations only on the bits (AVX2 has no int64-to-double conversion):
    the biased exponent is turned into a double by ``2^52 + e`` bit patterns.

    Parameters
    ----------
    values : float64 array of shape (n,), C-contiguous
    out : float64 array of shape (n,), written
    scratch : float64 array of shape (n,), overwritten
    """
    bits = values.view(np.int64)
    exponent_bits = out.view(np.int64)
    mantissa_bits = scratch.view(np.int64)
    for j in range(values.shape[0]):
        exponent_bits[j] = ((bits[j] >> 52) & 0x7FF) | _TWO_52_BITS
        mantissa_bits[j] = (bits[j] & _MANTISSA_BITS) | _ONE_BITS
    for j in range(values.shape[0]):
        exponent = out[j] - (_TWO_52 + 1023.0)
        mantissa = scratch[j]
        large = mantissa > _SQRT2
        mantissa = mantissa * 0.5 if large else mantissa
        exponent = exponent + 1.0 if large else exponent
        s = (mantissa - 1.0) / (mantissa + 1.0)
        z = s * s
        series = ((((((((((1.0 / 23.0 * z + 1.0 / 21.0) * z + 1.0 / 19.0) * z + 1.0 / 17.0)
                        * z + 1.0 / 15.0) * z + 1.0 / 13.0) * z + 1.0 / 11.0) * z + 1.0 / 9.0)
                     * z + 1.0 / 7.0) * z + 1.0 / 5.0) * z + 1.0 / 3.0) * z + 1.0
        out[j] = exponent * _LN2 + 2.0 * s * series


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def riesz_values(unit_sq_distances, exponent, out, scratch):
    """``sign(s) ||u_a - u_b||^-s`` from squared unit distances, s = ``exponent`` (D - 2),
    by repeated squaring of ``1 / d^2`` (vectorized loops; inf where it overflows).

    Parameters
    ----------
    unit_sq_distances : float64 array of shape (n,), ``||u_a - u_b||^2`` (0 allowed)
    exponent : float, an integer value >= -1
    out, scratch : float64 arrays of shape (n,), written
    """
    count = unit_sq_distances.shape[0]
    if exponent < 0:  # D = 1: s = -1, the kernel is -d
        for j in range(count):
            out[j] = -math.sqrt(unit_sq_distances[j])
        return
    power = int(exponent) // 2
    for j in range(count):
        scratch[j] = 1.0 / unit_sq_distances[j]
    if int(exponent) % 2:
        for j in range(count):
            out[j] = math.sqrt(scratch[j])
    else:
        out[:] = 1.0
    while power > 0:
        if power & 1:
            for j in range(count):
                out[j] *= scratch[j]
        power >>= 1
        if power > 0:
            for j in range(count):
                scratch[j] *= scratch[j]


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def pair_sq_distance(dot, sq_norm_sum, means, a, b):
    """``||mu_a - mu_b||^2`` from the Gram entry ``dot = mu~_a . mu~_b`` and ``sq_norm_sum =
    ||mu~_a||^2 + ||mu~_b||^2`` of the centred means, or, when below
    ``CLOSE_SQ_DISTANCE_SHARE`` of ``sq_norm_sum``, from the rows ``a, b`` of the
    uncentred ``means`` (whose difference is exact when they are close); never negative."""
    sq_distance = sq_norm_sum - 2.0 * dot
    if sq_distance < CLOSE_SQ_DISTANCE_SHARE * sq_norm_sum:
        sq_distance = 0.0
        for k in range(means.shape[1]):
            difference = means[a, k] - means[b, k]
            sq_distance += difference * difference
    return max(sq_distance, 0.0)


class TileSide(NamedTuple):
    """Per-class results of one side (the rows or the columns) of a sweep tile.

    Attributes
    ----------
    nearest : float64 array of shape (t,), inf, updated
        Least ``||mu_a - mu_b||^2`` over the other classes of the tile.
    inverse : float64 array of shape (t,), zeros, updated
        Sum over the other classes of the tile of ``1 / (2 ||mu_a - mu_b||^2)``
        (CDNV's class weights).
    top_logits : float64 array of shape (t, 2), -inf, updated
        When the sweep is given global logits, the largest and second largest of
        the logits ``w_c . mu~_a + global_logits[c]`` of mean a over the tile's
        other side's classes c (equal when two classes tie); (0, 2) otherwise.
    top_classes : int64 array of shape (t,), updated
        The first class (among the C' with a mean) of the largest logit.
    """

    nearest: np.ndarray
    inverse: np.ndarray
    top_logits: np.ndarray
    top_classes: np.ndarray

    @classmethod
    def empty(cls, size, logits, xp=np):
        """A side of ``size`` classes before any tile: inf, zeros, -inf, -1 (``xp`` arrays);
        without ``logits``, no rows of top logits."""
        logit_rows = size if logits else 0
        return cls(xp.full(size, np.inf), xp.zeros(size), xp.full((logit_rows, 2), -np.inf),
                   xp.full(logit_rows, -1, np.int64))


# Where each sum starts (a shifted sum takes three entries: shift, sum, sum of squares).
PAIRS, COS, MAXANGLE, LOG, RIESZ, DISTANCE, ETF, UNCENTRED_OFF, UNCENTRED, COS_W, \
    MAXANGLE_W, ETF_W, ETF_WW, LOG_INFINITE, RIESZ_INFINITE = (SLOT[name] for name in (
        "pairs", "cos_shift", "maxangle_sum", "log_shift", "riesz_shift", "distance_sum",
        "etf_residual", "uncentred_off_sq", "uncentred_sq", "cos_w_shift", "maxangle_w_sum",
        "etf_residual_w", "etf_residual_ww", "log_infinite", "riesz_infinite"))


# error_model="numpy": a class mean at the global mean gives NaN cosines (as numpy's
# division does in the textbook route), not an exception.
@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def reduce_tile(dots, tile, out, row_side, col_side):
    """Reduce one tile of class-pair dot products.

    Parameters
    ----------
    dots : float64 array of shape (t_I, t_J), or (2 t_I, 2 t_J) with a classifier
        ``M~_I M~_J^T``; with a classifier the blocks ``[[M~M~, M~W], [WM~, WW]]``.
    tile : ``ncfast.sweep.TileGeometry``
        Offsets, sizes and the per-class vectors of the sweep.
    out : float64 array of shape (len(SLOTS),), zeros, written
    row_side, col_side : TileSide
        Of the t_I classes of the rows and the t_J of the columns (``TileSide.empty``).

    Each shifted sum (cosines, kernels) is taken about the tile's first pair's
    value: the values of one tile are close, so the sums of squares do not cancel.
    Per row, loops without calls (vectorized): products, then the kernels.
    """
    row_start, col_start = tile.row_start, tile.col_start
    row_nearest, col_nearest = row_side.nearest, col_side.nearest
    row_inverse, col_inverse = row_side.inverse, col_side.inverse
    rows, cols = row_nearest.shape[0], col_nearest.shape[0]
    diagonal = row_start == col_start
    num_means = tile.mean_norms.shape[0]
    ideal = -1.0 / (num_means - 1)
    etf_diagonal = (1.0 - 1.0 / num_means) / math.sqrt(num_means - 1)
    etf_off = -1.0 / num_means / math.sqrt(num_means - 1)
    exponent = tile.riesz_exponent
    sign = 1.0 if exponent >= 0 else -1.0
    has_w = tile.weight_norms.shape[0] > 0
    col_norms = tile.mean_norms[col_start:col_start + cols]
    col_sq_norms = col_norms ** 2
    col_offsets = tile.mean_offsets[col_start:col_start + cols] + tile.global_sq_norm
    unit_sq_distances = np.empty(cols)
    log_values, riesz_buffer, scratch = np.empty(cols), np.empty(cols), np.empty(cols)

    # Shifts: the values of the tile's first pair.
    first_row, first_col = 0, 1 if diagonal else 0
    if first_col >= cols:
        first_row = rows  # a 1×1 diagonal tile has no pair
    cos_shift = log_shift = riesz_shift = cos_w_shift = 0.0
    if first_row < rows:
        cos_shift = dots[0, first_col] / (tile.mean_norms[row_start]
                                          * tile.mean_norms[col_start + first_col])
        unit_sq_distance = 2.0 - 2.0 * cos_shift
        if unit_sq_distance > UNIT_SQ_DISTANCE_FLOOR:
            log_shift = -0.5 * math.log(unit_sq_distance)
            riesz_shift = sign * math.exp(exponent * log_shift)
        if not finite(riesz_shift):
            riesz_shift = 0.0
        if has_w:
            cos_w_shift = dots[rows, cols + first_col] / (
                tile.weight_norms[row_start] * tile.weight_norms[col_start + first_col])

    pairs = cos_sum = cos_sq_sum = maxangle_sum = log_sum = log_sq_sum = 0.0
    riesz_sum = riesz_sq_sum = distance_sum = etf_sum = uncentred_off = uncentred = 0.0
    log_infinite = riesz_infinite = 0.0
    for i in range(rows):
        a = row_start + i
        norm_a = tile.mean_norms[a]
        sq_a = norm_a * norm_a
        offset_a = tile.mean_offsets[a]
        j_first = 0
        if diagonal:
            dot = dots[i, i]
            residual = dot - tile.etf_scale * etf_diagonal
            etf_sum += residual * residual
            uncentred += (dot + offset_a + col_offsets[i]) ** 2
            j_first = i + 1
        nearest = row_nearest[i]
        inverse_sum = 0.0
        for j in range(j_first, cols):
            dot = dots[i, j]
            residual = dot - tile.etf_scale * etf_off
            etf_sum += 2.0 * residual * residual
            product = dot + offset_a + col_offsets[j]
            uncentred_off += 2.0 * product * product
            sq_distance = pair_sq_distance(dot, sq_a + col_sq_norms[j], tile.means, a,
                                           col_start + j)
            # A division, not products of inverse norms: collinear means then give
            # cosines of exactly +-1, as unit vectors do.
            cosine = dot / (norm_a * col_norms[j])
            unit_sq_distance = 2.0 - 2.0 * cosine
            unit_sq_distances[j] = unit_sq_distance if unit_sq_distance > UNIT_SQ_DISTANCE_FLOOR \
                else 0.0
            cos_sum += cosine - cos_shift
            cos_sq_sum += (cosine - cos_shift) ** 2
            maxangle_sum += abs(cosine - ideal)
            distance_sum += math.sqrt(sq_distance)
            inverse = 0.5 / sq_distance
            inverse_sum += inverse
            col_inverse[j] += inverse
            nearest = min(nearest, sq_distance)
            col_nearest[j] = min(col_nearest[j], sq_distance)
        row_nearest[i] = nearest
        row_inverse[i] += inverse_sum
        pairs += cols - j_first
        # The kernels of the row's unit distances: call-free loops that vectorize.
        count = cols - j_first
        distances = unit_sq_distances[j_first:]
        logs(distances, log_values[:count], scratch[:count])
        riesz_values(distances, exponent, riesz_buffer[:count], scratch[:count])
        for k in range(count):
            coinciding = distances[k] == 0.0
            log_kernel = -0.5 * log_values[k]
            shifted = 0.0 if coinciding else log_kernel - log_shift
            log_sum += shifted
            log_sq_sum += shifted * shifted
            log_infinite += 1.0 if coinciding else 0.0
            riesz = riesz_buffer[k]
            overflow = not abs(riesz) <= FLOAT64_MAX
            shifted = 0.0 if overflow else riesz - riesz_shift
            riesz_sum += shifted
            riesz_sq_sum += shifted * shifted
            riesz_infinite += 1.0 if overflow else 0.0
    out[PAIRS] = pairs
    out[COS], out[COS + 1], out[COS + 2] = cos_shift, cos_sum, cos_sq_sum
    out[MAXANGLE] = maxangle_sum
    out[LOG], out[LOG + 1], out[LOG + 2] = log_shift, log_sum, log_sq_sum
    out[RIESZ], out[RIESZ + 1], out[RIESZ + 2] = riesz_shift, riesz_sum, riesz_sq_sum
    out[DISTANCE] = distance_sum
    out[ETF] = etf_sum
    out[UNCENTRED_OFF] = uncentred_off
    out[UNCENTRED] = uncentred + uncentred_off
    out[LOG_INFINITE], out[RIESZ_INFINITE] = log_infinite, riesz_infinite
    if has_w:
        _reduce_classifier_blocks(dots, tile, rows, cols, diagonal, ideal, etf_diagonal,
                                  etf_off, cos_w_shift, out)
    if tile.global_logits.shape[0] > 0:
        _top_logits(dots[:rows, cols:], tile.global_logits[col_start:col_start + cols],
                    col_start, row_side)
        if not diagonal:  # on the diagonal the M~W block holds every (mean, class) pair
            _top_logits(dots[rows:, :cols].T, tile.global_logits[row_start:row_start + rows],
                        row_start, col_side)


@njit(nogil=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _reduce_classifier_blocks(dots, tile, rows, cols, diagonal, ideal, etf_diagonal, etf_off,
                              cos_w_shift, out):
    """The classifier's part of ``reduce_tile``: over the WW block, cosines of ``w_a, w_b``
    over pairs a < b and ``(w_a . w_b - etf_scale_ww E_ab)^2`` over ordered pairs; and
    ``(w_a . mu~_b - etf_scale_w E_ab)^2`` over ordered pairs: the WM~ block, and off the
    diagonal the M~W block (``w_b . mu~_a``) too."""
    row_start, col_start = tile.row_start, tile.col_start
    col_norms = tile.weight_norms[col_start:col_start + cols]
    cos_sum = cos_sq_sum = maxangle_sum = etf_sum = etf_weight_sum = 0.0
    scaled_off = tile.etf_scale_w * etf_off
    scaled_diagonal = tile.etf_scale_w * etf_diagonal
    weight_off = tile.etf_scale_ww * etf_off
    for i in range(rows):
        norm_a = tile.weight_norms[row_start + i]
        if diagonal:  # the pair a = b once; each pair a < b stands for two ordered pairs
            residual = dots[rows + i, cols + i] - tile.etf_scale_ww * etf_diagonal
            etf_weight_sum += residual * residual
        j_first = i + 1 if diagonal else 0
        for j in range(j_first, cols):
            dot = dots[rows + i, cols + j]
            cosine = dot / (norm_a * col_norms[j])
            cos_sum += cosine - cos_w_shift
            cos_sq_sum += (cosine - cos_w_shift) ** 2
            maxangle_sum += abs(cosine - ideal)
            etf_weight_sum += 2.0 * (dot - weight_off) ** 2
        for j in range(cols):
            scaled = scaled_diagonal if diagonal and j == i else scaled_off
            residual = dots[rows + i, j] - scaled
            etf_sum += residual * residual
        if not diagonal:
            for j in range(cols):
                residual = dots[i, cols + j] - scaled_off
                etf_sum += residual * residual
    out[COS_W], out[COS_W + 1], out[COS_W + 2] = cos_w_shift, cos_sum, cos_sq_sum
    out[MAXANGLE_W] = maxangle_sum
    out[ETF_W] = etf_sum
    out[ETF_WW] = etf_weight_sum


@njit(nogil=True, cache=True)
def _top_logits(mean_weight_dots, global_logits, first_class, side):
    """Fold ``mean_weight_dots[i, j] + global_logits[j]`` (mean i, class ``first_class + j``)
    into each mean's two largest logits and first argmax (classes in ascending order)."""
    for i in range(mean_weight_dots.shape[0]):
        best, second = side.top_logits[i, 0], side.top_logits[i, 1]
        best_class = side.top_classes[i]
        for j in range(mean_weight_dots.shape[1]):
            logit = mean_weight_dots[i, j] + global_logits[j]
            if logit > best:
                best, second, best_class = logit, best, first_class + j
            elif logit > second:
                second = logit
        side.top_logits[i, 0], side.top_logits[i, 1] = best, second
        side.top_classes[i] = best_class


@njit(nogil=True, cache=True)
def classifier_sq_radii(logit_offsets, mean_predictions, weight_products, product_rows,
                        weight_sq_norms, mean_norms, rounding_rtol, fraction, out):
    """Squared classifier radii of the class means (``ncfast.plan.classifier_radii``).

    For mean a with prediction ``c* = mean_predictions[a]``, the radius is the least over
    classes ``c != c*`` of the logit gap over the weight-row distance (Cauchy-Schwarz),
    the gap shrunk and the squared distance grown by their float64 rounding::

        gap = max(L[a, c*] - L[a, c] - rtol (|L[a, c*]| + |L[a, c]|
                                             + (||w_c*|| + ||w_c||) ||mu_a||), 0)
        sq_distance = max(||w_c*||^2 + ||w_c||^2 - 2 w_c* . w_c, 0)
                      + rtol (||w_c*||^2 + ||w_c||^2)

    skipping classes at distance 0; ``out[a] = (fraction * least ratio)^2``, inf when
    no class is left.

    Parameters
    ----------
    logit_offsets : float64 array of shape (C', C), ``L[a] = W mu_a + b``
    mean_predictions : int64 array of shape (C',), first argmax of each row of ``L``
    weight_products : float64 array of shape (k, C)
        Row ``product_rows[a]`` holds ``w_c* . w_c`` for every c.
    product_rows : int64 array of shape (C',)
    weight_sq_norms : float64 array of shape (C,), ``||w_c||^2``
    mean_norms : float64 array of shape (C',), ``||mu_a||``
    rounding_rtol, fraction : float
    out : float64 array of shape (C',), written
    """
    num_logits = logit_offsets.shape[1]
    weight_norms = np.sqrt(weight_sq_norms)
    for a in range(logit_offsets.shape[0]):
        best_class = mean_predictions[a]
        best = logit_offsets[a, best_class]
        best_sq_norm = weight_sq_norms[best_class]
        best_norm = weight_norms[best_class]
        products = weight_products[product_rows[a]]
        least = np.inf
        for c in range(num_logits):
            logit = logit_offsets[a, c]
            rounding = rounding_rtol * (abs(best) + abs(logit)
                                        + (best_norm + weight_norms[c]) * mean_norms[a])
            gap = max(best - logit - rounding, 0.0)
            sq_norm_sum = best_sq_norm + weight_sq_norms[c]
            sq_distance = (max(sq_norm_sum - 2.0 * products[c], 0.0)
                           + rounding_rtol * sq_norm_sum)
            if c != best_class and sq_distance > 0.0:
                least = min(least, gap / math.sqrt(sq_distance))
        out[a] = (fraction * least) ** 2
