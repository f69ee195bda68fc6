"""``ncfast.collapse``: validate, stream the two passes, assemble the report."""
import warnings

import numpy as np

from ncfast.accumulators import ClassSums, ResidualStats
from ncfast.geometry import PINV_RTOL, Geometry
from ncfast.inputs import as_source, carries_clean_labels, host_array, num_features_of
from ncfast.metrics import collapse_metrics, noise_metrics
from ncfast.report import CollapseReport

EMPTY_CLASS_POLICIES = ("warn", "ignore", "raise")


def collapse(features, labels=None, *, num_classes=None, weights=None, bias=None, means=None,
             clean_labels=None, global_mean="classes", chunk_size=None, empty_classes="warn",
             pinv_rtol=PINV_RTOL, device="auto"):
    """Measure neural collapse of a set of features in two streaming passes.

    Parameters
    ----------
    features : array of shape (n_samples, n_features), path, tensor or chunk source
        Any float dtype (float16/bfloat16 are upcast per chunk); a numpy
        array or ``np.memmap``, the path of a ``.npy`` file (memory-mapped),
        a torch CPU tensor (viewed without a copy), or a re-iterable of
        ``(features, labels)`` / ``(features, labels, clean_labels)`` chunks
        (then ``labels`` is None and ``num_classes`` is required).
    labels : int array of shape (n_samples,)
        Class of each row, in ``[0, num_classes)``; any integer dtype.
    num_classes : int, optional
        Number of classes C; defaults to the largest label + 1.
    weights : array of shape (C, n_features), optional
        Last-layer classifier ``W`` (``nn.Linear.weight``); enables NC2 on W,
        NC3, NC4, accuracy and bias collapse.
    bias : array of shape (C,), optional
    means : array of shape (C, n_features) or CollapseReport, optional
        Measure against these class means (e.g. the training report's) instead
        of the features' own: NCC generalisation on held-out features. Pass 1
        is skipped. NaN rows mark classes without a mean.
    clean_labels : int array of shape (n_samples,), optional
        True labels when ``labels`` are noisy: enables memorization, dilation,
        noise fit and the NC1 of clean rows (Nguyen et al. 2023).
    global_mean : {"classes", "samples"}
        mu_G as the mean of the class means, or of all rows.
    chunk_size : int, optional
        Rows per chunk; chosen from the row width by default. Results do not
        depend on it beyond float64 rounding.
    empty_classes : {"warn", "ignore", "raise"}
        What to do when some of the C classes have no rows: metrics run over
        the present classes, with a warning naming the others, silently, or
        not at all (ValueError).
    pinv_rtol : float
        Eigenvalues below this fraction of the largest are cut in the
        pseudo-inverse; the report carries the rank kept.
    device : {"auto", "cpu", "cuda"}
        Where the passes run. "auto": CuPy arrays and torch CUDA tensors on
        their GPU (read in place), everything else on the CPU; "cuda": on the
        GPU, streaming host data to it (needs CuPy, ``ncfast[gpu]``).

    Returns
    -------
    CollapseReport
    """
    check_empty_class_policy(empty_classes)
    from ncfast import cuda  # imports no CuPy until the GPU is used
    if cuda.runs_on_gpu(device, features):
        return cuda.collapse_on_gpu(
            features, labels, num_classes=num_classes, weights=weights, bias=bias, means=means,
            clean_labels=clean_labels, global_mean=global_mean, chunk_size=chunk_size,
            empty_classes=empty_classes, pinv_rtol=pinv_rtol)
    source = as_source(features, labels, clean_labels, chunk_size=chunk_size)
    num_classes = resolve_num_classes(num_classes, source, means)
    has_noise = clean_labels is not None or carries_clean_labels(source)

    clean_geometry = None
    if means is None:
        class_sums = ClassSums(num_classes, num_features_of(source), track_clean=has_noise)
        for chunk in source:
            class_sums.update(chunk.features, chunk.labels, chunk.clean_labels,
                              row_offset=chunk.offset)
        geometry, clean_geometry = finalize_pass1(class_sums, global_mean=global_mean,
                                                  empty_classes=empty_classes)
    else:
        if has_noise:
            raise ValueError(
                "clean_labels needs the clean-row means of these features, so it cannot be "
                "combined with means=; measure label noise on the training features")
        geometry = geometry_from_means_option(means, num_classes, num_features_of(source),
                                              global_mean)

    residual_pass = ResidualPass(geometry, clean_geometry, weights=weights, bias=bias)
    for chunk in source:
        residual_pass.update(chunk)
    return residual_pass.report(global_mean=global_mean, pinv_rtol=pinv_rtol)


