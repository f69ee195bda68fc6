"""Issue 18's grid (``bench.bench_shapes``): its verdict, its floor's flops and a tiny run."""
import json
import math

import pytest

pytest.importorskip("torch")

from bench import bench_shapes, floor, machine  # noqa: E402
from bench.suite import parse_sizes  # noqa: E402


@pytest.mark.parametrize("ncfast_seconds, floor_seconds, limit, expected", [
    (3.0, 2.0, 1.5, (True, False)),    # 1.5x its floor: at the far limit, past 1.25x
    (3.0001, 2.0, 1.5, (False, False)),
    (1.2, 1.0, 1.2, (True, True)),     # at the collapsed limit
    (1.2001, 1.0, 1.2, (False, True)),
    (5.0, 4.0, 1.5, (True, True)),     # floor/ncfast = 0.8: exactly the torch share
    (5.0001, 4.0, 1.5, (True, False)),
    (0.5, 1.0, 1.2, (True, True)),     # under the floor (it counts no overhead)
])
def test_verdict_at_and_past_each_limit(ncfast_seconds, floor_seconds, limit, expected):
    assert bench_shapes.verdict(ncfast_seconds, floor_seconds, limit) == expected


def test_torch_target_is_the_issue_inequality_for_any_torch_time():
    for ncfast_seconds, floor_seconds in [(5.0, 4.0), (6.0, 4.0), (4.4, 4.0), (30.0, 2.0)]:
        meets_torch = bench_shapes.verdict(ncfast_seconds, floor_seconds, 1.5)[1]
        for torch_seconds in (7.0, 50.0, 3e3):
            lead, allowed = torch_seconds / ncfast_seconds, torch_seconds / floor_seconds
            assert meets_torch == (lead >= bench_shapes.TORCH_SHARE * allowed - 1e-12)


@pytest.mark.parametrize("num_classes, spread, limit", [
    (10, "collapsed", 1.5), (32, "far", 1.5), (33, "collapsed", 1.2), (1000, "far", 1.5)])
def test_floor_limit(num_classes, spread, limit):
    assert bench_shapes.floor_limit(num_classes, spread) == limit


def test_unavoidable_flops_of_each_route():
    flops = bench_shapes.unavoidable_flops
    # Classes route (C' <= D): the NC1 projection; far from collapse also the classifier,
    # and the C'×C' map between the projection and the NCC products (z = V a).
    assert flops(100, 2048, 1000, 1000, collapsed=True) == 2 * 100 * 2048 * 1000
    assert flops(100, 2048, 900, 1000, collapsed=False) == (2 * 100 * 2048 * 1900
                                                            + 2 * 100 * 900 ** 2)
    # Features route (C' > D): NC1's coordinates in Sigma_B's eigenbasis (the floor may
    # take a float64 scatter instead: the test below), plus NCC distances and logits far away.
    assert flops(100, 64, 1000, 1000, collapsed=True) == 2 * 100 * 64 ** 2
    assert flops(100, 64, 1000, 1000, collapsed=False) == 2 * 100 * 64 ** 2 + 2 * 100 * 64 * 2000
    # Skinny: nothing beyond the reads.
    assert flops(100, 512, 10, 10, collapsed=False) == 0.0


#: ``(C, route, the GEMM flops besides NC1's, the cheaper NC1 part at a float64 rate of 40
#: and of 60 GFLOP/s)`` at N = 1000, D = 64 far from collapse, float32 at 100 GFLOP/s: NC1
#: in float32 (twice the flops) where float64 runs under half the float32 rate, else a
#: float64 scatter. Features route: NC1's coordinates (2·N·D²) or the D×D scatter (N·D²);
#: classes route: the map z = V a (2·N·C'²) or the C'×C' scatter of z (N·C'²).
FAR_FLOORS = {
    "features": (100, "features", 2 * 1000 * 64 * 200,
                 (2 * 1000 * 64 ** 2 / 100e9, 1000 * 64 ** 2 / 60e9)),
    "classes": (50, "classes", 2 * 1000 * 64 * 100,
                (2 * 1000 * 50 ** 2 / 100e9, 1000 * 50 ** 2 / 60e9)),
}


