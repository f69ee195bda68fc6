"""The engine: one loop for every backend and every way of feeding rows.

``run`` is the whole analysis: resolve C, pass 1, finalize, the pass-2 plan,
pass 2, the report. ``collapse`` (any backend), ``ncfast.dask``,
``ncfast.distributed`` and saved states (``ncfast.states``) use its pieces:
``resolve_num_classes``, ``finalize_pass1``, ``ResidualPass`` (which owns the
label-noise split of a chunk, ``pass2_updates``) and ``ResidualPass.report``.
A backend (``ncfast.backends``) supplies the chunks, the states chunks are
added into, and the pair sweep's tiles.
"""
import copy
import functools
import sys
import warnings

import numpy as np

from ncfast.accumulators import (ClassSums, ResidualStats, check_class_state_fits,
                                 class_state_bytes_beyond_memory)
from ncfast.backends.cpu import CPU
from ncfast.geometry import PINV_RTOL, Geometry, check_global_mean
from ncfast.inputs import as_array, host_array, plain_tensor, to_kernel_labels
from ncfast.metrics import collapse_metrics, noise_metrics
from ncfast.plan import build_plan, check_classifier
from ncfast.progress import NO_PROGRESS, stage_progress
from ncfast.report import CollapseReport

EMPTY_CLASS_POLICIES = ("warn", "ignore", "raise")

NOISE_WITH_MEANS = ("clean_labels needs the clean-row means of these features, so it cannot be "
                    "combined with means=; measure label noise on the training features")


def check_options(*, empty_classes="warn", pinv_rtol=PINV_RTOL, global_mean="classes"):
    """Refuse an ``empty_classes`` outside ``EMPTY_CLASS_POLICIES``, a ``global_mean``
    outside ``GLOBAL_MEANS`` or a ``pinv_rtol`` that is not a number in (0, 1)."""
    if empty_classes not in EMPTY_CLASS_POLICIES:
        raise ValueError(
            f"empty_classes must be one of {EMPTY_CLASS_POLICIES}; found {empty_classes!r}")
    check_global_mean(global_mean)
    if isinstance(pinv_rtol, bool) or not isinstance(pinv_rtol, (int, float, np.floating)):
        raise TypeError(f"pinv_rtol must be a float; found {pinv_rtol!r}")
    if not 0.0 < pinv_rtol < 1.0:  # NaN fails too
        raise ValueError(
            f"pinv_rtol must be in (0, 1), the fraction of the largest eigenvalue below which "
            f"eigenvalues count as zero; found {pinv_rtol!r} (default {PINV_RTOL})")


def resolve_num_classes(num_classes, source, means, *, num_features=None, label_noise=False,
                        accept_empty="pass num_classes= to accept the empty classes"):
    """C from the option, the given means, or the labels.

    When C is inferred from the labels (largest label + 1) and more than half
    of the classes it implies would have no row, a stray label is far more
    likely than a dataset of mostly empty classes: that is an error naming the
    row, never an allocation sized by the stray value.

    Parameters
    ----------
    num_classes : int or None
    source : object with ``label_summary()`` (see ``ncfast.backends``), or None
        Read only when C must be inferred.
    means : array or CollapseReport, or None
    num_features : int, optional
        D: a given ``num_classes`` whose per-class sums could not fit in
        memory is refused.
    label_noise : bool
        Pass 1 also keeps clean-row sums (twice the memory).
    accept_empty : str or None
        How the caller can accept the empty classes a stray label would leave, said when
        they would fit in memory; None where it cannot (``ncfast analyze``).

    Returns
    -------
    int
    """
    if num_classes is None and means is not None:
        num_classes = means_and_counts(means)[0].shape[0]
    if num_classes is None:
        if source is None:
            raise ValueError("num_classes is required when the labels cannot be read first")
        max_label, max_row, max_kind, labelled = source.label_summary()
        if mostly_empty(max_label, labelled):
            raise ValueError(
                f"row {max_row} has {max_kind} {max_label}, but only {labelled} distinct labels "
                "occur, "
                f"so inferring num_classes = {max_label + 1} would leave "
                f"{max_label + 1 - labelled} classes empty: if that label is a mistake, fix it; "
                "if the labels are not 0..C-1, remap them (np.unique(labels, "
                "return_inverse=True))" + ("" if accept_empty is None
                                           or class_state_bytes_beyond_memory(
                                               max_label + 1, num_features, label_noise)
                                           else f"; or {accept_empty}"))
        num_classes = max_label + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be an int; found {num_classes!r}")
    num_classes = int(num_classes)  # a numpy integer would wrap in the memory check below
    if num_classes < 2:
        raise ValueError(
            f"num_classes is {num_classes}; neural collapse compares classes, so at least 2 are "
            "needed (labels must be class indices starting at 0)")
    check_class_state_fits(num_classes, num_features, label_noise)
    return num_classes


