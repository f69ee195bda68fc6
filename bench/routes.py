"""The implementations the benchmarks compare, behind one signature.

Each route takes ``(features, labels, num_classes, weights, bias)`` and
returns a dict of scalar metrics; ``check`` compares a route's metrics with
the textbook route's.
"""
import contextlib

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits

import ncfast
from bench.checks import metric_error
from bench.torch_route import torch_collapse
from ncfast.textbook import textbook_collapse

#: Relative tolerance of each route against the float64 textbook route: ncfast
#: is held to the design's 1e-5 (docs/metrics.md); both torch routes accumulate
#: in float32 (their library's default), and the D×D pseudo-inverse of float32 covariances
#: loses a few more digits.
TOLERANCES = {"ncfast": 1e-5, "torch": 1e-2, "torch-gemm": 1e-2}

#: Rows of the slice that warms every JIT (Numba, BLAS, torch) before timing.
WARM_ROWS = 4096


def run_ncfast(features, labels, num_classes, weights, bias):
    return ncfast.collapse(features, labels, num_classes=num_classes, weights=weights,
                           bias=bias).metrics()


def run_textbook(features, labels, num_classes, weights, bias):
    result = textbook_collapse(features, labels, num_classes=num_classes, weights=weights,
                               bias=bias)
    return {name: value for name, value in result.items() if isinstance(value, float)}


def run_torch(features, labels, num_classes, weights, bias):
    """The torch library's route with broadcast NCC distances, as its issue describes it."""
    return torch_collapse(features, labels, num_classes=num_classes, weights=weights,
                          bias=bias, ncc="broadcast")


def run_torch_gemm(features, labels, num_classes, weights, bias):
    """The torch library's route with its own NCC formula ``||x||^2 + ||mu||^2 - 2 x.mu``."""
    return torch_collapse(features, labels, num_classes=num_classes, weights=weights,
                          bias=bias, ncc="gemm")


ROUTES = {"ncfast": run_ncfast, "textbook": run_textbook, "torch": run_torch,
          "torch-gemm": run_torch_gemm}


def empty_class_obstacle(labels, num_rows, num_classes):
    """Why the torch routes cannot run on the first ``num_rows`` rows, or None: a class
    without rows there (their NCC takes its NaN mean, a limit of that route).

    Parameters
    ----------
    labels : int array of shape (N,)
    num_rows, num_classes : int
    """
    if np.count_nonzero(np.bincount(labels[:num_rows], minlength=num_classes)) < num_classes:
        return (f"a class has no rows in the first {num_rows:,} rows (its NCC would take the "
                "NaN mean)")
    return None


#: Metrics that are fractions of rows: compared with an absolute tolerance.
FRACTIONS = ("ncc_accuracy", "accuracy", "nc4")


def check(name, result, reference):
    """Raise AssertionError unless ``result`` matches ``reference`` within the route's tolerance.

    Every metric of the reference that the route returns is compared
    (``bench.checks.metric_error``): fractions of rows absolutely, the others
    relative to the larger of their magnitude and 1e-12 (metrics that are zero
    up to rounding); a NaN or infinite value passes only where the reference
    has the same. ncfast must return every metric of the reference; a torch
    route some of them (at least one).
    """
    tolerance = TOLERANCES[name]
    compared = 0
    for metric, expected in reference.items():
        value = result.get(metric)
        if value is None and name != "ncfast":
            continue  # not a metric this route measures
        compared += 1
        error = metric_error(value, expected, absolute=metric in FRACTIONS)
        if not error <= tolerance:
            raise AssertionError(f"{name}: {metric} = {value!r}, textbook {expected!r} (error "
                                 f"{error:.2e} > {tolerance:g})")
    if compared == 0:
        raise AssertionError(f"{name}: returned none of the textbook's metrics "
                             f"({', '.join(sorted(reference))})")


@contextlib.contextmanager
def thread_limit(num_threads):
    """Run numba, BLAS and torch on ``num_threads`` threads inside the block."""
    previous_numba, previous_torch = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        with threadpool_limits(num_threads):
            yield
    finally:
        numba.set_num_threads(previous_numba)
        torch.set_num_threads(previous_torch)
