"""Reproduction 3: imbalanced, bias-free MSE with unconstrained features (Dang et al. 2023).

Unconstrained features (one free feature row per training sample) feed a
bias-free linear head of depth L; the square loss with weight decay on the
head and on the features is minimised full-batch on imbalanced classes. The
class means should become orthogonal and the row norms of the head's product
``W = W_L ... W_1`` and of the class means should follow the closed form of
docs/metrics.md: the worst relative error over the classes, averaged over the seeds, is
held below a tolerance by two standard errors.
"""
import os
import time
from dataclasses import dataclass

import numpy as np

from ncfast.harness.grid import pick_grid, published, run_and_measure
from ncfast.harness.reports import (VERDICT_WORDS, Reproduction, Statement, markdown_table,
                                    reproduce_command, statement_verdict, write_report)
from ncfast.harness.training import TRAINING_STATE, TrainConfig
from ncfast.harness.verdicts import Spread, below, combine

CLAIM = (
    "With unconstrained features, a bias-free linear head of depth L and MSE with weight decay "
    "on imbalanced classes, the class means become orthogonal and the row norms of W (the "
    "head's product) and of the class means follow the closed form of Dang et al. (2023).")

#: Relative error per class the closed form allows.
CLOSED_FORM_TOLERANCE = 0.05

#: Largest off-diagonal cosine-Gram norm that counts as orthogonal.
ORTHOGONALITY_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ImbalancedGrid:
    """The settings of reproduction 3.

    Attributes
    ----------
    depths : tuple of int
        Head depths L, one setting each.
    class_counts : tuple of int
    epochs : int
    decay : float
        Weight decay of the head's layers and of the features.
    seeds : int
        Seeds per setting (K), unless the caller gives another count.
    scope : str
        What the grid can and cannot decide, written before any result; ``{seeds}`` and
        ``{resolution}`` stand for the seeds a setting is run with and what the comparison
        rule can then decide (``write_report``).
    """

    depths: tuple
    class_counts: tuple
    epochs: int
    decay: float
    seeds: int
    scope: str


QUICK = ImbalancedGrid(
    depths=(1, 3), class_counts=(200, 100, 50, 50), epochs=3000, decay=5e-3, seeds=3,
    scope="Head depths L = 1 and 3, class counts 200, 100, 50 and 50, one weight decay "
          "(5e-3 on the head and the features), {seeds} seeds. Other imbalances, decays and depths "
          "are not tried; L = 2 and 4 and 5 seeds are in the full grid.")

FULL = ImbalancedGrid(
    depths=(1, 2, 3, 4), class_counts=(200, 100, 50, 50), epochs=6000, decay=5e-3, seeds=5,
    scope="Head depths L = 1 to 4, class counts 200, 100, 50 and 50, one weight decay (5e-3 "
          "on the head and the features), {seeds} seeds, 6,000 full-batch steps. Other imbalances "
          "and decays are not tried.")

GRIDS = {"quick": QUICK, "full": FULL}