def mostly_empty(max_label, labelled):
    """Whether C = ``max_label + 1`` inferred from labels of ``labelled`` distinct values
    would leave more than half of the classes without a row (a stray label is then far
    more likely than a dataset of mostly empty classes)."""
    return max_label + 1 > 2 * labelled


def _check_empty_classes(counts, policy):
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0 or policy == "ignore":
        return
    shown = ", ".join(map(str, empty[:20])) + (" ..." if empty.size > 20 else "")
    message = (f"{empty.size} of {counts.size} classes have no rows ({shown}); metrics cover "
               "the other classes")
    if policy == "raise":
        raise ValueError(message + "; pass empty_classes='warn' to accept this")
    warnings.warn(message, stacklevel=5)


def finalize_pass1(class_sums, *, global_mean="classes", empty_classes="warn"):
    """Class means of a finished pass 1, checked for empty classes.

    Parameters
    ----------
    class_sums : ClassSums
        The merged pass-1 state of all rows.
    global_mean : {"classes", "samples"}
    empty_classes : {"warn", "ignore", "raise"}
        As in ``ncfast.collapse``.

    Returns
    -------
    geometry : Geometry
        Built on the means of all rows.
    clean_geometry : Geometry or None
        Built on the means of the clean rows, when ``class_sums`` tracks them.
    """
    check_options(empty_classes=empty_classes)
    if class_sums.counts.sum() == 0:
        raise ValueError("the input has no rows; pass at least one row per class")
    _check_empty_classes(class_sums.counts, empty_classes)
    geometry = Geometry.from_class_sums(class_sums.counts, class_sums.sums,
                                        sum_errors=class_sums.sum_errors,
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
            class_sums.clean_counts, class_sums.clean_sums,
            sum_errors=class_sums.clean_sum_errors, global_mean=global_mean)
    return geometry, clean_geometry


#: How a re-iterable source gives both passes the same rows.
SAME_ROWS_FIX = ("it must yield the same rows each time it is iterated (no random "
                 "augmentation, no shuffling with drop_last, no random sampling, a model in "
                 "the same mode), or pass the features as one array")

#: How much the class means of a source's rows read twice may differ between the passes,
#: as the share of the within-class scatter the difference adds to pass 2's residuals
#: (``check_same_class_sums``). Rows a model computes again with other roundings (float32
#: reductions in another order, TF32, bfloat16) added at most 0.5% in simulations of
#: collapsed features; a model in another mode, or rows that changed between the passes,
#: add far more.
SAME_ROWS_MAX_SCATTER = 0.01


def check_same_rows(first_counts, second_counts, *, source, fix):
    """Refuse a pass 2 over other rows than pass 1's (a source read twice).

    Parameters
    ----------
    first_counts, second_counts : int arrays of shape (C,)
        Rows per class read by pass 1 and by pass 2.
    source : str
        What was read ("the chunk source", "the loader").
    fix : str
        How to give the same rows twice.
    """
    first_counts, second_counts = np.asarray(first_counts), np.asarray(second_counts)
    if not np.array_equal(first_counts, second_counts):
        raise ValueError(
            f"{source} yielded different rows in the two passes (rows per class "
            f"{first_counts.tolist()}, then {second_counts.tolist()}); the class means would "
            f"not be those of the rows measured: {fix}")


