"""Finalize: class means and the small float64 matrices both passes share.

Everything here is O(C·D + C²·D) or less and runs once per analysis, between
pass 1 and pass 2 (docs/algorithm.md, "Finalize").
"""
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from ncfast.kernels.cpu import one_blas_thread, run_tasks
from ncfast.sweep import pair_sq_distances

#: Eigenvalues below this fraction of the largest are cut in pseudo-inverses.
PINV_RTOL = 1e-10

#: A row closer to its class mean than this fraction of the distance from that
#: mean to the nearest other one is nearest to its own mean: for ``||r|| <= a g``
#: every other mean is at least ``(1 - a) g`` away (triangle inequality), more
#: than ``a g`` for ``a < 1/2``. At 0.45 the own mean wins by a factor 1.49 in
#: squared distance, far beyond rounding, so pass 2 skips such rows' search.
NCC_RADIUS_FRACTION = 0.45

#: Relative float64 rounding allowed where the pass-2 radii subtract large
#: numbers: distances from Gram matrices (cancellation is about 1e-16 of
#: ``||a||^2 + ||b||^2``) and logit gaps. Radii are shrunk by it, so they err small.
ROUNDING_RTOL = 1e-12

#: Rows of the Gram per worker task (``centred_gram``): the tasks of its upper triangle
#: shrink from row block to row block, and small blocks keep the threads balanced. Also the
#: rows per block of ``Geometry.mean_sq_distances`` (which bounds its scratch).
GRAM_ROWS = 128

GLOBAL_MEANS = ("classes", "samples")

#: The largest entry of the centred class means, and of a classifier's weights unless
#: they are all zero, must lie in this range. Pass 2 multiplies float32 residuals by
#: them (and by vectors built from them), and float32 holds 1.2e-38 to 3.4e38: inputs
#: scaled far beyond it would give products that overflow, or underflow to zero,
#: silently. The metrics do not depend on the scale of the features, nor the
#: predictions on a common scale of the weights and bias.
SCALE_RANGE = (1e-10, 1e10)

COINCIDING_MEANS = ("the class means coincide (their between-class scatter is zero), so NC1 is "
                    "undefined; check that the labels match the features")


#: Rows per step of ``weighted_row_mean``.
WEIGHTED_MEAN_ROWS = 256


def check_global_mean(global_mean):
    """Refuse a ``global_mean`` option outside ``GLOBAL_MEANS``."""
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean must be one of {GLOBAL_MEANS}; found {global_mean!r}")


def weighted_row_mean(rows, weights):
    """``Σ_c w_c rows_c / Σ_c w_c``, the same bits on every machine.

    The rows are added in order, each column on its own (numpy adds the rows of a
    block column by column): a BLAS product's kernel differs between CPUs and
    rounded the global mean differently (1 of 64 entries by 2e-16 between
    OpenBLAS's SkylakeX and Haswell kernels), and the global mean enters the
    geometry's fingerprint, which merges of pass-2 states compare.

    Parameters
    ----------
    rows : float64 array of shape (C', D)
    weights : float64 array of shape (C',), with a positive sum

    Returns
    -------
    float64 array of shape (D,)
    """
    total = np.zeros(rows.shape[1])
    for start in range(0, rows.shape[0], WEIGHTED_MEAN_ROWS):
        block = slice(start, start + WEIGHTED_MEAN_ROWS)
        total += (weights[block, None] * rows[block]).sum(axis=0)
    return total / weights.sum()


def symmetric_eigh(matrix):
    """Eigenvalues (ascending) and unit eigenvectors of a symmetric matrix, on one BLAS thread.

    LAPACK's ``syevd`` is mostly small BLAS-2 steps, and its second thread spins
    when other jobs share the cores (1000×1000 on 2 cores: 0.25 s on one thread and
    0.15 s on two at a load of 2; 0.34 s and 0.93 s at a load of 4). One thread, with
    other work on the other cores, is the robust choice: numpy's ``eigh`` releases
    the GIL (SciPy's does not), so other threads keep working meanwhile.

    Parameters
    ----------
    matrix : float64 array of shape (k, k)

    Returns
    -------
    eigenvalues : float64 array of shape (k,)
    eigenvectors : float64 array of shape (k, k), column ``j`` that of ``eigenvalues[j]``
    """
    with one_blas_thread():
        return np.linalg.eigh(matrix)


