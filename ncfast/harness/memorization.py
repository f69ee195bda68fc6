"""Reproduction 1: memorization and dilation under label noise (Nguyen et al., ICLR 2023).

A grid of label-noise settings × label-smoothing strengths α (0 is
cross-entropy) × seeds, each run trained into the terminal phase (zero error
on its noisy labels) on MNIST-1D. Memorization and dilation are measured on
the penultimate training features of the last checkpoint (docs/metrics.md), test
accuracy on the clean test labels. The paper's statements are checked
separately (:data:`STATEMENTS`), each with the rule of
``ncfast.harness.verdicts``.
"""
import dataclasses
import os
import time
from dataclasses import dataclass

from ncfast.harness.grid import final_row, pick_grid, published, run_and_measure
from ncfast.harness.reports import (VERDICT_WORDS, Reproduction, Statement, markdown_table,
                                    reproduce_command, statement_verdict, write_report)
from ncfast.harness.training import TrainConfig
from ncfast.harness.verdicts import Spread, combine, compare, fit_line, tally

CLAIM = (
    "Under label noise, memorizing the corrupted rows dilates the collapse of the clean "
    "ones: dilation rises with memorization along one relation (M-D); label smoothing "
    "memorises less, dilates less and so tests better than cross-entropy (Nguyen, Levie, "
    "Lienen, Kutyniok & Hüllermeier, *Memorization-Dilation: Modeling Neural Collapse Under "
    "Label Noise*, ICLR 2023).")

#: The paper's statements, each checked on its own.
STATEMENTS = {
    "M1": "Memorization and dilation rise together: over the noisy runs of each loss, the "
          "least-squares slope of memorization on dilation is positive",
    "M2": "Label smoothing memorises less than cross-entropy at the same noise",
    "M3": "Label smoothing dilates less than cross-entropy at the same noise",
    "M4": "Label smoothing tests better than cross-entropy at the same noise",
}


@dataclass(frozen=True)
class MemorizationGrid:
    """The settings of reproduction 1.

    Attributes
    ----------
    base : TrainConfig
        Every option but the loss, smoothing, noise and seed.
    noises : tuple of (str, float)
        Noise kind ("symmetric" or "pair") and rate of each noise setting.
    smoothings : tuple of float
        Label-smoothing strengths α; 0 trains with cross-entropy.
    seeds : int
        Seeds per setting (K), unless the caller gives another count.
    scope : str
        What the grid can and cannot decide, written before any result; ``{seeds}`` and
        ``{resolution}`` stand for the seeds a setting is run with and what the comparison
        rule can then decide (``write_report``).
    """

    base: TrainConfig
    noises: tuple
    smoothings: tuple
    seeds: int
    scope: str


QUICK = MemorizationGrid(
    base=TrainConfig(dataset="mnist1d", num_samples=2500, model="mlp", width=256, depth=3,
                     epochs=300, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
                     checkpoints=10),
    noises=(("symmetric", 0.0), ("symmetric", 0.2), ("symmetric", 0.4)),
    smoothings=(0.0, 0.1, 0.3, 0.5), seeds=3,
    scope="Symmetric noise only, one small ReLU MLP (3 hidden layers of 256) on 2,000 "
          "MNIST-1D training rows, 300 epochs (at 200, two of three seeds at 20% noise and "
          "α = 0.5 stopped one row short of fitting every noisy label in a trial run of this "
          "grid), {seeds} seeds. With {seeds} seeds a side and equal "
          "spreads, a difference must exceed about {resolution:.1f} standard deviations of the "
          "seeds to count, so only large effects are decided. Pair-flip noise, α = 0.05, 0.2 "
          "and 0.7, a wider and deeper MLP on 4,000 rows and 5 seeds are in the full grid "
          "(`--grid full`) only; neither grid speaks for the paper's architectures and "
          "datasets (deep MLPs with batch norm on binary image tasks, ResNets on CIFAR).")

