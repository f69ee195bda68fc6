"""Grids of seeded training runs: train them in parallel, resume them, measure them.

A reproduction is a grid of settings (one ``TrainConfig`` each) times seeds.
:func:`run_grid` trains every run into ``OUT/runs/NAME`` in worker processes
(one torch thread each) and writes ``result.json`` into a run folder when its
run finishes. Calling it again on the same folder trains only what is
missing: finished runs are read back from their ``result.json``, and a run
cut short resumes from its last checkpoint (``ncfast.harness.train``), so an
interrupted grid, rerun, ends with the same results as an uninterrupted one.
:func:`measure_runs` then measures every checkpoint of every run with
``ncfast.analyze`` (cached next to each checkpoint, so also only once).
"""
import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass

from ncfast.dumps import (check_output_folder, ctrl_c_held, move_staged_files, staging_folder,
                          write_json_atomically)
from ncfast.harness.training import TrainConfig, train
from ncfast.inputs import tell

#: Written into a run folder when its run has finished.
RESULT_FILE = "result.json"

#: Folder of the run folders inside a reproduction's output folder.
RUNS_FOLDER = "runs"


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: a setting, a seed and the configuration they make.

    Attributes
    ----------
    setting : str
        Name of the setting (the same for every seed), e.g. ``"symmetric0.2_alpha0.1"``.
    seed : int
    config : TrainConfig
        The setting's configuration with ``seed`` set.
    """

    setting: str
    seed: int
    config: TrainConfig

    @property
    def name(self):
        """Name of the run folder, ``SETTING_seedK``."""
        return f"{self.setting}_seed{self.seed}"


def seeded_runs(settings, seeds):
    """Every setting with every seed.

    Parameters
    ----------
    settings : dict of str to TrainConfig
        Setting name to configuration (its seed is replaced).
    seeds : int
        K: seeds 0 to K-1.

    Returns
    -------
    list of GridRun
        Setting-major, in the order of ``settings``.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int (the number of seeds); found {seeds!r}")
    return [GridRun(setting, seed, dataclasses.replace(config, seed=seed))
            for setting, config in settings.items() for seed in range(seeds)]


@dataclass(frozen=True)
class RunRecord:
    """A finished run, as its ``result.json`` holds it.

    Attributes
    ----------
    run : GridRun
    path : str
        The run folder.
    train_accuracy : float
        Accuracy on the (noisy) training labels at the last epoch.
    clean_train_accuracy : float
    test_accuracy : float or None
    terminal_epoch : int or None
        First checkpoint epoch with zero training error, None if never.
    seconds : float
        Wall-clock seconds of the call that finished the run (a resumed run
        counts only its last part).
    cpu_seconds : float
        CPU seconds that call's process spent: unlike ``seconds``, hardly
        stretched when other work shares the CPUs.
    device : str
        Where that call trained.
    trained_now : bool
        Whether this call of :func:`run_grid` trained it (False: read back).
    """

    run: GridRun
    path: str
    train_accuracy: float
    clean_train_accuracy: float
    test_accuracy: float | None
    terminal_epoch: int | None
    seconds: float
    cpu_seconds: float
    device: str
    trained_now: bool


@dataclass(frozen=True)
class GridTiming:
    """How long a grid took, and on what.

    Attributes
    ----------
    seconds : float
        Wall-clock seconds of this call of :func:`run_grid`.
    trained, reused : int
        Runs trained by this call, and runs read back finished.
    workers : int
        Training processes asked for (fewer start when fewer runs are left).
    device : str
    cpus : int
        CPUs this process may run on.
    load_before, load_after : tuple of float
        1-, 5- and 15-minute load averages when the call started and ended.
    """

    seconds: float
    trained: int
    reused: int
    workers: int
    device: str
    cpus: int
    load_before: tuple
    load_after: tuple


def pick_grid(grids, grid):
    """The grid named ``grid`` in ``grids`` (a grid object passes through).

    Raises
    ------
    ValueError
        For a name not in ``grids``.
    """
    if not isinstance(grid, str):
        return grid
    if grid not in grids:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(grids)}")
    return grids[grid]


