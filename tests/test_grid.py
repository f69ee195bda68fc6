"""Grids of seeded runs: naming, parallel training, resuming after an interruption."""
import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from ncfast.harness import TrainConfig, train

torch = pytest.importorskip("torch")

from ncfast.dumps import open_run  # noqa: E402
from ncfast.harness import grid, training  # noqa: E402

#: Well under a second a run: 3 Gaussian classes, a one-layer MLP, 6 epochs.
TINY = TrainConfig(dataset="gaussian", num_samples=120, num_features=6, num_classes=3,
                   width=8, depth=1, epochs=6, batch_size=32, checkpoints=3)

SETTINGS = {"slow": TINY, "fast": dataclasses.replace(TINY, lr=0.2)}


def _final_features(record):
    return open_run(record.path).checkpoints[-1].splits["train"].features["penultimate"].read()


def test_seeded_runs_cross_every_setting_with_every_seed():
    runs = grid.seeded_runs(SETTINGS, 3)
    assert [run.name for run in runs] == [f"{setting}_seed{seed}" for setting in SETTINGS
                                          for seed in range(3)]
    assert [run.config.seed for run in runs] == [0, 1, 2, 0, 1, 2]
    assert runs[4].config == dataclasses.replace(SETTINGS["fast"], seed=1)


