"""The pass-2 plan: everything pass 2 and the report read, built once from the means.

``build_plan`` takes a finalized ``Geometry`` and, optionally, a classifier,
runs the pair sweep (``ncfast.sweep``) once, and prepares the projection
``M~^T V``, the radii and the logit offsets. Backends read its public
attributes (the CUDA backend copies the arrays to its device); nothing else
of pass 2 is derived anywhere else.
"""
import hashlib
from dataclasses import dataclass

import numpy as np

from ncfast.backends.cpu import CPU
from ncfast.geometry import NCC_RADIUS_FRACTION, ROUNDING_RTOL, Geometry, pair_sq_distances
from ncfast.inputs import host_array
from ncfast.kernels.cpu import ClassesRoute, dense_blas
from ncfast.sweep import PairSweep, pair_sweep, to_host

#: A row whose residual is shorter than this fraction of its class's classifier
#: radius is predicted as the classifier predicts its class mean (see
#: ``classifier_radii``); the rest of the margin absorbs rounding.
CLASSIFIER_RADIUS_FRACTION = 0.9


@dataclass(frozen=True, eq=False)
class Pass2Plan:
    """What pass 2 and the report need from the means and the classifier.

    Attributes
    ----------
    geometry : Geometry
    weights : float64 array of shape (C, D), or None
    bias : float64 array of shape (C,), or None
    sweep : PairSweep
        The class-pair sums of the means (and the classifier rows of the
        classes with a mean).
    present_means : float64 array of shape (C', D), C-contiguous
    projection_t : float32 array of shape (D, C')
        "classes" route: ``M~^T V`` (``V`` the Gram eigenvectors), so that the
        GEMM gives ``a = V^T z`` with ``z = M~ r``; "features" route: ``M~^T``.
    eigenvectors_t : float32 array of shape (C', C'), ``V^T``; (0, 0) on the
        "features" route
    ncc_sq_radii : float64 array of shape (C',)
        ``(NCC_RADIUS_FRACTION * g_a)^2``, ``g_a`` the distance from mean a to
        the nearest other mean (from the sweep, less its float64 rounding): a
        row of class a with ``||r||^2`` below it is nearest to its own mean.
    weights_t : float32 array of shape (D, C_w), ``W^T`` (C_w = 0 without a classifier)
    logit_offsets : float64 array, C-contiguous
        "classes" route: shape (C', C_w), ``W mu_a + b``; "features" route:
        shape (C_w,), ``W mu_G + b`` (logits of centred rows).
    mean_predictions : int64 array of shape (C',)
        First argmax of each mean's logits (zeros where the radii are 0).
    classifier_sq_radii : float64 array of shape (C',)
        A row inside takes its mean's prediction (``classifier_radii``). On
        the "features" route they are 0, so that every row is multiplied by
        ``W``, unless pass 1 counted ``RADII_ROWS_PER_MEAN`` rows per mean.
    classifier_fingerprint : str
        Digest of the classifier ("" without one); states built with
        different classifiers refuse to merge.
    """

    geometry: Geometry
    weights: np.ndarray | None
    bias: np.ndarray | None
    sweep: PairSweep
    present_means: np.ndarray
    projection_t: np.ndarray
    eigenvectors_t: np.ndarray
    ncc_sq_radii: np.ndarray
    weights_t: np.ndarray
    logit_offsets: np.ndarray
    mean_predictions: np.ndarray
    classifier_sq_radii: np.ndarray
    classifier_fingerprint: str

    @property
    def route(self):
        return self.geometry.route

    @property
    def has_classifier(self):
        return self.weights is not None

    def classes_route(self):
        """The arrays of the "classes" route kernels (``ncfast.kernels.cpu.ClassesRoute``)."""
        geometry = self.geometry
        return ClassesRoute(geometry.label_rows, geometry.present, self.present_means,
                            self.projection_t, self.ncc_sq_radii, geometry.mean_sq_distances,
                            self.eigenvectors_t, self.weights_t, self.logit_offsets,
                            self.mean_predictions, self.classifier_sq_radii)


