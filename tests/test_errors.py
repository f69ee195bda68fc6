"""Bad inputs: each raises its own exception, whose message says what was found.

Also: ``ncfast.collapse`` never modifies its inputs (numpy arrays or torch
tensors), whether it succeeds or fails.
"""
import copy
import hashlib
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ncfast
from ncfast import accumulators, engine, errors
from ncfast.kernels import cpu
from cases import gaussian_classes, with_label_noise

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 20, 4, 3


@pytest.fixture
def case():
    """20 rows of 4 float32 features in 3 classes, with a classifier."""
    return gaussian_classes(num_rows=NUM_ROWS, num_features=NUM_FEATURES,
                            num_classes=NUM_CLASSES)


def with_bad_value(features, rows, value):
    """Copy of ``features`` with ``value`` written into column 1 of ``rows``."""
    features = features.copy()
    features[rows, 1] = value
    return features


# --- the environment --------------------------------------------------------------------------

@pytest.mark.parametrize("setting", ["0", "-1", "abc"])
def test_a_thread_count_numba_cannot_use_is_named(setting):
    """NUMBA_NUM_THREADS=0 failed inside Numba's import with an error that did not name the
    variable; "abc" was ignored with a warning that held a traceback."""
    problem = ncfast.thread_setting_problem({"NUMBA_NUM_THREADS": setting})
    assert problem.startswith(f"NUMBA_NUM_THREADS={setting!r}: ")
    assert ncfast.thread_setting_problem({"NUMBA_NUM_THREADS": "3"}) is None
    assert ncfast.thread_setting_problem({}) is None
    result = subprocess.run([sys.executable, "-c", "import ncfast; ncfast.collapse"],
                            env=dict(os.environ, NUMBA_NUM_THREADS=setting),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"ValueError: {problem}"


# --- shapes and dtypes ----------------------------------------------------------------------

def test_one_dimensional_features(case):
    with pytest.raises(ValueError, match=r"must be 2-D .* found 1-D with shape \(20,\)"):
        ncfast.collapse(case["features"][:, 0], case["labels"])


def test_three_dimensional_features(case):
    with pytest.raises(ValueError, match=r"must be 2-D .* found 3-D with shape \(20, 4, 1\)"):
        ncfast.collapse(case["features"][:, :, None], case["labels"])


@pytest.mark.parametrize("features", [5.0, np.float32(5.0), torch.tensor(5.0)])
def test_zero_dimensional_features_are_told_to_be_rows(case, features):
    """0-D features were told to reshape with len(features), which fails for them."""
    with pytest.raises(ValueError, match=r"found 0-D with shape \(\): a single value, not rows "
                                         r"of features; pass an array of shape \(n_samples, "
                                         r"n_features\)"):
        ncfast.collapse(features, case["labels"])


def test_bytes_paths_are_refused_by_type(case, tmp_path):
    """b'/path.npy' became a 0-D array of bytes, then was told to reshape."""
    np.save(tmp_path / "features.npy", case["features"])
    for what, inputs in (("features", (bytes(tmp_path / "features.npy"), case["labels"])),
                         ("labels", (case["features"], bytearray(b"labels.npy")))):
        with pytest.raises(TypeError, match=f"{what} is byte.*; ncfast takes no bytes: pass a "
                                            r"path as a str or pathlib.Path \(path.decode\(\)\)"):
            ncfast.collapse(*inputs)


@pytest.mark.parametrize("what, inputs", [
    ("features", lambda case: ([[1.0, 2.0], [3.0]], [0, 1])),
    ("features", lambda case: ([[[1.0], [2.0]], [[3.0]]], [0, 1])),
    ("labels", lambda case: (case["features"][:2], [[0], [1, 1]])),
], ids=["rows", "nested-rows", "labels"])
def test_ragged_nested_lists_are_refused_by_name(case, what, inputs):
    """numpy's "setting an array element with a sequence ... inhomogeneous shape"."""
    with pytest.raises(ValueError, match=f"{what} is a ragged nested list: its rows have "
                                         "different lengths, so it is not an array; pass a "
                                         "rectangular array"):
        ncfast.collapse(*inputs(case))


@pytest.mark.parametrize("convert", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
@pytest.mark.parametrize("make_chunks", [list, tuple])
def test_chunk_tuples_passed_with_labels_are_told_to_drop_them(case, convert, make_chunks):
    """Read as one ragged array of features: numpy's "inhomogeneous shape" error."""
    chunks = make_chunks((convert(case["features"][start:start + 10]),
                          convert(case["labels"][start:start + 10])) for start in (0, 10))
    with pytest.raises(ValueError, match=f"features is a {make_chunks.__name__} of "
                                         r"\(features, labels\) chunk tuples, and labels were "
                                         "passed too; .* pass labels=None, and num_classes="):
        ncfast.collapse(chunks, case["labels"])


def test_features_without_columns(case):
    with pytest.raises(ValueError, match=r"features has no columns \(shape \(20, 0\)\)"):
        ncfast.collapse(case["features"][:, :0], case["labels"])


def test_labels_shorter_than_features(case):
    with pytest.raises(ValueError, match="labels has 19 entries but features has 20 rows"):
        ncfast.collapse(case["features"], case["labels"][:-1])


def test_clean_labels_longer_than_features(case):
    clean_labels = np.concatenate([case["labels"], [0]])
    with pytest.raises(ValueError, match="clean_labels has 21 entries but features has 20 rows"):
        ncfast.collapse(case["features"], case["labels"], clean_labels=clean_labels)


def test_float_labels(case):
    with pytest.raises(TypeError, match="labels must be integer class indices; found dtype "
                                        "float64"):
        ncfast.collapse(case["features"], case["labels"].astype(np.float64))


def test_torch_boolean_labels(case):
    with pytest.raises(TypeError, match="labels must be integer class indices; found dtype "
                                        "bool"):
        ncfast.collapse(case["features"], torch.from_numpy(case["labels"] > 0))


def test_integer_features(case):
    with pytest.raises(TypeError, match="features must be floating point; found dtype int32"):
        ncfast.collapse(case["features"].astype(np.int32), case["labels"])


def test_weights_of_wrong_shape(case):
    with pytest.raises(ValueError, match=r"weights has shape \(4, 3\); expected .* \(3, 4\)"):
        ncfast.collapse(case["features"], case["labels"], weights=case["weights"].T)


def test_bias_of_wrong_shape(case):
    with pytest.raises(ValueError, match=r"bias has shape \(4,\); expected \(3,\)"):
        ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                        bias=np.zeros(4))


def test_bias_without_weights(case):
    with pytest.raises(ValueError, match="bias was given without weights"):
        ncfast.collapse(case["features"], case["labels"], bias=case["bias"])


def test_chunk_size_zero(case):
    with pytest.raises(ValueError, match="chunk_size must be at least 1; found 0"):
        ncfast.collapse(case["features"], case["labels"], chunk_size=0)


# --- labels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 4])
def test_label_out_of_range_names_the_row(case, chunk_size):
    labels = case["labels"].copy()
    labels[[13, 17]] = NUM_CLASSES + 2
    with pytest.raises(ValueError, match=r"row 13 has label 5, outside \[0, 3\)"):
        ncfast.collapse(case["features"], labels, num_classes=NUM_CLASSES, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("label", [-1, -50])
def test_negative_label_names_the_row(case, chunk_size, label):
    """C is inferred from the labels: a label below -C must not index the class tallies
    from their end (an IndexError). More classes would not help: the message said to pass
    num_classes=."""
    labels = case["labels"].copy()
    labels[[13, 17]] = label
    with pytest.raises(ValueError, match=rf"row 13 has label {label}, outside \[0, 3\): .*; "
                                         "drop the rows with negative labels") as error:
        ncfast.collapse(case["features"], labels, chunk_size=chunk_size)
    assert "num_classes=" not in str(error.value)


def test_clean_label_out_of_range_names_the_row(case):
    noisy = with_label_noise(case)
    clean_labels = noisy["clean_labels"].copy()
    clean_labels[11] = -4
    with pytest.raises(ValueError, match=r"row 11 has clean label -4, outside \[0, 3\)"):
        ncfast.collapse(case["features"], noisy["labels"], num_classes=NUM_CLASSES,
                        clean_labels=clean_labels)


def test_bad_row_errors_quote_the_bad_one_of_the_two_labels():
    """The GPU backend's error path (``errors.raise_bad_row``) for a stray clean label."""
    with pytest.raises(ValueError, match=r"row 6 has clean label 40, outside \[0, 3\)"):
        errors.raise_bad_row(6, np.array([1]), np.array([40]), np.zeros((1, 3)), num_classes=3)


def test_held_out_label_without_training_mean_names_the_row(case):
    means = ncfast.collapse(case["features"], case["labels"], num_classes=4,
                            empty_classes="ignore").means
    labels = case["labels"].copy()
    labels[9] = 3
    with pytest.raises(ValueError, match="row 9 has label 3, a class without a mean"):
        ncfast.collapse(case["features"], labels, means=means)


# --- non-finite rows ------------------------------------------------------------------------

@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
def test_non_finite_row_names_the_first_bad_row(case, value, kind, chunk_size):
    """Row 13 is in the 1st, 14th, 4th or 2nd chunk; row 17 is bad too but comes later."""
    features = with_bad_value(case["features"], [13, 17], value)
    with pytest.raises(ValueError, match=f"features row 13 contains {kind}"):
        ncfast.collapse(features, case["labels"], chunk_size=chunk_size)


@pytest.mark.parametrize("num_classes", [3, 2000], ids=["rows-in-order", "rows-by-class"])
@pytest.mark.parametrize("nan_row, label_row, first", [(5, 9, "features row 5 contains NaN"),
                                                       (9, 5, "row 5 has label")])
def test_pass_one_names_the_first_bad_row_of_either_kind(num_classes, nan_row, label_row,
                                                         first):
    """Pass 1 reads the rows of many classes sorted by class, and checks labels before
    values; the error still names the row that comes first."""
    assert (num_classes * cpu.PIECE_MIN_ROWS > cpu.task_rows(8)) == (num_classes > 3)
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=num_classes, seed=3)
    features = with_bad_value(case["features"], [nan_row, 300], np.nan)
    labels = case["labels"].copy()
    labels[label_row] = num_classes
    with pytest.raises(ValueError, match=first):
        ncfast.ClassSums(num_classes, 8).update(features, labels)


def test_float64_rows_whose_sum_overflows_are_refused_by_class():
    """Two finite float64 rows of class 1 whose sum is past float64's range, each row's total
    finite: the error names the class and the fix, not the means' Inf."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=3, seed=1)
    features = case["features"].astype(np.float64)
    features[np.flatnonzero(case["labels"] == 1)[:2], 3] = 1e308
    with pytest.raises(ValueError, match="sum of the rows of class 1 is not finite.*rescale"):
        ncfast.collapse(features, case["labels"])


def test_non_finite_torch_row_names_the_row(case):
    features = torch.from_numpy(with_bad_value(case["features"], [6], np.nan))
    with pytest.raises(ValueError, match="features row 6 contains NaN"):
        ncfast.collapse(features, torch.from_numpy(case["labels"]), chunk_size=4)


@pytest.mark.parametrize("bad_row", [10, 9], ids=["class-1", "class-0"])
def test_non_finite_held_out_row_names_the_row(case, bad_row):
    """Against given means pass 1 is skipped, so pass 2 must find the bad row; in class 0
    (the first row of the means) too, which has a mean."""
    means = ncfast.collapse(case["features"], case["labels"]).means
    features = with_bad_value(case["features"], [bad_row, 15], np.nan)
    with pytest.raises(ValueError, match=f"features row {bad_row} contains NaN"):
        ncfast.collapse(features, case["labels"], means=means, chunk_size=3)


def test_a_row_with_nan_and_inf_is_said_to_contain_nan(case):
    features = with_bad_value(case["features"], [7], np.inf)
    features[7, 2] = np.nan
    with pytest.raises(ValueError, match="features row 7 contains NaN"):
        ncfast.collapse(features, case["labels"])


def test_a_bad_row_is_named_by_its_place_in_the_chunk_whatever_rows_are_included(case):
    state = ncfast.ResidualStats(ncfast.Geometry.from_means(case["weights"]))
    features = with_bad_value(case["features"], [7], np.nan)
    include = np.ones(NUM_ROWS, bool)
    include[2] = False
    with pytest.raises(ValueError, match="features row 107 contains NaN"):
        state.update(features, case["labels"], include=include, row_offset=100)


def test_non_finite_row_in_a_later_source_chunk_names_the_row(case):
    features = with_bad_value(case["features"], [12], np.inf)
    chunks = [(features[:5], case["labels"][:5]), (features[5:], case["labels"][5:])]
    with pytest.raises(ValueError, match="features row 12 contains Inf"):
        ncfast.collapse(chunks, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("num_features", [NUM_FEATURES, 2], ids=["classes-route", "features-route"])
@pytest.mark.parametrize("bad", ["nan", "inf", "label"])
def test_a_chunk_with_a_bad_row_leaves_the_states_as_they_were(bad, num_features):
    """An update that raises adds nothing, so a caller may skip the chunk and go on."""
    case = gaussian_classes(num_rows=NUM_ROWS, num_features=num_features,
                            num_classes=NUM_CLASSES)
    features, labels = case["features"], case["labels"].copy()
    if bad == "label":
        labels[15] = NUM_CLASSES
    else:
        features = with_bad_value(features, [15], np.nan if bad == "nan" else np.inf)
    sums = ncfast.ClassSums(NUM_CLASSES, num_features).update(features[:10], labels[:10])
    stats = ncfast.ResidualStats(ncfast.Geometry.from_class_sums(sums.counts, sums.sums),
                                 weights=case["weights"], bias=case["bias"])
    stats.update(features[:10], labels[:10])
    before = [array.copy() for array in (sums.counts, sums.sums, *stats_arrays(stats))]
    with pytest.raises(ValueError, match="row 15"):
        sums.update(features[10:], labels[10:], row_offset=10)
    with pytest.raises(ValueError, match="row 15"):
        stats.update(features[10:], labels[10:], row_offset=10)
    after = (sums.counts, sums.sums, *stats_arrays(stats))
    assert all(np.array_equal(old, new) for old, new in zip(before, after, strict=True))


@pytest.mark.parametrize("num_classes", [3, 2000])
def test_a_failed_chunk_leaves_no_trace_in_later_chunks(num_classes):
    """Pass 1's scratch (kept from chunk to chunk) carries nothing of a failed chunk
    into the next, whether it had few classes or about one row per class."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=num_classes, seed=2)
    features, labels = case["features"], case["labels"]
    bad = with_bad_value(features, [5], np.nan)
    expected = ncfast.ClassSums(num_classes, 8).update(features, labels)
    sums = ncfast.ClassSums(num_classes, 8)
    with pytest.raises(ValueError, match="row 5"):
        sums.update(bad[:300], labels[:300])
    sums.update(features[:300], labels[:300]).update(features[300:], labels[300:])
    np.testing.assert_array_equal(sums.counts, expected.counts)
    np.testing.assert_allclose(sums.sums, expected.sums, rtol=1e-12)


def stats_arrays(stats):
    """The sums a ``ResidualStats`` accumulates."""
    return [getattr(stats, name) for name in stats.sum_names]


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("which", ["labels", "clean_labels"])
@pytest.mark.parametrize("dtype", ["<u8", ">u8"])
def test_uint64_label_beyond_int64_names_its_row(case, chunk_size, which, dtype):
    labels = {"labels": case["labels"].astype(dtype),
              "clean_labels": case["labels"].astype(dtype)}
    labels[which][[9, 14]] = np.iinfo(np.uint64).max
    name = which.replace("_", " ")[:-1]
    with pytest.raises(ValueError, match=f"row 9 has {name} 18446744073709551615, beyond any"):
        ncfast.collapse(case["features"], labels["labels"], clean_labels=labels["clean_labels"],
                        num_classes=NUM_CLASSES, chunk_size=chunk_size)


def test_uint64_label_beyond_int64_in_a_source_chunk_names_its_row(case):
    labels = case["labels"].astype(np.uint64)
    labels[12] = 2 ** 63
    chunks = [(case["features"][:5], labels[:5]), (case["features"][5:], labels[5:])]
    with pytest.raises(ValueError, match="row 12 has label 9223372036854775808"):
        ncfast.collapse(chunks, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("stray, hint", [(40, True), (10 ** 15, False)],
                         ids=["fits", "beyond-memory"])
def test_stray_label_with_num_classes_inferred_names_its_row(case, stray, hint):
    """Inferring C = stray + 1 would leave most classes empty: an error naming the row. It
    offers num_classes= only where the per-class sums of that many classes would fit."""
    labels = case["labels"].copy()
    labels[[6, 11]] = stray
    with pytest.raises(ValueError, match=f"row 6 has label {stray}, but only 4 distinct labels "
                                         "occur") as error:
        ncfast.collapse(case["features"], labels)
    assert ("pass num_classes= to accept the empty classes" in str(error.value)) == hint


def test_stray_label_in_two_blocks_of_labels_names_its_first_row():
    """Labels are summarised 2^22 at a time: the first row is named when a later block holds
    the same stray label too."""
    labels = np.arange((1 << 22) + 16) % 2
    labels[[5, (1 << 22) + 3]] = 100
    with pytest.raises(ValueError, match="row 5 has label 100, but only 3 distinct"):
        ncfast.collapse(np.zeros((labels.size, 1), np.float32), labels)


def test_stray_clean_label_with_num_classes_inferred_is_named_a_clean_label(case):
    """The stray value was in the clean labels, but the error said "row 6 has label"."""
    clean = case["labels"].copy()
    clean[[6, 11]] = 40
    with pytest.raises(ValueError, match="row 6 has clean label 40, but only 4 distinct"):
        ncfast.collapse(case["features"], case["labels"], clean_labels=clean)


# --- too little data ------------------------------------------------------------------------

def test_empty_input(case):
    with pytest.raises(ValueError, match=r"features has no rows \(shape \(0, 4\)\)"):
        ncfast.collapse(case["features"][:0], case["labels"][:0], num_classes=NUM_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of empty classes first
        with pytest.raises(ValueError, match="the input has no rows"):
            engine.finalize_pass1(ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES))


def test_labels_leaving_exactly_half_the_classes_empty_are_measured(case):
    """More than half the classes empty is refused as a likely stray label; half is not."""
    labels = np.array([0, 1, 5])[case["labels"]]
    with pytest.warns(UserWarning, match="3 of 6 classes have no rows"):
        report = ncfast.collapse(case["features"], labels)
    assert report.present_classes.tolist() == [0, 1, 5]


def test_chunk_source_without_chunks():
    with pytest.raises(ValueError, match="the chunk source yielded no chunks"):
        ncfast.collapse([], num_classes=NUM_CLASSES)


def test_one_class_present_among_several(case):
    labels = np.zeros(NUM_ROWS, np.int64)
    with pytest.raises(ValueError, match=r"found 1 class\(es\) with rows"):
        ncfast.collapse(case["features"], labels, num_classes=NUM_CLASSES,
                        empty_classes="ignore")


def test_one_class_in_all(case):
    labels = np.zeros(NUM_ROWS, np.int64)
    with pytest.raises(ValueError, match="num_classes is 1; .* at least 2 are needed"):
        ncfast.collapse(case["features"], labels)


@pytest.mark.parametrize("num_features", [NUM_FEATURES, 2], ids=["classes", "features"])
def test_coinciding_class_means(case, num_features):
    """Every class has the same mean: NC1 divides by a zero between-class scatter."""
    features = np.ones((NUM_ROWS, num_features), np.float32)
    with pytest.raises(ValueError, match="the class means coincide"):
        ncfast.collapse(features, case["labels"], num_classes=NUM_CLASSES)


def test_classes_without_rows_warn_and_are_left_out(case):
    with pytest.warns(UserWarning, match=r"2 of 5 classes have no rows \(3, 4\)"):
        report = ncfast.collapse(case["features"], case["labels"], num_classes=5)
    np.testing.assert_array_equal(report.present_classes, [0, 1, 2])
    np.testing.assert_array_equal(report.class_counts, np.bincount(case["labels"], minlength=5))
    assert np.isnan(report.class_variances[3:]).all()
    assert np.isfinite(report.class_variances[:3]).all()
    assert np.isfinite(report.nc1)


def test_classes_without_rows_raise_when_asked(case):
    with pytest.raises(ValueError, match=r"2 of 5 classes have no rows \(3, 4\)"):
        ncfast.collapse(case["features"], case["labels"], num_classes=5, empty_classes="raise")


# --- files and sources ----------------------------------------------------------------------

def test_truncated_npy_file(case, tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, case["features"])
    content = path.read_bytes()
    path.write_bytes(content[:len(content) - 40])
    with pytest.raises(ValueError, match="features file .*features.npy' is not a readable "
                                         ".npy array file .* truncated"):
        ncfast.collapse(path, case["labels"])


@pytest.mark.parametrize("write", [
    lambda path: path.write_text("row,feature\n0,1.5\n"),
    lambda path: np.save(path, np.array([{"row": 1}], dtype=object)),
], ids=["text", "objects"])
def test_file_that_is_not_a_numeric_npy_array(case, tmp_path, write):
    """numpy's own message advised loading the file unsafely (allow_pickle=)."""
    path = tmp_path / "features.npy"
    write(path)
    with pytest.raises(ValueError, match="features file .*features.npy' is not a numeric .npy "
                                         "array .* ncfast does not unpickle files") as error:
        ncfast.collapse(path, case["labels"])
    assert "allow_pickle" not in str(error.value)


def test_npz_archive_instead_of_npy_file(case, tmp_path):
    path = tmp_path / "features.npz"
    np.savez(path, features=case["features"])
    with pytest.raises(ValueError, match=r"features file .*features\.npz'"):
        ncfast.collapse(path, case["labels"])


def test_nonexistent_path(case, tmp_path):
    path = tmp_path / "missing.npy"
    with pytest.raises(ValueError, match="features file .*missing.npy' does not exist"):
        ncfast.collapse(str(path), case["labels"])


def test_generator_as_chunk_source(case):
    chunks = ((case["features"][start:start + 5], case["labels"][start:start + 5])
              for start in range(0, NUM_ROWS, 5))
    with pytest.raises(TypeError, match="the chunk source is a one-shot iterator"):
        ncfast.collapse(chunks, num_classes=NUM_CLASSES)


def test_chunk_source_that_drops_clean_labels_names_the_chunk(case):
    noisy = with_label_noise(case)
    chunks = [(case["features"][:10], noisy["labels"][:10], noisy["clean_labels"][:10]),
              (case["features"][10:], noisy["labels"][10:])]
    with pytest.raises(ValueError, match="chunk 1"):
        ncfast.collapse(chunks, num_classes=NUM_CLASSES)


def test_chunks_of_another_width_name_the_chunk(case):
    chunks = [(case["features"][:10], case["labels"][:10]),
              (np.zeros((10, NUM_FEATURES + 1), np.float32), case["labels"][10:])]
    with pytest.raises(ValueError, match="chunk 1 has 5 features but earlier chunks have 4"):
        ncfast.collapse(chunks, num_classes=NUM_CLASSES)


def test_a_bad_array_in_a_chunk_names_the_chunk(case):
    """The error said "features must be 2-D ..." without saying which chunk held them."""
    features, labels = case["features"], case["labels"]
    with pytest.raises(ValueError, match=r"^chunk 2: features must be 2-D .* found 1-D"):
        ncfast.collapse([(features[:5], labels[:5]), (features[5:10], labels[5:10]),
                         (features[10], labels[10])], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="^chunk 1: labels has 9 entries but features has 10"):
        ncfast.collapse([(features[:10], labels[:10]), (features[10:], labels[11:])],
                        num_classes=NUM_CLASSES)
    with pytest.raises(TypeError, match="^chunk 0: clean_labels must be integer class indices"):
        ncfast.collapse([(features, labels, labels.astype(np.float32))],
                        num_classes=NUM_CLASSES)


def test_chunks_with_clean_labels_of_none_count_as_chunks_without_them(case):
    """A chunk (features, labels, None) counted as one with clean labels, so that mixed with
    (features, labels, clean_labels) chunks it ended in an accumulator's message."""
    noisy = with_label_noise(case)
    features, labels, clean = case["features"], noisy["labels"], noisy["clean_labels"]
    with pytest.raises(ValueError, match="^chunk 1 has clean labels but chunk 0 lacks them"):
        ncfast.collapse([(features[:10], labels[:10], None),
                         (features[10:], labels[10:], clean[10:])], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="^chunk 1 lacks clean labels but chunk 0 has them"):
        ncfast.collapse([(features[:10], labels[:10], clean[:10]),
                         (features[10:], labels[10:], None)], num_classes=NUM_CLASSES)
    without = ncfast.collapse([(features[:10], labels[:10], None), (features[10:], labels[10:])],
                              num_classes=NUM_CLASSES)
    assert without == ncfast.collapse([(features[:10], labels[:10]),
                                       (features[10:], labels[10:])], num_classes=NUM_CLASSES)


@pytest.mark.parametrize("rows", [[[1.0, 2.0], [3.0, 4.0]], [[0.5] * 5] * 3,
                                  ((1, 2, 3), (4, 5, 6)), [[np.float32(1.0), np.float32(2.0)]],
                                  [np.zeros(4, np.float32), np.ones(4, np.float32)],
                                  [torch.zeros(3), torch.ones(3)]],
                         ids=["pairs", "five", "int-tuples", "numpy-scalars", "1-D-arrays",
                              "1-D-tensors"])
def test_rows_of_numbers_without_labels_are_told_labels_are_missing(rows):
    """Read as a chunk source: rows of two numbers were (features, labels) chunks of 0-D
    features ("found 0-D with shape ()"), other rows "a list; each chunk must be a tuple"
    (1-D arrays: "chunk 0 of the source is a ndarray")."""
    with pytest.raises(TypeError, match=f"^labels is required: features is a "
                                        f"{type(rows).__name__} of rows of numbers, not of "
                                        r"\(features, labels\) chunk tuples; pass labels="):
        ncfast.collapse(rows)


class CountedChunks:
    """A re-iterable chunk source of the case's rows in chunks of 5, counting the chunks read."""

    def __init__(self, case):
        self.case = case
        self.chunks_read = 0

    def __iter__(self):
        for start in range(0, NUM_ROWS, 5):
            self.chunks_read += 1
            yield self.case["features"][start:start + 5], self.case["labels"][start:start + 5]


@pytest.mark.parametrize("options, error, message", [
    ({"weights": np.ones((NUM_CLASSES, NUM_FEATURES + 1))}, ValueError,
     r"weights has shape \(3, 5\); expected"),
    ({"weights": np.ones((NUM_CLASSES, NUM_FEATURES)), "bias": np.ones(2)}, ValueError,
     r"bias has shape \(2,\); expected \(3,\)"),
    ({"weights": np.ones((NUM_CLASSES, NUM_FEATURES), np.int64)}, TypeError,
     "weights must be floating point"),
    ({"global_mean": "bogus"}, ValueError, "global_mean must be one of"),
], ids=["weights", "bias", "int-weights", "global-mean"])
def test_a_bad_classifier_or_global_mean_is_refused_before_pass_one(case, options, error,
                                                                    message):
    """They were refused after pass 1 had read the whole source (and pass 2's first chunk);
    only the first chunk, which gives the number of features, may be read before."""
    source = CountedChunks(case)
    with pytest.raises(error, match=message):
        ncfast.collapse(source, num_classes=NUM_CLASSES, **options)
    assert source.chunks_read <= 1


# --- inputs are never modified --------------------------------------------------------------

def digest(array):
    """SHA-256 of an array's bytes (numpy array or torch tensor, any dtype)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().contiguous().view(torch.uint8).numpy()
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def numpy_inputs(case):
    noisy = with_label_noise(case)
    return {"features": case["features"], "labels": noisy["labels"],
            "clean_labels": noisy["clean_labels"], "weights": case["weights"],
            "bias": case["bias"]}


def torch_inputs(case):
    return {name: torch.from_numpy(array) for name, array in numpy_inputs(case).items()}


def torch_half_inputs(case):
    inputs = torch_inputs(case)
    inputs["features"] = inputs["features"].to(torch.bfloat16)
    return inputs


def strided_inputs(case):
    """Every other column of a wider array: a view that the chunks must copy."""
    inputs = numpy_inputs(case)
    inputs["features"] = np.repeat(case["features"], 2, axis=1)[:, ::2]
    return inputs


@pytest.mark.parametrize("make_inputs", [numpy_inputs, torch_inputs, torch_half_inputs,
                                         strided_inputs])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_inputs_are_not_modified(case, make_inputs, chunk_size):
    inputs = make_inputs(case)
    before = {name: digest(value) for name, value in inputs.items()}
    ncfast.collapse(**inputs, chunk_size=chunk_size)
    assert {name: digest(value) for name, value in inputs.items()} == before


def test_inputs_are_not_modified_when_a_row_is_bad(case):
    features = with_bad_value(case["features"], [17], np.nan)
    labels = case["labels"]
    before = digest(features), digest(labels)
    with pytest.raises(ValueError, match="row 17"):
        ncfast.collapse(features, labels, chunk_size=4)
    assert (digest(features), digest(labels)) == before


# --- magnitudes float32 cannot carry --------------------------------------------------------

@pytest.mark.parametrize("scale", [1e19, 1e-25, 1e160], ids=["overflow", "underflow", "huge"])
def test_features_beyond_float32s_scale_are_refused(case, scale):
    """Scaled by 1e19 the float32 products overflowed (NC1 inf, wrong NCC accuracy), by
    1e-25 they underflowed (NC1 0), by 1e160 the Gram's eigendecomposition failed."""
    features = case["features"].astype(np.float64) * scale
    with pytest.raises(ValueError, match=r"the class means differ from their global mean by up "
                                         r"to .* between 1e-10 and 1e\+10: rescale"):
        ncfast.collapse(features, case["labels"])


@pytest.mark.parametrize("scale, spread, factor", [(3e12, "6e+12", "1e-13"),
                                                   (3e-12, "6e-12", "1e+11")])
def test_means_beyond_the_scale_range_name_their_spread_and_a_factor(scale, spread, factor):
    """The largest magnitude counts (here the most negative centred mean); the hint's
    factor brings the means to unit scale."""
    means = scale * np.array([[-2.0, 0.0], [1.0, 1.0], [1.0, -1.0]])
    with pytest.raises(ValueError, match=rf"differ from their global mean by up to "
                                         rf"{re.escape(spread)} per feature.*multiply them, "
                                         rf"and a classifier's bias, by {re.escape(factor)}\)"):
        ncfast.Geometry.from_means(means)


def test_one_corrupt_row_that_moves_its_class_mean_out_of_range_names_the_class(case):
    """The message said only to rescale the features, which would hide the corrupt row."""
    features = with_bad_value(case["features"].astype(np.float64), [7], 1e25)
    row_class = int(case["labels"][7])
    with pytest.raises(ValueError, match=rf"rescale the features.*; class {row_class}'s mean lies "
                                         rf"farthest out: .* look for a corrupt row first"):
        ncfast.collapse(features, case["labels"])
    with pytest.raises(ValueError) as small:  # means too close together: no such hint
        ncfast.collapse(case["features"] * 1e-30, case["labels"])
    assert "farthest out" not in str(small.value)


def test_given_means_beyond_float32s_scale_are_refused(case):
    means = ncfast.collapse(case["features"], case["labels"]).means
    with pytest.raises(ValueError, match="rescale the features"):
        ncfast.collapse(case["features"], case["labels"], means=means * 1e12)


@pytest.mark.parametrize("value", [3e38, 1e21])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_too_far_from_its_mean_names_the_row(case, dtype, value):
    """A finite row whose float32 residual products could overflow, measured against
    given means (float32 values near 3e38 made NCC accuracy silently wrong). Among the
    rows of its own means it would move its class mean out of range instead."""
    means = ncfast.collapse(case["features"], case["labels"]).means
    features = with_bad_value(case["features"].astype(dtype), [7, 9], value)
    with pytest.raises(ValueError, match=r"features row 7 holds values too large to measure "
                                         rf"\(max \|x\| = {value:.3g}\)".replace("+", r"\+")):
        ncfast.collapse(features, case["labels"], means=means)


@pytest.mark.parametrize("scale", [1e12, 1e-14])
def test_classifier_beyond_float32s_scale_is_refused(case, scale):
    with pytest.raises(ValueError, match="weights has entries up to .*rescale weights and bias"):
        ncfast.collapse(case["features"], case["labels"], weights=case["weights"] * scale,
                        bias=case["bias"] * scale)


@pytest.mark.parametrize("where", ["weights", "bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_classifier_is_refused(case, where, value):
    classifier = {"weights": case["weights"].copy(), "bias": case["bias"].copy()}
    classifier[where][(1,) * classifier[where].ndim] = value
    before = {name: array.copy() for name, array in classifier.items()}
    with pytest.raises(ValueError, match="weights or bias contain NaN or Inf"):
        ncfast.collapse(case["features"], case["labels"], **classifier)
    for name, array in classifier.items():
        np.testing.assert_array_equal(array, before[name])


# --- chunk sources and options --------------------------------------------------------------

class ShuffledDropLast:
    """Batches of 8 rows in a new order on each iteration, the last partial batch dropped:
    the two passes read different rows."""

    def __init__(self, features, labels):
        self.features, self.labels, self.epoch = features, labels, 0

    def __iter__(self):
        self.epoch += 1
        order = np.random.default_rng(self.epoch).permutation(len(self.labels))
        whole = len(order) // 8 * 8
        return iter([(self.features[order[i:i + 8]], self.labels[order[i:i + 8]])
                     for i in range(0, whole, 8)])


def test_chunk_source_yielding_other_rows_in_pass_two(case):
    with pytest.raises(ValueError, match=r"the chunk source yielded different rows in the two "
                                         r"passes \(rows per class \[.*\], then \[.*\]\)"):
        ncfast.collapse(ShuffledDropLast(case["features"], case["labels"]),
                        num_classes=NUM_CLASSES)


class Reread:
    """A chunk source that yields ``rows(epoch)`` in batches of 64 rows, ``epoch`` counting
    its iterations from 1 (the iterations alternate: pass 1 and pass 2 are two in a row)."""

    def __init__(self, rows, labels):
        self.rows, self.labels, self.epoch = rows, labels, 0

    def __iter__(self):
        self.epoch += 1
        features, labels = self.rows(self.epoch), self.labels
        return iter([(features[i:i + 64], labels[i:i + 64]) for i in range(0, len(labels), 64)])


def _spread_case(**options):
    data = gaussian_classes(num_rows=3000, num_features=32, num_classes=5, **options)
    return data["features"], data["labels"]


def test_chunk_source_whose_class_means_move_is_refused():
    """Pass 2's rows shifted by a fifth of the spread (a model in another mode, rows that
    changed between the passes), with the same rows per class, were measured silently:
    its residuals were taken from the means of other rows."""
    features, labels = _spread_case(spread=0.1)
    shift = np.float32(0.02) * np.random.default_rng(1).standard_normal(32, np.float32)
    source = Reread(lambda epoch: features + shift * (epoch % 2), labels)
    with pytest.raises(ValueError, match=r"the chunk source yielded other rows in the two "
                                         r"passes: their class means differ from pass 1's by "
                                         r"enough to add \d\.\d+ times the within-class "
                                         r"scatter .*a model in the same mode"):
        ncfast.collapse(source, num_classes=5)


def test_chunk_source_with_random_augmentation_measures_its_own_rows():
    """Noise on every row in each pass (random augmentation) leaves the class means nearly
    as they were: accepted, and the report is that of pass 2's rows measured in one pass
    (to the share of the scatter the check allows), not that of pass 1's."""
    features, labels = _spread_case(spread=0.1)

    def augmented(epoch):
        noise = np.random.default_rng(epoch).standard_normal(features.shape, np.float32)
        return features + np.float32(0.05) * noise

    source = Reread(augmented, labels)
    report = ncfast.collapse(source, num_classes=5)
    pass_two_rows = augmented(source.epoch)
    assert report.nc1 == pytest.approx(ncfast.collapse(pass_two_rows, labels).nc1, rel=0.02)
    assert report.nc1 > 1.1 * ncfast.collapse(features, labels).nc1


def test_chunk_source_of_rows_exactly_at_their_means_is_accepted():
    """A fully collapsed layer read twice: no scatter, and none added (0 <= 0)."""
    means = np.random.default_rng(0).integers(-8, 9, (4, 8)).astype(np.float64)
    labels = np.repeat(np.arange(4), 4)
    features = means[labels].astype(np.float32)
    chunks = [(features[start:start + 7], labels[start:start + 7]) for start in (0, 7, 14)]
    report = ncfast.collapse(chunks, num_classes=4)
    assert report.nc1 == report.nc1_trace == 0.0 and report.ncc_accuracy == 1.0


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1e4, 1e-3)])
def test_chunk_source_in_another_order_or_rounded_otherwise_is_accepted(offset, spread):
    """The same rows in another order each time (float64 sums in another order), also with
    a large common offset and a tiny spread; and rows a model computes again with other
    roundings (one float32 rounding each way; at the offset as large as the spread)."""
    features, labels = _spread_case(offset=offset, spread=spread)
    expected = ncfast.collapse(features, labels)

    class Shuffled(Reread):
        def __iter__(self):
            self.epoch += 1
            order = np.random.default_rng(self.epoch).permutation(len(labels))
            return iter([(features[order[i:i + 64]], labels[order[i:i + 64]])
                         for i in range(0, len(labels), 64)])

    report = ncfast.collapse(Shuffled(None, None), num_classes=5)
    assert report.nc1 == pytest.approx(expected.nc1, rel=1e-9)

    def rerounded(epoch):
        ulps = np.random.default_rng(epoch).integers(-1, 2, features.shape)
        return np.where(ulps > 0, np.nextafter(features, np.float32(np.inf)),
                        np.where(ulps < 0, np.nextafter(features, np.float32(-np.inf)),
                                 features)).astype(np.float32)

    ncfast.collapse(Reread(rerounded, labels), num_classes=5)


def test_means_from_a_file_give_the_class_count(case, tmp_path):
    """C was inferred from len() of the path string."""
    means = ncfast.collapse(case["features"], case["labels"]).means
    path = tmp_path / "class_means_with_a_long_file_name.npy"
    np.save(path, means)
    assert ncfast.collapse(case["features"], case["labels"], means=str(path)).num_classes == \
        NUM_CLASSES


def test_class_sums_as_means(case):
    class_sums = ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES)
    class_sums.update(case["features"], case["labels"])
    with pytest.raises(TypeError, match="found a ClassSums: pass the training rows' "
                                        "CollapseReport"):
        ncfast.collapse(case["features"], case["labels"], means=class_sums)