def kept_spectrum(eigenvalues, rtol=PINV_RTOL, max_rank=None):
    """Which eigenvalues of a symmetric PSD matrix its pseudo-inverse keeps.

    Parameters
    ----------
    eigenvalues : float64 array of shape (k,)
    rtol : float
        Eigenvalues at or below ``rtol * max eigenvalue`` count as zero.
    max_rank : int, optional
        The matrix's rank is known to be at most this: only that many of the largest
        eigenvalues may be kept. (Centred class means span at most C' - 1 directions;
        the eigenvalue of the direction centring removed is rounding, about 1e-17 of
        the largest, and a small ``rtol`` or a large common offset of the features
        would keep it, its ``1 / lambda`` swamping NC1.)

    Returns
    -------
    keep : bool array of shape (k,)
    rank : int
        Number of eigenvalues kept.
    condition : float
        Largest over smallest kept eigenvalue: rounding in what the pseudo-inverse
        multiplies is amplified up to this much.
    """
    keep = eigenvalues > rtol * max(eigenvalues.max(initial=0.0), 0.0)
    if max_rank is not None and keep.sum() > max_rank:
        keep[np.argsort(eigenvalues)[:eigenvalues.size - max_rank]] = False
    if not keep.any():
        raise ValueError(COINCIDING_MEANS)
    kept_values = eigenvalues[keep]
    return keep, int(keep.sum()), float(kept_values.max() / kept_values.min())


def centred_gram(centred):
    """The Gram ``M~ M~^T`` of the centred means, exactly symmetric.

    Row blocks of its upper triangle (a symmetric product on the diagonal block) run on
    the worker threads, one BLAS thread each: OpenBLAS's own threads spin for about
    0.1 s after a multithreaded call (``ncfast.kernels.cpu.ONE_THREAD_DENSE_FLOPS``),
    which would take a core from the eigendecomposition and the pair sweep that follow.

    Parameters
    ----------
    centred : float64 array of shape (C', D)

    Returns
    -------
    float64 array of shape (C', C')
    """
    num_means = centred.shape[0]
    gram = np.empty((num_means, num_means))
    starts = range(0, num_means, GRAM_ROWS)

    def row_block(task):
        rows = slice(starts[task], min(starts[task] + GRAM_ROWS, num_means))
        later = slice(rows.stop, num_means)
        gram[rows, rows] = centred[rows] @ centred[rows].T
        products = centred[rows] @ centred[later].T
        gram[rows, later] = products
        gram[later, rows] = products.T

    run_tasks(row_block, len(starts), numba.get_num_threads())
    return gram


def route_for(num_means, num_features):
    """The cheaper side for NC1: "classes" (C'×C') when C' <= D, else "features" (D×D)."""
    return "classes" if num_means <= num_features else "features"


def _checked_counts(counts, num_classes):
    """Rows per class as an int64 array of shape (C,).

    Parameters
    ----------
    counts : array-like of shape (C,), whole non-negative numbers
    num_classes : int, C

    Raises
    ------
    TypeError
        For counts that are not numbers (bool too: a mask, not counts).
    ValueError
        For another shape, or a count that is negative, fractional or not finite.
    """
    values = np.asarray(counts)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise TypeError(f"counts must be whole numbers of rows per class; found dtype "
                        f"{values.dtype}")
    if values.shape != (num_classes,):
        raise ValueError(f"counts must hold one row count per class, shape ({num_classes},); "
                         f"found shape {values.shape}")
    if np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)  # float16 cannot hold the bound below
    with np.errstate(invalid="ignore"):
        bad = ~((values >= 0) & (values == np.round(values)) & (values < 2 ** 62))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"counts must be whole numbers of rows, 0 or more; class {first} "
                         f"has {values[first].item()!r}")
    return values.astype(np.int64)


def class_means(counts, sums, sum_errors=None):
    """Class means from pass-1 counts and float64 sums: NaN rows for classes without rows.

    Parameters
    ----------
    counts : array-like of shape (C,), whole non-negative numbers
    sums : array-like of shape (C, D)
    sum_errors : array-like of shape (C, D), optional
        The rounding of the sums' additions (``ncfast.ClassSums.sum_errors``): the means
        are ``sums / counts + sum_errors / counts``, which the float64 rounding of
        ``sums`` alone would move for rows far from the origin.

    Returns
    -------
    float64 array of shape (C, D)
    """
    return _class_means_and_counts(counts, sums, sum_errors)[0]


