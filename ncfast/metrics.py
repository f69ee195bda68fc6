"""Metric algebra: NC1–NC4 and friends from finalized pass states.

Inputs are small float64 matrices (C×C, C×D or D×D) and per-class sums; the
formulas are DESIGN.md's table. Every backend shares this file.

Metrics over pairs or rows of class means use the classes that have a mean
(``Geometry.present``); the classifier's argmax and ``bias_collapse`` use all
of its rows. Every C×C quantity is reduced tile by tile from the C×D means,
so none is ever held whole (many classes: C in the tens of thousands).
"""
import numpy as np

from ncfast.geometry import kept_spectrum, pair_sq_distances, symmetric_pinv
from ncfast.kernels.cpu import dense_blas


#: Classes per side of a pair tile: each tile is one (tile × tile) float64 GEMM block.
PAIR_TILE = 2048


def _normalized(matrix):
    return matrix / np.linalg.norm(matrix)


def _std_over_mean(values):
    return float(np.std(values) / np.mean(values))


def _unit_rows(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _pair_blocks(vectors, tile):
    """Blocks of ``vectors @ vectors.T`` that cover each pair a < b exactly once.

    Yields
    ------
    rows, cols : slice
    dots : float64 array of shape (rows, cols)
    pairs : bool array of shape (rows, cols)
        Entries with a < b (all of an off-diagonal block).
    """
    num_rows = vectors.shape[0]
    for row_start in range(0, num_rows, tile):
        rows = slice(row_start, min(row_start + tile, num_rows))
        for col_start in range(row_start, num_rows, tile):
            cols = slice(col_start, min(col_start + tile, num_rows))
            dots = vectors[rows] @ vectors[cols].T
            pairs = np.arange(rows.start, rows.stop)[:, None] < np.arange(cols.start, cols.stop)
            yield rows, cols, dots, pairs


def _pair_count(num_rows):
    return num_rows * (num_rows - 1) // 2


def _cosine_metrics(vectors, tile):
    """Equiangularity, max-angle and hyperspherical energy of the rows of ``vectors``.

    Over pairs a < b of ``cos = u_a . u_b`` (u unit rows), in tiles:
    std of cos (Papyan et al.; two sweeps, so no cancellation), mean of
    ``|cos + 1/(C-1)|`` (Papyan et al.) and mean of ``log 1/||u_a - u_b||``
    (Wu & Papyan), with ``||u_a - u_b||^2 = 2 - 2 cos``.
    """
    units = _unit_rows(vectors)
    num_pairs = _pair_count(units.shape[0])
    ideal = -1.0 / (units.shape[0] - 1)
    cosine_sum = max_angle_sum = energy_sum = 0.0
    for _, _, cosines, pairs in _pair_blocks(units, tile):
        cosines = cosines[pairs]
        cosine_sum += cosines.sum()
        max_angle_sum += np.abs(cosines - ideal).sum()
        with np.errstate(divide="ignore"):
            energy_sum += (-0.5 * np.log(np.maximum(2.0 - 2.0 * cosines, 0.0))).sum()
    cosine_mean = cosine_sum / num_pairs
    squared_deviation = sum(((cosines[pairs] - cosine_mean) ** 2).sum()
                            for _, _, cosines, pairs in _pair_blocks(units, tile))
    return (float(np.sqrt(squared_deviation / num_pairs)), float(max_angle_sum / num_pairs),
            float(energy_sum / num_pairs))


def _angle_metrics(vectors, tile):
    """Equinorm, equiangularity and max-angle of the rows of ``vectors`` (Papyan et al.)."""
    equiangular, max_angle, _ = _cosine_metrics(vectors, tile)
    return _std_over_mean(np.linalg.norm(vectors, axis=1)), equiangular, max_angle


def _product_sq_norm(left, right, tile):
    """``||left right^T||_F^2`` for (C, D) arrays, from the smaller side.

    C×C tiles of the product when C <= D; else the D×D matrices:
    ``sum((left^T left) * (right^T right))``.
    """
    num_rows, num_features = left.shape
    if num_rows > num_features:
        return np.sum((left.T @ left) * (right.T @ right))
    return sum(np.sum((left[row_start:row_start + tile] @ right[col_start:col_start + tile].T)
                      ** 2)
               for row_start in range(0, num_rows, tile)
               for col_start in range(0, num_rows, tile))


def _etf_distance(left, right, tile):
    """``||nrm(left right^T) - E||_F`` in tiles, never forming the C×C product."""
    num_rows = left.shape[0]
    scale = np.sqrt(_product_sq_norm(left, right, tile))
    etf_scale = np.sqrt(num_rows - 1)
    squared_distance = 0.0
    for row_start in range(0, num_rows, tile):
        rows = np.arange(row_start, min(row_start + tile, num_rows))
        for col_start in range(0, num_rows, tile):
            cols = np.arange(col_start, min(col_start + tile, num_rows))
            etf = ((rows[:, None] == cols[None, :]) - 1.0 / num_rows) / etf_scale
            block = left[rows] @ right[cols].T / scale
            squared_distance += ((block - etf) ** 2).sum()
    return float(np.sqrt(squared_distance))


def _orthogonality(uncentred, tile):
    """``||offdiag(nrm(M M^T))||_F`` over pairs, in tiles (Dang et al. 2023)."""
    scale_sq = _product_sq_norm(uncentred, uncentred, tile)
    off_diagonal_sq = sum(2.0 * (dots[pairs] ** 2).sum()
                          for _, _, dots, pairs in _pair_blocks(uncentred, tile))
    return float(np.sqrt(off_diagonal_sq / scale_sq))


def _mean_pair_distance(geometry, tile):
    """Mean over pairs a < b of ``||mu_a - mu_b||``."""
    sq_norms = geometry.centred_sq_norms
    total = sum(np.sqrt(pair_sq_distances(sq_norms[rows], sq_norms[cols], dots)[pairs]).sum()
                for rows, cols, dots, pairs in _pair_blocks(geometry.centred, tile))
    return float(total / _pair_count(sq_norms.size))


def within_class_nc1(geometry, stats, pinv_rtol):
    """NC1 ``Tr(Sigma_W Sigma_B^+)/C`` and ``Tr Sigma_W / Tr Sigma_B``.

    Returns
    -------
    nc1, nc1_trace : float
    rank : int
        Numerical rank of the pseudo-inverted matrix (Gram or Sigma_B).
    condition : float
        Its condition number over the kept eigenvalues.
    """
    num_rows = stats.num_rows
    num_means = geometry.present.size
    if stats.route == "classes":
        # z_i = M~ r_i gives r_i^T Sigma_B^+ r_i = C ||Gram^+ z_i||^2, so
        # nc1 = Tr(Gram^+ S Gram^+) / N with S = sum z z^T (DESIGN.md, pass 2). With
        # Gram = V diag(lambda) V^T that is sum_j (V^T S V)_jj / lambda_j^2 over the kept
        # eigenvalues: only the diagonal of S in the eigenbasis, which pass 2 keeps.
        eigenvalues = geometry.gram_eigenvalues
        keep, rank, condition = kept_spectrum(eigenvalues, pinv_rtol)
        nc1 = np.sum(stats.eigen_scatter[keep] / eigenvalues[keep] ** 2) / num_rows
    else:
        between = geometry.centred.T @ geometry.centred / num_means
        between_pinv, rank, condition = symmetric_pinv(between, pinv_rtol)
        nc1 = np.sum(stats.scatter * between_pinv) / num_rows / num_means
    within_trace = stats.sq_norm_sums.sum() / num_rows
    between_trace = geometry.centred_sq_norms.sum() / num_means
    return float(nc1), float(within_trace / between_trace), rank, condition


def _cdnv(geometry, variances, tile):
    """Mean over class pairs of ``(s_a^2 + s_b^2) / (2 ||mu_a - mu_b||^2)`` (Galanti et al.).

    Pairs run over classes with a mean and with rows in the measured data.
    """
    present_variances = variances[geometry.present]
    measured = np.isfinite(present_variances)
    if measured.sum() < 2:
        return None
    centred = geometry.centred[measured]
    sq_norms = geometry.centred_sq_norms[measured]
    measured_variances = present_variances[measured]
    total = 0.0
    for rows, cols, dots, pairs in _pair_blocks(centred, tile):
        distances = pair_sq_distances(sq_norms[rows], sq_norms[cols], dots)
        variance_sums = measured_variances[rows][:, None] + measured_variances[cols][None, :]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only off the pairs
            total += (variance_sums / (2.0 * distances))[pairs].sum()
    return float(total / _pair_count(centred.shape[0]))


def _per_class(values, counts):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, values / np.maximum(counts, 1), np.nan)


