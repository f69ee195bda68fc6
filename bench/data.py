"""Synthetic features for the benchmarks: Gaussian classes near collapse."""
import argparse
import math
import os

import numpy as np

#: Rows generated per step (bounds the scratch of ``means[labels]`` for a step's rows).
_STEP_ROWS = 1 << 16


#: Within-class standard deviation per feature of ``collapsed_features`` by default.
SPREAD = 0.5


def collapsed_features(num_rows, num_features, num_classes, *, classifier=True, spread=SPREAD,
                       seed=0):
    """Float32 features of balanced Gaussian classes, and a nearly self-dual classifier.

    Row ``i`` is ``mu_{y_i} + spread e_i`` with random class means of norm
    about ``4 sqrt(D)`` and standard normal noise ``e_i``. At the default
    spread the rows are collapsed enough that the nearest class centre is
    right almost always (and every row lies inside its NCC radius), spread
    enough that NC1 is far from zero; from a spread of about 3 on, every row
    lies beyond its radius (ncfast's slower NCC path, as early in training).

    Parameters
    ----------
    num_rows, num_features, num_classes : int
    classifier : bool
        Also return a classifier: ``W`` the class means plus noise, ``b`` small.
    spread : float
        Standard deviation of each feature within a class.
    seed : int

    Returns
    -------
    features : float32 array of shape (num_rows, num_features)
    labels : int64 array of shape (num_rows,)
    weights : float64 array of shape (num_classes, num_features), or None
    bias : float64 array of shape (num_classes,), or None
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_rows)
    means = 4.0 * rng.standard_normal((num_classes, num_features), dtype=np.float32)
    features = np.empty((num_rows, num_features), np.float32)
    for start in range(0, num_rows, _STEP_ROWS):
        stop = min(start + _STEP_ROWS, num_rows)
        rng.standard_normal((stop - start, num_features), dtype=np.float32,
                            out=features[start:stop])
        features[start:stop] *= spread
        features[start:stop] += means[labels[start:stop]]
    if not classifier:
        return features, labels, None, None
    weights = means + rng.standard_normal(means.shape, dtype=np.float32)
    bias = 0.1 * rng.standard_normal(num_classes)
    return features, labels, weights.astype(np.float64), bias


def whole_number(text):
    """``text`` as an int: ``"12"``, or ``"1e6"`` for 1,000,000; None for anything else
    (``"1.5"``, ``"inf"``, ``"nan"``)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # argparse words a ValueError as an "invalid ... value"
        return int(value) if math.isfinite(value) and value.is_integer() else None


def positive_int(text):
    """An argparse type: a whole number of at least 1 (``"1e6"`` is read as 1,000,000)."""
    value = whole_number(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def positive_float(text):
    """An argparse type: a finite number above 0."""
    value = float(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return value


def existing_folder(path):
    """``--dir``'s argparse type: a folder that exists (a usage error otherwise, not a
    traceback from ``tempfile``)."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is not an existing folder")
    return path
