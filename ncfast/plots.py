"""PNG figures of an analysis.

- ``METRIC.png``: each metric against epoch, in the style of Papyan, Han &
  Donoho (2020): epoch on a log axis, one line per run, layer and split
  (train solid, other splits dashed, one colour per run and layer; a split
  whose curve equals another's drawn once), the metric on a log axis when it
  is positive and spans more than a decade; epochs without a finite value
  marked at the top.
- ``memorization_vs_dilation.png``: the two label-noise metrics over
  training (Nguyen et al. 2023).
- ``snapshot-RUN-epochE-LAYER-SPLIT.png``: one checkpoint (the last of each
  run, layer and split): the cosines between centred class means beside the
  simplex ETF's ``-1/(C'-1)``, and per-class variance, mean norm and accuracy
  (distributions instead when there are too many classes to draw one by one).

Figures are drawn with matplotlib's object API (no pyplot state) and written
atomically. ``write_plots`` also removes figures of these names that an earlier
analysis left in the folder and this one does not draw, so the folder never
mixes two analyses.
"""
import io
import os
import re
import textwrap

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import (FixedLocator, FuncFormatter, LogLocator, MaxNLocator,
                               NullFormatter, StrMethodFormatter)

from ncfast.dumps import write_atomically
from ncfast.report import DRAWN_CLASSES, METRICS

NOISE_FIGURE = "memorization_vs_dilation.png"
SNAPSHOT_PREFIX = "snapshot-"

#: Line style of each split; splits not listed are dotted.
SPLIT_STYLES = {"train": "-", "test": "--"}


def _curves(rows, metric):
    """``{(source, layer, split): (epochs, values)}`` for rows with an epoch, sorted by epoch.

    A value that is not a finite number (None: NaN or an overflow to ±inf, which the rows
    cannot tell apart) is NaN; a curve with no finite value is left out.
    """
    curves = {}
    for row in rows:
        if row["epoch"] is None:
            continue
        value = row.get(metric)
        curves.setdefault((row["source"], row["layer"], row["split"]), []).append(
            (row["epoch"], np.nan if value is None else value))
    curves = {key: tuple(np.array(column, dtype=float) for column in zip(*sorted(points)))
              for key, points in curves.items()}
    return {key: (epochs, np.where(np.isfinite(values), values, np.nan))
            for key, (epochs, values) in curves.items() if np.isfinite(values).any()}


#: The PNG ``Software`` text of every figure ncfast draws: only files carrying it are ever
#: removed as stale (a figure of the user's own by the same name is left alone).
FIGURE_SOFTWARE = "ncfast analyze"