def imbalanced_closed_form(class_counts, *, head_depth, weight_decay, feature_decay):
    """Predicted row norms of ``W = W_L ... W_1`` and of the class means (docs/metrics.md).

    ``x_c`` is the largest real root of ``b / n_c = L x^{L-1} / (x^L + 1)^2``
    with ``b = L N (N lambda_W^L lambda_H)^{1/L}`` (0 when there is none);
    ``s_c^{2L} = N lambda_H x_c^L``; then ``||w_c||^2 = s_c^{2L}`` and
    ``||mu_c||^2 = s_c^{2L} / (s_c^{2L} + N lambda_H)^2``, for the loss
    ``||W H - Y||^2 / (2N) + lambda_W/2 sum_l ||W_l||^2 + lambda_H/2 ||H||^2``.

    Parameters
    ----------
    class_counts : sequence of int, length C
    head_depth : int
        L.
    weight_decay, feature_decay : float
        lambda_W (each head layer) and lambda_H.

    Returns
    -------
    weight_norms, mean_norms : float64 arrays of shape (C,)
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    num_rows, depth = counts.sum(), head_depth
    b = depth * num_rows * (num_rows * weight_decay ** depth * feature_decay) ** (1.0 / depth)
    roots = np.zeros_like(counts)
    for index, count in enumerate(counts):
        # b (x^L + 1)^2 - n L x^(L-1) = 0, highest power first.
        polynomial = np.zeros(2 * depth + 1)
        polynomial[0] += b
        polynomial[depth] += 2 * b
        polynomial[2 * depth] += b
        polynomial[depth + 1] -= count * depth
        real = [root.real for root in np.roots(polynomial)
                if abs(root.imag) < 1e-9 and root.real > 0]
        roots[index] = max(real, default=0.0)
    s_2l = num_rows * feature_decay * roots ** depth
    return np.sqrt(s_2l), np.sqrt(s_2l) / (s_2l + num_rows * feature_decay)


def imbalanced_config(head_depth, *, class_counts=(200, 100, 50, 50), epochs=3000,
                      decay=5e-3, width=16, seed=0):
    """The unconstrained-features run of claim 3 (full batch, MSE, bias-free)."""
    return TrainConfig(dataset="gaussian", class_counts=tuple(class_counts), model="ufm",
                       width=width, head_depth=head_depth, bias=False, loss="mse",
                       epochs=epochs, batch_size=None, lr=0.02, momentum=0.9,
                       weight_decay=decay, feature_decay=decay, checkpoints=12, seed=seed)


def settings(grid):
    """``{"ufm_L{depth}": TrainConfig}`` of a grid."""
    return {f"ufm_L{depth}": imbalanced_config(depth, class_counts=grid.class_counts,
                                               epochs=grid.epochs, decay=grid.decay)
            for depth in grid.depths}


def trained_head(path, config):
    """The head's product ``W_L ... W_1`` of a finished run, from its training state.

    Returns
    -------
    float64 array of shape (C, width)
    """
    import torch

    from ncfast.harness.models import build_model

    model = build_model(config.model, input_shape=(1,), num_classes=len(config.class_counts),
                        num_train=sum(config.class_counts), width=config.width,
                        depth=config.depth, head_depth=config.head_depth, bias=config.bias)
    state = torch.load(os.path.join(path, TRAINING_STATE), weights_only=True,
                       map_location="cpu")
    model.load_state_dict(state["model"])
    with torch.no_grad():
        return model.end_to_end_weights().numpy().astype(np.float64)


def measure_imbalanced(path, config):
    """Measured against predicted norms for a finished claim-3 run.

    Features are the free features ``H`` of the last checkpoint (the head's
    input, layer ``"trunk"``, or ``"penultimate"`` when L=1); ``W`` is the
    head's end-to-end product ``W_L ... W_1``.

    Parameters
    ----------
    path : str
        The run folder.
    config : TrainConfig

    Returns
    -------
    report : CollapseReport
        Of ``H`` with classifier ``W`` (``nc2_orthogonality`` among others).
    table : list of dict
        Per class: rows, measured and predicted ``||w_c||`` and ``||mu_c||``
        (uncentred class mean) and their relative errors.
    """
    from ncfast.api import collapse
    from ncfast.dumps import open_run

    last = open_run(path).checkpoints[-1].splits["train"]
    features = last.features["trunk" if config.head_depth > 1 else "penultimate"].read()
    labels = last.labels.read()
    weights = trained_head(path, config)
    report = collapse(features, labels, weights=weights)
    weight_norms = np.linalg.norm(weights, axis=1)
    mean_norms = np.linalg.norm(report.means, axis=1)
    predicted_weights, predicted_means = imbalanced_closed_form(
        config.class_counts, head_depth=config.head_depth, weight_decay=config.weight_decay,
        feature_decay=config.feature_decay)
    table = []
    for index, count in enumerate(config.class_counts):
        table.append({
            "L": config.head_depth, "class": index, "n_c": int(count),
            "norm w_c": weight_norms[index], "predicted w_c": predicted_weights[index],
            "error w": abs(weight_norms[index] / predicted_weights[index] - 1),
            "norm mu_c": mean_norms[index], "predicted mu_c": predicted_means[index],
            "error mu": abs(mean_norms[index] / predicted_means[index] - 1)})
    return report, table


def imbalanced(out, *, grid="quick", seeds=None, workers=None, device="auto",
               progress=True):
    """Reproduction 3: unconstrained features, imbalanced classes, bias-free MSE.

    Parameters
    ----------
    out : str
        Folder of the run folders (``runs/``), ``report.md``, metrics and plots.
        Calling again on the same folder resumes: finished runs are not trained
        again.
    grid : {"quick", "full"} or ImbalancedGrid
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

    class_rows, statements, figure_points, run_values = [], [], {}, {}
    for setting, config in settings(spec).items():
        names = [run.name for run in runs if run.setting == setting]
        measured = [measure_imbalanced(records[name].path, records[name].run.config)
                    for name in names]
        for name, (report, table) in zip(names, measured):
            run_values[name] = {
                "nc2_orthogonality": report.nc2_orthogonality,
                # np.max, not max: a NaN error (a closed form of 0) must not be skipped.
                "worst error": float(np.max([[row["error w"], row["error mu"]]
                                             for row in table]))}
        orthogonality = Spread.of(report.nc2_orthogonality for report, _ in measured)
        worst = Spread.of(run_values[name]["worst error"] for name in names)
        checks = (below(orthogonality, ORTHOGONALITY_TOLERANCE),
                  below(worst, CLOSED_FORM_TOLERANCE))
        statements.append(Statement(
            f"I L={config.head_depth}",
            f"L = {config.head_depth}: the class means are orthogonal (nc2_orthogonality < "
            f"{ORTHOGONALITY_TOLERANCE:g}) and ‖w_c‖ and ‖μ_c‖ follow the closed form: the "
            f"worst relative error over the classes is below {CLOSED_FORM_TOLERANCE:.0%} (its "
            "mean over the seeds)",
            combine(check.verdict for check in checks),
            f"nc2_orthogonality {orthogonality}: {checks[0].verdict}; worst relative error "
            f"{worst}: {checks[1].verdict}"))
        for index, count in enumerate(config.class_counts):
            cell = {key: Spread.of(table[index][key] for _, table in measured)
                    for key in ("norm w_c", "norm mu_c", "error w", "error mu")}
            first = measured[0][1][index]
            class_rows.append({"L": config.head_depth, "class": index, "n_c": int(count),
                               "predicted ‖w_c‖": first["predicted w_c"],
                               "measured ‖w_c‖": str(cell["norm w_c"]),
                               "predicted ‖μ_c‖": first["predicted mu_c"],
                               "measured ‖μ_c‖": str(cell["norm mu_c"]),
                               "error w": str(cell["error w"]),
                               "error μ": str(cell["error mu"])})
            point_name = f"class {index} (n_c = {int(count)})"
            figure_points.setdefault(f"‖w_c‖, L = {config.head_depth}", []).append(
                (first["predicted w_c"], cell["norm w_c"], point_name))
            figure_points.setdefault(f"‖μ_c‖, L = {config.head_depth}", []).append(
                (first["predicted mu_c"], cell["norm mu_c"], point_name))
    verdict = statement_verdict(statements)

    from ncfast.harness.figures import predicted_figure
    from ncfast.plots import save_figure

    with published(out, rows) as staging:
        plots = {}
        for name, which in (("weight_norms.png", "‖w_c‖"), ("mean_norms.png", "‖μ_c‖")):
            plots[name] = predicted_figure(
                {label: points for label, points in figure_points.items()
                 if label.startswith(which)},
                title=f"{which} measured (mean ± std over seeds) against the closed form")
            save_figure(plots[name], os.path.join(staging, name))
        grid_lines = [
            f"- Unconstrained features: one free row of width {imbalanced_config(1).width} per "
            f"training sample, class counts {', '.join(map(str, spec.class_counts))}.",
            f"- Head: L bias-free linear layers, L in {', '.join(map(str, spec.depths))} (inner "
            "layers start orthogonal).",
            f"- Loss: ‖WH − Y‖²/(2N) + λ/2 Σ‖W_l‖² + λ/2 ‖H‖², λ = {spec.decay:g}; full-batch SGD, "
            f"momentum 0.9, cosine schedule, {spec.epochs} steps.",
            f"- Seeds: {seeds} per depth; {len(runs)} runs.",
            "- Measured: at the last checkpoint, nc2_orthogonality of the free features and the "
            "row norms of W = W_L⋯W_1 and of the uncentred class means, against docs/metrics.md's "
            "closed form."]
        report = write_report(
            out, folder=staging,
            title="Reproduction 3: imbalanced bias-free MSE (Dang et al. 2023)",
            claim=CLAIM, command=reproduce_command("imbalanced", grid=grid, seeds=seeds,
                                                   workers=timing.workers, device=timing.device,
                                                   out=out),
            verdict=f"the claim {VERDICT_WORDS[verdict]} on this grid.",
            statements=statements, scope=spec.scope, grid_lines=grid_lines,
            sections=[("Per class (mean ± std over seeds)", markdown_table(class_rows))],
            plots=list(plots), records=records, run_values=run_values, timing=timing,
            measure_seconds=time.perf_counter() - measuring,
            notes=["Norms are compared in absolute terms (docs/metrics.md states "
                   "proportionality; with the loss above the closed form holds exactly). "
                   "`μ_c` is the uncentred class mean of the free features; `w_c` a row of the "
                   "head's product W_L⋯W_1.",
                   "The inner layers of a deep head start orthogonal. With PyTorch's default "
                   "(smaller) initialisation the L = 3 run instead left the two 50-row classes at "
                   "the zero local minimum (‖w_c‖ about 0 against 3.96 predicted, for seeds 0, 1 "
                   "and 2): gradient descent can find minority collapse although the closed "
                   "form's non-zero solution has the lower loss."])
    return Reproduction("imbalanced", CLAIM, verdict, statements, report,
                        {"classes": class_rows})
