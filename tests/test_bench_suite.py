"""``python -m bench``'s chart: every route's time over the floor, per size."""
import pytest

pytest.importorskip("torch")

from bench import suite  # noqa: E402


def test_the_chart_draws_every_timed_route_and_hollows_scaled_times():
    rows = [suite.Row(100_000, 512, 100, True, floor=0.5,
                      seconds={"ncfast": 0.6, "textbook": 9.0},
                      sampled_rows={"ncfast": 100_000, "textbook": 20_000}),
            suite.Row(1_000_000, 512, 100, False, floor=2.0,
                      seconds={"ncfast": 2.4, "textbook": 80.0},
                      sampled_rows={"ncfast": 1_000_000, "textbook": 1_000_000})]
    axes = suite.plot(rows).axes[0]
    series = {collection.get_label(): collection for collection in axes.collections}
    assert sorted(series) == ["ncfast", "textbook",
                              "textbook, time scaled up to N from its leading rows"]
    assert series["ncfast"].get_offsets()[:, 1].tolist() == pytest.approx([1.2, 1.2])
    scaled = series["textbook, time scaled up to N from its leading rows"]
    assert scaled.get_offsets().tolist() == [[0.0, 18.0]]
    assert scaled.get_facecolors().size == 0  # hollow
    assert [label.get_text() for label in axes.get_xticklabels()] == [
        "1e+05×512×100\nW", "1e+06×512×100"]
    assert axes.get_yscale() == "log"