def check_same_class_sums(first, second, sq_norm_sums, *, source, fix):
    """Refuse a pass 2 whose rows do not have pass 1's class means.

    Pass 2 takes its residuals from pass 1's means ``mu_c``; the rows it reads
    have means ``mu'_c = mu_c + delta_c``. Its within-class scatter is then
    that of its own rows plus ``sum_c n_c ||delta_c||^2``, which
    ``sum_c ||S'_c - S_c||^2 / n_c`` gives from the class sums alone. That
    share of ``sum_i ||r_i||^2`` may be at most ``SAME_ROWS_MAX_SCATTER``: the
    report is then, to that share, the one-pass measurement of pass 2's rows.
    (Random augmentation mostly averages out of the class means and is not
    caught by this.)

    Parameters
    ----------
    first, second : ClassSums
        The rows read by pass 1, and the same sums of the rows read by pass 2.
    sq_norm_sums : float64 array of shape (C,)
        ``sum_i ||r_i||^2`` per class, of pass 2's rows from pass 1's means.
    source, fix : str
        As for ``check_same_rows``.
    """
    check_same_rows(first.counts, second.counts, source=source, fix=fix)
    counts = first.counts.astype(np.float64)
    sq_differences = np.sum(((second.sums - first.sums)
                             + (second.sum_errors - first.sum_errors)) ** 2, axis=1)
    added = float(np.sum(sq_differences[counts > 0] / counts[counts > 0]))
    scatter = float(np.sum(sq_norm_sums))
    if not added <= SAME_ROWS_MAX_SCATTER * scatter:
        share = (f"{added / scatter:.3g} times the within-class scatter (at most "
                 f"{SAME_ROWS_MAX_SCATTER} times it may be added)" if scatter > 0 else
                 "a within-class scatter to rows that have none")
        raise ValueError(
            f"{source} yielded other rows in the two passes: their class means differ from "
            f"pass 1's by enough to add {share}; the class means would not be those of the "
            f"rows measured: {fix}")


def means_and_counts(means):
    """``collapse``'s ``means=`` option as host arrays.

    Parameters
    ----------
    means : array-like or ``.npy`` path of shape (C, D), or CollapseReport

    Returns
    -------
    means : array of shape (C, D)
    counts : int64 array of shape (C,), or None
        The report's rows per class; None for plain means.
    """
    if isinstance(means, CollapseReport):
        return means.means, means.mean_counts
    if isinstance(means, ClassSums):
        raise TypeError(
            "means= takes class means of shape (num_classes, n_features) or a CollapseReport; "
            "found a ClassSums: pass the training rows' CollapseReport, or "
            "class_sums.means()")
    array = host_array(means, "means")
    if array.ndim != 2:
        raise ValueError(
            f"means has shape {array.shape}; expected (num_classes, n_features)")
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"means must be floating point (class means); found dtype "
                        f"{array.dtype}: pass the training report, or its .means")
    return array, None


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
    means, counts = means_and_counts(means)
    if means.shape[0] != num_classes:
        raise ValueError(
            f"means has shape {means.shape}; expected (num_classes, n_features) with "
            f"num_classes={num_classes}")
    if means.shape[1] != num_features:
        raise ValueError(
            f"means has {means.shape[1]} features per class but the features have "
            f"{num_features} columns; pass the means of the same layer")
    if global_mean == "samples" and counts is None:
        raise ValueError(
            "global_mean='samples' weighs each class mean by its training rows, which an "
            "array of means does not carry: pass the training report (a CollapseReport) as "
            "means=, or use global_mean='classes'")
    return Geometry.from_means(means, counts, global_mean=global_mean)


PARTS = ("stats", "clean_stats", "corrupted_stats")
#: The rows each part of a ``ResidualPass`` holds, for its messages.
PART_ROWS = {"stats": "every row (against the class means of the training labels)",
             "clean_stats": "the clean rows (against the clean-row class means)",
             "corrupted_stats": "the corrupted rows (against the clean-row class means)"}


def pass2_updates(labels, clean_labels=None, clean_label_rows=None):
    """How one chunk enters pass 2: ``(part, labels, include, corrupted)`` per state.

    Without label noise (``clean_label_rows`` None) every row goes to ``stats``.
    With it, every row goes to ``stats`` with its corrupted flag; the clean rows
    to ``clean_stats``; and the corrupted rows whose true class has clean rows
    to ``corrupted_stats`` under their true label (memorization measures them
    against that class's clean mean). Works on numpy or cupy labels.

    Parameters
    ----------
    labels, clean_labels : int arrays of shape (n,)
    clean_label_rows : int array of shape (C,), optional
        Row of each class among the clean means, -1 without one.

    Returns
    -------
    list of (str, int array, bool array or None, bool array or None)
    """
    if clean_label_rows is None:
        return [("stats", labels, None, None)]
    if clean_labels is None:
        raise ValueError("this analysis measures label noise; pass clean_labels with every row")
    corrupted = labels != clean_labels
    measurable = corrupted & (clean_label_rows[clean_labels] >= 0)
    return [("stats", labels, None, corrupted),
            ("clean_stats", labels, ~corrupted, None),
            ("corrupted_stats", clean_labels, measurable, None)]


