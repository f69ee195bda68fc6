"""Reproduction 2: weight decay and neural collapse in homogeneous networks.

Rangamani & Banburski (*Neural Collapse in Deep Homogeneous Classifiers and
the Role of Weight Decay*, ICASSP 2022) show that near-interpolating minima of
the square loss with weight decay collapse, and that weight decay is
necessary for collapse. The grid follows their setting: a homogeneous
network (ReLU MLP with no bias anywhere and no normalisation layer), the
square loss on one-hot targets, SGD, balanced classes, trained well past
zero training error, weight decay over a range that includes 0, several
seeds, on MNIST-1D and on scikit-learn digits. NC1-NC4 of the penultimate
training features are measured at every checkpoint.
"""
import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ncfast.harness.grid import pick_grid, published, run_and_measure, run_rows
from ncfast.harness.reports import (VERDICT_WORDS, Reproduction, Statement, markdown_table,
                                    reproduce_command, statement_verdict, write_report)
from ncfast.harness.training import TrainConfig
from ncfast.harness.verdicts import HELD, Spread, combine, compare, tally

CLAIM = (
    "In a deep homogeneous network (ReLU, no biases, no normalisation) trained with the square "
    "loss and SGD on balanced classes, weight decay makes the features collapse in the "
    "terminal phase (NC1–NC4), and weight decay is necessary for that collapse (Rangamani & "
    "Banburski, *Neural Collapse in Deep Homogeneous Classifiers and the Role of Weight "
    "Decay*, ICASSP 2022).")

#: NC1-NC4 as ncfast reports them (docs/metrics.md): within-class variability, distance of the
#: class-mean Gram from a simplex ETF, classifier-mean misalignment, NCC disagreement.
METRICS = ("nc1", "nc2_etf", "nc3", "nc4")

#: "Well past zero training error": reached by this fraction of the epochs.
TERMINAL_BY = 0.5


@dataclass(frozen=True)
class WeightDecayGrid:
    """The settings of reproduction 2.

    Attributes
    ----------
    datasets : tuple of TrainConfig
        One base configuration per dataset (weight decay and seed are set per run).
    decays : tuple of float
        Weight decays λ, 0 among them.
    seeds : int
        Seeds per setting (K), unless the caller gives another count.
    scope : str
        What the grid can and cannot decide, written before any result; ``{seeds}`` and
        ``{resolution}`` stand for the seeds a setting is run with and what the comparison
        rule can then decide (``write_report``).
    """

    datasets: tuple
    decays: tuple
    seeds: int
    scope: str


def homogeneous_config(dataset, *, width, depth, epochs, checkpoints, **data):
    """A bias-free ReLU MLP with the square loss and SGD on balanced classes."""
    return TrainConfig(dataset=dataset, balanced=True, model="mlp", width=width, depth=depth,
                       bias=False, batch_norm=False, loss="mse", epochs=epochs, batch_size=64,
                       lr=0.1, momentum=0.9, checkpoints=checkpoints, **data)


QUICK = WeightDecayGrid(
    datasets=(homogeneous_config("digits", width=128, depth=3, epochs=600, checkpoints=16),
              homogeneous_config("mnist1d", width=128, depth=3, epochs=600, checkpoints=16,
                                 num_samples=1250)),
    decays=(0.0, 1e-4, 3e-4, 1e-3), seeds=3,
    scope="Weight decay 0, 1e-4, 3e-4 and 1e-3 (3e-3 and 1e-2 left training error above 0 "
          "after 300-600 epochs in trial runs made while setting this grid up, which puts them "
          "outside the claim's setting); a bias-free ReLU MLP of 3 hidden layers of 128; 600 "
          "epochs; {seeds} seeds; on digits (about 1,330 balanced training rows) and on 1,250 "
          "MNIST-1D samples (about 930 balanced training rows). With {seeds} seeds a side a "
          "difference must exceed about {resolution:.1f} standard deviations of the seeds to "
          "count. Wider "
          "networks, more data, longer training, λ from 1e-5 to 3e-3 and 5 seeds are in the "
          "full grid only.")

