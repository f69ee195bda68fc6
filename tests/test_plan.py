"""Finalize's Gram and the pass-2 plan against dense float64: the eigenbasis projection,
the logit offsets and the classifier radii, with every class present (products kept by
the sweep) and without.

C' = 257, D = 300: the "classes" route, with Gram row blocks (``GRAM_ROWS``), sweep tiles
(97) and projection tasks (``PROJECTION_ROWS``) that do not divide the sizes.
"""
import dataclasses

import numpy as np
import pytest

import ncfast
from cases import gaussian_classes
from ncfast.geometry import NCC_RADIUS_FRACTION, ROUNDING_RTOL, Geometry, centred_gram
from ncfast.plan import CLASSIFIER_RADIUS_FRACTION, build_plan, classifier_radii

NUM_CLASSES, NUM_FEATURES = 257, 300


def _means_and_classifier(seed=0, *, absent=()):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((NUM_CLASSES, NUM_FEATURES)) + 3.0
    weights = means - means.mean(axis=0) + 0.3 * rng.standard_normal(means.shape)
    bias = 0.1 * rng.standard_normal(NUM_CLASSES)
    means[list(absent)] = np.nan
    return means, weights, bias


def _dense_classifier_sq_radii(present_means, weights, logit_offsets):
    """The Cauchy-Schwarz radii (``classifier_radii``) from explicit C'×C arrays."""
    predictions = np.argmax(logit_offsets, axis=1)
    rows = np.arange(len(present_means))
    best = logit_offsets[rows, predictions][:, None]
    weight_norms = np.linalg.norm(weights, axis=1)
    best_norms = weight_norms[predictions][:, None]
    mean_norms = np.linalg.norm(present_means, axis=1)[:, None]
    gaps = np.maximum(best - logit_offsets - ROUNDING_RTOL * (
        np.abs(best) + np.abs(logit_offsets) + (best_norms + weight_norms) * mean_norms), 0.0)
    sq_norm_sums = best_norms ** 2 + weight_norms ** 2
    sq_distances = (np.maximum(sq_norm_sums - 2.0 * weights[predictions] @ weights.T, 0.0)
                    + ROUNDING_RTOL * sq_norm_sums)
    with np.errstate(divide="ignore"):
        ratios = np.where(sq_distances > 0.0, gaps / np.sqrt(sq_distances), np.inf)
    ratios[rows, predictions] = np.inf
    return predictions, (CLASSIFIER_RADIUS_FRACTION * ratios.min(axis=1)) ** 2


def _radii_match_the_dense_bound(means, weights, logit_offsets):
    """``classifier_radii`` from a given ``W W^T`` and from the rows: both equal the dense
    bound to 1e-10, with the same predictions. Returns both squared radii."""
    predictions, expected = _dense_classifier_sq_radii(means, weights, logit_offsets)
    both = []
    for weight_gram in (None, weights @ weights.T):
        mean_predictions, sq_radii = classifier_radii(means, weights, logit_offsets,
                                                      weight_gram)
        np.testing.assert_array_equal(mean_predictions, predictions)
        np.testing.assert_allclose(sq_radii, expected, rtol=1e-10)
        both.append(sq_radii)
    return both


def test_means_with_a_partial_nan_row_or_inf_are_refused():
    """A class without a mean is a row of NaN only; NaN rows are absent classes."""
    means, _, _ = _means_and_classifier(absent=(0,))
    means[3, [5, 9]] = np.nan
    with pytest.raises(ValueError, match="class 3 holds NaN in 2 of its 300 entries"):
        Geometry.from_means(means)
    means[3] = 1.0
    means[6, 2] = np.inf
    with pytest.raises(ValueError, match="holds Inf"):
        Geometry.from_means(means)
    means[6, 2] = 0.0
    assert Geometry.from_means(means).present.tolist() == list(range(1, NUM_CLASSES))


@pytest.mark.parametrize("num_means", [1, 2, 257])
def test_gram_in_row_blocks_is_the_symmetric_product(num_means):
    centred = np.random.default_rng(num_means).standard_normal((num_means, NUM_FEATURES))
    gram = centred_gram(centred)
    expected = centred @ centred.T
    np.testing.assert_allclose(gram, expected, rtol=0, atol=1e-14 * np.abs(expected).max())
    np.testing.assert_array_equal(gram, gram.T)


