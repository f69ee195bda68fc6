"""The pair sweep against a dense float64 reference, tile by tile and end to end.

The reference forms every C'×C' matrix explicitly (pair differences, unit vectors, the
ETF Gram) in float64; the sweep never does. Tiles (97, 1000) do not divide C'.
"""
import warnings

import numpy as np
import pytest

import ncfast
from cases import gaussian_classes, with_label_noise
from ncfast.backends.cpu import CPU
from ncfast.kernels import pairs
from ncfast.sweep import cdnv, merge_top_logits, pair_sweep, reduce_tile_xp
from ncfast.textbook import textbook_collapse

#: The sweep and the dense reference agree to this relative error (float64 sums in
#: another order; the issue's bound).
SWEEP_RTOL = 1e-10


class NumpyTiles:
    """The CPU backend with the array-operations reduction (the GPU's), on numpy."""

    xp = np
    pair_tile = CPU.pair_tile
    map_tasks = staticmethod(CPU.map_tasks)

    @staticmethod
    def reduce_tile(dots, tile, rows, cols):
        return reduce_tile_xp(np, dots, tile, rows, cols)


def _pair_differences(vectors):
    """``||v_a - v_b||`` over pairs a < b in ``np.triu_indices`` order, by explicit differences."""
    return np.concatenate([np.linalg.norm(vectors[a + 1:] - vectors[a], axis=1)
                           for a in range(len(vectors) - 1)])


def _dense_pair_metrics(means, global_mean, weights=None):
    """Every sweep quantity from full C'×C' matrices (the obvious float64 route)."""
    centred = means - global_mean
    num_means, num_features = centred.shape
    pairs_a, pairs_b = np.triu_indices(num_means, 1)
    units = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cosines = (units @ units.T)[pairs_a, pairs_b]
    unit_distances = _pair_differences(units)
    log_kernel = -np.log(unit_distances)
    exponent = num_features - 2
    riesz = np.sign(exponent) * unit_distances ** -exponent if exponent else \
        np.ones_like(unit_distances)
    distances = _pair_differences(means)
    etf = (np.eye(num_means) - 1.0 / num_means) / np.sqrt(num_means - 1)
    gram = centred @ centred.T
    uncentred_gram = means @ means.T
    off = ~np.eye(num_means, dtype=bool)
    sq_distances = np.full((num_means, num_means), np.inf)
    sq_distances[pairs_a, pairs_b] = sq_distances[pairs_b, pairs_a] = distances ** 2
    result = {
        "cos_std": np.std(cosines),
        "maxangle": np.mean(np.abs(cosines + 1.0 / (num_means - 1))),
        "log_mean": np.mean(log_kernel), "log_variance": np.var(log_kernel),
        "riesz_mean": np.mean(riesz), "riesz_variance": np.var(riesz),
        "etf": np.linalg.norm(gram / np.linalg.norm(gram) - etf),
        "orthogonality": np.linalg.norm((uncentred_gram / np.linalg.norm(uncentred_gram))[off]),
        "mean_pair_distance": np.mean(distances),
        "nearest": sq_distances.min(axis=1),
        "cdnv_weights": (0.5 / sq_distances).sum(axis=1),
    }
    if weights is not None:
        weight_units = weights / np.linalg.norm(weights, axis=1, keepdims=True)
        cosines_w = (weight_units @ weight_units.T)[pairs_a, pairs_b]
        products = weights @ centred.T
        result.update({
            "cos_w_std": np.std(cosines_w),
            "maxangle_w": np.mean(np.abs(cosines_w + 1.0 / (num_means - 1))),
            "etf_w": np.linalg.norm(products / np.linalg.norm(products) - etf),
            "etf_ww": np.linalg.norm(weights @ weights.T / np.linalg.norm(weights @ weights.T)
                                     - etf),
        })
    return result


