"""Many classes: tiled pair metrics and class-tiled predictions equal the dense route."""
import dataclasses

import numpy as np
import pytest

import ncfast
from ncfast.metrics import collapse_metrics
from ncfast import plan as plan_module
from ncfast.geometry import ROUNDING_RTOL
from ncfast.kernels import cpu
from ncfast.plan import build_plan
from ncfast.textbook import textbook_collapse
from cases import gaussian_classes
from test_properties import geometry_of

PAIR_METRICS = ("cdnv", "nc2_equiangular", "nc2_maxangle", "nc2_etf", "nc2_orthogonality",
                "gnc2", "nc2_equiangular_w", "nc2_maxangle_w", "nc2_etf_w", "nc3_etf")
ALL_METRICS = PAIR_METRICS + ("nc1", "nc1_trace", "nc2_equinorm", "nc3", "unc3", "nc4",
                              "ncc_accuracy", "accuracy", "bias_collapse")


def _tiled_metrics(case, *, class_tile, pair_tile):
    """Both passes through the public accumulators, with explicit tile sizes."""
    class_sums = ncfast.ClassSums(case["num_classes"], case["features"].shape[1])
    class_sums.update(case["features"], case["labels"])
    geometry = ncfast.Geometry.from_class_sums(class_sums.counts, class_sums.sums)
    plan = build_plan(geometry, case["weights"], case["bias"], pair_tile=pair_tile)
    stats = ncfast.ResidualStats(plan, class_tile=class_tile)
    stats.update(case["features"], case["labels"])
    return collapse_metrics(stats, pinv_rtol=1e-10), stats


@pytest.mark.parametrize("num_classes, num_features, route", [
    (3, 16, "classes"), (3, 2, "features"), (257, 300, "classes"), (257, 32, "features"),
    (2049, 48, "features"),
])
def test_tiles_that_do_not_divide_c_equal_the_dense_textbook(num_classes, num_features, route):
    case = gaussian_classes(num_rows=4 * num_classes, num_features=num_features,
                            num_classes=num_classes, spread=0.5, seed=num_classes)
    tiled, stats = _tiled_metrics(case, class_tile=100, pair_tile=97)
    assert stats.route == route
    reference = textbook_collapse(case["features"], case["labels"],
                                  num_classes=num_classes, weights=case["weights"],
                                  bias=case["bias"])
    for name in ALL_METRICS:
        assert tiled[name] == pytest.approx(reference[name], rel=1e-5), name


@pytest.mark.parametrize("pair_tile, class_tile", [(1, 1), (5, 7), (64, 33), (4096, 4096)])
def test_tile_size_does_not_change_results(pair_tile, class_tile):
    case = gaussian_classes(num_rows=1200, num_features=24, num_classes=150, seed=3)
    tiled, _ = _tiled_metrics(case, class_tile=class_tile, pair_tile=pair_tile)
    untiled, _ = _tiled_metrics(case, class_tile=None, pair_tile=10_000)
    for name in ALL_METRICS:
        assert tiled[name] == pytest.approx(untiled[name], rel=1e-10), name


def test_features_route_holds_no_class_by_class_matrix():
    case = gaussian_classes(num_rows=3000, num_features=8, num_classes=600, seed=4)
    report = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                             bias=case["bias"])
    assert report.route == "features"
    class_sums = ncfast.ClassSums(600, 8)
    class_sums.update(case["features"], case["labels"])
    geometry = ncfast.Geometry.from_class_sums(class_sums.counts, class_sums.sums)
    assert geometry.gram is None and geometry.mean_sq_distances is None
    stats = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
    largest = max(np.asarray(value).size for value in vars(stats).values()
                  if isinstance(value, np.ndarray))
    assert largest <= 600 * 8, "a pass-2 state array grew beyond C×D"


