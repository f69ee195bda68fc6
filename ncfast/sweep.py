"""The pair sweep: every class-pair metric from one pass over float64 Gram tiles.

The class-pair metrics (cosines of centred means and of classifier rows, the
ETF distances, orthogonality, CDNV, the hyperspherical kernels, the mean pair
distance, each class's nearest other mean; with a classifier, each mean's two
largest logits) are sums, minima or maxima over pairs of classes of functions
of ``mu~_a . mu~_b``, ``w_a . w_b`` and ``w_a . mu~_b``. For tiles of classes
``I <= J`` the sweep computes ``[M~_I; W_I] [M~_J; W_J]^T`` by float64 GEMMs
(one per tile, from a copy of ``M~`` and ``W`` stacked tile by tile; one per
classifier block where the Gram ``M~ M~^T`` is given) and reduces it while it is
in cache (``reduce_tile``); nothing of size C'×C' is ever held. About ``C'^2 D``
flops (four times that with a classifier), each tile computed once.

Written once against an array namespace: the backend (``ncfast.backends``)
supplies ``xp`` (numpy or cupy), ``map_tasks`` (the CPU runs tiles on the pass
worker threads) and ``reduce_tile`` (the CPU's fused Numba kernel
``ncfast.kernels.pairs.reduce_tile``; ``reduce_tile_xp`` here, the same
reduction in array operations, on the GPU).

Exact identities that avoid a second sweep (Zhu et al. 2021's ETF distance
``||G/||G||_F - E||_F`` needs ``||G||_F`` before the tiles are read): with
``s0 = <G, E>``, known from C'×D sums, ``G - s0 E`` is orthogonal to E, so
``||G||_F^2 = s0^2 + P`` with ``P = ||G - s0 E||_F^2`` summed directly over the
tiles, and ``||G - sE||^2 = P + (s - s0)^2`` with ``s - s0 = P / (s + s0)``: every
term positive, no cancellation near collapse.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ncfast.kernels.cpu import dense_blas
from ncfast.kernels.pairs import (CLOSE_SQ_DISTANCE_SHARE, COS, COS_W, DISTANCE, ETF, ETF_W,
                                  ETF_WW, LOG, LOG_INFINITE, MAXANGLE, MAXANGLE_W, PAIRS, RIESZ,
                                  RIESZ_INFINITE, SLOTS, UNCENTRED, UNCENTRED_OFF,
                                  UNIT_SQ_DISTANCE_FLOOR, TileSide)
from ncfast.progress import NO_PROGRESS

#: Classes per side of a CPU pair tile. The tile's GEMMs (``T × D`` by ``D × T``, float64)
#: run faster the larger ``T``: on the 2-core development machine, with four GEMMs a tile
#: (before ``pair_sweep`` stacked them into one), the sweep of 8,000 means and classifier
#: rows at D = 4096 took 10.6-11.2 s with tiles of 256, 9.7 s with 512 and 8.7 s with
#: 1024; at D = 2048 and 4,096 classes 1.47-1.65, 1.38 and 1.34 s. At D = 512 (8,192
#: classes), where the reduction weighs more than the GEMM, 1.63-1.65, 1.57 and 1.69 s:
#: 1024 tiles' 32 MiB of products outgrow the caches. 512 is never the slowest, and keeps
#: at least three tiles, for two threads, from 513 classes on.
PAIR_TILE = 512


class TileGeometry(NamedTuple):
    """What ``reduce_tile`` needs besides the tile's dot products.

    Attributes
    ----------
    row_start, col_start : int
        First class (among the C' with a mean) of the tile's rows and columns.
    means : float64 array of shape (C', D), the uncentred ``M̄``: the distance of two
        close means is taken from their difference (``ncfast.kernels.pairs.pair_sq_distance``)
    mean_norms : float64 array of shape (C',), ``||mu~_a||``
    mean_offsets : float64 array of shape (C',), ``mu~_a . mu_G``: with
        ``global_sq_norm`` they give the uncentred ``mu_a . mu_b``
    global_sq_norm : float, ``||mu_G||^2``
    weight_norms : float64 array of shape (C',) (``||w_a||``), or (0,) without
        a classifier
    global_logits : float64 array of shape (C',), ``w_c . mu_G + b_c``, or (0,)
        when the sweep is not to find the top logits: the logits of mean a are
        ``w_c . mu~_a`` plus these
    etf_scale, etf_scale_w, etf_scale_ww : float
        ``<G, E>`` of ``G = M~ M~^T``, of ``W M~^T`` and of ``W W^T``.
    riesz_exponent : float
        ``s = D - 2`` of the Riesz kernel ``sign(s) ||u_a - u_b||^-s`` (Liu et al. 2023).
    """

    row_start: int
    col_start: int
    means: object
    mean_norms: object
    mean_offsets: object
    global_sq_norm: float
    weight_norms: object
    global_logits: object
    etf_scale: float
    etf_scale_w: float
    etf_scale_ww: float
    riesz_exponent: float


@dataclass(frozen=True)
class PairSweep:
    """Class-pair sums of one set of class means (and classifier rows).

    Attributes
    ----------
    num_means : int
        C', the classes with a mean.
    sums : dict of str to float
        Tile sums (``ncfast.kernels.pairs.SLOTS``), added over the tiles.
    moments : dict of str to (float, float)
        Mean and population variance over pairs a < b of ``cos`` (of centred
        means), ``cos_w`` (of classifier rows), ``log`` and ``riesz`` (kernels
        on the unit centred means), merged over tiles by Chan's formula.
    nearest_sq_distances : float64 array of shape (C',)
        ``min_{b != a} ||mu_a - mu_b||^2`` (host memory).
    cdnv_weights : float64 array of shape (C',)
        ``sum_{b != a} 1 / (2 ||mu_a - mu_b||^2)`` (host memory).
    etf_scale, etf_scale_w, etf_scale_ww : float
        ``<G, E>`` of ``M~ M~^T``, ``W M~^T`` and ``W W^T`` (see the module docstring).
    weight_norms : float64 array of shape (C',), ``||w_a||`` (host memory); (0,)
        without a classifier
    weight_mean_dots : float64 array of shape (C',), ``w_a . mu~_a`` (host
        memory); (0,) without a classifier
    top_logits : float64 array of shape (C', 2), or (0, 2) without global logits
        The largest and second largest logit ``w_c . mu_a + b_c`` of each mean a
        over the classes c with a mean (host memory).
    top_classes : int64 array of shape (C',), or (0,)
        The first of those classes (among the C') with the largest logit.
    mean_weight_products, weight_gram : float64 arrays of shape (C', C'), or None
        ``M~ W^T`` (entry ``[a, c]`` is ``mu~_a . w_c``) and ``W W^T`` (rows of
        the classes with a mean), when the sweep was asked to keep them.
    """

    num_means: int
    sums: dict
    moments: dict
    nearest_sq_distances: np.ndarray
    cdnv_weights: np.ndarray
    etf_scale: float
    etf_scale_w: float
    etf_scale_ww: float
    weight_norms: np.ndarray
    weight_mean_dots: np.ndarray
    top_logits: np.ndarray
    top_classes: np.ndarray
    mean_weight_products: object = None
    weight_gram: object = None

    @property
    def num_pairs(self):
        return self.num_means * (self.num_means - 1) // 2

    def etf_distance(self, of="means"):
        """``||nrm(G) - E||_F`` for ``G = M~ M~^T`` (``of="means"``), ``W M~^T``
        (``"classifier_means"``) or ``W W^T`` (``"classifier"``)."""
        sums_and_scales = {"means": ("etf_residual", self.etf_scale),
                           "classifier_means": ("etf_residual_w", self.etf_scale_w),
                           "classifier": ("etf_residual_ww", self.etf_scale_ww)}
        if of not in sums_and_scales:
            raise ValueError(f"of must be one of {tuple(sums_and_scales)}; found {of!r}")
        name, scale0 = sums_and_scales[of]
        residual = self.sums[name]
        scale = math.sqrt(scale0 * scale0 + residual)
        if scale == 0.0:  # G = 0 (a zero classifier): nrm(G) is undefined
            return math.nan
        gap = residual / (scale + scale0) if scale0 > 0 else scale - scale0
        return math.sqrt((residual + gap * gap) / (scale * scale))

    @property
    def orthogonality(self):
        """``||offdiag(nrm(M M^T))||_F`` of the uncentred means (Dang et al. 2023)."""
        return math.sqrt(self.sums["uncentred_off_sq"] / self.sums["uncentred_sq"])

    @property
    def mean_pair_distance(self):
        return self.sums["distance_sum"] / self.num_pairs


def to_host(array):
    """A numpy array of ``array`` (copied off the GPU for a CuPy array)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def pair_sweep(means, global_mean, weights=None, global_logits=None, *, backend, tile=None,
               centred=None, gram=None, keep_classifier_products=False, alongside=(),
               weight_rows=None, progress=NO_PROGRESS.stage):
    """Sweep every pair of classes once.

    Parameters
    ----------
    means : float64 array of shape (C', D), ``M̄`` (``backend.xp`` array): the class means
    global_mean : float64 array of shape (D,), ``mu_G``
    weights : array of shape (C', D), optional
        Classifier rows of the same classes, in the same order; or, with
        ``weight_rows``, the whole classifier (C rows). Any float dtype: each tile's
        rows are taken in float64.
    global_logits : float64 array of shape (C',), optional
        ``W mu_G + b`` of those rows (with ``weights`` only): the sweep then also
        finds each mean's two largest logits.
    backend : CpuBackend or CudaBackend
        Supplies ``xp``, ``map_tasks``, ``reduce_tile`` and ``pair_tile``.
    tile : int, optional
        Classes per side of a tile (default ``backend.pair_tile``); results do
        not depend on it beyond float64 rounding.
    centred : float64 array of shape (C', D), optional
        ``M~ = M̄ - mu_G`` when the caller holds it (finalize does); else the sweep
        forms it.
    gram : float64 array of shape (C', C'), optional
        ``M~ M~^T`` when already formed (the "classes" route's finalize): its
        tiles are read instead of computed, and only the classifier's blocks
        are multiplied.
    keep_classifier_products : bool
        Also return ``M~ W^T`` and ``W W^T`` whole (C'×C' each; the "classes"
        route, where C' <= D, derives the logit offsets and classifier radii
        from them instead of multiplying again).
    alongside : sequence of callables, optional
        Work of the caller's, run (results discarded) on the backend's worker
        threads before the tiles, which fill the other threads meanwhile: the
        plan's eigendecomposition of the Gram, which LAPACK runs on one thread.
    weight_rows : int array of shape (C',), optional
        The rows of ``weights`` of the sweep's classes, in order (the classes
        with rows, when some have none). The sweep gathers them a tile at a time
        rather than the caller copying them whole: at 32,000 classes of 4096
        features that copy was a 1 GB table beside the sweep's own.
    progress : callable, optional
        ``progress(total=...)`` opens a progress stage of the ``total`` tiles (as
        ``ncfast.progress.StageProgress.stage`` with the rest bound), which each
        tile advances when it is done; none shown by default.

    Returns
    -------
    PairSweep
    """
    xp = backend.xp
    num_means, num_features = means.shape
    tile = tile or backend.pair_tile
    if centred is None:
        centred = means - global_mean
    mean_norms = xp.sqrt(xp.einsum("cd,cd->c", centred, centred))
    mean_total = centred.sum(axis=0)
    etf_norm = math.sqrt(num_means - 1)
    etf_scale = float(mean_norms @ mean_norms - mean_total @ mean_total / num_means) / etf_norm
    starts = range(0, num_means, tile)
    tasks = [(row, col) for row in starts for col in starts if col >= row]

    def gathered_weights(classes):
        """The classifier rows of the classes in slice ``classes``, C-contiguous float64 (a
        view of float64 rows without ``weight_rows``, else a copy)."""
        rows = weights[classes] if weight_rows is None else weights[weight_rows[classes]]
        return xp.ascontiguousarray(rows, dtype=xp.float64)

    # With a classifier and no Gram, every tile multiplies all four blocks: ``stacked``
    # holds ``[M~_I; W_I]`` for each tile I in turn, so that a tile is one GEMM of two
    # contiguous slices (at D = 4096 and 512 classes a side, one thread: 107 ms against
    # 120-125 ms for four GEMMs of one block each), at the cost of one copy of M~ and W.
    stacked = None
    if weights is not None and gram is None:
        stacked = xp.empty((2 * num_means, num_features))
        for start in starts:
            stop = min(start + tile, num_means)
            stacked[2 * start:start + stop] = centred[start:stop]
            stacked[start + stop:2 * stop] = gathered_weights(slice(start, stop))

    def weight_block(classes):
        """The classifier rows of the tile of classes in slice ``classes``: a view of
        ``stacked`` when it holds them (gathered once), else ``gathered_weights``."""
        if stacked is not None:
            return stacked[classes.start + classes.stop:2 * classes.stop]
        return gathered_weights(classes)

    weight_norms, weight_mean_dots, etf_scale_w, etf_scale_ww = xp.zeros(0), xp.zeros(0), 0.0, 0.0
    finds_logits = global_logits is not None
    global_logits = xp.asarray(global_logits) if finds_logits else xp.zeros(0)
    if weights is not None:
        weight_norms, weight_mean_dots = xp.empty(num_means), xp.empty(num_means)
        weight_total = xp.zeros(num_features)
        for start in starts:
            classes = slice(start, min(start + tile, num_means))
            block = weight_block(classes)
            weight_norms[classes] = xp.sqrt(xp.einsum("cd,cd->c", block, block))
            weight_mean_dots[classes] = xp.einsum("cd,cd->c", block, centred[classes])
            weight_total += block.sum(axis=0)
        etf_scale_w = float(weight_mean_dots.sum()
                            - weight_total @ mean_total / num_means) / etf_norm
        etf_scale_ww = float(weight_norms @ weight_norms
                             - weight_total @ weight_total / num_means) / etf_norm
    with dense_blas(2.0 * num_means * num_features):
        mean_offsets = centred @ global_mean
    geometry = TileGeometry(0, 0, means, mean_norms, mean_offsets,
                            float(global_mean @ global_mean), weight_norms, global_logits,
                            etf_scale, etf_scale_w, etf_scale_ww, float(num_features - 2))

    mean_weight_products = weight_gram = None
    if keep_classifier_products and weights is not None:
        mean_weight_products = xp.empty((num_means, num_means))
        weight_gram = xp.empty((num_means, num_means))

    def tile_dots(rows, cols):
        """The tile's dot products: ``[[M~M~, M~W], [WM~, WW]]`` (or ``M~M~`` alone).

        From ``stacked``, one product. With the Gram given, each classifier block is
        its own product into its quarter. On a diagonal tile the lower-left block is
        the transpose of the upper-right one, and ``A @ A.T`` of one array is a
        symmetric product (half the flops).
        """
        diagonal = rows == cols
        if stacked is not None:
            row_block = stacked[2 * rows.start:2 * rows.stop]
            return row_block @ (row_block if diagonal
                                else stacked[2 * cols.start:2 * cols.stop]).T
        row_means = centred[rows]
        col_means = row_means if diagonal else centred[cols]
        mean_dots = gram[rows, cols] if gram is not None else row_means @ col_means.T
        if weights is None:
            return mean_dots
        row_weights = weight_block(rows)
        col_weights = row_weights if diagonal else weight_block(cols)
        num_rows, num_cols = rows.stop - rows.start, cols.stop - cols.start
        dots = xp.empty((2 * num_rows, 2 * num_cols))
        dots[:num_rows, :num_cols] = mean_dots
        dots[:num_rows, num_cols:] = row_means @ col_weights.T
        dots[num_rows:, num_cols:] = row_weights @ col_weights.T
        dots[num_rows:, :num_cols] = (dots[:num_rows, num_cols:].T if diagonal
                                      else row_weights @ col_means.T)
        return dots

    def run(task):
        if task < len(alongside):
            alongside[task]()
            return None
        row_start, col_start = tasks[task - len(alongside)]
        rows = slice(row_start, min(row_start + tile, num_means))
        cols = slice(col_start, min(col_start + tile, num_means))
        dots = tile_dots(rows, cols)
        if weight_gram is not None:  # each task writes its own blocks: no two overlap
            num_rows, num_cols = rows.stop - rows.start, cols.stop - cols.start
            mean_weight_products[rows, cols] = dots[:num_rows, num_cols:]
            weight_gram[rows, cols] = dots[num_rows:, num_cols:]
            if rows != cols:
                mean_weight_products[cols, rows] = dots[num_rows:, :num_cols].T
                weight_gram[cols, rows] = dots[num_rows:, num_cols:].T
        reduced = backend.reduce_tile(
            dots, geometry._replace(row_start=row_start, col_start=col_start),
            rows.stop - rows.start, cols.stop - cols.start)
        tile_done()
        return reduced

    # The stage ends when the tiles are on the host (a GPU's run asynchronously).
    with progress(total=len(tasks)) as tile_done:
        results = backend.map_tasks(run, len(alongside) + len(tasks))[len(alongside):]
        merged = TileSide.empty(num_means, finds_logits, xp)
        for (row_start, col_start), (_, row_side, col_side) in zip(tasks, results):
            _merge_side(xp, merged, row_start, row_side)
            _merge_side(xp, merged, col_start, col_side)
        tile_sums = to_host(xp.stack([result[0] for result in results]))  # synchronize!
    sums = dict(zip(SLOTS, tile_sums.sum(axis=0)))
    moments = {name: _merged_moments(tile_sums, slot, infinite)
               for name, slot, infinite in (("cos", COS, None), ("log", LOG, LOG_INFINITE),
                                            ("riesz", RIESZ, RIESZ_INFINITE),
                                            ("cos_w", COS_W, None))}
    return PairSweep(num_means, sums, moments, to_host(merged.nearest),
                     to_host(merged.inverse), etf_scale, etf_scale_w, etf_scale_ww,
                     to_host(weight_norms),
                     to_host(weight_mean_dots), to_host(merged.top_logits),
                     to_host(merged.top_classes), mean_weight_products, weight_gram)


def _merge_side(xp, merged, start, side):
    """Fold one tile side's per-class results into the sweep's, classes from ``start`` on.

    Each tile side covers its own classes of the other side, so the nearest
    distances take the least, the CDNV weights add, and the top logits merge.
    """
    span = slice(start, start + side.nearest.shape[0])
    merged.nearest[span] = xp.minimum(merged.nearest[span], side.nearest)
    merged.inverse[span] += side.inverse
    if side.top_logits.shape[0] > 0:
        merge_top_logits(xp, merged.top_logits[span], merged.top_classes[span],
                         side.top_logits, side.top_classes)


def top_two_logits(xp, products, offsets):
    """Each row's two largest of ``products + offsets`` and the first column of the largest.

    Parameters
    ----------
    xp : module, numpy or cupy
    products : float64 array of shape (t, u), u >= 1
    offsets : float64 array of shape (u,)

    Returns
    -------
    top_logits : float64 array of shape (t, 2), largest and second largest (-inf for u = 1)
    best_columns : int64 array of shape (t,)
    """
    logits = products + offsets[None, :]
    best_columns = xp.argmax(logits, axis=1)
    rows = xp.arange(logits.shape[0])
    best = logits[rows, best_columns]
    logits[rows, best_columns] = -np.inf
    return xp.stack([best, logits.max(axis=1)], axis=1), best_columns


def merge_top_logits(xp, top_logits, top_classes, other_logits, other_classes):
    """Merge, in place, two largest logits over two disjoint sets of classes.

    The larger best wins, and on a tie the smaller class (a first argmax over
    all classes); the second is the largest of both seconds and the smaller best.

    Parameters
    ----------
    xp : module, numpy or cupy
    top_logits : float64 array of shape (t, 2), updated
    top_classes : int64 array of shape (t,), updated
    other_logits : float64 array of shape (t, 2)
    other_classes : int64 array of shape (t,)
    """
    best, other_best = top_logits[:, 0], other_logits[:, 0]
    other_wins = (other_best > best) | ((other_best == best) & (other_classes < top_classes))
    second = xp.maximum(xp.maximum(top_logits[:, 1], other_logits[:, 1]),
                        xp.minimum(best, other_best))
    top_classes[...] = xp.where(other_wins, other_classes, top_classes)
    top_logits[:, 0] = xp.maximum(best, other_best)
    top_logits[:, 1] = second


def _merged_moments(tile_sums, slot, infinite_slot=None):
    """Mean and population variance of one shifted quantity over all tiles.

    Each tile holds ``(shift, sum(x - shift), sum((x - shift)^2))`` over its
    finite values; tiles are merged in order by Chan et al.'s pairwise update
    of (count, mean, M2). Any infinite value (``infinite_slot`` counts them)
    makes the mean infinite and the variance undefined (NaN), as numpy's. Finite
    values whose squares exceed float64 (a Riesz kernel of nearly coinciding
    means) have an infinite variance. Python floats: an overflow to inf is
    that result, not a warning.
    """
    if infinite_slot is not None and tile_sums[:, infinite_slot].sum() > 0:
        return math.inf, math.nan
    count = mean = second_moment = 0.0
    for row in tile_sums.tolist():
        tile_count = row[PAIRS] - (0.0 if infinite_slot is None else row[infinite_slot])
        if tile_count == 0:
            continue
        shift, shifted_sum, shifted_sq_sum = row[slot], row[slot + 1], row[slot + 2]
        tile_mean = shift + shifted_sum / tile_count
        # (sum d)^2 / n <= sum d^2, so only an overflowed sum of squares overflows here.
        tile_second = math.inf if math.isinf(shifted_sq_sum) else \
            max(shifted_sq_sum - shifted_sum * (shifted_sum / tile_count), 0.0)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * tile_count / total
        # The weight first: it is 0 for the first tile, whose delta may square beyond float64.
        second_moment += tile_second + delta * (count * tile_count / total) * delta
        count = total
    if count == 0:
        return math.nan, math.nan
    return mean, second_moment / count


def reduce_tile_xp(xp, dots, tile, rows, cols):
    """``ncfast.kernels.pairs.reduce_tile`` in array operations (any array namespace).

    Parameters
    ----------
    xp : module, numpy or cupy
    dots : float64 array of shape (rows, cols) or (2 rows, 2 cols)
    tile : TileGeometry
    rows, cols : int

    Returns
    -------
    sums : float64 array of shape (len(SLOTS),)
    row_side, col_side : TileSide
        As ``reduce_tile`` fills them.
    """
    num_means = tile.mean_norms.shape[0]
    row_ids = xp.arange(tile.row_start, tile.row_start + rows)
    col_ids = xp.arange(tile.col_start, tile.col_start + cols)
    same = row_ids[:, None] == col_ids[None, :]
    pairs = row_ids[:, None] < col_ids[None, :]
    # Ordered pairs this tile stands for: 2 for a < b, 1 on the diagonal, 0 below it.
    weight = xp.where(pairs, 2.0, xp.where(same, 1.0, 0.0))
    etf_norm = math.sqrt(num_means - 1)
    etf = (same - 1.0 / num_means) / etf_norm
    ideal = -1.0 / (num_means - 1)
    mm = dots[:rows, :cols]
    row_norms, col_norms = tile.mean_norms[row_ids], tile.mean_norms[col_ids]
    uncentred = (mm + tile.mean_offsets[row_ids][:, None] + tile.mean_offsets[col_ids][None, :]
                 + tile.global_sq_norm)
    sums = xp.zeros(len(SLOTS))
    sums[ETF] = (weight * (mm - tile.etf_scale * etf) ** 2).sum()
    sums[UNCENTRED] = (weight * uncentred ** 2).sum()
    sums[UNCENTRED_OFF] = (2.0 * pairs * uncentred ** 2).sum()
    sq_distances = pair_sq_distances(xp, mm, row_norms ** 2, col_norms ** 2, tile.means,
                                     row_ids, col_ids, pairs)
    cosines = (mm / xp.outer(row_norms, col_norms))[pairs]
    unit_sq_distances = 2.0 - 2.0 * cosines
    # As the compiled kernel: at or below the floor, or NaN (a mean at the global mean, no
    # direction), the pair coincides.
    unit_sq_distances = xp.where(unit_sq_distances > UNIT_SQ_DISTANCE_FLOOR, unit_sq_distances,
                                 0.0)
    with np.errstate(divide="ignore"):
        log_kernel = -0.5 * xp.log(unit_sq_distances)
        inverse = xp.where(pairs, 0.5 / xp.where(pairs, sq_distances, 1.0), 0.0)
    exponent = tile.riesz_exponent
    with np.errstate(over="ignore", invalid="ignore"):
        riesz = xp.ones_like(log_kernel) if exponent == 0 else \
            math.copysign(1.0, exponent) * xp.exp(exponent * log_kernel)
    sums[PAIRS] = cosines.size
    sums[LOG_INFINITE] = xp.isinf(log_kernel).sum()
    sums[RIESZ_INFINITE] = xp.isinf(riesz).sum()
    for slot, values in ((COS, cosines), (LOG, log_kernel[xp.isfinite(log_kernel)]),
                         (RIESZ, riesz[xp.isfinite(riesz)])):
        _shifted_sums(sums, slot, values)
    sums[MAXANGLE] = xp.abs(cosines - ideal).sum()
    sums[DISTANCE] = xp.sqrt(sq_distances[pairs]).sum()
    off_pair_distances = xp.where(pairs, sq_distances, np.inf)
    no_logits = TileSide.empty(0, False, xp)
    row_logits = col_logits = no_logits.top_logits, no_logits.top_classes
    if tile.global_logits.shape[0] > 0:
        top, best_columns = top_two_logits(xp, dots[:rows, cols:], tile.global_logits[col_ids])
        row_logits = top, best_columns + tile.col_start
        if tile.row_start != tile.col_start:  # the diagonal's M~W block has every pair
            top, best_columns = top_two_logits(xp, dots[rows:, :cols].T,
                                               tile.global_logits[row_ids])
            col_logits = top, best_columns + tile.row_start
    row_side = TileSide(off_pair_distances.min(axis=1), inverse.sum(axis=1), *row_logits)
    col_side = TileSide(off_pair_distances.min(axis=0), inverse.sum(axis=0), *col_logits)
    if tile.weight_norms.shape[0] > 0:
        ww = dots[rows:, cols:]
        cosines_w = (ww / xp.outer(tile.weight_norms[row_ids], tile.weight_norms[col_ids]))[pairs]
        _shifted_sums(sums, COS_W, cosines_w)
        sums[MAXANGLE_W] = xp.abs(cosines_w - ideal).sum()
        residual_w = ((dots[rows:, :cols] - tile.etf_scale_w * etf) ** 2).sum()
        if tile.row_start != tile.col_start:
            residual_w += ((dots[:rows, cols:] - tile.etf_scale_w * etf) ** 2).sum()
        sums[ETF_W] = residual_w
        sums[ETF_WW] = (weight * (ww - tile.etf_scale_ww * etf) ** 2).sum()
    return sums, row_side, col_side


#: Pairs whose means' differences ``pair_sq_distances`` forms at once (bounds its scratch).
_CLOSE_PAIRS_STEP = 4096


def pair_sq_distances(xp, dots, row_sq_norms, col_sq_norms, means, row_ids, col_ids, mask):
    """``||mu~_a - mu~_b||^2`` for rows ``a`` and columns ``b`` of a block of Gram entries
    ``dots``: ``ncfast.kernels.pairs.pair_sq_distance`` in array operations (close pairs
    from the means' difference), for the entries where ``mask`` holds (the others from the
    Gram entries alone).

    Parameters
    ----------
    xp : module, numpy or cupy
    dots : float64 array of shape (r, c), ``M~_rows M~_cols^T``
    row_sq_norms, col_sq_norms : float64 arrays of shape (r,), (c,)
    means : float64 array of shape (C', D), the uncentred class means
    row_ids, col_ids : int arrays of shape (r,), (c,), rows of ``means``
    mask : bool array of shape (r, c)

    Returns
    -------
    float64 array of shape (r, c), never negative
    """
    sq_norm_sums = row_sq_norms[:, None] + col_sq_norms[None, :]
    sq_distances = sq_norm_sums - 2.0 * dots
    rows, cols = xp.nonzero(mask & (sq_distances < CLOSE_SQ_DISTANCE_SHARE * sq_norm_sums))
    for start in range(0, int(rows.size), _CLOSE_PAIRS_STEP):
        part = slice(start, start + _CLOSE_PAIRS_STEP)
        differences = means[row_ids[rows[part]]] - means[col_ids[cols[part]]]
        sq_distances[rows[part], cols[part]] = xp.einsum("pd,pd->p", differences, differences)
    return xp.maximum(sq_distances, 0.0)


def _shifted_sums(sums, slot, values):
    """Fill ``(shift, sum(x - shift), sum((x - shift)^2))`` with the first value as shift."""
    if values.size == 0:
        return
    shifted = values - values[0]
    sums[slot] = values[0]
    sums[slot + 1] = shifted.sum()
    with np.errstate(over="ignore"):  # squares beyond float64: an infinite variance
        sums[slot + 2] = (shifted * shifted).sum()


def cdnv(sweep, centred, means, variances, xp):
    """Mean over class pairs of ``(s_a^2 + s_b^2) / (2 ||mu_a - mu_b||^2)`` (Galanti et al.).

    By symmetry the sum over pairs is ``sum_a s_a^2 K_a`` with ``K_a`` the
    sweep's ``cdnv_weights``. Pairs run over classes with rows in the measured
    data: classes with a mean but no rows (held-out data) are taken out of
    ``K`` by one small GEMM against the measured classes, and a class whose
    ``K_a`` that would take more than half of is summed again over the measured
    classes alone (a difference of nearly equal sums would keep only their rounding).

    Parameters
    ----------
    sweep : PairSweep
    centred, means : float64 arrays of shape (C', D), ``M~`` and ``M̄`` (``xp`` arrays)
    variances : float64 array of shape (C',), host; NaN for classes without rows

    Returns
    -------
    float or None
        None when fewer than two classes have rows.
    """
    measured = np.isfinite(variances)
    num_measured = int(measured.sum())
    if num_measured < 2:
        return None
    weights = sweep.cdnv_weights[measured]
    if num_measured < variances.size:
        kept = np.flatnonzero(measured)
        sq_norms = xp.einsum("cd,cd->c", centred, centred)
        removed = _inverse_sums(xp, centred, means, sq_norms, kept, np.flatnonzero(~measured))
        remade = ~np.isfinite(removed) | ~(removed <= 0.5 * weights)
        with np.errstate(invalid="ignore"):  # inf - inf: remade
            weights = weights - removed
        if remade.any():
            weights[remade] = _inverse_sums(xp, centred, means, sq_norms, kept[remade], kept)
    with np.errstate(invalid="ignore"):
        total = float(variances[measured] @ weights)
    return total / (num_measured * (num_measured - 1) // 2)


#: Entries of ``_inverse_sums``' blocks of squared distances (bounds its scratch).
_INVERSE_BLOCK = 1 << 22


def _inverse_sums(xp, centred, means, sq_norms, rows, cols):
    """``sum_{b in cols, b != a} 1 / (2 ||mu~_a - mu~_b||^2)`` for each class ``a`` of ``rows``.

    Parameters
    ----------
    xp : module
    centred, means : float64 arrays of shape (C', D), ``M~`` and ``M̄``
    sq_norms : float64 array of shape (C',), ``||mu~_a||^2``
    rows, cols : int64 arrays (host) of indices into ``centred``

    Returns
    -------
    float64 array of shape (len(rows),), host
    """
    sums = np.zeros(rows.size)
    col_ids = xp.asarray(cols)
    step = max(1, _INVERSE_BLOCK // max(cols.size, 1))
    for start in range(0, rows.size, step):
        block = rows[start:start + step]
        row_ids = xp.asarray(block)
        others = xp.asarray(block[:, None] != cols[None, :])
        with dense_blas(2.0 * block.size * cols.size * centred.shape[1]):
            dots = centred[row_ids] @ centred[col_ids].T
        sq_distances = pair_sq_distances(xp, dots, sq_norms[row_ids], sq_norms[col_ids],
                                         means, row_ids, col_ids, others)
        with np.errstate(divide="ignore"):
            inverse = xp.where(others, 0.5 / xp.where(others, sq_distances, 1.0), 0.0)
        sums[start:start + block.size] = to_host(inverse.sum(axis=1))
    return sums
