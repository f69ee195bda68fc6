"""``ncfast.collapse`` against the float64 textbook route, metric by metric.

``ncfast.textbook.textbook_collapse`` computes every metric the obvious way
(all rows in float64, full D×D covariances, ``np.linalg.pinv``, explicit NCC
distances). DESIGN.md promises 1e-5 relative error; the tests hold each metric
to the tolerance its precision rule gives (``metric_rtol``): float32-GEMM
metrics to (D + 1) float32 epsilons, float64 metrics to 1e-11, both scaled by
how badly the inputs are conditioned. Every adversarial case of
``cases.ADVERSARIAL`` is checked, with and without a classifier, on both NC1
routes, with either global mean, with empty classes and against given means;
random small cases add imbalanced and empty classes; counts and accuracies
(ratios of integer tallies) must match exactly; ``pinv_condition`` must match
the condition number of the textbook's ``Sigma_B``. Analytic cases (a simplex
ETF, an orthogonal frame, a known spectrum) must give their exact values.
"""
import dataclasses
import json
import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ncfast
from cases import ADVERSARIAL, gaussian_classes, orthogonal_frame, simplex_etf, with_label_noise
from conftest import (CONDITIONED_RTOL, NIGHTLY, examples, geometry_rtol,
                      kernel_amplification, pair_gaps, smallest_unit_gap)
from ncfast import metrics
from ncfast.geometry import WEIGHTED_MEAN_ROWS, class_means, weighted_row_mean
from ncfast.plan import eigen_diagonal
from ncfast.report import PER_CLASS
from ncfast.textbook import textbook_collapse

#: DESIGN.md's promise: every metric within this relative error of the textbook route.
#: The tests hold most metrics to far less (``metric_rtol``).
REFERENCE_RTOL = 1e-5

FLOAT32_EPS = float(np.finfo(np.float32).eps)

#: Metrics whose pass-2 sums go through the float32 GEMM. Each residual is rounded to
#: float32 once and multiplied in a D-term float32 dot product, whose relative error is
#: at most about D float32 units of rounding (Higham, Accuracy and Stability, eq. 3.5);
#: NC1 sums squares of them, which doubles it: (D + 1) float32 eps in all.
FLOAT32_METRICS = ("nc1", "nc1_clean")

#: Float64 eps of the largest feature by which a class mean (compensated sums of rows
#: shifted by one of them, then a division) may sit from the exact mean, per value.
MEAN_ROUNDING = 4

#: The other metrics are float64 algebra on float64 sums and means. They keep at least
#: 11 of float64's 16 significant digits: sums over at most 1e4 rows lose up to 4 in the
#: worst case (recursive summation, N float64 units), a ratio of a spread to a mean one
#: more. (Measured over 3000 random small cases: at most 6e-13.)
FLOAT64_RTOL = 1e-11

#: Metrics from sums of distances and of squared distances, which cancel when the
#: distances barely vary (dilation's spread from sums of d and d^2 comes out as 1e-8 of
#: the distances when it is 0): DESIGN.md's bar.
CANCELLING_METRICS = ("memorization", "memorization_raw", "dilation")

#: Absolute floor for metrics that are 0 analytically and scale like the rounding
#: error of O(1) quantities (norm ratios, cosines, normalized Grams): float64 gives
#: ~1e-16 there, where a relative error means nothing. 1e-13 leaves 1000x headroom
#: and still fails on any real departure (a cosine off by 1e-12 fails). Where the
#: features sit far from the origin compared with the spacing of the class means,
#: ``analytic_zero_floors`` scales it up by that ratio.
LINEAR_ZERO = 1e-13

#: The same for metrics quadratic in such errors (NC1, its trace form, CDNV, NC3).
QUADRATIC_ZERO = LINEAR_ZERO ** 2

#: Metrics with the units of the features (the others are ratios, cosines or counts,
#: whose rounding near 0 is ``LINEAR_ZERO`` in absolute terms).
DIMENSIONAL_METRICS = ("bias_collapse", "memorization_raw")

#: Fractions of integer tallies: both routes divide the same integers.
EXACT_METRICS = ("ncc_accuracy", "accuracy", "nc4", "noise_fit")

#: Float per-class arrays; the integer or tally-ratio ones must match exactly.
PER_CLASS_FLOATS = ("class_variances", "class_mean_norms")


def magnitude_ratio(report):
    """How far the class means sit from the origin against their spacing (at least 1).

    The centred means, and every metric built on them, carry the rounding of
    the uncentred means: an offset of 1e3 on means 3 apart costs 3 digits.
    """
    means = report.means[report.present_classes]
    return max(1.0, float(np.abs(means).max() / pair_gaps(means).min()))


class DecisionTies(NamedTuple):
    """Rows whose NCC or classifier decision float64 rounding may flip (``decision_ties``).

    Attributes
    ----------
    ncc, classifier : bool arrays of shape (n,)
    labels : int array of shape (n,)
    deciding : bool array of shape (n,), the ties of the rule ``noise_fit`` reads (the
        classifier's when there is one, else NCC's)
    corrupted : bool array of shape (n,), rows whose label is not their clean label
    """

    ncc: np.ndarray
    classifier: np.ndarray
    labels: np.ndarray
    deciding: np.ndarray
    corrupted: np.ndarray


def _top_two_gap(scores):
    """Largest minus second largest score of each row (inf with one column)."""
    if scores.shape[1] < 2:
        return np.full(scores.shape[0], np.inf)
    top_two = -np.partition(-scores, 1, axis=1)[:, :2]
    return top_two[:, 0] - top_two[:, 1]


#: Float64 unit roundoffs a decision's margin may carry, per term of its dot products:
#: ncfast's float64 scores of a row and the textbook's, from means that differ in their
#: last bits (ncfast's compensated sums against numpy's).
DECISION_ROUNDING = 16 * float(np.finfo(np.float64).eps)


