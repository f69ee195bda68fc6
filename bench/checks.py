"""How far a benchmark's metrics are from the ones they must equal; NaN never passes.

``abs(value - expected) > tolerance`` is False for a NaN value, and Python's
``max`` drops a NaN that is not first: a comparison written either way lets a
NaN metric through, and the benchmark would time and report a wrong answer.
"""
import math

#: Largest relative difference between two reports of the same rows whose float64 sums were
#: added in another order (Dask blocks, streamed chunks).
REORDERED_RTOL = 1e-10


def metric_error(value, expected, *, absolute=False):
    """The error of one metric: relative to ``max(|expected|, 1e-12)``, or absolute.

    Parameters
    ----------
    value, expected : float or None
        None: a metric not measured (``expected``: not defined for the input).
    absolute : bool
        Fractions of rows (accuracies) are compared absolutely.

    Returns
    -------
    float
        0 where both are the same infinity, both NaN or both None; ``inf`` where
        only one of them is finite, or only one is None.
    """
    if value is None or expected is None:
        return 0.0 if value is expected else math.inf
    value, expected = float(value), float(expected)
    if not (math.isfinite(value) and math.isfinite(expected)):
        same = value == expected or (math.isnan(value) and math.isnan(expected))
        return 0.0 if same else math.inf
    scale = 1.0 if absolute else max(abs(expected), 1e-12)
    return abs(value - expected) / scale


def worst_metric_error(results, references):
    """The largest relative ``metric_error`` of ``results`` over every metric of ``references``.

    Parameters
    ----------
    results, references : dict of str to float
        A metric of ``references`` missing from ``results`` counts as ``inf``.

    Returns
    -------
    float
    """
    if not references:
        return math.inf
    return max(metric_error(results.get(name), expected) for name, expected in references.items())
