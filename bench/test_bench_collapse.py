"""pytest-benchmark suite: every route on a few sizes, one group per size.

Run with timing on (the project's pytest options disable it by default)::

    python -m pytest bench -q --benchmark-enable

Each benchmark first runs its route on the whole input and checks the result
against the textbook route (which also warms the JIT), then times it.
The floor of the machine is in ``python -m bench``'s table, not here.
"""
import functools

import pytest

from bench.data import collapsed_features
from bench.routes import ROUTES, check

SIZES = [(20_000, 128, 10), (100_000, 512, 100)]
LIBS = ("ncfast", "textbook", "torch", "torch-gemm")
#: Rounds per benchmark; the textbook and torch routes are slow.
ROUNDS = {"ncfast": 3, "textbook": 1, "torch": 1, "torch-gemm": 1}


@functools.cache
def _case(size, classifier):
    features, labels, weights, bias = collapsed_features(*size, classifier=classifier)
    reference = ROUTES["textbook"](features, labels, size[2], weights, bias)
    return features, labels, weights, bias, reference


@pytest.mark.parametrize("classifier", [True, False], ids=["W", "noW"])
@pytest.mark.parametrize("size", SIZES, ids=lambda size: "N{}-D{}-C{}".format(*size))
@pytest.mark.parametrize("lib", LIBS)
def test_collapse(benchmark, lib, size, classifier):
    features, labels, weights, bias, reference = _case(size, classifier)
    benchmark.group = "N={} D={} C={} ".format(*size) + ("with W" if classifier else "no W")
    arguments = (features, labels, size[2], weights, bias)
    run = ROUTES[lib]
    result = run(*arguments)
    if lib != "textbook":
        check(lib, result, reference)
    benchmark.pedantic(run, args=arguments, rounds=ROUNDS[lib], iterations=1)
