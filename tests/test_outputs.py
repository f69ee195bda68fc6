"""What ncfast writes and prints: permissions, never losing results, stderr, readable output.

Every file follows the umask (as ``open()`` would create it) while staying
atomic; a failed analysis leaves an earlier one's results as they were; figures
of an earlier analysis do not linger; errors and progress go to stderr, results
to stdout, in tables that fit 80 columns or as CSV / JSON; an incomplete set
of worker states does not merge silently.
"""
import contextlib
import csv
import errno
import io
import json
import os
import re
import stat

import numpy as np
import pytest

from cases import gaussian_classes, with_label_noise
from ncfast import ClassSums, Geometry, ResidualStats, collapse
from ncfast.analyze import DRAWN_CLASSES, analyze
from ncfast.cli import main
from ncfast.dumps import RunWriter, write_atomically
from ncfast.plots import metric_figure, snapshot_figure, source_labels
from ncfast.report import METRICS
from ncfast.states import load_state, save_state

CLASSES = 4


@contextlib.contextmanager
def umask(mask):
    """Run the block under ``mask``, restoring the previous umask after."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_run(path, epochs=(1, 10), *, noise=True, num_classes=CLASSES, num_features=6):
    """A run folder: train (noisy labels when ``noise``) and test splits, one layer."""
    writer = RunWriter(path, config={"noise": noise}, num_classes=num_classes)
    for epoch in epochs:
        train = gaussian_classes(300, num_features, num_classes, spread=1.0 / epoch, seed=epoch)
        test = gaussian_classes(100, num_features, num_classes, spread=1.0 / epoch, seed=epoch,
                                rows_seed=epoch + 100, classifier=False)
        labels, clean = train["labels"], None
        if noise:
            noisy = with_label_noise(train, rate=0.2, seed=epoch)
            labels, clean = noisy["labels"], noisy["clean_labels"]
        writer.write_checkpoint(
            epoch, {"train": {"features": {"penultimate": train["features"]}, "labels": labels,
                              "clean_labels": clean},
                    "test": {"features": {"penultimate": test["features"]},
                             "labels": test["labels"]}},
            weights=train["weights"], bias=train["bias"])
    return str(path)


def _analyze_cli(*arguments):
    return main(["analyze", *map(str, arguments), "--no-progress"])


# --- permissions ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027, 0o077])
def test_new_files_get_the_permissions_open_gives_under_the_umask(tmp_path, mask):
    with umask(mask):
        write_atomically(str(tmp_path / "new.bin"), lambda stream: stream.write(b"x"))
        with open(tmp_path / "by_open.bin", "wb"):
            pass
    assert _mode(tmp_path / "new.bin") == 0o666 & ~mask == _mode(tmp_path / "by_open.bin")
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_a_rewritten_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    with umask(0o077):
        write_atomically(str(path), lambda stream: stream.write(b"new"))
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_a_failed_write_leaves_the_previous_file_and_a_good_one_is_synced(tmp_path,
                                                                         monkeypatch):
    """A write that fails midway leaves the good file and no temporary; one that succeeds
    syncs the new file itself before renaming it, then its folder."""
    path = tmp_path / "result.json"
    path.write_text("good")
    synced = []
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(
        stat.S_ISREG(os.fstat(descriptor).st_mode)))

    def fail_midway(stream):
        stream.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(str(path), fail_midway)
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["result.json"]
    assert synced == []
    write_atomically(str(path), lambda stream: stream.write(b"new"))
    assert path.read_text() == "new" and synced == [True, False]


def test_every_file_of_a_run_an_analysis_and_a_state_follows_the_umask(tmp_path):
    with umask(0o022):
        run = _write_run(tmp_path / "run")
        assert _analyze_cli(run, "--out", tmp_path / "out", "--metrics", "nc1") == 0
        save_state(tmp_path / "state.safetensors", ClassSums(3, 2))
    files = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path)
             for name in names]
    assert any(name.endswith("ncfast-cache.json") for name in files)
    assert any(name.endswith(".png") for name in files)
    assert {path: oct(_mode(path)) for path in files} == {path: oct(0o644) for path in files}


# --- a failed analysis never overwrites a good one ------------------------------------------

def _folder_state(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_typo_leaves_the_results_of_an_earlier_analysis_as_they_were(tmp_path, capsys):
    run = _write_run(tmp_path / "run1")
    out = tmp_path / "an1"
    assert _analyze_cli(run, "--out", out, "--metrics", "nc1") == 0
    before = _folder_state(out)
    assert "metrics.json" in before and any(name.endswith(".png") for name in before)
    capsys.readouterr()
    assert _analyze_cli(tmp_path / "run1_typo", "--out", out) == 1
    printed = capsys.readouterr()
    assert _folder_state(out) == before
    assert printed.out == ""
    assert "run1_typo" in printed.err and "left as it was" in printed.err
    assert "wrote" not in printed.err


def test_an_unwritable_out_is_refused_before_anything_is_measured(tmp_path, capsys):
    run = _write_run(tmp_path / "run", epochs=(1,))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert _analyze_cli(run, "--out", blocker / "out") == 1
    assert "cannot write the --out folder" in capsys.readouterr().err
    caches = [name for _, _, names in os.walk(run) for name in names if "cache" in name]
    assert caches == []  # nothing was measured (measuring writes the cache)


def test_figures_of_an_earlier_analysis_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    metrics = ("--metrics", "nc1", "memorization")
    assert _analyze_cli(_write_run(tmp_path / "noisy"), "--out", out, *metrics) == 0
    assert {"memorization.png", "memorization_vs_dilation.png"} <= set(os.listdir(out))
    capsys.readouterr()
    assert _analyze_cli(_write_run(tmp_path / "clean", noise=False), "--out", out, *metrics) == 0
    names = set(os.listdir(out))
    assert not any(name.startswith("memorization") or "noisy" in name for name in names)
    assert "snapshot-clean-epoch10-penultimate-train.png" in names
    removed = re.search(r"removed (\d+) figures of an earlier analysis", capsys.readouterr().err)
    assert removed and int(removed.group(1)) >= 4
    assert _analyze_cli(tmp_path / "clean", "--out", out, "--no-plots") == 0
    assert sorted(os.listdir(out)) == ["metrics.csv", "metrics.json"]


def test_the_users_own_figures_of_those_names_are_kept(tmp_path, capsys):
    """Stale figures were removed by name alone: the user's own nc1.png went with them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "out"
    out.mkdir()
    figure = plt.figure()
    for name in ("accuracy.png", "snapshot-mine.png"):
        figure.savefig(out / name)
    plt.close(figure)
    (out / "nc1_trace.png").write_text("not even a PNG")
    own = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert _analyze_cli(_write_run(tmp_path / "run"), "--out", out, "--metrics", "nc1") == 0
    assert "removed" not in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in own} == own


