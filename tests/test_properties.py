"""Properties of the streaming passes: chunking, order, threads and merging do not matter.

Every state is a sum, so ``ncfast.collapse`` and the public accumulators
(``ClassSums``, pass 1; ``ResidualStats``, pass 2) must give the same result,
within 1e-10 relative error, however the rows are chunked, ordered, spread
over threads or split into partial states merged in any order (issue 2).
Integer fields (counts, hit tallies) must be equal exactly.
"""
import collections
import contextlib
import math
import os
import threading
import time
import warnings

import numba
import numpy as np
import pytest
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ncfast
from ncfast.engine import ResidualPass, finalize_pass1
from ncfast.kernels import cpu
from cases import gaussian_classes, with_label_noise
from conftest import RELATIVE_TOLERANCE, examples

# Failing examples print as short parameter dicts, so shrinking and explaining
# them would buy little and cost minutes. 25 examples (1000 in the nightly job).
PROPERTY_SETTINGS = settings(max_examples=examples(25), deadline=None,
                             phases=[Phase.explicit, Phase.reuse, Phase.generate])

#: Public fields of the pass-2 state that merge by addition; the route's
#: scatter (``eigen_scatter`` or ``scatter``), which alone goes through a
#: float32 GEMM, is checked last.
RESIDUAL_FIELDS = ("counts", "sq_norm_sums", "norm_sums", "ncc_hits", "classifier_hits",
                   "disagreements", "corrupted_rows", "corrupted_fits")


@st.composite
def feature_sets(draw):
    """A small Gaussian feature set (``cases.gaussian_classes``).

    Shapes cover both NC1 routes (C <= D and C > D); the set may carry a
    classifier, float64 features, noisy labels, and (a third of the sets)
    drawn class counts: imbalanced, with empty classes, but never fewer than
    two classes with (clean) rows. Drawn as the generator's keywords, so that
    a failing example prints short.
    """
    num_classes = draw(st.integers(2, 7))
    parameters = {
        "num_rows": draw(st.integers(2 * num_classes, 80)),
        "num_features": draw(st.integers(1, 64)),
        "num_classes": num_classes,
        "spread": draw(st.sampled_from([1e-3, 0.3, 1.0])),
        "classifier": draw(st.booleans()),
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "noise_seed": draw(st.none() | st.integers(0, 2**32 - 1)),
    }
    if draw(st.integers(0, 2)) == 0:
        parameters["class_counts"] = draw(
            st.lists(st.integers(0, 30), min_size=num_classes, max_size=num_classes)
            .filter(lambda counts: sum(count > 0 for count in counts) >= 2))
    case = make_case(**parameters)
    assume(np.unique(case["labels"]).size >= 2)
    if "clean_labels" in case:
        clean_rows = case["labels"] == case["clean_labels"]
        assume(np.unique(case["labels"][clean_rows]).size >= 2)
    return parameters


def make_case(noise_seed=None, **parameters):
    """The case dict of drawn parameters; labels flipped with rate 0.3 when ``noise_seed``."""
    case = gaussian_classes(**parameters)
    if noise_seed is not None:
        case = with_label_noise(case, rate=0.3, seed=noise_seed)
    return case


def collapse_case(case, **options):
    """``ncfast.collapse`` on a case dict, with its classifier and clean labels if any."""
    return ncfast.collapse(case["features"], case["labels"], num_classes=case["num_classes"],
                           weights=case.get("weights"), bias=case.get("bias"),
                           clean_labels=case.get("clean_labels"), empty_classes="ignore",
                           **options)


def split_points(draw, num_rows, max_parts=5):
    """Sorted cut points splitting ``range(num_rows)`` into 1..max_parts parts (some empty)."""
    cuts = draw(st.lists(st.integers(0, num_rows), max_size=max_parts - 1))
    return [0, *sorted(cuts), num_rows]