def save_figure(figure, path):
    """Write a matplotlib figure to ``path`` as a PNG (120 dpi, ``FIGURE_SOFTWARE``),
    atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, metadata={"Software": FIGURE_SOFTWARE})
    write_atomically(path, lambda stream: stream.write(buffer.getvalue()))


def drawn_by_ncfast(path):
    """Whether the PNG at ``path`` carries ``FIGURE_SOFTWARE`` (False for any other file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("Software") == FIGURE_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def source_labels(sources):
    """The shortest trailing parts of each path that tell the sources apart.

    ``["/x/a/run", "/x/b/run"]`` gives ``{"/x/a/run": "a/run", "/x/b/run":
    "b/run"}``; a single source gets its last part.

    Parameters
    ----------
    sources : iterable of str

    Returns
    -------
    dict of str to str
    """
    parts = {source: os.path.normpath(source).split(os.sep) for source in set(sources)}
    for depth in range(1, max(map(len, parts.values()), default=0) + 1):
        labels = {source: "/".join(part[-depth:]) for source, part in parts.items()}
        if len(set(labels.values())) == len(labels):
            return labels
    return {source: source for source in parts}


def _line_label(key, labels, splits):
    source, layer, _ = key
    label = f"{layer} / {' = '.join(splits)}"
    return f"{labels[source]}: {label}" if len(labels) > 1 else label


def _distinct_curves(curves):
    """The curves to draw: one that equals another of the same run and layer exactly (a
    test split measured against the train means, for a metric of the means alone) is drawn
    once.

    Returns
    -------
    dict
        ``(source, layer, split)`` -> the splits that curve draws, train first.
    """
    drawn = {}
    for key in sorted(curves, key=lambda key: (key[:2], key[2] != "train", key[2])):
        epochs, values = curves[key]
        same = [other for other in drawn if other[:2] == key[:2]
                and np.array_equal(curves[other][0], epochs)
                and np.array_equal(curves[other][1], values, equal_nan=True)]
        if same:
            drawn[same[0]].append(key[2])
        else:
            drawn[key] = [key[2]]
    return drawn


def _legend_below(figure, axes):
    """The legend of ``axes`` under them (never over a curve), two entries a row in their
    order (a run's train and test side by side); the figure grows by the rows it takes."""
    handles, labels = axes.get_legend_handles_labels()
    columns = min(len(handles), 2)
    figure.set_figheight(figure.get_figheight() + 0.14 * -(-len(handles) // columns))
    # The legend fills its columns one after the other.
    figure.legend(handles[0::2] + handles[1::2], labels[0::2] + labels[1::2],
                  loc="outside lower center", ncols=columns, fontsize=7, frameon=False)


def _epoch_axis(axes, epochs):
    """Epoch on a log axis (symmetric log when epoch 0 is there), ticks as plain integers.

    Within a decade the log axis has no major tick to label: the epochs are the ticks
    (integers spread over the range when there are more than 8; never ``2×10⁰``).
    """
    first, last = epochs.min(), epochs.max()
    if first > 0:
        axes.set_xscale("log")
        if last < 10 * first:
            distinct = np.unique(epochs)
            axes.xaxis.set_major_locator(FixedLocator(distinct) if distinct.size <= 8 else
                                         MaxNLocator(nbins=6, integer=True))
        else:  # 1, 2, 5, 10, ... up to three decades, else the decades alone
            axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if last <= 1000 * first
                                                    else (1,)))
        axes.xaxis.set_minor_formatter(NullFormatter())
    else:
        axes.set_xscale("symlog")
    axes.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))


#: Values a logarithmic metric axis may span.
LOG_AXIS_RANGE = (1e-250, 1e250)

#: Characters of a METRIC.png title per line.
TITLE_WIDTH = 60


def metric_figure(rows, metric):
    """One metric against epoch, one line per (source, layer, split).

    A split whose curve equals another of the same run and layer is drawn once, labelled
    ``train = test``; an epoch where a curve has no finite value (an overflow, NaN) breaks
    the line and is marked with an ``x`` at the top of the axes. The legend is under the
    axes.

    Parameters
    ----------
    rows : list of dict
        Result rows of ``ncfast.analyze.analyze``.
    metric : str
        A key of ``ncfast.METRICS``.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when no run, layer and split defines the metric at two epochs or
        more (one checkpoint is drawn by ``snapshot_figure``).
    """
    curves = _curves(rows, metric)
    if all(len(epochs) < 2 for epochs, _ in curves.values()):
        return None
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    # One colour per run and layer; the split (train/test) sets the line style.
    sources_and_layers = sorted({key[:2] for key in curves})
    colours = {pair: f"C{index % 10}" for index, pair in enumerate(sources_and_layers)}
    labels = source_labels(key[0] for key in curves)
    drawn = _distinct_curves(curves)
    not_finite = "no value (overflow, NaN or undefined)"
    for key, splits in drawn.items():
        epochs, values = curves[key]
        axes.plot(epochs, values, SPLIT_STYLES.get(key[2], ":"), color=colours[key[:2]],
                  marker="o", markersize=3, linewidth=1.5,
                  label=_line_label(key, labels, splits))
        missing = np.isnan(values)
        if missing.any():
            axes.plot(epochs[missing], np.ones(missing.sum()), "x", color=colours[key[:2]],
                      markersize=7, clip_on=False, transform=axes.get_xaxis_transform(),
                      label=not_finite)
            not_finite = None  # one legend entry for every such marker
    every_value = np.concatenate([values for _, values in curves.values()])
    _epoch_axis(axes, np.concatenate([epochs for epochs, _ in curves.values()]))
    positive = every_value[np.isfinite(every_value)]
    # A log axis whose range nears float64's own (Riesz kernels of wide layers) makes
    # matplotlib's tick formatter overflow: such a metric keeps a linear axis.
    if positive.size and LOG_AXIS_RANGE[0] < positive.min() and \
            positive.max() < LOG_AXIS_RANGE[1] and positive.max() > 10 * positive.min():
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(textwrap.fill(f"{metric}: {METRICS[metric]}", TITLE_WIDTH), fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    _legend_below(figure, axes)
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
    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    axes = figure.add_subplot()
    labels = source_labels(key[0] for key in keys)
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
                  label=_line_label(key, labels, [key[2]]))
        scatter = axes.scatter(dilated[theirs], memorized[mine], c=shared, cmap="viridis",
                               norm=norm, s=18, zorder=3)
    colorbar = figure.colorbar(scatter, ax=axes, label="epoch")
    colorbar.ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes.set_xlabel("dilation (spread of clean rows' distances to their mean, scaled)")
    axes.set_ylabel("memorization\n(corrupted rows to true mean, scaled)")
    axes.set_title("memorization vs dilation (label noise)", fontsize=9)
    axes.grid(True, alpha=0.3)
    _legend_below(figure, axes)
    return figure


