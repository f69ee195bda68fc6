"""``python -m bench``: ncfast, the textbook route and the torch routes against the floor.

For every size, in one run on one machine: each route's result is checked
against the textbook route on the first rows, then each is timed on the
whole input (best of a few runs after warming the JIT), beside the floor of
the machine (``bench.floor``) measured in the same run. Also: a fit of
ncfast's time against N, ncfast on one thread against all, and peak memory
beyond the input (``bench.memory``, in fresh processes). Prints a table and
writes JSON with the machine's facts to ``bench/results/``, and beside it a chart of
every route's time over the floor (``plot``).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import numba
import numpy as np
import psutil
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from rich.console import Console
from rich.table import Table

from bench.data import SPREAD, collapsed_features, positive_float, positive_int, whole_number
from bench.floor import SQUARE_SIDE, Floor, best_seconds, machine_read_bandwidth, sgemm_rate
from bench.machine import machine_facts, result_path
from bench.memory import peak_extra_bytes
from bench.routes import ROUTES, WARM_ROWS, check, empty_class_obstacle, thread_limit
from ncfast.dumps import write_text_atomically
from ncfast.plots import save_figure

GRID_ROWS = (10_000, 100_000, 1_000_000, 4_000_000)
GRID_FEATURES = (128, 512, 2048)
GRID_CLASSES = (10, 100, 1000)
#: Issue 2's size: N=1e6, D=512, C=100, float32, with a classifier.
HEADLINE = (1_000_000, 512, 100)
QUICK_SIZES = ((100_000, 512, 100), HEADLINE)
#: Rows for the fit of time against N (D and C of the headline).
SCALING_ROWS = (100_000, 1_000_000, 4_000_000)
#: Inputs larger than this fraction of the machine's memory are skipped.
INPUT_MEMORY_FRACTION = 0.4
#: Work ``N·D·(D + C)`` above which a slow route runs on leading rows only and
#: its time is scaled to N (all routes are linear in N). The broadcast NCC
#: distances of route ``torch`` (``N·C·D`` elementwise, through memory) put it
#: near the textbook route's time at C=100 and above it at larger C;
#: ``torch-gemm`` is far faster.
FULL_RUN_WORK = {"textbook": 3.5e11, "torch": 1e11, "torch-gemm": 2e12}
#: Rows of the correctness check of every route against the textbook route.
CHECK_ROWS = 20_000


@dataclass
class Row:
    """One size's measurements; times in seconds, ``None`` where not run."""

    rows: int
    features: int
    classes: int
    classifier: bool
    floor: float = None
    seconds: dict = field(default_factory=dict)
    sampled_rows: dict = field(default_factory=dict)
    peak_extra_bytes: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    @property
    def input_bytes(self):
        return 4 * self.rows * self.features

    @property
    def outputs(self):
        """Columns of pass 2's GEMM: C, or 2C with a classifier."""
        return self.classes * (2 if self.classifier else 1)


def parse_sizes(text):
    """``"1e6x512x100,1e5x512x100"`` → ``[(1000000, 512, 100), (100000, 512, 100)]``.

    An argparse type: a size that is not ``ROWSxFEATURESxCLASSES`` of whole numbers is a
    ValueError (argparse's "invalid value"), one without a row, a feature or two classes a
    usage error.
    """
    sizes = []
    for item in text.split(","):
        rows, features, classes = (whole_number(part) for part in item.lower().split("x"))
        if None in (rows, features, classes):
            raise ValueError(f"{item!r} is not ROWSxFEATURESxCLASSES of whole numbers")
        if rows < 1 or features < 1 or classes < 2:
            raise argparse.ArgumentTypeError(
                f"{item!r}: a size needs at least 1 row, 1 feature and 2 classes")
        sizes.append((rows, features, classes))
    return sizes