class ResidualPass:
    """Pass-2 state of one analysis: ``ResidualStats`` of every row and, with
    label noise, of the clean and the corrupted rows against the clean means.

    The pass-2 plans (``ncfast.plan``) are built once here, on ``backend``.
    Partial states built from the same geometries merge by ``+`` (or ``+=``, ``sum``);
    ``sum_arrays`` lists what a merge adds, for reductions that move arrays
    rather than objects (Dask, torch.distributed).

    Parameters
    ----------
    geometry : Geometry
        Class means of all rows (pass 1, or given means).
    clean_geometry : Geometry, optional
        Means of the clean rows; enables the label-noise metrics.
    weights : array of shape (C, D), optional
    bias : array of shape (C,), optional
    backend : backend, optional
        Where the plans' pair sweeps run (the CPU by default).
    progress : ncfast.progress.StageProgress, optional
        Shows the tiles of the pair sweeps (none by default).

    Attributes
    ----------
    stats : ResidualStats
        Every row against ``geometry``, corrupted rows flagged.
    clean_stats, corrupted_stats : ResidualStats or None
        Clean rows, and corrupted rows under their true label, against
        ``clean_geometry``.
    """

    def __init__(self, geometry, clean_geometry=None, *, weights=None, bias=None, backend=CPU,
                 progress=NO_PROGRESS):
        self.stats = ResidualStats(build_plan(
            geometry, weights, bias, backend=backend,
            progress=functools.partial(progress.stage, "class pairs", unit="tiles")))
        self.clean_stats = self.corrupted_stats = None
        if clean_geometry is not None:
            clean_plan = build_plan(clean_geometry, backend=backend, progress=functools.partial(
                progress.stage, "class pairs of the clean rows", unit="tiles"))
            self.clean_stats = ResidualStats(clean_plan)
            self.corrupted_stats = ResidualStats(clean_plan)

    @property
    def has_noise(self):
        return self.clean_stats is not None

    @property
    def clean_label_rows(self):
        """Row of each class among the clean means (-1 without one), or None without noise."""
        return None if self.clean_stats is None else self.clean_stats.geometry.label_rows

    def parts(self):
        """``{part: ResidualStats}`` of the states this pass has."""
        return {name: getattr(self, name) for name in PARTS if getattr(self, name) is not None}

    def update(self, features, labels, clean_labels=None, *, row_offset=0):
        """Add a chunk of rows (host arrays or tensors).

        Parameters
        ----------
        features : array of shape (n, D)
        labels : int array of shape (n,)
        clean_labels : int array of shape (n,), required exactly when ``has_noise``
        row_offset : int
            Index of the chunk's first row in the whole input (error messages).
        """
        parts = self.parts()
        if clean_labels is not None and not self.has_noise:
            raise ValueError("clean_labels were given, but this pass-2 state was built without "
                             "clean means; build it with the clean geometry of finalize_pass1")
        if clean_labels is not None:
            labels = to_kernel_labels(labels, row_offset=row_offset)
            clean_labels = to_kernel_labels(clean_labels, "clean_labels", row_offset)
        for part, part_labels, include, corrupted in pass2_updates(labels, clean_labels,
                                                                   self.clean_label_rows):
            parts[part].update(features, part_labels, corrupted, include=include,
                               row_offset=row_offset)
        return self

    def sum_arrays(self):
        """The arrays a merge adds, in a fixed order (the state's own, not copies).

        Returns
        -------
        list of float64 or int64 arrays
            Each ``ResidualStats``'s NC1 eigen-diagonal, per-class sums and tallies.
        """
        return [getattr(stats, name) for stats in self.parts().values()
                for name in stats.sum_names]

    def check_compatible(self, other):
        """Raise TypeError or ValueError unless ``other`` can be added to this state, naming
        the rows of the part that differs."""
        if not isinstance(other, ResidualPass):
            raise TypeError(f"cannot merge a ResidualPass with a {type(other).__name__}; add "
                            "ResidualPass states to each other (a ResidualStats goes into a "
                            "pass's .stats)")
        if other.has_noise != self.has_noise:
            with_noise = "with" if self.has_noise else "without"
            raise TypeError(f"cannot merge pass-2 states of different kinds: this one is "
                            f"{with_noise} label noise (clean-row means), the other is not")
        for (part, mine), theirs in zip(self.parts().items(), other.parts().values()):
            try:
                mine.check_compatible(theirs)
            except ValueError as error:
                raise ValueError(f"{PART_ROWS[part]}: {error}") from None

    def __iadd__(self, other):
        """Add ``other``'s sums, all or nothing: every part is checked before any is added."""
        self.check_compatible(other)
        for mine, theirs in zip(self.parts().values(), other.parts().values()):
            mine += theirs
        return self

    def __add__(self, other):
        """A new state of both states' rows; neither is changed."""
        self.check_compatible(other)
        merged = self._empty_copy()
        merged += self
        merged += other
        return merged

    def __radd__(self, other):
        """``0 + state``: the start of ``sum(states)``."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self + self._empty_copy()
        return NotImplemented

    def _empty_copy(self):
        """A state of no rows on this state's plans (none is built again)."""
        empty = copy.copy(self)
        for part, stats in self.parts().items():
            setattr(empty, part, ResidualStats(stats.plan, class_tile=stats.class_tile))
        return empty

    def report(self, *, pinv_rtol=PINV_RTOL, ood_mean=None, xp=np):
        """The ``CollapseReport`` of the merged pass 2 of all rows.

        Parameters
        ----------
        pinv_rtol : float
        ood_mean : float64 array of shape (D,), optional
            Mean of out-of-distribution features (NC5).
        xp : module
            The backend's array namespace.
        """
        stats, geometry = self.stats, self.stats.geometry
        if stats.num_rows == 0:
            raise ValueError("the input has no rows; pass at least one row per class")
        result = collapse_metrics(stats, pinv_rtol=pinv_rtol, ood_mean=ood_mean, xp=xp)
        if self.has_noise:
            result.update(noise_metrics(stats, self.clean_stats, self.corrupted_stats,
                                        pinv_rtol=pinv_rtol))
        return CollapseReport(
            num_samples=stats.num_rows, num_classes=geometry.num_classes,
            num_features=geometry.num_features, means=geometry.means,
            present_classes=geometry.present, pinv_rtol=pinv_rtol,
            global_mean=geometry.global_mean_option, mean_counts=geometry.counts, **result)