def test_class_count_whose_means_would_not_fit_is_refused(case, monkeypatch):
    """The guard counted the sums alone, but making the class means from them holds about
    four copies (five with the sums' rounding errors, float64 rows): 10**8 classes at D = 8
    (6 GB of sums on a 24 GiB machine) passed it and ran out of memory. Here 0.3 GiB of
    sums on a machine of 1 GiB."""
    monkeypatch.setattr(accumulators, "machine_memory", lambda: 2 ** 30)
    with pytest.raises(ValueError, match=r"num_classes=10000000 with 4 features needs 0.298 GiB "
                                         r"of per-class float64 sums, and about 5 times that"):
        ncfast.collapse(case["features"], case["labels"], num_classes=10 ** 7)


def test_numpy_integer_class_count_too_large_for_memory(case):
    """``8 * C * D`` wrapped around in int64 and let an exabyte allocation through."""
    with pytest.raises(ValueError, match="needs .* GiB of per-class float64 sums"):
        ncfast.collapse(case["features"], case["labels"], num_classes=np.int64(2 ** 58))


# --- the streaming accumulators check chunks as collapse checks inputs -----------------------

@pytest.mark.parametrize("labels, error", [
    (lambda labels: labels + 0.9, "labels must be integer class indices; found dtype float64"),
    (lambda labels: labels > 1, "labels must be integer class indices; found dtype bool"),
])
def test_accumulators_refuse_labels_that_are_not_integers(case, labels, error):
    with pytest.raises(TypeError, match=error):
        ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES).update(case["features"],
                                                            labels(case["labels"]))
    geometry = ncfast.collapse(case["features"], case["labels"]).means
    stats = ncfast.ResidualStats(ncfast.Geometry.from_means(geometry))
    with pytest.raises(TypeError, match=error):
        stats.update(case["features"], labels(case["labels"]))


