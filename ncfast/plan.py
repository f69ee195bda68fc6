"""The pass-2 plan: everything pass 2 and the report read, built once from the means.

``build_plan`` takes a finalized ``Geometry`` and, optionally, a classifier,
runs the pair sweep (``ncfast.sweep``) once, and prepares the projection
``M~^T V``, the radii and the logit offsets. Backends read its public
attributes (the CUDA backend copies the arrays to its device); nothing else
of pass 2 is derived anywhere else.
"""
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np

from ncfast.backends.cpu import CPU
from ncfast.geometry import NCC_RADIUS_FRACTION, ROUNDING_RTOL, SCALE_RANGE, Geometry
from ncfast.inputs import host_array
from ncfast.kernels import pairs
from ncfast.kernels.cpu import ClassesRoute, dense_blas, run_tasks
from ncfast.progress import NO_PROGRESS
from ncfast.sweep import PairSweep, merge_top_logits, pair_sweep, to_host, top_two_logits

#: A row whose residual is shorter than this fraction of its class's classifier
#: radius is predicted as the classifier predicts its class mean (see
#: ``classifier_radii``); the rest of the margin absorbs rounding.
CLASSIFIER_RADIUS_FRACTION = 0.9

#: Rows of ``M~^T V`` per host task: a fixed size, so that the projection pass 2
#: multiplies by does not depend on the number of threads.
PROJECTION_ROWS = 256


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
    present_means : float64 array of shape (C', D), C-contiguous (``Geometry.present_means``)
    projection_t : float32 array of shape (D, C')
        "classes" route: ``M~^T V`` (``V`` the Gram eigenvectors), so that the
        GEMM gives ``a = V^T z`` with ``z = M~ r``; "features" route: ``M~^T``.
    eigenvectors_t : float32 array of shape (C', C'), ``V^T``; (0, 0) on the
        "features" route
    between_basis : float32 array of shape (D, D)
        "features" route: ``U``, the unit eigenvectors of ``Sigma_B`` as columns
        (``Geometry.between_spectrum``), so that pass 2's GEMM ``R U`` gives each
        residual's coordinates, whose squares NC1 sums; (0, 0) on the "classes" route.
    ncc_sq_radii : float64 array of shape (C',)
        ``(NCC_RADIUS_FRACTION * g_a)^2``, ``g_a`` the distance from mean a to
        the nearest other mean (from the sweep, less its float64 rounding): a
        row of class a with ``||r||^2`` below it is nearest to its own mean.
    weights_t : float32 array of shape (D, C_w), ``W^T`` (C_w = 0 without a classifier)
    global_logits : float64 array of shape (C_w,), ``W mu_G + b``
    logit_offsets : float64 array, C-contiguous
        "classes" route: shape (C', C_w), ``W mu_a + b``; "features" route:
        ``global_logits`` (logits of centred rows).
    mean_predictions : int64 array of shape (C',)
        First argmax of each mean's logits (zeros where the radii are 0).
    classifier_sq_radii : float64 array of shape (C',)
        A row inside takes its mean's prediction (``classifier_radii``; on
        the "features" route ``bounded_classifier_radii``); 0 without a classifier.
    ncc_band, classifier_band : float64 arrays of shape (3,)
        Coefficients of the near-tie threshold of a row's nearest mean and of
        its classifier argmax (``near_tie_bands``).
    classifier_fingerprint : str
        Digest of the classifier ("" without one), computed on first use;
        states built with different classifiers refuse to merge.
    """

    geometry: Geometry
    weights: np.ndarray | None
    bias: np.ndarray | None
    sweep: PairSweep
    present_means: np.ndarray
    projection_t: np.ndarray
    eigenvectors_t: np.ndarray
    between_basis: np.ndarray
    ncc_sq_radii: np.ndarray
    weights_t: np.ndarray
    global_logits: np.ndarray
    logit_offsets: np.ndarray
    mean_predictions: np.ndarray
    classifier_sq_radii: np.ndarray
    ncc_band: np.ndarray
    classifier_band: np.ndarray

    @property
    def route(self):
        return self.geometry.route

    @cached_property
    def classifier_fingerprint(self):
        if self.weights is None:
            return ""
        digest = hashlib.sha1(self.weights.tobytes())
        digest.update(self.bias.tobytes())
        return digest.hexdigest()

    @property
    def has_classifier(self):
        return self.weights is not None

    def classes_route(self):
        """The arrays of the "classes" route kernels (``ncfast.kernels.cpu.ClassesRoute``)."""
        geometry = self.geometry
        weights, bias = self.weights, self.bias
        if weights is None:
            weights, bias = np.zeros((0, geometry.num_features)), np.zeros(0)
        return ClassesRoute(geometry.label_rows, geometry.present, self.present_means,
                            self.projection_t, self.ncc_sq_radii, geometry.mean_sq_distances,
                            self.eigenvectors_t, self.weights_t, self.logit_offsets,
                            self.mean_predictions, self.classifier_sq_radii, weights, bias,
                            self.ncc_band, self.classifier_band)


def build_plan(geometry, weights=None, bias=None, *, backend=CPU, pair_tile=None,
               progress=NO_PROGRESS.stage):
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
    progress : callable, optional
        Opens the progress stage of the pair sweep's tiles (``pair_sweep``).

    Returns
    -------
    Pass2Plan
    """
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry; found {type(geometry).__name__}")
    num_classes, num_features = geometry.num_classes, geometry.num_features
    # W as given until the pair sweep, which converts it a tile at a time; the plan's own
    # float64 copy is made after: at 32,000 classes of 4096 features, 1 GB that would
    # otherwise sit beside the sweep's stacked copy of M~ and W.
    weights, bias = check_classifier(weights, bias, num_classes, num_features, copy=False)
    present = geometry.present
    num_means = present.size
    every_class = num_means == num_classes
    present_means = geometry.present_means
    xp = backend.xp
    classes_route = geometry.route == "classes"
    num_logits = 0 if weights is None else num_classes
    weights_t = np.empty((num_features, num_logits), np.float32)
    # On the "features" route pass 2 multiplies the rows by M~^T and the residuals by
    # Sigma_B's eigenvectors (float32).
    projection_t = None if classes_route else np.empty((num_features, num_means), np.float32)
    between_basis = np.empty((0, 0) if classes_route else (num_features, num_features),
                             np.float32)

    def transpose_weights():
        weights_t[...] = weights.T

    def transpose_means():
        projection_t[...] = geometry.centred.T

    def round_between_basis():
        geometry.decompose(backend.symmetric_eigh)
        between_basis[...] = geometry.between_spectrum[1]

    # Beside the sweep's tiles, on the same worker threads: the eigendecomposition of the
    # Gram (the backend's solver: LAPACK on one thread on the CPU, the longest task, so
    # first) and the distances between the means, or on the "features" route that of
    # Sigma_B rounded to float32 for pass 2, with the float32 copy of M~^T; and the
    # float32 copy of W^T.
    if classes_route:
        alongside = [lambda: geometry.decompose(backend.symmetric_eigh),
                     lambda: geometry.mean_sq_distances]
    else:
        alongside = [round_between_basis, transpose_means]
    global_logits, present_global_logits = np.zeros(0), None
    if weights is not None:
        alongside.append(transpose_weights)
        with dense_blas(2.0 * weights.size):
            global_logits = weights.astype(np.float64, copy=False) @ geometry.global_mean + bias
        if not classes_route:  # the top logits give the radii
            present_global_logits = xp.asarray(global_logits if every_class
                                               else global_logits[present])
    # On the "classes" route (C' <= D) finalize formed the Gram matrix already, and the
    # C'×C' classifier products are no larger than the means: the sweep keeps them, so
    # the logit offsets and radii need no product of their own (when every class has a mean).
    sweep = pair_sweep(xp.asarray(geometry.present_means), xp.asarray(geometry.global_mean),
                       None if weights is None else xp.asarray(weights), present_global_logits,
                       backend=backend, tile=pair_tile, centred=xp.asarray(geometry.centred),
                       gram=xp.asarray(geometry.gram) if classes_route else None,
                       keep_classifier_products=classes_route and every_class,
                       alongside=alongside,
                       weight_rows=None if every_class else xp.asarray(present),
                       progress=progress)
    if weights is not None:
        weights = weights.astype(np.float64)
    sq_norms = geometry.centred_sq_norms
    nearest = sweep.nearest_sq_distances - ROUNDING_RTOL * (sq_norms + sq_norms.max())
    ncc_sq_radii = NCC_RADIUS_FRACTION ** 2 * np.maximum(nearest, 0.0)
    mean_predictions = np.zeros(num_means, np.int64)
    if classes_route:
        projection_t = gram_projection(geometry.centred, geometry.gram_eigenvectors)
        eigenvectors_t = np.ascontiguousarray(geometry.gram_eigenvectors.T, np.float32)
        logit_offsets = np.zeros((num_means, 0))
        classifier_sq_radii = np.full(num_means, np.inf)
        if weights is not None:
            weight_gram = None
            if every_class:
                # W mu_a + b = W mu~_a + (W mu_G + b), from the sweep's M~ W^T.
                logit_offsets = to_host(sweep.mean_weight_products) + global_logits
                weight_gram = to_host(sweep.weight_gram)
            else:
                with dense_blas(2.0 * num_means * num_logits * num_features):
                    logit_offsets = present_means @ weights.T + bias
            mean_predictions, classifier_sq_radii = classifier_radii(
                present_means, weights, logit_offsets, weight_gram)
    else:
        eigenvectors_t = np.zeros((0, 0), np.float32)
        logit_offsets = global_logits
        classifier_sq_radii = np.zeros(num_means)
        if weights is not None:
            mean_predictions, classifier_sq_radii = bounded_classifier_radii(
                geometry, sweep, weights, bias)
    ncc_band, classifier_band = near_tie_bands(geometry, weights, bias)
    return Pass2Plan(geometry=geometry, weights=weights, bias=bias, sweep=sweep,
                     present_means=present_means, projection_t=projection_t,
                     eigenvectors_t=eigenvectors_t, between_basis=between_basis,
                     ncc_sq_radii=ncc_sq_radii,
                     weights_t=weights_t, global_logits=global_logits,
                     logit_offsets=logit_offsets, mean_predictions=mean_predictions,
                     classifier_sq_radii=classifier_sq_radii, ncc_band=ncc_band,
                     classifier_band=classifier_band)


#: Factor on the near-tie bounds of ``near_tie_bands``: the terms each bound leaves out
#: (products of two roundings, V's departure from orthogonality) are far below it.
NEAR_TIE_SAFETY = 2.0


def near_tie_bands(geometry, weights=None, bias=None):
    """Coefficients of the threshold below which pass 2 decides a prediction in float64.

    Pass 2 scores the means and classes of a row beyond its radius from float32
    products: on the "classes" route the NCC score of mean k is
    ``K[y, k] - 2 z_k`` (``z = V a``, ``a = (M~^T V)^T r``, two float32 GEMMs of
    D and C' terms) and the logit ``(W r)_c + L[y, c]``; on the "features"
    route ``||mu~_k||^2 - 2 h~.mu~_k`` and ``(W h~)_c + (W mu_G + b)_c`` with
    ``h~ = h - mu_G``. Each differs from its exact value (up to a constant of
    the row) by at most ``delta``, and the float64 score of the row itself
    (``||h - mu_k||^2``, ``w_c . h + b_c``; ``ncfast.kernels.cpu.exact_sq_distance``,
    ``exact_logit``) by at most ``eps``. A score more than ``2 (delta + eps)``
    above the best then belongs to a mean or class that is not the first best
    in float64 either, and where no other score comes that close the float32
    decision is the float64 one. The bounds, with ``rho = ||r||``:

    - a float32 dot product of n terms in any order, with both factors rounded
      to float32, is within ``g32 (n) = (n + 6) u32`` of ``|x| . |y|``
      (Higham 2002, eq. 3.5), bounded by ``||x|| ||y||``; ``||a - a^||`` by
      ``g32(D) ||r|| ||M~||_F`` and ``z = V a`` adds ``g32(C') ||a||``
      (``V`` orthogonal): ``S = ||M~||_F`` and ``g32(D) + g32(C')`` on the
      "classes" route; per mean ``S = max ||mu~_k||``, ``n = D`` on the
      "features" route, where ``||h~|| <= rho + max ||mu~_k|| + ||e||``;
    - float64 sums of D terms: ``g64 = (D + C' + 6) u64`` of their absolute values;
    - the centred means ``mu~_k = mu_k - mu_G`` are rounded, by
      ``||e|| <= 4 u64 A`` with ``A = max ||mu_k|| + ||mu_G||``.

    NCC (``mt = max ||mu~_k||``, ``x`` the extra length of ``h~`` over ``r``):
    ``delta <= 2 g32 S (rho + x) + 4 g64 mt^2 + 8 u64 A (rho + 2 mt + x)`` and
    ``eps <= g64 (rho + 2 mt + 4 u64 A)^2``. Classifier (``wmax = max ||w_c||``):
    ``delta <= wmax (g32 (rho + x) + g64 (A + mt) + 4 u64 A) + g64 max |b|`` and
    ``eps <= g64 (wmax (rho + A) + max |b|)``. The threshold is
    ``NEAR_TIE_SAFETY * 2 (delta + eps)`` written as ``(q2 rho + q1) rho + q0``;
    the kernels add ``SCORE_ROUNDING`` times the best score.

    Parameters
    ----------
    geometry : Geometry
    weights : float64 array of shape (C, D), optional
    bias : float64 array of shape (C,), optional

    Returns
    -------
    ncc_band, classifier_band : float64 arrays of shape (3,), ``(q2, q1, q0)``
    """
    num_means, num_features = geometry.centred.shape
    u32, u64 = np.finfo(np.float32).eps / 2, np.finfo(np.float64).eps / 2
    mean_sq_norms = geometry.centred_sq_norms
    largest_centred = math.sqrt(float(mean_sq_norms.max()))
    offset = (math.sqrt(float(np.einsum("kd,kd->k", geometry.present_means,
                                        geometry.present_means).max()))
              + float(np.linalg.norm(geometry.global_mean)))
    centring = 4.0 * u64 * offset
    g64 = (num_features + num_means + 6) * u64
    factor = 2.0 * NEAR_TIE_SAFETY
    if geometry.route == "classes":
        scale, extra = math.sqrt(float(mean_sq_norms.sum())), 0.0
        g32 = (num_features + num_means + 12) * u32
    else:
        scale, extra = largest_centred, largest_centred + centring
        g32 = (num_features + 6) * u32
    reach = 2.0 * largest_centred + centring
    ncc_band = factor * np.array([
        g64,
        2.0 * g32 * scale + 8.0 * u64 * offset + 2.0 * g64 * reach,
        2.0 * g32 * scale * extra + 4.0 * g64 * largest_centred ** 2
        + 8.0 * u64 * offset * (2.0 * largest_centred + extra) + g64 * reach ** 2])
    classifier_band = np.zeros(3)
    if weights is not None:
        g32 = (num_features + 6) * u32
        largest_weights = math.sqrt(float(np.einsum("cd,cd->c", weights, weights).max()))
        largest_bias = float(np.abs(bias).max())
        classifier_band = factor * np.array([
            0.0,
            largest_weights * (g32 + g64),
            largest_weights * (g32 * extra + g64 * (2.0 * offset + largest_centred)
                               + 4.0 * u64 * offset) + 2.0 * g64 * largest_bias])
    return ncc_band, classifier_band


def gram_projection(centred, eigenvectors):
    """``M~^T V`` rounded to float32: pass 2's GEMM of the residuals by it gives ``V^T M~ r``.

    A float64 GEMM per ``PROJECTION_ROWS`` rows, on the worker threads.

    Parameters
    ----------
    centred : float64 array of shape (C', D), ``M~``
    eigenvectors : float64 array of shape (C', C'), ``V``

    Returns
    -------
    float32 array of shape (D, C')
    """
    num_features = centred.shape[1]
    projection_t = np.empty((num_features, eigenvectors.shape[1]), np.float32)
    starts = range(0, num_features, PROJECTION_ROWS)

    def project(task):
        rows = slice(starts[task], starts[task] + PROJECTION_ROWS)
        projection_t[rows] = centred[:, rows].T @ eigenvectors

    run_tasks(project, len(starts), numba.get_num_threads())
    return projection_t


def eigen_diagonal(scatter, eigenvectors):
    """``diag(V^T S V)``: the NC1 state (``ResidualStats.eigen_scatter``) of a scatter
    ``S`` (any array namespace; one GEMM).

    Parameters
    ----------
    scatter : float64 array of shape (K, K)
        Of ``r`` (K = D), as the GPU sums it on the "features" route; the identity
        holds as well for the scatter of ``z = M~ r`` (K = C') with the Gram's
        eigenvectors.
    eigenvectors : float64 array of shape (K, K)
        ``Geometry.between_spectrum``'s, or ``Geometry.gram_eigenvectors``.

    Returns
    -------
    float64 array of shape (K,)
    """
    return ((scatter @ eigenvectors) * eigenvectors).sum(axis=0)


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
    if weight_gram is None:
        with dense_blas(2.0 * len(present_means) * weights.size):
            weight_products = weights[mean_predictions] @ weights.T
        product_rows = np.arange(len(present_means))
    else:
        weight_products, product_rows = weight_gram, mean_predictions
    sq_radii = np.empty(len(present_means))
    pairs.classifier_sq_radii(
        logit_offsets, mean_predictions, weight_products, product_rows,
        np.einsum("cd,cd->c", weights, weights),
        np.sqrt(np.einsum("ad,ad->a", present_means, present_means)),
        ROUNDING_RTOL, CLASSIFIER_RADIUS_FRACTION, sq_radii)
    return mean_predictions, sq_radii


#: Bytes of one tile of float64 logits of the means with the classes that have no
#: mean, in ``bounded_classifier_radii``.
ABSENT_LOGITS_TILE_BYTES = 64 << 20


def bounded_classifier_radii(geometry, sweep, weights, bias):
    """Classifier radii from each mean's two largest logits (the "features" route).

    For ``c*`` the first argmax of ``L[a] = W mu_a + b`` and any other class c,
    ``||w_c* - w_c|| <= ||w_c*|| + max_c ||w_c||``, so the bound of
    ``classifier_radii`` gives the radius ``(L[a, c*] - L2[a]) / (||w_c*|| +
    max_c ||w_c||)`` with ``L2`` the second largest logit: no C'×C matrix and
    no product with ``W[c*]``. The pair sweep found both logits over the
    classes with a mean (its float64 ``M~ W^T`` blocks); the classes without
    one are multiplied here, over tiles of means. Each float64 logit is within
    ``rtol (||w_c|| (||mu~_a|| + ||mu_G||) + |b_c|)`` of its exact value, with
    ``rtol = ROUNDING_RTOL + gamma_D`` (``gamma_D = D u / (1 - D u)`` the
    bound of a D-term dot product in any order, u the float64 unit roundoff;
    Higham 2002, eq. 3.5): the gaps are shrunk by twice that, so the radii err
    small.

    Parameters
    ----------
    geometry : Geometry
    sweep : PairSweep
        Of the centred means and the classifier rows of the classes with a
        mean, with ``W mu_G + b`` as its global logits.
    weights : float64 array of shape (C, D)
    bias : float64 array of shape (C,)

    Returns
    -------
    mean_predictions : int64 array of shape (C',), ``c*`` of each mean
    sq_radii : float64 array of shape (C',)
        ``(CLASSIFIER_RADIUS_FRACTION * radius)^2``
    """
    present = geometry.present
    num_means, num_features = geometry.centred.shape
    top_logits = sweep.top_logits.copy()
    mean_predictions = present[sweep.top_classes]
    absent = np.flatnonzero(geometry.label_rows < 0)
    if absent.size:
        absent_weights_t = weights[absent].T
        tile = max(1, ABSENT_LOGITS_TILE_BYTES // (8 * absent.size))
        with dense_blas(2.0 * num_means * absent.size * num_features):
            for start in range(0, num_means, tile):
                span = slice(start, min(start + tile, num_means))
                tile_top, best_columns = top_two_logits(
                    np, geometry.present_means[span] @ absent_weights_t, bias[absent])
                merge_top_logits(np, top_logits[span], mean_predictions[span], tile_top,
                                 absent[best_columns])
    unit = np.finfo(np.float64).eps / 2
    rounding = ROUNDING_RTOL + num_features * unit / (1 - num_features * unit)
    weight_norms = np.sqrt(np.einsum("cd,cd->c", weights, weights))
    mean_norms = np.sqrt(geometry.centred_sq_norms) + np.linalg.norm(geometry.global_mean)
    distance_bounds = weight_norms[mean_predictions] + weight_norms.max()
    gaps = np.maximum(top_logits[:, 0] - top_logits[:, 1] - 2.0 * rounding
                      * (distance_bounds * mean_norms + np.abs(bias).max()), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        radii = np.where(distance_bounds > 0.0, gaps / distance_bounds, np.inf)
    return mean_predictions, (CLASSIFIER_RADIUS_FRACTION * radii) ** 2


def check_classifier(weights, bias, num_classes, num_features, *, copy=True):
    """Validate ``weights`` (C, D) and ``bias`` (C,); return float64 copies (or None, None).

    With ``copy=False`` only validate: the arrays come back as given (host arrays), and
    nothing as large as ``W`` is allocated (the drivers check the classifier before
    pass 1; the plan copies it after).
    """
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
    if copy:
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
    # NaN propagates through max and min, Inf reaches one of them: no temporary as large as W.
    weight_range = (float(weights.max()), float(weights.min()))
    if not (all(map(math.isfinite, weight_range)) and np.isfinite(bias).all()):
        raise ValueError("weights or bias contain NaN or Inf; the classifier must be finite")
    largest, (low, high) = max(weight_range[0], -weight_range[1]), SCALE_RANGE
    if largest != 0.0 and not low <= largest <= high:
        raise ValueError(
            f"weights has entries up to {largest:.3g}; ncfast's pass 2 multiplies them in "
            f"float32, which needs the largest between {low:g} and {high:g}: rescale weights "
            "and bias by one factor (the predictions do not change)")
    return weights, bias
