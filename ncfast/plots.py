"""PNG figures of an analysis: each metric against epoch, and memorization vs dilation.

In the style of Papyan, Han & Donoho (2020): epoch on a log axis, one line per
layer and split (train solid, other splits dashed, one colour per layer), the
metric on a log axis when it is positive and spans more than a decade.
Figures are drawn with matplotlib's object API (no pyplot state) and written
atomically.
"""
import io
import os

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from ncfast.dumps import write_atomically
from ncfast.report import METRICS

#: Line style of each split; splits not listed are dotted.
SPLIT_STYLES = {"train": "-", "test": "--"}


def _curves(rows, metric):
    """``{(source, layer, split): (epochs, values)}`` for rows with an epoch, sorted by epoch."""
    curves = {}
    for row in rows:
        value = row.get(metric)
        if row["epoch"] is None or value is None:
            continue
        curves.setdefault((row["source"], row["layer"], row["split"]), []).append(
            (row["epoch"], value))
    return {key: tuple(np.array(column, dtype=float) for column in zip(*sorted(points)))
            for key, points in curves.items()}


def save_figure(figure, path):
    """Write a matplotlib figure to ``path`` as a PNG (120 dpi), atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_atomically(path, lambda stream: stream.write(buffer.getvalue()))


def _line_label(key, many_sources):
    source, layer, split = key
    label = f"{layer} / {split}"
    return f"{os.path.basename(os.path.normpath(source))}: {label}" if many_sources else label


def metric_figure(rows, metric):
    """One metric against epoch, one line per (source, layer, split).

    Parameters
    ----------
    rows : list of dict
        Result rows of ``ncfast.analyze.analyze``.
    metric : str
        A key of ``ncfast.METRICS``.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when no row with an epoch defines the metric.
    """
    curves = _curves(rows, metric)
    if not curves:
        return None
    figure = Figure(figsize=(5.5, 4.0))
    axes = figure.add_subplot()
    # One colour per run and layer; the split (train/test) sets the line style.
    sources_and_layers = sorted({key[:2] for key in curves})
    colours = {pair: f"C{index % 10}" for index, pair in enumerate(sources_and_layers)}
    many_sources = len({key[0] for key in curves}) > 1
    for key, (epochs, values) in sorted(curves.items()):
        axes.plot(epochs, values, SPLIT_STYLES.get(key[2], ":"), color=colours[key[:2]],
                  marker="o", markersize=3, linewidth=1.5, label=_line_label(key, many_sources))
    every_value = np.concatenate([values for _, values in curves.values()])
    every_epoch = np.concatenate([epochs for epochs, _ in curves.values()])
    axes.set_xscale("log" if every_epoch.min() > 0 else "symlog")
    positive = every_value[np.isfinite(every_value)]
    if positive.size and positive.min() > 0 and positive.max() > 10 * positive.min():
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: {METRICS[metric]}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.9)
    return figure


def noise_figure(rows):
    """Memorization against dilation over training (Nguyen et al. 2023).

    One line per (source, layer) of the train split, points coloured by epoch.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when no row has both metrics.
    """
    memorization, dilation = _curves(rows, "memorization"), _curves(rows, "dilation")
    keys = sorted(set(memorization) & set(dilation))
    if not keys:
        return None
    figure = Figure(figsize=(5.5, 4.0))
    axes = figure.add_subplot()
    many_sources = len({key[0] for key in keys}) > 1
    epochs = np.concatenate([memorization[key][0] for key in keys])
    # One colour scale for every line; logarithmic like the epoch axes of the other figures.
    norm = (LogNorm if epochs.min() > 0 else Normalize)(epochs.min(), max(epochs.max(),
                                                                          epochs.min() + 1))
    scatter = None
    for index, key in enumerate(keys):
        epochs, memorized = memorization[key]
        dilation_epochs, dilated = dilation[key]
        shared, mine, theirs = np.intersect1d(epochs, dilation_epochs, return_indices=True)
        axes.plot(dilated[theirs], memorized[mine], "-", color=f"C{index % 10}", linewidth=1,
                  label=_line_label(key, many_sources))
        scatter = axes.scatter(dilated[theirs], memorized[mine], c=shared, cmap="viridis",
                               norm=norm, s=18, zorder=3)
    figure.colorbar(scatter, ax=axes, label="epoch")
    axes.set_xlabel("dilation (spread of clean rows, scaled)")
    axes.set_ylabel("memorization (corrupted rows to true mean, scaled)")
    axes.set_title("memorization vs dilation (label noise)", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.9)
    return figure


def write_plots(rows, out, metrics):
    """Write one PNG per metric (``METRIC.png``) and ``memorization_vs_dilation.png``.

    Parameters
    ----------
    rows : list of dict
    out : str or PathLike
        Folder; created if missing.
    metrics : sequence of str

    Returns
    -------
    list of str
        The files written (metrics no row defines against an epoch are skipped).
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    written = []
    figures = [(f"{metric}.png", metric_figure(rows, metric)) for metric in metrics]
    if "memorization" in metrics or "dilation" in metrics:
        figures.append(("memorization_vs_dilation.png", noise_figure(rows)))
    for name, figure in figures:
        if figure is not None:
            path = os.path.join(out, name)
            save_figure(figure, path)
            written.append(path)
    return written