@pytest.mark.parametrize("dgemm", [40e9, 60e9])
@pytest.mark.parametrize("route", FAR_FLOORS)
def test_far_floor_takes_the_faster_float64_nc1(route, dgemm):
    classes, route, other_flops, nc1_seconds = FAR_FLOORS[route]
    row = bench_shapes.Row(
        f"1e3x64x{classes}", "", 1000, 64, classes, "far", classes, route, 1000 * 64 * 4,
        bench_shapes.unavoidable_flops(1000, 64, classes, classes, False),
        scatter_flops=bench_shapes.float64_scatter_flops(1000, 64, classes, classes, False))
    run = bench_shapes.ShapesRun(repeats=1, torch_rows=0, progress=None)
    run.bandwidth, run.square_sgemm, run.square_dgemm = 1e12, 100e9, dgemm
    run.finish(row)
    expected_nc1 = nc1_seconds[0] if dgemm == 40e9 else nc1_seconds[1]
    assert row.floor_gemm_seconds == pytest.approx(other_flops / 100e9 + expected_nc1)
    assert row.floor_seconds == pytest.approx(row.floor_read_seconds + row.floor_gemm_seconds)


def test_no_float64_scatter_where_the_floor_has_no_map():
    scatter = bench_shapes.float64_scatter_flops
    assert scatter(1000, 64, 50, 50, collapsed=True) == 0.0    # classes route, collapsed
    assert scatter(1000, 512, 10, 10, collapsed=False) == 0.0  # C <= 32: the reads alone
    assert scatter(1000, 64, 100, 100, collapsed=True) == 1000 * 64 ** 2  # features route


def test_shape_names_are_what_shapes_takes():
    for shape in [*bench_shapes.SHAPES, (120_000, 64, 10), (123_456, 64, 10)]:
        assert parse_sizes(bench_shapes.shape_text(shape)) == [shape]
    assert bench_shapes.shape_text((200_000, 4096, 32_000)) == "2e5x4096x32000"


@pytest.fixture
def quick_rates(tmp_path, monkeypatch):
    """Machine rates on small arrays (the numbers are not the point here); results in tmp_path."""
    monkeypatch.setattr(floor, "BANDWIDTH_BYTES", 1 << 22)
    monkeypatch.setattr(bench_shapes, "SQUARE_SIDE", 128)
    monkeypatch.setattr(bench_shapes, "SGEMM_ROWS", 256)
    monkeypatch.setattr(machine, "RESULTS", tmp_path)