def finalize_pass1(class_sums, *, global_mean="classes", empty_classes="warn"):
    """Class means of a finished pass 1, checked for empty classes.

    Parameters
    ----------
    class_sums : ClassSums
        The merged pass-1 state of all rows.
    global_mean : {"classes", "samples"}
    empty_classes : {"warn", "ignore", "raise"}
        As in ``collapse``.

    Returns
    -------
    geometry : Geometry
        Built on the means of all rows.
    clean_geometry : Geometry or None
        Built on the means of the clean rows, when ``class_sums`` tracks them.
    """
    if class_sums.counts.sum() == 0:
        raise ValueError("the input has no rows; pass at least one row per class")
    _check_empty_classes(class_sums.counts, empty_classes)
    geometry = Geometry.from_class_sums(class_sums.counts, class_sums.sums,
                                        global_mean=global_mean)
    clean_geometry = None
    if class_sums.track_clean:
        clean_classes = int((class_sums.clean_counts > 0).sum())
        if clean_classes < 2:
            raise ValueError(
                f"the clean rows (label equal to clean label) cover {clean_classes} class(es); "
                "memorization and dilation measure distances between clean class means, so "
                "at least 2 classes need clean rows: check that clean_labels are the true labels")
        clean_geometry = Geometry.from_class_sums(
            class_sums.clean_counts, class_sums.clean_sums, global_mean=global_mean)
    return geometry, clean_geometry


class ResidualPass:
    """Pass-2 state of one analysis: ``ResidualStats`` of every row and, with
    label noise, of the clean and the corrupted rows against the clean means.

    Partial states built from the same ``Geometry`` (a copy each) merge by
    ``+=``; ``sum_arrays`` lists what a merge adds, for reductions that move
    arrays rather than objects (Dask, torch.distributed).

    Parameters
    ----------
    geometry : Geometry
        Class means of all rows (pass 1, or given means).
    clean_geometry : Geometry, optional
        Means of the clean rows; enables the label-noise metrics.
    weights : array of shape (C, D), optional
    bias : array of shape (C,), optional

    Attributes
    ----------
    stats : ResidualStats
        Every row against ``geometry``, corrupted rows flagged.
    clean_stats, corrupted_stats : ResidualStats or None
        Clean rows, and corrupted rows under their true label, against
        ``clean_geometry``.
    """

    def __init__(self, geometry, clean_geometry=None, *, weights=None, bias=None):
        self.stats = ResidualStats(geometry, weights=weights, bias=bias)
        self.clean_stats = self.corrupted_stats = None
        if clean_geometry is not None:
            self.clean_stats = ResidualStats(clean_geometry)
            self.corrupted_stats = ResidualStats(clean_geometry)

    @property
    def has_noise(self):
        return self.clean_stats is not None

    def update(self, chunk):
        """Add one ``Chunk`` (clean labels required exactly when ``has_noise``)."""
        if not self.has_noise:
            self.stats.update(chunk.features, chunk.labels, row_offset=chunk.offset)
            return self
        if chunk.clean_labels is None:
            raise ValueError("this analysis measures label noise; pass clean_labels with every row")
        corrupted = chunk.labels != chunk.clean_labels
        self.stats.update(chunk.features, chunk.labels, corrupted, row_offset=chunk.offset)
        self.clean_stats.update(chunk.features[~corrupted], chunk.labels[~corrupted])
        # Memorization needs the clean mean of the true class; skip rows whose true
        # class has no clean row at all.
        clean_geometry = self.clean_stats.geometry
        measurable = corrupted & (clean_geometry.label_rows[chunk.clean_labels] >= 0)
        self.corrupted_stats.update(chunk.features[measurable], chunk.clean_labels[measurable])
        return self

    def _all_stats(self):
        return (self.stats,) if not self.has_noise else \
            (self.stats, self.clean_stats, self.corrupted_stats)

    def sum_arrays(self):
        """The arrays a merge adds, in a fixed order (the state's own, not copies).

        Returns
        -------
        list of float64 or int64 arrays
            Each ``ResidualStats``'s scatter, per-class sums and tallies.
        """
        return [getattr(stats, name) for stats in self._all_stats() for name in stats.sum_names]

    def __iadd__(self, other):
        if not isinstance(other, ResidualPass) or other.has_noise != self.has_noise:
            raise TypeError("cannot merge pass-2 states of different kinds (label noise or not)")
        for mine, theirs in zip(self._all_stats(), other._all_stats()):
            mine += theirs
        return self

    def report(self, *, global_mean, pinv_rtol=PINV_RTOL):
        """The ``CollapseReport`` of the merged pass 2 of all rows.

        Parameters
        ----------
        global_mean : {"classes", "samples"}
            The option the geometry was built with (recorded in the report).
        pinv_rtol : float
        """
        stats, geometry = self.stats, self.stats.geometry
        if stats.num_rows == 0:
            raise ValueError("the input has no rows; pass at least one row per class")
        result = collapse_metrics(geometry, stats, pinv_rtol=pinv_rtol)
        if self.has_noise:
            result.update(noise_metrics(stats, self.clean_stats.geometry, self.clean_stats,
                                        self.corrupted_stats, pinv_rtol=pinv_rtol))
        return CollapseReport(
            num_samples=stats.num_rows, num_classes=geometry.num_classes,
            num_features=geometry.num_features, means=geometry.means,
            present_classes=geometry.present, pinv_rtol=pinv_rtol, global_mean=global_mean,
            mean_counts=geometry.counts, **result)