def decision_ties(case, report):
    """The rows of ``case`` whose float64 NCC or classifier margin is within float64 rounding.

    ncfast scores the class centres and the classifier's logits from float32
    products, but decides every row whose float32 margin is within the
    float32 rounding again in float64 from the row itself
    (``ncfast.plan.near_tie_bands``). Its decisions and the textbook's can then
    differ only where the float64 scores themselves are within rounding:
    about ``(D + C')`` float64 eps of ``(||h|| + max ||mu||)^2`` for the squared
    distances and ``(D + 1)`` eps of ``max ||w|| ||h|| + max |b|`` for the logits.
    (Found by the nightly run before the float64 decisions: two class means
    3e-5 apart at D = 1, rows spread 1e-4 around them, whose NCC accuracies
    differed by 3 of 20 rows.)
    """
    features = np.asarray(case["features"], np.float64)
    means = report.means[report.present_classes]
    num_features = features.shape[1]
    row_norms = np.linalg.norm(features, axis=1)
    slack = (num_features + len(means) + 6) * DECISION_ROUNDING * (
        row_norms + np.linalg.norm(means, axis=1).max()) ** 2
    sq_distances = ((features[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    ncc = _top_two_gap(-sq_distances) <= slack
    classifier = np.zeros(len(features), bool)
    if case.get("weights") is not None:
        logits = features @ case["weights"].T + case["bias"]
        logit_slack = (num_features + 6) * DECISION_ROUNDING * (
            np.linalg.norm(case["weights"], axis=1).max() * row_norms
            + np.abs(case["bias"]).max())
        classifier = _top_two_gap(logits) <= logit_slack
    labels = case["labels"]
    corrupted = labels != case.get("clean_labels", labels)
    return DecisionTies(ncc, classifier, labels,
                        classifier if case.get("weights") is not None else ncc, corrupted)


def tally_allowance(name, ties):
    """How far an exact tally metric may move when the rows in ``ties`` go either way."""
    if name == "noise_fit":
        return (ties.deciding & ties.corrupted).sum() / max(ties.corrupted.sum(), 1)
    either = {"ncc_accuracy": ties.ncc, "accuracy": ties.classifier,
              "nc4": ties.ncc | ties.classifier}[name]
    return either.sum() / len(either)


def assert_class_tallies_match(actual, expected, class_ties, labels):
    """Per-class fractions equal, but for each class's rows in ``class_ties``."""
    counts = np.bincount(labels, minlength=len(expected))
    allowed = np.bincount(labels, weights=class_ties, minlength=len(expected))
    both_nan = np.isnan(actual) & np.isnan(expected)
    difference = np.abs(np.where(both_nan, 0.0, actual - expected))
    assert (difference <= allowed / np.maximum(counts, 1)).all(), (actual, expected, allowed)


def metric_rtol(name, report):
    """The relative tolerance of one metric (or ``pinv_condition``) of ``report``.

    Float64 metrics: ``FLOAT64_RTOL``, scaled up by the magnitude ratio of the
    means; whatever goes through the pseudo-inverse is amplified by its
    condition number (``pinv_condition``, as in ``conftest.CONDITIONED_RTOL``).
    Float32-GEMM metrics: (D + 1) float32 eps on top, which holds unless the
    residuals nearly cancel in the directions of the class means
    (``nc1_rounding_bound`` covers that case).
    """
    if name in CANCELLING_METRICS:
        return REFERENCE_RTOL
    # Pair distances from Gram entries cancel quadratically when two means nearly
    # coincide (``geometry_rtol``). Found by the nightly run: with label noise, three
    # classes of 6 classes at D = 7 whose means lie 1.1e-4 to 3.5e-4 apart near norm 8;
    # cdnv 5.9e-7 off the textbook's, past the linear magnitude ratio's 4.8e-7.
    float64_rtol = max(FLOAT64_RTOL * magnitude_ratio(report), geometry_rtol(report))
    if name == "pinv_condition":
        return float64_rtol * report.pinv_condition
    if name in FLOAT32_METRICS:
        return ((report.num_features + 1) * FLOAT32_EPS
                + max(float64_rtol, CONDITIONED_RTOL) * report.pinv_condition)
    amplification = kernel_amplification(name, report)
    if amplification is not None:
        # Positions off by float64_rtol move d^2 by up to (1 + 1/d)^2 times that, relatively
        # (found by the nightly run: 13 rows, D = 11, unit means 5e-5 apart, the Riesz
        # kernel's mean 9e-7 off the textbook's).
        unit_rtol = float64_rtol * (1 + 1 / smallest_unit_gap(report)) ** 2
        return max(float64_rtol, amplification * unit_rtol)
    return float64_rtol


def analytic_zero_floors(case, global_mean="classes"):
    """Metrics that are 0 analytically on ``case``, each with its absolute floor.

    When two classes have rows, mu_G lies on the segment between their means, so
    the centred means point in opposite directions (cosine -1: equiangularity and
    max-angle are 0). When mu_G is the midpoint (``global_mean="classes"``, or
    equal class counts) they also have equal norms and their normalized Gram is
    the ETF's (equinorm and ``nc2_etf`` are 0).

    The centred means carry the rounding of the uncentred ones, so the floor is
    ``LINEAR_ZERO`` times the largest feature magnitude over the distance between
    the two class means (when that exceeds 1: an offset of 1e3 on means 3 apart).

    Returns
    -------
    dict
        ``{metric name: absolute floor}``; empty unless two classes have rows.
    """
    classes, counts = np.unique(case["labels"], return_counts=True)
    if classes.size != 2:
        return {}
    features = np.asarray(case["features"], dtype=np.float64)
    first_mean, second_mean = (features[case["labels"] == c].mean(axis=0) for c in classes)
    magnitude_ratio = np.abs(features).max() / np.linalg.norm(first_mean - second_mean)
    floor = LINEAR_ZERO * max(1.0, magnitude_ratio)
    names = ["nc2_equiangular", "nc2_maxangle"]
    if global_mean == "classes" or counts[0] == counts[1]:
        names += ["nc2_equinorm", "nc2_etf"]
    return dict.fromkeys(names, floor)


def textbook_nc1_facts(case, global_mean="classes", pinv_rtol=1e-10):
    """The condition number NC1's pseudo-inverse should report, and NC1's rounding bounds.

    From the case's rows in float64, as ``ncfast.textbook`` forms them: class
    means from a loop over classes, the D×D ``M~^T M~`` and its eigenpairs
    ``(lambda_j, u_j)`` above ``pinv_rtol`` of the largest (those of the Gram).

    NC1 is ``(1/N) sum_i sum_j (u_j . r_i)^2 / lambda_j``, and on both routes pass 2
    sums the squares of each row's coordinates in this eigenbasis (on the "classes"
    route scaled by the Gram's, ``z = M~ r``). Rounding a residual to float32 and a
    D-term float32 product move ``u_j . r_i`` by at most about ``(D + 1) / 2`` float32
    eps times ``||r_i||`` (not times ``|u_j . r_i|``, which can be far smaller), so NC1
    moves by at most ``(D + 1)`` float32 eps times ``B = (1/N) sum_ij |u_j . r_i|
    ||r_i|| / lambda_j``, to first order. The float64 class means carry rounding too
    (sums of shifted rows: a lone clean row's mean need not be that row), at most
    ``MEAN_ROUNDING`` float64 eps of the largest feature per value, so a residual sits up
    to ``delta = MEAN_ROUNDING eps sqrt(D) max|h|`` from the exact one and each term
    ``(u_j . r_i)^2 / lambda_j`` moves by at most ``(2 |u_j . r_i| delta + delta^2) /
    lambda_j``; the bound adds that, which is all there is where the residuals are exactly
    0 (nightly: one clean row in each class gave ``nc1_clean`` 2.8e-32 against 0).

    Returns
    -------
    dict
        ``condition`` (largest over smallest kept eigenvalue), ``nc1`` (the bound's
        factor for all rows, on their route) and, with ``clean_labels``,
        ``nc1_clean`` (that of the clean rows against their own means).
    """
    features = np.asarray(case["features"], dtype=np.float64)
    mean_shift = (MEAN_ROUNDING * np.finfo(np.float64).eps * np.sqrt(features.shape[1])
                  * np.abs(features).max())

    def spectrum_and_bound(rows, labels):
        classes = np.unique(labels)
        means = np.zeros((classes.max() + 1, features.shape[1]))
        for c in classes:
            means[c] = rows[labels == c].mean(axis=0)
        center = means[classes].mean(axis=0) if global_mean == "classes" else rows.mean(axis=0)
        centred = means[classes] - center
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
        kept = eigenvalues > pinv_rtol * eigenvalues.max()
        residuals = rows - means[labels]
        projections = np.abs(residuals @ vectors[:, kept])
        float32_bound = (features.shape[1] + 1) * FLOAT32_EPS * (
            projections * np.linalg.norm(residuals, axis=1)[:, None] / eigenvalues[kept])
        mean_bound = (2 * projections * mean_shift + mean_shift ** 2) / eigenvalues[kept]
        return eigenvalues[kept], float((float32_bound + mean_bound).sum()) / len(labels)

    kept, bound = spectrum_and_bound(features, case["labels"])
    facts = {"condition": float(kept.max() / kept.min()), "nc1": bound}
    if "clean_labels" in case:
        clean = case["labels"] == case["clean_labels"]
        facts["nc1_clean"] = spectrum_and_bound(features[clean], case["labels"][clean])[1]
    return facts


def assert_matches_textbook(report, reference, *, zero_floors=None, facts=None, ties=None):
    """Assert a ``CollapseReport`` agrees with a ``textbook_collapse`` result.

    Parameters
    ----------
    report : CollapseReport
    reference : dict
        ``textbook_collapse`` of the same inputs.
    zero_floors : dict, optional
        ``{name: floor}`` for metrics that are 0 analytically on these inputs
        (``analytic_zero_floors``): both values must be at most the floor
        instead of agreeing to relative error.
    facts : dict, optional
        ``textbook_nc1_facts`` of the inputs: ``pinv_condition`` is checked
        against it, and NC1 is held to its rounding bound (absolute) instead of
        the relative ``metric_rtol``.
    ties : DecisionTies, optional
        ``decision_ties`` of the inputs: the tallies may differ by these rows
        (``tally_allowance``); without it they must be equal.
    """
    zero_floors = zero_floors or {}
    expected_metrics = {name: value for name, value in reference.items()
                        if name not in PER_CLASS and name != "rank"}
    assert set(report.metrics()) == set(expected_metrics)
    for name, expected in expected_metrics.items():
        actual = getattr(report, name)
        if name in EXACT_METRICS:
            if actual != expected:
                allowed = 0.0 if ties is None else tally_allowance(name, ties)
                assert abs(actual - expected) <= allowed, (name, actual, expected, allowed)
        elif name in zero_floors:
            assert max(abs(actual), abs(expected)) <= zero_floors[name], \
                (name, actual, expected, zero_floors[name])
        elif facts is not None and name in FLOAT32_METRICS:
            float64_part = (max(FLOAT64_RTOL * magnitude_ratio(report), CONDITIONED_RTOL)
                            * report.pinv_condition * abs(expected))
            bound = facts[name] + float64_part
            assert abs(actual - expected) <= bound, (name, actual, expected, bound)
        else:
            floor = 0.0 if name in DIMENSIONAL_METRICS else LINEAR_ZERO * magnitude_ratio(report)
            assert actual == pytest.approx(expected, rel=metric_rtol(name, report), abs=floor,
                                           nan_ok=True), \
                (name, actual, expected, metric_rtol(name, report))
    assert report.rank == reference["rank"]
    if facts is not None:
        assert report.pinv_condition == pytest.approx(
            facts["condition"], rel=metric_rtol("pinv_condition", report), abs=0)
    np.testing.assert_array_equal(report.class_counts, reference["class_counts"])
    if ties is None:
        np.testing.assert_array_equal(report.class_ncc_accuracy,
                                      reference["class_ncc_accuracy"])
    else:
        assert_class_tallies_match(report.class_ncc_accuracy, reference["class_ncc_accuracy"],
                                   ties.ncc, ties.labels)
    if reference["class_accuracy"] is None:
        assert report.class_accuracy is None
    elif ties is None:
        np.testing.assert_array_equal(report.class_accuracy, reference["class_accuracy"])
    else:
        assert_class_tallies_match(report.class_accuracy, reference["class_accuracy"],
                                   ties.classifier, ties.labels)
    for name in PER_CLASS_FLOATS:
        np.testing.assert_allclose(getattr(report, name), reference[name],
                                   rtol=metric_rtol(name, report), atol=0, err_msg=name)


#: Random small cases: reproducible (derandomized) but in the nightly job, no deadline
#: for the JIT; 40 examples (``conftest.examples``: 40 times more at night).
RANDOM_CASE_SETTINGS = settings(max_examples=examples(40), deadline=None,
                                derandomize=not NIGHTLY)


@st.composite
def small_gaussian_cases(draw):
    """Keywords of a small ``cases.gaussian_classes`` case: any C <= 7, D >= 1, both routes.

    A third of the cases have drawn class counts (0 to 40 rows each, at least two
    classes with rows): imbalanced, and empty classes.
    """
    num_classes = draw(st.integers(2, 7))
    parameters = {
        "num_rows": draw(st.integers(num_classes, 60)),
        "num_features": draw(st.integers(1, 20)),
        "num_classes": num_classes,
        "spread": draw(st.sampled_from([1e-4, 0.3, 1.0])),
        "offset": draw(st.sampled_from([0.0, 1e3])),
        "classifier": draw(st.booleans()),
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    if draw(st.integers(0, 2)) == 0:
        counts = draw(st.lists(st.integers(0, 40), min_size=num_classes, max_size=num_classes)
                      .filter(lambda counts: sum(count > 0 for count in counts) >= 2))
        parameters["class_counts"] = counts
    return parameters


def _without_classifier(case):
    return {key: value for key, value in case.items() if key not in ("weights", "bias")}


@pytest.mark.parametrize("with_classifier", [False, True], ids=["features", "classifier"])
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_every_metric_matches_textbook(name, with_classifier):
    case = gaussian_classes(**ADVERSARIAL[name], classifier=with_classifier)
    report = ncfast.collapse(**case)
    assert_matches_textbook(report, textbook_collapse(**case),
                            zero_floors=analytic_zero_floors(case),
                            facts=textbook_nc1_facts(case))
    features_per_row = case["features"].shape[1]
    assert report.route == ("features" if case["num_classes"] > features_per_row else "classes")


@RANDOM_CASE_SETTINGS
@given(parameters=small_gaussian_cases(), global_mean=st.sampled_from(["classes", "samples"]))
def test_random_small_cases_match_textbook(parameters, global_mean):
    case = gaussian_classes(**parameters)
    report = ncfast.collapse(**case, global_mean=global_mean, empty_classes="ignore")
    assert_matches_textbook(report, textbook_collapse(**case, global_mean=global_mean),
                            zero_floors=analytic_zero_floors(case, global_mean),
                            facts=textbook_nc1_facts(case, global_mean),
                            ties=decision_ties(case, report))


@pytest.mark.parametrize("num_classes", [6, 40], ids=["classes", "features"])
def test_nc1_with_nearly_flat_directions_matches_textbook(num_classes):
    """Three directions of the means' span shrunk 1000-fold, then rotated into every
    feature (``pinv_condition`` 3e6): NC1 within 1e-5 of float64 on both routes.

    Each residual's coordinate along a flat direction is rounded once in float32,
    relative to ``||r||`` (1e-4 of the coordinate here, 3e-6 or less in NC1 after
    averaging over the rows). A float32 D×D scatter, as the "features" route once
    summed, rounds each entry relative to ``||r||^2`` (1e6 times that coordinate's
    square): NC1 2.4e-3 off on this case, and already 4.6e-5 off at a 100-fold shrink.
    """
    case = gaussian_classes(num_rows=6000, num_features=16, num_classes=num_classes,
                            offset=3.0, flat_scale=1e-3)
    report = ncfast.collapse(**case)
    reference = textbook_collapse(**case)
    assert report.route == ("classes" if num_classes <= 16 else "features")
    assert report.pinv_condition > 1e6
    assert report.nc1 == pytest.approx(reference["nc1"], rel=1e-5, abs=0)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_no_numpy_warnings_on_valid_inputs(name):
    case = gaussian_classes(**ADVERSARIAL[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ncfast.collapse(**case)


@pytest.mark.parametrize("name", ["imbalanced_1_to_100", "single_row_classes"])
def test_global_mean_of_samples_matches_textbook(name):
    case = gaussian_classes(**ADVERSARIAL[name])
    report = ncfast.collapse(**case, global_mean="samples")
    assert report.global_mean == report.to_dict()["global_mean"] == "samples"
    reference = textbook_collapse(**case, global_mean="samples")
    assert_matches_textbook(report, reference)
    # Imbalanced classes put the two global means apart, so the option is exercised.
    classes_reference = textbook_collapse(**case, global_mean="classes")
    assert reference["bias_collapse"] != pytest.approx(classes_reference["bias_collapse"],
                                                       rel=1e-3)
    assert reference["nc1"] != pytest.approx(classes_reference["nc1"], rel=1e-3)


def test_weighted_row_mean_is_numpys_weighted_average():
    """Over more rows than one block of ``WEIGHTED_MEAN_ROWS`` (the global mean of
    ``global_mean="samples"`` from 257 classes on): a block boundary that dropped a row
    moved unc3 by 70% at 300 classes."""
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(3 * WEIGHTED_MEAN_ROWS + 88, 8)) + 5.0
    weights = rng.integers(1, 400, rows.shape[0]).astype(np.float64)
    np.testing.assert_allclose(weighted_row_mean(rows, weights),
                               np.average(rows, axis=0, weights=weights), rtol=1e-13, atol=0)


def _case_with_empty_classes(num_features=32):
    """Six classes, 1 and 4 without rows; W's row 1 copies row 0 with a larger bias.

    The argmax runs over all C rows of W, so every row of class 0 is predicted
    as the empty class 1. At D = 3 the four means with rows outnumber the
    features: the "features" route, whose NC1 averages over C' = 4 classes.
    """
    case = gaussian_classes(num_features=num_features, num_classes=6,
                            class_counts=[40, 0, 60, 50, 0, 30])
    weights, bias = case["weights"].copy(), case["bias"].copy()
    weights[1] = weights[0]
    bias[1] = bias[0] + 1.0
    return {**case, "weights": weights, "bias": bias}


@pytest.mark.parametrize("num_features, route", [(32, "classes"), (3, "features")])
def test_empty_classes_warn_and_match_textbook(num_features, route):
    case = _case_with_empty_classes(num_features)
    with pytest.warns(UserWarning, match=r"2 of 6 classes have no rows \(1, 4\)"):
        report = ncfast.collapse(**case)
    assert report.route == route
    reference = textbook_collapse(**case)
    assert_matches_textbook(report, reference)
    np.testing.assert_array_equal(report.present_classes, [0, 2, 3, 5])
    assert report.class_accuracy[0] == 0.0
    assert np.isnan(report.class_variances[[1, 4]]).all()


def test_reports_compare_and_serialize_every_field():
    """Equal reports are equal with NaN entries (a class without rows); the counts behind
    the means count; ``to_dict`` is strict JSON (NaN as None) without the means and their
    counts."""
    case = _case_with_empty_classes()
    with pytest.warns(UserWarning, match="classes have no rows"):
        report, again = ncfast.collapse(**case), ncfast.collapse(**case)
    assert np.isnan(report.class_variances[1]) and report == again
    assert report != dataclasses.replace(report, mean_counts=report.mean_counts + 1)
    result = report.to_dict()
    assert result["class_variances"][1] is None
    json.dumps(result, allow_nan=False)
    assert "means" not in result and "mean_counts" not in result


def test_float64_rows_far_from_the_origin_keep_their_spread():
    """Float64 rows 1e12 from the origin, spread 0.1 around means a few apart: pass 1 summed
    them as they came, and the rounding of the growing sums moved the means: NC1 came out 3%
    off, nc1_clean 4.3 times its value, class variances 2% off. Against the
    textbook on the same rows less the offset (exact: they lie within a factor 2 of it), on
    which these metrics do not depend. What remains is the means' own rounding (their ulp is
    1.2e-4): a few 1e-6 measured."""
    offset = 1e12
    case = with_label_noise(gaussian_classes(num_rows=100_000, num_features=16, num_classes=4,
                                             spread=0.1, offset=offset, dtype=np.float64,
                                             classifier=False))
    report = ncfast.collapse(**case)
    reference = textbook_collapse(**dict(case, features=case["features"] - offset))
    for name in ("nc1", "nc1_trace", "cdnv", "nc1_clean", "dilation", "memorization"):
        assert getattr(report, name) == pytest.approx(reference[name], rel=1e-4), name
    np.testing.assert_allclose(report.class_variances, reference["class_variances"], rtol=1e-6)


@pytest.mark.parametrize("chunk_rows", [8, 1])
def test_float64_rows_far_from_the_origin_in_small_chunks_keep_their_spread(chunk_rows):
    """Pass 1 shifted float64 rows within a piece of one chunk, but added each piece to the
    class totals as they came: 20,000 rows 1e6 from the origin, with a spread of 1e-7
    around means 1e-3 apart, fed in chunks of 8 rows gave NC1 0.54% off and class
    variances 0.60%, in chunks of 1 4.1% and 6.6% (merged states as much). The totals now
    keep their rounding errors (ClassSums.sum_errors)."""
    offset, rows = 1e6, 20_000
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, rows)
    deviations = 1e-3 * rng.normal(size=(4, 8))[labels] + 1e-7 * rng.normal(size=(rows, 8))
    case = {"features": offset + deviations, "labels": labels}
    chunks = [(case["features"][start:start + chunk_rows], labels[start:start + chunk_rows])
              for start in range(0, rows, chunk_rows)]
    reference = textbook_collapse(case["features"] - offset, labels)  # exact: within 2x
    report = ncfast.collapse(chunks, None, num_classes=4)
    for name in ("nc1", "nc1_trace", "cdnv"):
        assert getattr(report, name) == pytest.approx(reference[name], rel=1e-5), name
    np.testing.assert_allclose(report.class_variances, reference["class_variances"], rtol=1e-5)
    if chunk_rows == 1:
        return  # 20,000 states: the merge below takes chunks of 8
    merged = sum(ncfast.ClassSums(4, 8).update(features, labels) for features, labels in chunks)
    geometry = ncfast.Geometry.from_class_sums(merged.counts, merged.sums,
                                               sum_errors=merged.sum_errors)
    np.testing.assert_allclose(geometry.means, report.means, rtol=0,
                               atol=2 * np.spacing(offset))  # two ulps


@pytest.mark.parametrize("with_errors", [False, True], ids=["sums", "sums-and-errors"])
def test_geometry_of_class_sums_keeps_only_the_present_means(with_errors):
    """With empty classes the geometry holds the C'×D means of the classes with rows and
    forms the C×D table (NaN rows) on first use: it held both, 1 GB each at 32,000
    classes of 4096 features. Either way, exactly ``class_means``' numbers."""
    rng = np.random.default_rng(11)
    counts = np.array([3, 0, 5, 1, 0, 2])
    sums = rng.normal(size=(6, 7)) * 1e3 * counts[:, None]
    sum_errors = rng.normal(size=(6, 7)) * 1e-13 * counts[:, None] if with_errors else None
    geometry = ncfast.Geometry.from_class_sums(counts, sums, sum_errors=sum_errors)
    expected = class_means(counts, sums, sum_errors)
    assert "means" not in vars(geometry)
    np.testing.assert_array_equal(geometry.present_means, expected[[0, 2, 3, 5]])
    assert geometry.present_means.flags.c_contiguous
    np.testing.assert_array_equal(geometry.means, expected)  # NaN rows compare equal
    assert (geometry.num_classes, geometry.num_features) == (6, 7)
    whole = ncfast.Geometry.from_class_sums(counts + 1, np.asfortranarray(sums),
                                            sum_errors=sum_errors)
    assert whole.means is whole.present_means and whole.present_means.flags.c_contiguous


def test_ood_rows_and_their_mean_give_the_same_nc5():
    case = gaussian_classes(num_features=16, num_classes=4, offset=2.0, classifier=False)
    ood = np.random.default_rng(5).normal(size=(50, 16)) + 1.0
    from_rows = ncfast.collapse(case["features"], case["labels"], ood=ood)
    from_mean = ncfast.collapse(case["features"], case["labels"], ood=ood.mean(axis=0))
    assert from_rows.nc5 == pytest.approx(from_mean.nc5, rel=1e-12)


@pytest.mark.parametrize("rounded", [False, True], ids=["exact", "rounded"])
def test_an_ood_mean_at_the_global_mean_is_refused(rounded):
    """NC5's direction is 0/0 there: OOD rows whose float64 mean is the global mean up
    to rounding (an audit saw 0.153 from the rounding alone) are refused as the exact one
    is; an OOD mean 1e-10 away relative to the means still measures."""
    case = gaussian_classes(num_features=16, num_classes=6, offset=3.0, classifier=False)
    global_mean = ncfast.collapse(case["features"], case["labels"]).means.mean(axis=0)
    offset = np.random.default_rng(1).normal(size=16)
    ood = np.vstack([global_mean + offset, global_mean - offset]) if rounded else global_mean
    with pytest.raises(ValueError, match="^the OOD mean is the global mean of the class "
                                         "means up to float64 rounding"):
        ncfast.collapse(case["features"], case["labels"], ood=ood)
    near = global_mean + 1e-10 * np.linalg.norm(global_mean) * offset / np.linalg.norm(offset)
    assert 0.0 < ncfast.collapse(case["features"], case["labels"], ood=near).nc5 < 1.0


def test_self_duality_over_tasks_of_rows_matches_textbook(monkeypatch):
    """NC3 summed over tasks of 3 class means (4 means with a row: tasks of 3 and 1, the
    classifier rows of the classes without one skipped) equals the textbook's."""
    case = _case_with_empty_classes()
    monkeypatch.setattr(metrics, "TASK_BYTES", 8 * case["features"].shape[1] * 3)
    with pytest.warns(UserWarning, match="classes have no rows"):
        report = ncfast.collapse(**case)
    assert report.nc3 == pytest.approx(textbook_collapse(**case)["nc3"], rel=1e-10)


def test_empty_classes_raise_when_asked():
    with pytest.raises(ValueError, match=r"2 of 6 classes have no rows \(1, 4\)"):
        ncfast.collapse(**_case_with_empty_classes(), empty_classes="raise")


@pytest.mark.parametrize("class_counts, route", [
    ([100] * 9, "features"),                        # C' = 9 > D = 8
    ([100, 100, 100, 100, 0, 100, 100, 100, 100], "classes"),  # C' = 8 = D
])
def test_route_counts_classes_with_rows(class_counts, route):
    case = gaussian_classes(num_features=8, num_classes=9, class_counts=class_counts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "1 of 9 classes have no rows", UserWarning)
        report = ncfast.collapse(**case)
    assert report.route == route
    assert_matches_textbook(report, textbook_collapse(**case))


def _train_and_held_out():
    """A training case and held-out rows of the same classes, class 2 left out."""
    train = gaussian_classes(num_rows=2000)
    held_out = gaussian_classes(num_rows=600, rows_seed=7, classifier=False)
    kept = held_out["labels"] != 2
    held_out = {"features": held_out["features"][kept], "labels": held_out["labels"][kept],
                "weights": train["weights"], "bias": train["bias"]}
    return train, held_out


def test_held_out_rows_measured_against_training_means():
    train, held_out = _train_and_held_out()
    train_report = ncfast.collapse(**train)
    train_features = train["features"].astype(np.float64)
    train_means = np.stack([train_features[train["labels"] == c].mean(axis=0)
                            for c in range(train["num_classes"])])
    np.testing.assert_allclose(train_report.means, train_means, rtol=REFERENCE_RTOL, atol=0)
    reference = textbook_collapse(**held_out, means=train_means)
    for means in (train_report, train_report.means):
        report = ncfast.collapse(**held_out, means=means)
        assert_matches_textbook(report, reference)
        assert np.isnan(report.class_variances[2]) and report.class_counts[2] == 0
        np.testing.assert_array_equal(report.present_classes, np.arange(5))
    # The held-out set's own means give other values, so the given means were used.
    own_reference = textbook_collapse(**held_out, num_classes=5)
    assert reference["nc1"] != pytest.approx(own_reference["nc1"], rel=1e-3)


def test_held_out_rows_against_means_with_an_absent_class():
    """Training class 2 has no rows: its mean is NaN and the metrics skip it."""
    train = gaussian_classes(class_counts=[300, 300, 0, 300, 300])
    held_out = gaussian_classes(class_counts=[50, 40, 0, 60, 50], rows_seed=7, classifier=False)
    held_out = {"features": held_out["features"], "labels": held_out["labels"],
                "weights": train["weights"], "bias": train["bias"]}
    with pytest.warns(UserWarning, match=r"1 of 5 classes have no rows \(2\)"):
        train_report = ncfast.collapse(**train)
    assert np.isnan(train_report.means[2]).all()
    report = ncfast.collapse(**held_out, means=train_report)
    assert_matches_textbook(report, textbook_collapse(**held_out, means=train_report.means))
    np.testing.assert_array_equal(report.present_classes, [0, 1, 3, 4])
    # A held-out row of the class without a mean cannot be measured.
    labels = held_out["labels"].copy()
    labels[0] = 2
    with pytest.raises(ValueError, match="label 2"):
        ncfast.collapse(held_out["features"], labels, means=train_report)
    with pytest.raises(ValueError, match="label 2"):
        textbook_collapse(held_out["features"], labels, means=train_report.means)


def test_held_out_global_mean_of_samples_uses_training_counts():
    train, held_out = _train_and_held_out()
    train_report = ncfast.collapse(**train, global_mean="samples")
    report = ncfast.collapse(**held_out, means=train_report, global_mean="samples")
    assert_matches_textbook(
        report, textbook_collapse(**held_out, means=train_report, global_mean="samples"))
    with pytest.raises(ValueError, match=r"an array of means does not carry: pass the training "
                                         r"report \(a CollapseReport\) as means="):
        ncfast.collapse(**held_out, means=train_report.means, global_mean="samples")
    with pytest.raises(ValueError, match="global_mean='samples' needs the row count"):
        ncfast.Geometry.from_means(train_report.means, global_mean="samples")


ETF_SHAPES = [(2, 3), (5, 12), (10, 10), (3, 200)]


@pytest.mark.parametrize("num_classes, num_features", ETF_SHAPES)
def test_simplex_etf_features_are_collapsed(num_classes, num_features):
    case = _without_classifier(simplex_etf(num_classes, num_features))
    for result in (ncfast.collapse(**case).metrics(), textbook_collapse(**case)):
        for name in ("nc1", "nc1_trace", "cdnv"):
            assert abs(result[name]) <= QUADRATIC_ZERO, (name, result[name])
        for name in ("nc2_etf", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle"):
            assert abs(result[name]) <= LINEAR_ZERO, (name, result[name])
        # Unit ETF vectors are 2C/(C-1) apart squared.
        energy = -0.5 * np.log(2.0 * num_classes / (num_classes - 1))
        assert result["gnc2"] == pytest.approx(energy, rel=1e-12)
        assert result["ncc_accuracy"] == 1.0


@pytest.mark.parametrize("num_classes, num_features", ETF_SHAPES)
def test_self_dual_classifier_on_simplex_etf(num_classes, num_features):
    case = simplex_etf(num_classes, num_features, classifier=True)
    for result in (ncfast.collapse(**case).metrics(), textbook_collapse(**case)):
        assert abs(result["nc3"]) <= QUADRATIC_ZERO, result["nc3"]
        for name in ("nc3_etf", "unc3", "bias_collapse", "nc2_equinorm_w",
                     "nc2_equiangular_w", "nc2_maxangle_w", "nc2_etf_w"):
            assert abs(result[name]) <= LINEAR_ZERO, (name, result[name])
        assert result["nc4"] == 0.0
        assert result["accuracy"] == 1.0


@pytest.mark.parametrize("num_classes, num_features", [(2, 3), (4, 10), (7, 7)])
def test_orthogonal_frame_has_zero_orthogonality(num_classes, num_features):
    case = orthogonal_frame(num_classes, num_features, spread=0.0)
    for result in (ncfast.collapse(**case).metrics(), textbook_collapse(**case)):
        assert abs(result["nc2_orthogonality"]) <= LINEAR_ZERO, result["nc2_orthogonality"]
    # With within-class spread the class means leave the frame; both routes agree.
    spread_case = orthogonal_frame(num_classes, num_features)
    reference = textbook_collapse(**spread_case)
    assert reference["nc2_orthogonality"] > 1e-4
    assert_matches_textbook(ncfast.collapse(**spread_case), reference)


@pytest.mark.parametrize("num_features", [16, 3], ids=["classes_route", "features_route"])
def test_the_direction_centring_removes_is_never_pseudo_inverted(num_features):
    """The centred means' Gram has a null direction whose eigenvalue is rounding (about 1e-17
    of the largest). A small pinv_rtol, or a common offset of 1e7 on float64 features,
    kept it: rank C' and NC1 13x or 2e8x too large."""
    rng = np.random.default_rng(3)
    num_classes = 5
    labels = np.arange(2000) % num_classes
    means = rng.normal(size=(num_classes, num_features))
    features = 1e-4 * (means[labels] + 0.2 * rng.normal(size=(2000, num_features)))
    reference = ncfast.collapse(features, labels)
    assert reference.rank == min(num_classes - 1, num_features)
    for report in (ncfast.collapse(features, labels, pinv_rtol=1e-20),
                   ncfast.collapse(features + 1e7, labels)):
        assert report.rank == reference.rank
        assert report.nc1 == pytest.approx(reference.nc1, rel=1e-3)


@pytest.mark.parametrize("pinv_rtol", [1e-15, 1e-18])
def test_the_textbook_keeps_at_most_c_minus_1_directions_too(pinv_rtol):
    """The float64 reference pseudo-inverted Sigma_B with numpy's pinv: at pinv_rtol 1e-18
    it kept rounding eigenvalues (rank 32 of 10 classes) and gave NC1 = -5e14."""
    rng = np.random.default_rng(1)
    means = rng.normal(size=(10, 32))
    labels = rng.integers(0, 10, 3000)
    features = means[labels] + 0.3 * rng.normal(size=(3000, 32))
    reference = textbook_collapse(features, labels, pinv_rtol=pinv_rtol)
    report = ncfast.collapse(features, labels, pinv_rtol=pinv_rtol)
    assert reference["rank"] == report.rank == 9
    assert reference["nc1"] == pytest.approx(report.nc1, rel=1e-8)


@pytest.mark.parametrize("scales, rank, condition", [
    ((1.0, 10.0), 2, 100.0),             # eigenvalues 2 and 200 of the Gram
    ((1.0, 3.0, 1e3), 3, 1e6),
    ((1.0, 1e-6), 1, 1.0),               # 2e-12 of the largest: below pinv_rtol, cut
])
@pytest.mark.parametrize("num_features", [8, 4], ids=["classes_route", "features_route"])
def test_pinv_condition_of_a_known_spectrum(scales, rank, condition, num_features):
    """Classes in pairs at +a_j e_j and -a_j e_j: the means sum to 0 and the Gram of the
    centred means has eigenvalues 2 a_j^2 (and zeros), so its kept rank and condition
    number are known exactly."""
    pairs = len(scales)
    means = np.zeros((2 * pairs, num_features))
    for j, scale in enumerate(scales):
        means[2 * j, j], means[2 * j + 1, j] = scale, -scale
    labels = np.repeat(np.arange(2 * pairs), 3)
    report = ncfast.collapse(means[labels], labels)
    assert report.route == ("classes" if 2 * pairs <= num_features else "features")
    assert report.rank == rank
    assert report.pinv_condition == pytest.approx(condition, rel=1e-12)
    case = {"features": means[labels], "labels": labels}
    assert textbook_nc1_facts(case)["condition"] == pytest.approx(condition, rel=1e-12)


def _rows_around_the_radius(means, seed=0):
    """Rows of each class on the segment toward its nearest other mean, and in random
    directions, at fractions of the gap to it on both sides of ``NCC_RADIUS_FRACTION``
    and of one half (where the other mean becomes the nearer)."""
    rng = np.random.default_rng(seed)
    fraction = ncfast.geometry.NCC_RADIUS_FRACTION
    steps = [0.0, fraction * (1 - 1e-9), fraction * (1 + 1e-9), 0.4999, 0.5001, 0.7, 1.3]
    rows, labels = [], []
    for label, mean in enumerate(means):
        gaps = np.linalg.norm(means - mean, axis=1)
        gaps[label] = np.inf
        nearest = int(np.argmin(gaps))
        toward = means[nearest] - mean
        directions = [toward / gaps[nearest]] + list(rng.standard_normal((3, means.shape[1])))
        for direction in directions:
            direction = direction / np.linalg.norm(direction)
            rows += [mean + step * gaps[nearest] * direction for step in steps]
            labels += [label] * len(steps)
    return np.array(rows), np.array(labels)


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset"])
def test_nearest_centre_on_both_sides_of_the_radius(offset):
    """Rows inside the radius skip the search (their own mean is nearest); rows beyond it
    search every mean. Both must agree with the float64 nearest mean of every row."""
    rng = np.random.default_rng(3)
    means = rng.standard_normal((6, 20)) + offset
    means[1] = means[0] + 0.05 * rng.standard_normal(20)  # one close pair
    features, labels = _rows_around_the_radius(means)
    report = ncfast.collapse(features, labels, means=means)
    distances = ((features[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    nearest = distances.argmin(axis=1)
    expected = np.array([(nearest[labels == c] == c).mean() for c in range(6)])
    np.testing.assert_array_equal(report.class_ncc_accuracy, expected)
    assert 0 < expected.min() and expected.max() < 1  # both outcomes occur in every class


def test_gpu_scatter_in_the_eigenbasis_matches_the_host_pass():
    """``eigen_diagonal`` (how the GPU turns the D×D scatter of the residuals it sums on the
    "features" route into the NC1 state) gives the state the host pass accumulates in the
    eigenbasis of ``Sigma_B``."""
    case = gaussian_classes(num_rows=2000, num_features=8, num_classes=20, spread=0.3)
    sums = ncfast.ClassSums(20, 8)
    sums.update(case["features"], case["labels"])
    geometry = ncfast.Geometry.from_class_sums(sums.counts, sums.sums)
    host = ncfast.ResidualStats(geometry).update(case["features"], case["labels"])
    assert host.route == "features"
    residuals = case["features"].astype(np.float64) - geometry.means[case["labels"]]
    device_like = eigen_diagonal(residuals.T @ residuals, geometry.between_spectrum[1])
    scale = np.abs(device_like).max()
    np.testing.assert_allclose(host.eigen_scatter, device_like, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "offset"])
def test_classifier_prediction_on_both_sides_of_its_radius(offset):
    """Rows inside the classifier radius take their class mean's prediction without the
    classifier GEMM; the radius is a fraction of the Cauchy-Schwarz bound, at which the
    nearest rival logit catches up. Rows on both sides of both must match float64."""
    rng = np.random.default_rng(5)
    centred_means = rng.standard_normal((6, 20))
    means = centred_means + offset
    weights = centred_means + 0.3 * rng.standard_normal((6, 20))  # self-dual-ish
    bias = 0.1 * rng.standard_normal(6) - weights @ np.full(20, offset)
    fraction = ncfast.plan.CLASSIFIER_RADIUS_FRACTION
    steps = [0.0, fraction * (1 - 1e-9), fraction * (1 + 1e-9), 0.999, 1.001, 1.5]
    rows, labels = [], []
    for label, mean in enumerate(means):
        logits = weights @ mean + bias
        best = int(np.argmax(logits))
        assert best == label
        distances = np.linalg.norm(weights - weights[best], axis=1)
        distances[best] = 1.0
        ratios = (logits[best] - logits) / distances
        ratios[best] = np.inf
        rival = int(np.argmin(ratios))
        toward_rival = (weights[rival] - weights[best]) / distances[rival]
        for direction in [toward_rival] + list(rng.standard_normal((2, 20))):
            direction = direction / np.linalg.norm(direction)
            rows += [mean + step * ratios[rival] * direction for step in steps]
            labels += [label] * len(steps)
    features, labels = np.array(rows), np.array(labels)
    report = ncfast.collapse(features, labels, means=means, weights=weights, bias=bias)
    predictions = np.argmax(features @ weights.T + bias, axis=1)
    expected = np.array([(predictions[labels == c] == c).mean() for c in range(6)])
    np.testing.assert_array_equal(report.class_accuracy, expected)
    assert expected.max() < 1  # the rows past the bound go to the rival in every class


def test_zero_classifier_leaves_its_directions_undefined():
    """A zero-initialised last layer (epoch 0): the classifier's shape metrics are NaN,
    as in the textbook, its predictions are the first class everywhere, and nothing warns."""
    case = gaussian_classes(num_rows=300, num_features=8, num_classes=4)
    case["weights"] = np.zeros_like(case["weights"])
    case["bias"] = np.zeros_like(case["bias"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = ncfast.collapse(**case)
    for name in ("nc2_equinorm_w", "nc2_equiangular_w", "nc3", "nc3_etf", "unc3"):
        assert math.isnan(getattr(report, name)), name
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = textbook_collapse(**case)
    assert_matches_textbook(report, reference)
    assert report.accuracy == np.mean(case["labels"] == 0)


@pytest.mark.parametrize("scale", [1e-9, 1e9])
def test_features_at_the_ends_of_the_scale_range_match_textbook(scale):
    """Centred means up to 1e10 (or down to 1e-10) per feature are measured as at unit
    scale: float32 products stay far from overflow and underflow."""
    case = gaussian_classes(num_rows=400, num_features=8, num_classes=4, spread=0.3,
                            dtype=np.float64)
    case["features"] = case["features"] * scale
    case["bias"] = case["bias"] * scale
    report = ncfast.collapse(**case)
    assert_matches_textbook(report, textbook_collapse(**case))
    unit = ncfast.collapse(**{**case, "features": case["features"] / scale,
                              "bias": case["bias"] / scale})
    for name in ("nc1", "cdnv", "nc2_etf", "nc3", "ncc_accuracy", "accuracy"):
        assert getattr(report, name) == pytest.approx(getattr(unit, name), rel=1e-6), name
