"""Shared fixtures: comparing two reports field by field."""
import dataclasses
import math
import os
import signal

import numpy as np
import pytest
from hypothesis import settings


# Every run but the nightly one draws the same examples, so that a red run is reproducible
# and `make test` on a fresh clone (no example database) passes or fails as CI did: a clean
# clone's CI run once drew fresh examples and found a tolerance the tests lacked.
settings.register_profile("fixed", derandomize=True, print_blob=True)
# The nightly job (NCFAST_NIGHTLY=1) draws fresh examples, 40 times as many (``examples``).
settings.register_profile("nightly", print_blob=True)
NIGHTLY = bool(os.environ.get("NCFAST_NIGHTLY"))
settings.load_profile("nightly" if NIGHTLY else "fixed")

#: How many more examples each property test draws in the nightly job.
NIGHTLY_FACTOR = 40


def examples(count):
    """A property test's example count: ``count``, or ``NIGHTLY_FACTOR`` times it at night."""
    return count * NIGHTLY_FACTOR if NIGHTLY else count

#: Two analyses of the same rows agree to this relative error (issue 2).
RELATIVE_TOLERANCE = 1e-10

#: Values both this small are zero up to rounding (e.g. the NC2 metrics of two
#: classes, which vanish exactly in theory) and are not compared relatively.
ROUNDING_ZERO = 1e-12


#: Fields that go through the pseudo-inverse: float64 rounding in the sums
#: (which changes with chunking and merge order) is amplified up to the
#: condition number of the kept spectrum, so their tolerance grows with it.
CONDITIONED_FIELDS = ("nc1", "pinv_condition")
CONDITIONED_RTOL = 1e-15

#: NC1 goes through float32 residuals and products: when the float64 means differ
#: in their last bit (another summation order), a residual's float32 rounding can
#: flip, and BLAS rounds a row's product by its place in a block (OpenBLAS: rows in
#: groups of 6, from 8 columns), which another chunking or row order moves; the
#: pseudo-inverse magnifies that one float32 ulp up to the condition number. So
#: nc1 and nc1_clean are compared to ``float32 eps × condition`` (the report's
#: condition stands in for the clean rows'). Found by hypothesis: 15
#: rows, 7 classes, a kept eigenvalue ratio of 7e-9, nc1 differing by 5e-6
#: between row orders; and, in the nightly run, nc1_clean of 53 rows differing
#: by 2e-9 between thread counts at a condition of a few.
FLOAT32_FLIP_FIELDS = ("nc1", "nc1_clean")


def geometry_rtol(report):
    """Rounding allowed in every float field, from how close two class means come.

    Centring subtracts means of norm up to ``|mu|`` and the metrics take pair
    distances and angles from Gram entries (``||a - b||^2 = ||a||^2 + ||b||^2 -
    2 a.b``, ``||u_a - u_b||^2 = 2 - 2 cos``): both cancel when two class means
    nearly coincide, by float64 eps times (the largest mean norm, centred or not,
    over the smallest gap between means) squared. It is also the floor below which
    values count as zero. Found by the nightly run: a class holding only rows
    flipped from another, 3e-3 from it (norms near 8), whose cdnv and gnc2 moved by
    4e-10 and 2e-10 between row orders; two means 1.5e-4 apart near 1.66, whose
    nc2_equinorm and nc2_etf (0 analytically) came out as 0 or 2e-12.
    """
    means = report.means[report.present_classes]
    smallest_gap = pair_gaps(means).min()
    largest_norm = max(np.linalg.norm(means, axis=1).max(), np.nanmax(report.class_mean_norms))
    return 4.0 * float(np.finfo(np.float64).eps) * (largest_norm / smallest_gap) ** 2


def smallest_unit_gap(report):
    """Smallest positive distance between two unit centred means (inf if none): where the
    log and Riesz kernels are largest and most sensitive. Means that share a direction
    exactly (every pair but opposite ones at D = 1) are left out: their kernels are
    infinite either way."""
    units = centred_means(report)
    norms = np.linalg.norm(units, axis=1, keepdims=True)
    units = units[norms[:, 0] > 0] / norms[norms[:, 0] > 0]  # a mean at mu_G has no direction
    gaps = pair_gaps(units)
    gaps = gaps[gaps > 0]
    return gaps.min() if gaps.size else np.inf


