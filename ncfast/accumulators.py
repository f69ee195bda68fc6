"""Streaming accumulators of the two passes.

Every state is a set of sums (counts, float64 sums, sums of squared
coordinates, hit counts), so states from chunks, threads, files or workers
merge by ``+``, in any order. Means exist only after finalize (``ncfast.geometry``).

``ClassSums`` is pass 1; ``ResidualStats`` is pass 2 and is built on the
``Pass2Plan`` of the ``Geometry`` that pass 1 finalized (and, optionally, a
linear classifier). Their ``update`` methods are the CPU backend's kernels;
other backends add their device sums into the same public arrays.
"""
import os

import numba
import numpy as np

from ncfast import errors
from ncfast.geometry import class_means
from ncfast.inputs import (as_array, check_features, check_labels, to_kernel_features,
                           to_kernel_labels)
from ncfast.kernels import cpu, narrow, tiles
from ncfast.kernels.cpu import Pass2Sums
from ncfast.plan import Pass2Plan, build_plan

#: Rows of a task of the "features" route's tiled search, and classes per tile:
#: a task's float32 products of one tile (2 MiB) stay in the caches for the fold.
FOLD_TASK_ROWS = 512
FOLD_TILE_COLUMNS = 1024


def _raise_bad_rows(row_offset, bad_label_row, bad_value_row, num_classes, labels, features,
                    clean_labels):
    """Raise for the first bad row of a pass-1 chunk, if any (rows numbered in the chunk)."""
    row = min(bad_label_row, bad_value_row)
    if row == cpu.NO_ROW:
        return
    label = int(labels[row])
    clean = None if clean_labels.shape[0] == 0 else int(clean_labels[row])
    kind = errors.NON_FINITE
    if row == bad_label_row:
        kind = errors.label_kind(label, clean, num_classes)
    raise errors.bad_row_error(kind, row_offset + row,
                               label=clean if kind == errors.CLEAN_LABEL else label,
                               num_classes=num_classes, values=features[row])


def _chunk_arrays(features, labels, num_features, clean_labels=None, row_offset=0):
    """Kernel-ready arrays of one chunk (first row ``row_offset``), with shapes and dtypes
    checked as ``ncfast.collapse`` checks its inputs."""
    features, labels = as_array(features, "features"), as_array(labels, "labels")
    num_rows, chunk_features = check_features(features, allow_empty=True)
    if chunk_features != num_features:
        raise ValueError(
            f"chunk features have shape {tuple(features.shape)}; this accumulator expects "
            f"(n, {num_features})"
        )
    labels = to_kernel_labels(check_labels(labels, num_rows), row_offset=row_offset)
    if clean_labels is not None:
        clean_labels = check_labels(as_array(clean_labels, "clean_labels"), num_rows,
                                    "clean_labels")
        clean_labels = to_kernel_labels(clean_labels, "clean_labels", row_offset)
    return to_kernel_features(features), labels, clean_labels


def _row_flags(flags, num_rows, what):
    """A per-row mask (bool, or integers 0/1) as a uint8 array of shape (n,), checked."""
    flags = np.asarray(as_array(flags, what))
    if flags.size and flags.dtype != np.bool_ and not (
            np.issubdtype(flags.dtype, np.integer) and flags.min() >= 0 and flags.max() <= 1):
        raise TypeError(f"{what} must be a boolean mask of the rows; found dtype {flags.dtype}"
                        + ("" if flags.dtype.kind not in "iu" else
                           f" with values in [{flags.min()}, {flags.max()}]")
                        + ": for row indices pass np.isin(np.arange(n), indices)")
    if flags.shape != (num_rows,):
        raise ValueError(f"{what} has shape {flags.shape}; expected ({num_rows},), one flag per "
                         "row of the chunk")
    return np.ascontiguousarray(flags, dtype=np.uint8)


