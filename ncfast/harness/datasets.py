"""Datasets for the harness: MNIST-1D, scikit-learn digits, a Gaussian mixture, a user ``.npz``.

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels,
split into train and test, built from numpy only (torch is not needed here).
"""
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ncfast.engine import mostly_empty

#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist1d", "digits", "gaussian", "npz")

#: Datasets each option applies to.
OPTION_DATASETS = {"num_samples": ("mnist1d", "gaussian"), "num_features": ("gaussian",),
                   "num_classes": ("gaussian",), "class_counts": ("gaussian",),
                   "path": ("npz",)}

#: Classes of MNIST-1D: it generates ``num_samples // MNIST1D_CLASSES`` samples of each.
MNIST1D_CLASSES = 10

#: Classes of the Gaussian mixture when neither ``num_classes`` nor ``class_counts`` is given.
GAUSSIAN_CLASSES = 4


@dataclass(frozen=True)
class Dataset:
    """Train and test inputs with their labels.

    Attributes
    ----------
    x_train : float32 array of shape (n_train, *input_shape)
    y_train : int64 array of shape (n_train,)
    x_test : float32 array of shape (n_test, *input_shape)
    y_test : int64 array of shape (n_test,)
    num_classes : int
    name : str
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self):
        """Shape of one input row, e.g. ``(40,)`` for MNIST-1D."""
        return self.x_train.shape[1:]


def load_dataset(name, *, num_samples=None, num_features=None, num_classes=None,
                 class_counts=None, path=None, test_fraction=0.2, balanced=False, seed=0):
    """Build or load one dataset by name.

    Parameters
    ----------
    name : {"mnist1d", "digits", "gaussian", "npz"}
    num_samples : int, optional
        MNIST-1D: samples generated before the split (default 5000, the
        package's own). Gaussian: training rows when ``class_counts`` is not
        given (default 1000).
    num_features : int, optional
        Gaussian: input dimension (default 32).
    num_classes : int, optional
        Gaussian: number of classes (default 4, or ``len(class_counts)``).
    class_counts : sequence of int, optional
        Gaussian: training rows per class (imbalance); overrides ``num_samples``.
    path : str, optional
        npz: file holding ``x`` of shape (n, ...) and ``y`` of shape (n,), and
        optionally ``x_test`` and ``y_test``.
    test_fraction : float
        Share of rows held out as the test split where the source has none
        (digits, npz without ``x_test``); Gaussian test rows are drawn in the
        same class proportions, this share of the training count.
    balanced : bool
        Keep in each split as many rows of every class as its smallest class
        has (:func:`balance_classes`).
    seed : int

    Returns
    -------
    Dataset
    """
    check_dataset_options(name, num_samples=num_samples, num_features=num_features,
                          num_classes=num_classes, class_counts=class_counts, path=path,
                          test_fraction=test_fraction, balanced=balanced)
    if name == "mnist1d":
        data = _mnist1d(num_samples or 5000, seed)
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        data = _split("digits", digits.data / 16.0, digits.target,
                      _num_classes("digits", digits.target), test_fraction, seed)
    elif name == "gaussian":
        data = gaussian_mixture(num_samples=num_samples or 1000, num_features=num_features or 32,
                                num_classes=num_classes, class_counts=class_counts,
                                test_fraction=test_fraction, seed=seed)
    else:
        data = _npz(path, test_fraction, seed)
    return check_splits(balance_classes(data, seed=seed) if balanced else data)


def check_splits(data):
    """``data`` unchanged if a run can train on it and measure both splits.

    Parameters
    ----------
    data : Dataset

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        When the train split has rows of fewer than 2 classes, or the test
        split holds a class without training rows (it has no train mean to
        be measured against).
    """
    trained = np.unique(data.y_train)
    if trained.size < 2:
        raise ValueError(
            f"the train split of {data.name} holds rows of {trained.size} class(es); neural "
            "collapse compares classes, so at least 2 need training rows: give more samples")
    untrained = np.setdiff1d(data.y_test, trained)
    if untrained.size:
        raise ValueError(
            f"the test split of {data.name} holds class(es) {untrained.tolist()} without "
            "training rows, which have no train mean to measure the test rows against: give "
            "more samples, or drop those test rows")
    return data


def balance_classes(data, *, seed=0):
    """The dataset with every class cut to the row count of its split's smallest class.

    Rows kept are drawn at random (``seed``) and stay in their original order.

    Parameters
    ----------
    data : Dataset
    seed : int

    Returns
    -------
    Dataset
        Each split holds ``C * min_c n_c`` rows, ``min_c n_c`` of every class.

    Raises
    ------
    ValueError
        When a class has no row in a split (nothing would be left of it).
    """
    rng = np.random.default_rng(seed)
    splits = []
    for split, inputs, labels in (("train", data.x_train, data.y_train),
                                  ("test", data.x_test, data.y_test)):
        counts = np.bincount(labels, minlength=data.num_classes)
        if counts.min() == 0:
            raise ValueError(
                f"cannot balance the {split} split of {data.name}: class(es) "
                f"{np.flatnonzero(counts == 0).tolist()} have no rows there")
        kept = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(labels == label), size=counts.min(), replace=False)
            for label in range(data.num_classes)]))
        splits += [inputs[kept], labels[kept]]
    return Dataset(*splits, data.num_classes, data.name)


def check_dataset_options(name, *, num_samples=None, num_features=None, num_classes=None,
                          class_counts=None, path=None, test_fraction=0.2, balanced=False):
    """Raise ValueError for options :func:`load_dataset` cannot honour, without loading."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1); found {test_fraction}")
    for option, value in (("num_samples", num_samples), ("num_features", num_features)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be a positive integer; found {value}")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; found {num_classes}")
    if name == "mnist1d" and num_samples is not None and num_samples < MNIST1D_CLASSES:
        raise ValueError(
            f"num_samples must be at least {MNIST1D_CLASSES} for mnist1d, which generates "
            f"num_samples // {MNIST1D_CLASSES} samples of each of its {MNIST1D_CLASSES} "
            f"classes; found {num_samples}")
    if name == "gaussian" and class_counts is None and num_samples is not None and \
            num_samples < (num_classes or GAUSSIAN_CLASSES):
        raise ValueError(
            f"num_samples ({num_samples}) must be at least num_classes "
            f"({num_classes or GAUSSIAN_CLASSES}): every class needs a training row")
    given = {"num_samples": num_samples, "num_features": num_features,
             "num_classes": num_classes, "class_counts": class_counts, "path": path}
    for option, value in given.items():
        if value is not None and name not in OPTION_DATASETS[option]:
            raise ValueError(f"{option} applies to the {' and '.join(OPTION_DATASETS[option])} "
                             f"dataset(s), not to {name!r}")
    if class_counts is not None:
        if len(class_counts) < 2 or min(class_counts) < 1:
            raise ValueError(
                f"class_counts needs at least 2 classes with at least 1 row each; found "
                f"{list(class_counts)}")
        if num_classes is not None and num_classes != len(class_counts):
            raise ValueError(
                f"class_counts lists {len(class_counts)} classes but num_classes is "
                f"{num_classes}")
        if num_samples is not None and num_samples != sum(class_counts):
            raise ValueError(
                f"class_counts sum to {sum(class_counts)} but num_samples is {num_samples}; "
                "give one of them, or make them agree")
        if balanced:
            raise ValueError("class_counts sets unequal classes and balanced asks for equal "
                             "ones; give one of them")
    if name == "npz":
        if path is None:
            raise ValueError("the npz dataset needs a path to a .npz file with arrays x and y")
        if os.path.isdir(path):
            raise ValueError(f"dataset file {path!r} is a folder; give the .npz file in it")
        if not os.path.isfile(path):
            raise ValueError(f"dataset file {path!r} does not exist")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"dataset file {path!r} is not a .npz archive; write one with "
                             "np.savez(path, x=inputs, y=labels)")


