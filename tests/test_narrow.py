"""Pass 2 without BLAS for few classes (``ncfast.kernels.narrow``) against the BLAS route.

``ResidualStats.update`` sends the "classes" route to ``narrow.narrow_chunk``
for few columns and wide rows (``accumulators.runs_narrow_kernel``), else to
``cpu.residual_chunk`` (BLAS). The ``pass2_kernel`` fixture runs a test on one
of them whatever the shape: both must match the float64 textbook, agree with
each other to float32 rounding, not depend on the chunking, the thread count or
the row order, and report bad rows alike.
"""
import numpy as np
import pytest
from hypothesis import given

import ncfast
from cases import ADVERSARIAL, gaussian_classes, with_label_noise
from ncfast import accumulators
from ncfast.kernels import cpu, narrow
from ncfast.textbook import textbook_collapse
from test_metrics import (RANDOM_CASE_SETTINGS, REFERENCE_RTOL, analytic_zero_floors,
                          assert_matches_textbook, small_gaussian_cases, textbook_nc1_facts)
from test_properties import numba_threads

#: The adversarial cases on the "classes" route (C' <= D), where the two kernels differ.
CLASSES_ROUTE_CASES = [name for name in ADVERSARIAL if "classes_exceed_features" not in name]

#: ``NARROW_LIMITS`` that send every "classes" route pass 2 to each kernel.
KERNEL_LIMITS = {"narrow": ((0, 1 << 30),), "blas": ()}


def use_kernel(monkeypatch, kernel):
    monkeypatch.setattr(accumulators, "NARROW_LIMITS", KERNEL_LIMITS[kernel])


@pytest.fixture(params=list(KERNEL_LIMITS))
def pass2_kernel(request, monkeypatch):
    """Run the test with the "classes" route's pass 2 on one kernel (its name)."""
    use_kernel(monkeypatch, request.param)
    return request.param


def reports_of_both_kernels(monkeypatch, case, **options):
    """``ncfast.collapse`` of a case with each kernel: ``{kernel: report}``."""
    reports = {}
    for kernel in KERNEL_LIMITS:
        use_kernel(monkeypatch, kernel)
        reports[kernel] = ncfast.collapse(**case, **options)
    return reports


def noisy(case, noise):
    """The case with label noise the network resisted or fit, or as it is."""
    if noise is None:
        return case
    return with_label_noise(case, 0.2, memorized=noise == "memorized")


@pytest.mark.parametrize("noise", [None, "resisted", "memorized"])
@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
@pytest.mark.parametrize("name", CLASSES_ROUTE_CASES)
def test_both_kernels_match_textbook_and_each_other(monkeypatch, assert_same_report, name,
                                                    with_classifier, noise):
    case = noisy(gaussian_classes(**ADVERSARIAL[name], classifier=with_classifier), noise)
    reports = reports_of_both_kernels(monkeypatch, case)
    reference = textbook_collapse(**case)
    facts = textbook_nc1_facts(case) if noise is None else None
    for report in reports.values():
        assert report.route == "classes"
        assert_matches_textbook(report, reference, zero_floors=analytic_zero_floors(case),
                                facts=facts)
    assert_same_report(reports["narrow"], reports["blas"], rtol=REFERENCE_RTOL)


@RANDOM_CASE_SETTINGS
@given(parameters=small_gaussian_cases())
def test_random_small_cases_match_on_both_kernels(parameters):
    case = gaussian_classes(**parameters)
    reference = textbook_collapse(**case)
    with pytest.MonkeyPatch.context() as monkeypatch:
        reports = reports_of_both_kernels(monkeypatch, case, empty_classes="ignore")
    for report in reports.values():
        assert_matches_textbook(report, reference, zero_floors=analytic_zero_floors(case),
                                facts=textbook_nc1_facts(case))