def _class_means_and_counts(counts, sums, sum_errors, present_only=False):
    """``class_means``, and the counts checked as an int64 array of shape (C,).

    With ``present_only``, the means of the classes with rows only, shape (C', D), in
    class order: the same float64 arithmetic, without a C×D table of all classes.
    """
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2:
        raise ValueError(f"sums must be 2-D (n_classes, n_features); found shape {sums.shape}")
    counts = _checked_counts(counts, sums.shape[0])
    if sum_errors is not None:
        sum_errors = np.asarray(sum_errors, dtype=np.float64)
        if sum_errors.shape != sums.shape:
            raise ValueError(f"sum_errors must have the shape of sums, {sums.shape}; "
                             f"found {sum_errors.shape}")
    with np.errstate(invalid="ignore", divide="ignore"):
        if present_only and not counts.all():
            rows = np.flatnonzero(counts)
            row_counts = counts[rows][:, None]
            means = sums[rows]  # a copy: divided in place
            means /= row_counts
        else:
            rows, row_counts = slice(None), counts[:, None]
            means = np.divide(sums, row_counts, order="C")  # row-major whatever the sums
        if sum_errors is not None and np.any(sum_errors):  # zeros where the sums are exact
            means += sum_errors[rows] / row_counts
    means[row_counts[:, 0] == 0] = np.nan
    return means, counts


def means_fingerprint(means, global_mean):
    """sha1 (hex) of the bytes of class means (C, D) and of a global mean (D,)
    (``Geometry.fingerprint``)."""
    digest = hashlib.sha1(np.ascontiguousarray(means).tobytes())
    digest.update(global_mean.tobytes())
    return digest.hexdigest()