FULL = MemorizationGrid(
    base=TrainConfig(dataset="mnist1d", num_samples=5000, model="mlp", width=512, depth=4,
                     epochs=800, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
                     checkpoints=12),
    noises=(("symmetric", 0.0), ("symmetric", 0.2), ("symmetric", 0.4), ("pair", 0.2),
            ("pair", 0.4)),
    smoothings=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7), seeds=5,
    scope="Symmetric and pair-flip noise at 20% and 40%, α from 0 to 0.7, a ReLU MLP (4 "
          "hidden layers of 512) on 4,000 MNIST-1D training rows, 800 epochs (at 500, a CPU "
          "trial of the hardest cell, 40% symmetric noise and α = 0.7, seed 0, stopped one row "
          "short of the terminal phase), {seeds} seeds. It does not speak for the paper's "
          "architectures and datasets (deep MLPs with batch norm on binary image tasks, "
          "ResNets on CIFAR).")

GRIDS = {"quick": QUICK, "full": FULL}


def noise_label(kind, rate):
    """``"no noise"``, ``"symmetric 20%"``, ``"pair 40%"``."""
    return "no noise" if rate == 0 else f"{kind} {rate:.0%}"


def setting_name(kind, rate, alpha):
    """Run-folder prefix of a setting, e.g. ``symmetric0.2_alpha0.1``."""
    return f"{'noise' if rate == 0 else kind}{rate:g}_alpha{alpha:g}"


def settings(grid):
    """``{setting name: TrainConfig}`` of a grid, noise-major."""
    configs = {}
    for kind, rate in grid.noises:
        for alpha in grid.smoothings:
            loss = {"loss": "ls", "smoothing": alpha} if alpha > 0 else \
                {"loss": "ce", "smoothing": None}
            configs[setting_name(kind, rate, alpha)] = dataclasses.replace(
                grid.base, noise=rate, noise_kind=kind, **loss)
    return configs


