"""Figures of the reproductions, drawn with matplotlib's object API (no pyplot state).

- :func:`memorization_dilation_figure`: one point per run, coloured by the
  label-smoothing alpha, with the least-squares M-D line of each loss.
- :func:`series_figure`: a quantity against a swept parameter, one line per
  group, mean ± standard deviation over seeds as error bars.
- :func:`parameter_figure`: final values of several metrics against a
  parameter swept from 0 (e.g. weight decay), one panel each.
- :func:`collapse_curves_figure`: metrics against epoch, one curve per
  setting: the median over seeds and a band from the lowest to the highest.
- :func:`predicted_figure`: measured against predicted values with error bars, each
  point named.

Each returns a ``matplotlib.figure.Figure``; ``ncfast.plots.save_figure``
writes it.
"""
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

#: Markers of successive groups (noise settings, datasets).
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def _errors(spreads):
    """Standard deviations as error bar lengths (0 where one seed leaves it undefined)."""
    return [spread.std if np.isfinite(spread.std) else 0.0 for spread in spreads]


def _value_axis(axes, values):
    """Log y axis for positive values spanning more than a decade; "symlog" when zeros join
    them; linear otherwise.

    The symlog axis is linear up to the power of ten at or below the smallest positive
    value: its lowest decade tick then sits a whole linear region above the tick at 0. (Linear
    up to the smallest value itself put that power of ten inside the linear region, a few
    pixels above 0, the two tick labels on top of each other.)
    """
    values = np.asarray([value for value in values if np.isfinite(value)], dtype=float)
    positive = values[values > 0]
    if positive.size == 0 or positive.max() <= 10 * positive.min() or (values < 0).any():
        return
    if positive.size == values.size:
        axes.set_yscale("log")
    else:
        axes.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(positive.min())))
        axes.set_ylim(bottom=0.0)