def check_ood_layout(shape, dtype, num_features):
    """Raise unless ``collapse``'s ``ood=`` of this shape and dtype is usable: floating
    point, at least one row of ``num_features`` values, or one mean of them.

    Parameters
    ----------
    shape : tuple of int
    dtype : numpy dtype
    num_features : int
    """
    if len(shape) not in (1, 2) or shape[-1] != num_features:
        raise ValueError(f"ood has shape {tuple(shape)}; pass OOD features of shape "
                         f"(n, {num_features}) or their mean, shape ({num_features},)")
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"ood must be floating point; found dtype {dtype}")
    if len(shape) == 2 and shape[0] == 0:
        raise ValueError("ood has no rows; pass at least one OOD feature row")


def ood_mean_of(ood, num_features):
    """The mean of out-of-distribution features (``collapse``'s ``ood=``), in float64.

    Parameters
    ----------
    ood : array of shape (n, D) or (D,), path, tensor or CuPy array
        OOD feature rows (averaged in blocks, in float64), or their mean.
    num_features : int

    Returns
    -------
    float64 array of shape (D,), on the host
    """
    cupy = sys.modules.get("cupy")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ood, torch.Tensor):
        ood = plain_tensor(ood, "ood")
        if ood.device.type != "cpu":
            ood = ood.double().mean(dim=0) if ood.ndim == 2 else ood
            ood = ood.cpu()
        ood = ood.double().numpy()
    elif cupy is not None and isinstance(ood, cupy.ndarray):
        ood = (ood.astype(cupy.float64).mean(axis=0) if ood.ndim == 2 else ood).get()
    ood = as_array(ood, "ood")
    check_ood_layout(ood.shape, ood.dtype, num_features)
    if ood.ndim == 2:
        total = np.zeros(num_features)
        for start in range(0, ood.shape[0], 1 << 16):
            total += np.asarray(ood[start:start + (1 << 16)]).sum(axis=0, dtype=np.float64)
        ood = total / ood.shape[0]
    ood = np.asarray(ood, dtype=np.float64)
    if not np.isfinite(ood).all():
        raise ValueError("ood holds NaN or Inf; OOD features must be finite")
    return ood