class Bench:
    """One benchmark run: one ``Row`` per size, and the best machine rates seen.

    The machine may be shared, so the read bandwidth and the square sgemm
    rate are measured again before every size, with pass 2's own GEMM shape;
    every row's floor uses the best rates of the whole run (``floor``).
    """

    def __init__(self, repeats, memory_sizes, console, spread=SPREAD):
        self.repeats = repeats
        self.spread = spread
        self.memory_sizes = memory_sizes
        self.console = console
        self.bandwidth = 0.0
        self.sgemm = (0.0, "")

    def measure_rates(self, num_features, num_outputs):
        """Measure the read bandwidth and both sgemm rates now; keep the best."""
        self.bandwidth = max(self.bandwidth, machine_read_bandwidth())
        square = sgemm_rate(SQUARE_SIDE, SQUARE_SIDE, rows=SQUARE_SIDE)[0]
        self.sgemm = max(self.sgemm, (square, f"{SQUARE_SIDE}^3"),
                         sgemm_rate(num_features, num_outputs))

    def floor(self):
        """``Floor`` at the best rates measured so far."""
        return Floor(self.bandwidth, *self.sgemm)

    def measure(self, size, classifiers, routes):
        """Check, time and (for ``memory_sizes``) weigh every route on one size."""
        num_rows, num_features, num_classes = size
        features, labels, weights, bias = collapsed_features(num_rows, num_features,
                                                             num_classes, spread=self.spread)
        rows = []
        for classifier in classifiers:
            clf_weights, clf_bias = (weights, bias) if classifier else (None, None)
            row = Row(num_rows, num_features, num_classes, classifier)
            self.measure_rates(num_features, row.outputs)
            checked = slice(0, min(num_rows, CHECK_ROWS))
            reference = ROUTES["textbook"](features[checked], labels[checked], num_classes,
                                           clf_weights, clf_bias)
            for name in routes:
                run = ROUTES[name]
                obstacle = None if not name.startswith("torch") else \
                    empty_class_obstacle(labels, checked.stop, num_classes)
                if obstacle is not None:
                    row.skipped[name] = obstacle
                    continue
                if name != "textbook":
                    check(name, run(features[checked], labels[checked], num_classes,
                                    clf_weights, clf_bias), reference)
                work = num_rows * num_features * (num_features + num_classes)
                sampled = num_rows
                if work > FULL_RUN_WORK.get(name, np.inf):
                    sampled = max(CHECK_ROWS, int(num_rows * FULL_RUN_WORK[name] / work))
                warm = min(sampled, WARM_ROWS)
                run(features[:warm], labels[:warm], num_classes, clf_weights, clf_bias)
                repeats = self.repeats if name == "ncfast" else 1
                seconds = best_seconds(
                    lambda: run(features[:sampled], labels[:sampled], num_classes, clf_weights,
                                clf_bias), repeats)
                row.seconds[name] = seconds * num_rows / sampled
                row.sampled_rows[name] = sampled
                if size in self.memory_sizes and sampled == num_rows:
                    row.peak_extra_bytes[name] = peak_extra_bytes(
                        name, num_rows, num_features, num_classes, classifier)
            rows.append(row)
            self.console.print(_row_line(row))
        return rows, (features, labels, weights, bias)


def _row_line(row):
    times = "  ".join(f"{name} {seconds:.3f}s" for name, seconds in row.seconds.items())
    skipped = "".join(f"  ({name} not run: {reason})" for name, reason in row.skipped.items())
    return (f"N={row.rows} D={row.features} C={row.classes} classifier={row.classifier}: "
            f"{times}{skipped}  (load {os.getloadavg()[0]:.1f})")


def scaling_exponent(rows):
    """Exponent of ncfast's time against N at the headline's D and C, with a classifier.

    Least squares on logs over the rows with N in ``SCALING_ROWS``' range;
    None with fewer than two such N.
    """
    points = [(row.rows, row.seconds["ncfast"]) for row in rows
              if (row.features, row.classes) == HEADLINE[1:] and row.classifier
              and SCALING_ROWS[0] <= row.rows <= SCALING_ROWS[-1] and "ncfast" in row.seconds]
    if len({rows for rows, _ in points}) < 2:
        return None
    logs = np.log(np.array(points))
    return float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0])


