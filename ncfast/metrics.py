"""Metric algebra: NC1–NC4 and friends from finalized pass states.

Inputs are small float64 matrices (C×C, C×D or D×D) and per-class sums; the
formulas are DESIGN.md's table. Every backend shares this file.

Metrics over pairs or rows of class means use the classes that have a mean
(``Geometry.present``); the classifier's argmax and ``bias_collapse`` use all
of its rows.
"""
import numpy as np

from ncfast.geometry import symmetric_pinv


def simplex_etf_gram(num_classes):
    """``E = (I - 11^T/C) / sqrt(C - 1)``: the simplex-ETF Gram of unit Frobenius norm."""
    return (np.eye(num_classes) - 1.0 / num_classes) / np.sqrt(num_classes - 1)


def _normalized(matrix):
    return matrix / np.linalg.norm(matrix)


def _std_over_mean(values):
    return float(np.std(values) / np.mean(values))


def _off_diagonal(matrix):
    return matrix[~np.eye(matrix.shape[0], dtype=bool)]


def _cosines(vectors):
    gram = vectors @ vectors.T
    norms = np.sqrt(np.diag(gram))
    return gram / np.outer(norms, norms)


def _angle_metrics(vectors):
    """Equinorm, equiangularity and max-angle of the rows of ``vectors`` (Papyan et al.)."""
    num_rows = vectors.shape[0]
    cosines = _off_diagonal(_cosines(vectors))
    return (_std_over_mean(np.linalg.norm(vectors, axis=1)),
            float(np.std(cosines)),
            float(np.mean(np.abs(cosines + 1.0 / (num_rows - 1)))))


def _upper_pairs(matrix):
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


def within_class_nc1(geometry, stats, pinv_rtol):
    """NC1 ``Tr(Sigma_W Sigma_B^+)/C`` and ``Tr Sigma_W / Tr Sigma_B``.

    Returns
    -------
    nc1, nc1_trace : float
    rank : int
        Numerical rank of the pseudo-inverted matrix (Gram or Sigma_B).
    """
    num_rows = stats.num_rows
    num_means = geometry.present.size
    if stats.route == "classes":
        # z_i = M~ r_i gives r_i^T Sigma_B^+ r_i = C ||Gram^+ z_i||^2, so
        # nc1 = Tr(Gram^+ S Gram^+) / N with S = sum z z^T (DESIGN.md, pass 2).
        gram_pinv, rank = symmetric_pinv(geometry.gram, pinv_rtol)
        nc1 = np.sum((gram_pinv @ stats.scatter) * gram_pinv) / num_rows
    else:
        between = geometry.centred.T @ geometry.centred / num_means
        between_pinv, rank = symmetric_pinv(between, pinv_rtol)
        nc1 = np.sum(stats.scatter * between_pinv) / num_rows / num_means
    within_trace = stats.sq_norm_sums.sum() / num_rows
    between_trace = np.trace(geometry.gram) / num_means
    return float(nc1), float(within_trace / between_trace), rank


def _cdnv(geometry, variances):
    """Mean over class pairs of ``(s_a^2 + s_b^2) / (2 ||mu_a - mu_b||^2)`` (Galanti et al.)."""
    present_variances = variances[geometry.present]
    measured = np.isfinite(present_variances)
    if measured.sum() < 2:
        return None
    pair_sums = present_variances[measured][:, None] + present_variances[measured][None, :]
    distances = geometry.mean_sq_distances[np.ix_(measured, measured)]
    with np.errstate(divide="ignore"):
        return float(np.mean(_upper_pairs(pair_sums / (2.0 * distances))))


def _hyperspherical_energy(centred):
    """Mean over pairs of ``log 1/||u_a - u_b||``, ``u`` the unit class means (Wu & Papyan)."""
    cosines = _upper_pairs(_cosines(centred))
    with np.errstate(divide="ignore"):
        return float(np.mean(-0.5 * np.log(np.maximum(2.0 - 2.0 * cosines, 0.0))))


def _per_class(values, counts):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, values / np.maximum(counts, 1), np.nan)


