"""The software prefetch of ``ncfast.kernels.prefetch``: every line once, in order, nothing
changed."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from ncfast.kernels import prefetch


def _line_starts(array):
    """The element each cache line of ``array``'s rows starts at, in row order."""
    step = max(1, prefetch.CACHE_LINE_BYTES // array.itemsize)
    return [(row, column) for row in range(array.shape[0])
            for column in range(0, array.shape[1], step)]


@njit
def _prefetch_in_shares(array, parts):
    """Every share in turn, as a loop of ``parts`` steps does; the cursor after each."""
    per_share = prefetch.lines_per_share(array, parts)
    row = column = 0
    cursors = []
    for _ in range(parts):
        row, column = prefetch.prefetch_lines(array, row, column, per_share)
        cursors.append((row, column))
    return cursors


@settings(deadline=None)  # the first example compiles the cursor (about 1 s on a cold cache)
@given(num_rows=st.integers(0, 40), num_columns=st.integers(0, 70),
       dtype=st.sampled_from([np.float32, np.float64, np.int8]), parts=st.integers(1, 50))
def test_shares_walk_every_line_once_in_row_order(num_rows, num_columns, dtype, parts):
    """Each share takes the next ``ceil(lines / parts)`` lines (fewer, or none, at the end),
    so the shares together reach the end of the rows: the cursor after share ``p`` is the
    start of line ``(p + 1) · lines_per_share``, or ``(rows, 0)`` past the last."""
    array = np.zeros((num_rows, num_columns), dtype)
    starts = _line_starts(array)
    per_share = prefetch.lines_per_share(array, parts)
    assert per_share == -(-len(starts) // parts)
    expected = [starts[line] if line < len(starts) else (num_rows, 0)
                for line in ((part + 1) * per_share for part in range(parts))]
    assert _prefetch_in_shares(array, parts) == expected


@pytest.mark.parametrize("num_columns", [0, 1, 16, 127, 128, 129, 4096])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_row_head_is_its_first_lines_or_the_whole_row(num_columns, dtype):
    """Pass 1 reading rows out of order prefetches the head of each row, in that row only."""
    array = np.zeros((5, num_columns), dtype)
    lines = _line_starts(array[3:4])
    expected = (0, lines[prefetch.HEAD_PREFETCH_LINES][1]) \
        if len(lines) > prefetch.HEAD_PREFETCH_LINES else (1, 0)
    assert prefetch.prefetch_row_head(array, 3) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("shape", [(0, 7), (7, 0), (1, 1), (13, 33), (64, 512)])
def test_prefetching_rows_changes_nothing(dtype, shape):
    array = np.arange(np.prod(shape), dtype=dtype).reshape(shape)
    before = array.copy()
    for view in (array, array[::2], array[:, 1:]):
        _prefetch_in_shares(view, 5)
    np.testing.assert_array_equal(array, before)