def resolve_num_classes(num_classes, source, means):
    """C from the option, the given means, or the largest label of ``source`` + 1."""
    if num_classes is None and means is not None:
        num_classes = len(means.means if isinstance(means, CollapseReport) else means)
    if num_classes is None:
        if not hasattr(source, "max_label"):
            raise ValueError("num_classes is required when features is a chunk source")
        num_classes = source.max_label() + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int; found {num_classes!r}")
    if num_classes < 2:
        raise ValueError(
            f"num_classes is {num_classes}; neural collapse compares classes, so at least 2 are "
            "needed (labels must be class indices starting at 0)")
    return int(num_classes)


def _check_empty_classes(counts, policy):
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0 or policy == "ignore":
        return
    shown = ", ".join(map(str, empty[:20])) + (" ..." if empty.size > 20 else "")
    message = (f"{empty.size} of {counts.size} classes have no rows ({shown}); metrics cover "
               "the other classes")
    if policy == "raise":
        raise ValueError(message + "; pass empty_classes='warn' to accept this")
    warnings.warn(message, stacklevel=4)


def geometry_from_means_option(means, num_classes, num_features, global_mean):
    """The ``Geometry`` of ``collapse``'s ``means=`` option, checked against the data.

    Parameters
    ----------
    means : array of shape (C, D) or CollapseReport
        Class means to measure against (a report brings its row counts, for
        ``global_mean="samples"``).
    num_classes, num_features : int
        C and D of the features being measured.
    global_mean : {"classes", "samples"}
    """
    counts = None
    if isinstance(means, CollapseReport):
        means, counts = means.means, means.mean_counts
    means = host_array(means, "means")
    if means.ndim != 2 or means.shape[0] != num_classes:
        raise ValueError(
            f"means has shape {means.shape}; expected (num_classes, n_features) with "
            f"num_classes={num_classes}")
    if means.shape[1] != num_features:
        raise ValueError(
            f"means has {means.shape[1]} features per class but the features have "
            f"{num_features} columns; pass the means of the same layer")
    return Geometry.from_means(means, counts, global_mean=global_mean)


def check_empty_class_policy(empty_classes):
    """Refuse an ``empty_classes`` option outside ``EMPTY_CLASS_POLICIES``."""
    if empty_classes not in EMPTY_CLASS_POLICIES:
        raise ValueError(
            f"empty_classes must be one of {EMPTY_CLASS_POLICIES}; found {empty_classes!r}")