def run(backend, source, *, num_classes=None, weights=None, bias=None, means=None,
        clean_labels_given=False, global_mean="classes", empty_classes="warn",
        pinv_rtol=PINV_RTOL, ood=None, progress=False):
    """The whole analysis on one backend: both passes and the report.

    Parameters
    ----------
    backend : backend (``ncfast.backends``)
    source : the backend's chunk source of the features
    clean_labels_given : bool
        ``collapse`` was given ``clean_labels`` (a chunk source may also bring
        its own).
    other parameters
        As in ``ncfast.collapse``.

    Returns
    -------
    CollapseReport
    """
    check_options(empty_classes=empty_classes, pinv_rtol=pinv_rtol, global_mean=global_mean)
    shown = stage_progress(progress)
    has_noise = clean_labels_given or source.carries_clean_labels
    if has_noise and means is not None:
        raise ValueError(NOISE_WITH_MEANS)
    num_features = source.num_features
    num_classes = resolve_num_classes(num_classes, source, means, num_features=num_features,
                                      label_noise=has_noise)
    check_classifier(weights, bias, num_classes, num_features, copy=False)  # before pass 1
    ood_mean = None if ood is None else ood_mean_of(ood, num_features)

    num_rows = source.num_rows  # None: not known before it is read
    with source.context(), shown:
        clean_geometry = None
        if means is None:
            class_sums = ClassSums(num_classes, num_features, track_clean=has_noise)
            state = backend.pass1_state(class_sums)
            # Each pass's stage ends after its finish, which waits for a GPU and raises for
            # the first bad row.
            with shown.stage("pass 1: class sums", num_rows) as rows_done:
                for chunk in source.chunks(1):
                    state.update(chunk.features, chunk.labels, chunk.clean_labels,
                                 row_offset=chunk.offset)
                    rows_done(chunk.features.shape[0])
                backend.finish_pass1(state, class_sums, source)
            geometry, clean_geometry = finalize_pass1(class_sums, global_mean=global_mean,
                                                      empty_classes=empty_classes)
            pass1_counts = class_sums.counts
            if not source.rereads:  # only the counts are checked again: the C×D sums go
                state = class_sums = None
        else:
            geometry = geometry_from_means_option(means, num_classes, num_features,
                                                  global_mean)

        residual_pass = ResidualPass(geometry, clean_geometry, weights=weights, bias=bias,
                                     backend=backend, progress=shown)
        states = backend.pass2_states(residual_pass, source)
        clean_label_rows = residual_pass.clean_label_rows
        if clean_label_rows is not None:
            clean_label_rows = backend.xp.asarray(clean_label_rows)
        # A chunk source iterated again may yield other rows (a model in another mode, rows
        # that changed): its pass 2 sums its rows by class too, for check_same_class_sums.
        rows_again = None
        if means is None and source.rereads:
            rows_again = ClassSums(num_classes, num_features)
            rows_again_state = backend.pass1_state(rows_again)
        with shown.stage("pass 2: residuals", num_rows) as rows_done:
            for chunk in source.chunks(2):
                for part, labels, include, corrupted in pass2_updates(
                        chunk.labels, chunk.clean_labels, clean_label_rows):
                    states[part].update(chunk.features, labels, corrupted, include=include,
                                        row_offset=chunk.offset)
                if rows_again is not None:
                    rows_again_state.update(chunk.features, chunk.labels, None,
                                            row_offset=chunk.offset)
                rows_done(chunk.features.shape[0])
            backend.finish_pass2(states, residual_pass, source)
        if rows_again is not None:
            backend.finish_pass1(rows_again_state, rows_again, source)
            check_same_class_sums(class_sums, rows_again, residual_pass.stats.sq_norm_sums,
                                  source="the chunk source", fix=SAME_ROWS_FIX)
        elif means is None:
            check_same_rows(pass1_counts, residual_pass.stats.counts,
                            source="the chunk source", fix=SAME_ROWS_FIX)
    return residual_pass.report(pinv_rtol=pinv_rtol, ood_mean=ood_mean, xp=backend.xp)

