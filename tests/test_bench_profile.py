"""``python -m bench.profile`` runs on each pass-2 kernel and times every stage."""
import re

import numpy as np
import pytest

from bench import profile

STAGES = {
    "narrow": ("residuals", "products", "far rows", "epilogue"),
    "BLAS": ("residuals", "gemm", "far NCC", "far classifier", "epilogue"),
    "features (BLAS)": ("residuals and coordinates", "far NCC", "far classifier", "tally"),
}


@pytest.mark.parametrize("features, classes, kernel", [
    (512, 4, "narrow"),
    (64, 40, "BLAS"),
    (16, 40, "features (BLAS)"),
])
@pytest.mark.parametrize("spread", [0.5, 4.0])
def test_profile_times_every_stage_of_the_kernel(capsys, features, classes, kernel, spread):
    profile.main(["--rows", "3000", "--features", str(features), "--classes", str(classes),
                  "--repeats", "1", "--spread", str(spread)])
    printed = capsys.readouterr().out
    assert f"pass-2 kernel={kernel}\n" in printed
    stage_line = next(line for line in printed.splitlines() if line.startswith("pass 2 stages"))
    times = dict(re.fullmatch(r"(.+) (\d+\.\d+) s", stage).groups()
                 for stage in stage_line.split(":", 1)[1].strip().split("  "))
    assert tuple(times) == STAGES[kernel]
    assert all(float(seconds) >= 0 for seconds in times.values())
    in_cache = [line for line in printed.splitlines() if line.startswith("narrow kernel")]
    assert len(in_cache) == (kernel == "narrow")


def test_the_kernel_in_cache_counts_its_rows_once_a_time():
    """``narrow_in_cache_seconds`` drives the real kernel: once over the cached rows it adds
    what pass 2 adds for them, and each time adds each row once."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((300, 512)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    stats = profile.ResidualStats(profile.Geometry.from_class_sums(
        np.bincount(labels, minlength=4),
        np.stack([features[labels == c].sum(axis=0, dtype=np.float64) for c in range(4)])))
    assert profile.runs_narrow_kernel(stats.plan.classes_route())
    rows = profile.CACHED_ROWS
    once = profile.cached_kernel_arguments(features, labels, stats)
    profile._narrow_blocks_again(1, *once)
    reference = profile.ResidualStats(stats.plan)
    reference.update(features[:rows], labels[:rows])
    for name in stats.sum_names:
        np.testing.assert_allclose(getattr(once[-1], name), getattr(reference, name),
                                   rtol=1e-12, err_msg=name)
    thrice = profile.cached_kernel_arguments(features, labels, stats)
    profile._narrow_blocks_again(3, *thrice)
    np.testing.assert_array_equal(thrice[-1].counts, 3 * reference.counts)
    assert profile.narrow_in_cache_seconds(features, labels, stats, repeats=1) > 0


def test_plain_class_sums_are_the_class_sums():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1001, 24)).astype(np.float32)
    labels = rng.integers(0, 7, 1001)
    expected = np.zeros((7, 24))
    np.add.at(expected, labels, features.astype(np.float64))
    for slices in (1, 2, 5):
        np.testing.assert_allclose(profile._plain_class_sums(features, labels, 7, slices),
                                   expected, rtol=1e-12, atol=1e-12)
    assert profile.plain_class_sums_seconds(features, labels, 7, repeats=1) > 0