def test_features_route_searches_each_uncertain_rows_own_features():
    """As many rows uncertain for the classifier as beyond their NCC radius, but other rows:
    C' = 3 > D = 2. Row 0 (class 0) is beyond its NCC radius but deep inside its classifier
    radius; row 1 (class 2) is inside its NCC radius, but the logit gap at its mean is 0.01."""
    means = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 100.0]])
    weights = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    bias = np.array([100.0, 0.0, 0.01])
    features = np.array([[1.0, 1.5], [0.0, 100.5]])
    labels = np.array([0, 2])
    assert np.argmax(features @ weights.T + bias, axis=1).tolist() == [0, 2]
    report = ncfast.collapse(features, labels, means=means, weights=weights, bias=bias,
                             empty_classes="ignore")
    assert report.route == "features" and report.accuracy == 1.0


@pytest.mark.parametrize("spread", [0.05, 3.0])
def test_features_route_classifier_radii_change_no_prediction(spread):
    """The "features" route skips the classifier product of rows inside their classifier
    radius; every tally stays that of the full product (the same plan with radii 0)."""
    num_classes, num_features = 40, 8
    case = gaussian_classes(num_rows=40 * num_classes, num_features=num_features,
                            num_classes=num_classes, spread=spread, seed=5)
    class_sums = ncfast.ClassSums(num_classes, num_features)
    class_sums.update(case["features"], case["labels"])
    geometry = ncfast.Geometry.from_class_sums(class_sums.counts, class_sums.sums)
    assert geometry.route == "features"
    with_radii = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
    without = ncfast.ResidualStats(dataclasses.replace(
        with_radii.plan, classifier_sq_radii=np.zeros_like(with_radii.plan.classifier_sq_radii)))
    # The bound never exceeds the classes route's radius, and agrees on the prediction.
    dense_predictions, dense_radii = plan_module.classifier_radii(
        with_radii.plan.present_means, case["weights"],
        with_radii.plan.present_means @ case["weights"].T + case["bias"])
    bounded = with_radii.plan.classifier_sq_radii > 0
    assert (with_radii.plan.classifier_sq_radii <= dense_radii).all()
    np.testing.assert_array_equal(with_radii.plan.mean_predictions[bounded],
                                  dense_predictions[bounded])
    for stats in (with_radii, without):
        stats.update(case["features"], case["labels"])
    inside = (with_radii.sq_norm_sums / with_radii.counts
              < with_radii.plan.classifier_sq_radii).mean()
    assert inside > 0.5 if spread < 1 else inside == 0.0
    for name in ("classifier_hits", "ncc_hits", "totals"):
        np.testing.assert_array_equal(getattr(with_radii, name), getattr(without, name), name)
    reference = textbook_collapse(case["features"], case["labels"], num_classes=num_classes,
                                  weights=case["weights"], bias=case["bias"])
    assert collapse_metrics(with_radii, pinv_rtol=1e-10)["accuracy"] == reference["accuracy"]


