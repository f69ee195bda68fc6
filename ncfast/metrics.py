"""Metric algebra: NC1–NC5 and friends from a finished pass 2 and its plan.

Every class-pair quantity comes from the plan's pair sweep (``ncfast.sweep``);
what is left here is O(C'·D) algebra on the means and the classifier, the
NC1 pseudo-inverse, and the per-class tallies. Every backend shares this file.

Metrics over pairs or rows of class means use the classes that have a mean
(``Geometry.present``); the classifier's argmax and ``bias_collapse`` use all
of its rows.
"""
import math
import warnings

import numba
import numpy as np

from ncfast.geometry import kept_spectrum
from ncfast.kernels.cpu import TASK_BYTES, dense_blas, run_tasks
from ncfast.sweep import cdnv


def _std_over_mean(values):
    """Coefficient of variation; NaN when the mean is 0 (e.g. a zero classifier)."""
    mean = np.mean(values)
    return float(np.std(values) / mean) if mean != 0 else math.nan


def _norm(values):
    """Euclidean norm without overflow in its squares (a bias of 1e200 has norm 1e200)."""
    largest = float(np.max(np.abs(values), initial=0.0))
    if largest == 0.0 or not math.isfinite(largest):
        return largest
    return largest * float(np.linalg.norm(values / largest))


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
        # nc1 = Tr(Gram^+ S Gram^+) / N with S = sum z z^T. With
        # Gram = V diag(lambda) V^T that is sum_j (V^T S V)_jj / lambda_j^2 over the kept
        # eigenvalues: only the diagonal of S in the eigenbasis, which pass 2 keeps.
        eigenvalues = geometry.gram_eigenvalues
        keep, rank, condition = kept_spectrum(eigenvalues, pinv_rtol, num_means - 1)
        nc1 = np.sum(stats.eigen_scatter[keep] / eigenvalues[keep] ** 2) / num_rows
    else:
        # Sigma_B = U diag(lambda) U^T (D×D, computed beside the pair sweep) gives
        # Tr(S Sigma_B^+) = sum_j u_j^T S u_j / lambda_j over the kept eigenvalues, and
        # u_j^T S u_j = sum_i (u_j . r_i)^2 is what pass 2 keeps.
        eigenvalues = geometry.between_spectrum[0]
        keep, rank, condition = kept_spectrum(eigenvalues, pinv_rtol, num_means - 1)
        nc1 = np.sum(stats.eigen_scatter[keep] / eigenvalues[keep]) / num_rows / num_means
    within_trace = stats.sq_norm_sums.sum() / num_rows
    between_trace = geometry.centred_sq_norms.sum() / num_means
    return float(nc1), float(within_trace / between_trace), rank, condition


def _per_class(values, counts):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, values / np.maximum(counts, 1), np.nan)


def _moment_metrics(sweep, name):
    mean, variance = sweep.moments[name]
    return float(mean), float(variance)


def collapse_metrics(stats, *, pinv_rtol, ood_mean=None, xp=np):
    """Every scalar and per-class metric of a finished pass 2.

    Parameters
    ----------
    stats : ResidualStats
        Pass 2 of every row; its plan carries the geometry, the classifier and
        the pair sweep.
    pinv_rtol : float
    ood_mean : float64 array of shape (D,), optional
        Mean of out-of-distribution features: enables ``nc5``.
    xp : module
        Array namespace of the backend (the CDNV correction for classes
        without rows runs there).

    Returns
    -------
    dict
        Scalar metrics (None where not defined: classifier metrics without a
        classifier) and per-class arrays of shape (C,).
    """
    plan = stats.plan
    geometry, sweep = plan.geometry, plan.sweep
    num_rows = stats.num_rows
    centred = geometry.centred
    nc1, nc1_trace, rank, condition = within_class_nc1(geometry, stats, pinv_rtol)
    variances = _per_class(stats.sq_norm_sums, stats.counts)
    _, cos_variance = _moment_metrics(sweep, "cos")
    log_mean, log_variance = _moment_metrics(sweep, "log")
    riesz_mean, riesz_variance = _moment_metrics(sweep, "riesz")
    num_pairs = sweep.num_pairs
    mean_norms = np.full(geometry.num_classes, np.nan)
    mean_norms[geometry.present] = np.sqrt(geometry.centred_sq_norms)
    result = {
        "nc1": nc1,
        "nc1_trace": nc1_trace,
        "cdnv": cdnv(sweep, xp.asarray(centred), xp.asarray(geometry.present_means),
                     variances[geometry.present], xp),
        "nc2_equinorm": _std_over_mean(np.sqrt(geometry.centred_sq_norms)),
        "nc2_equiangular": float(np.sqrt(cos_variance)),
        "nc2_maxangle": float(sweep.sums["maxangle_sum"] / num_pairs),
        "nc2_etf": sweep.etf_distance("means"),
        "nc2_orthogonality": sweep.orthogonality,
        "gnc2": log_mean,
        "log_kernel_variance": log_variance,
        "riesz_kernel_mean": riesz_mean,
        "riesz_kernel_variance": riesz_variance,
        "nc5": None if ood_mean is None else ood_orthogonality(geometry, ood_mean),
        "ncc_accuracy": float(stats.ncc_hits.sum() / num_rows),
        "rank": rank,
        "pinv_condition": condition,
        "route": stats.route,
        "class_counts": stats.counts.copy(),
        "class_variances": variances,
        "class_mean_norms": mean_norms,
        "class_ncc_accuracy": _per_class(stats.ncc_hits, stats.counts),
    }
    classifier_keys = ("nc2_equinorm_w", "nc2_equiangular_w", "nc2_maxangle_w", "nc2_etf_w",
                       "nc3", "nc3_etf", "unc3", "nc4", "accuracy", "bias_collapse")
    result.update(dict.fromkeys(classifier_keys))
    result["class_accuracy"] = None
    if plan.has_classifier:
        _, cos_w_variance = _moment_metrics(sweep, "cos_w")
        result.update({
            "nc2_equinorm_w": _std_over_mean(sweep.weight_norms),
            "nc2_equiangular_w": float(np.sqrt(cos_w_variance)),
            "nc2_maxangle_w": float(sweep.sums["maxangle_w_sum"] / num_pairs),
            "nc2_etf_w": sweep.etf_distance("classifier"),
            "nc3": self_duality(plan),
            "nc3_etf": sweep.etf_distance("classifier_means"),
            "unc3": _std_over_mean(sweep.weight_mean_dots),
            "nc4": stats.disagreements / num_rows,
            "accuracy": float(stats.classifier_hits.sum() / num_rows),
            "bias_collapse": _norm(plan.global_logits),
            "class_accuracy": _per_class(stats.classifier_hits, stats.counts),
        })
    return result