def pair_gaps(vectors):
    """Distances between every two different rows of ``vectors`` (k, D), as a flat array."""
    gaps = np.sqrt(((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2))
    return gaps[~np.eye(len(vectors), dtype=bool)]


def kernel_amplification(name, report):
    """How much a kernel metric magnifies the relative rounding of a squared distance
    between unit centred means; None for the other metrics.

    The kernels of the distance d between unit centred means (Liu et al. 2023):
    ``-1/2 log d^2`` takes a relative error of d^2 once (its variance twice),
    ``d^-s`` (s = D - 2) |s|/2 times (its variance |s| times).
    """
    exponent = abs(report.num_features - 2)
    return {"gnc2": 1.0, "log_kernel_variance": 2.0, "riesz_kernel_mean": exponent / 2,
            "riesz_kernel_variance": exponent}.get(name)


def kernel_rtol(name, report):
    """Rounding allowed in a kernel metric between two analyses of the same rows (0 for
    the other metrics).

    Means off by float64 eps times the largest mean norm R move the unit centred
    means by eps R / m (m the smallest centred norm), and a squared distance d^2
    between them by ``2 eps R / (m d)`` relatively; forming ``2 - 2 cos`` from a
    Gram entry, a dot product of D terms whose rounding grows about as ``sqrt(D)
    eps``, adds ``sqrt(D) eps / d^2``. Found by the nightly run: 12 rows, D = 48, two
    means 0.01 apart near 24 (unit distance 6.4e-4, Riesz kernel mean 8.9e145), which
    moved by 1.3e-8 between chunk sizes; three means of 23 rows with label noise,
    gnc2 and the log kernel's variance 1.5e-10 and 3.4e-10 apart between chunk
    orders; 30 rows, D = 53, label noise, unit distance 2.0e-3, whose Riesz kernel
    variance (2.8e274) moved by up to 2.5e-8 over 300 row orders, twice what
    ``eps / d^2`` allowed.
    """
    amplification = kernel_amplification(name, report)
    if amplification is None:
        return 0.0
    gap = smallest_unit_gap(report)
    present_norms = report.class_mean_norms[report.present_classes]
    positions = (np.linalg.norm(report.means[report.present_classes], axis=1).max()
                 / present_norms[present_norms > 0].min())
    return amplification * 4.0 * float(np.finfo(np.float64).eps) * (
        1 + 2 * positions / gap + math.sqrt(report.num_features) * gap ** -2)


#: Each kernel mean and the variance of its terms over the pairs.
KERNEL_MEAN_VARIANCES = {"gnc2": "log_kernel_variance",
                         "riesz_kernel_mean": "riesz_kernel_variance"}


def cancellation(name, report):
    """How many times a kernel mean is smaller than the root mean square of its terms
    (1 for the other metrics, and at least 1).

    The log kernel takes either sign, so its mean over the pairs may cancel far below
    its terms, and it then carries their rounding, not a rounding of its own size.
    Found by hypothesis on a clean clone's CI run: 24 rows, 4 classes with label noise,
    a log-kernel mean of -6.7e-6 over terms of about 1, which moved by 1.3e-15 (2e-10
    of itself) between chunk orders.
    """
    variance_name = KERNEL_MEAN_VARIANCES.get(name)
    mean = getattr(report, name, None)
    variance = None if variance_name is None else getattr(report, variance_name)
    if mean is None or variance is None or mean == 0 or not np.isfinite([mean, variance]).all():
        return 1.0
    return max(1.0, math.sqrt(max(variance, 0.0) + mean * mean) / abs(mean))


def centred_means(report):
    """``mu_c - mu_G`` of the classes with a mean, as the report's ``global_mean`` centres them."""
    means = report.means[report.present_classes]
    if report.global_mean == "samples":
        counts = report.class_counts if report.mean_counts is None else report.mean_counts
        weights = np.asarray(counts, np.float64)[report.present_classes]
        return means - weights @ means / weights.sum()
    return means - means.mean(axis=0)


def _value_mismatch(name, actual, expected, rtol, zero=ROUNDING_ZERO):
    """Describe how ``actual`` differs from ``expected``, or return None when they agree.

    Values both within ``zero`` of zero agree.
    """
    if actual is None or expected is None:
        return None if actual is expected else f"{name}: {actual!r} != {expected!r}"
    if isinstance(expected, (str, int, np.integer)):
        return None if actual == expected else f"{name}: {actual!r} != {expected!r}"
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return f"{name}: shape {actual.shape} != {expected.shape}"
    if np.issubdtype(expected.dtype, np.integer):
        return None if np.array_equal(actual, expected) else f"{name}: {actual} != {expected}"
    actual_nan, expected_nan = np.isnan(actual), np.isnan(expected)
    if not np.array_equal(actual_nan, expected_nan):
        return f"{name}: NaN at different places: {actual} vs {expected}"
    differ = ~expected_nan & (actual != expected)  # equal values (infinities too) agree
    differ &= (np.abs(actual) > zero) | (np.abs(expected) > zero)
    actual, expected = actual[differ], expected[differ]
    error = np.abs(actual - expected)
    if (np.isfinite(expected) & (error <= rtol * np.abs(expected))).all():
        return None
    worst = float(np.max(error / np.maximum(np.abs(expected), math.ulp(0.0))))
    return (f"{name}: relative error {worst:.3g} > {rtol:g} "
            f"({actual.tolist()} vs {expected.tolist()})")


def report_mismatches(actual, expected, rtol=RELATIVE_TOLERANCE):
    """Every field of two ``CollapseReport``s that differs beyond ``rtol`` relative.

    Integer and string fields must be equal; float fields and arrays must agree
    to ``rtol`` relative error (``CONDITIONED_FIELDS``: at least
    ``CONDITIONED_RTOL`` times the pseudo-inverse's condition number;
    ``FLOAT32_FLIP_FIELDS`` at least float32 eps times it; the kernels' fields
    ``kernel_rtol``, their means times ``cancellation``; every field at least
    ``geometry_rtol``), with NaN in the same places; values that are both within
    ``ROUNDING_ZERO`` (or ``geometry_rtol``) of zero agree.

    Returns
    -------
    list of str
        One line per differing field; empty when the reports agree.
    """
    mismatches = []
    geometry_floor = geometry_rtol(expected)
    for item in dataclasses.fields(expected):
        field_rtol = max(rtol, geometry_floor)
        if item.name in CONDITIONED_FIELDS:
            field_rtol = max(field_rtol, CONDITIONED_RTOL * expected.pinv_condition)
        field_rtol = max(field_rtol, kernel_rtol(item.name, expected))
        field_rtol *= cancellation(item.name, expected)
        if item.name in FLOAT32_FLIP_FIELDS:
            field_rtol = max(field_rtol, float(np.finfo(np.float32).eps) * expected.pinv_condition)
        mismatch = _value_mismatch(item.name, getattr(actual, item.name),
                                   getattr(expected, item.name), field_rtol,
                                   max(ROUNDING_ZERO, geometry_floor))
        if mismatch is not None:
            mismatches.append(mismatch)
    return mismatches


@pytest.fixture(scope="session")
def assert_same_report():
    """``check(actual, expected, rtol=1e-10)``: assert two reports agree field by field."""

    def check(actual, expected, rtol=RELATIVE_TOLERANCE):
        mismatches = report_mismatches(actual, expected, rtol)
        assert not mismatches, "reports differ:\n" + "\n".join(mismatches)

    return check


@pytest.fixture
def short_cheap_tasks(monkeypatch):
    """Tasks of pass 1 in row order and of the narrow kernel as short as pass 2's BLAS
    tasks (``cpu.task_rows``), so that test-sized cases span several of them."""
    from ncfast.kernels import cpu
    monkeypatch.setattr(cpu, "CHEAP_TASK_BYTES", 0)
    return cpu


@pytest.fixture
def fail_instead_of_hanging():
    """Turn a call blocked for 10 s (opening a named pipe) into a failure."""
    def interrupt(*_):
        raise TimeoutError("blocked for 10 s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