def build_plan(geometry, weights=None, bias=None, *, backend=CPU, pair_tile=None):
    """The ``Pass2Plan`` of a geometry and an optional classifier.

    Parameters
    ----------
    geometry : Geometry
    weights : array of shape (C, D), optional
    bias : array of shape (C,), optional
    backend : backend object, optional
        Runs the pair sweep (the CPU's worker threads by default).
    pair_tile : int, optional
        Classes per side of a sweep tile.

    Returns
    -------
    Pass2Plan
    """
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry; found {type(geometry).__name__}")
    num_classes, num_features = geometry.num_classes, geometry.num_features
    weights, bias = check_classifier(weights, bias, num_classes, num_features)
    present = geometry.present
    num_means = present.size
    present_means = np.ascontiguousarray(geometry.means[present])
    xp = backend.xp
    present_weights = None if weights is None else xp.asarray(weights[present])
    classes_route = geometry.route == "classes"
    # On the "classes" route (C' <= D) finalize formed the Gram matrix already, and the
    # C'×C' classifier products are no larger than the means: the sweep keeps them, so
    # the logit offsets and radii need no product of their own (when every class has a mean).
    every_class = num_means == num_classes
    sweep = pair_sweep(xp.asarray(geometry.centred), xp.asarray(geometry.global_mean),
                       present_weights, backend=backend, tile=pair_tile,
                       gram=xp.asarray(geometry.gram) if classes_route else None,
                       keep_classifier_products=classes_route and every_class)
    sq_norms = geometry.centred_sq_norms
    nearest = sweep.nearest_sq_distances - ROUNDING_RTOL * (sq_norms + sq_norms.max())
    ncc_sq_radii = NCC_RADIUS_FRACTION ** 2 * np.maximum(nearest, 0.0)
    num_logits = 0 if weights is None else num_classes
    weights_t = np.zeros((num_features, 0), np.float32)
    if weights is not None:
        weights_t = np.ascontiguousarray(weights.T, dtype=np.float32)
    mean_predictions = np.zeros(num_means, np.int64)
    if classes_route:
        with dense_blas(2.0 * num_means * (num_means + 2 * num_logits) * num_features):
            projection_t = np.ascontiguousarray(geometry.centred.T @ geometry.gram_eigenvectors,
                                                dtype=np.float32)
            logit_offsets = np.zeros((num_means, 0))
            classifier_sq_radii = np.full(num_means, np.inf)
            if weights is not None:
                weight_gram = None
                if every_class:
                    # W mu_a + b = W mu~_a + (W mu_G + b), from the sweep's W M~^T.
                    logit_offsets = np.ascontiguousarray(
                        to_host(sweep.weight_mean_products).T
                        + (weights @ geometry.global_mean + bias))
                    weight_gram = to_host(sweep.weight_gram)
                else:
                    logit_offsets = present_means @ weights.T + bias
                mean_predictions, classifier_sq_radii = classifier_radii(
                    present_means, weights, logit_offsets, weight_gram)
        eigenvectors_t = np.ascontiguousarray(geometry.gram_eigenvectors.T, np.float32)
    else:
        projection_t = np.ascontiguousarray(geometry.centred.T, dtype=np.float32)
        eigenvectors_t = np.zeros((0, 0), np.float32)
        logit_offsets = np.zeros(0) if weights is None else weights @ geometry.global_mean + bias
        classifier_sq_radii = np.zeros(num_means)
        if weights is not None and _radii_pay_off(geometry):
            mean_predictions, classifier_sq_radii = bounded_classifier_radii(
                present_means, weights, bias)
    return Pass2Plan(geometry=geometry, weights=weights, bias=bias, sweep=sweep,
                     present_means=present_means, projection_t=projection_t,
                     eigenvectors_t=eigenvectors_t, ncc_sq_radii=ncc_sq_radii,
                     weights_t=weights_t, logit_offsets=logit_offsets,
                     mean_predictions=mean_predictions, classifier_sq_radii=classifier_sq_radii,
                     classifier_fingerprint=_classifier_fingerprint(weights, bias))


def eigen_diagonal(scatter, eigenvectors):
    """``diag(V^T S V)``: the NC1 state of a C'×C' scatter ``S`` of ``z = M~ r`` (any
    array namespace; one GEMM).

    Parameters
    ----------
    scatter : float64 array of shape (C', C')
    eigenvectors : float64 array of shape (C', C'), ``V`` (``Geometry.gram_eigenvectors``)

    Returns
    -------
    float64 array of shape (C',)
    """
    return ((scatter @ eigenvectors) * eigenvectors).sum(axis=0)


def _classifier_fingerprint(weights, bias):
    if weights is None:
        return ""
    digest = hashlib.sha1(weights.tobytes())
    digest.update(bias.tobytes())
    return digest.hexdigest()


