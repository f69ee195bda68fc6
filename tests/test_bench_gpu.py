"""``python -m bench.bench_gpu``'s floor and table, without a GPU (the device run has one
try: a table that fails to render would lose it)."""
import json

import numpy as np
import pytest

from bench import bench_gpu

RATES = {"copy": 4.2e12, "upload": 5.5e10, "sgemm": 5.1e13, "dgemm": 6.0e13}


def test_floor_counts_the_routes_unavoidable_work():
    classes, counted = bench_gpu.floor_seconds((10_000_000, 512, 100), RATES)
    read = 2 * 4 * 10_000_000 * 512 / RATES["copy"]
    assert classes == pytest.approx(read + 2.0 * 10_000_000 * 512 * 200 / RATES["sgemm"])
    assert "fp32" in counted
    features, counted = bench_gpu.floor_seconds((2_000_000, 256, 32_768), RATES)
    flops = 2e6 * 256 ** 2 + 32_768 ** 2 * 256
    assert features == pytest.approx(2 * 4 * 2e6 * 256 / RATES["copy"] + flops / RATES["dgemm"])
    assert "fp64" in counted


def _resident_row(shape, seconds, textbook):
    floor, counted = bench_gpu.floor_seconds(shape, RATES)
    metrics = dict.fromkeys(bench_gpu.SHARED_METRICS, np.float64(0.25))
    return {"shape": list(shape), "route": "classes", "ncfast_seconds": seconds,
            "floor_seconds": floor, "floor_counts": counted,
            "launcher_seconds": dict.fromkeys(bench_gpu.LAUNCHERS, 0.001),
            "torch_seconds": 10 * seconds, "textbook_seconds": 50 * seconds if textbook else None,
            "metrics": {"ncfast": metrics, "torch": {**metrics, "nc4": None},
                        "textbook": {"nc1": 0.25, "ncc_accuracy": 1.0, "nc4": 0.0}
                        if textbook else None}}


def test_table_names_every_shape_target_and_verdict():
    resident = [_resident_row((10_000_000, 512, 100), 0.06, True),
                _resident_row((2_000_000, 2048, 1000), 0.9, False),
                _resident_row((2_000_000, 256, 32_768), 0.4, False)]
    streamed = [{"shape": [10_000_000, 512, 100], "copy_seconds": 0.74,
                 "staging_bytes_per_second": 4e10, "pageable_seconds": 0.9,
                 "page_locked_seconds": 0.85}]
    lines = bench_gpu.render("NVIDIA H200", RATES, resident, streamed)
    text = "\n".join(lines)
    assert "10,000,000 × 512 × 100" in text and "2,000,000 × 256 × 32,768" in text
    assert "(met: ≥ 10)" in text  # 10× the torch route at 32,768 classes
    assert "MISSED: ≤ 1.5" in text  # 0.9 s at 2M × 2048 × 1000 is beyond 1.5× its floor
    assert "from pageable memory: 0.900 s = 1.22× the copy" in text
    assert "from page-locked memory: 0.850 s = 1.15× the copy" in text
    assert "(MISSED: ≤ 1.1)" in text
    json.dumps({"resident": resident, "streamed": streamed, "table": lines})
