"""``python -m bench.profile`` runs on each pass-2 kernel and times every stage."""
import re

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