def test_tiny_scaled_run_writes_finite_rows(quick_rates):
    # Issue 18's skinny shape, and a small GEMM-bound one on the features route (C' > D).
    path = bench_shapes.main(["--shapes", "1e6x512x10,1e6x64x100", "--scale", "1000",
                              "--repeats", "1", "--torch-rows", "800"])
    document = json.loads(path.read_text())
    assert document["scale"] == 1000
    assert path.with_suffix(".png").stat().st_size > 0
    rows = document["rows"]
    assert [(row["shape"], row["spread"], row["rows"], row["route"]) for row in rows] == [
        ("1e6x512x10", "collapsed", 1000, "classes"), ("1e6x512x10", "far", 1000, "classes"),
        ("1e6x64x100", "collapsed", 1000, "features"), ("1e6x64x100", "far", 1000, "features")]
    for row in rows:
        for key in ("ncfast_seconds", "floor_seconds", "floor_read_seconds", "torch_seconds",
                    "ncfast/floor", "torch/floor", "torch/ncfast"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["torch_scaled"] and row["torch_rows"] == 800
        assert (row["meets_floor"], row["meets_torch"]) == bench_shapes.verdict(
            row["ncfast_seconds"], row["floor_seconds"], row["limit"])
    assert [row["gemm_flops"] > 0 for row in rows] == [False, False, True, True]
    # At C <= 32 the narrow kernel's arithmetic alone, and the least time it allows.
    for row in rows[:2]:
        assert math.isfinite(row["arithmetic_seconds"]) and row["arithmetic_seconds"] > 0
        assert row["arithmetic_bound_seconds"] == row["floor_read_seconds"] + max(
            row["floor_read_seconds"], row["arithmetic_seconds"])
    assert all(row["arithmetic_seconds"] is None and row["arithmetic_bound_seconds"] is None
               for row in rows[2:])


def test_torch_route_is_not_run_where_a_class_has_no_rows(quick_rates):
    path = bench_shapes.main(["--shapes", "1e5x64x1000", "--scale", "1000", "--spreads", "far",
                              "--repeats", "1"])
    (row,) = json.loads(path.read_text())["rows"]
    assert row["classes_with_rows"] < 1000 and math.isfinite(row["ncfast_seconds"])
    assert row["torch_seconds"] is None and row["torch/ncfast"] is None
    assert "no rows" in row["torch_skipped"]


def test_a_row_whose_check_fails_is_not_timed(quick_rates, monkeypatch, capsys):
    def failing_check(name, result, reference):
        raise AssertionError(f"{name}: made up")

    monkeypatch.setattr(bench_shapes, "check", failing_check)
    path = bench_shapes.main(["--shapes", "1e6x64x10", "--scale", "1000", "--spreads", "far",
                              "--repeats", "1"])
    (row,) = json.loads(path.read_text())["rows"]
    assert row["check_failed"] == "ncfast: made up"
    assert row["torch_skipped"] == "its check failed: torch-gemm: made up"
    assert row["ncfast_seconds"] is None and row["ncfast/floor"] is None
    assert row["meets_floor"] is None and math.isfinite(row["floor_seconds"])
    assert bench_shapes.failed_checks(path) == [row]  # python -m bench.bench_shapes exits 1
    assert "check failed on 1e6x64x10 far" in capsys.readouterr().err


def _plotted_row(spread, ncfast_seconds, floor_seconds, torch_seconds=None, torch_rows=None):
    """A finished row of 200,000 × 4096 × 32,000 with these times, for ``plot``."""
    row = bench_shapes.Row("2e5x4096x32000", "", 200_000, 4096, 32_000, spread, 32_000,
                           "features", 200_000 * 4096 * 4, 1e14)
    row.ncfast_seconds, row.floor_seconds = ncfast_seconds, floor_seconds
    row.torch_seconds, row.torch_rows = torch_seconds, torch_rows
    row.limit = bench_shapes.floor_limit(row.classes, spread)
    return row


def _legend_texts(axes):
    return [text.get_text() for text in axes.get_legend().get_texts()]


def test_plot_draws_time_over_floor_from_the_floor():
    """Run of 2026-11-30 05:30: 164 s over a 121 s floor is 1.36x, not a bar 5x the floor's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [_plotted_row("collapsed", 164.05, 120.74), _plotted_row("far", 513.31, 428.21)]
    figure = bench_shapes.plot(rows, 1.0)
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    bars = axes.patches
    assert [bar.get_y() for bar in bars] == [1.0, 1.0]
    assert [bar.get_y() + bar.get_height() for bar in bars] == pytest.approx(
        [164.05 / 120.74, 513.31 / 428.21])
    assert axes.get_ylim()[0] == pytest.approx(1.0)
    assert axes.get_xlabel()
    assert not [text for text in _legend_texts(axes) if text.startswith("torch")]


def test_plot_marks_the_arithmetic_bound_where_it_was_measured():
    """Run AB, 1e6 x 512 x 10 collapsed: 0.199 s over a 0.0852 s floor, the arithmetic
    bound 0.0426 + 0.104 s; the features-route row has none."""
    skinny = _plotted_row("collapsed", 0.199, 0.0852)
    skinny.floor_read_seconds, skinny.arithmetic_seconds = 0.0426, 0.104
    (axes,) = bench_shapes.plot([skinny, _plotted_row("far", 3.0, 2.0)], 1.0).axes
    (label,) = [text for text in _legend_texts(axes) if text.startswith("least")]
    (bound,) = [line for line in axes.collections if line.get_label() == label]
    (segment,) = bound.get_segments()
    assert segment[:, 1] == pytest.approx([(0.0426 + 0.104) / 0.0852] * 2)
    assert segment[:, 0].max() < 0.5  # over the first row only


def test_plot_legend_says_which_torch_times_are_scaled_up():
    rows = [_plotted_row("collapsed", 3.0, 2.0, 30.0, 200_000),
            _plotted_row("far", 3.0, 2.0, 300.0, 800)]
    (axes,) = bench_shapes.plot(rows, 1.0).axes
    assert [text for text in _legend_texts(axes) if text.startswith("torch")] == [
        "torch route", "torch route, time scaled up to N from its first 800 rows"]
    assert [bar.get_hatch() for bar in axes.patches] == [None, None, None, "//"]
