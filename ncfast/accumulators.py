"""Streaming accumulators of the two passes.

Every state is a set of sums (counts, float64 sums, scatter matrices, hit
counts), so states from chunks, threads, files or workers merge by ``+``,
in any order. Means exist only after finalize (``ncfast.geometry``).

``ClassSums`` is pass 1; ``ResidualStats`` is pass 2 and is built on the
``Geometry`` that pass 1 finalized (and, optionally, a linear classifier).
"""
import hashlib

import numba
import numpy as np

from ncfast.geometry import ROUNDING_RTOL, Geometry, pair_sq_distances
from ncfast.kernels import cpu, tiles
from ncfast.inputs import host_array, to_kernel_features, to_kernel_labels

_LABEL_HINT = "labels must be class indices in [0, num_classes)"

#: Bytes of one float32 chunk × class-tile GEMM output on the "features" route.
TILE_BYTES = 32 << 20


def _raise_bad_rows(chunk_offset, bad_label_row, bad_value_row, num_classes, labels, features,
                    clean_labels=None):
    """Raise a ValueError naming the first bad row of a chunk, if any."""
    if bad_label_row != cpu.NO_ROW and bad_label_row <= bad_value_row:
        name, label = "label", labels[bad_label_row]
        if 0 <= label < num_classes:
            name, label = "clean label", clean_labels[bad_label_row]
        raise ValueError(
            f"row {chunk_offset + bad_label_row} has {name} {label}, outside "
            f"[0, {num_classes}): {_LABEL_HINT}; pass num_classes= if there are more classes"
        )
    if bad_value_row != cpu.NO_ROW:
        row = features[bad_value_row]
        if np.isnan(row).any() or np.isinf(row).any():
            kind = "NaN" if np.isnan(row).any() else "Inf"
            raise ValueError(
                f"features row {chunk_offset + bad_value_row} contains {kind}; every value must "
                "be finite: drop or repair such rows (e.g. np.isfinite(features).all(axis=1))"
            )
        raise ValueError(
            f"features row {chunk_offset + bad_value_row} holds values so large (max |x| = "
            f"{np.abs(row).max():.3g}) that their float64 sums overflow; rescale the features"
        )


def _chunk_arrays(features, labels, num_features, clean_labels=None, row_offset=0):
    """Kernel-ready arrays of one chunk (first row ``row_offset``), with shapes checked."""
    features = to_kernel_features(features)
    labels = to_kernel_labels(labels, row_offset=row_offset)
    if features.ndim != 2 or features.shape[1] != num_features:
        raise ValueError(
            f"chunk features have shape {features.shape}; this accumulator expects "
            f"(n, {num_features})"
        )
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"chunk labels have shape {labels.shape} for {features.shape[0]} feature rows; pass "
            "one label per row"
        )
    if clean_labels is not None:
        clean_labels = to_kernel_labels(clean_labels, "clean_labels", row_offset)
        if clean_labels.shape != labels.shape:
            raise ValueError(
                f"chunk clean_labels have shape {clean_labels.shape}, labels {labels.shape}; "
                "pass one clean label per row"
            )
    return features, labels, clean_labels