def _per_class(row, key):
    """A per-class list of a row over its present classes, as floats (NaN for None)."""
    values = row.get(key)
    if values is None:
        return None
    return np.array([np.nan if value is None else value for value in values],
                    dtype=float)[row["present_classes"]]


def _class_ticks(axis, classes):
    """Label an axis of per-class positions with the class indices (not the positions):
    every class up to 20, else a few."""
    if classes.size <= 20:
        axis.set_ticks(np.arange(classes.size), [str(c) for c in classes], fontsize=7)
    else:
        axis.set_major_locator(MaxNLocator(integer=True))
        axis.set_major_formatter(FuncFormatter(
            lambda position, _: str(classes[int(position)])
            if 0 <= position < classes.size else ""))


def _cosine_panel(figure, axes, matrix, classes):
    """Heatmap of the cosines between centred class means, the ETF's value on its colour bar."""
    image = axes.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    etf = -1.0 / (classes.size - 1)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.9)
    colorbar.ax.axhline(etf, color="black", linewidth=2)
    colorbar.set_ticks([-1.0, 0.0, 1.0], labels=["-1", "0", "1"])
    # Beside the ticks its value would collide with "0" (or "-1" for two classes).
    colorbar.set_label(f"black line: simplex ETF -1/(C'-1) = {etf:.3g}", fontsize=8)
    axes.set_title("cos between centred class means", fontsize=9)
    _class_ticks(axes.xaxis, classes)
    _class_ticks(axes.yaxis, classes)
    axes.set_xlabel("class")
    axes.set_ylabel("class")


def _cosine_distribution_panel(axes, cosines, histogram, num_means):
    """Distribution of the off-diagonal cosines with the simplex ETF's value marked.

    ``cosines`` (the pairs' values) when the row has the matrix, else the stored
    ``histogram`` ``(counts, edges)`` (bins over the range the cosines span). The axis
    spans the cosines and the ETF's value.
    """
    etf = -1.0 / (num_means - 1)
    if cosines is not None:
        if np.ptp(cosines) > 0:
            axes.hist(cosines, bins="auto", alpha=0.7)
        else:  # one value (two classes: -1): a bin as wide as the matrix's rounding, 1e-4
            axes.hist(cosines, bins=1, range=(cosines[0] - 5e-5, cosines[0] + 5e-5), alpha=0.7)
        low, high = min(cosines.min(), etf), max(cosines.max(), etf)
    else:
        counts, edges = histogram
        axes.stairs(counts, edges, fill=True, alpha=0.7)
        filled = np.flatnonzero(counts)
        low, high = min(edges[filled[0]], etf), max(edges[filled[-1] + 1], etf)
    # 5% margins, and never narrower than 1e-3 (ten times the cosines' resolution).
    centre, half_width = (low + high) / 2, max(0.55 * (high - low), 5e-4)
    axes.set_xlim(centre - half_width, centre + half_width)
    axes.ticklabel_format(axis="x", useOffset=False)  # cosines as they are, not "+ -1"
    axes.axvline(etf, color="black", linestyle="--", linewidth=1.2)
    axes.set_xlabel("cos between centred class means")
    axes.set_ylabel("class pairs")
    pairs = num_means * (num_means - 1) // 2
    # The ETF's value in the title: a legend would cover bars.
    axes.set_title(f"{pairs} class pair{'s' if pairs > 1 else ''}; dashed line: simplex ETF "
                   f"-1/(C'-1) = {etf:.3g}", fontsize=9)