#: Most memory the per-class float64 state of a given ``num_classes`` may take at its peak,
#: as a share of the machine's memory.
CLASS_STATE_MEMORY_SHARE = 0.5

#: Copies of the C×D pass-1 sums (twice that with label noise) held at once at the peak:
#: the sums, the class means made from them, their float64 copy and the centred means
#: (measured: 3.1 GB resident for 0.9 GiB of sums), and where the float64 sums are not exact
#: (float64 rows) their rounding errors (``ClassSums.sum_errors``; zero pages, never
#: touched, where they are).
CLASS_STATE_COPIES = 5


def machine_memory():
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def class_state_bytes_beyond_memory(num_classes, num_features, label_noise):
    """Bytes of pass 1's per-class sums when their peak (``CLASS_STATE_COPIES`` copies) is
    more than ``CLASS_STATE_MEMORY_SHARE`` of this machine's memory, else 0 (also when D or
    the memory is unknown)."""
    memory = machine_memory()
    if num_features is None or memory is None:
        return 0
    state_bytes = 8 * num_classes * num_features * (2 if label_noise else 1)
    return state_bytes if CLASS_STATE_COPIES * state_bytes > CLASS_STATE_MEMORY_SHARE * memory \
        else 0


def check_class_state_fits(num_classes, num_features, label_noise):
    """Refuse per-class sums that could not fit in memory (``class_state_bytes_beyond_memory``)
    rather than fail allocating them: ``collapse`` before its passes, ``ClassSums`` itself."""
    state_bytes = class_state_bytes_beyond_memory(num_classes, num_features, label_noise)
    if state_bytes:
        raise ValueError(
            f"num_classes={num_classes} with {num_features} features needs "
            f"{state_bytes / 2**30:.3g} GiB of per-class float64 sums, and about "
            f"{CLASS_STATE_COPIES} times that while the class means are made from them, more "
            f"than half of this machine's {machine_memory() / 2**30:.3g} GiB: check "
            "num_classes (labels must be class indices 0..C-1) and the number of features")


# Zero-size stand-ins for the clean-row arrays when label noise is not tracked.
_NO_CLEAN = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0)), np.empty((0, 0)))


