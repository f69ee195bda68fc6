"""The textbook route: neural-collapse metrics the way research scripts compute them.

This is the obvious float64 implementation of the metrics of docs/metrics.md, written the way
public neural-collapse scripts do it (Papyan, Han & Donoho 2020 and its
descendants): every row is loaded into memory as float64; class means come from
a Python loop over classes; the D×D within-class covariance ``Sigma_W`` is
summed from the residuals and the D×D between-class covariance ``Sigma_B`` from
the centred means; ``Sigma_B`` is pseudo-inverted from its eigendecomposition
(at most ``C' - 1`` eigenvalues above ``pinv_rtol``, as docs/metrics.md defines it); the
nearest-class-centre (NCC) rule measures the explicit squared distance of every
row to every class mean, class by class; the classifier's logits are
``W h + b`` for every row.

It costs ``O(N·D²)`` for ``Sigma_W``, ``O(N·C·D)`` for the distances and
``O(D³)`` for the pseudo-inverse, and holds all rows (N×D float64) in memory.
It is deliberately not optimized: it is the reference the tests check
``ncfast.collapse`` against and the baseline the benchmarks time it against.
It shares no code with ``ncfast.metrics``, ``ncfast.geometry`` or
``ncfast.accumulators``, so that a mistake there cannot hide here.
"""
import numpy as np
from scipy.spatial.distance import cdist, pdist

from ncfast.report import CollapseReport

#: Rows per batch for the NCC distances, as a data loader would deliver them.
BATCH_ROWS = 65536


def textbook_collapse(features, labels, *, num_classes=None, weights=None, bias=None,
                      means=None, clean_labels=None, global_mean="classes", pinv_rtol=1e-10,
                      ood=None):
    """Every neural-collapse metric of ``ncfast.collapse``, by the textbook route.

    Same conventions as ``ncfast.collapse``: metrics over classes and pairs of
    classes use the classes that have a mean (rows, or a finite row of
    ``means``); the classifier's argmax and ``bias_collapse`` use all C rows
    of ``W``; standard deviations are population ones (ddof = 0).

    Parameters
    ----------
    features : array of shape (n_samples, n_features)
        Converted to float64 and held in memory whole.
    labels : int array of shape (n_samples,)
        Class of each row, in ``[0, num_classes)``.
    num_classes : int, optional
        C; defaults to the number of rows of ``means``, else the largest
        label + 1.
    weights : array of shape (C, n_features), optional
        Classifier ``W``; enables the classifier metrics.
    bias : array of shape (C,), optional
        Classifier bias ``b`` (zero when omitted).
    means : array of shape (C, n_features) or CollapseReport, optional
        Class means to measure against instead of the features' own (NaN rows
        mark classes without a mean); a report also supplies the row counts
        behind its means, which ``global_mean="samples"`` needs.
    clean_labels : int array of shape (n_samples,), optional
        True labels when ``labels`` are noisy: adds the label-noise metrics.
    global_mean : {"classes", "samples"}
        ``mu_G`` as the mean of the class means, or of all rows (count-weighted
        class means when ``means`` is given).
    pinv_rtol : float
        Singular values of ``Sigma_B`` at or below this fraction of the
        largest are cut in its pseudo-inverse.
    ood : array of shape (n_ood, n_features), optional
        Out-of-distribution rows: adds ``nc5``.

    Returns
    -------
    dict
        The scalar metrics that are defined, with the keys of
        ``CollapseReport.metrics()``; ``rank`` (int, numerical rank of
        ``Sigma_B``); and per-class arrays of shape (C,): ``class_counts``
        (int64), ``class_variances``, ``class_mean_norms``,
        ``class_ncc_accuracy`` and ``class_accuracy`` (None without
        ``weights``), NaN for classes without rows (or without a mean).
    """
    features = np.array(features, dtype=np.float64)
    labels = np.array(labels, dtype=np.int64)
    mean_counts = None
    if isinstance(means, CollapseReport):
        means, mean_counts = means.means, means.mean_counts
    if num_classes is None:
        num_classes = len(means) if means is not None else int(labels.max()) + 1
    if means is None:
        class_means = _class_means(features, labels, num_classes)
        center = _global_mean(class_means, global_mean, all_rows=features)
    else:
        class_means = np.array(means, dtype=np.float64)
        center = _global_mean(class_means, global_mean, counts=mean_counts)
    result, predictions = _collapse_metrics(features, labels, class_means, center, weights,
                                            bias, pinv_rtol)
    if ood is not None:
        present = _present(class_means)
        centred = class_means[present] - center
        ood_direction = np.mean(np.array(ood, dtype=np.float64), axis=0) - center
        result["nc5"] = float(np.mean([
            abs(mean @ ood_direction) / (np.linalg.norm(mean) * np.linalg.norm(ood_direction))
            for mean in centred]))
    if clean_labels is not None:
        if means is not None:
            raise ValueError("clean_labels needs the clean-row means of these features; "
                             "it cannot be combined with means=")
        result.update(_noise_metrics(features, labels, np.asarray(clean_labels, np.int64),
                                     num_classes, predictions, global_mean, pinv_rtol))
    return result