def test_a_grid_in_a_log_prints_a_line_per_finished_run(tmp_path, capsys):
    """Rich draws its bar in a log only when it ends: nothing was printed while the runs
    trained (minutes to hours)."""
    runs = grid.seeded_runs(SETTINGS, 1)
    grid.run_grid(runs, str(tmp_path), workers=1, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["runs: 1/2 done", "runs: 2/2 done"]
    assert [line.split(" (")[1].split(",")[0] for line in lines] == [run.name for run in runs]


@pytest.mark.parametrize("seeds", [0, -1, 2.0, True])
def test_seed_count_must_be_a_positive_int(seeds):
    with pytest.raises(ValueError, match="seeds must be a positive int"):
        grid.seeded_runs(SETTINGS, seeds)


def test_grid_trains_every_run_once_and_reads_finished_runs_back(tmp_path, monkeypatch):
    runs = grid.seeded_runs(SETTINGS, 2)
    records, timing = grid.run_grid(runs, str(tmp_path), workers=1, progress=False)
    assert list(records) == [run.name for run in runs]
    assert (timing.trained, timing.reused, timing.workers, timing.device) == (4, 0, 1, "cpu")
    for run in runs:
        record = records[run.name]
        assert record.path == str(tmp_path / "runs" / run.name) and record.trained_now
        stored = json.loads((tmp_path / "runs" / run.name / "result.json").read_text())
        assert stored["config"] == run.config.to_dict()
        assert stored["test_accuracy"] == record.test_accuracy
        assert record.cpu_seconds > 0 and record.seconds > 0

    monkeypatch.setattr(training, "_train_epoch", None)  # would fail if called
    again, timing = grid.run_grid(runs, str(tmp_path), workers=1, progress=False)
    assert (timing.trained, timing.reused) == (0, 4)
    for name, record in records.items():
        assert again[name] == dataclasses.replace(record, trained_now=False)


def test_interrupted_grid_resumes_to_the_same_results(tmp_path, monkeypatch):
    runs = grid.seeded_runs(SETTINGS, 2)
    reference, _ = grid.run_grid(runs, str(tmp_path / "reference"), workers=1,
                                 progress=False)
    original_epoch, epochs_run = training._train_epoch, []

    def interrupted_epoch(*args, **kwargs):
        if len(epochs_run) == 10:
            raise KeyboardInterrupt  # in epoch 5 of the second run
        epochs_run.append(1)
        return original_epoch(*args, **kwargs)

    monkeypatch.setattr(training, "_train_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        grid.run_grid(runs, str(tmp_path / "run"), workers=1, progress=False)
    second = tmp_path / "run" / "runs" / runs[1].name
    assert not (second / "result.json").exists()
    assert [item.epoch for item in open_run(second).checkpoints] == [1, 2]

    monkeypatch.setattr(training, "_train_epoch", original_epoch)
    resumed, timing = grid.run_grid(runs, str(tmp_path / "run"), workers=1, progress=False)
    assert (timing.trained, timing.reused) == (3, 1)
    for name, record in reference.items():
        assert resumed[name].test_accuracy == record.test_accuracy
        assert resumed[name].terminal_epoch == record.terminal_epoch
        np.testing.assert_array_equal(_final_features(resumed[name]), _final_features(record))


def test_parallel_workers_give_the_results_of_one(tmp_path):
    runs = grid.seeded_runs(SETTINGS, 1)
    serial, _ = grid.run_grid(runs, str(tmp_path / "serial"), workers=1, progress=False)
    parallel, timing = grid.run_grid(runs, str(tmp_path / "parallel"), workers=2,
                                     progress=False)
    assert timing.workers == 2 and timing.trained == 2
    for name, record in serial.items():
        assert parallel[name].train_accuracy == record.train_accuracy
        np.testing.assert_array_equal(_final_features(parallel[name]), _final_features(record))


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "workers must be a positive int"),
    ({"workers": 1.5}, "workers must be a positive int"),
    ({"device": "tpu"}, "unknown torch device 'tpu'"),
    ({"device": "meta"}, "device must be a cpu or cuda device"),
])
def test_bad_workers_or_device_are_refused_before_training(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        grid.run_grid(grid.seeded_runs(SETTINGS, 1), str(tmp_path / "out"), progress=False,
                      **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_and_auto_falls_back_to_cpu(tmp_path):
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        grid.run_grid(grid.seeded_runs(SETTINGS, 1), str(tmp_path / "out"), device="cuda",
                      progress=False)
    assert grid.resolve_device("auto") == "cpu"


def test_a_grid_naming_a_run_twice_is_refused(tmp_path):
    run = grid.seeded_runs({"a": TINY}, 1)[0]
    with pytest.raises(ValueError, match="names some run twice"):
        grid.run_grid([run, run], str(tmp_path), progress=False)


def test_a_folder_holding_another_run_is_refused(tmp_path):
    run = grid.seeded_runs({"a": TINY}, 1)[0]
    train(dataclasses.replace(TINY, lr=0.3), tmp_path / "runs" / run.name, progress=False)
    with pytest.raises(ValueError, match="different config"):
        grid.run_grid([run], str(tmp_path), workers=1, progress=False)


def test_measured_rows_name_their_run(tmp_path):
    runs = grid.seeded_runs({"a": TINY}, 2)
    records, _ = grid.run_grid(runs, str(tmp_path), workers=1, progress=False)
    rows = grid.measure_runs({name: record.path for name, record in records.items()},
                             progress=False)
    assert {row["run"] for row in rows} == {"a_seed0", "a_seed1"}
    history = grid.run_rows(rows, "a_seed1")
    assert [row["epoch"] for row in history] == [1, 2, 6]
    assert grid.final_row(rows, "a_seed1") == history[-1]
    assert not (tmp_path / "metrics.json").exists()  # published with the report, not here


def test_published_outputs_move_in_together_or_not_at_all(tmp_path):
    """A reproduction wrote metrics.json and metrics.csv when it measured, then its figures,
    then report.md: Ctrl-C or an error between them left a report of the earlier run beside
    the metrics of this one."""
    runs = grid.seeded_runs({"a": TINY}, 2)
    records, _ = grid.run_grid(runs, str(tmp_path), workers=1, progress=False)
    rows = grid.measure_runs({name: record.path for name, record in records.items()},
                             progress=False)
    with grid.published(str(tmp_path), rows[:1]) as staging:
        (pathlib.Path(staging) / "report.md").write_text("earlier")
    earlier = {name: (tmp_path / name).read_bytes()
               for name in ("metrics.json", "metrics.csv", "report.md")}
    with pytest.raises(KeyboardInterrupt):
        with grid.published(str(tmp_path), rows) as staging:
            (pathlib.Path(staging) / "figure.png").write_bytes(b"drawn")
            raise KeyboardInterrupt  # before the report is written
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert not (tmp_path / "figure.png").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".ncfast-staged")]
    with grid.published(str(tmp_path), rows) as staging:
        (pathlib.Path(staging) / "report.md").write_text("later")
    assert (tmp_path / "report.md").read_text() == "later"
    assert len(json.loads((tmp_path / "metrics.json").read_text())["rows"]) == len(rows)


def test_grid_name_must_be_known():
    assert grid.pick_grid({"quick": 1}, "quick") == 1
    custom = object()
    assert grid.pick_grid({"quick": 1}, custom) is custom
    with pytest.raises(ValueError, match="unknown grid 'huge'; choose one of quick"):
        grid.pick_grid({"quick": 1}, "huge")
