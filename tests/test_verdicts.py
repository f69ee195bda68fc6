"""The two-standard-error rule: spreads over seeds, comparisons, tolerances, slopes."""
import math

import numpy as np
import pytest
from scipy.stats import linregress

from ncfast.harness.verdicts import (CONTRADICTED, HELD, UNDECIDED, Spread, below, combine,
                                     compare, fit_line, tally)


def test_spread_is_mean_and_sample_std_of_the_finite_values():
    spread = Spread.of([1.0, None, 2.0, math.nan, 4.0])
    assert spread.count == 3
    assert spread.mean == pytest.approx(7 / 3)
    assert spread.std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert spread.standard_error == pytest.approx(spread.std / math.sqrt(3))
    assert spread.left_out == 2
    assert str(spread) == f"{7 / 3:.4g} ± {spread.std:.2g} (3 of 5 seeds finite)"
    assert str(Spread.of([1.0, 2.0, 4.0])) == f"{7 / 3:.4g} ± {spread.std:.2g}"


def test_one_value_has_no_spread_and_nothing_has_no_mean():
    one, none = Spread.of([0.5]), Spread.of([None, math.nan])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.standard_error)
    assert str(one) == "0.5"
    assert none.count == 0 and math.isnan(none.mean) and str(none) == "-"


def test_comparison_is_the_difference_of_means_against_two_standard_errors():
    low, high = Spread.of([1.0, 2.0, 3.0]), Spread.of([5.0, 6.0, 7.0])
    comparison = compare(low, high, claimed="lower")
    assert comparison.difference == pytest.approx(-4.0)
    assert comparison.standard_error == pytest.approx(math.sqrt(1 / 3 + 1 / 3))
    assert comparison.verdict == HELD
    assert compare(low, high, claimed="higher").verdict == CONTRADICTED
    assert compare(high, low, claimed="higher").verdict == HELD


def test_a_difference_within_two_standard_errors_is_undecided():
    # difference -1, standard error sqrt(1/3 + 0.25/3) = 0.645: 2 SE = 1.29 > 1
    a, b = Spread.of([1.0, 2.0, 3.0]), Spread.of([2.5, 3.0, 3.5])
    assert compare(a, b, claimed="lower").verdict == UNDECIDED
    assert compare(a, b, claimed="higher").verdict == UNDECIDED
    # just beyond: with 12 seeds the same spreads make the same difference count
    a12 = Spread(a.mean, a.std, 12)
    b12 = Spread(b.mean, b.std, 12)
    assert compare(a12, b12, claimed="lower").verdict == HELD


def test_one_seed_a_side_never_decides():
    assert compare(Spread.of([0.0]), Spread.of([100.0]), claimed="lower").verdict == UNDECIDED
    assert below(Spread.of([0.0]), 1.0).verdict == UNDECIDED


def test_constant_seeds_decide_on_any_difference_and_equal_ones_do_not():
    assert compare(Spread.of([0.0, 0.0]), Spread.of([0.1, 0.1]),
                   claimed="lower").verdict == HELD
    assert compare(Spread.of([0.0, 0.0]), Spread.of([0.0, 0.0]),
                   claimed="lower").verdict == UNDECIDED


def test_claimed_direction_is_checked():
    with pytest.raises(ValueError, match="claimed must be 'lower' or 'higher'"):
        compare(Spread.of([1.0, 2.0]), Spread.of([1.0, 2.0]), claimed="smaller")


def test_tolerance_check_uses_the_standard_error_of_the_mean():
    assert below(Spread.of([0.010, 0.012, 0.011]), 0.05).verdict == HELD
    assert below(Spread.of([0.060, 0.070, 0.065]), 0.05).verdict == CONTRADICTED
    near = Spread.of([0.03, 0.07])  # mean 0.05 ± 0.028
    assert below(near, 0.05).verdict == UNDECIDED
    assert below(near, 0.05).difference == pytest.approx(0.0, abs=1e-15)