def _class_means(features, labels, num_classes):
    """Mean of each class's rows, shape (C, D); NaN rows for classes without rows."""
    class_means = np.full((num_classes, features.shape[1]), np.nan)
    for c in range(num_classes):
        class_rows = features[labels == c]
        if len(class_rows) > 0:
            class_means[c] = class_rows.mean(axis=0)
    return class_means


def _present(class_means):
    """Classes with a mean (no NaN in their row), ascending."""
    return np.flatnonzero(~np.isnan(class_means).any(axis=1))


def _global_mean(class_means, global_mean, *, all_rows=None, counts=None):
    """``mu_G``: the mean of the class means, or the mean of all rows."""
    present = _present(class_means)
    if global_mean == "classes":
        return class_means[present].mean(axis=0)
    if global_mean != "samples":
        raise ValueError(f"global_mean must be 'classes' or 'samples'; found {global_mean!r}")
    if all_rows is not None:
        return all_rows.mean(axis=0)
    if counts is None:
        raise ValueError("global_mean='samples' with given means needs their row counts; "
                         "pass the training report as means=")
    return np.average(class_means[present], axis=0, weights=counts[present])


def _simplex_etf_gram(num_classes):
    """``(I - 11^T/C) / sqrt(C - 1)``, the simplex ETF Gram of unit Frobenius norm."""
    return (np.eye(num_classes) - np.ones((num_classes, num_classes)) / num_classes) \
        / np.sqrt(num_classes - 1)


def _normalized(matrix):
    """``matrix / ||matrix||_F``."""
    return matrix / np.linalg.norm(matrix)


def _pair_distances(vectors):
    """``||v_a - v_b||`` for every pair a < b of the rows of ``vectors`` (k, D).

    Explicit differences, summed in float64 (SciPy's ``pdist``, compiled, with
    no Gram-matrix identity). Returns a float64 array of shape
    (k (k - 1) / 2,), pairs in ``np.triu_indices(k, 1)`` order.
    """
    return pdist(np.asarray(vectors, dtype=np.float64), "euclidean")


def _kernel_statistics(unit_vectors):
    """Mean and variance over pairs of the log kernel ``log 1/||u_a - u_b||`` (its mean is
    the hyperspherical energy of Wu & Papyan) and of the Riesz kernel
    ``sign(s) ||u_a - u_b||^-s``, ``s = D - 2`` (Liu et al. 2023)."""
    distances = _pair_distances(unit_vectors)
    exponent = unit_vectors.shape[1] - 2
    with np.errstate(divide="ignore"):
        log_kernel = -np.log(distances)
        riesz = np.sign(exponent) * distances ** -exponent if exponent else np.ones_like(distances)
    return (float(np.mean(log_kernel)), float(np.var(log_kernel)), float(np.mean(riesz)),
            float(np.var(riesz)))


def _norm_and_angle_metrics(vectors):
    """Equinorm, equiangularity and max-angle of the rows of ``vectors``, shape (k, D)."""
    num_vectors = len(vectors)
    norms = np.linalg.norm(vectors, axis=1)
    cosines = (vectors @ vectors.T) / np.outer(norms, norms)
    cosines = cosines[~np.eye(num_vectors, dtype=bool)]
    return (float(np.std(norms) / np.mean(norms)),
            float(np.std(cosines)),
            float(np.mean(np.abs(cosines + 1.0 / (num_vectors - 1)))))