@pytest.mark.parametrize("absent", [(), (4, 100)], ids=["every-class", "absent-classes"])
def test_plan_arrays_equal_dense_float64(absent):
    means, weights, bias = _means_and_classifier(absent=absent)
    geometry = Geometry.from_means(means)
    plan = build_plan(geometry, weights, bias, pair_tile=97)
    assert plan.route == "classes"
    present_means = means[geometry.present]
    eigenvalues, eigenvectors = np.linalg.eigh(geometry.centred @ geometry.centred.T)
    np.testing.assert_allclose(geometry.gram_eigenvalues, eigenvalues,
                               rtol=0, atol=1e-12 * eigenvalues.max())
    # Eigenvectors are defined up to sign: compare M~^T V through the plan's own V.
    projection = geometry.centred.T @ geometry.gram_eigenvectors
    np.testing.assert_allclose(plan.projection_t, projection, rtol=2.0 ** -23,
                               atol=1e-12 * np.abs(projection).max())
    np.testing.assert_array_equal(plan.eigenvectors_t,
                                  geometry.gram_eigenvectors.T.astype(np.float32))
    np.testing.assert_array_equal(plan.weights_t, weights.T.astype(np.float32))
    np.testing.assert_allclose(plan.global_logits, weights @ geometry.global_mean + bias,
                               rtol=1e-12)
    logit_offsets = present_means @ weights.T + bias
    np.testing.assert_allclose(plan.logit_offsets, logit_offsets, rtol=0,
                               atol=1e-12 * np.abs(logit_offsets).max())
    predictions, sq_radii = _dense_classifier_sq_radii(present_means, weights, logit_offsets)
    np.testing.assert_array_equal(plan.mean_predictions, predictions)
    np.testing.assert_allclose(plan.classifier_sq_radii, sq_radii, rtol=1e-9)


def test_plan_eigendecomposition_is_the_geometrys_own():
    """The plan's eigenvectors are those the report reads (computed once, on first use)."""
    means, weights, bias = _means_and_classifier(seed=1)
    geometry = Geometry.from_means(means)
    plan = build_plan(geometry, weights, bias)
    assert geometry.gram_spectrum is geometry.gram_spectrum
    np.testing.assert_array_equal(plan.eigenvectors_t,
                                  geometry.gram_eigenvectors.T.astype(np.float32))


def test_features_route_plan_rounds_sigma_b_eigenvectors():
    """On the "features" route pass 2 multiplies by the float32 eigenvectors of the report's
    own Sigma_B; on the "classes" route there are none."""
    means, weights, bias = _means_and_classifier(seed=3)
    geometry = Geometry.from_means(means[:, :40])
    plan = build_plan(geometry, weights[:, :40], bias)
    assert plan.route == "features"
    eigenvalues, eigenvectors = geometry.between_spectrum
    np.testing.assert_array_equal(plan.between_basis, eigenvectors.astype(np.float32))
    centred = geometry.centred
    np.testing.assert_allclose(eigenvectors * eigenvalues, centred.T @ centred @ eigenvectors
                               / NUM_CLASSES, rtol=0, atol=1e-12 * eigenvalues.max())
    assert build_plan(Geometry.from_means(means)).between_basis.shape == (0, 0)


@pytest.mark.parametrize("num_features", [NUM_FEATURES, 40])
def test_plan_decomposes_with_the_backends_solver(num_features):
    """The plan takes its eigendecomposition from its backend (the GPU's is cuSOLVER's),
    once, and the report reads that one."""
    from ncfast.backends.cpu import CPU
    from ncfast.geometry import symmetric_eigh
    means, weights, bias = _means_and_classifier(seed=4)
    solved = []

    def recorded_eigh(matrix):
        solved.append(matrix.shape)
        eigenvalues, eigenvectors = symmetric_eigh(matrix)
        return eigenvalues, -eigenvectors  # another valid sign, to tell it apart

    class RecordingBackend(type(CPU)):
        symmetric_eigh = staticmethod(recorded_eigh)

    geometry = Geometry.from_means(means[:, :num_features])
    plan = build_plan(geometry, weights[:, :num_features], bias, backend=RecordingBackend())
    size = min(NUM_CLASSES, num_features)
    assert solved == [(size, size)]
    reference = Geometry.from_means(means[:, :num_features])
    if plan.route == "classes":
        expected = -reference.gram_eigenvectors.T
        np.testing.assert_array_equal(plan.eigenvectors_t, expected.astype(np.float32))
        assert geometry.gram_eigenvectors is geometry.gram_spectrum[1]
    else:
        expected = -reference.between_spectrum[1]
        np.testing.assert_array_equal(plan.between_basis, expected.astype(np.float32))
    assert solved == [(size, size)]  # once: the report reads the same decomposition