def _format_seconds(row, name):
    if name not in row.seconds:
        return "-"
    mark = "~" if row.sampled_rows[name] < row.rows else ""
    return f"{mark}{row.seconds[name]:.3f}"


def render(rows, console):
    """The side-by-side table; ``~`` marks a time scaled up from leading rows.

    One time column for every route run (in ``ROUTES``' order), and one
    ratio to ncfast for every route but ncfast.
    """
    timed = [name for name in ROUTES if any(name in row.seconds for row in rows)]
    compared = [name for name in timed if name != "ncfast"]
    table = Table(title=" vs ".join(timed + ["floor"]) + " (seconds, both passes)")
    for header in ("N", "D", "C", "W", *(f"{name} s" for name in timed), "floor s",
                   "ncfast/floor", *(f"{name}/ncfast" for name in compared),
                   "ncfast extra mem"):
        table.add_column(header, justify="right")
    for row in rows:
        fast = row.seconds.get("ncfast")
        ratios = [f"{row.seconds[name] / fast:.1f}x" if fast and name in row.seconds else "-"
                  for name in compared]
        memory = row.peak_extra_bytes.get("ncfast")
        table.add_row(
            f"{row.rows:.0e}", str(row.features), str(row.classes),
            "yes" if row.classifier else "no",
            *(_format_seconds(row, name) for name in timed),
            f"{row.floor:.3f}", f"{fast / row.floor:.2f}x" if fast else "-", *ratios,
            "-" if memory is None else f"{100 * memory / row.input_bytes:.1f}%")
    console.print(table)