@pytest.mark.parametrize("absent", [(), (2, 7, 19)], ids=["every-class", "absent-classes"])
def test_bounded_classifier_radii_hold_and_refuse_ties(absent, monkeypatch):
    """The "features" route's radii from the sweep's top logits (tiles of 7 classes) and,
    for classes without a mean, from tiles of 4 means: each holds, and a tie gives none."""
    rng = np.random.default_rng(11)
    num_classes, num_features = 30, 6
    means = rng.normal(size=(num_classes, num_features)) * 3.0
    weights = means + 0.3 * rng.normal(size=means.shape)
    bias = 0.1 * rng.normal(size=num_classes)
    weights[7], bias[7] = weights[3], bias[3]  # two classes with the same logits: no radius
    counts = np.ones(num_classes, np.int64)
    counts[list(absent)] = 0
    geometry = ncfast.Geometry.from_class_sums(counts, means * counts[:, None])
    assert geometry.route == "features"
    monkeypatch.setattr(plan_module, "ABSENT_LOGITS_TILE_BYTES", 8 * max(len(absent), 1) * 4)
    plan = build_plan(geometry, weights, bias, pair_tile=7)
    present_means = geometry.present_means
    logits = present_means @ weights.T + bias
    tied = np.isin(np.argmax(logits, axis=1), (3, 7))
    assert tied.any() and (plan.classifier_sq_radii[tied] == 0).all()
    assert (plan.classifier_sq_radii[~tied] > 0).all()
    np.testing.assert_array_equal(plan.mean_predictions[~tied], np.argmax(logits, axis=1)[~tied])
    norms = np.linalg.norm(weights, axis=1)
    for mean_logits, mean, prediction, sq_radius in zip(
            logits[~tied], present_means[~tied], plan.mean_predictions[~tied],
            plan.classifier_sq_radii[~tied]):
        directions = rng.normal(size=(200, num_features))
        directions *= np.sqrt(sq_radius) / np.linalg.norm(directions, axis=1, keepdims=True)
        moved = (mean + directions * rng.uniform(0, 1, (200, 1))) @ weights.T + bias
        assert (np.argmax(moved, axis=1) == prediction).all()
        # The radius is the bound with ||w_c* - w_c|| <= ||w_c*|| + max ||w|| (less rounding).
        gap = mean_logits[prediction] - np.delete(mean_logits, prediction).max()
        bound = gap / (norms[prediction] + norms.max())
        np.testing.assert_allclose(np.sqrt(sq_radius),
                                   plan_module.CLASSIFIER_RADIUS_FRACTION * bound, rtol=1e-9)


# --- pass 2 on the "features" route: ties, offsets, include=, all or nothing; bounded radii

def _geometry(counts, means):
    """The geometry of classes with these row counts and means."""
    counts = np.asarray(counts, np.int64)
    return ncfast.Geometry.from_class_sums(counts, np.asarray(means, np.float64) * counts[:, None])


def _top_two_gap(scores):
    """Each row's largest score less its second largest."""
    top = -np.partition(-scores, 1, axis=1)[:, :2]
    return top[:, 0] - top[:, 1]


def test_include_takes_the_corrupted_flags_of_the_included_rows():
    """update(..., corrupted, include=mask) is update of the masked rows and their own flags."""
    case = gaussian_classes(num_rows=400, num_features=3, num_classes=8, seed=7)
    geometry = geometry_of(case)
    assert geometry.route == "features"
    rng = np.random.default_rng(0)
    corrupted = rng.random(400) < 0.3
    include = rng.random(400) < 0.5
    kw = dict(weights=case["weights"], bias=case["bias"])
    split = ncfast.ResidualStats(geometry, **kw).update(
        case["features"], case["labels"], corrupted, include=include)
    masked = ncfast.ResidualStats(geometry, **kw).update(
        case["features"][include], case["labels"][include], corrupted[include])
    assert split.corrupted_rows == int(corrupted[include].sum())
    assert split == masked


def test_pass2_label_errors_count_rows_from_row_offset():
    case = gaussian_classes(num_rows=60, num_features=2, num_classes=4, seed=1)
    geometry = geometry_of(case)
    labels = case["labels"].astype(np.uint64)
    labels[5] = np.uint64(2 ** 63 + 5)
    with pytest.raises(ValueError, match=r"row 105 has label"):
        ncfast.ResidualStats(geometry).update(case["features"], labels, row_offset=100)


@pytest.mark.parametrize("num_classes, num_features", [(40, 8), (4, 8)])
def test_bad_row_in_a_later_task_adds_nothing(num_classes, num_features):
    """All or nothing over tasks: a NaN in the last task of a multi-task chunk raises the
    bad-row ValueError and leaves every sum untouched (both routes)."""
    rows = 2 * cpu.task_rows(num_features) + 7
    case = gaussian_classes(num_rows=rows, num_features=num_features, num_classes=num_classes,
                            seed=2)
    geometry = geometry_of(case)
    features = case["features"].copy()
    features[rows - 3, 1] = np.nan
    stats = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
    with pytest.raises(ValueError, match=f"row {rows - 3}"):
        stats.update(features, case["labels"])
    assert stats == ncfast.ResidualStats(stats.plan)