def collapse_metrics(geometry, stats, *, pinv_rtol, tile=PAIR_TILE):
    """Every metric of DESIGN.md's table from a finished pass 2.

    Parameters
    ----------
    geometry : Geometry
    stats : ResidualStats
        Built on ``geometry``; carries the classifier, if any.
    pinv_rtol : float
    tile : int
        Classes per side of a pair tile; results do not depend on it.

    Returns
    -------
    dict
        Scalar metrics (None where not defined: classifier metrics without a
        classifier) and per-class arrays of shape (C,).
    """
    num_means, num_features = geometry.present.size, geometry.num_features
    # About ten C'×D×C' pair-tile products and a min(C', D)-sized eigendecomposition.
    flops = 20.0 * num_means ** 2 * num_features + 10.0 * min(num_means, num_features) ** 3
    with dense_blas(flops):
        return _metrics(geometry, stats, pinv_rtol, tile)


def _metrics(geometry, stats, pinv_rtol, tile):
    """``collapse_metrics`` with BLAS threads already chosen."""
    num_rows = stats.num_rows
    centred = geometry.centred
    nc1, nc1_trace, rank, condition = within_class_nc1(geometry, stats, pinv_rtol)
    variances = _per_class(stats.sq_norm_sums, stats.counts)
    equinorm = _std_over_mean(np.sqrt(geometry.centred_sq_norms))
    equiangular, maxangle, energy = _cosine_metrics(centred, tile)
    uncentred = geometry.means[geometry.present]
    mean_norms = np.full(geometry.num_classes, np.nan)
    mean_norms[geometry.present] = np.sqrt(geometry.centred_sq_norms)
    result = {
        "nc1": nc1,
        "nc1_trace": nc1_trace,
        "cdnv": _cdnv(geometry, variances, tile),
        "nc2_equinorm": equinorm,
        "nc2_equiangular": equiangular,
        "nc2_maxangle": maxangle,
        "nc2_etf": _etf_distance(centred, centred, tile),
        "nc2_orthogonality": _orthogonality(uncentred, tile),
        "gnc2": energy,
        "ncc_accuracy": float(stats.ncc_hits.sum() / num_rows),
        "rank": rank,
        "pinv_condition": condition,
        "route": stats.route,
        "class_counts": stats.counts.copy(),
        "class_variances": variances,
        "class_mean_norms": mean_norms,
        "class_ncc_accuracy": _per_class(stats.ncc_hits, stats.counts),
    }
    classifier_keys = ("nc2_equinorm_w", "nc2_equiangular_w", "nc2_maxangle_w", "nc3",
                       "nc3_etf", "unc3", "nc4", "accuracy", "bias_collapse")
    result.update(dict.fromkeys(classifier_keys))
    result["class_accuracy"] = None
    if stats.weights is not None:
        weights = stats.weights[geometry.present]
        equinorm_w, equiangular_w, maxangle_w = _angle_metrics(weights, tile)
        result.update({
            "nc2_equinorm_w": equinorm_w,
            "nc2_equiangular_w": equiangular_w,
            "nc2_maxangle_w": maxangle_w,
            "nc3": float(np.sum((_normalized(weights) - _normalized(centred)) ** 2)),
            "nc3_etf": _etf_distance(weights, centred, tile),
            "unc3": _std_over_mean(np.einsum("cd,cd->c", weights, centred)),
            "nc4": stats.disagreements / num_rows,
            "accuracy": float(stats.classifier_hits.sum() / num_rows),
            "bias_collapse": float(np.linalg.norm(
                stats.weights @ geometry.global_mean + stats.bias)),
            "class_accuracy": _per_class(stats.classifier_hits, stats.counts),
        })
    return result


