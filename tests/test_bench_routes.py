"""The benchmark's torch routes (``bench.torch_route``) against the textbook route."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import torch_route  # noqa: E402
from bench.data import collapsed_features  # noqa: E402
from bench.routes import ROUTES, check  # noqa: E402

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 3000, 32, 7


@pytest.fixture(scope="module")
def problem():
    """A small random problem with a classifier, and the textbook route's metrics on it."""
    features, labels, weights, bias = collapsed_features(NUM_ROWS, NUM_FEATURES, NUM_CLASSES,
                                                         seed=5)
    reference = ROUTES["textbook"](features, labels, NUM_CLASSES, weights, bias)
    return (features, labels, NUM_CLASSES, weights, bias), reference


@pytest.mark.parametrize("route", ["torch", "torch-gemm"])
def test_torch_routes_match_textbook(problem, route):
    arguments, reference = problem
    result = ROUTES[route](*arguments)
    assert set(result) == {"nc1", "nc1_trace", "cdnv", "ncc_accuracy", "nc4", "accuracy"}
    check(route, result, reference)


def test_broadcast_sub_batches_give_the_same_distances(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(1000, NUM_FEATURES, generator=generator)
    means = torch.randn(NUM_CLASSES, NUM_FEATURES, generator=generator)
    whole = torch_route.broadcast_distances(batch, means)
    # Room for 64 rows' differences and squares: 16 sub-batches, the last one short.
    monkeypatch.setattr(torch_route, "BROADCAST_BYTES", 64 * 2 * 4 * NUM_CLASSES * NUM_FEATURES)
    sub_batched = torch_route.broadcast_distances(batch, means)
    assert sub_batched.shape == (1000, NUM_CLASSES)
    np.testing.assert_allclose(sub_batched.numpy(), whole.numpy(), rtol=1e-6)
    np.testing.assert_allclose(torch_route.gemm_distances(batch, means).numpy(), whole.numpy(),
                               rtol=1e-4, atol=1e-3)


def test_unknown_ncc_variant_is_refused(problem):
    (features, labels, num_classes, _, _), _ = problem
    with pytest.raises(ValueError, match="ncc must be one of"):
        torch_route.torch_collapse(features, labels, num_classes=num_classes, ncc="cdist")


def test_bench_dir_options_refuse_a_missing_folder(tmp_path):
    """``--dir /nonexistent`` ended in tempfile's traceback."""
    for module in ("bench.bench_analyze", "bench.bench_dask"):
        done = subprocess.run([sys.executable, "-m", module, "--dir", str(tmp_path / "none")],
                              capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"argument --dir: '{tmp_path / 'none'}' is not an existing folder" in done.stderr