def test_accumulators_refuse_text_features(case):
    with pytest.raises(TypeError, match="features must be floating point; found dtype <U3"):
        ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES).update(
            np.full((NUM_ROWS, NUM_FEATURES), "1.5"), case["labels"])


@pytest.mark.parametrize("option, value, error", [
    ("include", np.ones(10, bool), ValueError),
    ("include", np.array([0, 1, 2]), TypeError),
    ("corrupted", np.full(NUM_ROWS, 256), TypeError),
    ("corrupted", np.ones(NUM_ROWS, np.float64), TypeError),
])
def test_row_masks_of_the_wrong_shape_or_kind(case, option, value, error):
    """A short mask added its first rows, row indices were read as a mask, 256 wrapped
    to 0 (not corrupted)."""
    geometry = ncfast.Geometry.from_means(ncfast.collapse(case["features"], case["labels"]).means)
    stats = ncfast.ResidualStats(geometry)
    with pytest.raises(error, match=f"{option} (has shape|must be a boolean mask)"):
        stats.update(case["features"], case["labels"], **{option: value})
    assert stats.num_rows == 0


def test_lazily_negated_torch_features_are_read(case):
    """``z.conj().imag`` is a float tensor with torch's negative bit set: numpy() refused it."""
    negated = torch.complex(torch.zeros(NUM_ROWS, NUM_FEATURES),
                            -torch.from_numpy(case["features"])).conj().imag
    assert negated.is_neg()
    report = ncfast.collapse(negated, case["labels"])
    assert report.nc1 == ncfast.collapse(case["features"], case["labels"]).nc1


