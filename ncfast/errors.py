"""The one place that words an error about a bad input row.

Kernels never raise: each backend reports the first bad row of a chunk as a
global row index and a kind (``LABEL``, ``CLEAN_LABEL``, ``NO_MEAN``,
``NON_FINITE``), and ``bad_row_error`` turns that into a ValueError that says
what was found and how to fix it.
"""
import numpy as np

from ncfast.kernels.cpu import MAX_RESIDUAL_NORM

#: A label outside ``[0, num_classes)``.
LABEL = "label"
#: A clean label outside ``[0, num_classes)``.
CLEAN_LABEL = "clean label"
#: A label inside ``[0, num_classes)`` whose class has no mean (pass 2 on given means).
NO_MEAN = "no mean"
#: A NaN or Inf value, or values too large (float64 sums overflow, or the row lies
#: beyond ``MAX_RESIDUAL_NORM`` of its class mean).
NON_FINITE = "non-finite"

LABEL_HINT = "labels must be class indices in [0, num_classes)"


def bad_row_error(kind, row, *, label=None, num_classes=None, values=None):
    """The ValueError for the first bad row of an input.

    Parameters
    ----------
    kind : {LABEL, CLEAN_LABEL, NO_MEAN, NON_FINITE}
    row : int
        Global index of the row.
    label : int, optional
        The offending label (LABEL, CLEAN_LABEL, NO_MEAN).
    num_classes : int, optional
        C (LABEL, CLEAN_LABEL, NO_MEAN).
    values : array of shape (D,), optional
        The row's features (NON_FINITE): NaN, Inf or overflow is told apart.

    Returns
    -------
    ValueError
    """
    if kind in (LABEL, CLEAN_LABEL) and label < 0:
        return ValueError(
            f"row {row} has {kind} {label}, outside [0, {num_classes}): {LABEL_HINT}; drop "
            "the rows with negative labels (e.g. -1 for unlabelled rows) or remap them")
    if kind in (LABEL, CLEAN_LABEL):
        return ValueError(
            f"row {row} has {kind} {label}, outside [0, {num_classes}): {LABEL_HINT}; pass "
            "num_classes= if there are more classes (and, with means=, a row of means for "
            "each)")
    if kind == NO_MEAN:
        return ValueError(
            f"row {row} has label {label}, a class without a mean (no training rows); measure "
            "only classes present in the means")
    if kind != NON_FINITE:
        raise ValueError(f"unknown bad-row kind {kind!r}")
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any() or np.isinf(values).any():
        found = "NaN" if np.isnan(values).any() else "Inf"
        return ValueError(
            f"features row {row} contains {found}; every value must be finite: drop or repair "
            "such rows (e.g. np.isfinite(features).all(axis=1))")
    return ValueError(
        f"features row {row} holds values too large to measure (max |x| = "
        f"{np.abs(values).max():.3g}): its float64 sums must stay finite, and its distance to its "
        f"class mean below {MAX_RESIDUAL_NORM:.0e} (ncfast's pass 2 computes in float32); "
        "rescale the features, or drop the row")


def label_kind(label, clean_label, num_classes, label_rows=None):
    """Which of a row's labels is bad: LABEL, CLEAN_LABEL or NO_MEAN (or None).

    Parameters
    ----------
    label : int
    clean_label : int or None
    num_classes : int
    label_rows : int array of shape (C,), optional
        Index of each class among those with a mean, -1 without one.
    """
    if not 0 <= label < num_classes:
        return LABEL
    if clean_label is not None and not 0 <= clean_label < num_classes:
        return CLEAN_LABEL
    if label_rows is not None and label_rows[label] < 0:
        return NO_MEAN
    return None


def raise_bad_row(row, labels, clean_labels, features, *, num_classes, label_rows=None):
    """Raise the error for global row ``row`` from its host data.

    Parameters
    ----------
    row : int
        Global index of the bad row.
    labels, clean_labels : int arrays of shape (1,) (clean labels may be None)
    features : array of shape (1, D)
    num_classes : int
    label_rows : int array of shape (C,), optional
        Pass 2's classes with a mean (a label of a class without one is bad).
    """
    label = int(labels[0])
    clean_label = None if clean_labels is None else int(clean_labels[0])
    kind = label_kind(label, clean_label, num_classes, label_rows) or NON_FINITE
    raise bad_row_error(kind, row, label=clean_label if kind == CLEAN_LABEL else label,
                        num_classes=num_classes, values=features[0])