def self_duality(plan):
    """NC3 ``||nrm(W') - nrm(M~)||_F^2``, W' the classifier rows of the classes with a mean.

    Summed over tasks of ``TASK_BYTES`` of rows on the worker threads (no C'×D
    temporary), each task's sum added in task order, so that the result does
    not depend on the thread count.

    Parameters
    ----------
    plan : Pass2Plan
        With a classifier; its sweep holds the row norms of W'.

    Returns
    -------
    float
    """
    geometry = plan.geometry
    present, centred = geometry.present, geometry.centred
    weight_sq_total = float(plan.sweep.weight_norms @ plan.sweep.weight_norms)
    if weight_sq_total == 0.0:  # W' = 0 (e.g. a zero-initialised layer): no direction
        return math.nan
    # ||W'/a - M~/b||^2 = ||W' - (a/b) M~||^2 / a^2 (a, b the Frobenius norms): a scaled
    # copy of M~, and the difference taken entry by entry (no cancellation near collapse).
    scale = math.sqrt(weight_sq_total / geometry.centred_sq_norms.sum())
    rows_per_task = max(1, TASK_BYTES // (8 * geometry.num_features))

    def task_sum(task):
        rows = slice(task * rows_per_task, (task + 1) * rows_per_task)
        difference = centred[rows] * scale
        np.subtract(plan.weights[present[rows]], difference, out=difference)
        return float(np.einsum("cd,cd->", difference, difference))

    partial_sums = run_tasks(task_sum, -(-present.size // rows_per_task), numba.get_num_threads())
    return sum(partial_sums) / weight_sq_total


def ood_orthogonality(geometry, ood_mean):
    """NC5: mean over classes of ``|cos(mu_c - mu_G, mu_OOD - mu_G)|`` (Ammar et al. 2024).

    Parameters
    ----------
    geometry : Geometry
    ood_mean : float64 array of shape (D,)
        Mean of the out-of-distribution features, in the same feature space.
    """
    ood_mean = np.asarray(ood_mean, dtype=np.float64)
    direction = ood_mean - geometry.global_mean
    direction_norm = np.linalg.norm(direction)
    # A direction within 64 float64 roundings of the two means' norms is their rounding,
    # and its angle noise. (The mean of n rows spread far around it can be rounded by more,
    # up to about n roundings of the spread: that is beyond what this sees.)
    rounding = 64.0 * np.finfo(np.float64).eps * (np.linalg.norm(ood_mean)
                                                  + np.linalg.norm(geometry.global_mean))
    if direction_norm <= rounding:
        raise ValueError(
            f"the OOD mean is the global mean of the class means up to float64 rounding "
            f"(they differ by {direction_norm:.3g}), so NC5, the angle between the class "
            "means and their difference, is undefined: give OOD features whose mean lies "
            "elsewhere")
    with dense_blas(2.0 * geometry.centred.size):
        products = geometry.centred @ direction
    cosines = products / (np.sqrt(geometry.centred_sq_norms) * direction_norm)
    return float(np.mean(np.abs(cosines)))


def noise_metrics(main_stats, clean_stats, corrupted_stats, *, pinv_rtol):
    """Memorization–dilation metrics (Nguyen et al. 2023).

    Parameters
    ----------
    main_stats : ResidualStats
        All rows against the noisy-label means, with corrupted rows flagged.
    clean_stats : ResidualStats
        Clean rows against the clean means ``mu^_c`` (its plan's geometry).
    corrupted_stats : ResidualStats
        Corrupted rows, labelled with their true class, against the clean means.
    pinv_rtol : float

    Returns
    -------
    dict
        ``memorization``, ``memorization_raw``, ``dilation``, ``noise_fit``,
        ``nc1_clean``, ``nc1_trace_clean`` (None where no row defines them).
    """
    clean_geometry = clean_stats.geometry
    scale = clean_stats.plan.sweep.mean_pair_distance
    result = dict.fromkeys(("memorization", "memorization_raw", "noise_fit"))
    if main_stats.corrupted_rows > 0:
        result["noise_fit"] = main_stats.corrupted_fits / main_stats.corrupted_rows
    left_out = main_stats.corrupted_rows - corrupted_stats.num_rows
    if left_out > 0:
        warnings.warn(
            f"memorization leaves out {left_out} of {main_stats.corrupted_rows} corrupted rows: "
            "their true classes have no clean rows, so no clean mean to measure them from "
            "(noise_fit counts them)", stacklevel=2)
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
