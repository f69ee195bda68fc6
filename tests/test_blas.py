"""``ncfast.kernels.blas``: the float32 GEMM of the pass-2 kernels (numpy's BLAS, or the
compiled fallback through Numba's ``np.dot``)."""
import ctypes
import glob
import os

import numpy as np
import pytest
from numba.core.errors import TypingError

from ncfast.kernels import blas

SHAPES = [(5, 7, 3), (256, 64, 10), (1, 1, 1), (0, 4, 3), (4, 0, 3), (4, 3, 0)]


def _product(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, k), dtype=np.float32),
            rng.standard_normal((k, n), dtype=np.float32))


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_sgemm_is_the_float32_product(m, k, n):
    rows, matrix = _product(m, k, n)
    out = np.full((m, n), np.nan, np.float32)
    blas.sgemm(rows, matrix, out)
    reference = rows.astype(np.float64) @ matrix.astype(np.float64)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5 * np.sqrt(max(k, 1)))


def test_sgemm_refuses_shapes_that_do_not_match():
    rows, matrix = _product(4, 3, 2)
    out = np.zeros((4, 2), np.float32)
    for wrong in ((rows, matrix[:2], out), (rows, matrix, out[:3]),
                  (rows, matrix, np.zeros((4, 3), np.float32))):
        with pytest.raises(ValueError, match="shapes of rows, matrix and out do not match"):
            blas.sgemm(*wrong)
    assert not out.any()
    with pytest.raises(TypingError, match="sgemm takes C-contiguous 2-D float32 arrays"):
        blas.sgemm(rows.astype(np.float64), matrix, out)
    with pytest.raises(TypingError, match="C-contiguous"):
        blas.sgemm(np.asfortranarray(rows), matrix, out)


def test_sgemm_calls_the_blas_that_numpy_bundles_when_it_has_one():
    package = os.path.dirname(np.__file__)
    bundled = glob.glob(os.path.join(package + ".libs", "libscipy_openblas64_*"))
    assert blas.SOURCE == ("numpy" if bundled else "numba")
    assert (blas.numpy_sgemm_address() is not None) == bool(bundled)


@pytest.mark.parametrize("m, k, n", SHAPES[:4])
def test_fallback_is_the_float32_product(m, k, n):
    """The fallback, called as a C function with the arguments ``sgemm`` passes."""
    rows, matrix = _product(m, k, n, seed=1)
    out = np.full((m, n), np.nan, np.float32)
    pointer = ctypes.POINTER(ctypes.c_float)
    blas._numba_sgemm.ctypes(101, 111, 111, m, n, k, 1.0, rows.ctypes.data_as(pointer), k,
                             matrix.ctypes.data_as(pointer), n, 0.0,
                             out.ctypes.data_as(pointer), n)
    np.testing.assert_allclose(out, rows.astype(np.float64) @ matrix.astype(np.float64),
                               rtol=1e-5, atol=1e-5 * np.sqrt(k))


FALLBACK_SCRIPT = """
import glob, json, sys
glob.glob = lambda *args, **kwargs: []  # numpy's bundled BLAS is not found
sys.path.insert(0, "tests")
import ncfast
from ncfast.kernels import blas
from cases import gaussian_classes
case = gaussian_classes(num_rows=4000, num_features=64, num_classes=30)
report = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                         bias=case["bias"])
print(json.dumps({"source": blas.SOURCE, "nc1": report.nc1, "nc1_trace": report.nc1_trace,
                  "ncc_accuracy": report.ncc_accuracy, "accuracy": report.accuracy}))
"""


def test_kernels_run_on_the_fallback_where_numpy_bundles_no_blas():
    """Another process where numpy's BLAS is not found: the same kernels (from Numba's
    cache or compiled afresh) call the fallback, and give the same report."""
    import json
    import subprocess
    import sys

    from cases import gaussian_classes

    import ncfast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=root, check=True,
                          capture_output=True, text=True)
    fallback = json.loads(done.stdout)
    assert fallback.pop("source") == "numba"
    case = gaussian_classes(num_rows=4000, num_features=64, num_classes=30)
    report = ncfast.collapse(case["features"], case["labels"], weights=case["weights"],
                             bias=case["bias"])
    for name, value in fallback.items():
        assert value == pytest.approx(getattr(report, name), rel=1e-5), name