def _sweep_metrics(sweep):
    result = {
        "cos_std": np.sqrt(sweep.moments["cos"][1]),
        "maxangle": sweep.sums["maxangle_sum"] / sweep.num_pairs,
        "log_mean": sweep.moments["log"][0], "log_variance": sweep.moments["log"][1],
        "riesz_mean": sweep.moments["riesz"][0], "riesz_variance": sweep.moments["riesz"][1],
        "etf": sweep.etf_distance("means"),
        "orthogonality": sweep.orthogonality,
        "mean_pair_distance": sweep.mean_pair_distance,
        "nearest": sweep.nearest_sq_distances,
        "cdnv_weights": sweep.cdnv_weights,
    }
    if sweep.etf_scale_w:
        result.update({
            "cos_w_std": np.sqrt(sweep.moments["cos_w"][1]),
            "maxangle_w": sweep.sums["maxangle_w_sum"] / sweep.num_pairs,
            "etf_w": sweep.etf_distance("classifier_means"),
            "etf_ww": sweep.etf_distance("classifier"),
        })
    return result


def _means(num_means, num_features, seed, *, offset=0.0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((num_means, num_features)) + offset
    weights = means - means.mean(axis=0) + 0.3 * rng.standard_normal(means.shape)
    return means, weights


@pytest.mark.parametrize("num_means, num_features", [
    (3, 16), (257, 300), (257, 32), (2049, 48), (5000, 12)])
@pytest.mark.parametrize("classifier", [False, True], ids=["no-classifier", "classifier"])
def test_sweep_equals_the_dense_reference(num_means, num_features, classifier):
    means, weights = _means(num_means, num_features, seed=num_means, offset=2.0)
    global_mean = means.mean(axis=0)
    weights = weights if classifier else None
    reference = _dense_pair_metrics(means, global_mean, weights)
    # Tiles of 97, 1000 and the backend's own; M~ formed by the sweep or passed in.
    for tile, centred in ((97, None), (1000, None), (None, means - global_mean)):
        sweep = pair_sweep(means, global_mean, weights, backend=CPU, tile=tile, centred=centred)
        for name, value in _sweep_metrics(sweep).items():
            np.testing.assert_allclose(value, reference[name], rtol=SWEEP_RTOL, atol=0,
                                       err_msg=f"{name}, tile {tile}")


@pytest.mark.parametrize("num_means", [3, 257, 2049])
@pytest.mark.parametrize("backend", [CPU, NumpyTiles], ids=["compiled", "arrays"])
def test_sweep_finds_each_means_two_largest_logits(num_means, backend):
    """Each mean's largest and second largest ``w_c . mu~_a + g_c`` over tiles of 97 classes
    (merged across tiles and from both off-diagonal blocks), and the first class of the
    largest. Small integers make every logit exact in any order, so ties are exact: the
    first argmax must win them, as numpy's does."""
    rng = np.random.default_rng(num_means)
    centred = rng.integers(-6, 7, (num_means, 24)).astype(float)
    weights = rng.integers(-6, 7, (num_means, 24)).astype(float)
    global_logits = rng.integers(-20, 21, num_means).astype(float)
    twin = num_means // 2
    weights[twin] = 3.0 * centred[0]  # the largest logit of mean 0 at least
    weights[-1], global_logits[-1] = weights[twin], global_logits[twin]  # tiles apart
    sweep = pair_sweep(centred, np.zeros(24), weights, global_logits, backend=backend, tile=97)
    logits = centred @ weights.T + global_logits
    np.testing.assert_array_equal(sweep.top_logits, -np.sort(-logits, axis=1)[:, :2])
    np.testing.assert_array_equal(sweep.top_classes, np.argmax(logits, axis=1))
    tied = np.argmax(logits, axis=1) == twin
    assert tied.any() and (sweep.top_logits[tied, 0] == sweep.top_logits[tied, 1]).all()
    for without in (pair_sweep(centred, np.zeros(24), backend=backend, tile=97),
                    pair_sweep(centred, np.zeros(24), weights, backend=backend, tile=97)):
        assert without.top_logits.shape == (0, 2) and without.top_classes.shape == (0,)


def test_merging_top_logits_breaks_ties_to_the_smaller_class():
    """Merged in either order, a tie of the best logits goes to the smaller class (the sweep
    merges tiles in class order, but the plan merges absent classes after present ones),
    and the tied best is also the second largest."""
    top_logits, top_classes = np.array([[5.0, 1.0], [5.0, 1.0]]), np.array([4, 1])
    merge_top_logits(np, top_logits, top_classes, np.array([[5.0, 2.0], [5.0, 2.0]]),
                     np.array([2, 3]))
    np.testing.assert_array_equal(top_classes, [2, 1])
    np.testing.assert_array_equal(top_logits, [[5.0, 5.0], [5.0, 5.0]])


@pytest.mark.parametrize("backend", [CPU, NumpyTiles], ids=["compiled", "arrays"])
def test_sweep_of_a_given_gram_keeps_the_classifier_products(backend):
    """The "classes" route's sweep: Gram tiles read, only the classifier's blocks multiplied
    (a diagonal tile's lower-left block as the transpose of its upper-right one); it keeps
    ``M~ W^T`` and ``W W^T`` and runs the caller's work beside the tiles."""
    means, weights = _means(257, 300, seed=11, offset=2.0)
    global_mean = means.mean(axis=0)
    centred = means - global_mean
    reference = _dense_pair_metrics(means, global_mean, weights)
    ran = []
    sweep = pair_sweep(means, global_mean, weights, backend=backend, tile=97,
                       gram=centred @ centred.T, keep_classifier_products=True,
                       alongside=[lambda: ran.append("first"), lambda: ran.append("second")])
    assert sorted(ran) == ["first", "second"]
    for name, value in _sweep_metrics(sweep).items():
        np.testing.assert_allclose(value, reference[name], rtol=SWEEP_RTOL, atol=0, err_msg=name)
    mean_weight_products = centred @ weights.T
    np.testing.assert_allclose(sweep.mean_weight_products, mean_weight_products, rtol=0,
                               atol=1e-13 * np.abs(mean_weight_products).max())
    weight_gram = weights @ weights.T
    np.testing.assert_allclose(sweep.weight_gram, weight_gram, rtol=0,
                               atol=1e-13 * np.abs(weight_gram).max())
    np.testing.assert_allclose(sweep.weight_norms, np.linalg.norm(weights, axis=1), rtol=1e-14)
    np.testing.assert_allclose(sweep.weight_mean_dots, np.einsum("cd,cd->c", weights, centred),
                               rtol=1e-12)


@pytest.mark.parametrize("gram", [False, True], ids=["stacked", "given-gram"])
@pytest.mark.parametrize("backend", [CPU, NumpyTiles], ids=["compiled", "arrays"])
def test_sweep_gathers_the_classifier_rows_it_is_given(backend, gram):
    """With ``weight_rows`` the sweep takes the whole classifier and gathers the rows of its
    classes tile by tile (the plan's classes with rows, when some have none): the same
    sweep as of those rows copied beforehand, whatever the tiling, with the Gram given or
    the stacked tiles."""
    means, _ = _means(130, 40, seed=5, offset=2.0)
    global_mean = means.mean(axis=0)
    centred = means - global_mean
    rng = np.random.default_rng(5)
    weights = rng.standard_normal((200, 40))
    weight_rows = np.sort(rng.choice(200, 130, replace=False))
    global_logits = rng.standard_normal(130)
    keywords = dict(backend=backend, gram=centred @ centred.T if gram else None,
                    keep_classifier_products=gram)
    copied = pair_sweep(means, global_mean, weights[weight_rows], global_logits, tile=29,
                        **keywords)
    copied_metrics = _sweep_metrics(copied)
    for tile in (29, 64, 1000):
        gathered = pair_sweep(means, global_mean, weights, global_logits, tile=tile,
                              weight_rows=weight_rows, **keywords)
        for name, value in _sweep_metrics(gathered).items():
            np.testing.assert_allclose(value, copied_metrics[name], rtol=1e-12,
                                       atol=0, err_msg=f"{name}, tile {tile}")
        for name in ("weight_norms", "weight_mean_dots", "top_logits", "top_classes",
                     "mean_weight_products", "weight_gram"):
            if getattr(copied, name) is None:
                assert getattr(gathered, name) is None
                continue
            np.testing.assert_allclose(getattr(gathered, name), getattr(copied, name),
                                       rtol=1e-12, atol=1e-12, err_msg=f"{name}, tile {tile}")


@pytest.mark.parametrize("num_means, num_features", [(3, 2), (40, 1), (130, 7), (300, 300)])
def test_compiled_tiles_equal_the_array_operations(num_means, num_features):
    """The Numba kernel (CPU) and ``reduce_tile_xp`` (the GPU's, here on numpy) agree."""
    means, weights = _means(num_means, num_features, seed=7)
    global_mean = means.mean(axis=0)
    compiled = pair_sweep(means, global_mean, weights, backend=CPU, tile=29)
    arrays = pair_sweep(means, global_mean, weights, backend=NumpyTiles, tile=29)
    # Squared distances from Gram entries carry rounding of eps times the squared norms
    # (fused multiply-adds round differently): absolute for them, relative for the rest.
    scale = np.max(np.sum((means - global_mean) ** 2, axis=1))
    for name, value in _sweep_metrics(compiled).items():
        expected = _sweep_metrics(arrays)[name]
        if name == "nearest":
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-14 * scale, err_msg=name)
        else:
            np.testing.assert_allclose(value, expected, rtol=1e-9, err_msg=name)