@contextlib.contextmanager
def numba_threads(count):
    """Run the block with ``count`` Numba threads, restoring the previous count after."""
    previous = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def assert_sums_close(name, actual, expected, scale=None):
    """Integer sums are equal; float sums agree to 1e-10 of ``scale``.

    ``scale`` defaults to the largest entry of ``expected``; pass the sum of
    the terms' magnitudes where the sums may cancel.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected, err_msg=name)
        return
    if scale is None:
        scale = np.abs(expected).max(initial=0.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RELATIVE_TOLERANCE * scale,
                               err_msg=name)


def assert_class_sums_close(actual, expected, scale=None):
    assert (actual.num_classes, actual.num_features, actual.track_clean) == \
        (expected.num_classes, expected.num_features, expected.track_clean)
    for name in ("counts", "sums", "clean_counts", "clean_sums"):
        if expected.track_clean or not name.startswith("clean"):
            assert_sums_close(name, getattr(actual, name), getattr(expected, name), scale)


def assert_residual_stats_close(actual, expected):
    """Sums agree to float64 rounding; NC1's eigen-diagonal also to one float32 rounding
    of each row's coordinates, which BLAS may round differently at another place in a
    block (``cpu.residual_blocks``).

    A coordinate ``p_j . r`` is within ``(D + 2)`` float32 eps of ``||p_j|| ||r||``
    (``p_j`` the column the residuals are multiplied by: ``M~^T v_j``, of squared norm
    the Gram's eigenvalue, or the unit ``u_j``), so two roundings of its square differ by
    at most ``4 (D + 2) eps ||p_j||^2 ||r||^2``, summed over the rows.
    """
    assert actual.route == expected.route
    for name in RESIDUAL_FIELDS:
        assert_sums_close(name, getattr(actual, name), getattr(expected, name))
    geometry = expected.geometry
    if expected.route == "classes":
        column_sq_norms = np.maximum(geometry.gram_eigenvalues, 0.0)
    else:
        column_sq_norms = np.ones(geometry.num_features)
    rounding = (4 * (geometry.num_features + 2) * np.finfo(np.float32).eps
                * column_sq_norms * expected.sq_norm_sums.sum())
    allowed = RELATIVE_TOLERANCE * np.abs(expected.eigen_scatter).max(initial=0.0) + rounding
    error = np.abs(actual.eigen_scatter - expected.eigen_scatter)
    assert (error <= allowed).all(), ("eigen_scatter", error.tolist(), allowed.tolist())


def class_sums_of(case, rows=slice(None)):
    """Pass-1 state of some rows of a case."""
    clean_labels = case.get("clean_labels")
    state = empty_class_sums(case)
    state.update(case["features"][rows], case["labels"][rows],
                 None if clean_labels is None else clean_labels[rows])
    return state


def empty_class_sums(case):
    """A pass-1 state shaped for a case, with no rows yet."""
    return ncfast.ClassSums(case["num_classes"], case["features"].shape[1],
                            track_clean="clean_labels" in case)


def geometry_of(case):
    state = class_sums_of(case)
    return ncfast.Geometry.from_class_sums(state.counts, state.sums)


def residual_stats_of(case, geometry, rows=slice(None)):
    """Pass-2 state of some rows of a case, on ``geometry``, with the case's classifier."""
    state = ncfast.ResidualStats(geometry, weights=case.get("weights"), bias=case.get("bias"))
    corrupted = None
    if "clean_labels" in case:
        corrupted = case["labels"][rows] != case["clean_labels"][rows]
    state.update(case["features"][rows], case["labels"][rows], corrupted)
    return state


# --- ncfast.collapse ------------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_report_does_not_depend_on_chunk_size(data, parameters, assert_same_report):
    case = make_case(**parameters)
    num_rows = len(case["labels"])
    chunk_size = data.draw(st.integers(1, num_rows), label="chunk_size")
    assert_same_report(collapse_case(case, chunk_size=chunk_size),
                       collapse_case(case, chunk_size=num_rows))


def test_one_row_chunks_give_the_whole_array_report(assert_same_report):
    """Chunks of one row (a source's tail, a one-row file) give the one-chunk report.

    Pass 2's float32 product of a one-row chunk must round as that row of a
    many-row product does; BLAS sends one-row products to another kernel.
    """
    case = gaussian_classes(num_rows=400, num_features=64, num_classes=10)
    assert_same_report(collapse_case(case, chunk_size=1), collapse_case(case, chunk_size=400))


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_report_does_not_depend_on_row_order(data, parameters, assert_same_report):
    case = make_case(**parameters)
    order = np.array(data.draw(st.permutations(range(len(case["labels"]))), label="order"))
    shuffled = {key: value[order] if key in ("features", "labels", "clean_labels") else value
                for key, value in case.items()}
    assert_same_report(collapse_case(shuffled), collapse_case(case))


@PROPERTY_SETTINGS
@given(parameters=feature_sets())
def test_report_does_not_depend_on_thread_count(parameters, assert_same_report):
    case = make_case(**parameters)
    chunk_size = max(1, len(case["labels"]) // 3)
    with numba_threads(1):
        single = collapse_case(case, chunk_size=chunk_size)
    with numba_threads(2):
        double = collapse_case(case, chunk_size=chunk_size)
    assert_same_report(double, single)


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_report_does_not_depend_on_chunk_order(data, parameters, assert_same_report):
    """A chunk source yielding the row blocks in any order gives the whole-array report."""
    case = make_case(**parameters)
    cuts = split_points(data.draw, len(case["labels"]))
    columns = [case["features"], case["labels"]]
    if "clean_labels" in case:
        columns.append(case["clean_labels"])
    chunks = [tuple(column[start:stop] for column in columns)
              for start, stop in zip(cuts, cuts[1:]) if stop > start]
    order = data.draw(st.permutations(range(len(chunks))), label="chunk order")
    chunks = [chunks[index] for index in order]
    from_chunks = ncfast.collapse(chunks, num_classes=case["num_classes"],
                                  weights=case.get("weights"), bias=case.get("bias"),
                                  empty_classes="ignore")
    assert_same_report(from_chunks, collapse_case(case))


# --- accumulators ---------------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_class_sums_merge_law(data, parameters):
    """``acc(a) + acc(b) == acc(a ++ b)`` for pass 1."""
    case = make_case(**parameters)
    cut = data.draw(st.integers(0, len(case["labels"])), label="cut")
    merged = class_sums_of(case, slice(None, cut)) + class_sums_of(case, slice(cut, None))
    assert_class_sums_close(merged, class_sums_of(case))


@st.composite
def labelled_rows(draw):
    """Arbitrary bounded float rows (repeats, zeros, signs mixed) with labels in [0, C)."""
    num_rows = draw(st.integers(0, 40))
    num_features = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    features = draw(arrays(dtype, (num_rows, num_features),
                           elements=st.floats(-1e6, 1e6, width=32)))
    num_classes = draw(st.integers(1, 5))
    labels = draw(arrays(np.int64, num_rows, elements=st.integers(0, num_classes - 1)))
    return features, labels, num_classes


@PROPERTY_SETTINGS
@given(data=st.data(), rows=labelled_rows())
def test_class_sums_merge_law_on_arbitrary_rows(data, rows):
    features, labels, num_classes = rows
    cut = data.draw(st.integers(0, len(labels)), label="cut")
    states = []
    for part in (slice(None, cut), slice(cut, None), slice(None)):
        state = ncfast.ClassSums(num_classes, features.shape[1])
        states.append(state.update(features[part], labels[part]))
    assert_class_sums_close(states[0] + states[1], states[2],
                            scale=np.abs(features).astype(np.float64).sum())


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_residual_stats_merge_law(data, parameters):
    """``acc(a) + acc(b) == acc(a ++ b)`` for pass 2, on the geometry of all rows."""
    case = make_case(**parameters)
    cut = data.draw(st.integers(0, len(case["labels"])), label="cut")
    geometry = geometry_of(case)
    merged = (residual_stats_of(case, geometry, slice(None, cut))
              + residual_stats_of(case, geometry, slice(cut, None)))
    assert_residual_stats_close(merged, residual_stats_of(case, geometry))


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_partial_states_merge_in_any_order(data, parameters):
    """Partial states of several row blocks, merged in a drawn order, give the one-shot states."""
    case = make_case(**parameters)
    cuts = split_points(data.draw, len(case["labels"]))
    blocks = [slice(start, stop) for start, stop in zip(cuts, cuts[1:])]
    blocks = data.draw(st.permutations(blocks), label="merge order")
    geometry = geometry_of(case)

    class_sums = empty_class_sums(case)
    for block in blocks:
        class_sums += class_sums_of(case, block)
    assert_class_sums_close(class_sums, class_sums_of(case))

    residual_stats = residual_stats_of(case, geometry, blocks[0])
    for block in blocks[1:]:
        residual_stats = residual_stats + residual_stats_of(case, geometry, block)
    assert_residual_stats_close(residual_stats, residual_stats_of(case, geometry))


@PROPERTY_SETTINGS
@given(parameters=feature_sets())
def test_accumulators_do_not_depend_on_thread_count(parameters):
    case = make_case(**parameters)
    geometry = geometry_of(case)
    with numba_threads(1):
        single = class_sums_of(case), residual_stats_of(case, geometry)
    with numba_threads(2):
        double = class_sums_of(case), residual_stats_of(case, geometry)
    assert_class_sums_close(double[0], single[0])
    assert_residual_stats_close(double[1], single[1])


@pytest.mark.parametrize("num_classes", [2, 3000])
def test_pass_one_is_bitwise_the_same_on_any_thread_count(num_classes, short_cheap_tasks):
    """Pass 1 sums each class's rows in row order within fixed tasks of sorted rows (a
    class spans several tasks with 2 classes; most classes have one row with 3000),
    whichever thread ran them; with clean labels too."""
    case = with_label_noise(gaussian_classes(num_rows=40_000, num_features=32,
                                             num_classes=num_classes, spread=0.3))
    assert len(case["features"]) > 4 * cpu.pass1_task_rows(32, num_classes)
    states = []
    for count in (1, 2):
        with numba_threads(count):
            states.append(ncfast.ClassSums(num_classes, 32, track_clean=True).update(
                case["features"], case["labels"], case["clean_labels"]))
    assert states[0] == states[1]
    labels, clean = case["labels"], case["clean_labels"]
    features = case["features"].astype(np.float64)
    for c in (0, num_classes - 1):
        np.testing.assert_allclose(states[0].sums[c], features[labels == c].sum(axis=0),
                                   rtol=1e-12, atol=1e-12)
        kept = (labels == c) & (clean == c)
        np.testing.assert_allclose(states[0].clean_sums[c], features[kept].sum(axis=0),
                                   rtol=1e-12, atol=1e-12)
        assert states[0].clean_counts[c] == kept.sum()
    np.testing.assert_array_equal(states[0].counts, np.bincount(labels, minlength=num_classes))


@pytest.mark.parametrize("seed", range(3))
def test_pass_one_adds_every_row_once_when_it_sums_rows_of_a_class_in_groups(monkeypatch, seed):
    """Rows sorted by class are added ``GROUP_ROWS`` of one class at a time: classes of 0
    to 3 * GROUP_ROWS + 1 rows in shuffled order, over tasks that cut through them (with
    clean labels), give every class's float64 sums, clean sums and counts."""
    monkeypatch.setattr(cpu, "TASK_BYTES", 1)  # tasks of one block (1024 rows)
    num_classes, num_features = 400, 5
    assert num_classes * cpu.PIECE_MIN_ROWS > cpu.pass1_task_rows(num_features, num_classes)
    rng = np.random.default_rng(seed)
    class_rows = rng.integers(0, 3 * cpu.GROUP_ROWS + 2, num_classes)
    labels = rng.permutation(np.repeat(np.arange(num_classes), class_rows))
    assert len(labels) > 2 * cpu.pass1_task_rows(num_features, num_classes)
    clean_labels = np.where(rng.random(len(labels)) < 0.3, (labels + 1) % num_classes, labels)
    # Offsets far larger than the spread: rows added in another order or grouping than
    # the reference's would differ by more than the tolerance only by losing a row.
    features = (rng.normal(size=(len(labels), num_features))
                + 1e3 * rng.normal(size=(num_classes, 1))[labels]).astype(np.float32)
    sums = ncfast.ClassSums(num_classes, num_features, track_clean=True).update(
        features, labels, clean_labels)
    wide = features.astype(np.float64)
    expected = np.zeros((num_classes, num_features))
    np.add.at(expected, labels, wide)
    kept = clean_labels == labels
    expected_clean = np.zeros((num_classes, num_features))
    np.add.at(expected_clean, labels[kept], wide[kept])
    np.testing.assert_array_equal(sums.counts, class_rows)
    np.testing.assert_array_equal(sums.clean_counts,
                                  np.bincount(labels[kept], minlength=num_classes))
    np.testing.assert_allclose(sums.sums, expected, rtol=1e-13, atol=1e-9)
    np.testing.assert_allclose(sums.clean_sums, expected_clean, rtol=1e-13, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_classes", [3, 3000], ids=["rows-in-order", "rows-by-class"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pass_one_names_the_first_non_finite_row_among_many_tasks(short_cheap_tasks, dtype,
                                                                  num_classes, seed):
    """Pass 1 finds NaN and Inf in float32 rows from their pieces' sums, in float64 rows from
    each row's total: either way the error names the first bad row, wherever the bad values
    fall among the tasks, and nothing is added."""
    rng = np.random.default_rng(seed)
    case = gaussian_classes(num_rows=40_000, num_features=8, num_classes=num_classes, seed=seed)
    assert len(case["labels"]) > 3 * cpu.pass1_task_rows(8, num_classes)
    features = case["features"].astype(dtype)
    bad_rows = rng.choice(len(features), size=rng.integers(1, 4), replace=False)
    for row, value in zip(bad_rows, rng.choice([np.nan, np.inf, -np.inf], bad_rows.size)):
        features[row, rng.integers(8)] = value
    sums = ncfast.ClassSums(num_classes, 8)
    with pytest.raises(ValueError, match=f"features row {bad_rows.min()} contains"):
        sums.update(features, case["labels"])
    assert sums == ncfast.ClassSums(num_classes, 8)


def test_pass_one_finds_an_inf_and_a_minus_inf_whose_sum_is_nan(short_cheap_tasks):
    """Two float32 rows of one class whose +Inf and -Inf meet in one column of a sum."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=3, seed=1)
    first, second = np.flatnonzero(case["labels"] == 1)[[3, 4]]
    features = case["features"].copy()
    features[first, 2], features[second, 2] = np.inf, -np.inf
    with pytest.raises(ValueError, match=f"features row {first} contains Inf"):
        ncfast.ClassSums(3, 8).update(features, case["labels"])


def test_pass_one_refuses_a_float64_row_whose_total_overflows():
    """Finite float64 values can overflow a float64 sum, so such rows are checked one by one."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=3, seed=1)
    features = case["features"].astype(np.float64)
    features[7, :2] = np.finfo(np.float64).max
    with pytest.raises(ValueError, match="features row 7 holds values too large"):
        ncfast.ClassSums(3, 8).update(features, case["labels"])


@pytest.mark.parametrize("num_features", [8, 24, 512, 768, 2048, 4096, 10_000])
def test_tasks_of_cheap_rows_hold_about_their_bytes(num_features):
    """Pass 1 in row order and the narrow kernel take tasks of whole pass-2 tasks, about
    ``CHEAP_TASK_BYTES`` of float32 features (one pass-2 task where that is larger)."""
    rows, cheap = cpu.task_rows(num_features), cpu.cheap_task_rows(num_features)
    assert cheap % rows == 0
    task_bytes = 4 * num_features * cheap
    assert task_bytes <= max(cpu.CHEAP_TASK_BYTES, 4 * num_features * rows)
    assert task_bytes > cpu.CHEAP_TASK_BYTES - 4 * num_features * rows
    # Few classes: the least multiple of it that holds TASK_CLASS_ROWS rows a class.
    for few in {2, 10, min(cheap // cpu.TASK_CLASS_ROWS + 1, rows // cpu.PIECE_MIN_ROWS),
                rows // cpu.PIECE_MIN_ROWS}:
        task = cpu.pass1_task_rows(num_features, few)
        assert task % cheap == 0
        assert task >= few * cpu.TASK_CLASS_ROWS > task - cheap
    # Many classes: the rows of one pass-2 task (sorted by class).
    many = rows // cpu.PIECE_MIN_ROWS + 1
    assert cpu.pass1_task_rows(num_features, many) == rows


@given(keys=arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 9)),
       num_keys=st.integers(10, 12))
def test_counting_sort_is_numpys_stable_sort(keys, num_keys):
    """Pass 1's order of the rows by class and of the pieces by task."""
    order, starts = cpu.counting_sort(keys, num_keys)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(starts, np.concatenate(
        [[0], np.cumsum(np.bincount(keys, minlength=num_keys))]))


@pytest.mark.parametrize("num_features, num_classes, route",
                         [(32, 5, "classes"), (8, 20, "features")])
def test_pass_two_is_bitwise_the_same_on_any_thread_count(num_features, num_classes, route):
    """Pass 2 cuts a chunk into tasks of fixed rows (more than one here) and adds their
    sums in task order, whichever thread ran them."""
    case = gaussian_classes(num_rows=40_000, num_features=num_features,
                            num_classes=num_classes, spread=0.3)
    geometry = geometry_of(case)
    assert geometry.route == route
    assert len(case["features"]) > 2 * cpu.task_rows(num_features)
    states = []
    for count in (1, 2):
        with numba_threads(count):
            states.append(residual_stats_of(case, geometry))
    assert states[0] == states[1]


@pytest.mark.parametrize("num_threads", [1, 2, 3, 8])
@pytest.mark.parametrize("num_tasks", [0, 1, 2, 5, 17])
def test_worker_threads_run_every_task_once(num_tasks, num_threads):
    """``cpu.run_tasks`` returns every task's result in task order, each task run once,
    with more or fewer threads than tasks (the pool may hold fewer threads than asked)."""
    runs = collections.Counter()
    lock = threading.Lock()

    def square(task):
        with lock:
            runs[task] += 1
        return task * task

    assert cpu.run_tasks(square, num_tasks, num_threads) == [t * t for t in range(num_tasks)]
    assert runs == collections.Counter(range(num_tasks))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two worker threads")
def test_worker_threads_help_a_slow_one():
    """Each thread starts on its own contiguous span of tasks; one that finishes takes
    the tasks left at the end of the slow one's span."""
    threads_of = {}

    def work(task):
        threads_of[task] = threading.get_ident()
        if task < 4:  # the first thread's span is slow
            time.sleep(0.2)
        return task

    assert cpu.run_tasks(work, 8, 2) == list(range(8))
    assert threads_of[0] == threads_of[1]  # the span's own thread starts from its front
    assert threads_of[3] != threads_of[0]  # the other took its last task


def test_tasks_that_run_tasks_run_them_on_their_own_thread():
    """A task that itself calls ``run_tasks`` used to deadlock: its inner tasks waited for
    worker threads that were all busy waiting for them. They now run on the calling
    worker, in order."""
    inner_threads, outcome = {}, []

    def outer(task):
        def inner(inner_task):
            inner_threads[task, inner_task] = threading.get_ident()
            return 10 * task + inner_task
        return (threading.get_ident(), cpu.run_tasks(inner, 3, 2))

    caller = threading.Thread(target=lambda: outcome.append(cpu.run_tasks(outer, 4, 2)),
                              daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "nested run_tasks deadlocked"
    results = outcome[0]
    assert [inner for _, inner in results] == [[10 * t, 10 * t + 1, 10 * t + 2]
                                               for t in range(4)]
    for task, (thread, _) in enumerate(results):
        assert all(inner_threads[task, k] == thread for k in range(3))


def test_a_child_forked_from_a_task_uses_worker_threads_again():
    """A process forked inside a task keeps only the forking thread, which is no worker
    there: its own ``run_tasks`` must not fall back to running tasks one by one."""
    def fork_and_ask(_):
        child = os.fork()
        if child == 0:
            os._exit(1 if cpu._on_worker_thread() else 0)
        return os.waitpid(child, 0)[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
        statuses = cpu.run_tasks(fork_and_ask, 2, 2)
    assert statuses == [0, 0]


class _RecordingChunks:
    """A re-iterable chunk source that notes the scratch the threads keep before each chunk."""

    def __init__(self, chunks):
        self.chunks, self.kept = chunks, []

    def __iter__(self):
        for chunk in self.chunks:
            self.kept.append(cpu.scratch_bytes())
            yield chunk


@pytest.mark.parametrize("far", [False, True])
def test_each_pass_keeps_its_scratch_from_chunk_to_chunk_and_drops_it_after(far):
    """Pass 1's pieces and pass 2's blocks (and, far from collapse on the "features" route,
    the centred far rows) are scratch kept from chunk to chunk; a finished ``collapse``
    used to leave them with its threads for the life of the process (0.4 GiB after one
    analysis of 50,000 rows of 4096 values in 16,000 classes), and pass 1's pieces
    (up to twice a chunk) stayed through the class means' tables and pass 2."""
    case = gaussian_classes(num_rows=3000, num_features=16, num_classes=40,
                            spread=3.0 if far else 0.01, seed=5)
    cpu.release_scratch()
    chunks = _RecordingChunks([(case["features"][start:start + 500],
                                case["labels"][start:start + 500])
                               for start in range(0, 3000, 500)])
    ncfast.collapse(chunks, num_classes=40)
    # Each pass reads the six chunks (after a first look at the first one).
    pass1, pass2 = chunks.kept[-12:-6], chunks.kept[-6:]
    assert pass1[0] == 0 and all(kept > 0 for kept in pass1[1:]), pass1
    assert pass2[0] == 0 and all(kept > 0 for kept in pass2[1:]), pass2
    assert cpu.scratch_bytes() == 0


@pytest.mark.parametrize("source", ["array", "list", "re-iterable"])
def test_the_class_sums_go_once_the_means_are_formed(source, monkeypatch):
    """After finalize only pass 1's counts are checked again, except for a re-iterable
    chunk source, whose pass 2 sums its rows by class to compare (a list yields the same
    arrays each time): the C×D float64 sums (1 GB at the vocabulary shape of
    ``bench.bench_shapes``) used to stay through the pair sweep and pass 2."""
    import gc

    from ncfast import engine
    from ncfast.accumulators import ClassSums

    live = []

    class CountingPass(engine.ResidualPass):
        def __init__(self, *args, **kwargs):
            gc.collect()
            live.append(sum(isinstance(obj, ClassSums) for obj in gc.get_objects()))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine, "ResidualPass", CountingPass)
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=5, seed=1)
    chunks = [(case["features"], case["labels"])]
    features, labels = {"array": (case["features"], case["labels"]), "list": (chunks, None),
                        "re-iterable": (_RecordingChunks(chunks), None)}[source]
    ncfast.collapse(features, labels, num_classes=5)
    assert live == [1 if source == "re-iterable" else 0]


def test_runs_side_by_side_share_the_workers_and_leave_no_scratch(assert_same_report):
    """Two ``collapse`` calls from two threads at once (as Dask's threaded scheduler runs
    passes): each run's pass 1 drops every thread's pieces when it ends and its scope
    closes while the other's may be open, yet each report equals the same call made
    alone, and no scratch is left once both have returned."""
    cases = [gaussian_classes(num_rows=4000, num_features=24, num_classes=60, spread=spread,
                              seed=seed) for seed, spread in ((11, 0.01), (12, 2.0))]
    alone = [ncfast.collapse(case["features"], case["labels"], chunk_size=300,
                             weights=case["weights"], bias=case["bias"]) for case in cases]
    cpu.release_scratch()
    together, errors = [None, None], []

    def run(index):
        try:
            case = cases[index]
            together[index] = ncfast.collapse(case["features"], case["labels"], chunk_size=300,
                                              weights=case["weights"], bias=case["bias"])
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for report, expected in zip(together, alone):
        assert_same_report(report, expected)
    assert cpu.scratch_bytes() == 0


def test_scratch_scopes_nest_and_drop_the_scratch_when_the_last_one_closes():
    cpu.release_scratch()
    with cpu.scratch_scope():
        buffer = cpu.thread_buffer("test_scratch", (4, 3), np.float32)
        with cpu.scratch_scope():
            again = cpu.thread_buffer("test_scratch", (2, 3), np.float32)
        assert np.shares_memory(buffer, again)  # the same buffer, kept
        cpu.release_scratch()  # a scope is open: nothing is dropped
        assert cpu.scratch_bytes() == buffer.nbytes
    assert cpu.scratch_bytes() == 0
    buffer[:] = 1.0  # a dropped buffer still held stays valid
    assert buffer.sum() == buffer.size


def test_streaming_states_keep_their_scratch_until_released():
    """Outside a run, ``ClassSums.update`` keeps its scratch for the next chunk."""
    case = gaussian_classes(num_rows=600, num_features=8, num_classes=50, seed=2)
    cpu.release_scratch()
    sums = ncfast.ClassSums(50, 8)
    sums.update(case["features"], case["labels"])
    assert cpu.scratch_bytes() > 0
    ncfast.release_scratch()
    assert cpu.scratch_bytes() == 0


def test_a_thread_that_ends_takes_its_scratch_with_it():
    cpu.release_scratch()
    worker = threading.Thread(target=lambda: cpu.thread_buffer("test_scratch", (1000, 8),
                                                               np.float64))
    worker.start()
    worker.join()
    assert cpu.scratch_bytes() == 0


def test_a_forked_child_keeps_no_scratch_and_no_open_scope():
    with cpu.scratch_scope():
        cpu.thread_buffer("test_scratch", (1000, 8), np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork in a threaded process
            child = os.fork()
        if child == 0:
            cpu.thread_buffer("test_scratch", (10, 8), np.float64)
            cpu.release_scratch()  # the parent's scope is not open here
            os._exit(0 if cpu.scratch_bytes() == 0 else 1)
        status = os.waitpid(child, 0)[1]
    assert status == 0


def test_worker_threads_stop_before_an_error_is_raised():
    """A failing task used to reach the caller while the other workers still ran tasks
    (writing into the caller's buffers); now they take no further task and have stopped."""
    finished = []

    def work(task):
        if task == 0:
            raise ValueError("task 0 failed")
        time.sleep(0.02)
        finished.append(task)

    with pytest.raises(ValueError, match="task 0 failed"):
        cpu.run_tasks(work, 20, 2)
    count = len(finished)
    time.sleep(0.1)
    assert len(finished) == count < 19


def test_overlapping_one_thread_contexts_restore_the_thread_count():
    """Two passes side by side (Dask's threaded scheduler): each context restored the
    count it found on entry, so BLAS stayed on one thread once they overlapped."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    first_entered, second_entered = threading.Event(), threading.Event()

    def first():
        with cpu.one_blas_thread():
            first_entered.set()
            second_entered.wait(5)
        # leaves first, while the second is still inside

    def second():
        first_entered.wait(5)
        with cpu.one_blas_thread():
            second_entered.set()
            time.sleep(0.1)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert blas_threads() == before


@pytest.mark.parametrize("num_features, num_classes", [(32, 12), (12, 40)],
                         ids=["classes", "features"])
def test_wide_products_agree_across_chunkings(num_features, num_classes):
    """With 8 or more columns BLAS rounds a row by its place in a block, which another
    chunking moves: the states still agree, to the float32 bound of
    ``assert_residual_stats_close``, and the tallies exactly (no row is near a tie)."""
    case = with_label_noise(gaussian_classes(num_rows=3000, num_features=num_features,
                                             num_classes=num_classes, spread=0.8))
    geometry = geometry_of(case)
    whole = residual_stats_of(case, geometry)
    for chunk in (7, 1001):
        chunked = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
        for start in range(0, 3000, chunk):
            rows = slice(start, start + chunk)
            chunked += residual_stats_of(case, geometry, rows)
        assert_residual_stats_close(chunked, whole)


def test_coordinate_squares_are_float32_products():
    """Each row's coordinates are one float32 product, within about D eps of float64
    whether it shares a block or is padded alone; their squares are summed in float64."""
    rng = np.random.default_rng(5)
    num_rows, num_features, block_rows = 37, 24, 16
    residuals = rng.standard_normal((num_rows, num_features)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((num_features, num_features)))[0].astype(np.float32)
    block = np.empty((block_rows, num_features), np.float32)
    products = np.empty((block_rows, num_features), np.float32)
    # One class whose mean is zero: the residuals are the rows themselves.
    labels, label_rows, means = np.zeros(num_rows, np.int64), np.zeros(1, np.int64), \
        np.zeros((1, num_features))
    sq_norms = np.empty(num_rows)
    together = np.zeros(num_features)
    assert cpu.coordinate_blocks(residuals, labels, label_rows, means, basis, block, products,
                                 sq_norms, together) == cpu.NO_ROW
    np.testing.assert_allclose(sq_norms, (residuals.astype(np.float64) ** 2).sum(axis=1))
    alone = np.zeros(num_features)
    for row in range(num_rows):
        cpu.coordinate_blocks(residuals[row:row + 1], labels[row:row + 1], label_rows, means,
                              basis, block, products, sq_norms[row:row + 1], alone)
    exact = ((residuals.astype(np.float64) @ basis.astype(np.float64)) ** 2).sum(axis=0)
    scale = (np.abs(residuals).astype(np.float64) @ np.abs(basis).astype(np.float64)) ** 2
    bound = 3 * num_features * np.finfo(np.float32).eps * scale.sum(axis=0)
    assert (np.abs(together - exact) <= bound).all()
    assert (np.abs(alone - exact) <= bound).all()


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_class_sums_do_not_depend_on_row_order(data, parameters):
    """Adding rows one at a time in a drawn order gives the sums of one update."""
    case = make_case(**parameters)
    order = data.draw(st.permutations(range(len(case["labels"]))), label="order")
    state = empty_class_sums(case)
    for row in order:
        state += class_sums_of(case, slice(row, row + 1))
    assert_class_sums_close(state, class_sums_of(case))


@PROPERTY_SETTINGS
@given(data=st.data(), parameters=feature_sets())
def test_in_place_and_binary_merge_agree(data, parameters):
    """``a += b`` equals ``a + b``, and ``+`` leaves its operands as they were."""
    case = make_case(**parameters)
    cut = data.draw(st.integers(0, len(case["labels"])), label="cut")
    geometry = geometry_of(case)
    for build in (lambda rows: class_sums_of(case, rows),
                  lambda rows: residual_stats_of(case, geometry, rows)):
        first, second = build(slice(None, cut)), build(slice(cut, None))
        merged = first + second
        assert first == build(slice(None, cut))
        assert second == build(slice(cut, None))
        first += second
        assert first == merged


# --- equality -------------------------------------------------------------------------------

def test_class_sums_equal_only_with_every_array_equal():
    """Clean sums count, and so does whether clean rows are tracked at all; only 0 starts
    a ``sum()`` of states."""
    case = with_label_noise(gaussian_classes(num_rows=60, num_features=6, num_classes=3))
    first, second = class_sums_of(case), class_sums_of(case)
    assert first == second and 0 + first == first
    second.clean_sums[1, 2] += 1.0
    assert first != second
    assert ncfast.ClassSums(3, 6) != ncfast.ClassSums(3, 6, track_clean=True)
    assert ncfast.ClassSums(3, 6, track_clean=True) != ncfast.ClassSums(3, 6)
    with pytest.raises(TypeError):
        1 + first


def test_residual_stats_equal_only_with_the_same_classifier_and_sums():
    case = gaussian_classes(num_rows=60, num_features=6, num_classes=3)
    geometry = geometry_of(case)
    first, second = residual_stats_of(case, geometry), residual_stats_of(case, geometry)
    assert first == second
    assert first != residual_stats_of({**case, "weights": None, "bias": None}, geometry)
    empty = ncfast.ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
    assert empty != ncfast.ResidualStats(geometry)  # no rows: only the classifier differs
    second.eigen_scatter[0] *= 2.0
    assert first != second


# --- merges that must be refused ------------------------------------------------------------

def test_residual_stats_on_other_means_refuse_to_merge():
    case = gaussian_classes(num_rows=60, num_features=6, num_classes=3, classifier=False)
    geometry = geometry_of(case)
    shifted = ncfast.Geometry.from_means(geometry.means + 1e-9)
    with pytest.raises(ValueError, match="different class means"):
        residual_stats_of(case, geometry) + residual_stats_of(case, shifted)
    state = residual_stats_of(case, geometry)
    with pytest.raises(ValueError, match="different class means"):
        state += residual_stats_of(case, shifted)


def test_residual_stats_on_the_same_means_centred_otherwise_refuse_to_merge():
    """Imbalanced counts: the "classes" and "samples" global means differ, and so do the
    Gram eigenbases the coordinates are summed in."""
    case = gaussian_classes(num_features=6, num_classes=3, class_counts=[5, 20, 100],
                            classifier=False)
    state = class_sums_of(case)
    by_classes, by_samples = (ncfast.Geometry.from_class_sums(state.counts, state.sums,
                                                              global_mean=option)
                              for option in ("classes", "samples"))
    assert by_classes.fingerprint != by_samples.fingerprint
    with pytest.raises(ValueError, match="different class means"):
        residual_stats_of(case, by_classes) + residual_stats_of(case, by_samples)


def test_label_noise_pass2_states_merge_every_part():
    """``ResidualPass`` of two halves, merged by ``+=``, holds the sums of one pass over all
    rows in every part: all rows, clean rows and corrupted rows (a merge that skipped the
    corrupted part left memorization on half the corrupted rows, with a warning that blamed
    their classes)."""
    case = with_label_noise(gaussian_classes(num_rows=600, num_features=6, num_classes=4))
    geometry, clean_geometry = finalize_pass1(class_sums_of(case))

    def pass2_of(rows):
        state = ResidualPass(geometry, clean_geometry, weights=case["weights"],
                             bias=case["bias"])
        state.update(case["features"][rows], case["labels"][rows], case["clean_labels"][rows])
        return state

    merged = pass2_of(slice(None, 250))
    merged += pass2_of(slice(250, None))
    whole = pass2_of(slice(None))
    for part, merged_stats in merged.parts().items():
        whole_stats = whole.parts()[part]
        assert whole_stats.counts.sum() > 0, part
        for name in whole_stats.sum_names:
            np.testing.assert_allclose(getattr(merged_stats, name), getattr(whole_stats, name),
                                       rtol=1e-12, atol=0, err_msg=f"{part}.{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = merged.report()
    reference = ncfast.collapse(**case)
    for name in ("memorization", "memorization_raw", "dilation", "nc1_clean"):
        assert getattr(report, name) == pytest.approx(getattr(reference, name), rel=1e-6), name


@PROPERTY_SETTINGS
@given(totals=arrays(np.float64, 8, elements=st.floats(-1e300, 1e300)),
       values=arrays(np.float64, 8, elements=st.floats(-1e300, 1e300)))
def test_compensated_addition_keeps_the_exact_sum(totals, values):
    """``add_compensated``: the new total plus the error it kept is exactly the old total
    plus the value, whichever is larger in magnitude (Fast2Sum, which assumes the total is,
    loses the error of adding a large value to a small total)."""
    new_totals, errors = totals.reshape(1, -1).copy(), np.zeros((1, totals.size))
    cpu.add_compensated(new_totals, errors, values.reshape(1, -1))
    for total, value, new_total, error in zip(totals, values, new_totals[0], errors[0]):
        # fsum rounds only its result, so an exact sum of zero comes out as zero.
        assert math.fsum([new_total, error, -total, -value]) == 0.0


def test_pass2_states_with_and_without_label_noise_refuse_to_merge():
    case = with_label_noise(gaussian_classes(num_rows=300, num_features=6, num_classes=3,
                                             classifier=False))
    geometry, clean_geometry = finalize_pass1(class_sums_of(case))
    for first, second in [(ResidualPass(geometry, clean_geometry), ResidualPass(geometry)),
                          (ResidualPass(geometry), ResidualPass(geometry, clean_geometry))]:
        with pytest.raises(TypeError, match="different kinds"):
            first += second


def test_residual_stats_with_other_classifier_refuse_to_merge():
    case = gaussian_classes(num_rows=60, num_features=6, num_classes=3)
    geometry = geometry_of(case)
    other = {**case, "weights": case["weights"] * 2.0}
    with pytest.raises(ValueError, match="different classifiers"):
        residual_stats_of(case, geometry) + residual_stats_of(other, geometry)


@pytest.mark.parametrize("shape, match", [
    ((4, 6, False), r"C=4, D=6, track_clean=False\) into \(C=3"),
    ((3, 7, False), r"C=3, D=7, track_clean=False\) into \(C=3, D=6"),
    ((3, 6, True), r"track_clean=True\) into \(C=3, D=6, track_clean=False"),
])
def test_class_sums_of_other_shape_refuse_to_merge(shape, match):
    num_classes, num_features, track_clean = shape
    state = ncfast.ClassSums(3, 6)
    other = ncfast.ClassSums(num_classes, num_features, track_clean=track_clean)
    with pytest.raises(ValueError, match=match):
        state + other
    with pytest.raises(ValueError, match=match):
        state += other


def test_accumulators_refuse_to_merge_with_other_kinds():
    case = gaussian_classes(num_rows=60, num_features=6, num_classes=3)
    class_sums = class_sums_of(case)
    residual_stats = residual_stats_of(case, geometry_of(case))
    with pytest.raises(TypeError, match="cannot merge ClassSums with ResidualStats"):
        class_sums + residual_stats
    with pytest.raises(TypeError, match="cannot merge ResidualStats with ClassSums"):
        residual_stats + class_sums


def _dead_relu_case(num_classes, num_features, threshold, seed):
    """ReLU features of which most rows are all zero, with a bias-free float32 classifier:
    every logit of a zero row is exactly 0, a tie the first class wins."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, 900)
    shifts = 0.2 * labels[:, None] * np.ones(num_features)
    features = np.maximum(rng.standard_normal((900, num_features)) - threshold + shifts,
                          0.0).astype(np.float32)
    weights = rng.standard_normal((num_classes, num_features)).astype(np.float32)
    return features, labels, weights


@pytest.mark.parametrize("num_classes, num_features, threshold", [
    (3, 2, 1.1),     # the "features" route (C > D): tiled search
    (4, 16, 2.0),    # the "classes" route through BLAS
    (4, 128, 3.0),   # the "classes" route's narrow kernel
], ids=["features", "classes-blas", "classes-narrow"])
@pytest.mark.parametrize("seed", [6, 9, 27])
def test_exact_ties_go_to_the_first_class_whatever_the_chunking(num_classes, num_features,
                                                                threshold, seed):
    """All-zero rows under a bias-free classifier tie every logit exactly; float32 products
    of their residuals (``-mu_y``) broke the tie by rounding, differently for a row's place
    in its block (seed 27 on the "features" route: accuracy 0.274 in one chunk, 0.310 in
    chunks of one row, 0.310 in float64). ncfast decides such near ties in float64 from
    the row, so both equal the float64 first argmax's."""
    features, labels, weights = _dead_relu_case(num_classes, num_features, threshold, seed)
    assert (features == 0).all(axis=1).sum() > 300
    logits = features.astype(np.float64) @ weights.T.astype(np.float64)
    expected = np.mean(logits.argmax(axis=1) == labels)
    means = np.array([features[labels == c].astype(np.float64).mean(axis=0)
                      for c in range(num_classes)])
    sq_distances = ((features[:, None, :].astype(np.float64) - means[None]) ** 2).sum(axis=2)
    expected_ncc = np.mean(sq_distances.argmin(axis=1) == labels)
    for chunk_size in (None, 1, 7):
        report = ncfast.collapse(features, labels, weights=weights, chunk_size=chunk_size)
        assert report.route == ("features" if num_classes > num_features else "classes")
        assert report.accuracy == expected, chunk_size
        assert report.ncc_accuracy == expected_ncc, chunk_size


def test_means_closer_than_float32_resolves_are_told_apart_in_float64():
    """40 class means about 1e-3 apart in two groups at norm 4 on either side of the origin,
    rows spread 1e-4 around them (C > D: the "features" route, whose float32 scores round
    with ``||h - mu_G||``, here 4): NCC scored 0.782 where float64 gives 1.0. Rows whose
    float32 scores cannot decide are decided in float64, and NCC's accuracy is float64's."""
    rng = np.random.default_rng(3)
    num_classes, num_features = 40, 16
    centre = 4.0 * rng.standard_normal(num_features) / math.sqrt(num_features)
    sides = np.where(np.arange(num_classes) % 2 == 0, 1.0, -1.0)[:, None]
    means = sides * centre + 2.5e-4 * rng.standard_normal((num_classes, num_features))
    labels = np.repeat(np.arange(num_classes), 25)
    features = means[labels] + 1e-4 * rng.standard_normal((labels.size, num_features))
    report = ncfast.collapse(features, labels)
    assert report.route == "features"
    class_means = np.array([features[labels == c].mean(axis=0) for c in range(num_classes)])
    sq_distances = ((features[:, None, :] - class_means[None]) ** 2).sum(axis=2)
    assert report.ncc_accuracy == np.mean(sq_distances.argmin(axis=1) == labels)


def test_more_near_ties_than_a_row_keeps_are_decided_over_every_class():
    """Twelve class means and classifier rows that float32 cannot tell apart (1e-9 apart
    at unit scale): every score of a row is within its threshold, more than the
    ``KEPT_SCORES`` a row keeps, so the float64 decision runs over every class."""
    from ncfast.kernels.tiles import KEPT_SCORES
    rng = np.random.default_rng(4)
    num_classes, num_features = 12, 2
    assert num_classes > KEPT_SCORES
    base = np.array([1.0, 0.5])
    means = base + 1e-9 * rng.standard_normal((num_classes, num_features))
    labels = np.repeat(np.arange(num_classes), 20)
    features = means[labels] + 1e-10 * rng.standard_normal((labels.size, num_features))
    weights = np.array([0.6, -0.8]) + 1e-9 * rng.standard_normal((num_classes, num_features))
    report = ncfast.collapse(features, labels, weights=weights)
    assert report.route == "features"
    class_means = np.array([features[labels == c].mean(axis=0) for c in range(num_classes)])
    sq_distances = ((features[:, None, :] - class_means[None]) ** 2).sum(axis=2)
    assert report.ncc_accuracy == np.mean(sq_distances.argmin(axis=1) == labels)
    assert report.accuracy == np.mean((features @ weights.T).argmax(axis=1) == labels)
    assert 0.2 < report.ncc_accuracy  # far better than float32's chance (1/12)
