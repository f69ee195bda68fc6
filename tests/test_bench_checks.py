"""The benchmarks refuse a wrong, missing or NaN metric, bad options and a failed child:
none of them times or reports a run it could not check."""
import math
import subprocess
import sys

import numpy as np
import pytest

from bench import checks, profile


def test_a_nan_metric_is_an_infinite_error():
    """``abs(nan - x) > tol`` is False, and ``max`` drops a NaN that is not first: both let a
    NaN metric through (bench_dask and bench_monitor compared that way)."""
    assert checks.metric_error(math.nan, 0.5) == math.inf
    assert checks.metric_error(math.nan, math.nan) == 0.0
    assert checks.metric_error(math.inf, math.inf) == 0.0
    assert checks.metric_error(None, 0.5) == math.inf
    assert checks.metric_error(None, None) == 0.0
    assert checks.metric_error(0.31, 0.3, absolute=True) == pytest.approx(0.01)
    assert checks.worst_metric_error({"nc1": 0.5, "nc3": math.nan},
                                     {"nc1": 0.5, "nc3": 0.2}) == math.inf
    assert checks.worst_metric_error({"nc1": 0.5}, {"nc1": 0.5, "nc3": 0.2}) == math.inf
    assert checks.worst_metric_error({}, {}) == math.inf


def test_the_route_check_fails_on_nan_missing_or_no_metric():
    """``bench.routes.check`` skipped NaN values, metrics the route left out, and a result
    without any: a NaN NC1 was timed and reported with exit status 0."""
    pytest.importorskip("torch")
    from bench.routes import check

    reference = {"nc1": 0.5, "accuracy": 0.9}
    check("ncfast", {"nc1": 0.5 * (1 + 1e-7), "accuracy": 0.9}, reference)
    for result, message in (({"nc1": math.nan, "accuracy": 0.9}, "nc1 = nan"),
                            ({"accuracy": 0.9}, "nc1 = None"),
                            ({"nc1": 0.5005, "accuracy": 0.9}, r"error 1\.00e-03 > 1e-05")):
        with pytest.raises(AssertionError, match=message):
            check("ncfast", result, reference)
    check("torch", {"nc1": 0.5 * (1 + 1e-3)}, reference)  # a torch route measures a subset
    with pytest.raises(AssertionError, match="returned none of the textbook's metrics"):
        check("torch", {"NC1": 0.5}, reference)


def _usage_error(module, *options):
    """stderr of ``python -m module options`` after checking it is a usage error (status 2)."""
    result = subprocess.run([sys.executable, "-m", module, *options], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("module, options, message", [
    ("bench", ["--repeats", "0"], "'0' is not a whole number of at least 1"),
    ("bench", ["--repeats", "inf"], "'inf' is not a whole number of at least 1"),
    ("bench", ["--sizes", "infx64x10"], "invalid parse_sizes value: 'infx64x10'"),
    ("bench", ["--sizes", "0x64x10"], "a size needs at least 1 row, 1 feature and 2 classes"),
    ("bench", ["--sizes", "1e4x64x1"], "a size needs at least 1 row, 1 feature and 2 classes"),
    ("bench.bench_shapes", ["--torch-rows", "-5"], "'-5' is not a whole number of at least 1"),
    ("bench.bench_shapes", ["--scale", "nan"], "--scale must be a finite number of at least 1"),
    ("bench.bench_shapes", ["--shapes", "1e5x64x10", "--scale", "1e9"],
     "--scale 1e+09 leaves fewer than 100 rows of 1e5x64x10; divide by less"),
    ("bench.bench_engine", ["--rows", "500"], "--classes 16,384 with --rows 500"),
    ("bench.bench_many_classes", ["--rows", "1000"], "--classes 32,768 with --rows 1,000"),
    ("bench.bench_engine", ["--assembly-classes", "100", "--assembly-features", "64"],
     "the assembly measures the classes route"),
    ("bench.bench_analyze", ["--features", "0"], "'0' is not a whole number of at least 1"),
    ("bench.bench_dask", ["--gigabytes", "nan"], "'nan' is not a finite number above 0"),
    ("bench.bench_dask", ["--gigabytes", "1e-9"], "the benchmark needs at least 100"),
    ("bench.profile", ["--rows", "-10"], "'-10' is not a whole number of at least 1"),
    ("bench.memory", ["ncfast", "-5", "64", "10"], "'-5' is not a whole number of at least 1"),
])
def test_bad_options_are_usage_errors(module, options, message):
    """Each of these ran and printed inf times, a negative torch time, or a traceback."""
    assert message in _usage_error(module, *options)


def test_a_failed_single_process_run_ends_the_dask_benchmark(tmp_path):
    """The parent waited on the child's answer with no timeout: a child that failed (no
    chunks) left it waiting forever."""
    pytest.importorskip("zarr")
    from bench import bench_dask

    with pytest.raises(SystemExit, match=r"the single-process run failed \(exit code 1"):
        bench_dask.run_single_process(str(tmp_path / "missing"), {})


def test_the_profile_multiplies_every_row_it_counts(monkeypatch):
    """The GFLOP/s of the full-width GEMM counted every row but multiplied only whole blocks
    per thread: at 2,000 rows none (3298 GFLOP/s printed), at 3,000 rows 2,048."""
    multiplied = []
    matmul = np.matmul

    def counting(rows, columns, out):
        multiplied.append(len(rows))
        return matmul(rows, columns, out=out)

    monkeypatch.setattr(np, "matmul", counting)
    rows = np.ones((3000, 64), np.float32)
    profile.gemm_only_seconds(rows, np.ones((64, 8), np.float32), num_threads=2, repeats=1)
    assert sum(multiplied) == 3000


def test_the_grid_skips_the_torch_routes_where_a_class_has_no_rows(monkeypatch):
    """With the stricter check a torch route's NaN NC1 (a class without rows among the
    checked rows: its NCC takes the NaN mean, a limit of that route) stopped the whole
    ``python -m bench`` run; ``bench_shapes`` skips the route there, and so does the grid."""
    pytest.importorskip("torch")
    from rich.console import Console

    from bench import suite
    bench = suite.Bench(1, (), Console(quiet=True))
    monkeypatch.setattr(bench, "measure_rates", lambda num_features, num_outputs: None)
    with pytest.warns(UserWarning, match="classes have no rows"):  # ncfast's, on those
        (row,), _ = bench.measure((2000, 16, 500), (False,), ["ncfast", "torch-gemm"])
    assert "ncfast" in row.seconds and "torch-gemm" not in row.seconds
    assert row.skipped == {"torch-gemm": "a class has no rows in the first 2,000 rows (its "
                                         "NCC would take the NaN mean)"}