def test_a_mean_at_the_global_mean_coincides_on_both_reductions():
    """Means e0, -e0, 2e1, -2e1 and 0: the last one is the global mean, without a direction.
    The compiled kernel counts its pairs as coinciding (log and Riesz kernels inf); the
    array operations (the GPU's) kept their NaN, dropped them from the sums but not from
    the pair count: a finite log-kernel mean of -0.277 instead."""
    means = np.zeros((5, 6))
    means[0, 0], means[1, 0], means[2, 1], means[3, 1] = 1.0, -1.0, 2.0, -2.0
    global_mean = means.mean(axis=0)
    compiled = pair_sweep(means, global_mean, backend=CPU)
    arrays = pair_sweep(means, global_mean, backend=NumpyTiles)
    for name in ("log", "riesz"):
        assert compiled.moments[name][0] == np.inf
        np.testing.assert_array_equal(arrays.moments[name], compiled.moments[name])


def _means_on_one_ray(rounded):
    """Four means of which the first two lie on one ray: exactly (cosine 1), or ``rounded``,
    ``mu_1 = 3 mu_0`` at D = 5 where the Gram's cosine rounds to 1 - 2^-52 and
    ``2 - 2 cos`` is 4.4e-16, inside ``pairs.UNIT_SQ_DISTANCE_FLOOR``."""
    if not rounded:
        return np.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ray = np.random.default_rng(3).standard_normal(5)
    means = np.vstack([ray, 3.0 * ray, np.random.default_rng(99).standard_normal((2, 5))])
    gram, sq_norms = means[:2] @ means[:2].T, np.einsum("cd,cd->c", means[:2], means[:2])
    cosine = gram[0, 1] / np.sqrt(sq_norms[0] * sq_norms[1])  # as the sweep forms it
    assert 0.0 < 2.0 - 2.0 * cosine <= pairs.UNIT_SQ_DISTANCE_FLOOR
    return means


