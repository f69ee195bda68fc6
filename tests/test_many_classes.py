"""Many classes: tiled pair metrics and class-tiled predictions equal the dense route."""
import numpy as np
import pytest

import ncfast
from ncfast.metrics import collapse_metrics
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