def _within_class(features, labels, class_means):
    """The class loop: within-class covariance and per-class spreads.

    Returns
    -------
    within : float64 array of shape (D, D)
        ``Sigma_W = (1/N) sum_i r_i r_i^T``.
    variances : float64 array of shape (C,)
        ``sigma_c^2 = mean ||r_i||^2`` over the rows of c; NaN without rows.
    """
    num_rows, num_features = features.shape
    present = _present(class_means)
    outside = np.setdiff1d(labels, present)
    if outside.size > 0:
        raise ValueError(f"rows have label {outside[0]}, a class without a mean")
    within = np.zeros((num_features, num_features))
    variances = np.full(len(class_means), np.nan)
    for c in present:
        class_residuals = features[labels == c] - class_means[c]
        if len(class_residuals) == 0:
            continue
        within += class_residuals.T @ class_residuals
        variances[c] = np.mean(np.sum(class_residuals ** 2, axis=1))
    return within / num_rows, variances


def _nc1(within, centred, pinv_rtol):
    """NC1 ``Tr(Sigma_W Sigma_B^+)/C``, ``Tr Sigma_W / Tr Sigma_B`` and the rank of ``Sigma_B``.

    ``Sigma_B^+`` inverts the eigenvalues above ``pinv_rtol`` times the largest, and at
    most the ``C' - 1`` largest: the centred means span at most ``C' - 1`` directions
    (docs/metrics.md, "Pseudo-inverse cut").
    """
    num_means = len(centred)
    between = centred.T @ centred / num_means
    eigenvalues, eigenvectors = np.linalg.eigh(between)  # ascending
    kept = np.flatnonzero(eigenvalues > pinv_rtol * eigenvalues[-1])[-(num_means - 1):] \
        if num_means > 1 else np.empty(0, np.int64)
    between_pinv = (eigenvectors[:, kept] / eigenvalues[kept]) @ eigenvectors[:, kept].T
    return (float(np.trace(within @ between_pinv) / num_means),
            float(np.trace(within) / np.trace(between)), len(kept))


def _nearest_class_centre(features, class_means):
    """NCC prediction of every row: argmin over classes with a mean of ``||h - mu_c||^2``.

    The squared distances are explicit (``h - mu_c``, squared and summed in
    float64 by SciPy's compiled ``cdist``, with no Gram-matrix identity), for
    batches of ``BATCH_ROWS`` rows.
    """
    present = _present(class_means)
    predictions = np.empty(len(features), np.int64)
    for start in range(0, len(features), BATCH_ROWS):
        batch = np.asarray(features[start:start + BATCH_ROWS], dtype=np.float64)
        sq_distances = cdist(batch, class_means[present], "sqeuclidean")
        predictions[start:start + len(batch)] = present[np.argmin(sq_distances, axis=1)]
    return predictions


def _per_class_fraction(hits, labels, num_classes):
    """Fraction of each class's rows where ``hits``; NaN for classes without rows."""
    fractions = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if np.any(labels == c):
            fractions[c] = np.mean(hits[labels == c])
    return fractions