@pytest.mark.parametrize("rounded", [False, True], ids=["exact", "rounded"])
@pytest.mark.parametrize("tile", [2, 4])
def test_coinciding_unit_means_give_an_infinite_log_kernel(rounded, tile):
    """Two centred means on one ray: the log kernel is +inf and its variance undefined, as
    numpy's mean and variance of the dense values say; the Riesz kernel too for s > 0.
    Unit means whose distance is within rounding of 0 coincide too (without the floor the
    rounded pair gave a finite log kernel of 17.6)."""
    means = _means_on_one_ray(rounded)
    global_mean = np.zeros(means.shape[1])
    for backend in (CPU, NumpyTiles):
        sweep = pair_sweep(means, global_mean, backend=backend, tile=tile)
        assert sweep.moments["log"][0] == np.inf and np.isnan(sweep.moments["log"][1])
        assert sweep.moments["riesz"][0] == np.inf
    assert np.isfinite(sweep.moments["cos"]).all()


@pytest.mark.parametrize("close, tile", [(0, 2), (2, 4)])
def test_riesz_kernel_beyond_float64s_squares_has_an_infinite_variance(close, tile):
    """Two unit means 1e-4 apart at D = 41 (s = 39): a Riesz value near 1e156, finite,
    whose square exceeds float64. The variance is inf (numpy's np.var says so too), the
    mean finite; the merge of the tiles warned of overflow and gave NaN. The close pair
    (``close``, ``close + 1``) is the first pair of its tile, or (tile 4: one tile) not its
    first, so that the tile's own sum of squares overflows (the merge gave NaN)."""
    means = np.eye(41)[:4].copy()
    means[close + 1] = means[close] + 1e-4 * np.eye(41)[(close + 2) % 4]
    global_mean = np.zeros(41)
    with np.errstate(over="ignore"):  # the dense variance overflows, as it should
        dense = _dense_pair_metrics(means, global_mean)
    assert dense["riesz_variance"] == np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in (CPU, NumpyTiles):
            riesz_mean, riesz_variance = pair_sweep(means, global_mean, backend=backend,
                                                    tile=tile).moments["riesz"]
            assert riesz_mean == pytest.approx(dense["riesz_mean"], rel=1e-6)
            assert riesz_variance == np.inf