def test_sparse_torch_features(case):
    with pytest.raises(TypeError, match="features is a torch.sparse_coo torch tensor; pass "
                                        r"dense values \(tensor.to_dense\(\)\)"):
        ncfast.collapse(torch.from_numpy(case["features"]).to_sparse(), case["labels"])


def test_an_empty_chunk_may_give_its_labels_and_masks_as_empty_lists(case):
    """``np.asarray([])`` is float64: an empty last chunk built from lists is no error."""
    class_sums = ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES)
    class_sums.update(case["features"], case["labels"])
    class_sums.update(case["features"][:0], [])
    stats = ncfast.ResidualStats(ncfast.Geometry.from_class_sums(class_sums.counts,
                                                                 class_sums.sums))
    stats.update(case["features"][:0], [], [], include=[])
    assert class_sums.counts.sum() == NUM_ROWS and stats.num_rows == 0


def test_a_report_is_unhashable_by_its_own_name(case):
    """hash(report) failed on a numpy field ("unhashable type: 'numpy.ndarray'")."""
    with pytest.raises(TypeError, match="unhashable type: 'CollapseReport'"):
        hash(ncfast.collapse(case["features"], case["labels"]))


@pytest.mark.parametrize("option, value, error, message", [
    ("weights", lambda case: torch.tensor(case["weights"]).to("meta"), ValueError,
     "weights is a torch tensor on the meta device, which holds no values"),
    ("ood", lambda case: torch.zeros(3, NUM_FEATURES, device="meta"), ValueError,
     "ood is a torch tensor on the meta device"),
    ("features", lambda case: torch.nested.nested_tensor([torch.zeros(2, NUM_FEATURES)]),
     TypeError, "features is a nested torch tensor; pass one dense tensor"),
    ("means", lambda case: np.round(case["weights"]).astype(np.int64), TypeError,
     "means must be floating point .* found dtype int64"),
    ("means", lambda case: case["weights"] > 0, TypeError, "found dtype bool"),
    ("features", lambda case: np.ma.masked_array(
        case["features"], mask=np.broadcast_to(np.arange(NUM_ROWS)[:, None] == 3,
                                               case["features"].shape)),
     ValueError, "features is a masked array with 4 masked entries; ncfast reads every value"),
    ("features", lambda case: torch.empty(NUM_ROWS, NUM_FEATURES, device="meta"), ValueError,
     "features is a torch tensor on the meta device, which holds no values"),
    ("labels", lambda case: torch.empty(NUM_ROWS, dtype=torch.int64, device="meta"), ValueError,
     "labels is a torch tensor on the meta device, which holds no values"),
], ids=["weights-meta", "ood-meta", "nested", "int-means", "bool-means", "masked",
        "features-meta", "labels-meta"])