FULL = WeightDecayGrid(
    datasets=(homogeneous_config("digits", width=256, depth=3, epochs=2000, checkpoints=24),
              homogeneous_config("mnist1d", width=256, depth=3, epochs=2000, checkpoints=24,
                                 num_samples=5000)),
    decays=(0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3), seeds=5,
    scope="Weight decay 0 and 1e-5 to 3e-3, a bias-free ReLU MLP of 3 hidden layers of 256, "
          "2,000 epochs, {seeds} seeds, on digits and on 4,000 MNIST-1D training samples "
          "(balanced). Settings whose runs do not reach zero training error by half their "
          "epochs are outside the claim's setting and not counted: in a CPU trial (digits, "
          "seed 0) λ = 3e-3 left 2 of 1,330 rows unfitted after 2,000 epochs; it stays in the "
          "grid to show where the setting ends.")

GRIDS = {"quick": QUICK, "full": FULL}


def setting_name(config, decay):
    """Run-folder prefix of a setting, e.g. ``digits_wd0.001``."""
    return f"{config.dataset}_wd{decay:g}"


def settings(grid):
    """``{setting name: TrainConfig}`` of a grid, dataset-major."""
    return {setting_name(base, decay): dataclasses.replace(base, weight_decay=decay)
            for base in grid.datasets for decay in grid.decays}


def _both_zero(a, b):
    """Both sides exactly 0 in every seed: a floor no comparison can go below."""
    return all(side.count > 0 and side.mean == 0 and not side.std for side in (a, b))


def _compared(a, b):
    """``compare(a, b, claimed="lower")``, or None at the floor (not counted)."""
    return None if _both_zero(a, b) else compare(a, b, claimed="lower")


