"""Label noise: symmetric and pair-flip corruption at an exact rate."""
import numpy as np

#: Kinds accepted by :func:`corrupt_labels`.
NOISE_KINDS = ("symmetric", "pair")


def check_noise_options(rate, kind):
    """Raise ValueError unless ``rate`` lies in [0, 1) and ``kind`` is known."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must lie in [0, 1); found {rate}")


def corrupt_labels(labels, rate, *, num_classes, kind="symmetric", seed=0):
    """Relabel exactly ``round(rate * N)`` rows, chosen uniformly at random.

    Parameters
    ----------
    labels : int array of shape (N,)
        Clean labels in ``[0, num_classes)``; not modified.
    rate : float
        Fraction of rows to corrupt, in [0, 1). Zero returns an unchanged copy.
    num_classes : int
    kind : {"symmetric", "pair"}
        ``"symmetric"``: a corrupted row takes one of the other ``C - 1``
        classes uniformly at random. ``"pair"`` (class-dependent pair flip):
        class c always becomes ``(c + 1) mod C``.
    seed : int

    Returns
    -------
    noisy : int64 array of shape (N,)
        Every corrupted row differs from its clean label, so
        ``(noisy != labels).mean() == round(rate * N) / N``.
    """
    check_noise_options(rate, kind)
    labels = np.asarray(labels, dtype=np.int64)
    noisy = labels.copy()
    num_corrupted = int(round(rate * labels.size))
    if num_corrupted == 0:
        return noisy
    rng = np.random.default_rng(seed)
    rows = rng.choice(labels.size, size=num_corrupted, replace=False)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=num_corrupted)
    else:
        shift = 1
    noisy[rows] = (labels[rows] + shift) % num_classes
    return noisy