def gaussian_mixture(*, num_samples=1000, num_features=32, num_classes=None, class_counts=None,
                     test_fraction=0.2, seed=0):
    """Isotropic Gaussian classes around random unit-scale means.

    Parameters
    ----------
    num_samples : int
        Training rows, split evenly over classes (ignored with ``class_counts``).
    num_features : int
    num_classes : int, optional
        Default 4, or ``len(class_counts)``.
    class_counts : sequence of int, optional
        Training rows per class.
    test_fraction : float
        Test rows per class as a share of that class's training rows (at least 1).
    seed : int

    Returns
    -------
    Dataset
        Inputs of shape (n, num_features).
    """
    if class_counts is None:
        num_classes = num_classes or GAUSSIAN_CLASSES
        class_counts = np.full(num_classes, num_samples // num_classes)
        class_counts[: num_samples % num_classes] += 1
    class_counts = np.asarray(class_counts, dtype=np.int64)
    rng = np.random.default_rng(seed)
    class_means = rng.normal(size=(class_counts.size, num_features))

    def draw(counts):
        labels = rng.permutation(np.repeat(np.arange(counts.size), counts))
        inputs = class_means[labels] + rng.normal(size=(labels.size, num_features))
        return inputs.astype(np.float32), labels

    x_train, y_train = draw(class_counts)
    x_test, y_test = draw(np.maximum(np.round(class_counts * test_fraction), 1).astype(np.int64))
    return Dataset(x_train, y_train, x_test, y_test, int(class_counts.size), "gaussian")


def _mnist1d(num_samples, seed):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset seeds numpy's global generator; leave the caller's state as it was.
    state = np.random.get_state()
    try:
        data = make_dataset(args)  # generated locally from templates; no download
    finally:
        np.random.set_state(state)
    return Dataset(data["x"].astype(np.float32), data["y"].astype(np.int64),
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int64),
                   10, "mnist1d")