def memorization_dilation(out, *, grid="quick", seeds=None, workers=None, device="auto",
                          progress=True):
    """Reproduction 1: label-noise settings × label smoothing α × seeds on MNIST-1D.

    Parameters
    ----------
    out : str
        Folder of the run folders (``runs/``), ``report.md``, metrics and plots.
        Calling again on the same folder resumes: finished runs are not trained
        again.
    grid : {"quick", "full"} or MemorizationGrid
    seeds : int, optional
        Seeds per setting (default: the grid's).
    workers : int, optional
        Training processes (default: the CPUs available).
    device : {"auto", "cpu", "cuda"} or str
        Torch device of every run; "auto" takes cuda when torch sees a GPU.
    progress : bool

    Returns
    -------
    Reproduction
    """
    spec = pick_grid(GRIDS, grid)
    seeds = spec.seeds if seeds is None else seeds
    runs, records, timing, rows, measuring = run_and_measure(
        settings(spec), seeds, out, workers=workers, device=device, progress=progress)

    per_run = {}  # run name -> what the statements read
    for name, record in records.items():
        last = final_row(rows, name)
        per_run[name] = {"memorization": last.get("memorization"),
                         "dilation": last.get("dilation"), "test acc": record.test_accuracy,
                         "train acc": record.train_accuracy,
                         "terminal": record.terminal_epoch is not None}
    cells = {}  # (kind, rate, alpha) -> {quantity: Spread}, plus runs reaching the terminal phase
    for kind, rate in spec.noises:
        for alpha in spec.smoothings:
            names = [run.name for run in runs if run.setting == setting_name(kind, rate, alpha)]
            cells[kind, rate, alpha] = {
                key: Spread.of(per_run[name][key] for name in names)
                for key in ("memorization", "dilation", "test acc", "train acc")}
            cells[kind, rate, alpha]["terminal"] = sum(per_run[name]["terminal"]
                                                       for name in names)
    noisy = [(kind, rate) for kind, rate in spec.noises if rate > 0]
    smoothed = [alpha for alpha in spec.smoothings if alpha > 0]

    # The claim is about the terminal phase: runs that never fitted every noisy label, and
    # comparisons with a setting of such runs, are shown but not counted.
    lines = {}
    for loss, chosen in (("cross-entropy", [0.0]), ("label smoothing", smoothed)):
        points = [per_run[run.name] for run in runs if run.config.noise > 0
                  and (run.config.smoothing or 0.0) in chosen and per_run[run.name]["terminal"]]
        dilations = [point["dilation"] for point in points]
        if points:
            lines[loss] = (fit_line(dilations, [point["memorization"] for point in points]),
                           (min(dilations), max(dilations)))
    comparisons = []
    for kind, rate in noisy:
        for alpha in smoothed:
            smooth, plain = cells[kind, rate, alpha], cells[kind, rate, 0.0]
            comparisons.append({
                "noise": noise_label(kind, rate), "alpha": alpha,
                "counted": smooth["terminal"] == plain["terminal"] == seeds,
                "M2": compare(smooth["memorization"], plain["memorization"], claimed="lower"),
                "M3": compare(smooth["dilation"], plain["dilation"], claimed="lower"),
                "M4": compare(smooth["test acc"], plain["test acc"], claimed="higher")})

    statements = [Statement("M1", STATEMENTS["M1"],
                            combine(line.comparison.verdict for line, _ in lines.values()),
                            "; ".join(f"{loss}: slope {line.slope:.3g} ± {line.slope_error:.2g}"
                                      f" over {line.count} runs, {line.comparison.verdict}"
                                      for loss, (line, _) in lines.items()))]
    outside = [f"{row['noise']} α={row['alpha']:g}" for row in comparisons if not row["counted"]]
    excluded = (f"; not counted (a seed short of the terminal phase): {', '.join(outside)}"
                if outside else "")
    for key in ("M2", "M3", "M4"):
        verdicts = [row[key].verdict for row in comparisons if row["counted"]]
        statements.append(Statement(key, STATEMENTS[key], combine(verdicts),
                                    f"(noise, α) cells: {tally(verdicts)}{excluded}"))
    verdict = statement_verdict(statements)

    with published(out, rows) as staging:
        plots = _figures(staging, spec, runs, per_run, cells, lines)
        settings_table = [{
            "noise": noise_label(kind, rate), "α": alpha,
            "memorization": str(cell["memorization"]), "dilation": str(cell["dilation"]),
            "test acc": str(cell["test acc"]), "train acc (noisy labels)": str(cell["train acc"]),
            "in terminal phase": f"{cell['terminal']}/{seeds}"}
            for (kind, rate, alpha), cell in cells.items()]
        comparison_table = [{"noise": row["noise"], "α": row["alpha"],
                             "counted": "yes" if row["counted"] else "no",
                             "M2 memorization LS − CE": str(row["M2"]),
                             "M3 dilation LS − CE": str(row["M3"]),
                             "M4 test acc LS − CE": str(row["M4"])} for row in comparisons]
        line_table = [{"loss": loss, "noisy runs": line.count, "slope": line.slope,
                       "± SE": line.slope_error, "intercept": line.intercept,
                       "slope > 0": line.comparison.verdict}
                      for loss, (line, _) in lines.items()]
        in_terminal = sum(point["terminal"] for point in per_run.values())
        base = spec.base
        grid_lines = [
            f"- Data: {base.dataset} ({base.num_samples} samples, 80% for training), labels of "
            "the training split corrupted; test labels clean.",
            f"- Model: {base.model}, {base.depth} hidden layers of {base.width}, "
            f"{'with' if base.bias else 'without'} biases; SGD, "
            f"lr {base.lr:g} (cosine to 0), momentum {base.momentum:g}, batch {base.batch_size}, "
            f"weight decay {base.weight_decay:g}, {base.epochs} epochs, {base.checkpoints} "
            "log-spaced checkpoints.",
            f"- Noise: {', '.join(noise_label(kind, rate) for kind, rate in spec.noises)}.",
            f"- Label smoothing α: {', '.join(f'{alpha:g}' for alpha in spec.smoothings)} "
            "(0 = cross-entropy).",
            f"- Seeds: {seeds} per setting (data split, noise, initialisation and batch order all "
            f"follow the seed); {len(runs)} runs.",
            "- Measured: memorization and dilation (docs/metrics.md) of the penultimate training "
            "features at the last checkpoint; test accuracy on the clean test labels."]
        report = write_report(
            out, folder=staging,
            title="Reproduction 1: memorization and dilation under label noise "
                  "(Nguyen et al. 2023)",
            claim=CLAIM, command=reproduce_command("memorization-dilation", grid=grid, seeds=seeds,
                                                   workers=timing.workers, device=timing.device,
                                                   out=out),
            verdict=f"the claim {VERDICT_WORDS[verdict]} on this grid "
                    f"({in_terminal} of {len(runs)} runs reached the terminal phase).",
            statements=statements, scope=spec.scope, grid_lines=grid_lines,
            sections=[("Settings (mean ± std over seeds)", markdown_table(settings_table)),
                      ("Label smoothing against cross-entropy (M2–M4)",
                       "Difference of the means (label smoothing minus cross-entropy), twice its "
                       "standard error, and the verdict.\n\n" + markdown_table(comparison_table)),
                      ("The M-D relation (M1)",
                       "Least-squares line memorization = intercept + slope × dilation over the "
                       "noisy runs of each loss (label smoothing: every α > 0 together).\n\n"
                       + markdown_table(line_table))],
            plots=plots, records=records, timing=timing,
            run_values={name: {"memorization": values["memorization"],
                               "dilation": values["dilation"]} for name, values in per_run.items()},
            measure_seconds=time.perf_counter() - measuring,
            notes=["Memorization: mean distance of the corrupted rows' features to the mean of "
                   "the clean rows of their true class; dilation: mean over classes of the "
                   "standard deviation of the clean rows' distances to their class mean; both "
                   "divided by the mean distance between clean class means.",
                   "A run is in the terminal phase when its classifier fits every noisy training "
                   "label at a checkpoint. Runs that never did are measured and shown, but left "
                   "out of the M-D lines, and a comparison with a setting that has such a run is "
                   "not counted (column \"counted\")."])
    tables = {"settings": settings_table, "comparisons": comparison_table, "lines": line_table}
    return Reproduction("memorization-dilation", CLAIM, verdict, statements, report, tables)


def _figures(out, spec, runs, per_run, cells, lines):
    """Write the reproduction's PNGs into ``out``; returns their names."""
    from ncfast.harness.figures import memorization_dilation_figure, series_figure
    from ncfast.plots import save_figure

    points = [{**per_run[run.name], "alpha": run.config.smoothing or 0.0,
               "noise": noise_label(run.config.noise_kind, run.config.noise)}
              for run in runs if run.config.noise > 0]
    figures = {}
    if points:
        figures["memorization_vs_dilation.png"] = memorization_dilation_figure(points, lines)
    for key, name in (("test acc", "test accuracy"), ("memorization", "memorization"),
                      ("dilation", "dilation")):
        series = {noise_label(kind, rate): [(alpha, cells[kind, rate, alpha][key])
                                            for alpha in spec.smoothings]
                  for kind, rate in spec.noises if rate > 0 or key == "test acc"}
        figures[f"{name.replace(' ', '_')}_vs_alpha.png"] = series_figure(
            series, xlabel="label smoothing α (0 = cross-entropy)",
            ylabel=f"{name} (mean ± std over seeds)", title=f"{name} against α per noise rate")
    for name, figure in figures.items():
        save_figure(figure, os.path.join(out, name))
    return list(figures)