def _collapse_metrics(features, labels, class_means, center, weights, bias, pinv_rtol):
    """Every metric on float64 rows, against ``class_means`` (C, D) and ``mu_G`` (D,).

    Returns
    -------
    result : dict
        Metrics and per-class arrays (see ``textbook_collapse``).
    predictions : int64 array of shape (n_samples,)
        The classifier's argmax, or the NCC rule's prediction without one.
    """
    num_classes = len(class_means)
    present = _present(class_means)
    num_means = len(present)
    centred = class_means[present] - center
    etf = _simplex_etf_gram(num_means)

    within, variances = _within_class(features, labels, class_means)
    nc1, nc1_trace, rank = _nc1(within, centred, pinv_rtol)
    equinorm, equiangular, maxangle = _norm_and_angle_metrics(centred)
    uncentred = class_means[present]
    orthogonality_gram = _normalized(uncentred @ uncentred.T)
    unit_means = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    energy, log_variance, riesz_mean, riesz_variance = _kernel_statistics(unit_means)
    ncc_predictions = _nearest_class_centre(features, class_means)
    mean_norms = np.full(num_classes, np.nan)
    mean_norms[present] = np.linalg.norm(centred, axis=1)
    result = {
        "nc1": nc1,
        "nc1_trace": nc1_trace,
        "nc2_equinorm": equinorm,
        "nc2_equiangular": equiangular,
        "nc2_maxangle": maxangle,
        "nc2_etf": float(np.linalg.norm(_normalized(centred @ centred.T) - etf)),
        "nc2_orthogonality": float(np.linalg.norm(
            orthogonality_gram[~np.eye(num_means, dtype=bool)])),
        "gnc2": energy,
        "log_kernel_variance": log_variance,
        "riesz_kernel_mean": riesz_mean,
        "riesz_kernel_variance": riesz_variance,
        "ncc_accuracy": float(np.mean(ncc_predictions == labels)),
        "rank": rank,
        "class_counts": np.array([np.sum(labels == c) for c in range(num_classes)], np.int64),
        "class_variances": variances,
        "class_mean_norms": mean_norms,
        "class_ncc_accuracy": _per_class_fraction(ncc_predictions == labels, labels,
                                                  num_classes),
        "class_accuracy": None,
    }
    measured = present[np.isfinite(variances[present])]  # classes with rows
    if len(measured) >= 2:
        first, second = np.triu_indices(len(measured), 1)
        variance_sums = variances[measured][first] + variances[measured][second]
        with np.errstate(divide="ignore"):  # coinciding means: infinite CDNV
            result["cdnv"] = float(np.mean(
                variance_sums / (2.0 * _pair_distances(class_means[measured]) ** 2)))
    if weights is not None:
        weights = np.array(weights, dtype=np.float64)
        bias = np.zeros(num_classes) if bias is None else np.array(bias, dtype=np.float64)
        present_weights = weights[present]
        equinorm_w, equiangular_w, maxangle_w = _norm_and_angle_metrics(present_weights)
        logits = features @ weights.T + bias
        predictions = np.argmax(logits, axis=1)
        self_duality = np.array([present_weights[k] @ centred[k] for k in range(num_means)])
        result.update({
            "nc2_equinorm_w": equinorm_w,
            "nc2_equiangular_w": equiangular_w,
            "nc2_maxangle_w": maxangle_w,
            "nc2_etf_w": float(np.linalg.norm(
                _normalized(present_weights @ present_weights.T) - etf)),
            "nc3": float(np.sum((_normalized(present_weights) - _normalized(centred)) ** 2)),
            "nc3_etf": float(np.linalg.norm(_normalized(present_weights @ centred.T) - etf)),
            "unc3": float(np.std(self_duality) / np.mean(self_duality)),
            "nc4": float(np.mean(predictions != ncc_predictions)),
            "accuracy": float(np.mean(predictions == labels)),
            "bias_collapse": float(np.linalg.norm(weights @ center + bias)),
            "class_accuracy": _per_class_fraction(predictions == labels, labels, num_classes),
        })
        return result, predictions
    return result, ncc_predictions


def _noise_metrics(features, labels, clean_labels, num_classes, predictions, global_mean,
                   pinv_rtol):
    """Memorization–dilation metrics (Nguyen et al. 2023) by the textbook route.

    ``predictions`` (n_samples,) are the classifier's, or the NCC rule's
    without a classifier; ``noise_fit`` compares them with the noisy labels.
    """
    clean = labels == clean_labels
    clean_features, clean_class_labels = features[clean], labels[clean]
    clean_means = _class_means(clean_features, clean_class_labels, num_classes)
    clean_present = _present(clean_means)
    if len(clean_present) < 2:
        raise ValueError(f"clean rows (label equal to clean label) cover {len(clean_present)} "
                         "class(es); the label-noise metrics need at least 2")
    scale = np.mean(_pair_distances(clean_means[clean_present]))
    result = {}
    corrupted = ~clean
    if corrupted.any():
        result["noise_fit"] = float(np.mean(predictions[corrupted] == labels[corrupted]))
    # Memorization: corrupted rows against the clean mean of their true class, where
    # that class has clean rows.
    distances = np.concatenate([
        np.linalg.norm(features[corrupted & (clean_labels == c)] - clean_means[c], axis=1)
        for c in clean_present])
    if distances.size > 0:
        result["memorization_raw"] = float(np.mean(distances))
        result["memorization"] = float(np.mean(distances) / scale)
    spreads = [np.std(np.linalg.norm(clean_features[clean_class_labels == c] - clean_means[c],
                                     axis=1))
               for c in clean_present]
    result["dilation"] = float(np.mean(spreads) / scale)
    clean_center = _global_mean(clean_means, global_mean, all_rows=clean_features)
    within, _ = _within_class(clean_features, clean_class_labels, clean_means)
    result["nc1_clean"], result["nc1_trace_clean"], _ = _nc1(
        within, clean_means[clean_present] - clean_center, pinv_rtol)
    return result