@pytest.mark.parametrize("num_classes, num_features", [(3, 16), (257, 300), (257, 24)])
@pytest.mark.parametrize("noise", [False, True], ids=["clean", "label-noise"])
def test_pair_metrics_of_collapse_equal_the_textbook(num_classes, num_features, noise):
    """End to end, every metric the sweep makes (float64 from the float64 means and
    spreads) equals the dense textbook to SWEEP_RTOL, with a classifier, on either route."""
    case = gaussian_classes(num_rows=6 * num_classes, num_features=num_features,
                            num_classes=num_classes, spread=0.5, seed=num_classes,
                            dtype=np.float64)
    keywords = {"weights": case["weights"], "bias": case["bias"]}
    if noise:
        case = with_label_noise(case)
        keywords["clean_labels"] = case["clean_labels"]
    ood = np.random.default_rng(1).normal(size=(50, num_features)) + 1.0
    report = ncfast.collapse(case["features"], case["labels"], num_classes=num_classes,
                             ood=ood, **keywords)
    reference = textbook_collapse(case["features"], case["labels"], num_classes=num_classes,
                                  ood=ood, **keywords)
    names = ["cdnv", "nc2_equiangular", "nc2_maxangle", "nc2_etf", "nc2_orthogonality", "gnc2",
             "log_kernel_variance", "riesz_kernel_mean", "riesz_kernel_variance", "nc5",
             "nc2_equiangular_w", "nc2_maxangle_w", "nc2_etf_w", "nc3_etf"]
    if noise:
        names += ["memorization", "memorization_raw"]
    for name in names:
        assert getattr(report, name) == pytest.approx(reference[name], rel=SWEEP_RTOL), name


def test_cdnv_leaves_out_classes_without_rows():
    """Held-out rows of some classes only: pairs run over the classes with rows, the others'
    terms are taken out of the sweep's class weights by one small GEMM."""
    means, _ = _means(40, 6, seed=3)
    global_mean = means.mean(axis=0)
    centred = means - global_mean
    sweep = pair_sweep(means, global_mean, backend=CPU, tile=16)
    variances = np.random.default_rng(0).uniform(0.5, 2.0, 40)
    variances[[3, 17, 30]] = np.nan
    assert cdnv(sweep, centred, means, variances, np) == pytest.approx(
        _direct_cdnv(means, variances), rel=SWEEP_RTOL)