def test_the_count_of_files_written_is_the_files_there(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    assert _analyze_cli(_write_run(tmp_path / "run"), "--out", out, "--metrics", "nc1") == 0
    written = int(re.search(r"wrote (\d+) files", capsys.readouterr().err).group(1))
    assert written == len(os.listdir(out)) - 1  # all but the user's own folder


# --- stderr, exit status ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["analyze", "merge", "train", "demo", "reproduce"])
def test_help_documents_the_exit_status(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "exit status:" in printed
    for line in ("  0 ", "  1 ", "  2 ", "  130 "):
        assert line in printed


def test_errors_go_to_stderr(tmp_path, capsys):
    assert main(["train", str(tmp_path / "run"), "--noise", "1.5", "--no-progress"]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "noise" in printed.err


# --- merge of worker states -------------------------------------------------------------------

@pytest.fixture
def worker_states(tmp_path):
    """Three workers' pass-2 states built on the means of all their rows."""
    case = gaussian_classes(600, 8, CLASSES, seed=3)
    shards = np.array_split(np.arange(600), 3)
    pass1 = ClassSums(CLASSES, 8)
    for rows in shards:
        pass1 += ClassSums(CLASSES, 8).update(case["features"][rows], case["labels"][rows])
    geometry = Geometry.from_class_sums(pass1.counts, pass1.sums)
    paths = []
    for index, rows in enumerate(shards):
        state = ResidualStats(geometry, weights=case["weights"], bias=case["bias"])
        state.update(case["features"][rows], case["labels"][rows])
        paths.append(str(tmp_path / f"pass2-{index}.safetensors"))
        save_state(paths[-1], state)
    return case, paths


def test_merge_of_every_worker_says_so(worker_states, tmp_path, capsys):
    case, paths = worker_states
    assert main(["merge", *paths, "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr()
    assert "600 rows, every row behind the class means" in printed.err
    (row,) = json.loads((tmp_path / "merged/metrics.json").read_text())["rows"]
    assert row["nc1"] == pytest.approx(collapse(**case).nc1, rel=1e-10)


def test_merge_of_one_worker_of_three_is_refused(worker_states, tmp_path, capsys):
    _, paths = worker_states
    out = tmp_path / "merged"
    assert main(["merge", paths[0], "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and not out.exists()
    assert re.search(r"the pass-2 states hold 200 rows but the class means were built on 600 "
                     r"\(class 0: \d+ of \d+", printed.err)
    assert "a worker's state is missing" in printed.err and "--held-out" in printed.err
    assert main(["merge", paths[0], "--out", str(out), "--held-out"]) == 0
    assert "held-out rows" in capsys.readouterr().err


def test_merge_refuses_a_state_given_twice(worker_states, tmp_path, capsys):
    _, paths = worker_states
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(open(paths[1], "rb").read())
    assert main(["merge", *paths, str(copy), "--out", str(tmp_path / "merged")]) == 1
    assert "holds the same state as" in capsys.readouterr().err


def test_a_merge_that_fails_to_write_leaves_the_earlier_results(worker_states, tmp_path,
                                                                capsys):
    """metrics.csv was replaced before metrics.json failed: new CSV beside the old JSON."""
    _, paths = worker_states
    out = tmp_path / "merged"
    (out / "metrics.json").mkdir(parents=True)
    (out / "metrics.csv").write_text("old,result\n")
    assert main(["merge", *paths, "--out", str(out)]) == 1
    assert (out / "metrics.csv").read_text() == "old,result\n"
    assert "metrics.json" in capsys.readouterr().err


def test_a_pass1_merge_refuses_to_write_over_one_of_its_states(tmp_path, capsys):
    """The merged state replaced its own input: merging again counted its rows twice."""
    case = gaussian_classes(300, 8, CLASSES, seed=5)
    out = tmp_path / "merged"
    out.mkdir()
    paths = [str(out / "pass1.safetensors"), str(tmp_path / "worker-1.safetensors")]
    for path, rows in zip(paths, np.array_split(np.arange(300), 2)):
        save_state(path, ClassSums(CLASSES, 8).update(case["features"][rows],
                                                      case["labels"][rows]))
    given = open(paths[0], "rb").read()
    assert main(["merge", *paths, "--out", str(out)]) == 1
    assert "is the file this merge writes" in capsys.readouterr().err
    assert open(paths[0], "rb").read() == given


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_text("source,epoch,split\nrun,1,train\n"),
     r"a CSV text file starting 'source,epoch,split'"),
    (lambda path: path.mkdir(), r"a folder; expected a pass state"),
    (lambda path: np.save(path, np.zeros(3)), r"a NumPy \.npy array"),
])
def test_state_files_of_another_kind_say_what_they_are(tmp_path, make, message):
    path = tmp_path / "thing.npy"
    make(path)
    with pytest.raises(ValueError, match=message):
        load_state(path)
    with pytest.raises(ValueError, match="expected a pass state written by "
                                         r"ncfast.states.save_state"):
        load_state(path)


def test_a_state_file_this_user_cannot_read_is_told_in_words(tmp_path, monkeypatch, capsys):
    """``ncfast merge`` printed Python's "[Errno 13] Permission denied: 'p2-1.safetensors'"."""
    import ncfast.states as states_module

    path = tmp_path / "pass1-0.safetensors"
    save_state(path, ClassSums(3, 2))

    def unreadable(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

    monkeypatch.setattr(states_module, "open", unreadable, raising=False)
    assert main(["merge", str(path), "--out", str(tmp_path / "merged")]) == 1
    assert f"ncfast merge: {path}: permission denied; make the file readable" in \
        capsys.readouterr().err


def test_a_folder_of_states_names_them(tmp_path):
    save_state(tmp_path / "pass1-0.safetensors", ClassSums(3, 2))
    with pytest.raises(ValueError, match=r"holding 1 \.safetensors file\(s\): pass those"):
        load_state(tmp_path)


# --- printed results --------------------------------------------------------------------------

def test_tables_fit_80_columns_without_breaking_a_number(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    first, second = tmp_path / "a/run", tmp_path / "b/run"
    _write_run(first), _write_run(second)
    assert _analyze_cli(first, second, "--out", tmp_path / "out", "--no-plots") == 0
    printed = capsys.readouterr().out
    assert max(map(len, printed.splitlines())) <= 80
    document = json.loads((tmp_path / "out/metrics.json").read_text())
    for row in document["rows"]:
        for name in ("nc1", "nc2_etf", "memorization", "accuracy"):
            if row[name] is not None:
                assert re.search(rf"(^|\s){re.escape(f'{row[name]:.4g}')}(\s|$)", printed,
                                 re.MULTILINE), (name, row[name])
    assert re.search(r"^\s+a/run\s+1\s+test\s+penultimate", printed, re.MULTILINE)
    assert re.search(r"^\s+b/run\s+10\s+train\s+penultimate", printed, re.MULTILINE)


def test_one_row_prints_vertically(worker_states, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    _, paths = worker_states
    assert main(["merge", *paths, "--out", str(tmp_path / "merged")]) == 0
    printed = capsys.readouterr().out
    assert max(map(len, printed.splitlines())) <= 80
    # The merged states carry no layer or split ("merged, merged / merged" before).
    assert re.search(r"^ *merged *$", printed, re.MULTILINE)
    (row,) = json.loads((tmp_path / "merged/metrics.json").read_text())["rows"]
    for name in ("nc1", "nc2_equiangular_w", "bias_collapse", "ncc_accuracy"):
        assert re.search(rf"^\s+{name}\s+{re.escape(f'{row[name]:.4g}')}\s", printed,
                         re.MULTILINE), name


@pytest.mark.parametrize("command", ["analyze", "merge"])
def test_csv_and_json_formats_print_the_files(worker_states, tmp_path, capsys, command):
    _, paths = worker_states
    out = tmp_path / "out"
    inputs = [_write_run(tmp_path / "run")] if command == "analyze" else paths
    for form in ("csv", "json"):
        arguments = [command, *inputs, "--out", str(out), "--format", form]
        assert main(arguments + (["--no-progress", "--no-plots"] if command == "analyze"
                                 else [])) == 0
        printed = capsys.readouterr().out
        if form == "csv":
            assert list(csv.reader(io.StringIO(printed))) == list(
                csv.reader(io.StringIO((out / "metrics.csv").read_text())))
        else:
            assert json.loads(printed) == json.loads((out / "metrics.json").read_text())


# --- progress ---------------------------------------------------------------------------------

def test_progress_outside_a_terminal_is_plain_lines(tmp_path, capsys):
    run = _write_run(tmp_path / "run", epochs=(1, 2, 3))
    analyze([run], progress=True, use_cache=False)
    printed = capsys.readouterr().err
    lines = printed.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        f"[{epoch}/3] {run} epoch {epoch}" for epoch in (1, 2, 3)]
    assert "\r" not in printed and "bytes" not in printed
    assert re.search(r"of features done, [\d.]+ [kM]B read\)$", lines[-1])
    # From the cache nothing is read, though the checkpoints are done.
    analyze([run], progress=True)
    analyze([run], progress=True)
    assert capsys.readouterr().err.splitlines()[-1].endswith("of features done, 0 bytes read)")


def test_progress_bar_counts_checkpoints_and_measures_bytes(monkeypatch):
    from rich.console import Console

    from ncfast.analyze import _Progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    shown = _Progress(3, 5_000_000, enabled=True)
    shown.bar.advance(shown.checkpoint_task, 1)
    shown.read(1_000_000)
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(shown.bar.make_tasks_table(shown.bar.tasks))
    checkpoints, features = console.file.getvalue().splitlines()
    assert re.search(r"checkpoints .* 1/3\s*$", checkpoints)
    assert "bytes" not in checkpoints and "B" not in checkpoints.split()[-1]
    assert re.search(r"features done .* 1\.0/5\.0 MB", features)


def test_collapse_progress_outside_a_terminal_is_a_line_per_stage(capsys):
    """Pass 1's rows, the class-pair tiles (1100 classes: 3 tiles a side, 6 with i <= j)
    and pass 2's rows; the report is the one without progress, which prints nothing."""
    case = gaussian_classes(3000, 8, 1100, spread=0.5, seed=2)
    chunks = [(case["features"][:1000], case["labels"][:1000]),
              (case["features"][1000:], case["labels"][1000:])]
    quiet = collapse(chunks, num_classes=1100, weights=case["weights"], empty_classes="ignore")
    assert capsys.readouterr().err == ""
    told = collapse(chunks, num_classes=1100, weights=case["weights"], empty_classes="ignore",
                    progress=True)
    assert told == quiet
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r" in [\d.]+ s$", "", line) for line in lines] == [
        "ncfast: pass 1: class sums: 3,000 rows", "ncfast: class pairs: 6 tiles",
        "ncfast: pass 2: residuals: 3,000 rows"]
    noisy = with_label_noise(gaussian_classes(400, 6, CLASSES, seed=3), rate=0.2, seed=3)
    collapse(noisy["features"], noisy["labels"], clean_labels=noisy["clean_labels"],
             progress=True)
    assert [line.split(": ")[1] for line in capsys.readouterr().err.splitlines()] == [
        "pass 1", "class pairs", "class pairs of the clean rows", "pass 2"]
    measured = collapse(noisy["features"], noisy["labels"])
    collapse(noisy["features"], noisy["labels"], means=measured, progress=True)  # no pass 1
    assert [line.split(": ")[1] for line in capsys.readouterr().err.splitlines()] == [
        "class pairs", "pass 2"]


def test_collapse_progress_on_a_terminal_is_bars_counted_from_any_thread(monkeypatch, capsys):
    from ncfast.kernels.cpu import run_tasks
    from ncfast.progress import StageProgress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    shown = StageProgress(True)
    with shown:
        with shown.stage("tiles", 400, "tiles") as advance:
            run_tasks(lambda task: [advance() for _ in range(100)], 4, 2)
        with shown.stage("rows of a chunk source") as advance:
            advance(7)
    # A stage of unknown size ends at its count (its bar kept running, unfinished).
    assert [(task.description, task.completed, task.total, task.fields["unit"], task.finished)
            for task in shown.bars.tasks] == [("tiles", 400, 400, "tiles", True),
                                              ("rows of a chunk source", 7, 7, "rows", True)]
    case = gaussian_classes(300, 6, CLASSES, seed=5)
    assert collapse(case["features"], case["labels"], progress=True) == \
        collapse(case["features"], case["labels"])
    assert "ncfast: pass 1" not in capsys.readouterr().err  # bars (gone at the end), no lines


def test_stage_progress_is_reentrant(monkeypatch):
    """An inner ``with`` of the same StageProgress (``ncfast.distributed``'s
    ``finalize_pass1`` inside ``collapse``) neither restarts nor stops its bars."""
    from ncfast.progress import StageProgress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    shown = StageProgress(True)
    with shown:
        with shown:
            assert shown.bars.live.is_started
        assert shown.bars.live.is_started
        with shown.stage("pass 2", 3) as advance:
            advance(3)
    assert not shown.bars.live.is_started


def test_collapse_progress_under_the_callers_own_bars_is_lines(monkeypatch, capsys):
    """A rich display already running (the caller's Progress) would be drawn over by a
    second one: the stages are then told in lines, which rich prints above its bars."""
    from rich.console import Console
    from rich.progress import Progress

    from ncfast.progress import StageProgress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    case = gaussian_classes(300, 6, CLASSES, seed=6)
    screen = io.StringIO()
    with Progress(console=Console(file=screen, force_terminal=True)) as theirs:
        theirs.add_task("my epochs", total=3)
        assert StageProgress(True).bars is None
        collapse(case["features"], case["labels"], progress=True)
    assert "ncfast: pass 2: residuals: 300 rows in" in screen.getvalue()


@pytest.mark.parametrize("stage", ["pass1", "pass2"])
def test_collapse_progress_tells_a_pass_done_only_once_its_finish_passed(stage, monkeypatch,
                                                                         capsys):
    """A GPU's pass ends with its finish (the wait for the device, the first bad row
    raised): a pass whose finish raises is not told as done."""
    from ncfast.backends.cpu import CpuBackend

    def failing_finish(*args):
        raise ValueError("row 7 of the device's chunk is bad")

    monkeypatch.setattr(CpuBackend, f"finish_{stage}", staticmethod(failing_finish))
    case = gaussian_classes(300, 6, CLASSES, seed=7)
    with pytest.raises(ValueError, match="row 7"):
        collapse(case["features"], case["labels"], progress=True)
    told = capsys.readouterr().err
    assert ("pass 1" in told) == (stage == "pass2") and "pass 2" not in told


def test_collapse_progress_into_the_callers_bars(monkeypatch):
    """``StageProgress(True, bars=...)``: each stage is a bar of the caller's running
    display, removed when it ends; the caller's own bars stay."""
    from rich.console import Console
    from rich.progress import Progress

    from ncfast.progress import StageProgress

    case = gaussian_classes(300, 6, CLASSES, seed=8)
    seen = []
    with Progress(console=Console(file=io.StringIO(), force_terminal=True)) as theirs:
        epochs = theirs.add_task("my epochs", total=3)
        stages = StageProgress(True, bars=theirs)
        original = theirs.add_task

        def add_task(description, **fields):
            seen.append((description, fields.get("total")))
            return original(description, **fields)

        monkeypatch.setattr(theirs, "add_task", add_task)
        report = collapse(case["features"], case["labels"], progress=stages)
        assert [task.id for task in theirs.tasks] == [epochs]
    assert seen == [("pass 1: class sums", 300), ("class pairs", 1), ("pass 2: residuals", 300)]
    assert report == collapse(case["features"], case["labels"])


def test_analyze_shows_the_stages_under_its_bars_on_a_terminal(tmp_path, monkeypatch):
    from ncfast.analyze import _Progress
    from ncfast.progress import NO_PROGRESS, StageProgress

    assert _Progress(1, 10, enabled=True).stages is NO_PROGRESS  # pytest's stderr: lines
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    shown = _Progress(1, 10, enabled=True)
    assert shown.stages.bars is shown.bar and shown.stages.borrowed
    opened, stage = [], StageProgress.stage

    def recorded(self, description="", total=None, unit="rows"):
        opened.append((description, self.borrowed))
        return stage(self, description, total, unit)

    monkeypatch.setattr(StageProgress, "stage", recorded)
    analyze([_write_run(tmp_path / "run", epochs=(1,), noise=False)], progress=True,
            use_cache=False)
    # The train split, then the test split against its means (no pass 1).
    assert opened == [("pass 1: class sums", True), ("class pairs", True),
                      ("pass 2: residuals", True), ("class pairs", True),
                      ("pass 2: residuals", True)]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_collapse_progress_must_be_a_bool(value):
    case = gaussian_classes(100, 4, CLASSES)
    with pytest.raises(TypeError, match="^progress must be True, False or an "
                                        "ncfast.StageProgress; found "):
        collapse(case["features"], case["labels"], progress=value)
    assert collapse(case["features"], case["labels"], progress=np.True_) == \
        collapse(case["features"], case["labels"])


def test_training_progress_outside_a_terminal_is_plain_lines(tmp_path, capsys):
    from test_harness import SMALL

    from ncfast.harness.training import train

    train(SMALL, tmp_path / "run", progress=True)
    printed = capsys.readouterr().err
    assert "\r" not in printed
    assert re.findall(r"epoch (\d+)/2, loss", printed) == ["1", "2"]


# --- figures ----------------------------------------------------------------------------------

def test_legends_tell_runs_of_the_same_name_apart():
    rows = [{"source": f"/data/{owner}/run", "epoch": epoch, "split": "train",
             "layer": "penultimate", "nc1": 1.0 / epoch} for owner in "ab" for epoch in (1, 2)]
    labels = [text.get_text() for text in metric_figure(rows, "nc1").legends[0].get_texts()]
    assert labels == ["a/run: penultimate / train", "b/run: penultimate / train"]
    assert source_labels(["/x/run", "/y/z/run", "/y/w/run"]) == {
        "/x/run": "x/run", "/y/z/run": "z/run", "/y/w/run": "w/run"}


def _centred_cosines(features, labels):
    means = np.stack([features[labels == c].mean(axis=0) for c in np.unique(labels)])
    centred = means - means.mean(axis=0)
    units = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    return units @ units.T


@pytest.mark.parametrize("num_classes", [5, DRAWN_CLASSES + 20])
def test_a_single_snapshot_gets_its_figures(tmp_path, num_classes):
    case = gaussian_classes(20 * num_classes, 12, num_classes, seed=5)
    np.save(tmp_path / "features.npy", case["features"])
    np.save(tmp_path / "labels.npy", case["labels"])
    out = tmp_path / "out"
    assert _analyze_cli(tmp_path / "features.npy", "--labels", tmp_path / "labels.npy",
                        "--out", out) == 0
    assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == [
        "snapshot-features.npy-features-train.png"]
    (row,) = analyze([tmp_path / "features.npy"], labels=tmp_path / "labels.npy",
                     progress=False).rows
    cosines = _centred_cosines(case["features"].astype(np.float64), case["labels"])
    pairs = cosines[np.triu_indices(num_classes, 1)]
    if num_classes <= DRAWN_CLASSES:
        np.testing.assert_allclose(row["cosine_matrix"], cosines, rtol=0, atol=5e-5)
    else:  # bins over the range of the cosines
        assert "cosine_matrix" not in row
        counts, edges = (np.array(row["cosine_histogram"][key]) for key in ("counts", "edges"))
        assert counts.size <= 40 and counts.sum() == pairs.size
        assert edges[0] <= pairs.min() < edges[1] and edges[-2] < pairs.max() <= edges[-1]
        np.testing.assert_array_equal(counts, np.histogram(pairs, bins=edges)[0])


def test_metric_spanning_float64s_range_is_drawn_on_a_linear_axis(tmp_path):
    """A Riesz kernel of a wide layer can go from 1e-300 to inf between checkpoints: the
    figure is still drawn (a log axis there made matplotlib's tick formatter overflow)."""
    from ncfast.plots import metric_figure, save_figure
    rows = [{"source": "run", "layer": "penultimate", "split": "train", "epoch": epoch,
             "riesz_kernel_mean": value}
            for epoch, value in ((1, 1e-300), (2, 1e300), (4, float("inf")))]
    save_figure(metric_figure(rows, "riesz_kernel_mean"), str(tmp_path / "riesz.png"))
    assert (tmp_path / "riesz.png").stat().st_size > 0


def _drawn(figure):
    """Lay out and draw ``figure``; its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _parts_outside(figure):
    """The axes (with their ticks, labels and title), legends and figure texts not wholly
    inside the figure once drawn."""
    renderer = _drawn(figure)
    box = figure.bbox
    outside = []
    for part in [*figure.axes, *figure.legends, *figure.texts]:
        extent = part.get_tightbbox(renderer)
        if extent.x0 < box.x0 - 0.5 or extent.y0 < box.y0 - 0.5 or \
                extent.x1 > box.x1 + 0.5 or extent.y1 > box.y1 + 0.5:
            outside.append(part)
    return outside


def _tick_labels(axis, which="major"):
    """``[(location, text)]`` of the ticks in view that have a label."""
    ticker = axis.major if which == "major" else axis.minor
    low, high = sorted(axis.get_view_interval())
    locations = [location for location in ticker.locator() if low <= location <= high]
    return [(location, text) for location, text
            in zip(locations, ticker.formatter.format_ticks(locations)) if text]


def _metric_rows(metric, epochs, splits=("train",), sources=("run",), value=None):
    value = value or (lambda epoch, split: -0.3821234 - 1e-4 * epoch)
    return [{"source": source, "layer": "penultimate", "split": split, "epoch": epoch,
             metric: value(epoch, split)}
            for source in sources for split in splits for epoch in epochs]


def test_metric_figures_keep_titles_and_labels_inside():
    """The left margin was fixed: wide tick labels pushed the y label off the canvas; and
    titles wider than the figure were cut."""
    for metric in METRICS:
        figure = metric_figure(_metric_rows(metric, (1, 2, 4)), metric)
        assert _parts_outside(figure) == [], metric


def test_an_epoch_without_a_finite_value_breaks_the_line_and_is_marked():
    """An overflow (None in the rows, empty in metrics.csv) was skipped: the line joined its
    neighbours as if nothing happened."""
    values = {1: 1e80, 2: None, 4: 1e180, 8: 1e100}
    figure = metric_figure(_metric_rows("riesz_kernel_mean", values,
                                        value=lambda epoch, _: values[epoch]),
                           "riesz_kernel_mean")
    (curve, marks) = figure.axes[0].get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), [1, 2, 4, 8])
    assert np.isnan(curve.get_ydata()[1]) and np.isfinite(curve.get_ydata()[[0, 2, 3]]).all()
    np.testing.assert_array_equal(marks.get_xdata(), [2])
    assert marks.get_label() in [text.get_text() for text in figure.legends[0].get_texts()]


def test_the_legend_of_several_runs_covers_no_curve():
    rows = _metric_rows("nc1", (1, 2, 4, 8), splits=("train", "test"), sources="abc",
                        value=lambda epoch, split: (2.0 if split == "test" else 1.0) / epoch)
    figure = metric_figure(rows, "nc1")
    renderer = _drawn(figure)
    (legend,) = figure.legends or [figure.axes[0].get_legend()]
    assert len(legend.get_texts()) == 6
    assert not legend.get_window_extent(renderer).overlaps(
        figure.axes[0].get_window_extent(renderer))


@pytest.mark.parametrize("epochs, expected", [((2, 3, 4, 6), ["2", "3", "4", "6"]),
                                              ((1, 100), ["1", "2", "5", "10", "20", "50",
                                                          "100"]),
                                              ((0, 1, 5, 50), ["0", "1", "10"])])
def test_epoch_ticks_are_plain_integers(epochs, expected):
    """Epochs within a decade read "2×10⁰, 3×10⁰, 4×10⁰, 6×10⁰" (minor log ticks)."""
    figure = metric_figure(_metric_rows("nc1", epochs), "nc1")
    _drawn(figure)
    axis = figure.axes[0].xaxis
    assert [text for _, text in _tick_labels(axis)] == expected
    assert _tick_labels(axis, "minor") == []


def test_a_split_equal_to_another_is_drawn_once_and_named():
    """A test split measured against the train means has the train split's value for a
    metric of the means alone: its dashed line lay exactly under the solid one."""
    rows = _metric_rows("nc2_etf", (1, 2), splits=("train", "test"))
    labels = [line.get_label() for line in metric_figure(rows, "nc2_etf").axes[0].get_lines()]
    assert labels == ["penultimate / train = test"]
    rows = _metric_rows("nc1", (1, 2), splits=("train", "test"),
                        value=lambda epoch, split: len(split) / epoch)
    labels = [line.get_label() for line in metric_figure(rows, "nc1").axes[0].get_lines()]
    assert labels == ["penultimate / train", "penultimate / test"]


def _snapshot_row(classes, num_classes, seed=0):
    """A result row of the present ``classes`` of ``num_classes``: the cosines of random
    class means (a histogram of five-digit counts above ``DRAWN_CLASSES``), and per-class
    lists where every class's accuracies are 1."""
    rng = np.random.default_rng(seed)
    row = {"source": "run", "epoch": 1, "layer": "f", "split": "train",
           "present_classes": list(classes), "nc1": 0.1,
           "class_variances": rng.uniform(0.5, 1.0, num_classes).tolist(),
           "class_mean_norms": rng.uniform(5.0, 6.0, num_classes).tolist(),
           "class_ncc_accuracy": [1.0] * num_classes, "class_accuracy": [1.0] * num_classes}
    if len(classes) <= DRAWN_CLASSES:
        means = rng.normal(size=(len(classes), len(classes) + 3))
        centred = means - means.mean(axis=0)
        units = centred / np.linalg.norm(centred, axis=1, keepdims=True)
        row["cosine_matrix"] = np.clip(units @ units.T, -1, 1).tolist()
    else:
        counts = 80000 * np.exp(-np.linspace(-3, 3, 40) ** 2)
        row["cosine_histogram"] = {"edges": np.linspace(-0.4, 0.4, 41).tolist(),
                                   "counts": counts.astype(int).tolist()}
    return row


def _panel(figure, xlabel):
    (axes,) = [axes for axes in figure.axes if axes.get_xlabel() == xlabel]
    return axes


def test_snapshot_axes_name_the_classes_present():
    """With an empty class (0, 1, 3, 4, 5 present) the heatmap read 0-4; above 20 classes
    the bars read positions (bar "0" was class 2)."""
    figure = snapshot_figure(_snapshot_row([0, 1, 3, 4, 5], 6), "run")
    _drawn(figure)
    heatmap = figure.axes[0]
    for axis in (heatmap.xaxis, heatmap.yaxis):
        assert [text for _, text in _tick_labels(axis)] == ["0", "1", "3", "4", "5"]
    classes = np.arange(2, 40)
    figure = snapshot_figure(_snapshot_row(classes, 40), "run")
    _drawn(figure)
    for axes in [figure.axes[0], *(axes for axes in figure.axes if axes.get_xlabel() == "class")]:
        labels = _tick_labels(axes.xaxis)
        assert len(labels) > 2
        assert all(text == str(classes[int(location)]) for location, text in labels)


@pytest.mark.parametrize("num_classes", [2, 10, 20])
def test_the_etf_value_collides_with_no_colour_bar_tick(num_classes):
    """"ETF -1/(C'-1)" was a colour-bar tick label: on "0" for C >= 10, on "-1" for C = 2."""
    figure = snapshot_figure(_snapshot_row(range(num_classes), num_classes), "run")
    renderer = _drawn(figure)
    colorbar = figure.axes[0].images[0].colorbar
    extents = [label.get_window_extent(renderer) for label in colorbar.ax.get_yticklabels()]
    assert not any(first.overlaps(second) for index, first in enumerate(extents)
                   for second in extents[index + 1:])
    assert f"{-1 / (num_classes - 1):.3g}" in colorbar.ax.get_ylabel()


def test_collapsed_cosines_of_many_classes_are_binned_over_their_range(tmp_path):
    """Above DRAWN_CLASSES the cosines were counted in 0.05-wide bins over [-1, 1]: at
    collapse every pair fell in one bin (collapse invisible), the ETF legend over it."""
    num_classes = DRAWN_CLASSES + 50
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.normal(size=(num_classes + 10, num_classes)))[0]
    means = 5.0 * (np.eye(num_classes) - 1.0 / num_classes) @ basis.T
    labels = np.repeat(np.arange(num_classes), 3)
    features = means[labels] + 1e-2 * rng.normal(size=(labels.size, num_classes + 10))
    np.savez(tmp_path / "etf.npz", features=features.astype(np.float32), labels=labels)
    (row,) = analyze([tmp_path / "etf.npz"], progress=False, use_cache=False).rows
    counts, edges = (np.array(row["cosine_histogram"][key]) for key in ("counts", "edges"))
    etf = -1.0 / (num_classes - 1)
    assert edges[-1] - edges[0] < 0.02 and np.count_nonzero(counts) > 10
    figure = snapshot_figure(row, "run")
    _drawn(figure)
    axes = _panel(figure, "cos between centred class means")
    low, high = axes.get_xlim()
    assert low < edges[0] and edges[-1] < high and low < etf < high and high - low < 0.03
    assert axes.get_legend() is None and f"{etf:.3g}" in axes.get_title()


def test_accuracy_distributions_of_many_classes_sit_side_by_side():
    """Two semi-transparent histograms that coincide drew a third colour in neither legend
    entry."""
    figure = snapshot_figure(_snapshot_row(range(DRAWN_CLASSES + 50), DRAWN_CLASSES + 50),
                             "run")
    first, second = _panel(figure, "accuracy").containers
    spans = [[(bar.get_x(), bar.get_x() + bar.get_width()) for bar in container
              if bar.get_height() > 0] for container in (first, second)]
    assert spans[0] and spans[1]
    assert not any(start < other_end and other_start < end for start, end in spans[0]
                   for other_start, other_end in spans[1])


@pytest.mark.parametrize("num_classes", [2, 1000])
def test_snapshot_labels_stay_inside_the_figure(num_classes):
    """Five-digit counts (1000 classes) clipped "class pairs"; two classes clipped the
    variance label and the last cosine tick, drew fractional class ticks and titled
    "1 class pairs"."""
    figure = snapshot_figure(_snapshot_row(range(num_classes), num_classes), "run")
    assert _parts_outside(figure) == []
    if num_classes == 2:
        assert [text for _, text in _tick_labels(figure.axes[0].yaxis)] == ["0", "1"]
        title = _panel(figure, "cos between centred class means").get_title()
        assert title.startswith("1 class pair;")