def noise_metrics(main_stats, clean_geometry, clean_stats, corrupted_stats, *, pinv_rtol,
                  tile=PAIR_TILE):
    """Memorization–dilation metrics (Nguyen et al. 2023).

    Parameters
    ----------
    main_stats : ResidualStats
        All rows against the noisy-label means, with corrupted rows flagged.
    clean_geometry : Geometry
        Means ``mu^_c`` of the clean rows.
    clean_stats : ResidualStats
        Clean rows against ``clean_geometry``.
    corrupted_stats : ResidualStats
        Corrupted rows, labelled with their true class, against ``clean_geometry``.
    pinv_rtol : float
    tile : int
        Classes per side of a pair tile.

    Returns
    -------
    dict
        ``memorization``, ``memorization_raw``, ``dilation``, ``noise_fit``,
        ``nc1_clean``, ``nc1_trace_clean`` (None where no row defines them).
    """
    scale = _mean_pair_distance(clean_geometry, tile)
    result = dict.fromkeys(("memorization", "memorization_raw", "noise_fit"))
    if main_stats.corrupted_rows > 0:
        result["noise_fit"] = main_stats.corrupted_fits / main_stats.corrupted_rows
    if corrupted_stats.num_rows > 0:
        memorization_raw = corrupted_stats.norm_sums.sum() / corrupted_stats.num_rows
        result["memorization_raw"] = float(memorization_raw)
        result["memorization"] = float(memorization_raw / scale)
    measured = clean_stats.counts > 0
    counts = clean_stats.counts[measured]
    mean_distances = clean_stats.norm_sums[measured] / counts
    # var(d) = E[d^2] - E[d]^2 keeps the state additive; its absolute error is
    # about sqrt(eps) times the mean distance (README, "Metrics").
    distance_variances = clean_stats.sq_norm_sums[measured] / counts - mean_distances ** 2
    result["dilation"] = float(np.mean(np.sqrt(np.maximum(distance_variances, 0.0))) / scale)
    nc1_clean, nc1_trace_clean, _, _ = within_class_nc1(clean_geometry, clean_stats, pinv_rtol)
    result["nc1_clean"] = nc1_clean
    result["nc1_trace_clean"] = nc1_trace_clean
    return result