def _class_panel(axes, classes, series, label, value_range=None):
    """One bar per class (side by side for several series) when they fit, else the
    distribution over classes (histogram bins over ``value_range`` when given, several
    series side by side).

    ``series`` is a list of ``(values over classes, name)``.
    """
    if classes.size <= DRAWN_CLASSES:
        width = 0.8 / len(series)
        for index, (values, name) in enumerate(series):
            offset = (index - (len(series) - 1) / 2) * width
            axes.bar(np.arange(classes.size) + offset, values, width, label=name)
        _class_ticks(axes.xaxis, classes)
        values = series[0][0]
        if np.isfinite(values).any():
            axes.axhline(np.nanmean(values), color="black", linewidth=0.8, linestyle=":")
        axes.set_xlabel("class")
        axes.set_ylabel(label)
    else:
        axes.hist([values[np.isfinite(values)] for values, _ in series], bins=40,
                  range=value_range, label=[name for _, name in series])
        axes.set_xlabel(label)
        axes.set_ylabel("classes")
    if len(series) > 1:  # above the axes: bars near 1 (accuracies) fill the top inside
        axes.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series),
                    frameon=False)


def snapshot_figure(row, title):
    """One checkpoint's geometry: class-mean cosines against the ETF, per-class bars.

    Parameters
    ----------
    row : dict
        A result row of ``ncfast.analyze.analyze`` (with ``cosine_matrix`` or
        ``cosine_histogram``, ``present_classes`` and the per-class lists).
    title : str

    Returns
    -------
    matplotlib.figure.Figure or None
        None when the row has fewer than two class means or no cosines.
    """
    classes = np.asarray(row.get("present_classes") or [], dtype=np.int64)
    if classes.size < 2 or (row.get("cosine_matrix") is None
                            and row.get("cosine_histogram") is None):
        return None
    figure = Figure(figsize=(12.0, 7.5), layout="constrained")
    grid = figure.add_gridspec(2, 6)
    if row.get("cosine_matrix") is not None:
        matrix = np.array(row["cosine_matrix"], dtype=float)
        _cosine_panel(figure, figure.add_subplot(grid[0, 0:3]), matrix, classes)
        _cosine_distribution_panel(figure.add_subplot(grid[0, 3:6]),
                                   matrix[np.triu_indices(classes.size, 1)], None, classes.size)
    else:  # too many classes for a heatmap: their distribution takes the whole row
        histogram = tuple(np.array(row["cosine_histogram"][key], dtype=float)
                          for key in ("counts", "edges"))
        _cosine_distribution_panel(figure.add_subplot(grid[0, :]), None, histogram,
                                   classes.size)
    _class_panel(figure.add_subplot(grid[1, 0:2]), classes,
                 [(_per_class(row, "class_variances"), "variance")],
                 r"within-class variance $\sigma_c^2$")
    _class_panel(figure.add_subplot(grid[1, 2:4]), classes,
                 [(_per_class(row, "class_mean_norms"), "norm")], r"$\|\mu_c - \mu_G\|$")
    accuracies = [(_per_class(row, "class_ncc_accuracy"), "nearest class centre")]
    if row.get("class_accuracy") is not None:
        accuracies.insert(0, (_per_class(row, "class_accuracy"), "classifier"))
    _class_panel(figure.add_subplot(grid[1, 4:6]), classes, accuracies, "accuracy",
                 value_range=(0.0, 1.0))
    summary = "  ".join(f"{name} {row[name]:.3g}" for name in ("nc1", "nc2_etf", "nc3")
                        if row.get(name) is not None)
    figure.suptitle(f"{title}\n{classes.size} classes with means; {summary}", fontsize=10)
    return figure