def test_features_route_nearest_centre_ties_go_to_the_first_class():
    """Coinciding class means (NCC radius 0): rows at or near them, searched or exactly on
    the mean, are predicted as the first of the tied classes, as np.argmin does."""
    means = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    offsets = np.array([[0.0, 0.0], [0.0, 0.0], [0.25, 0.125], [-0.25, -0.125]])
    features = np.concatenate([means + offset for offset in offsets])
    labels = np.tile(np.arange(4), 4)
    geometry = _geometry([4] * 4, means)  # the rows' own means (offsets sum to zero)
    assert geometry.route == "features"
    stats = ncfast.ResidualStats(geometry).update(features, labels)
    sq_distances = ((features[:, None, :] - means[None]) ** 2).sum(axis=2)
    predictions = np.argmin(sq_distances, axis=1)
    np.testing.assert_array_equal(stats.ncc_hits,
                                  np.bincount(labels[predictions == labels], minlength=4))
    assert stats.ncc_hits[1] == 0


def test_features_route_classifier_ties_go_to_the_first_class():
    case = gaussian_classes(num_rows=800, num_features=4, num_classes=20, spread=1.0, seed=3)
    weights, bias = case["weights"].copy(), case["bias"].copy()
    weights[5], bias[5] = weights[2], bias[2]  # classes 2 and 5: the same logits everywhere
    geometry = geometry_of(case)
    assert geometry.route == "features"
    stats = ncfast.ResidualStats(geometry, weights=weights, bias=bias)
    stats.update(case["features"], case["labels"])
    logits = case["features"].astype(np.float64) @ weights.T + bias
    assert (_top_two_gap(np.delete(logits, 5, axis=1)) > 1e-3).all()  # no other near tie
    predictions = np.argmax(logits, axis=1)
    assert (predictions == 2).any()
    labels = case["labels"]
    np.testing.assert_array_equal(
        stats.classifier_hits, np.bincount(labels[predictions == labels], minlength=20))


def test_features_route_nearest_centre_far_from_the_origin():
    """Features offset by 1e5: the search multiplies the centred rows by the centred means,
    so its rounding does not scale with ||mu_G||; predictions equal float64 argmin."""
    case = gaussian_classes(num_rows=3000, num_features=6, num_classes=30, offset=1e5,
                            classifier=False, seed=4)
    geometry = geometry_of(case)
    assert geometry.route == "features"
    stats = ncfast.ResidualStats(geometry).update(case["features"], case["labels"])
    features = case["features"].astype(np.float64)
    sq_distances = ((features[:, None, :] - geometry.means[None]) ** 2).sum(axis=2)
    assert (_top_two_gap(-sq_distances) > 1e-3).all()
    predictions = np.argmin(sq_distances, axis=1)
    labels = case["labels"]
    np.testing.assert_array_equal(stats.ncc_hits,
                                  np.bincount(labels[predictions == labels], minlength=30))


def test_features_route_logits_with_a_large_common_bias():
    """A common bias of 1e7 changes no argmax; the logit offsets stay float64."""
    case = gaussian_classes(num_rows=3000, num_features=6, num_classes=30, seed=5)
    bias = case["bias"] + 1e7
    geometry = geometry_of(case)
    assert geometry.route == "features"
    stats = ncfast.ResidualStats(geometry, weights=case["weights"], bias=bias)
    stats.update(case["features"], case["labels"])
    logits = case["features"].astype(np.float64) @ case["weights"].T + case["bias"]
    assert (_top_two_gap(logits) > 1e-4).all()
    predictions = np.argmax(logits, axis=1)
    labels = case["labels"]
    np.testing.assert_array_equal(stats.classifier_hits,
                                  np.bincount(labels[predictions == labels], minlength=30))


