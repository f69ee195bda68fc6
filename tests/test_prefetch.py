"""The software prefetch of ``ncfast.kernels.prefetch``: every line once, nothing changed."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from ncfast.kernels import prefetch


@settings(deadline=None)  # the first example compiles share_bounds (0.3 s on a cold cache)
@given(num_lines=st.integers(0, 5000), parts=st.integers(1, 300))
def test_shares_cover_every_line_once_in_order(num_lines, parts):
    bounds = [prefetch.share_bounds(num_lines, part, parts) for part in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_lines
    for (_, last), (first, _) in zip(bounds, bounds[1:]):
        assert last == first
    sizes = [last - first for first, last in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1


@njit
def _prefetch_all(array, parts):
    for part in range(parts):
        prefetch.prefetch_share(array, part, parts)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("shape", [(0, 7), (7, 0), (1, 1), (13, 33), (64, 512)])
def test_prefetching_rows_changes_nothing(dtype, shape):
    array = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    before = array.copy()
    for view in (array, array[::2], array[:, 1:]):
        _prefetch_all(view, 5)
    np.testing.assert_array_equal(array, before)