def _file_part(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def snapshot_rows(rows):
    """The rows to draw snapshots of: the last epoch of each (source, layer, split).

    Returns
    -------
    dict of str to dict
        File name (``snapshot-RUN[-epochE]-LAYER-SPLIT.png``, with ``-2``, ``-3``, ... before
        ``.png`` where the names of two runs, layers or splits become the same file name,
        e.g. ``a b`` and ``a_b``) -> row.
    """
    last = {}
    for row in rows:
        key = (row["source"], row["layer"], row["split"])
        epoch = -1 if row["epoch"] is None else row["epoch"]
        if key not in last or epoch > last[key][0]:
            last[key] = (epoch, row)
    labels = source_labels(key[0] for key in last)
    named = {}
    for (source, layer, split), (_, row) in sorted(last.items()):
        epoch = "" if row["epoch"] is None else f"-epoch{row['epoch']}"
        stem = (f"{SNAPSHOT_PREFIX}{_file_part(labels[source])}{epoch}-{_file_part(layer)}-"
                f"{_file_part(split)}")
        name, copy = f"{stem}.png", 1
        while name in named:
            copy += 1
            name = f"{stem}-{copy}.png"
        named[name] = row
    return named


def is_plot_name(name):
    """Whether a file name is one ``write_plots`` writes (and may remove as stale)."""
    return (name in {f"{metric}.png" for metric in METRICS} or name == NOISE_FIGURE
            or (name.startswith(SNAPSHOT_PREFIX) and name.endswith(".png")))


def write_plots(rows, out, metrics):
    """Write the figures of an analysis into ``out``; remove stale ones of earlier analyses.

    One PNG per metric that some run, layer and split has at two epochs or
    more (``METRIC.png``), ``memorization_vs_dilation.png`` (when a metric of
    the two is asked for), and a snapshot of the last checkpoint of each run,
    layer and split. Files of these names in ``out`` that this analysis does
    not write are removed.

    Parameters
    ----------
    rows : list of dict
    out : str or PathLike
        Folder; created if missing.
    metrics : sequence of str

    Returns
    -------
    written : list of str
    removed : list of str
        Earlier figures removed.
    """
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    figures = {f"{metric}.png": lambda metric=metric: metric_figure(rows, metric)
               for metric in metrics}
    if "memorization" in metrics or "dilation" in metrics:
        figures[NOISE_FIGURE] = lambda: noise_figure(rows)
    labels = source_labels(row["source"] for row in rows)
    for name, row in snapshot_rows(rows).items():
        epoch = "" if row["epoch"] is None else f" epoch {row['epoch']}"
        title = f"{labels[row['source']]}{epoch}, {row['layer']} / {row['split']}"
        figures[name] = lambda row=row, title=title: snapshot_figure(row, title)
    written = []
    for name, draw in figures.items():
        figure = draw()
        if figure is not None:
            path = os.path.join(out, name)
            save_figure(figure, path)
            written.append(path)
    return written, remove_stale_plots(out, written)


def remove_stale_plots(out, written):
    """Remove the figures in ``out`` that ``write_plots`` names and an ncfast drew
    (``drawn_by_ncfast``) but that it did not write now.

    Returns
    -------
    list of str
        The files removed.
    """
    kept = {os.path.basename(path) for path in written}
    removed = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if is_plot_name(name) and name not in kept and os.path.isfile(path) \
                and drawn_by_ncfast(path):
            os.remove(path)
            removed.append(path)
    return removed
