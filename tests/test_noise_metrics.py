"""Label-noise metrics of ``ncfast.collapse`` against the float64 textbook route.

With ``clean_labels`` ncfast adds memorization, dilation, noise fit and the NC1
of the clean rows (DESIGN.md, label noise; Nguyen et al. 2023). Each must match
``ncfast.textbook.textbook_collapse`` to 1e-5 relative error (``noise_fit``, a
ratio of integer tallies, exactly) on noisy versions of the adversarial cases,
with and without a classifier, for noise the network resisted and noise it fit.
"""
import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import ncfast
from cases import ADVERSARIAL, gaussian_classes, with_label_noise
from ncfast.textbook import textbook_collapse
from test_metrics import (LINEAR_ZERO, RANDOM_CASE_SETTINGS, REFERENCE_RTOL,
                          analytic_zero_floors, assert_matches_textbook, decision_ties,
                          small_gaussian_cases, textbook_nc1_facts)

NOISE_METRICS = ("memorization", "memorization_raw", "dilation", "noise_fit", "nc1_clean",
                 "nc1_trace_clean")

#: Metrics defined only when some rows are corrupted.
CORRUPTION_METRICS = ("memorization", "memorization_raw", "noise_fit")


def _noisy_case(name, *, with_classifier, memorized=False, rate=0.2):
    case = gaussian_classes(**ADVERSARIAL[name], classifier=with_classifier)
    return with_label_noise(case, rate, memorized=memorized)


@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_resisted_noise_matches_textbook(name, with_classifier):
    case = _noisy_case(name, with_classifier=with_classifier)
    report = ncfast.collapse(**case)
    assert all(getattr(report, metric) is not None for metric in NOISE_METRICS)
    assert_matches_textbook(report, textbook_collapse(**case),
                            zero_floors=analytic_zero_floors(case))


def test_clean_means_are_centred_by_the_global_mean_option():
    """With imbalanced classes the samples' global mean is another centre: the clean
    geometry takes it too (it was the mean of the clean class means)."""
    case = with_label_noise(gaussian_classes(num_features=16, num_classes=4,
                                             class_counts=[30, 60, 300, 1200],
                                             classifier=False), rate=0.2)
    report = ncfast.collapse(**case, global_mean="samples")
    reference = textbook_collapse(**case, global_mean="samples")
    for name in ("nc1_clean", "nc1_trace_clean", "memorization", "dilation"):
        assert getattr(report, name) == pytest.approx(reference[name], rel=1e-6), name


@RANDOM_CASE_SETTINGS
@given(parameters=small_gaussian_cases(), rate=st.sampled_from([0.1, 0.3]),
       memorized=st.booleans(), noise_seed=st.integers(0, 2**32 - 1))
# Found by the nightly run: flips leave three classes whose means lie 1.1e-4 to 3.5e-4
# apart near norm 8, so CDNV's pair distances cancel (``metric_rtol``).
@example(parameters={"num_rows": 6, "num_features": 7, "num_classes": 6, "spread": 1e-4,
                     "offset": 0.0, "classifier": False, "dtype": np.float32, "seed": 583,
                     "class_counts": [0, 2, 27, 30, 0, 33]},
         rate=0.1, memorized=False, noise_seed=0)
# Found by the nightly run: one clean row in each class, so the clean residuals are 0,
# and ncfast's clean means (sums of rows shifted by one of them) round by float64 eps
# (``textbook_nc1_facts``): nc1_clean 2.8e-32 against 0.
@example(parameters={"num_rows": 4, "num_features": 1, "num_classes": 2, "spread": 0.3,
                     "offset": 0.0, "classifier": False, "dtype": np.float64, "seed": 0},
         rate=0.1, memorized=False, noise_seed=7157)
def test_random_small_noisy_cases_match_textbook(parameters, rate, memorized, noise_seed):
    case = with_label_noise(gaussian_classes(**parameters), rate, noise_seed,
                            memorized=memorized)
    clean_rows = case["labels"] == case["clean_labels"]
    assume(np.unique(case["labels"][clean_rows]).size >= 2)
    features = case["features"].astype(np.float64)
    noisy_means = np.array([features[case["labels"] == c].mean(axis=0)
                            for c in np.unique(case["labels"])])
    if (noisy_means == noisy_means[0]).all():
        # Flips can leave every noisy class with the same rows (found by the nightly run:
        # 8 rows of 2 classes at D = 1, 2 of each true class in each noisy class).
        with pytest.raises(ValueError, match="class means coincide"):
            ncfast.collapse(**case, empty_classes="ignore")
        return
    report = ncfast.collapse(**case, empty_classes="ignore")
    zero_floors = analytic_zero_floors(case)
    if np.bincount(case["labels"][clean_rows]).max() <= 2:
        # One or two clean rows per class: every distance spread is 0, which
        # ncfast's additive sums give to sqrt(eps) (see the two-row test below).
        zero_floors["dilation"] = 4 * np.sqrt(np.finfo(float).eps)
    assert_matches_textbook(report, textbook_collapse(**case), zero_floors=zero_floors,
                            facts=textbook_nc1_facts(case), ties=decision_ties(case, report))


@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
@pytest.mark.parametrize("name", ["gaussian", "tiny_spread_1e-4", "imbalanced_1_to_100",
                                  "classes_exceed_features"])