def classifier_radii(present_means, weights, logit_offsets, weight_gram=None):
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
    weight_gram : float64 array of shape (C, C), optional
        ``W W^T`` when already formed.

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
    best_products = weight_gram[mean_predictions] if weight_gram is not None else \
        weights[mean_predictions] @ weights.T
    sq_distances = (pair_sq_distances(best_sq_norms, weight_sq_norms, best_products)
                    + ROUNDING_RTOL * (best_sq_norms[:, None] + weight_sq_norms))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(sq_distances > 0.0, gaps / np.sqrt(sq_distances), np.inf)
    ratios[rows, mean_predictions] = np.inf
    return mean_predictions, (CLASSIFIER_RADIUS_FRACTION * ratios.min(axis=1)) ** 2


#: On the "features" route the classifier radii cost one float32 product of the
#: C'×D means with the C×D classifier (``bounded_classifier_radii``) and save pass 2
#: the product of each collapsed row with it: they are computed when pass 1 counted
#: at least this many rows per mean (far from collapse they then cost at most a
#: quarter of the classifier's pass-2 product).
RADII_ROWS_PER_MEAN = 4

#: Bytes of one tile of float32 mean logits in ``bounded_classifier_radii``.
RADII_TILE_BYTES = 64 << 20


def _radii_pay_off(geometry):
    """Whether the "features" route's classifier radii cost less than they can save."""
    if geometry.counts is None:
        return False
    return int(geometry.counts.sum()) >= RADII_ROWS_PER_MEAN * geometry.present.size


def bounded_classifier_radii(present_means, weights, bias):
    """Classifier radii from each mean's two largest logits (the "features" route).

    For ``c*`` the first argmax of ``L[a] = W mu_a + b`` and any other class c,
    ``||w_c* - w_c|| <= ||w_c*|| + max_c ||w_c||``, so the bound of
    ``classifier_radii`` gives the radius ``(L[a, c*] - L2[a]) / (||w_c*|| +
    max_c ||w_c||)`` with ``L2`` the second largest logit: one pass over tiles
    of float32 logits ``M W^T``, no C'×C matrix and no product with
    ``W[c*]``. Each logit is within ``(gamma_D + 2u) ||w_c|| ||mu_a||`` of its
    exact value (u the float32 unit roundoff, ``gamma_D = D u / (1 - D u)``
    the bound of a D-term float32 dot product in any order, ``2u`` the rounding
    of both factors to float32; Higham 2002, eq. 3.5); the gaps are shrunk by
    twice that, so the radii err small.

    Parameters
    ----------
    present_means : float64 array of shape (C', D)
    weights : float64 array of shape (C, D)
    bias : float64 array of shape (C,)

    Returns
    -------
    mean_predictions : int64 array of shape (C',), ``c*`` of each mean
    sq_radii : float64 array of shape (C',)
        ``(CLASSIFIER_RADIUS_FRACTION * radius)^2``
    """
    num_means, num_features = present_means.shape
    num_classes = weights.shape[0]
    if num_classes < 2:
        return np.zeros(num_means, np.int64), np.full(num_means, np.inf)
    unit = np.finfo(np.float32).eps / 2
    rounding = num_features * unit / (1 - num_features * unit) + 2 * unit
    weight_norms = np.sqrt(np.einsum("cd,cd->c", weights, weights))
    mean_norms = np.sqrt(np.einsum("ad,ad->a", present_means, present_means))
    weights_t = np.ascontiguousarray(weights.T, dtype=np.float32)
    tile = max(1, RADII_TILE_BYTES // (4 * num_classes))
    mean_predictions = np.empty(num_means, np.int64)
    gaps = np.empty(num_means)
    with dense_blas(2.0 * num_means * num_classes * num_features):
        for start in range(0, num_means, tile):
            stop = min(start + tile, num_means)
            logits = (present_means[start:stop].astype(np.float32) @ weights_t).astype(
                np.float64) + bias
            best = np.argmax(logits, axis=1)
            rows = np.arange(stop - start)
            best_logits = logits[rows, best]
            logits[rows, best] = -np.inf
            gaps[start:stop] = best_logits - logits.max(axis=1)
            mean_predictions[start:stop] = best
    distance_bounds = weight_norms[mean_predictions] + weight_norms.max()
    gaps = np.maximum(gaps - 2.0 * rounding * distance_bounds * mean_norms
                      - ROUNDING_RTOL * np.abs(bias).max(), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        radii = np.where(distance_bounds > 0.0, gaps / distance_bounds, np.inf)
    return mean_predictions, (CLASSIFIER_RADIUS_FRACTION * radii) ** 2


def check_classifier(weights, bias, num_classes, num_features):
    """Validate ``weights`` (C, D) and ``bias`` (C,); return float64 copies (or None, None)."""
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