def test_classifier_radii_with_the_gram_and_without():
    """Radii from a given ``W W^T`` (the sweep's) and from the rows they need agree with the
    dense bound, with a duplicated classifier row and a mean whose rivals tie; a rival at
    distance 0 is skipped, and with none left the radius is inf."""
    means, weights, bias = _means_and_classifier(seed=2)
    weights[7] = weights[3]  # a duplicated row: distance 0 to class 3's row
    logit_offsets = means @ weights.T + bias
    logit_offsets[5] = -1e3  # one logit above all the others, which are equal
    logit_offsets[5, 11] = 0.0
    _radii_match_the_dense_bound(means, weights, logit_offsets)
    two_means, zero_weights = np.eye(2), np.zeros((2, 2))
    _, sq_radii = classifier_radii(two_means, zero_weights, np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert np.isinf(sq_radii).all()  # W r = 0: nothing overtakes the bias's prediction


def _radius_case(name):
    """Means, weights and logit offsets where the radii's rounding allowances decide."""
    rng = np.random.default_rng(0)
    means, weights = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    logit_offsets = means @ weights.T
    if name == "large-logits":  # allowances ~1e-3 of each gap
        logit_offsets = 1e6 + 1e-3 * rng.standard_normal((4, 4))
    elif name == "twin-rows":  # two classes, w_1 = w_0: their distance may be rounding
        weights = np.vstack([weights[0], weights[0]])
        logit_offsets = means @ weights.T + np.array([0.0, 1.0])
    elif name == "tie":  # mean 0's two largest logits are equal
        logit_offsets[0, 1] = logit_offsets[0].max()
    elif name == "one-ulp":  # mean a's largest logit one ulp of 1e3 above the next
        logit_offsets = np.full((4, 4), -5.0)
        for a in range(4):
            logit_offsets[a, (a + 1) % 4] = 1000.0 + a
            logit_offsets[a, a] = np.nextafter(1000.0 + a, np.inf)
    return means, weights, logit_offsets


@pytest.mark.parametrize("name", ["large-logits", "twin-rows", "tie", "one-ulp"])
def test_classifier_radii_allow_for_rounding_as_documented(name):
    """Gaps shrunk by ``rtol (|L*| + |L_c| + (||w*|| + ||w_c||) ||mu||)`` and squared
    distances grown by ``rtol (||w*||^2 + ||w_c||^2)``, to 1e-10: a gap within rounding
    (a tie, one ulp) gives radius 0, and a rival with the same weight row (whose computed
    distance may be rounding) a finite radius, not inf."""
    means, weights, logit_offsets = _radius_case(name)
    for sq_radii in _radii_match_the_dense_bound(means, weights, logit_offsets):
        assert np.isfinite(sq_radii).all()
        if name == "tie":
            assert sq_radii[0] == 0.0 and (sq_radii[1:] > 0.0).all()
        if name == "one-ulp":
            np.testing.assert_array_equal(sq_radii, 0.0)


def test_ncc_radii_are_the_nearest_distances_less_their_rounding():
    """``ncc_sq_radii = (NCC_RADIUS_FRACTION g_a)^2``, ``g_a^2`` the nearest squared distance
    less ``ROUNDING_RTOL (||mu~_a||^2 + max ||mu~||^2)``, against dense float64: two means
    1.7e-6 apart (squared distance 3e-12, of the order of that allowance) make it count."""
    rng = np.random.default_rng(1)
    means = rng.standard_normal((6, 10)) / np.sqrt(10.0)
    step = rng.standard_normal(10)
    means[1] = means[0] + np.sqrt(3e-12) * step / np.linalg.norm(step)
    plan = build_plan(Geometry.from_means(means))
    sq_norms = ((means - means.mean(axis=0)) ** 2).sum(axis=1)
    sq_distances = ((means[:, None] - means[None]) ** 2).sum(axis=2)
    np.fill_diagonal(sq_distances, np.inf)
    nearest = sq_distances.min(axis=1) - ROUNDING_RTOL * (sq_norms + sq_norms.max())
    expected = NCC_RADIUS_FRACTION ** 2 * np.maximum(nearest, 0.0)
    assert 0.0 < expected[0] < 0.5 * NCC_RADIUS_FRACTION ** 2 * sq_distances[0].min()
    np.testing.assert_allclose(plan.ncc_sq_radii, expected, rtol=1e-3)


def test_fingerprints_are_digests_of_the_means_and_the_classifier():
    """Computed on first use, equal for equal inputs, different for different ones."""
    means, weights, bias = _means_and_classifier(seed=3)
    first, second = Geometry.from_means(means), Geometry.from_means(means.copy())
    assert first.fingerprint == second.fingerprint
    assert Geometry.from_means(means + 1e-9).fingerprint != first.fingerprint
    plan = build_plan(first, weights, bias)
    assert plan.classifier_fingerprint == build_plan(second, weights.copy(),
                                                     bias.copy()).classifier_fingerprint
    assert build_plan(first, weights, bias + 1e-9).classifier_fingerprint != \
        plan.classifier_fingerprint
    assert build_plan(first).classifier_fingerprint == ""
    stats = ncfast.ResidualStats(plan)
    with pytest.raises(ValueError, match="different classifiers"):
        stats += ncfast.ResidualStats(build_plan(first, weights, bias + 1e-9))


def test_geometry_keeps_its_own_counts():
    """The geometry shared the ClassSums' counts: rows added after finalizing changed the
    report's mean_counts (and global_mean='samples' of a reuse) behind its means' back."""
    case = gaussian_classes(num_rows=300, num_features=8, num_classes=4)
    class_sums = ncfast.ClassSums(4, 8)
    class_sums.update(case["features"][:150], case["labels"][:150])
    geometry = Geometry.from_class_sums(class_sums.counts, class_sums.sums)
    counts = geometry.counts.copy()
    class_sums.update(case["features"][150:], case["labels"][150:])
    np.testing.assert_array_equal(geometry.counts, counts)


@pytest.mark.parametrize("absent", [False, True], ids=["every-class", "one-absent"])
def test_geometry_keeps_its_means_row_major_and_its_own(absent):
    """Fortran-ordered means with every class present gave a Fortran-ordered
    ``present_means``, which promises C-contiguous rows."""
    means = np.asfortranarray(np.random.default_rng(3).standard_normal((5, 7)))
    if absent:
        means[2] = np.nan
    before = means.copy()
    geometry = Geometry.from_means(means)
    assert geometry.present_means.flags.c_contiguous
    np.testing.assert_array_equal(geometry.present_means, before[~np.isnan(before[:, 0])])
    means[0] += 1.0
    np.testing.assert_array_equal(geometry.present_means[0], before[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_plan_copies_the_classifier_after_the_pair_sweep(dtype):
    """The sweep converts W a tile at a time; the plan's float64 copy of W is made after it,
    so that the sweep's stacked [M~; W] (2 C' D float64) is not joined by a third table
    (1 GB each at 32,000 classes of 4096 features). What build_plan holds when the sweep's
    tiles start (tracemalloc, "features" route: C' > D) is the float32 W^T and M~^T, the
    float32 eigenbasis of Sigma_B and the stacked copy, no float64 W. The plan is the same."""
    import tracemalloc

    from ncfast.progress import NO_PROGRESS

    rng = np.random.default_rng(8)
    num_classes, num_features = 2000, 64
    geometry = Geometry.from_means(rng.standard_normal((num_classes, num_features)))
    weights = rng.standard_normal((num_classes, num_features)).astype(dtype)
    bias = rng.standard_normal(num_classes)
    reference = build_plan(geometry, weights.astype(np.float64), bias, pair_tile=64)
    held = []

    def progress(total):
        held.append(tracemalloc.get_traced_memory()[0])
        return NO_PROGRESS.stage(total=total)

    table = num_classes * num_features * 8
    tracemalloc.start()
    try:
        plan = build_plan(geometry, weights, bias, pair_tile=64, progress=progress)
    finally:
        tracemalloc.stop()
    expected = table // 2 + table // 2 + 4 * num_features ** 2 + 2 * table
    assert expected <= held[0] < expected + table // 2
    assert plan.weights.dtype == np.float64 and not np.shares_memory(plan.weights, weights)
    np.testing.assert_array_equal(plan.weights, weights)
    for name in ("global_logits", "logit_offsets", "mean_predictions", "classifier_sq_radii",
                 "ncc_sq_radii", "weights_t"):
        np.testing.assert_array_equal(getattr(plan, name), getattr(reference, name), name)
    for field in dataclasses.fields(plan.sweep):
        mine, theirs = getattr(plan.sweep, field.name), getattr(reference.sweep, field.name)
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(mine, theirs, field.name)
        else:
            assert mine == theirs or (mine != mine and theirs != theirs), field.name