def test_inputs_without_usable_values_are_refused(case, option, value, error, message):
    """Torch's errors (meta: "Cannot copy out of meta tensor"; nested: "Internal error"), or
    silently wrong numbers: integer means, a masked row's value measured. Meta features and
    labels were told to move to the CPU with .cpu(), which a meta tensor cannot do."""
    inputs = {"features": case["features"], "labels": case["labels"]}
    inputs[option] = value(case)
    with pytest.raises(error, match=message):
        ncfast.collapse(**inputs)


def test_pass_one_states_take_sizes_and_options_they_can_use(case):
    """ClassSums(0, 8) and ClassSums(5, 0) were made; finalize_pass1 took any empty_classes;
    sum() of states failed on 0 + ClassSums."""
    for sizes, name in (((0, 8), "num_classes"), ((5, 0), "num_features"),
                        ((True, 3), "num_classes"), ((2.0, 3), "num_classes")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            ncfast.ClassSums(*sizes)
    class_sums = ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES)
    class_sums.update(case["features"], case["labels"])
    with pytest.raises(ValueError, match="empty_classes must be one of"):
        ncfast.finalize_pass1(class_sums, empty_classes="nope")
    assert sum([class_sums, class_sums]) == class_sums + class_sums


def test_pass_two_states_with_label_noise_merge_with_plus_and_sum():
    """ResidualPass (what load_state gives for a pass-2 file with label noise) merged only by
    +=: + and sum() raised TypeError, though the other states merge with both."""
    noisy = with_label_noise(gaussian_classes(num_rows=300, num_features=8, num_classes=4))
    features, labels, clean = noisy["features"], noisy["labels"], noisy["clean_labels"]
    class_sums = ncfast.ClassSums(4, 8, track_clean=True).update(features, labels, clean)
    geometry, clean_geometry = ncfast.finalize_pass1(class_sums)
    first, second = (ncfast.ResidualPass(geometry, clean_geometry).update(
        features[rows], labels[rows], clean[rows]) for rows in (slice(0, 100), slice(100, None)))
    given = [array.copy() for state in (first, second) for array in state.sum_arrays()]
    in_place = copy.deepcopy(first)
    in_place += second
    for merged in (first + second, sum([first, second])):
        assert all(map(np.array_equal, merged.sum_arrays(), in_place.sum_arrays()))
    assert all(map(np.array_equal, first.sum_arrays() + second.sum_arrays(), given))
    whole = ncfast.collapse(features, labels, clean_labels=clean)
    assert (first + second).report().nc1_clean == pytest.approx(whole.nc1_clean, rel=1e-10)
    with pytest.raises(TypeError, match="cannot merge a ResidualPass with a ClassSums"):
        first + class_sums