def test_memorized_noise_matches_textbook(name, with_classifier):
    case = _noisy_case(name, with_classifier=with_classifier, memorized=True)
    report = ncfast.collapse(**case)
    reference = textbook_collapse(**case)
    assert_matches_textbook(report, reference, zero_floors=analytic_zero_floors(case))
    # Corrupted rows sit with their noisy class: the noise is fit and memorized.
    assert reference["noise_fit"] > 0.5
    assert reference["memorization"] > 0.3


def test_noise_fit_uses_classifier_when_given_else_nearest_centre():
    """On ReLU features the classifier fits noisy labels that the NCC rule does not."""
    case = _noisy_case("relu_offset_1e3", with_classifier=True)
    without_classifier = {key: value for key, value in case.items()
                          if key not in ("weights", "bias")}
    by_classifier = textbook_collapse(**case)["noise_fit"]
    by_centres = textbook_collapse(**without_classifier)["noise_fit"]
    assert by_classifier > by_centres
    assert ncfast.collapse(**case).noise_fit == by_classifier
    assert ncfast.collapse(**without_classifier).noise_fit == by_centres


@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
@pytest.mark.parametrize("name", ["gaussian", "classes_exceed_features"])
def test_no_corrupted_rows(name, with_classifier):
    case = _noisy_case(name, with_classifier=with_classifier, rate=0.0)
    np.testing.assert_array_equal(case["labels"], case["clean_labels"])
    report = ncfast.collapse(**case)
    for metric in CORRUPTION_METRICS:
        assert getattr(report, metric) is None, metric
    assert_matches_textbook(report, textbook_collapse(**case))
    # Every row is clean, so the clean rows' NC1 is the NC1: to float64 rounding for
    # the trace form, to the fp32 GEMM's for nc1 (it multiplies the clean rows by M~
    # alone but all rows by [M~ | W], so its rounding differs).
    assert report.nc1_clean == pytest.approx(report.nc1, rel=REFERENCE_RTOL)
    assert report.nc1_trace_clean == pytest.approx(report.nc1_trace, rel=1e-10)


def _single_row_class_relabelled(case):
    """``case`` with the single row of class 0 relabelled 2: class 0 has no clean rows.

    That row is corrupted and its true class has no clean mean, so it counts
    in ``noise_fit`` but not in ``memorization``.
    """
    labels = case["labels"].copy()
    labels[labels == 0] = 2
    clean_labels = case.get("clean_labels", case["labels"])
    return {**case, "labels": labels, "clean_labels": clean_labels}


@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
def test_corrupted_rows_of_a_class_without_clean_rows(with_classifier):
    case = _single_row_class_relabelled(
        _noisy_case("single_row_classes", with_classifier=with_classifier))
    assert not np.any((case["clean_labels"] == 0) & (case["labels"] == 0))
    corrupted = case["labels"] != case["clean_labels"]
    has_clean_rows = np.bincount(case["clean_labels"][~corrupted], minlength=6) > 0
    left_out = int(np.sum(corrupted & ~has_clean_rows[case["clean_labels"]]))
    assert left_out > 0
    with pytest.warns(UserWarning) as caught:
        report = ncfast.collapse(**case)
    messages = [str(warning.message) for warning in caught]
    assert any("1 of 6 classes have no rows (0)" in message for message in messages)
    assert f"memorization leaves out {left_out} of {corrupted.sum()} corrupted rows: their " \
           "true classes have no clean rows" in "\n".join(messages)
    assert_matches_textbook(report, textbook_collapse(**case))


@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
def test_noise_fit_defined_when_no_corrupted_row_is_measurable(with_classifier):
    """The only corrupted row has no clean mean: no memorization, but a noise fit."""
    case = _single_row_class_relabelled(
        gaussian_classes(**ADVERSARIAL["single_row_classes"], classifier=with_classifier))
    assert np.sum(case["labels"] != case["clean_labels"]) == 1
    with pytest.warns(UserWarning, match=r"1 of 6 classes have no rows \(0\)"), \
            pytest.warns(UserWarning, match="memorization leaves out 1 of 1 corrupted rows"):
        report = ncfast.collapse(**case)
    reference = textbook_collapse(**case)
    assert "memorization" not in reference and "noise_fit" in reference
    assert_matches_textbook(report, reference)


def test_dilation_of_two_row_classes_is_zero():
    """Two clean rows sit at equal distances from their mean: every spread is 0.

    ncfast keeps sums of d and d^2 so that pass-2 states stay additive; the
    variance E[d^2] - E[d]^2 then cancels to about eps * E[d]^2, so the std is 0
    only to sqrt(eps) of the distances (README, "Metrics"). The textbook, which
    holds every distance, gets 0 to rounding.
    """
    case = with_label_noise(gaussian_classes(num_rows=14, num_features=11, num_classes=7,
                                             offset=1e3, seed=99), 0.3, 99)
    clean_rows = case["labels"] == case["clean_labels"]
    assert np.bincount(case["labels"][clean_rows]).max() == 2
    assert abs(textbook_collapse(**case)["dilation"]) <= LINEAR_ZERO
    assert abs(ncfast.collapse(**case).dilation) <= 4 * np.sqrt(np.finfo(float).eps)


def test_clean_rows_of_one_class_are_refused():
    features = np.array([[0.0, 1.0], [0.0, 1.2], [2.0, 0.0], [2.2, 0.0]])
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(ValueError, match="clean rows"):
        ncfast.collapse(features, labels, clean_labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="clean rows"):
        textbook_collapse(features, labels, clean_labels=np.zeros(4, np.int64))