def weight_decay(out, *, grid="quick", seeds=None, workers=None, device="auto",
                 progress=True):
    """Reproduction 2: weight decay × dataset × seeds, square loss, homogeneous MLP.

    Parameters
    ----------
    out : str
        Folder of the run folders (``runs/``), ``report.md``, metrics and plots.
        Calling again on the same folder resumes: finished runs are not trained
        again.
    grid : {"quick", "full"} or WeightDecayGrid
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

    # Per setting: seeds' values at the start of the terminal phase and at the last epoch.
    cells, run_values = {}, {}
    for base in spec.datasets:
        for decay in spec.decays:
            setting = setting_name(base, decay)
            names = [run.name for run in runs if run.setting == setting]
            histories = {name: run_rows(rows, name) for name in names}
            run_values.update({name: {f"{metric} last": history[-1][metric]
                                      for metric in METRICS}
                               for name, history in histories.items()})
            terminal = {name: records[name].terminal_epoch for name in names}
            started = {name: next(row for row in histories[name] if row["epoch"] == epoch)
                       for name, epoch in terminal.items() if epoch is not None}
            cells[base.dataset, decay] = {
                "final": {metric: Spread.of(histories[name][-1][metric] for name in names)
                          for metric in METRICS},
                "start": {metric: Spread.of(row[metric] for row in started.values())
                          for metric in METRICS},
                "well past": sum(epoch is not None and epoch <= TERMINAL_BY * base.epochs
                                 for epoch in terminal.values()),
                "terminal epochs": [epoch for epoch in terminal.values() if epoch is not None],
                "train acc": Spread.of(records[name].train_accuracy for name in names),
                "test acc": Spread.of(records[name].test_accuracy for name in names),
                "curves": _curves(histories)}

    falls, lowers, shown, statements = [], [], [], []
    for base in spec.datasets:
        plain = cells[base.dataset, 0.0]
        # The claim's setting: every seed well past zero training error (with and without
        # weight decay, for the comparison of the two).
        outside = [decay for decay in spec.decays
                   if cells[base.dataset, decay]["well past"] < seeds]
        for decay in spec.decays:
            cell = cells[base.dataset, decay]
            fall = {metric: _compared(cell["final"][metric], cell["start"][metric])
                    for metric in METRICS}
            falls.append({"dataset": base.dataset, "λ": decay, "counted": decay not in outside
                          and decay > 0, **fall})
            if decay == 0:
                continue
            lower = {metric: _compared(cell["final"][metric], plain["final"][metric])
                     for metric in METRICS}
            lowers.append({"dataset": base.dataset, "λ": decay,
                           "counted": not {0.0, decay} & set(outside), **lower})
            counted = [comparison.verdict for comparison in (*fall.values(), *lower.values())
                       if comparison is not None]
            if falls[-1]["counted"] and lowers[-1]["counted"] and counted \
                    and combine(counted) == HELD:
                shown.append(f"{base.dataset} λ={decay:g}")
        excluded = (f"; not counted, outside the claim's setting (not every seed past zero "
                    f"training error by {TERMINAL_BY:.0%} of its epochs): λ = "
                    f"{', '.join(f'{decay:g}' for decay in outside)}" if outside else "")
        for key, table, text in (
                ("W1", falls, "with weight decay, NC1–NC4 fall during the terminal phase (last "
                              "epoch lower than at the first checkpoint of zero training "
                              "error), at every λ > 0"),
                ("W2", lowers, "weight decay is necessary: NC1–NC4 end lower with weight "
                               "decay than without, at every λ > 0")):
            verdicts = [row[metric].verdict for row in table
                        if row["dataset"] == base.dataset and row["counted"]
                        for metric in METRICS if row[metric] is not None]
            statements.append(Statement(f"{key} {base.dataset}", f"On {base.dataset}: {text}",
                                        combine(verdicts),
                                        f"(λ, metric) comparisons: {tally(verdicts)}{excluded}"))
    verdict = statement_verdict(statements)
    settings_count = len(spec.datasets) * (len(spec.decays) - 1)
    headline = (f"the claim {VERDICT_WORDS[verdict]} over the whole grid (every λ > 0 in "
                f"the claim's setting, on every dataset). "
                + (f"Settings where it held in full (every seed well past zero training "
                   f"error; every counted comparison of NC1–NC4 held): {', '.join(shown)} "
                   f"({len(shown)} of {settings_count})." if shown else
                   f"It held in full in none of the {settings_count} settings with weight "
                   f"decay tried (λ = {', '.join(f'{decay:g}' for decay in spec.decays)} on "
                   f"{', '.join(base.dataset for base in spec.datasets)})."))

    with published(out, rows) as staging:
        plots = _figures(staging, spec, cells)
        settings_table = [{
            "dataset": dataset, "λ": decay, "train acc": str(cell["train acc"]),
            "test acc": str(cell["test acc"]),
            "zero train error by epoch": _epochs(cell["terminal epochs"], seeds),
            f"well past (by {TERMINAL_BY:.0%})": f"{cell['well past']}/{seeds}",
            **{f"{metric} last": str(cell["final"][metric]) for metric in METRICS}}
            for (dataset, decay), cell in cells.items()]
        fall_table = [{"dataset": row["dataset"], "λ": row["λ"],
                       "counted": _yes(row["counted"]), **{
                           metric: f"{cells[row['dataset'], row['λ']]['start'][metric]} → "
                                   f"{cells[row['dataset'], row['λ']]['final'][metric]}: "
                                   + _verdict_text(row[metric]) for metric in METRICS}}
                      for row in falls]
        lower_table = [{"dataset": row["dataset"], "λ": row["λ"], "counted": _yes(row["counted"]),
                        **{metric: _difference_text(row[metric]) for metric in METRICS}}
                       for row in lowers]
        base = spec.datasets[0]
        grid_lines = [
            "- Model: ReLU MLP with no bias in any layer and no normalisation layer (positively "
            "homogeneous in its parameters); " + "; ".join(
                f"on {config.dataset}: {config.depth} hidden layers of {config.width}"
                for config in spec.datasets) + ".",
            f"- Loss: squared error on one-hot targets, ½‖f(x) − y‖² averaged over the batch; SGD "
            f"with momentum {base.momentum:g}, lr {base.lr:g} cosine-annealed to 0, batch "
            f"{base.batch_size}; weight decay λ as an L2 penalty λ/2‖θ‖².",
            "- Data: " + "; ".join(
                f"{config.dataset} ({config.num_samples or 'all'} samples, 80% for training), "
                f"{config.epochs} epochs, {config.checkpoints} log-spaced checkpoints"
                for config in spec.datasets)
            + "; each split cut to equal class counts (`--balanced`).",
            f"- Weight decay λ: {', '.join(f'{decay:g}' for decay in spec.decays)}.",
            f"- Seeds: {seeds} per setting; {len(runs)} runs.",
            "- Measured: NC1 (`nc1`, Tr(Σ_W Σ_B†)/C), NC2 (`nc2_etf`, distance of the normalised "
            "class-mean Gram from the simplex ETF), NC3 (`nc3`, ‖W/‖W‖ − M̃/‖M̃‖‖²), NC4 (`nc4`, "
            "fraction of rows where the classifier and the nearest class mean disagree) of the "
            "penultimate training features at every checkpoint."]
        report = write_report(
            out, folder=staging,
            title="Reproduction 2: weight decay and collapse in homogeneous networks "
                  "(Rangamani & Banburski 2022)",
            claim=CLAIM, command=reproduce_command("weight-decay", grid=grid, seeds=seeds,
                                                   workers=timing.workers, device=timing.device,
                                                   out=out),
            verdict=headline, statements=statements, scope=spec.scope, grid_lines=grid_lines,
            sections=[("Settings (mean ± std over seeds)", markdown_table(settings_table)),
                      ("W1: the fall during the terminal phase",
                       "Per metric: mean ± std at the first checkpoint with zero training "
                       "error, → at the last epoch, and the verdict on \"lower at the last "
                       "epoch\" (λ = 0 is shown for reference; the paper expects no collapse "
                       "there).\n\n"
                       + markdown_table(fall_table)),
                      ("W2: with weight decay against without",
                       "Per metric: last-epoch mean with weight decay minus without, twice its "
                       "standard error, and the verdict on \"lower with weight decay\".\n\n"
                       + markdown_table(lower_table))],
            plots=plots, records=records, run_values=run_values, timing=timing,
            measure_seconds=time.perf_counter() - measuring,
            notes=["A comparison where both sides are exactly 0 in every seed (NC4 once the "
                   "classifier agrees with the nearest class mean everywhere) cannot be lower; it "
                   "is shown as \"both 0\" and not counted.",
                   f"The claim's setting is a network trained well past zero training error: a "
                   f"weight decay whose seeds did not all reach it by {TERMINAL_BY:.0%} of their "
                   "epochs (or, for W2, whose comparison λ = 0 did not) is outside it; its "
                   "comparisons are shown but not counted (column \"counted\"; λ = 0 in W1 is "
                   "shown for reference).",
                   "A setting shows the claim in full when it is in the claim's setting and every "
                   "counted W1 and W2 comparison of its four metrics held."])
    tables = {"settings": settings_table, "falls": fall_table, "lowers": lower_table}
    return Reproduction("weight-decay", CLAIM, verdict, statements, report, tables)


def _curves(histories):
    """``(epochs, {metric: array of shape (K, E)})`` of one setting's seeds."""
    epochs = np.array([row["epoch"] for row in next(iter(histories.values()))], dtype=float)
    return epochs, {metric: np.array([[row[metric] for row in history]
                                      for history in histories.values()], dtype=float)
                    for metric in METRICS}