def check_between_scale(centred, present):
    """Refuse centred class means that coincide, or whose scale float32 cannot hold
    (``SCALE_RANGE``).

    Parameters
    ----------
    centred : float64 array of shape (C', D), the means less the global mean
    present : int64 array of shape (C',), the class of each row of ``centred``
    """
    # No squares: 1e200 means must not overflow here; no |M~| either: a temporary as large as
    # the means costs more than the two reductions.
    largest = max(float(centred.max()), -float(centred.min()))
    if largest == 0.0:
        raise ValueError(COINCIDING_MEANS)
    low, high = SCALE_RANGE
    if not low <= largest <= high:
        factor = (f" (e.g. multiply them, and a classifier's bias, by "
                  f"{10.0 ** -round(math.log10(largest)):g})" if math.isfinite(largest) else "")
        farthest = ""
        if largest > high:  # one corrupt row can move its class's mean this far
            flat = int(centred.argmax() if centred.max() >= -centred.min() else centred.argmin())
            farthest_class = int(present[flat // centred.shape[1]])
            farthest = (f"; class {farthest_class}'s mean lies farthest out: if its rows are "
                        "meant to be of the others' scale, look for a corrupt row first (e.g. "
                        f"np.abs(features[labels == {farthest_class}]).max(axis=1))")
        raise ValueError(
            f"the class means differ from their global mean by up to {largest:.3g} per "
            f"feature; ncfast's pass 2 computes in float32, which needs that between {low:g} "
            f"and {high:g}: rescale the features{factor}; the metrics do not depend on the "
            f"scale{farthest}")


@dataclass(frozen=True, eq=False)
class Geometry:
    """Class means of one analysis and what pass 2 derives from them.

    Attributes
    ----------
    present_means : float64 array of shape (C', D), C-contiguous
        The means ``mu_c`` of the classes that have one, in the order of ``present``.
    means : float64 array of shape (C, D)
        Every class's mean, NaN rows for classes without one (formed on first use).
    counts : int64 array of shape (C,), or None
        Rows behind each mean, when known.
    present : int64 array of shape (C',)
        Classes that have a mean, ascending.
    label_rows : int64 array of shape (C,)
        Index of each class in ``present``, -1 where absent.
    global_mean : float64 array of shape (D,)
    centred : float64 array of shape (C', D), ``M~`` (rows ``mu_c - mu_G``)
    centred_sq_norms : float64 array of shape (C',), ``||mu_c - mu_G||^2``
    gram : float64 array of shape (C', C'), ``M~ M~^T``; None on the
        "features" route, which never forms a C'×C' matrix
    gram_eigenvalues : float64 array of shape (C',), ascending; None on the
        "features" route
    gram_eigenvectors : float64 array of shape (C', C'), column ``j`` the unit
        eigenvector of ``gram_eigenvalues[j]`` (``V``); None on the "features"
        route. Pass 2 accumulates the scatter of ``z = M~ r`` in this basis.
    mean_sq_distances : float64 array of shape (C', C'), ``||mu_a - mu_b||^2``;
        None on the "features" route
    fingerprint : str
        Digest of the means and global mean; pass-2 states built on different
        geometries refuse to merge.
    global_mean_option : {"classes", "samples"}
        How ``global_mean`` was taken (``from_means``'s option).

    The eigendecompositions (``gram_spectrum`` on the "classes" route,
    ``between_spectrum`` of the D×D ``Sigma_B`` on the "features" route), the
    distances and the fingerprint are computed on first use: ``build_plan``
    computes the first three on the worker threads beside the pair sweep's
    tiles, and only merges and saved states read the fingerprint.
    """

    present_means: np.ndarray
    counts: np.ndarray | None
    present: np.ndarray
    label_rows: np.ndarray
    global_mean: np.ndarray
    centred: np.ndarray
    centred_sq_norms: np.ndarray
    gram: np.ndarray | None
    global_mean_option: str = "classes"

    @property
    def num_classes(self):
        return self.label_rows.shape[0]

    @property
    def num_features(self):
        return self.present_means.shape[1]

    @property
    def route(self):
        """"classes" when C' <= D (C'×C' algebra), else "features" (D×D, class tiles).

        NC1 costs N·D·min(C', D) either way; the route picks the smaller side.
        """
        return route_for(self.present.size, self.num_features)

    @cached_property
    def means(self):
        """float64 array of shape (C, D): the class means ``mu_c``, NaN rows for classes
        without a mean (``present_means`` itself when every class has one, else formed
        on first use: the passes and the pair sweep read ``present_means`` only, so at
        32,000 classes of 4096 features they run without this second 1 GB table)."""
        if self.present.size == self.num_classes:
            return self.present_means
        means = np.full((self.num_classes, self.num_features), np.nan)
        means[self.present] = self.present_means
        return means

    @cached_property
    def gram_spectrum(self):
        """``(gram_eigenvalues, gram_eigenvectors)``, computed on first use (or by
        ``decompose``); (None, None) on the "features" route."""
        if self.gram is None:
            return None, None
        self.decompose()
        return self.__dict__["gram_spectrum"]

    @cached_property
    def between_spectrum(self):
        """Eigenvalues (ascending) and unit eigenvectors of the D×D ``Sigma_B = M~^T M~ / C'``
        on the "features" route, computed on first use (or by ``decompose``); (None, None)
        on the "classes" route.
        """
        if self.route != "features":
            return None, None
        self.decompose()
        return self.__dict__["between_spectrum"]

    def decompose(self, eigh=symmetric_eigh):
        """Compute the route's eigendecomposition (``gram_spectrum``, or
        ``between_spectrum``) with ``eigh`` unless it is computed already.

        Parameters
        ----------
        eigh : callable
            ``eigh(matrix) -> (eigenvalues, eigenvectors)`` as host float64 arrays,
            as ``symmetric_eigh``'s: a backend's solver (``build_plan``), e.g. the GPU's.
        """
        if self.route == "classes":
            if "gram_spectrum" not in self.__dict__:
                self.__dict__["gram_spectrum"] = eigh(self.gram)
        elif "between_spectrum" not in self.__dict__:
            with one_blas_thread():
                between = self.centred.T @ self.centred / self.present.size
            self.__dict__["between_spectrum"] = eigh(between)

    @property
    def gram_eigenvalues(self):
        return self.gram_spectrum[0]

    @property
    def gram_eigenvectors(self):
        return self.gram_spectrum[1]

    @cached_property
    def mean_sq_distances(self):
        if self.gram is None:
            return None
        # ||mu_a - mu_b||^2 = ||mu~_a||^2 + ||mu~_b||^2 - 2 mu~_a . mu~_b: centring first removes
        # the common offset, so the cancellation is only that of the between-class spread.
        # Close pairs, whose entry would be mostly rounding, come from the means' difference
        # (as in the pair sweep): coinciding means are exactly 0 apart, a tie pass 2's first
        # argmin then gives to the first class.
        num_means = self.present.size
        class_ids = np.arange(num_means)
        distances = np.empty((num_means, num_means))
        for start in range(0, num_means, GRAM_ROWS):
            rows = slice(start, start + GRAM_ROWS)
            distances[rows] = pair_sq_distances(
                np, self.gram[rows], self.centred_sq_norms[rows], self.centred_sq_norms,
                self.present_means, class_ids[rows], class_ids,
                class_ids[rows, None] != class_ids[None, :])
        np.fill_diagonal(distances, 0.0)
        return distances

    @cached_property
    def fingerprint(self):
        return means_fingerprint(self.means, self.global_mean)

    @classmethod
    def from_means(cls, means, counts=None, *, global_mean="classes"):
        """Build the geometry from class means.

        Parameters
        ----------
        means : array of shape (C, D)
            NaN rows mark classes without a mean.
        counts : int array of shape (C,), optional
            Rows per class; needed for ``global_mean="samples"``.
        global_mean : {"classes", "samples"}
            Mean of the class means, or mean of all rows (count-weighted).
        """
        # The geometry keeps its own copy, row-major (``present_means`` is C-contiguous).
        means = np.array(means, dtype=np.float64, order="C")
        if means.ndim != 2:
            raise ValueError(f"means must be 2-D (n_classes, n_features); found shape {means.shape}")
        if counts is not None:
            counts = _checked_counts(counts, means.shape[0])
        has_mean = np.isfinite(means).all(axis=1)
        if not has_mean.all():
            missing = np.isnan(means[~has_mean])
            partial = np.flatnonzero(~has_mean)[~missing.all(axis=1) & missing.any(axis=1)]
            if partial.size:
                raise ValueError(
                    f"the mean of class {partial[0]} holds NaN in "
                    f"{int(np.isnan(means[partial[0]]).sum())} of its {means.shape[1]} entries; "
                    "a class without a mean is a row of NaN only: repair the means or set the "
                    "whole row to NaN")
            if not missing.all():
                raise ValueError(
                    "means holds Inf; class means must be finite (NaN rows mark absent classes)")
        present = np.flatnonzero(has_mean)
        present_means = means if present.size == means.shape[0] else means[present]
        return cls._from_present_means(present_means, present, means.shape[0], counts,
                                       global_mean)

    @classmethod
    def _from_present_means(cls, present_means, present, num_classes, counts, global_mean):
        """The geometry of the finite means ``present_means`` (C', D) of the classes
        ``present`` among ``num_classes``, which it keeps as they are; counts already
        checked (int64, or None)."""
        check_global_mean(global_mean)
        if present.size < 2:
            raise ValueError(
                f"found {present.size} class(es) with rows; neural collapse compares classes, so "
                "at least 2 classes must have rows"
            )
        label_rows = np.full(num_classes, -1, np.int64)
        label_rows[present] = np.arange(present.size)
        if global_mean == "classes":
            center = present_means.mean(axis=0)
        else:
            if counts is None:
                raise ValueError(
                    "global_mean='samples' needs the row count of each class: pass counts= "
                    "(the training ClassSums' counts), or use global_mean='classes'"
                )
            weights = counts[present].astype(np.float64)
            if not weights.sum() > 0:
                raise ValueError(
                    "global_mean='samples' weighs each class mean by its row count, but the "
                    "classes with a mean have 0 rows in counts; pass the row counts the means "
                    "came from, or use global_mean='classes'")
            center = weighted_row_mean(present_means, weights)
        centred = present_means - center
        check_between_scale(centred, present)
        centred_sq_norms = np.einsum("cd,cd->c", centred, centred)
        gram = None
        if route_for(present.size, present_means.shape[1]) == "classes":
            gram = centred_gram(centred)
        return cls(present_means=present_means, counts=counts, present=present,
                   label_rows=label_rows, global_mean=center, centred=centred,
                   centred_sq_norms=centred_sq_norms, gram=gram, global_mean_option=global_mean)

    @classmethod
    def from_class_sums(cls, counts, sums, *, sum_errors=None, global_mean="classes"):
        """Build the geometry from pass-1 counts (C,) and float64 sums (C, D).

        ``sum_errors`` (C, D), optional: ``ClassSums.sum_errors``, the rounding of the
        sums' additions; the means are then ``(sums + sum_errors) / counts``
        (``class_means``).
        """
        present_means, counts = _class_means_and_counts(counts, sums, sum_errors,
                                                        present_only=True)
        present = np.flatnonzero(counts)
        # A class with rows has a finite mean exactly when its sum is finite.
        overflowed = present[~np.isfinite(present_means).all(axis=1)]
        if overflowed.size:
            raise ValueError(
                f"the float64 sum of the rows of class {overflowed[0]} is not finite: pass 1 "
                "refuses rows with NaN or Inf, so finite features added up past float64's "
                f"{np.finfo(np.float64).max:.3g}; rescale the features")
        return cls._from_present_means(present_means, present, counts.shape[0], counts,
                                       global_mean)
