"""Many classes: tiled pair metrics and class-tiled predictions equal the dense route."""
import dataclasses

import numpy as np
import pytest

import ncfast
from ncfast.metrics import collapse_metrics
from ncfast import plan as plan_module
from ncfast.plan import build_plan
from ncfast.textbook import textbook_collapse
from cases import gaussian_classes

PAIR_METRICS = ("cdnv", "nc2_equiangular", "nc2_maxangle", "nc2_etf", "nc2_orthogonality",
                "gnc2", "nc2_equiangular_w", "nc2_maxangle_w", "nc3_etf")
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