class ClassSums:
    """Pass-1 state: per-class row counts and float64 row sums.

    Parameters
    ----------
    num_classes : int
    num_features : int
    track_clean : bool
        Also keep counts and sums of the clean rows (label equal to the clean
        label), for label-noise metrics.

    Attributes
    ----------
    counts : int64 array of shape (C,)
    sums : float64 array of shape (C, D)
    sum_errors : float64 array of shape (C, D)
        The rounding errors of the additions into ``sums`` (``cpu.add_compensated``):
        ``sums + sum_errors`` is the sum of the rows to about float64's precision
        squared, however many chunks and merges added it (``sums`` alone rounds once per
        addition, which matters for float64 rows far from the origin fed in small chunks).
        Zero where the float64 sums are exact, as they are for float32 rows of one scale.
    clean_counts : int64 array of shape (C,), or None
    clean_sums, clean_sum_errors : float64 arrays of shape (C, D), or None
    """

    def __init__(self, num_classes, num_features, *, track_clean=False):
        for name, value in (("num_classes", num_classes), ("num_features", num_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int; found {value!r}")
        check_class_state_fits(int(num_classes), int(num_features), track_clean)
        self.counts = np.zeros(num_classes, np.int64)
        self.sums = np.zeros((num_classes, num_features))
        self.sum_errors = np.zeros((num_classes, num_features))
        self.clean_counts = np.zeros(num_classes, np.int64) if track_clean else None
        self.clean_sums = np.zeros((num_classes, num_features)) if track_clean else None
        self.clean_sum_errors = np.zeros((num_classes, num_features)) if track_clean else None

    @property
    def num_classes(self):
        return self.counts.shape[0]

    @property
    def num_features(self):
        return self.sums.shape[1]

    @property
    def track_clean(self):
        return self.clean_counts is not None

    def update(self, features, labels, clean_labels=None, *, row_offset=0):
        """Add a chunk of rows.

        Parameters
        ----------
        features : array of shape (n, D)
        labels : int array of shape (n,)
        clean_labels : int array of shape (n,), required when ``track_clean``
        row_offset : int
            Index of the chunk's first row in the whole input (error messages).
        """
        features, labels, clean_labels = _chunk_arrays(
            features, labels, self.num_features, clean_labels, row_offset)
        if self.track_clean != (clean_labels is not None):
            raise ValueError("clean_labels must be given exactly when the state tracks clean rows")
        if clean_labels is None:
            clean_labels, clean_counts, clean_sums, clean_sum_errors = _NO_CLEAN
        else:
            clean_counts, clean_sums, clean_sum_errors = (
                self.clean_counts, self.clean_sums, self.clean_sum_errors)
        bad_label_row, bad_value_row = cpu.class_sums_chunk(
            features, labels, clean_labels, self.counts, self.sums, self.sum_errors,
            clean_counts, clean_sums, clean_sum_errors, numba.get_num_threads())
        _raise_bad_rows(row_offset, bad_label_row, bad_value_row, self.num_classes, labels,
                        features, clean_labels)
        return self

    def check_compatible(self, other):
        """Raise TypeError or ValueError unless ``other`` can be added to this state."""
        if not isinstance(other, ClassSums):
            raise TypeError(f"cannot merge ClassSums with {type(other).__name__}")
        if (other.num_classes, other.num_features, other.track_clean) != \
                (self.num_classes, self.num_features, self.track_clean):
            raise ValueError(
                f"cannot merge ClassSums of (C={other.num_classes}, D={other.num_features}, "
                f"track_clean={other.track_clean}) into (C={self.num_classes}, "
                f"D={self.num_features}, track_clean={self.track_clean})"
            )

    def __iadd__(self, other):
        self.check_compatible(other)
        self.counts += other.counts
        _add_with_errors(self.sums, self.sum_errors, other.sums, other.sum_errors)
        if self.track_clean:
            self.clean_counts += other.clean_counts
            _add_with_errors(self.clean_sums, self.clean_sum_errors, other.clean_sums,
                             other.clean_sum_errors)
        return self

    def means(self):
        """The class means, ``(sums + sum_errors) / counts`` (NaN rows for classes without
        rows); see ``Geometry.from_class_sums``.

        Returns
        -------
        float64 array of shape (C, D)
        """
        return class_means(self.counts, self.sums, self.sum_errors)

    def __add__(self, other):
        self.check_compatible(other)
        merged = ClassSums(self.num_classes, self.num_features, track_clean=self.track_clean)
        merged += self
        merged += other
        return merged

    def __radd__(self, other):
        """``0 + state``: the start of ``sum(states)``."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self + ClassSums(self.num_classes, self.num_features,
                                    track_clean=self.track_clean)
        return NotImplemented

    def __eq__(self, other):
        if not isinstance(other, ClassSums):
            return NotImplemented
        return all(_arrays_equal(a, b) for a, b in zip(self._arrays(), other._arrays()))

    def _arrays(self):
        return (self.counts, self.sums, self.sum_errors, self.clean_counts, self.clean_sums,
                self.clean_sum_errors)

    def sum_arrays(self):
        """The arrays a merge adds, in a fixed order (the state's own, not copies).

        Returns
        -------
        list of int64 and float64 arrays
            Counts, sums and their errors, then the clean rows' when tracked.
        """
        return [array for array in self._arrays() if array is not None]

    def __repr__(self):
        clean = f", clean_rows={int(self.clean_counts.sum())}" if self.track_clean else ""
        return (f"ClassSums(C={self.num_classes}, D={self.num_features}, "
                f"rows={int(self.counts.sum())}, classes_with_rows="
                f"{int((self.counts > 0).sum())}{clean})")


def _add_with_errors(sums, sum_errors, other_sums, other_errors):
    """Add another state's sums and their rounding errors (``cpu.add_compensated``); errors
    that are all zero (float32 rows) are not read into memory again."""
    cpu.add_compensated(sums, sum_errors, other_sums)
    if np.any(other_errors):
        sum_errors += other_errors


def _arrays_equal(a, b):
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and np.array_equal(a, b)


#: ``(fewest features D, most columns C' + C_w)`` (means, classifier rows): pass 2 on the
#: "classes" route multiplies without BLAS (``ncfast.kernels.narrow``) when one of the
#: pairs admits its shape; other shapes go to BLAS. Measured (2026-11-30; pass 2 on both
#: threads, ``bench.data`` rows, best of 4 in three alternations; collapsed, then far from
#: collapse in parentheses), narrow against BLAS: at D = 512 and 500,000 rows 0.124-0.127
#: s against 0.146-0.154 s at 32 columns (0.190-0.195 against 0.206-0.214), 0.124 against
#: 0.152-0.157 at 40 (0.226-0.238 against 0.244-0.251), 0.135-0.138 against 0.160-0.163 at
#: 48 (0.246-0.252 against 0.261-0.268), 0.164-0.178 against 0.177-0.180 at 64
#: (0.298-0.317 against 0.286-0.301); at D = 2048 and 100,000 rows as long as BLAS at 40
#: and 48 columns collapsed, 0.165-0.179 against 0.186-0.194 far at 48. With 1,000,000
#: rows of fewer features, at 20 columns: D = 256 0.107-0.109 against 0.140-0.146
#: (0.168-0.171 against 0.204-0.206), D = 128 0.070-0.073 against 0.076-0.078
#: (0.110-0.115 against 0.119-0.123), D = 64 0.056-0.058 against 0.042 (0.096-0.099
#: against 0.075: the kernel's fixed costs per row and per tile outweigh BLAS's); at
#: D = 256, 32 columns 0.131-0.142 against 0.142-0.147 (0.233-0.240 against
#: 0.219-0.231) and 48 columns 0.179-0.180 against 0.170-0.174 (0.313-0.323 against
#: 0.266-0.282).
NARROW_LIMITS = ((512, 48), (128, 20))


def runs_narrow_kernel(route):
    """Whether pass 2 of a ``ClassesRoute`` runs ``ncfast.kernels.narrow`` rather than BLAS."""
    num_columns = route.present_classes.shape[0] + route.weights_t.shape[1]
    return any(route.means.shape[1] >= fewest_features and num_columns <= most_columns
               for fewest_features, most_columns in NARROW_LIMITS)


def _eigen_coordinate_squares(features, labels, label_rows, means, basis, out_sq_norms,
                              out_sums):
    """Add the chunk's ``sum_i (r_i . u_j)^2`` for every column ``u_j`` of ``basis`` into
    ``out_sums``, on the worker threads; all or nothing.

    Tasks of ``cpu.task_rows(D)`` rows (whole blocks of ``cpu.block_rows(D)``)
    each run ``cpu.coordinate_blocks`` into their own float64 sums, which are
    added in task order (``cpu.run_pass2_tasks``): the result does not depend
    on the thread count. Rows split differently agree to float64 rounding and
    to about one float32 rounding of each row's coordinates (BLAS rounds a row
    by its place in a block).

    Parameters
    ----------
    features : array of shape (n, D)
    labels : int64 array of shape (n,)
    label_rows : int64 array of shape (C,)
    means : float64 array of shape (C', D)
    basis : float32 array of shape (D, K)
    out_sq_norms : float64 array of shape (n,), zeros; written as by
        ``cpu.block_residuals`` up to each task's first bad block
    out_sums : float64 array of shape (K,), updated in place

    Returns
    -------
    bool
        False when some row was bad (nothing added).
    """
    num_features = features.shape[1]
    block = cpu.block_rows(num_features)

    def run_rows(first, last, partial):
        return cpu.coordinate_blocks(
            features[first:last], labels[first:last], label_rows, means, basis,
            cpu.thread_buffer("coordinate_block", (block, num_features), np.float32),
            cpu.thread_buffer("coordinate_products", (block, basis.shape[1]), np.float32),
            out_sq_norms[first:last], partial.eigen_scatter) == cpu.NO_ROW

    return cpu.run_pass2_tasks(run_rows, features.shape[0], cpu.task_rows(num_features),
                               cpu.CoordinateSums(out_sums), numba.get_num_threads())


def _centred_rows(features, rows, global_mean):
    """``h - mu_G`` of the given rows of a chunk, float32, in the calling thread's scratch.

    Parameters
    ----------
    features : array of shape (n, D)
    rows : int64 array of shape (m,)
    global_mean : float64 array of shape (D,)

    Returns
    -------
    float32 array of shape (m, D), valid until the thread's next call
    """
    centred = cpu.thread_buffer("centred_rows", (rows.size, features.shape[1]), np.float32)
    tiles.centre_rows(features, rows, global_mean, centred)
    return centred


class ResidualStats:
    """Pass-2 state: NC1's squared eigen-coordinates, per-class spreads and prediction tallies.

    Built on a ``Pass2Plan`` (or a ``Geometry`` and optional classifier, whose
    plan it then builds). Per chunk on the "classes" route (C' <= D):
    residuals ``R = H - mu_y`` from the float64 means, one float32 GEMM
    ``R M~^T V``, then a fused epilogue; rows beyond their NCC radius or
    classifier radius also get ``z = V a`` or ``W r`` from GEMMs of those rows
    alone (``ncfast.kernels.cpu.residual_blocks``); with few means and
    classifier rows (``runs_narrow_kernel``) the same without BLAS
    (``ncfast.kernels.narrow``). On the "features" route
    (C' > D): residuals and one float32 GEMM ``R U`` by the eigenvectors of
    ``Sigma_B`` per block (``ncfast.kernels.cpu.coordinate_blocks``), and the
    nearest class centre and classifier argmax over class tiles
    (``ncfast.kernels.tiles``), the tiled search only for rows beyond their NCC
    radius.

    Parameters
    ----------
    geometry : Geometry or Pass2Plan
    weights : array of shape (C, D), optional
        Classifier ``W``; logits are ``W h + b`` (with a Geometry only).
    bias : array of shape (C,), optional
    class_tile : int, optional
        Classes per GEMM tile on the "features" route; chosen from the chunk
        size by default. Results do not depend on it.

    Attributes
    ----------
    plan : Pass2Plan
    route : {"classes", "features"}
        NC1 from the residuals' coordinates in the eigenbasis of the C'×C' Gram
        (of ``z = M~ r``) when C' <= D, else of the D×D ``Sigma_B``: cost
        N·D·min(C', D).
    eigen_scatter : float64 array of shape (C',) or (D,)
        NC1 needs only the diagonal of a scatter in an eigenbasis, summed from
        each row's coordinates. "classes" route, shape (C',):
        ``diag(V^T S V) = sum_i (V^T z_i)^2`` with ``S = sum z z^T`` and ``V``
        the Gram eigenvectors (``Tr(Gram^+ S Gram^+) = sum_j (V^T S V)_jj /
        lambda_j^2``). "features" route, shape (D,): ``sum_i (U^T r_i)^2`` with
        ``U`` the eigenvectors of ``Sigma_B`` (``Tr(S Sigma_B^+) = sum_j
        (U^T S U)_jj / lambda_j`` with ``S = sum r r^T``). Each coordinate is
        rounded once, so NC1's rounding does not grow with the energy of the
        other directions, as that of a float32 ``S`` would.
    counts : int64 array of shape (C,)
    sq_norm_sums, norm_sums : float64 arrays of shape (C,)
        ``sum ||r||^2`` and ``sum ||r||`` per class.
    ncc_hits, classifier_hits : int64 arrays of shape (C,)
    disagreements : int
        Rows where the classifier and the nearest class centre disagree.
    corrupted_rows, corrupted_fits : int
        Rows flagged corrupted, and those predicted as their (noisy) label.
    """

    _TALLIES = ("counts", "sq_norm_sums", "norm_sums", "ncc_hits", "classifier_hits", "totals")

    def __init__(self, geometry, *, weights=None, bias=None, class_tile=None):
        if isinstance(geometry, Pass2Plan):
            if weights is not None or bias is not None:
                raise ValueError("a Pass2Plan brings its classifier; pass weights= to build_plan")
            self.plan = geometry
        else:
            self.plan = build_plan(geometry, weights, bias)
        geometry = self.plan.geometry
        num_classes, num_features = geometry.num_classes, geometry.num_features
        self.class_tile = class_tile
        self.eigen_scatter = np.zeros(geometry.present.size if self.route == "classes"
                                      else num_features)
        self.counts = np.zeros(num_classes, np.int64)
        self.sq_norm_sums = np.zeros(num_classes)
        self.norm_sums = np.zeros(num_classes)
        self.ncc_hits = np.zeros(num_classes, np.int64)
        self.classifier_hits = np.zeros(num_classes, np.int64)
        self.totals = np.zeros(3, np.int64)

    @property
    def geometry(self):
        return self.plan.geometry

    @property
    def route(self):
        return self.plan.route

    @property
    def weights(self):
        return self.plan.weights

    @property
    def bias(self):
        return self.plan.bias

    @property
    def sum_names(self):
        """Names of the arrays that merge by addition: NC1's state, then the tallies."""
        return ("eigen_scatter",) + self._TALLIES

    @property
    def disagreements(self):
        return int(self.totals[0])

    @property
    def corrupted_rows(self):
        return int(self.totals[1])

    @property
    def corrupted_fits(self):
        return int(self.totals[2])

    @property
    def num_rows(self):
        return int(self.counts.sum())

    def update(self, features, labels, corrupted=None, *, include=None, row_offset=0):
        """Add a chunk of rows.

        Parameters
        ----------
        features : array of shape (n, D)
        labels : int array of shape (n,)
        corrupted : bool array of shape (n,), optional
            Rows whose training label is known to be wrong (label noise).
        include : bool array of shape (n,), optional
            Rows to add (label-noise runs split a chunk); all by default.
        row_offset : int
            Index of the chunk's first row in the whole input (error messages).
        """
        geometry = self.geometry
        features, labels, _ = _chunk_arrays(features, labels, geometry.num_features,
                                            row_offset=row_offset)
        num_rows = features.shape[0]
        if corrupted is not None:
            corrupted = _row_flags(corrupted, num_rows, "corrupted")
        row_numbers = None
        if include is not None:
            row_numbers = np.flatnonzero(_row_flags(include, num_rows, "include"))
            features, labels = features[row_numbers], labels[row_numbers]
            corrupted = None if corrupted is None else corrupted[row_numbers]
            num_rows = row_numbers.size
        if num_rows == 0:
            return self
        if corrupted is None:
            corrupted = np.empty(0, np.uint8)
        sq_norms = np.zeros(num_rows)
        if self.route == "classes":
            # Residuals, products and epilogue fused per cache-sized block.
            route = self.plan.classes_route()
            chunk = narrow.narrow_chunk if runs_narrow_kernel(route) else cpu.residual_chunk
            good = chunk(features, labels, corrupted, route,
                         Pass2Sums(*(getattr(self, name) for name in self.sum_names)), sq_norms,
                         numba.get_num_threads())
        else:
            good = self._update_features_route(features, labels, corrupted, sq_norms)
        if not good:
            bad = int(np.flatnonzero(~(sq_norms >= 0))[0])
            row = bad if row_numbers is None else int(row_numbers[bad])
            kind = errors.label_kind(int(labels[bad]), None, geometry.num_classes,
                                     geometry.label_rows) or errors.NON_FINITE
            raise errors.bad_row_error(kind, row_offset + row, label=int(labels[bad]),
                                       num_classes=geometry.num_classes, values=features[bad])
        return self

    def _update_features_route(self, features, labels, corrupted, sq_norms):
        """"features" route pass 2 of one chunk; False (nothing added) for a bad row."""
        geometry, plan = self.geometry, self.plan
        # Every bad row is found here, before anything is added.
        if not _eigen_coordinate_squares(features, labels, geometry.label_rows,
                                         plan.present_means, plan.between_basis, sq_norms,
                                         self.eigen_scatter):
            return False
        far, centred, ncc_predictions = self._nearest_centres(features, labels, sq_norms)
        classifier_predictions = self._classifier_predictions(features, labels, sq_norms, far,
                                                              centred)
        cpu.tally_rows(sq_norms, labels, ncc_predictions, classifier_predictions, corrupted,
                       self.counts, self.sq_norm_sums, self.norm_sums, self.ncc_hits,
                       self.classifier_hits, self.totals)
        return True

    def _nearest_centres(self, features, labels, sq_norms):
        """"features" route: each row's nearest class centre, searched over class tiles
        for the rows beyond their NCC radius.

        Returns
        -------
        far : int64 array of shape (m,), the rows beyond their radius
        centred : float32 array of shape (m, D), ``h - mu_G`` of those rows (thread scratch)
        predictions : int64 array of shape (n,)
        """
        geometry, plan = self.geometry, self.plan
        predictions = labels.copy()
        far = np.flatnonzero(~(sq_norms < plan.ncc_sq_radii[geometry.label_rows[labels]]))
        centred = _centred_rows(features, far, geometry.global_mean)
        if far.size:
            nearest = self._search_class_tiles(
                features, far, centred, plan.projection_t, geometry.centred_sq_norms, -2.0,
                plan.present_means, None, sq_norms, plan.ncc_band)
            predictions[far] = geometry.present[nearest]
        return far, centred, predictions

    def _classifier_predictions(self, features, labels, sq_norms, far, centred):
        """"features" route: each row's classifier argmax (empty without a classifier).

        Rows inside their classifier radius take their mean's prediction; the
        others are searched over tiles of ``W^T``, reusing ``centred`` (the rows
        ``far``, from ``_nearest_centres``) when they are the same rows.
        """
        if self.weights is None:
            return np.empty(0, np.int64)
        geometry, plan = self.geometry, self.plan
        mean_rows = geometry.label_rows[labels]
        predictions = plan.mean_predictions[mean_rows]
        uncertain = np.flatnonzero(~(sq_norms < plan.classifier_sq_radii[mean_rows]))
        if uncertain.size:
            if uncertain.size != far.size or (uncertain != far).any():
                centred = _centred_rows(features, uncertain, geometry.global_mean)
            predictions[uncertain] = self._search_class_tiles(
                features, uncertain, centred, plan.weights_t, -plan.logit_offsets, -1.0,
                plan.weights, plan.bias, sq_norms, plan.classifier_band)
        return predictions

    def _search_class_tiles(self, features, rows, centred, columns_t, offsets, scale,
                            reference, bias, sq_norms, band):
        """Each row's first smallest score ``offsets + scale * (h~ @ columns_t)``, over
        class tiles, settled in float64 where float32 cannot decide.

        Tasks of ``FOLD_TASK_ROWS`` rows run on the worker threads, each
        multiplying its rows by one class tile after another on one BLAS
        thread and folding the products into the rows' smallest scores while
        they are in cache (``ncfast.kernels.tiles.fold_smallest``; a
        multithreaded product per tile left its threads spinning beside the
        fold); ``ncfast.kernels.tiles.settle_rows`` then decides between the
        contenders. Each row's answer depends on the row alone, not on how
        rows are split.

        Parameters
        ----------
        features : array of shape (N, D), the chunk
        rows : int64 array of shape (n,), the rows searched
        centred : float32 array of shape (n, D), ``h - mu_G`` of those rows
        columns_t : float32 array of shape (D, k), centred means or ``W^T``
        offsets : float64 array of shape (k,), added to each column's scaled products
        scale : float, -2 (nearest centre) or -1 (negated logits)
        reference : float64 array of shape (k, D), the present means or ``W``
        bias : float64 array of shape (k,), or None for the nearest centre
        sq_norms : float64 array of shape (N,), ``||r||^2`` of the chunk's rows
        band : float64 array of shape (3,), the near-tie band (``Pass2Plan``)

        Returns
        -------
        int64 array of shape (n,), the column of each row
        """
        num_rows, num_columns = len(centred), columns_t.shape[1]
        tile = self.class_tile or FOLD_TILE_COLUMNS
        best = np.full((num_rows, tiles.KEPT_SCORES), np.inf)
        best_index = np.zeros((num_rows, tiles.KEPT_SCORES), np.int64)

        def fold_task(task):
            rows = slice(task * FOLD_TASK_ROWS, min((task + 1) * FOLD_TASK_ROWS, num_rows))
            task_rows = centred[rows]
            products = cpu.thread_buffer("tile_products", (FOLD_TASK_ROWS, tile), np.float32)
            for start in range(0, num_columns, tile):
                stop = min(start + tile, num_columns)
                tile_products = products[:len(task_rows), :stop - start]
                np.matmul(task_rows, columns_t[:, start:stop], out=tile_products)
                tiles.fold_smallest(tile_products, offsets[start:stop], scale, start,
                                    best[rows], best_index[rows])

        cpu.run_tasks(fold_task, -(-num_rows // FOLD_TASK_ROWS), numba.get_num_threads())
        choices = np.empty(num_rows, np.int64)
        tiles.settle_rows(features, rows, reference, np.zeros(0) if bias is None else bias,
                          bias is None, best, best_index, sq_norms, band, choices)
        return choices

    def check_compatible(self, other):
        """Raise TypeError or ValueError unless ``other`` can be added to this state."""
        if not isinstance(other, ResidualStats):
            raise TypeError(f"cannot merge ResidualStats with {type(other).__name__}")
        if other.geometry.fingerprint != self.geometry.fingerprint:
            raise ValueError(
                "cannot merge pass-2 states built on different class means; build every "
                "partial state on the same Geometry (the finalized pass 1 of all the data)"
            )
        if other.plan.classifier_fingerprint != self.plan.classifier_fingerprint:
            raise ValueError("cannot merge pass-2 states built with different classifiers")

    def __iadd__(self, other):
        self.check_compatible(other)
        for name in self.sum_names:
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def __add__(self, other):
        self.check_compatible(other)
        merged = ResidualStats(self.plan, class_tile=self.class_tile)
        merged += self
        merged += other
        return merged

    def __radd__(self, other):
        """``0 + state``: the start of ``sum(states)``."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self + ResidualStats(self.plan, class_tile=self.class_tile)
        return NotImplemented

    def __eq__(self, other):
        if not isinstance(other, ResidualStats):
            return NotImplemented
        return (other.geometry.fingerprint == self.geometry.fingerprint
                and other.plan.classifier_fingerprint == self.plan.classifier_fingerprint
                and all(np.array_equal(getattr(self, name), getattr(other, name))
                        for name in self.sum_names))

    def __repr__(self):
        classifier = "" if self.weights is None else ", classifier"
        return (f"ResidualStats(C={self.geometry.num_classes}, D={self.geometry.num_features}, "
                f"rows={self.num_rows}, route={self.route!r}{classifier}, "
                f"ncc_hits={int(self.ncc_hits.sum())})")