def test_features_route_eigen_coordinates_of_a_far_row_do_not_overflow():
    """A held-out row 3e19 from its mean (within MAX_RESIDUAL_NORM): its squared
    coordinates (9e38, beyond float32) are summed in float64; over the full basis U they
    add up to ||r||^2."""
    means = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    geometry = _geometry([1, 1, 1], means)
    assert geometry.route == "features"
    features = np.array([[3e19, 0.0], [-1.0, 0.5], [0.0, 1.0]], np.float32)
    labels = np.array([0, 1, 2])
    stats = ncfast.ResidualStats(geometry).update(features, labels)
    residuals = features.astype(np.float64) - means[labels]
    assert np.isfinite(stats.eigen_scatter).all()
    assert stats.eigen_scatter.sum() == pytest.approx((residuals ** 2).sum(), rel=1e-6)


def test_bounded_radii_take_an_absent_class_that_wins_at_a_mean():
    """Classes without a mean can hold a mean's largest logit: mean_predictions names that
    class, and the sweep's top logits stay those over the classes with a mean."""
    rng = np.random.default_rng(0)
    num_classes, num_features = 12, 3
    means = rng.normal(size=(num_classes, num_features)) * 3.0
    weights = means + 0.3 * rng.normal(size=means.shape)
    bias = 0.1 * rng.normal(size=num_classes)
    absent = [4, 9]
    weights[9], bias[9] = weights[0], bias[0] + 5.0  # class 9 (no mean) beats class 0
    counts = np.ones(num_classes, np.int64)
    counts[absent] = 0
    geometry = _geometry(counts, means)
    assert geometry.route == "features"
    plan = build_plan(geometry, weights, bias, pair_tile=5)
    logits = geometry.present_means @ weights.T + bias
    expected = np.argmax(logits, axis=1)
    assert 9 in expected
    np.testing.assert_array_equal(plan.mean_predictions, expected)
    present_logits = np.sort(logits[:, geometry.present], axis=1)[:, ::-1][:, :2]
    np.testing.assert_allclose(plan.sweep.top_logits, present_logits, rtol=1e-12)


@pytest.mark.parametrize("height", [0.0, 1e9])
def test_bounded_radii_are_the_documented_bound(height):
    """Six means on a circle (weights the circle, so each mean predicts its own class, class
    0 included), lifted by ``height`` along a direction W ignores: every radius is
    0.9 (gap - 2 rtol ((||w_c*|| + max ||w||)(||mu~_a|| + ||mu_G||) + max |b|)) /
    (||w_c*|| + max ||w||), with rtol = ROUNDING_RTOL + gamma_D."""
    angles = np.arange(6) * np.pi / 3
    circle = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    means = np.concatenate([circle, np.full((6, 1), height)], axis=1)
    weights = np.concatenate([circle, np.zeros((6, 1))], axis=1)
    bias = np.zeros(6)
    geometry = _geometry([1] * 6, means)
    assert geometry.route == "features"
    plan = build_plan(geometry, weights, bias)
    np.testing.assert_array_equal(plan.mean_predictions, np.arange(6))
    logits = means @ weights.T + bias
    top = np.sort(logits, axis=1)[:, ::-1]
    norms = np.linalg.norm(weights, axis=1)
    bound = norms + norms.max()
    unit = np.finfo(np.float64).eps / 2
    rtol = ROUNDING_RTOL + 3 * unit / (1 - 3 * unit)
    mean_norms = np.linalg.norm(means - means.mean(axis=0), axis=1) + np.linalg.norm(
        means.mean(axis=0))
    gap = top[:, 0] - top[:, 1] - 2 * rtol * (bound * mean_norms + np.abs(bias).max())
    expected = plan_module.CLASSIFIER_RADIUS_FRACTION * gap / bound
    np.testing.assert_allclose(np.sqrt(plan.classifier_sq_radii), expected, rtol=1e-9)