@pytest.mark.parametrize("num_features", [37, 512])
@pytest.mark.parametrize("with_classifier", [False, True], ids=["ncc", "classifier"])
def test_rows_on_both_sides_of_the_radii_and_wide_rows(monkeypatch, assert_same_report,
                                                       num_features, with_classifier):
    """Blocks where every row, some rows or no row lies beyond the NCC and classifier
    radii, with D not a multiple of the vector width, and the 512 features of the
    issue; empty and imbalanced classes."""
    case = gaussian_classes(num_features=num_features, num_classes=10,
                            class_counts=[300, 0, 40, 1, 200, 250, 0, 90, 120, 60],
                            classifier=with_classifier)
    labels = case["labels"]
    means = np.stack([case["features"][labels == c].mean(axis=0) if (labels == c).any()
                      else np.zeros(num_features) for c in range(10)])
    present = means[np.unique(labels)]
    gaps = np.linalg.norm(present[:, None] - present[None], axis=2)
    nearest_gap = gaps[gaps > 0].min()
    # Runs of collapsed rows (inside both radii) between runs of rows spread so far
    # that some are nearer another mean.
    scale = np.where((np.arange(len(labels)) // 50) % 3 == 0, 1e-3, 0.4) * nearest_gap
    noise = np.random.default_rng(7).standard_normal(case["features"].shape)
    case["features"] = (means[labels] + scale[:, None] * noise).astype(np.float32)
    reports = reports_of_both_kernels(monkeypatch, case, empty_classes="ignore")
    reference = textbook_collapse(**case)
    for report in reports.values():
        assert_matches_textbook(report, reference, facts=textbook_nc1_facts(case))
    assert_same_report(reports["narrow"], reports["blas"], rtol=REFERENCE_RTOL)
    assert 0.5 < reports["narrow"].ncc_accuracy < 1.0  # both outcomes occur


def _default_kernel_cases():
    """For each default ``(fewest features, most columns)``: the most classes with a
    classifier it admits (narrow), one class more and one feature fewer (BLAS: no other
    default pair admits them)."""
    cases = []
    for features, columns in accumulators.NARROW_LIMITS:
        cases += [(columns // 2, features, "narrow_chunk"),
                  (columns // 2 + 1, features, "residual_chunk"),
                  (columns // 2, features - 1, "residual_chunk")]
    return cases


@pytest.mark.parametrize("num_classes, num_features, kernel", _default_kernel_cases())
def test_the_default_sends_few_columns_of_wide_rows_to_the_narrow_kernel(
        monkeypatch, num_classes, num_features, kernel):
    calls = []
    for module, name in ((narrow, "narrow_chunk"), (cpu, "residual_chunk")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, original=original, name=name:
                            calls.append(name) or original(*args))
    ncfast.collapse(**gaussian_classes(num_rows=200, num_features=num_features,
                                       num_classes=num_classes))
    assert calls == [kernel]


# --- the product --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, group", [(narrow.products_four_rows, 4),
                                           (narrow.products_two_rows, 2)])
@pytest.mark.parametrize("num_columns", [
    narrow.COLUMN_PAIR, 2 * narrow.COLUMN_GROUP + narrow.COLUMN_PAIR, 3 * narrow.COLUMN_GROUP])
@pytest.mark.parametrize("length", [1, 8, 37, 512])
def test_block_products_are_float32_products_and_the_same_in_any_place_of_a_group(
        length, num_columns, kernel, group):
    """Both kernels (whichever this core uses): whole groups of columns and a last pair;
    each row moved to the next place of its group of rows (or the next group) gives the
    same products."""
    rng = np.random.default_rng(length)
    rows = rng.standard_normal((narrow.TILE_ROWS, length)).astype(np.float32)
    columns = rng.standard_normal((num_columns, length)).astype(np.float32)
    out = np.empty((narrow.TILE_ROWS, columns.shape[0]), np.float32)
    nothing_next = np.empty((0, length), np.float32)
    kernel(rows, columns, out, nothing_next)
    exact = rows.astype(np.float64) @ columns.T.astype(np.float64)
    scale = np.abs(rows).astype(np.float64) @ np.abs(columns).T.astype(np.float64)
    assert (np.abs(out - exact) <= length * np.finfo(np.float32).eps * scale).all()
    shifted = np.empty_like(out)
    kernel(np.roll(rows, 1, axis=0), columns, shifted, nothing_next)
    np.testing.assert_array_equal(np.roll(shifted, -1, axis=0), out)
    # A tile of one group of rows gives each of them what the whole tile gave.
    alone = np.empty((group, columns.shape[0]), np.float32)
    kernel(rows[group:2 * group].copy(), columns, alone, nothing_next)
    np.testing.assert_array_equal(alone, out[group:2 * group])
    # Prefetching the next rows (float32 or float64, strided or not) changes nothing.
    upcoming = rng.standard_normal((narrow.TILE_ROWS, length))
    for next_rows in (upcoming, upcoming.astype(np.float32), upcoming[::2]):
        prefetched = np.empty_like(out)
        kernel(rows, columns, prefetched, next_rows)
        np.testing.assert_array_equal(prefetched, out)


def test_the_row_group_follows_the_vector_registers_numba_compiles_for(monkeypatch):
    """Four rows a sweep where Numba compiles for AVX-512, two otherwise; NUMBA_CPU_FEATURES
    (what Numba targets when set) decides over the host's features."""
    assert narrow.ROW_GROUP == (4 if narrow.compiles_for_avx512() else 2)
    assert narrow.block_products is (narrow.products_four_rows if narrow.ROW_GROUP == 4
                                     else narrow.products_two_rows)
    assert narrow.TILE_ROWS % narrow.ROW_GROUP == 0
    monkeypatch.setattr(narrow.config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512vl")
    assert narrow.compiles_for_avx512()
    monkeypatch.setattr(narrow.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert not narrow.compiles_for_avx512()


@pytest.mark.parametrize("num_means", [2, 3, 10, 17, 32])
def test_mean_products_are_float32_products_and_the_same_alone_or_in_a_pair(num_means):
    rng = np.random.default_rng(num_means)
    coordinates = rng.standard_normal((7, num_means)).astype(np.float32)
    eigenvectors_t = rng.standard_normal((num_means, num_means)).astype(np.float32)
    out = np.empty((7, num_means), np.float32)
    narrow.mean_products(coordinates, eigenvectors_t, out)
    exact = coordinates.astype(np.float64) @ eigenvectors_t.astype(np.float64)
    scale = np.abs(coordinates).astype(np.float64) @ np.abs(eigenvectors_t).astype(np.float64)
    assert (np.abs(out - exact) <= num_means * np.finfo(np.float32).eps * scale).all()
    for row in range(7):
        alone = np.empty((1, num_means), np.float32)
        narrow.mean_products(coordinates[row:row + 1], eigenvectors_t, alone)
        np.testing.assert_array_equal(alone[0], out[row])


# --- independence of the chunking, threads and row order ------------------------------------

def whole_case(num_rows=3000, **keywords):
    """A case with a classifier and label noise (of 24 features and 6 classes)."""
    case = gaussian_classes(num_rows=num_rows, num_features=24, num_classes=6, spread=1.5,
                            **keywords)
    return with_label_noise(case, 0.1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_report_does_not_depend_on_chunk_size(pass2_kernel, assert_same_report, chunk_size):
    case = whole_case(num_rows=1200)
    assert_same_report(ncfast.collapse(**case, chunk_size=chunk_size), ncfast.collapse(**case))


def test_report_does_not_depend_on_row_order(pass2_kernel, assert_same_report):
    case = whole_case()
    order = np.random.default_rng(3).permutation(len(case["labels"]))
    shuffled = {key: value[order] if key in ("features", "labels", "clean_labels") else value
                for key, value in case.items()}
    assert_same_report(ncfast.collapse(**shuffled), ncfast.collapse(**case))


def test_pass_two_is_bitwise_the_same_on_any_thread_count(pass2_kernel, short_cheap_tasks):
    case = whole_case(num_rows=40_000)
    sums = ncfast.ClassSums(6, 24).update(case["features"], case["labels"])
    geometry = ncfast.Geometry.from_class_sums(sums.counts, sums.sums)
    assert len(case["labels"]) > 2 * max(cpu.task_rows(24), cpu.cheap_task_rows(24))
    corrupted = case["labels"] != case["clean_labels"]
    states = []
    for count in (1, 2):
        with numba_threads(count):
            state = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
            states.append(state.update(case["features"], case["labels"], corrupted))
    assert states[0] == states[1]


# --- ties -----------------------------------------------------------------------------------

def test_tied_logits_predict_the_first_class(pass2_kernel):
    """Classifier rows 5 = 2 (in the first ``cpu.ARGMIN_GROUP`` of 10 logits) and 9 = 8 (in
    the tail), biases too: every row's logits tie there, and the prediction is the first
    class, as float64 ``np.argmax`` says."""
    rng = np.random.default_rng(0)
    num_classes, num_features = 10, 32
    assert cpu.ARGMIN_GROUP < num_classes < 2 * cpu.ARGMIN_GROUP
    means = 4.0 * rng.standard_normal((num_classes, num_features))
    labels = np.repeat(np.arange(num_classes), 30)
    features = (means[labels] + 0.3 * rng.standard_normal((labels.size, num_features))
                ).astype(np.float32)
    weights, bias = means - means.mean(axis=0), 0.1 * rng.standard_normal(num_classes)
    weights[5], bias[5] = weights[2], bias[2]
    weights[9], bias[9] = weights[8], bias[8]
    stats = ncfast.ResidualStats(ncfast.Geometry.from_means(means), weights=weights, bias=bias)
    stats.update(features, labels)
    predictions = np.argmax(features.astype(np.float64) @ weights.T + bias, axis=1)
    expected = np.bincount(labels[predictions == labels], minlength=num_classes)
    assert expected[[2, 8]].all() and not expected[[5, 9]].any()
    np.testing.assert_array_equal(stats.classifier_hits, expected)


@pytest.mark.parametrize("seed", range(170, 190))
def test_a_row_on_a_mean_another_class_shares_is_nearest_the_first(pass2_kernel, seed):
    """Class 3's mean is class 1's (float32 values, so the rows on them are exact). Rows
    exactly on the means go to the first nearest centre, as float64 ``np.argmin`` says:
    class 3's rows to class 1. From the Gram, the two means' distance rounded to +8.9e-16
    for some seeds (173, 188 with this machine's BLAS), and class 3's rows stayed in 3."""
    rng = np.random.default_rng(seed)
    a, b, c = rng.standard_normal((3, 8)).astype(np.float32).astype(np.float64)
    means = np.stack([a, b, c, b])
    geometry = ncfast.Geometry.from_means(means)
    assert geometry.mean_sq_distances[3, 1] == geometry.mean_sq_distances[1, 3] == 0.0
    labels = np.repeat(np.arange(4), 5)
    features = means[labels].astype(np.float32)
    stats = ncfast.ResidualStats(geometry).update(features, labels)
    sq_distances = ((features[:, None, :].astype(np.float64) - means[None]) ** 2).sum(axis=2)
    expected = np.bincount(labels[np.argmin(sq_distances, axis=1) == labels], minlength=4)
    assert expected.tolist() == [5, 5, 5, 0]
    np.testing.assert_array_equal(stats.ncc_hits, expected)


# --- bad rows -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 1, 5, 100])
@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_held_out_row_names_the_first_bad_row(pass2_kernel, chunk_size, value, kind):
    """Against given means pass 1 is skipped: pass 2 must find the first bad row."""
    case = whole_case(num_rows=600)
    features = case["features"].copy()
    features[[130, 140, 400], 3] = value
    with pytest.raises(ValueError, match=f"features row 130 contains {kind}"):
        ncfast.collapse(features, case["labels"], means=ncfast.collapse(**case).means,
                        weights=case["weights"], bias=case["bias"], chunk_size=chunk_size)


@pytest.mark.parametrize("label, message", [(5, "row 70 has label 5, a class without a mean"),
                                            (9, r"row 70 has label 9, outside \[0, 6\)")])
def test_bad_labels_name_the_row_and_leave_the_state_as_it_was(pass2_kernel, label, message):
    case = whole_case(num_rows=600)
    without_five = case["labels"] != 5
    sums = ncfast.ClassSums(6, 24).update(case["features"][without_five],
                                          case["labels"][without_five])
    geometry = ncfast.Geometry.from_class_sums(sums.counts, sums.sums)
    stats = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
    features, labels = case["features"][without_five], case["labels"][without_five]
    stats.update(features[:50], labels[:50])
    before = [getattr(stats, name).copy() for name in stats.sum_names]
    labels = labels.copy()
    labels[[70, 90]] = label
    with pytest.raises(ValueError, match=message):
        stats.update(features[50:], labels[50:], row_offset=50)
    assert all(np.array_equal(old, getattr(stats, name))
               for old, name in zip(before, stats.sum_names, strict=True))