def _direct_cdnv(means, variances):
    """CDNV over the pairs of classes with a finite variance, from the means' differences."""
    measured = np.flatnonzero(np.isfinite(variances))
    pairs_a, pairs_b = np.triu_indices(measured.size, 1)
    a, b = measured[pairs_a], measured[pairs_b]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mean((variances[a] + variances[b])
                       / (2.0 * np.sum((means[a] - means[b]) ** 2, axis=1)))


@pytest.mark.parametrize("gap", [1e-3, 1e-6, 1e-9, 0.0])
@pytest.mark.parametrize("backend", [CPU, NumpyTiles], ids=["compiled", "arrays"])
def test_close_means_keep_their_distance(gap, backend):
    """Means of norm about 30 that come within ``gap`` of each other: from the Gram entries
    alone the squared distance kept only rounding (CDNV 14% off at 1e-6, finite for
    coinciding means); close pairs take it from the means' difference."""
    means, _ = _means(40, 8, seed=5, offset=10.0)
    means[7] = means[3] + gap * np.eye(8)[2]
    global_mean = means.mean(axis=0)
    sweep = pair_sweep(means, global_mean, backend=backend, tile=16)
    variances = np.random.default_rng(1).uniform(0.5, 2.0, 40)
    expected = _direct_cdnv(means, variances)
    value = cdnv(sweep, means - global_mean, means, variances, np)
    if gap == 0.0:
        assert value == np.inf and sweep.nearest_sq_distances[[3, 7]].tolist() == [0.0, 0.0]
    else:
        assert value == pytest.approx(expected, rel=1e-12)
        assert sweep.nearest_sq_distances[3] == pytest.approx(gap ** 2, rel=1e-6)
    variances[[3, 7]] = 0.0  # coinciding means without spread: 0 / 0
    assert np.isnan(cdnv(sweep, means - global_mean, means, variances, np)) == (gap == 0.0)


@pytest.mark.parametrize("gap", [1e-2, 1e-4, 1e-8, 0.0])
def test_cdnv_leaves_out_a_class_without_rows_close_to_one_with_rows(gap):
    """Held-out rows: class 7 has a mean but no rows, ``gap`` from class 3's. Subtracting its
    huge term from class 3's sum over all classes left rounding (CDNV negative at 1e-4, NaN
    at 0); such a class's sum is taken again over the measured classes."""
    means, _ = _means(40, 8, seed=6, offset=10.0)
    means[7] = means[3] + gap * np.eye(8)[5]
    global_mean = means.mean(axis=0)
    sweep = pair_sweep(means, global_mean, backend=CPU, tile=16)
    variances = np.random.default_rng(2).uniform(0.5, 2.0, 40)
    variances[[7, 20]] = np.nan
    assert cdnv(sweep, means - global_mean, means, variances, np) == pytest.approx(
        _direct_cdnv(means, variances), rel=1e-12)


def test_kernel_logarithm_and_powers_match_numpy():
    """The sweep's call-free ``log`` and Riesz powers (they vectorize) against numpy."""
    values = np.concatenate([np.random.default_rng(0).uniform(1e-14, 4.0, 10_000),
                             [4.0, 2.0, 1.0, 0.5, np.sqrt(2.0), 1e-14]])
    out, scratch = np.empty_like(values), np.empty_like(values)
    pairs.logs(values, out, scratch)
    np.testing.assert_allclose(out, np.log(values), rtol=1e-15, atol=2e-15)
    for exponent in (-1, 0, 1, 2, 7, 254):
        pairs.riesz_values(values, float(exponent), out, scratch)
        expected = np.sign(exponent) * values ** (-exponent / 2) if exponent else \
            np.ones_like(values)
        np.testing.assert_allclose(out, expected, rtol=1e-13)