# Zero-size stand-ins for the clean-row arrays when label noise is not tracked.
_NO_CLEAN = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0)))


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
    clean_counts : int64 array of shape (C,), or None
    clean_sums : float64 array of shape (C, D), or None
    """

    def __init__(self, num_classes, num_features, *, track_clean=False):
        self.counts = np.zeros(num_classes, np.int64)
        self.sums = np.zeros((num_classes, num_features))
        self.clean_counts = np.zeros(num_classes, np.int64) if track_clean else None
        self.clean_sums = np.zeros((num_classes, num_features)) if track_clean else None

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
            clean_labels, clean_counts, clean_sums = _NO_CLEAN
        else:
            clean_counts, clean_sums = self.clean_counts, self.clean_sums
        bad_label_row, bad_value_row = cpu.class_sums_chunk(
            features, labels, clean_labels, self.counts, self.sums, clean_counts, clean_sums,
            numba.get_num_threads())
        _raise_bad_rows(row_offset, bad_label_row, bad_value_row, self.num_classes, labels,
                        features, clean_labels)
        return self

    def _check_compatible(self, other):
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
        self._check_compatible(other)
        self.counts += other.counts
        self.sums += other.sums
        if self.track_clean:
            self.clean_counts += other.clean_counts
            self.clean_sums += other.clean_sums
        return self

    def __add__(self, other):
        self._check_compatible(other)
        merged = ClassSums(self.num_classes, self.num_features, track_clean=self.track_clean)
        merged += self
        merged += other
        return merged

    def __eq__(self, other):
        if not isinstance(other, ClassSums):
            return NotImplemented
        return all(_arrays_equal(a, b) for a, b in zip(self._arrays(), other._arrays()))

    def _arrays(self):
        return (self.counts, self.sums, self.clean_counts, self.clean_sums)

    def __repr__(self):
        clean = f", clean_rows={int(self.clean_counts.sum())}" if self.track_clean else ""
        return (f"ClassSums(C={self.num_classes}, D={self.num_features}, "
                f"rows={int(self.counts.sum())}, classes_with_rows="
                f"{int((self.counts > 0).sum())}{clean})")


def _arrays_equal(a, b):
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and np.array_equal(a, b)


def _classifier_fingerprint(weights, bias):
    if weights is None:
        return ""
    digest = hashlib.sha1(weights.tobytes())
    digest.update(bias.tobytes())
    return digest.hexdigest()


class ResidualStats:
    """Pass-2 state: residual scatter, per-class spreads and prediction tallies.

    Built on the ``Geometry`` of pass 1 (and optionally a linear classifier).
    Per chunk: residuals ``R = H - mu_y`` from the float64 means, one float32
    GEMM ``R M~^T V``, then a fused epilogue (DESIGN.md, pass 2, with ``z = M~ r``
    taken in the eigenbasis ``V`` of the Gram matrix: see ``eigen_scatter``).
    Rows beyond their NCC radius (``Geometry.ncc_sq_radii``) or classifier
    radius (``_classifier_radii``) also get ``z = V a`` or ``W r`` from GEMMs of
    those rows alone (``ncfast.kernels.cpu.residual_blocks``).

    Parameters
    ----------
    geometry : Geometry
    weights : array of shape (C, D), optional
        Classifier ``W``; logits are ``W h + b``.
    bias : array of shape (C,), optional
    class_tile : int, optional
        Classes per GEMM tile on the "features" route; chosen from the chunk
        size by default. Results do not depend on it.

    Attributes
    ----------
    route : {"classes", "features"}
        NC1 from the C'×C' scatter ``S = sum z z^T`` (``z = M~ r``) when
        C' <= D, else from the D×D scatter ``sum r r^T``: cost N·D·min(C', D).
        On the "features" route no C'×C' matrix is formed: predictions run
        over class tiles (``ncfast.kernels.tiles``).
    eigen_scatter : float64 array of shape (C',)
        "classes" route: ``diag(V^T S V) = sum_i (V^T z_i)^2``, ``V`` the
        Gram eigenvectors (``Geometry.gram_eigenvectors``). NC1 needs only
        this diagonal (``Tr(Gram^+ S Gram^+) = sum_j (V^T S V)_jj /
        lambda_j^2``), so no C'×C' update runs per row.
    scatter : float64 array of shape (D, D)
        "features" route: ``sum r r^T``.
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
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry; found {type(geometry).__name__}")
        self.geometry = geometry
        num_classes, num_features = geometry.num_classes, geometry.num_features
        num_means = geometry.present.size
        self.weights, self.bias = _check_classifier(weights, bias, num_classes, num_features)
        self.route = geometry.route
        self.class_tile = class_tile
        self._present_means = np.ascontiguousarray(geometry.means[geometry.present])
        if self.route == "classes":
            # Columns M~^T V: the GEMM gives z = M~ r in the Gram's eigenbasis, V^T z.
            with cpu.dense_blas(2.0 * num_means * (num_means + 2 * num_classes) * num_features):
                self._projection_t = np.ascontiguousarray(
                    geometry.centred.T @ geometry.gram_eigenvectors, dtype=np.float32)
                self._logit_offsets = np.zeros((num_means, 0))
                self._weights_t = np.zeros((num_features, 0), np.float32)
                self._mean_predictions = np.zeros(num_means, np.int64)
                self._classifier_sq_radii = np.full(num_means, np.inf)
                if self.weights is not None:
                    self._weights_t = np.ascontiguousarray(self.weights.T, dtype=np.float32)
                    self._logit_offsets = self._present_means @ self.weights.T + self.bias
                    self._mean_predictions, self._classifier_sq_radii = _classifier_radii(
                        self._present_means, self.weights, self._logit_offsets)
            self._eigenvectors_t = np.ascontiguousarray(geometry.gram_eigenvectors.T, np.float32)
            self.eigen_scatter = np.zeros(num_means)
        else:
            self._centred_t = np.ascontiguousarray(geometry.centred.T, dtype=np.float32)
            if self.weights is not None:
                self._weights_t = np.ascontiguousarray(self.weights.T, dtype=np.float32)
                self._classifier_offsets = self.weights @ geometry.global_mean + self.bias
            self.scatter = np.zeros((num_features, num_features))
        self._classifier_fingerprint = _classifier_fingerprint(self.weights, self.bias)
        self.counts = np.zeros(num_classes, np.int64)
        self.sq_norm_sums = np.zeros(num_classes)
        self.norm_sums = np.zeros(num_classes)
        self.ncc_hits = np.zeros(num_classes, np.int64)
        self.classifier_hits = np.zeros(num_classes, np.int64)
        self.totals = np.zeros(3, np.int64)

    @property
    def sum_names(self):
        """Names of the arrays that merge by addition: the route's scatter, then the tallies."""
        return ("eigen_scatter" if self.route == "classes" else "scatter",) + self._TALLIES

    def add_mean_scatter(self, scatter):
        """Add a scatter ``sum z z^T`` of ``z = M~ r`` summed elsewhere ("classes" route).

        The GPU path sums the C'×C' matrix itself; this keeps its diagonal in
        the Gram eigenbasis, as pass 2 on the CPU does.

        Parameters
        ----------
        scatter : float64 array of shape (C', C')
        """
        vectors = self.geometry.gram_eigenvectors
        self.eigen_scatter += np.einsum("kj,kl,lj->j", vectors, scatter, vectors)

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

    def update(self, features, labels, corrupted=None, *, row_offset=0):
        """Add a chunk of rows.

        Parameters
        ----------
        features : array of shape (n, D)
        labels : int array of shape (n,)
        corrupted : bool array of shape (n,), optional
            Rows whose training label is known to be wrong (label noise).
        row_offset : int
            Index of the chunk's first row in the whole input (error messages).
        """
        geometry = self.geometry
        features, labels, _ = _chunk_arrays(features, labels, geometry.num_features,
                                            row_offset=row_offset)
        num_rows = features.shape[0]
        if num_rows == 0:
            return self
        if corrupted is None:
            corrupted = np.empty(0, np.uint8)
        else:
            corrupted = np.ascontiguousarray(corrupted, dtype=np.uint8)
            if corrupted.shape != (num_rows,):
                raise ValueError(f"corrupted has shape {corrupted.shape}; expected ({num_rows},)")
        sq_norms = np.zeros(num_rows)
        if self.route == "classes":
            # Residuals, GEMM and epilogue fused per cache-sized block.
            if not cpu.residual_chunk(
                    features, labels, corrupted, geometry.label_rows, geometry.present,
                    self._present_means, self._projection_t, geometry.ncc_sq_radii,
                    geometry.mean_sq_distances, self._eigenvectors_t, self._weights_t,
                    self._logit_offsets, self._mean_predictions, self._classifier_sq_radii,
                    tuple(getattr(self, name) for name in self.sum_names), sq_norms,
                    numba.get_num_threads()):
                self._raise_bad_row(features, labels, sq_norms, row_offset)
            return self
        residuals = np.empty(features.shape, np.float32)
        cpu.residuals(features, labels, geometry.label_rows, self._present_means, residuals,
                      sq_norms)
        if not (sq_norms >= 0).all():
            self._raise_bad_row(features, labels, sq_norms, row_offset)
        ncc_predictions, classifier_predictions = self._predict_by_class_tiles(features)
        tiles.tally(sq_norms, labels, ncc_predictions, classifier_predictions, corrupted,
                    self.counts, self.sq_norm_sums, self.norm_sums, self.ncc_hits,
                    self.classifier_hits, self.totals, numba.get_num_threads())
        residuals64 = residuals.astype(np.float64)
        self.scatter += residuals64.T @ residuals64
        return self

    def _predict_by_class_tiles(self, features):
        """Nearest class centre and classifier argmax over class tiles ("features" route).

        Returns
        -------
        ncc_predictions : int64 array of shape (n,)
        classifier_predictions : int64 array of shape (n,), or (0,) without a classifier
        """
        geometry = self.geometry
        num_rows = features.shape[0]
        centred = np.empty(features.shape, np.float32)
        tiles.centre_rows(features, geometry.global_mean, centred)
        tile = self.class_tile or int(np.clip(TILE_BYTES // (4 * num_rows), 64, 1 << 16))
        best_scores = np.full(num_rows, np.inf)
        best_rows = np.zeros(num_rows, np.int64)
        for start in range(0, geometry.present.size, tile):
            stop = min(start + tile, geometry.present.size)
            tiles.nearest_in_tile(centred @ self._centred_t[:, start:stop],
                                  geometry.centred_sq_norms[start:stop], start, best_scores,
                                  best_rows)
        ncc_predictions = geometry.present[best_rows]
        if self.weights is None:
            return ncc_predictions, np.empty(0, np.int64)
        best_logits = np.full(num_rows, -np.inf)
        classifier_predictions = np.zeros(num_rows, np.int64)
        for start in range(0, geometry.num_classes, tile):
            stop = min(start + tile, geometry.num_classes)
            tiles.largest_in_tile(centred @ self._weights_t[:, start:stop],
                                  self._classifier_offsets[start:stop], start, best_logits,
                                  classifier_predictions)
        return ncc_predictions, classifier_predictions

    def _raise_bad_row(self, features, labels, sq_norms, row_offset):
        bad = int(np.flatnonzero(~(sq_norms >= 0))[0])
        label = labels[bad]
        if sq_norms[bad] < 0:
            if 0 <= label < self.geometry.num_classes:
                raise ValueError(
                    f"row {row_offset + bad} has label {label}, a class without a mean (no "
                    "training rows); measure only classes present in the means"
                )
            raise ValueError(
                f"row {row_offset + bad} has label {label}, outside "
                f"[0, {self.geometry.num_classes}): {_LABEL_HINT}"
            )
        _raise_bad_rows(row_offset, cpu.NO_ROW, bad, self.geometry.num_classes, labels, features)

    def _check_compatible(self, other):
        if not isinstance(other, ResidualStats):
            raise TypeError(f"cannot merge ResidualStats with {type(other).__name__}")
        if other.geometry.fingerprint != self.geometry.fingerprint:
            raise ValueError(
                "cannot merge pass-2 states built on different class means; build every "
                "partial state on the same Geometry (the finalized pass 1 of all the data)"
            )
        if other._classifier_fingerprint != self._classifier_fingerprint:
            raise ValueError("cannot merge pass-2 states built with different classifiers")

    def __iadd__(self, other):
        self._check_compatible(other)
        for name in self.sum_names:
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def __add__(self, other):
        self._check_compatible(other)
        merged = ResidualStats(self.geometry, weights=self.weights, bias=self.bias,
                               class_tile=self.class_tile)
        merged += self
        merged += other
        return merged

    def __eq__(self, other):
        if not isinstance(other, ResidualStats):
            return NotImplemented
        return (other.geometry.fingerprint == self.geometry.fingerprint
                and other._classifier_fingerprint == self._classifier_fingerprint
                and all(np.array_equal(getattr(self, name), getattr(other, name))
                        for name in self.sum_names))

    def __repr__(self):
        classifier = "" if self.weights is None else ", classifier"
        return (f"ResidualStats(C={self.geometry.num_classes}, D={self.geometry.num_features}, "
                f"rows={self.num_rows}, route={self.route!r}{classifier}, "
                f"ncc_hits={int(self.ncc_hits.sum())})")


#: A row whose residual is shorter than this fraction of its class's classifier
#: radius is predicted as the classifier predicts its class mean (see
#: ``_classifier_radii``); the rest of the margin absorbs rounding.
CLASSIFIER_RADIUS_FRACTION = 0.9


def _classifier_radii(present_means, weights, logit_offsets):
    """Where the classifier's prediction is that of the class mean.

    At ``h = mu_a + r`` the logits are ``L[a] + W r`` with ``L[a] = W mu_a + b``.
    Let ``c*`` be the first argmax of ``L[a]``. For every other class c,
    ``logit_c* - logit_c >= (L[a, c*] - L[a, c]) - ||w_c* - w_c|| ||r||``, so
    the first argmax stays ``c*`` while ``||r||`` is below the least ratio of
    the logit gap to the weight-row distance (Cauchy-Schwarz): pass 2 skips
    the classifier GEMM for such rows. Gaps are shrunk and distances grown by
    their float64 rounding first, so that the radius errs small.

    Parameters
    ----------
    present_means : float64 array of shape (C', D)
    weights : float64 array of shape (C, D)
    logit_offsets : float64 array of shape (C', C), ``W mu_a + b``

    Returns
    -------
    mean_predictions : int64 array of shape (C',), ``c*`` of each mean
    sq_radii : float64 array of shape (C',)
        ``(CLASSIFIER_RADIUS_FRACTION * radius)^2``; inf when no class can
        overtake ``c*``.
    """
    mean_predictions = np.argmax(logit_offsets, axis=1)
    rows = np.arange(len(present_means))
    best_logits = logit_offsets[rows, mean_predictions][:, None]
    weight_sq_norms = np.einsum("cd,cd->c", weights, weights)
    best_sq_norms = weight_sq_norms[mean_predictions]
    mean_norms = np.sqrt(np.einsum("ad,ad->a", present_means, present_means))
    logit_rounding = ROUNDING_RTOL * (
        np.abs(best_logits) + np.abs(logit_offsets)
        + (np.sqrt(best_sq_norms)[:, None] + np.sqrt(weight_sq_norms)) * mean_norms[:, None])
    gaps = np.maximum(best_logits - logit_offsets - logit_rounding, 0.0)
    sq_distances = (
        pair_sq_distances(best_sq_norms, weight_sq_norms, weights[mean_predictions] @ weights.T)
        + ROUNDING_RTOL * (best_sq_norms[:, None] + weight_sq_norms))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(sq_distances > 0.0, gaps / np.sqrt(sq_distances), np.inf)
    ratios[rows, mean_predictions] = np.inf
    return mean_predictions, (CLASSIFIER_RADIUS_FRACTION * ratios.min(axis=1)) ** 2


def _check_classifier(weights, bias, num_classes, num_features):
    """Validate ``weights`` (C, D) and ``bias`` (C,); return float64 copies."""
    if weights is None:
        if bias is not None:
            raise ValueError("bias was given without weights; pass weights= as well")
        return None, None
    weights = host_array(weights, "weights")
    if weights.shape != (num_classes, num_features):
        raise ValueError(
            f"weights has shape {weights.shape}; expected (num_classes, n_features) = "
            f"({num_classes}, {num_features}), one row per class as in torch's nn.Linear.weight"
        )
    if not np.issubdtype(weights.dtype, np.floating):
        raise TypeError(f"weights must be floating point; found dtype {weights.dtype}")
    weights = weights.astype(np.float64)
    if bias is None:
        bias = np.zeros(num_classes)
    else:
        bias = host_array(bias, "bias")
        if bias.shape != (num_classes,):
            raise ValueError(f"bias has shape {bias.shape}; expected ({num_classes},)")
        if not np.issubdtype(bias.dtype, np.floating):
            raise TypeError(f"bias must be floating point; found dtype {bias.dtype}")
        bias = bias.astype(np.float64)
    if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
        raise ValueError("weights or bias contain NaN or Inf; the classifier must be finite")
    return weights, bias