def test_pass_one_states_too_large_for_memory_are_refused_with_their_size():
    """numpy's MemoryError "Unable to allocate 7.11 PiB"; collapse refused the same sizes."""
    with pytest.raises(ValueError, match=r"num_classes=1000000000 with 1000000 features needs "
                                         r"7.45e\+06 GiB of per-class float64 sums.*: check "
                                         "num_classes .* and the number of features"):
        ncfast.ClassSums(10**9, 10**6)


@pytest.mark.parametrize("counts, error, message", [
    (lambda counts: counts[:-1], ValueError, r"one row count per class, shape \(3,\); found "
                                             r"shape \(2,\)"),
    (lambda counts: np.where(np.arange(counts.size) == 2, -3, counts), ValueError,
     "0 or more; class 2 has -3"),
    (lambda counts: counts + 0.5, ValueError, "whole numbers of rows, 0 or more; class 0"),
    (lambda counts: np.where(np.arange(counts.size) == 1, np.nan, counts), ValueError,
     "class 1 has nan"),
    (lambda counts: counts.astype(str), TypeError, "found dtype <U"),
    (lambda counts: counts > 5, TypeError, "found dtype bool"),
], ids=["short", "negative", "fraction", "nan", "text", "bool"])
def test_geometry_refuses_counts_it_cannot_use(case, counts, error, message):
    """Geometry.from_class_sums and from_means took negative and fractional counts, and
    counts of the wrong length ended in an IndexError."""
    class_sums = ncfast.ClassSums(NUM_CLASSES, NUM_FEATURES).update(case["features"],
                                                                    case["labels"])
    wrong = counts(class_sums.counts)
    with pytest.raises(error, match=message):
        ncfast.Geometry.from_class_sums(wrong, class_sums.sums)
    means = class_sums.sums / class_sums.counts[:, None]
    with pytest.raises(error, match=message):
        ncfast.Geometry.from_means(means, wrong, global_mean="samples")