def plot(rows):
    """Every route's time over the floor, per size: one marker per route and size.

    The floor is 1 (a line), the axis logarithmic; a route timed on leading rows
    and scaled to N (``~`` in the table) is drawn hollow. Sizes in the table's order.

    Parameters
    ----------
    rows : list of Row
        With ``floor`` set.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = Figure(figsize=(max(7.5, 0.45 * len(rows) + 3.5), 4.8), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(rows))
    for color, (name, marker) in enumerate(zip(ROUTES, "osD^")):
        for scaled in (False, True):
            drawn = [index for index, row in enumerate(rows) if name in row.seconds
                     and (row.sampled_rows[name] < row.rows) == scaled]
            if drawn:
                axes.scatter(positions[drawn],
                             [rows[index].seconds[name] / rows[index].floor for index in drawn],
                             marker=marker, s=36, linewidths=1.2,
                             facecolors="none" if scaled else f"C{color}",
                             edgecolors=f"C{color}",
                             label=name + (", time scaled up to N from its leading rows"
                                           if scaled else ""))
    axes.axhline(1.0, color="black", linewidth=1.2, label="floor (1)")
    axes.set_xticks(positions, [
        f"{row.rows:.0e}×{row.features}×{row.classes}" + ("\nW" if row.classifier else "")
        for row in rows], rotation=90 if len(rows) > 8 else 0, fontsize=8)
    axes.set_xlabel("size N×D×C (W: with a classifier)")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.set_ylabel("time / floor of the machine (log scale)")
    axes.set_title("Every route over the floor (two reads and the GEMM at the run's best rates)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"only N x D x C in {QUICK_SIZES}, with a classifier")
    parser.add_argument("--sizes", type=parse_sizes,
                        help="comma-separated NxDxC, e.g. 1e6x512x100,1e5x128x10")
    parser.add_argument("--classifier", choices=("both", "with", "without"), default="both")
    parser.add_argument("--routes", default=",".join(ROUTES),
                        help="comma-separated subset of " + ",".join(ROUTES) + " (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="ncfast runs per size (best)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--no-threads", action="store_true", help="skip the 1-thread run")
    parser.add_argument("--spread", type=positive_float, default=SPREAD,
                        help=f"within-class standard deviation of the synthetic features "
                        f"(default {SPREAD}: collapsed; 3 or more: every row beyond its NCC "
                        "radius)")
    args = parser.parse_args(argv)
    console = Console(width=180)
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = list(QUICK_SIZES)
    else:
        sizes = [(n, d, c) for n in GRID_ROWS for d in GRID_FEATURES for c in GRID_CLASSES]
    limit = INPUT_MEMORY_FRACTION * psutil.virtual_memory().total
    skipped = [size for size in sizes if 4 * size[0] * size[1] > limit]
    sizes = [size for size in sizes if size not in skipped]
    classifiers = {"both": (True, False), "with": (True,), "without": (False,)}[
        "with" if args.quick else args.classifier]
    routes = args.routes.split(",")
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        parser.error(f"unknown routes {unknown}; choose from {','.join(ROUTES)}")
    memory_sizes = () if args.no_memory else (
        {HEADLINE, (SCALING_ROWS[-1],) + HEADLINE[1:]} & set(sizes))
    load_before = os.getloadavg()
    bench = Bench(args.repeats, memory_sizes, console, spread=args.spread)
    console.print(f"load average {load_before}")
    rows, threads = [], None
    for size in sizes:
        size_rows, data = bench.measure(size, classifiers, routes)
        rows += size_rows
        if size == HEADLINE and not args.no_threads and "ncfast" in routes:
            features, labels, weights, bias = data

            def headline():
                ROUTES["ncfast"](features, labels, size[2], weights, bias)

            # Alternate one and all threads, so that both see the same load.
            one = every = np.inf
            for _ in range(args.repeats):
                with thread_limit(1):
                    one = min(one, best_seconds(headline, 1))
                every = min(every, best_seconds(headline, 1))
            threads = {"threads": numba.get_num_threads(), "one_thread_seconds": one,
                       "all_threads_seconds": every, "speedup": one / every}
        del data
    floor = bench.floor()
    for row in rows:
        row.floor = floor.seconds(row.rows, row.features, row.outputs)
    console.print(f"floor rates (best of the run): read {floor.bandwidth / 1e9:.1f} GB/s, sgemm "
                  f"{floor.sgemm / 1e9:.0f} GFLOP/s ({floor.sgemm_shape})")
    render(rows, console)
    exponent = scaling_exponent(rows)
    if exponent is not None:
        console.print(f"ncfast time ~ N^{exponent:.3f} (D={HEADLINE[1]}, C={HEADLINE[2]}, with "
                      f"a classifier, N in [{SCALING_ROWS[0]:.0e}, {SCALING_ROWS[-1]:.0e}])")
    if threads:
        console.print(f"ncfast at the headline size: 1 thread {threads['one_thread_seconds']:.3f}"
                      f" s, {threads['threads']} threads {threads['all_threads_seconds']:.3f} s"
                      f" ({threads['speedup']:.2f}x)")
    if skipped:
        console.print(f"skipped (input over {INPUT_MEMORY_FRACTION:.0%} of memory): {skipped}")
    console.print("~: time of the leading rows (see sampled_rows in the JSON) scaled to N")
    path = result_path("bench")
    write_text_atomically(path, json.dumps({
        "machine": machine_facts(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "read_bandwidth_bytes_per_s": floor.bandwidth,
        "sgemm_flops": floor.sgemm,
        "sgemm_shape": floor.sgemm_shape,
        "rows": [asdict(row) | {"input_bytes": row.input_bytes} for row in rows],
        "scaling_exponent": exponent,
        "threads": threads,
        "skipped": skipped,
        "spread": args.spread,
        "command": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
    }, indent=1, default=str) + "\n")
    figure_path = path.with_suffix(".png")
    save_figure(plot(rows), str(figure_path))
    console.print(f"wrote {path} and {figure_path.name}")


if __name__ == "__main__":
    main()