def available_cpus():
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(device):
    """``"auto"`` becomes ``"cuda"`` when torch sees a GPU, else ``"cpu"``; others are checked.

    Raises
    ------
    ValueError
        For a device torch cannot use here.
    """
    from ncfast.harness.training import check_device

    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(check_device(device))


def run_grid(runs, out, *, workers=None, device="cpu", progress=True):
    """Train every run of a grid that has not finished yet, in parallel processes.

    Parameters
    ----------
    runs : sequence of GridRun
        Distinct run names.
    out : str
        Output folder; run ``NAME`` trains into ``out/runs/NAME``.
    workers : int, optional
        Processes training at once (default: the CPUs available, at most
        the runs left). One trains in this process.
    device : {"cpu", "cuda", "auto"} or str
        Torch device of every run (``"auto"``: cuda when available).
    progress : bool
        Show a progress bar over runs (on stderr).

    Returns
    -------
    records : dict of str to RunRecord
        Run name to record, in the order of ``runs``.
    timing : GridTiming

    Raises
    ------
    ValueError, TypeError
        For a bad configuration, worker count or device, before any training.
    """
    started, load_before = time.perf_counter(), os.getloadavg()
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError("the grid names some run twice; give each setting a distinct name")
    for run in runs:
        run.config.validate()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers must be a positive int; found {workers!r}")
    device = resolve_device(device)
    check_output_folder(out)
    paths = {run.name: os.path.join(out, RUNS_FOLDER, run.name) for run in runs}
    records = {run.name: _finished(run, paths[run.name]) for run in runs}
    left = [run for run in runs if records[run.name] is None]
    workers = workers or available_cpus()

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    # A bar on a terminal; in a log (rich draws a bar there only when it ends) one plain
    # line per finished run.
    errors = Console(stderr=True)
    in_log = progress and not errors.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=errors,
                  disable=not progress or in_log) as bar:
        task = bar.add_task(f"runs ({workers} worker{'s' * (workers > 1)}, {device})",
                            total=len(runs), completed=len(runs) - len(left))
        for done, record in enumerate(_train_runs(left, paths, min(workers, len(left)),
                                                  device), start=len(runs) - len(left) + 1):
            records[record.run.name] = record
            bar.advance(task)
            if in_log:
                tell(errors, f"runs: {done}/{len(runs)} done ({record.run.name}, "
                             f"{time.perf_counter() - started:.0f} s)")
    timing = GridTiming(
        seconds=time.perf_counter() - started, trained=len(left), reused=len(runs) - len(left),
        workers=workers, device=device, cpus=available_cpus(), load_before=load_before,
        load_after=os.getloadavg())
    return records, timing


def _train_runs(runs, paths, workers, device):
    """Yield the RunRecord of each run as it finishes."""
    if workers <= 1:
        for run in runs:
            yield train_run(run, paths[run.name], device)
        return
    # spawn: each worker starts its own torch (and CUDA) instead of a fork of this one's.
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(train_run, run, paths[run.name], device) for run in runs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