def test_geometry_weighs_means_by_counts_only_when_some_class_has_rows(case):
    """Counts of 0 for every class with a mean gave a NaN global mean."""
    means = ncfast.collapse(case["features"], case["labels"]).means
    with pytest.raises(ValueError, match="classes with a mean have 0 rows in counts"):
        ncfast.Geometry.from_means(means, np.zeros(NUM_CLASSES, np.int64),
                                   global_mean="samples")
    geometry = ncfast.Geometry.from_means(means, np.arange(NUM_CLASSES) + 1.0,
                                          global_mean="samples")
    assert geometry.counts.dtype == np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16 counts overflowed in the bound check
        half = ncfast.Geometry.from_means(means, (np.arange(NUM_CLASSES) + 1).astype(np.float16),
                                          global_mean="samples")
    np.testing.assert_array_equal(half.counts, geometry.counts)


def test_huge_bias_gives_its_own_norm_as_bias_collapse(case):
    """A bias of 1e200 gave bias_collapse = inf: its squares overflowed."""
    bias = np.array([1e200, -1e200, 3e199])
    report = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                             bias=bias)
    logits = case["weights"] @ case["features"].astype(np.float64).mean(axis=0) + bias
    assert report.bias_collapse == pytest.approx(np.sqrt(np.sum((logits / 1e200) ** 2)) * 1e200,
                                                 rel=1e-12)
    assert report.accuracy == pytest.approx(np.mean(case["labels"] == 0))