def test_line_fit_matches_scipy_and_decides_the_sign_of_the_slope():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 20)
    for slope, verdict in ((2.0, HELD), (-2.0, CONTRADICTED)):
        y = 0.5 + slope * x + rng.normal(0, 0.1, 20)
        line, reference = fit_line(x, y), linregress(x, y)
        assert line.slope == pytest.approx(reference.slope, rel=1e-12)
        assert line.intercept == pytest.approx(reference.intercept, rel=1e-12)
        assert line.slope_error == pytest.approx(reference.stderr, rel=1e-10)
        assert line.count == 20 and line.comparison.verdict == verdict
    flat = fit_line([0.0, 1.0, 2.0, 3.0], [1.0, -1.0, -1.0, 1.0])
    assert flat.slope == 0.0 and flat.comparison.verdict == UNDECIDED


def test_line_fit_leaves_out_missing_points_and_needs_three():
    line = fit_line([0.0, 1.0, None, 2.0, 3.0], [0.0, 1.1, 5.0, 1.9, math.nan])
    assert line.count == 3
    short = fit_line([0.0, 1.0], [0.0, 1.0])
    assert short.count == 2 and math.isnan(short.slope)
    assert short.comparison.verdict == UNDECIDED
    assert fit_line([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]).comparison.verdict == UNDECIDED


@pytest.mark.parametrize("verdicts, expected", [
    ([], UNDECIDED), ([HELD], HELD), ([HELD, HELD], HELD), ([HELD, UNDECIDED], UNDECIDED),
    ([HELD, CONTRADICTED], CONTRADICTED), ([UNDECIDED, CONTRADICTED], CONTRADICTED)])
def test_a_statement_holds_when_every_comparison_holds(verdicts, expected):
    assert combine(verdicts) == expected


def test_tally_counts_each_verdict():
    assert tally([HELD, HELD, UNDECIDED, CONTRADICTED]) == \
        "2 held, 1 contradicted, 1 undecided of 4"


@pytest.mark.parametrize("missing", [None, math.nan, math.inf, -math.inf])
def test_a_seed_without_a_finite_value_leaves_the_comparison_undecided(missing):
    # The rule's mean is over all K seeds: with one not finite it is not finite either, so
    # the comparison is not decided from the other seeds (which alone would hold).
    short, full = Spread.of([1.0, 1.01, missing]), Spread.of([2.0, 2.01, 2.02])
    assert short.count == 2 and short.left_out == 1
    for a, b, claimed in ((short, full, "lower"), (full, short, "higher")):
        comparison = compare(a, b, claimed=claimed)
        assert comparison.verdict == UNDECIDED and comparison.left_out == 1
        assert str(comparison).endswith("; 1 seed value not finite): undecided")
    assert below(short, 5.0).verdict == UNDECIDED
    assert below(Spread.of([1.0, 1.01, 1.02]), 5.0).verdict == HELD


@pytest.mark.parametrize("difference, standard_error, verdict", [
    (0.0996, 0.04975, CONTRADICTED),  # beyond 2 SE = 0.0995: once shown as "2 SE 0.1"
    (-0.0996, 0.04975, HELD),
    (0.0951, 0.0477, UNDECIDED)])  # within 2 SE = 0.0954: once shown as "2 SE 0.095"
def test_a_shown_comparison_never_contradicts_its_verdict(difference, standard_error, verdict):
    comparison = compare(Spread(difference, standard_error * math.sqrt(2), 2),
                         Spread(0.0, 0.0, 2), claimed="lower")
    assert comparison.verdict == verdict
    shown, bound = str(comparison).split(": ")[0].split(" (2 SE ")
    shown, bound = abs(float(shown)), float(bound.rstrip(")"))
    assert (shown > bound) if verdict != UNDECIDED else (shown <= bound), str(comparison)