def train_run(run, path, device):
    """Train one run (resuming it if it was cut short) and write its ``result.json``.

    Returns
    -------
    RunRecord
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train(run.config, path, progress=False, threads=1, device=device)
    record = RunRecord(run=run, path=path, train_accuracy=result.train_accuracy,
                       clean_train_accuracy=result.clean_train_accuracy,
                       test_accuracy=result.test_accuracy, terminal_epoch=result.terminal_epoch,
                       seconds=time.perf_counter() - started,
                       cpu_seconds=time.process_time() - cpu_started, device=str(device),
                       trained_now=True)
    fields = {key: value for key, value in dataclasses.asdict(record).items()
              if key not in ("run", "path", "trained_now")}
    write_json_atomically(os.path.join(path, RESULT_FILE),
                          {"config": run.config.to_dict(), **fields})
    return record


def _finished(run, path):
    """The RunRecord of a run folder whose run finished with this config, else None."""
    try:
        with open(os.path.join(path, RESULT_FILE)) as stream:
            stored = json.load(stream)
    except (OSError, ValueError):
        return None
    if stored.pop("config", None) != run.config.to_dict():
        return None  # another run's folder: training it says so (RunWriter)
    try:
        return RunRecord(run=run, path=path, trained_now=False, **stored)
    except TypeError:
        return None  # a result.json of another form: train (resume) again


def measure_runs(paths, *, progress=True):
    """Measure every checkpoint of every run (written out by :func:`published`).

    Parameters
    ----------
    paths : dict of str to str
        Run name to run folder.
    progress : bool

    Returns
    -------
    list of dict
        ``ncfast.analyze`` rows, each with its run's name added as ``"run"``.

    Raises
    ------
    ValueError
        When a checkpoint cannot be measured.
    """
    from ncfast.analyze import analyze

    analysis = analyze(list(paths.values()), progress=progress)
    if analysis.failures:
        raise ValueError("analysis failed: " + "; ".join(
            f"{failure.name}: {failure.reason}" for failure in analysis.failures))
    run_of_path = {os.path.normpath(path): name for name, path in paths.items()}
    for row in analysis.rows:
        row["run"] = run_of_path[os.path.normpath(row["source"])]
    return analysis.rows


@contextlib.contextmanager
def published(out, rows):
    """Write ``metrics.json`` and ``metrics.csv`` of ``rows``, and what the block writes, into
    the folder it yields; move them all into ``out`` together when it ends.

    The files are written in full into a hidden folder of ``out`` first
    (``ncfast.dumps.staging_folder``) and renamed into place only then, with Ctrl-C held:
    an error or Ctrl-C before that (a failed figure, a full disk) leaves the metrics,
    figures and report of an earlier run in ``out`` as they were, and in step.

    Parameters
    ----------
    out : str
    rows : list of dict
        :func:`measure_runs` rows.

    Yields
    ------
    str
        The folder to write the other outputs into.
    """
    from ncfast.analyze import Analysis, write_results

    with staging_folder(out) as staging:
        write_results(Analysis(rows=rows), staging)
        yield staging
        with ctrl_c_held():
            move_staged_files(staging, out)


def run_and_measure(settings, seeds, out, *, workers, device, progress):
    """Train every setting with every seed (:func:`run_grid`) and measure the runs.

    Parameters
    ----------
    settings : dict of str to TrainConfig
    seeds : int
    out : str
    workers : int or None
    device : str
    progress : bool

    Returns
    -------
    runs : list of GridRun
    records : dict of str to RunRecord
    timing : GridTiming
    rows : list of dict
        :func:`measure_runs` rows.
    measured_at : float
        ``time.perf_counter()`` when measuring began (what follows is
        measuring and reporting).
    """
    runs = seeded_runs(settings, seeds)
    records, timing = run_grid(runs, out, workers=workers, device=device, progress=progress)
    measured_at = time.perf_counter()
    rows = measure_runs({name: record.path for name, record in records.items()},
                        progress=progress)
    return runs, records, timing, rows, measured_at


def run_rows(rows, run, *, split="train", layer="penultimate"):
    """The rows of one run, split and layer, by ascending epoch."""
    return sorted((row for row in rows if row["run"] == run and row["split"] == split
                   and row["layer"] == layer), key=lambda row: row["epoch"])


def final_row(rows, run, *, split="train", layer="penultimate"):
    """The row of ``run``'s last checkpoint for one split and layer."""
    return run_rows(rows, run, split=split, layer=layer)[-1]


def train_and_analyze(configs, out, *, progress=True):
    """Train each run in this process into ``out/NAME`` and measure all of them (the demo).

    Parameters
    ----------
    configs : dict of str to TrainConfig
        Run name to configuration, in the order tables show them.
    out : str
        Folder of the run folders (the caller writes the rest: :func:`published`).
    progress : bool
        A progress bar per run.

    Returns
    -------
    results : dict of str to TrainResult
    rows : list of dict
        ``ncfast.analyze`` rows of every run, ``row["run"]`` naming its run.
    """
    for config in configs.values():
        config.validate()
    check_output_folder(out)
    results = {name: train(config, os.path.join(out, name), progress=progress)
               for name, config in configs.items()}
    rows = measure_runs({name: result.path for name, result in results.items()},
                        progress=progress)
    return results, rows