def _npz(path, test_fraction, seed):
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise ValueError(
                f"dataset file {path!r} lacks array(s) {sorted(missing)}; it holds "
                f"{sorted(archive.files)}")
        arrays = {key: archive[key] for key in archive.files}
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, missing = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"dataset file {path!r} holds {given} but no {missing}; give both "
                         "(a test split) or neither (20% of x is held out)")
    x_train, y_train = _checked_pair(path, arrays["x"], arrays["y"], "x", "y")
    if "x_test" not in arrays:
        return _split("npz", x_train, y_train, _num_classes(path, y_train), test_fraction, seed)
    x_test, y_test = _checked_pair(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"{path!r}: x_test rows have shape {x_test.shape[1:]} but x rows have "
                         f"shape {x_train.shape[1:]}; both splits need inputs of one shape")
    return Dataset(x_train, y_train, x_test, y_test, _num_classes(path, y_train, y_test), "npz")


def _checked_pair(path, inputs, labels, inputs_key, labels_key):
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise ValueError(
            f"{path!r}: {labels_key} must be a 1-D integer array; found dtype {labels.dtype}, "
            f"shape {labels.shape}")
    real = inputs.dtype.kind in "biuf"
    if not real or inputs.ndim < 2:
        raise ValueError(
            f"{path!r}: {inputs_key} must be a real-valued array of shape (n, ...) with one "
            f"row per sample; found dtype {inputs.dtype}, shape {inputs.shape}"
            f"{' (one value per sample: use x[:, None])' if real and inputs.ndim == 1 else ''}")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path!r}: {inputs_key} has {inputs.shape[0]} rows but {labels_key} has "
            f"{labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError(f"{path!r}: {inputs_key} and {labels_key} hold no rows")
    if labels.min() < 0:
        raise ValueError(f"{path!r}: {labels_key} holds negative labels; use 0..C-1")
    inputs = inputs.astype(np.float32)
    finite = np.isfinite(inputs.reshape(len(inputs), -1)).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{path!r}: {inputs_key} row {np.flatnonzero(~finite)[0]} holds NaN, Inf or a value "
            "beyond float32; every input must be finite: drop or repair such rows")
    return inputs, labels.astype(np.int64)


def _num_classes(source, *label_arrays):
    """C = the largest label + 1, refused when most of those classes would have no row.

    Parameters
    ----------
    source : str
        The file (or dataset) the labels come from, for the error.
    *label_arrays : int arrays
        Every split's labels.

    Returns
    -------
    int
    """
    labels = np.concatenate(label_arrays)
    largest, distinct = int(labels.max()), np.unique(labels).size
    if mostly_empty(largest, distinct):
        raise ValueError(
            f"{source!r}: the labels reach {largest} but only {distinct} distinct labels occur, "
            f"so {largest + 1 - distinct} of the {largest + 1} classes would be empty: remap "
            "them to 0..C-1 (np.unique(y, return_inverse=True))")
    return largest + 1


def _split(name, inputs, labels, num_classes, test_fraction, seed):
    """Random train/test split of one labelled array of ``num_classes`` classes."""
    order = np.random.default_rng(seed).permutation(labels.size)
    num_test = max(1, int(round(labels.size * test_fraction)))
    test, train = order[:num_test], order[num_test:]
    inputs = inputs.astype(np.float32)
    labels = labels.astype(np.int64)
    return Dataset(inputs[train], labels[train], inputs[test], labels[test], num_classes, name)
