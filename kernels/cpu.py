"""Numba CPU kernels for the two streaming passes.

Each kernel adds one chunk's contribution into caller-owned accumulators; the
caller (``ncfast.accumulators``) owns validation, the GEMM and the merge law.
Parallel kernels give every thread its own slice of state, indexed by thread,
and add the slices together serially after the ``prange``: results depend on
the thread count only through float64 rounding. The caller passes the thread
count (``numba.get_num_threads()`` inside a kernel would defeat ``cache=True``).

Status codes: kernels never raise. A row with a label outside ``[0, C)`` or a
non-finite value is reported back by index so that Python can name it.
"""
import numpy as np
from numba import njit, prange

# Fast-math without nnan/ninf, so that the finiteness checks below still work.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

NO_ROW = np.iinfo(np.int64).max


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def class_sums(features, labels, clean_labels, counts, sums, clean_counts, clean_sums,
               num_threads):
    """Add per-class counts and float64 sums of one chunk.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    clean_labels : int64 array of shape (n,) or (0,)
        When non-empty, rows whose label equals their clean label are also
        added to ``clean_counts`` and ``clean_sums``.
    counts : int64 array of shape (C,), updated in place
    sums : float64 array of shape (C, D), updated in place
    clean_counts, clean_sums : same shapes, updated in place (unused when
        ``clean_labels`` is empty)
    num_threads : int
        Number of thread-private slices (``numba.get_num_threads()``).

    Returns
    -------
    bad_label_row, bad_value_row : int
        First row (in the chunk) with a label outside ``[0, C)`` (either label
        array), and first row with a NaN or Inf; ``NO_ROW`` when there is none.
        Bad rows are not added.
    """
    num_rows, num_features = features.shape
    num_classes = counts.shape[0]
    track_clean = clean_labels.shape[0] > 0
    rows_per_thread = (num_rows + num_threads - 1) // num_threads
    thread_counts = np.zeros((num_threads, num_classes), np.int64)
    thread_sums = np.zeros((num_threads, num_classes, num_features))
    clean_shape = (num_threads if track_clean else 0, num_classes, num_features)
    thread_clean_counts = np.zeros(clean_shape[:2], np.int64)
    thread_clean_sums = np.zeros(clean_shape)
    thread_bad_label = np.full(num_threads, NO_ROW, np.int64)
    thread_bad_value = np.full(num_threads, NO_ROW, np.int64)
    for t in prange(num_threads):
        for i in range(t * rows_per_thread, min(num_rows, (t + 1) * rows_per_thread)):
            label = labels[i]
            clean = label
            if track_clean:
                clean = clean_labels[i]
            if label < 0 or label >= num_classes or clean < 0 or clean >= num_classes:
                thread_bad_label[t] = min(thread_bad_label[t], i)
                continue
            row_total = 0.0
            for j in range(num_features):
                row_total += features[i, j]
            if not np.isfinite(row_total):
                thread_bad_value[t] = min(thread_bad_value[t], i)
                continue
            thread_counts[t, label] += 1
            for j in range(num_features):
                thread_sums[t, label, j] += features[i, j]
            if track_clean and clean == label:
                thread_clean_counts[t, label] += 1
                for j in range(num_features):
                    thread_clean_sums[t, label, j] += features[i, j]
    for t in range(num_threads):
        counts += thread_counts[t]
        sums += thread_sums[t]
        if track_clean:
            clean_counts += thread_clean_counts[t]
            clean_sums += thread_clean_sums[t]
    return thread_bad_label.min(), thread_bad_value.min()


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def residuals(features, labels, label_rows, means, out_residuals, out_sq_norms):
    """Residuals ``r_i = h_i - mu_{y_i}`` from float64 means, with ``||r_i||^2``.

    Parameters
    ----------
    features : array of shape (n, D), float32 or float64
    labels : int64 array of shape (n,)
    label_rows : int64 array of shape (C,)
        Row of ``means`` for each class, -1 for a class without a mean.
    means : float64 array of shape (C', D)
    out_residuals : float32 array of shape (n, D), written
    out_sq_norms : float64 array of shape (n,), written: ``||r_i||^2`` in
        float64, NaN for a row with a non-finite value, -1 for a row whose
        label is out of range or has no mean (its residual is set to zero).
    """
    num_rows, num_features = features.shape
    num_classes = label_rows.shape[0]
    for i in prange(num_rows):
        label = labels[i]
        row = -1
        if label >= 0 and label < num_classes:
            row = label_rows[label]
        if row < 0:
            for j in range(num_features):
                out_residuals[i, j] = 0.0
            out_sq_norms[i] = -1.0
            continue
        sq_norm = 0.0
        for j in range(num_features):
            residual = features[i, j] - means[row, j]
            out_residuals[i, j] = residual
            sq_norm += residual * residual
        out_sq_norms[i] = sq_norm


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def epilogue(products, sq_norms, labels, label_rows, present_classes, mean_sq_distances,
             logit_offsets, corrupted, counts, sq_norm_sums, norm_sums, ncc_hits,
             classifier_hits, totals, num_threads):
    """Fused pass over the GEMM output: NCC argmin, classifier argmax, tallies.

    With ``z = M~ r`` (first C' columns of ``products``) the squared distance
    to class mean k is ``||r||^2 + 2 (z_y - z_k) + K[y, k]`` (DESIGN.md,
    pass 2), and the classifier logits are ``W r + (W mu_y + b)``.

    Parameters
    ----------
    products : float32 array of shape (n, C' + C_w)
        ``R [M~^T | W^T]``; ``C_w`` is 0 without a classifier.
    sq_norms : float64 array of shape (n,), ``||r_i||^2``
    labels : int64 array of shape (n,), every label has a mean
    label_rows : int64 array of shape (C,), row of the class in the means
    present_classes : int64 array of shape (C',), class of each mean row
    mean_sq_distances : float64 array of shape (C', C'), ``||mu_a - mu_b||^2``
    logit_offsets : float64 array of shape (C', C_w), ``W mu_a + b``
    corrupted : uint8 array of shape (n,) or (0,); rows whose training label
        is wrong (label-noise runs)
    counts, ncc_hits, classifier_hits : int64 arrays of shape (C,), updated
    sq_norm_sums, norm_sums : float64 arrays of shape (C,), updated with
        ``sum ||r||^2`` and ``sum ||r||`` per class
    totals : int64 array of shape (3,), updated: rows where NCC and
        classifier disagree, corrupted rows, corrupted rows predicted as
        their (noisy) label.
    num_threads : int
        Number of thread-private slices (``numba.get_num_threads()``).
    """
    num_rows = products.shape[0]
    num_means = present_classes.shape[0]
    num_logits = logit_offsets.shape[1]
    num_classes = counts.shape[0]
    has_corrupted = corrupted.shape[0] > 0
    rows_per_thread = (num_rows + num_threads - 1) // num_threads
    thread_counts = np.zeros((num_threads, num_classes), np.int64)
    thread_sq_sums = np.zeros((num_threads, num_classes))
    thread_norm_sums = np.zeros((num_threads, num_classes))
    thread_ncc_hits = np.zeros((num_threads, num_classes), np.int64)
    thread_classifier_hits = np.zeros((num_threads, num_classes), np.int64)
    thread_totals = np.zeros((num_threads, 3), np.int64)
    for t in prange(num_threads):
        for i in range(t * rows_per_thread, min(num_rows, (t + 1) * rows_per_thread)):
            label = labels[i]
            row = label_rows[label]
            sq_norm = sq_norms[i]
            thread_counts[t, label] += 1
            thread_sq_sums[t, label] += sq_norm
            thread_norm_sums[t, label] += np.sqrt(sq_norm)

            own = np.float64(products[i, row])
            best_k = 0
            best_distance = np.inf
            for k in range(num_means):
                distance = (sq_norm + 2.0 * (own - np.float64(products[i, k]))
                            + mean_sq_distances[row, k])
                if distance < best_distance:
                    best_distance = distance
                    best_k = k
            ncc_prediction = present_classes[best_k]
            if ncc_prediction == label:
                thread_ncc_hits[t, label] += 1
            prediction = ncc_prediction

            if num_logits > 0:
                best_c = 0
                best_logit = -np.inf
                for c in range(num_logits):
                    logit = np.float64(products[i, num_means + c]) + logit_offsets[row, c]
                    if logit > best_logit:
                        best_logit = logit
                        best_c = c
                prediction = best_c
                if best_c == label:
                    thread_classifier_hits[t, label] += 1
                if best_c != ncc_prediction:
                    thread_totals[t, 0] += 1

            if has_corrupted and corrupted[i]:
                thread_totals[t, 1] += 1
                if prediction == label:
                    thread_totals[t, 2] += 1
    for t in range(num_threads):
        counts += thread_counts[t]
        sq_norm_sums += thread_sq_sums[t]
        norm_sums += thread_norm_sums[t]
        ncc_hits += thread_ncc_hits[t]
        classifier_hits += thread_classifier_hits[t]
        totals += thread_totals[t]