def _metric_panels(metrics, title, draw):
    """A 2×2 figure, one panel per metric (up to 4): ``draw(axes, metric)`` fills each.

    Constrained layout makes room for each panel's tick and axis labels (wide log tick
    labels such as "3×10⁻²" pushed fixed margins' y labels out of the figure).
    """
    figure = Figure(figsize=(9.0, 6.6), layout="constrained")
    panels = figure.subplots(2, 2).ravel()
    for axes, metric in zip(panels, metrics):
        draw(axes, metric)
        axes.grid(True, which="both", alpha=0.3)
    for axes in panels[len(metrics):]:
        axes.set_visible(False)
    panels[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure


def memorization_dilation_figure(points, lines):
    """Memorization against dilation, one point per run (Nguyen et al. 2023, Fig. 2 style).

    Parameters
    ----------
    points : list of dict
        One per run: ``dilation``, ``memorization``, ``alpha`` (0 for
        cross-entropy) and ``noise`` (label of its noise setting).
    lines : dict of str to (Line, (float, float))
        Loss label to its fitted line ``memorization = intercept + slope *
        dilation`` and the dilation range it was fitted on.

    Returns
    -------
    Figure
    """
    figure = Figure(figsize=(6.4, 4.6))
    axes = figure.add_subplot()
    alphas = [point["alpha"] for point in points]
    norm = Normalize(0.0, max(max(alphas), 1e-9))
    scatter = None
    for index, noise in enumerate(dict.fromkeys(point["noise"] for point in points)):
        group = [point for point in points if point["noise"] == noise]
        scatter = axes.scatter([point["dilation"] for point in group],
                               [point["memorization"] for point in group],
                               c=[point["alpha"] for point in group], cmap="viridis", norm=norm,
                               marker=MARKERS[index % len(MARKERS)], s=36, edgecolors="black",
                               linewidths=0.4, label=noise, zorder=3)
    for index, (loss, (line, (low, high))) in enumerate(lines.items()):
        if not np.isfinite(line.slope):
            continue
        xs = np.linspace(low, high, 2)
        axes.plot(xs, line.intercept + line.slope * xs, ("-", "--", ":")[index % 3],
                  color="black", linewidth=1.2,
                  label=f"{loss}: slope {line.slope:.3g} ± {line.slope_error:.2g} "
                        f"({line.count} runs)")
    figure.colorbar(scatter, ax=axes, label="label smoothing α (0 = cross-entropy)")
    axes.set_xlabel("dilation (spread of clean rows' distances to their class mean, scaled)")
    axes.set_ylabel("memorization (corrupted rows to true mean, scaled)")
    axes.set_title("memorization vs dilation, last checkpoint, one point per run", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.subplots_adjust(left=0.12, right=0.98, bottom=0.11, top=0.93)
    return figure


def series_figure(series, *, xlabel, ylabel, title):
    """One line per group, mean ± standard deviation over seeds as error bars.

    Parameters
    ----------
    series : dict of str to list of (float, Spread)
        Group label to its (x, spread of y) points in x order.
    xlabel, ylabel, title : str

    Returns
    -------
    Figure
        The legend is outside the axes, on their right, where it covers no point or error
        bar.
    """
    figure = Figure(figsize=(7.0, 4.2), layout="constrained")
    axes = figure.add_subplot()
    for index, (label, points) in enumerate(series.items()):
        xs = [x for x, _ in points]
        axes.errorbar(xs, [spread.mean for _, spread in points],
                      yerr=_errors(spread for _, spread in points),
                      marker=MARKERS[index % len(MARKERS)], capsize=3, linewidth=1.3,
                      label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return figure


def collapse_curves_figure(curves, metrics, *, title):
    """Metrics against epoch: per setting the median over seeds and its min-max band.

    Parameters
    ----------
    curves : dict of str to (array of shape (E,), dict of str to array of shape (K, E))
        Setting label to its checkpoint epochs and, per metric, the values of
        its K seeds at those epochs.
    metrics : sequence of str
        One panel each (up to 4, in a 2×2 grid).
    title : str

    Returns
    -------
    Figure
    """
    def draw(axes, metric):
        every_value = []
        for index, (label, (epochs, values)) in enumerate(curves.items()):
            seeds = np.asarray(values[metric], dtype=float)
            colour = f"C{index % 10}"
            axes.plot(epochs, np.median(seeds, axis=0), "-", color=colour, marker="o",
                      markersize=2.5, linewidth=1.4, label=label)
            axes.fill_between(epochs, seeds.min(axis=0), seeds.max(axis=0), color=colour,
                              alpha=0.2, linewidth=0)
            every_value.extend(seeds.ravel())
        axes.set_xscale("log")
        _value_axis(axes, every_value)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)

    return _metric_panels(metrics, title, draw)


def parameter_figure(series, metrics, *, xlabel, title):
    """Final values against a parameter swept from 0: one panel per metric.

    Parameters
    ----------
    series : dict of str to dict of str to list of (float, Spread)
        Group label (e.g. dataset) to, per metric, its (parameter, spread)
        points in parameter order.
    metrics : sequence of str
        Up to 4, in a 2×2 grid.
    xlabel, title : str

    Returns
    -------
    Figure
        The parameter axis is linear up to its smallest positive value and
        logarithmic beyond ("symlog"), so that 0 has a place.
    """
    positive = [x for group in series.values() for points in group.values()
                for x, _ in points if x > 0]

    def draw(axes, metric):
        every_value = []
        for index, (label, group) in enumerate(series.items()):
            points = group[metric]
            means = [spread.mean for _, spread in points]
            axes.errorbar([x for x, _ in points], means,
                          yerr=_errors(spread for _, spread in points),
                          marker=MARKERS[index % len(MARKERS)], capsize=3, label=label)
            every_value.extend(means)
        if positive:
            axes.set_xscale("symlog", linthresh=min(positive))
        _value_axis(axes, every_value)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(f"{metric} (last epoch)")

    return _metric_panels(metrics, title, draw)


def predicted_figure(points, *, title):
    """Measured against predicted values, mean ± standard deviation over seeds, each point
    named beside it.

    Parameters
    ----------
    points : dict of str to list of (float, Spread, str)
        Group label to its (predicted, measured spread, name) points, e.g. name
        ``"class 2 (n_c = 50)"``.
    title : str

    Returns
    -------
    Figure
        With the line measured = predicted. Points of a group with the same predicted
        value (they fall on one spot when measured ≈ predicted) share one annotation,
        their names one per line, so that no point hides another unnamed.
    """
    figure = Figure(figsize=(5.6, 4.6), layout="constrained")
    axes = figure.add_subplot()
    every_value = []
    for index, (label, group) in enumerate(points.items()):
        axes.errorbar([predicted for predicted, _, _ in group],
                      [spread.mean for _, spread, _ in group],
                      yerr=_errors(spread for _, spread, _ in group),
                      linestyle="none", marker=MARKERS[index % len(MARKERS)], capsize=3,
                      label=label)
        shared = {}  # predicted value -> (measured mean of its first point, names)
        for predicted, spread, name in group:
            shared.setdefault(predicted, (spread.mean, []))[1].append(name)
        for predicted, (measured, names) in shared.items():
            axes.annotate("\n".join(names), (predicted, measured), xytext=(7, -5),
                          textcoords="offset points", ha="left", va="top", fontsize=7)
        every_value += [predicted for predicted, _, _ in group]
        every_value += [spread.mean for _, spread, _ in group]
    low, high = min(every_value), max(every_value)
    axes.plot([low, high], [low, high], ":", color="grey", linewidth=1,
              label="measured = predicted")
    axes.margins(0.1)  # room inside the axes for the names below the lowest point
    axes.set_xlabel("predicted by the closed form")
    axes.set_ylabel("measured (mean ± std over seeds)")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    return figure
