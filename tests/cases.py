"""Synthetic feature sets shared by the tests: random and adversarial cases.

Every generator returns a dict with ``features`` (float32 unless stated),
``labels`` (int64), ``num_classes`` and, where it has one, a classifier
(``weights``, ``bias``).
"""
import numpy as np


def gaussian_classes(num_rows=3000, num_features=32, num_classes=5, *, spread=1.0,
                     offset=0.0, class_counts=None, relu=False, classifier=True,
                     dtype=np.float32, seed=0, rows_seed=None, flat_scale=None):
    """Gaussian class clouds around random means.

    Parameters
    ----------
    num_rows, num_features, num_classes : int
        N, D and C.
    spread : float
        Within-class standard deviation; the class means have unit scale.
    offset : float
        Common offset added to every feature (ReLU-like features sit far from 0).
    class_counts : sequence of int, optional
        Rows per class (imbalance, empty classes); overrides ``num_rows``.
    relu : bool
        Clip features at zero after the offset.
    classifier : bool
        Add ``weights`` (C, D) near the class means and a small ``bias`` (C,).
    dtype : numpy float dtype of ``features``
    seed : int
        Seed of the class means, and of everything else unless ``rows_seed``.
    rows_seed : int, optional
        Draw the rows from this seed instead, around the class means of
        ``seed``: a held-out set of the same classes. The classifier then
        differs from the one of ``seed``'s case; measure held-out rows with the
        training case's classifier.
    flat_scale : float, optional
        Shrink three directions of the class means' span by this factor
        (``with_flat_directions``).
    """
    rng = np.random.default_rng(seed)
    class_means = rng.normal(size=(num_classes, num_features)) * 3.0
    rows_rng = rng if rows_seed is None else np.random.default_rng(rows_seed)
    if class_counts is None:
        labels = rows_rng.permutation(np.arange(num_rows) % num_classes)
    else:
        labels = rows_rng.permutation(np.repeat(np.arange(num_classes), class_counts))
    features = class_means[labels] + spread * rows_rng.normal(size=(labels.size, num_features))
    features += offset
    if relu:
        features = np.maximum(features, 0.0)
    case = {"features": features.astype(dtype), "labels": labels.astype(np.int64),
            "num_classes": num_classes}
    if classifier:
        # A classifier near the class means, so that accuracy and NC3 are informative.
        case["weights"] = class_means + 0.3 * rng.normal(size=class_means.shape)
        case["bias"] = 0.1 * rng.normal(size=num_classes)
    if flat_scale is not None:
        case = with_flat_directions(case, scale=flat_scale)
    return case


def simplex_etf(num_classes, num_features, *, rows_per_class=3, classifier=False, seed=0):
    """Features exactly on a simplex ETF: every row equals its class mean (float64).

    The class means are ``4 (I - 11^T/C)`` in a random orthonormal C-frame of
    the D features (``num_features >= num_classes``); they sum to zero, so the
    global mean is 0 for balanced classes. With ``classifier``, ``weights``
    are the class means themselves (self-dual) and ``bias`` is zero.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(num_features, num_classes)))
    centred = np.eye(num_classes) - 1.0 / num_classes
    class_means = centred @ basis.T * 4.0
    labels = np.repeat(np.arange(num_classes), rows_per_class)
    case = {"features": class_means[labels], "labels": labels, "num_classes": num_classes}
    if classifier:
        case["weights"] = class_means
        case["bias"] = np.zeros(num_classes)
    return case


def orthogonal_frame(num_classes, num_features, *, rows_per_class=3, spread=0.01, seed=0):
    """Uncentred class means that are orthogonal, with norms in [1, 3] (float64).

    ``spread`` is the within-class standard deviation; with ``spread=0`` every
    row equals its class mean, so the class means are exactly the frame.
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(num_features, num_classes)))
    class_means = basis.T * rng.uniform(1.0, 3.0, size=(num_classes, 1))
    labels = np.repeat(np.arange(num_classes), rows_per_class)
    features = class_means[labels] + spread * rng.normal(size=(labels.size, num_features))
    return {"features": features, "labels": labels, "num_classes": num_classes}


def with_label_noise(case, rate=0.2, seed=1, *, memorized=False):
    """Copy of ``case`` whose labels are flipped to another class with probability ``rate``.

    By default the original labels become ``clean_labels``: corrupted rows sit
    in the cloud of their true class, as in a network that resisted the noise.
    With ``memorized`` the roles swap: the original labels stay the (noisy)
    ``labels`` and the flipped ones become ``clean_labels``, so corrupted rows
    sit in the cloud of their noisy class, as in a network that fit the noise
    (noise fit near 1, memorization near the distance between class means).
    """
    rng = np.random.default_rng(seed)
    original = case["labels"]
    flip = rng.random(original.size) < rate
    shift = rng.integers(1, case["num_classes"], size=original.size)
    flipped = np.where(flip, (original + shift) % case["num_classes"], original)
    if memorized:
        return {**case, "labels": original, "clean_labels": flipped}
    return {**case, "labels": flipped, "clean_labels": original}


def with_flat_directions(case, count=3, scale=1e-4, seed=2):
    """The case with ``count`` directions within the span of its class means shrunk by
    ``scale`` about the global mean: nearly dead units mixed by a rotation, so that
    ``Sigma_B`` (or the Gram of the means) is ill-conditioned along directions that
    no feature axis shows.
    """
    rng = np.random.default_rng(seed)
    features = np.asarray(case["features"], dtype=np.float64)
    labels = case["labels"]
    means = np.stack([features[labels == c].mean(axis=0) for c in np.unique(labels)])
    centred = means - means.mean(axis=0)
    directions = np.linalg.qr(centred.T @ rng.normal(size=(len(means), count)))[0]
    deviations = features - features.mean(axis=0)
    flat = features - (1.0 - scale) * (deviations @ directions) @ directions.T
    return {**case, "features": flat.astype(case["features"].dtype)}


#: The adversarial cases every metric is checked on (name -> generator keywords).
ADVERSARIAL = {
    "gaussian": {},
    "relu_offset_1e3": {"offset": 1e3, "relu": True},
    "tiny_spread_1e-4": {"spread": 3e-4},
    "imbalanced_1_to_100": {"num_classes": 3, "class_counts": [20, 200, 2000]},
    "classes_exceed_features": {"num_features": 8, "num_classes": 20, "num_rows": 2000},
    "two_classes": {"num_classes": 2},
    "single_row_classes": {"num_classes": 6, "class_counts": [1, 1, 50, 60, 1, 70]},
    "float64": {"dtype": np.float64},
    # Nearly dead units mixed by a rotation: pinv_condition about 3e6.
    "flat_directions_1e-3": {"num_features": 16, "num_classes": 6, "offset": 3.0,
                             "flat_scale": 1e-3},
    "flat_directions_classes_exceed_features": {"num_features": 16, "num_classes": 40,
                                                "offset": 3.0, "flat_scale": 1e-3},
}