def collapse_metrics(geometry, stats, *, pinv_rtol):
    """Every metric of DESIGN.md's table from a finished pass 2.

    Parameters
    ----------
    geometry : Geometry
    stats : ResidualStats
        Built on ``geometry``; carries the classifier, if any.
    pinv_rtol : float

    Returns
    -------
    dict
        Scalar metrics (None where not defined: classifier metrics without a
        classifier) and per-class arrays of shape (C,).
    """
    num_rows = stats.num_rows
    centred = geometry.centred
    num_means = geometry.present.size
    etf = simplex_etf_gram(num_means)
    nc1, nc1_trace, rank = within_class_nc1(geometry, stats, pinv_rtol)
    variances = _per_class(stats.sq_norm_sums, stats.counts)
    equinorm, equiangular, maxangle = _angle_metrics(centred)
    uncentred = geometry.means[geometry.present]
    mean_norms = np.full(geometry.num_classes, np.nan)
    mean_norms[geometry.present] = np.linalg.norm(centred, axis=1)
    result = {
        "nc1": nc1,
        "nc1_trace": nc1_trace,
        "cdnv": _cdnv(geometry, variances),
        "nc2_equinorm": equinorm,
        "nc2_equiangular": equiangular,
        "nc2_maxangle": maxangle,
        "nc2_etf": float(np.linalg.norm(_normalized(geometry.gram) - etf)),
        "nc2_orthogonality": float(np.linalg.norm(
            _off_diagonal(_normalized(uncentred @ uncentred.T)))),
        "gnc2": _hyperspherical_energy(centred),
        "ncc_accuracy": float(stats.ncc_hits.sum() / num_rows),
        "rank": rank,
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
        equinorm_w, equiangular_w, maxangle_w = _angle_metrics(weights)
        result.update({
            "nc2_equinorm_w": equinorm_w,
            "nc2_equiangular_w": equiangular_w,
            "nc2_maxangle_w": maxangle_w,
            "nc3": float(np.sum((_normalized(weights) - _normalized(centred)) ** 2)),
            "nc3_etf": float(np.linalg.norm(_normalized(weights @ centred.T) - etf)),
            "unc3": _std_over_mean(np.einsum("cd,cd->c", weights, centred)),
            "nc4": stats.disagreements / num_rows,
            "accuracy": float(stats.classifier_hits.sum() / num_rows),
            "bias_collapse": float(np.linalg.norm(
                stats.weights @ geometry.global_mean + stats.bias)),
            "class_accuracy": _per_class(stats.classifier_hits, stats.counts),
        })
    return result


def noise_metrics(main_stats, clean_geometry, clean_stats, corrupted_stats, *, pinv_rtol):
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

    Returns
    -------
    dict
        ``memorization``, ``memorization_raw``, ``dilation``, ``noise_fit``,
        ``nc1_clean``, ``nc1_trace_clean`` (None where no row defines them).
    """
    scale = float(np.mean(np.sqrt(_upper_pairs(clean_geometry.mean_sq_distances))))
    result = dict.fromkeys(("memorization", "memorization_raw", "noise_fit"))
    if corrupted_stats.num_rows > 0:
        memorization_raw = corrupted_stats.norm_sums.sum() / corrupted_stats.num_rows
        result["memorization_raw"] = float(memorization_raw)
        result["memorization"] = float(memorization_raw / scale)
        result["noise_fit"] = main_stats.corrupted_fits / main_stats.corrupted_rows
    measured = clean_stats.counts > 0
    counts = clean_stats.counts[measured]
    mean_distances = clean_stats.norm_sums[measured] / counts
    distance_variances = clean_stats.sq_norm_sums[measured] / counts - mean_distances ** 2
    result["dilation"] = float(np.mean(np.sqrt(np.maximum(distance_variances, 0.0))) / scale)
    nc1_clean, nc1_trace_clean, _ = within_class_nc1(clean_geometry, clean_stats, pinv_rtol)
    result["nc1_clean"] = nc1_clean
    result["nc1_trace_clean"] = nc1_trace_clean
    return result