def _epochs(epochs, seeds):
    if not epochs:
        return f"never (0/{seeds})"
    return f"{int(np.median(epochs))} (median; {len(epochs)}/{seeds} reached it)"


def _yes(counted):
    return "yes" if counted else "no"


def _verdict_text(comparison):
    return "both 0" if comparison is None else comparison.verdict


def _difference_text(comparison):
    return "both 0" if comparison is None else str(comparison)


def _figures(out, spec, cells):
    """Write the reproduction's PNGs into ``out``; returns their names."""
    from ncfast.harness.figures import collapse_curves_figure, parameter_figure
    from ncfast.plots import save_figure

    figures = {}
    for base in spec.datasets:
        curves = {f"λ = {decay:g}": cells[base.dataset, decay]["curves"]
                  for decay in spec.decays}
        figures[f"nc_vs_epoch_{base.dataset}.png"] = collapse_curves_figure(
            curves, METRICS, title=f"{base.dataset}: NC1–NC4 of the training features against "
                                   "epoch (median over seeds, band from lowest to highest)")
    series = {base.dataset: {metric: [(decay, cells[base.dataset, decay]["final"][metric])
                                      for decay in spec.decays] for metric in METRICS}
              for base in spec.datasets}
    figures["final_vs_weight_decay.png"] = parameter_figure(
        series, METRICS, xlabel="weight decay λ",
        title="NC1–NC4 at the last epoch against weight decay (mean ± std over seeds)")
    for name, figure in figures.items():
        save_figure(figure, os.path.join(out, name))
    return list(figures)
