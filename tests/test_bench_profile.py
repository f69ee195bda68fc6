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
