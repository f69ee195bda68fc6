"""``python -m bench.bench_shapes``: ncfast against its floor on the shapes researchers have.

Issue 18. Four shapes, rows × D × C, each with a classifier (ViT and the
vocabulary take ncfast's "features" route, C > D; the other two the
"classes" route):

==========================  ==========================================
100,000 × 2048 × 1000       ResNet-50 on ImageNet
1,000,000 × 512 × 10        ResNet-18 on CIFAR-10
1,000,000 × 768 × 1000      ViT on ImageNet
200,000 × 4096 × 32,000     a language model's vocabulary
==========================  ==========================================

Each is measured **collapsed** (``bench.data.collapsed_features`` with
``spread=0.5``: every row inside its NCC and classifier radii) and **far**
from collapse (``spread=4``, an early checkpoint: every row beyond them). Per
row of the table, in one run:

1. **Check.** ncfast and the torch route on the leading rows (20,000, or
   fewer where D is large: ``CHECK_WORK``) against the float64 textbook route
   (``bench.routes.check``), so that no wrong answer is timed; this also
   warms every JIT.
2. **ncfast**: ``ncfast.collapse``, best of ``--repeats``. At C ≤ 32 also pass 2's
   arithmetic alone (``pass2_arithmetic_seconds``: the narrow kernel over rows
   that stay in cache, every thread), and the least time it lets ncfast's
   kernels take, pass 1 at one read and pass 2 at the longer of one read and
   that arithmetic (``arith. bound`` in the table, over the floor).
3. **torch**: the accumulator route of the public torch library
   (``bench.torch_route.torch_collapse(..., ncc="gemm")``), once, on at most
   ``--torch-rows`` leading rows; a time scaled up to N (the route's passes
   are linear in N; its finish, a D×D pseudo-inverse and C×C distances, is
   then counted N/n times, well under a second at C ≤ 1000) is marked ``~``.
   The route is not run where it cannot be: where a class has no rows in
   the rows it gets (its NCC takes the NaN mean of such a class: scaled
   runs), or where its finish, about ``TORCH_PAIR_BYTES``·C² bytes (C×C
   distances, an index pair per class pair), exceeds ``TORCH_MEMORY_SHARE``
   of the memory available (the vocabulary on a 23 GiB machine).
4. **Floor** (``bench.floor.Floor.bound``): both passes read the rows
   (``N·D·4`` bytes each) at the best read rate of the run (every thread
   summing a ``BANDWIDTH_BYTES`` array), and pass 2 also does the GEMM flops
   its route cannot avoid, at the larger of the run's best square sgemm rate
   (``SQUARE_SIDE``³) and the rate of the shape's own GEMM
   (``SGEMM_ROWS × D × k``, k below); per pass ``read + max(read, GEMM)``.
   On the features route NC1's part of the GEMM may instead be a float64
   scatter at the run's square float64 rate, whichever is faster (below).

Unavoidable flops (C' the classes with rows, C_w = C the rows of ``W``; the
route is ncfast's, ``ncfast.geometry.route_for``):

- **classes route** (C' ≤ D): collapsed ``2·N·D·C'``, the NC1 projection
  ``a = Vᵀ M~ r`` of every row (a row inside its NCC and classifier radii is
  predicted from its class mean). Far from collapse also the classifier's
  logits, ``2·N·D·C_w``, and every row's products with all C' means for its
  NCC distances: ``z = M~ r`` and ``a = Vᵀ z`` are one C'×C' map apart, so
  one of them is ``2·N·D·C'`` flops and the other at least the map, ``2·N·C'²``
  float32 flops (what ncfast does: ``z = V a``), or NC1 from the float64 scatter
  ``Σ z zᵀ``, ``N·C'²`` flops at the float64 rate (``Row.scatter_flops``),
  whichever is faster, as on the features route. Own GEMM shape:
  ``k = C' + C_w`` or ``C'``. (Until 2026-12-01 the floor left the map out.)
- **features route** (C' > D): NC1 needs the within-class scatter along
  each eigenvector of ``Sigma_B``, in float64 (a float32 D×D scatter ``RᵀR``
  loses NC1 along directions where the residuals are small, and the precision
  rules of docs/algorithm.md keep scatter matrices in float64). Two routes
  give it: the residuals' coordinates in that eigenbasis, ``2·N·D²`` float32
  flops (what ncfast does), or a float64 scatter, ``N·D²`` flops at the float64
  rate (``Row.scatter_flops``); the floor takes whichever is faster at the
  run's rates. Far from collapse also the NCC distances and logits of every
  row, ``2·N·D·(C' + C_w)``. Own GEMM shape: ``k = D``. (Until 2026-11-29 the
  floor counted a float32 scatter, ``N·D²`` at the float32 rate.)
- **C ≤ 32** (``SKINNY_CLASSES``): issue 18 sets this target against the two
  reads alone, and the floor is those. The skinny GEMM does not always hide
  under a read: at 1,000,000 × 512 × 10 far from collapse its
  ``2·N·D·(C' + C_w)`` = 2.0e10 flops take 0.11 s at 177 GFLOP/s, more than a
  read of the rows (0.08 s at 26 GB/s).

Plus, on every route, the report's class-pair metrics (cosines, CDNV, the ETF
distances of the means and of ``W``) need the float64 Gram of the stacked
``[M~; W]`` (2C' rows): ``(2C')²·D`` flops (the symmetric half of the
product) at the run's best square float64 GEMM rate. It grows with C², not N,
and is the fixed cost issue 18 allows ("beyond the pair sweep"); the table
shows it as its own term.

Verdict, the issue's targets (``verdict``): ncfast at most ``FLOOR_LIMITS``
times its floor (1.5× far from collapse, 1.2× collapsed, 1.5× the two-read
floor at C ≤ 32); and ahead of the torch route by at least ``TORCH_SHARE``
of what the floor allows, ``(torch/ncfast) ≥ 0.8·(torch/floor)``.

    .venv/bin/python -m bench.bench_shapes [--shapes 1e5x2048x1000,...]
        [--spreads collapsed,far] [--repeats 3] [--torch-rows N] [--scale S]

``--scale S`` divides every N by S, for trial runs; the table title and the
JSON say so. Prints a table and writes ``bench/results/shapes-<UTC time>.json``
(with the machine's facts and the load average before and after) and a bar
chart ``shapes-<UTC time>.png`` (ncfast and torch over the floor per row, log scale:
``plot``).
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.data import SPREAD, collapsed_features, positive_int
from bench.floor import (SQUARE_SIDE, Floor, best_seconds, gemm_rate, machine_read_bandwidth)
from bench.machine import machine_facts, result_path
from bench.profile import least_collapse_seconds, narrow_in_cache_seconds
from bench.routes import ROUTES, check, empty_class_obstacle
from bench.suite import CHECK_ROWS as SUITE_CHECK_ROWS
from bench.suite import parse_sizes
from ncfast.accumulators import ClassSums, ResidualStats, runs_narrow_kernel
from ncfast.dumps import write_json_atomically
from ncfast.geometry import Geometry, route_for
from ncfast.plots import save_figure

#: The shapes of issue 18, rows × D × C, and what has them.
SHAPES = {
    (100_000, 2048, 1000): "ResNet-50 ImageNet",
    (1_000_000, 512, 10): "ResNet-18 CIFAR-10",
    (1_000_000, 768, 1000): "ViT ImageNet",
    (200_000, 4096, 32_000): "LM vocabulary",
}
#: Within-class standard deviation of the synthetic features: every row inside its
#: radii, and every row beyond them.
SPREADS = {"collapsed": SPREAD, "far": 4.0}

#: Fewest rows ``--scale`` may leave of a shape (a trial run: classes may lack rows).
MIN_SCALED_ROWS = 100

#: At most this many classes, the pass-2 GEMM is skinny and the floor is the two reads.
SKINNY_CLASSES = 32
#: ncfast's largest time over its floor that meets issue 18's target.
FLOOR_LIMITS = {"collapsed": 1.2, "far": 1.5}
SKINNY_LIMIT = 1.5
#: The share of the floor's lead over the torch route that ncfast must reach.
TORCH_SHARE = 0.8

#: Work bound of the check against the textbook route: its class loop adds a D×D product
#: per class, so it costs about C'·D², and the check takes at most CHECK_WORK / D² leading
#: rows (and at most as many as ``python -m bench`` checks): 5,960 at D = 4096, which still
#: hold about 5,400 of 32,000 classes, more than D, so that the check takes the features
#: route as the timed run does.
CHECK_WORK = 1e11
#: Rows of the GEMM whose rate is the shape's own.
SGEMM_ROWS = 16384
#: Bytes per C² that ``torch_collapse``'s finish holds at once: the C×C float32
#: distances and their square, int64 index pairs of the C²/2 class pairs and float32
#: temporaries per pair (17.3 measured between C = 3000 and C = 6000).
TORCH_PAIR_BYTES = 18
#: The torch route runs only when its finish fits in this share of the available memory.
TORCH_MEMORY_SHARE = 0.8
#: ncfast warns about classes without rows (the vocabulary, and scaled runs): the table
#: counts the classes with rows instead.
EMPTY_CLASSES_WARNING = r"\d+ of \d+ classes have no rows"


def unavoidable_flops(num_rows, num_features, num_means, num_classes, collapsed):
    """GEMM flops of pass 2 that no implementation of ncfast's route can skip.

    Parameters
    ----------
    num_rows, num_features : int
        N and D.
    num_means : int
        C', the classes with rows.
    num_classes : int
        C, also the rows of the classifier ``W``.
    collapsed : bool
        Every row inside its NCC and classifier radii (else every row beyond them).

    Returns
    -------
    float
        See the module docstring; 0 when ``num_classes <= SKINNY_CLASSES``.
    """
    if num_classes <= SKINNY_CLASSES:
        return 0.0
    every_row = 2.0 * num_rows * num_features * (num_means + num_classes)
    if route_for(num_means, num_features) == "classes":
        projection = 2.0 * num_rows * num_features * num_means
        return projection if collapsed else every_row + 2.0 * num_rows * num_means ** 2
    coordinates = 2.0 * num_rows * num_features ** 2
    return coordinates if collapsed else coordinates + every_row


def float64_scatter_flops(num_rows, num_features, num_means, num_classes, collapsed):
    """Flops of the float64 scatter that can stand in for the float32 NC1 coordinates of
    ``unavoidable_flops`` (same parameters; module docstring): on the "features" route
    ``N·D²`` (for ``2·N·D²``); on the "classes" route far from collapse ``N·C'²`` (for
    the ``2·N·C'²`` of ``a = Vᵀ z``), collapsed 0; 0 when ``num_classes <= SKINNY_CLASSES``."""
    if num_classes <= SKINNY_CLASSES:
        return 0.0
    if route_for(num_means, num_features) == "features":
        return float(num_rows) * num_features ** 2
    return 0.0 if collapsed else float(num_rows) * num_means ** 2


def shape_text(shape):
    """``(100000, 2048, 1000)`` → ``"1e5x2048x1000"``, as ``--shapes`` takes it."""
    num_rows, num_features, num_classes = shape
    digits = str(num_rows).rstrip("0")
    zeros = len(str(num_rows)) - len(digits)
    return (f"{digits}e{zeros}" if zeros else digits) + f"x{num_features}x{num_classes}"


def own_gemm_columns(num_features, num_means, num_classes, collapsed):
    """Columns k of the shape's own ``SGEMM_ROWS × D × k`` rate GEMM (module docstring)."""
    if route_for(num_means, num_features) == "features":
        return num_features
    return num_means if collapsed else num_means + num_classes


def floor_limit(num_classes, spread):
    """Issue 18's largest ncfast/floor: ``SKINNY_LIMIT`` at C ≤ 32, else by spread."""
    return SKINNY_LIMIT if num_classes <= SKINNY_CLASSES else FLOOR_LIMITS[spread]


def verdict(ncfast_seconds, floor_seconds, limit):
    """Whether ncfast meets issue 18's two targets.

    The torch target ``torch/ncfast ≥ TORCH_SHARE · torch/floor`` divides out
    the torch time: the share of the floor's lead over torch that ncfast
    reaches is ``(torch/ncfast) / (torch/floor) = floor/ncfast``, so it holds
    (for any torch time) when ncfast is within ``1/TORCH_SHARE`` = 1.25× its
    floor.

    Parameters
    ----------
    ncfast_seconds, floor_seconds : float
    limit : float
        The largest ncfast/floor allowed (``floor_limit``).

    Returns
    -------
    meets_floor : bool
        ``ncfast / floor ≤ limit``.
    meets_torch : bool
        ``floor / ncfast ≥ TORCH_SHARE``.
    """
    return (ncfast_seconds / floor_seconds <= limit,
            floor_seconds / ncfast_seconds >= TORCH_SHARE)


@dataclass
class Row:
    """One shape at one spread: its measurements, floor and verdict; seconds, bytes, flop/s.

    ``shape`` names the shape as ``--shapes`` takes it; ``rows`` is N of this
    run (divided by ``--scale``). Times are None where a route did not run.
    """

    shape: str
    name: str
    rows: int
    features: int
    classes: int
    spread: str
    classes_with_rows: int
    route: str
    read_bytes: int
    gemm_flops: float
    pair_flops: float = 0.0
    scatter_flops: float = 0.0
    own_sgemm: float = None
    own_sgemm_shape: str = None
    ncfast_seconds: float = None
    torch_seconds: float = None
    torch_rows: int = None
    torch_skipped: str = None
    check_failed: str = None
    arithmetic_seconds: float = None
    floor_read_seconds: float = None
    floor_gemm_seconds: float = None
    floor_pair_seconds: float = None
    floor_seconds: float = None
    floor_sgemm: float = None
    limit: float = None
    meets_floor: bool = None
    meets_torch: bool = None

    @property
    def arithmetic_bound_seconds(self):
        """Where ``arithmetic_seconds`` was measured (C <= 32): the least time ncfast's
        kernels allow, pass 1 at one read and pass 2 at the longer of one read and its
        arithmetic; None elsewhere."""
        if self.arithmetic_seconds is None:
            return None
        return least_collapse_seconds(self.floor_read_seconds, self.arithmetic_seconds)

    @property
    def torch_scaled(self):
        return self.torch_seconds is not None and self.torch_rows < self.rows

    def ratios(self):
        """``{"ncfast/floor": …, "torch/floor": …, "torch/ncfast": …}``, None where not run."""
        fast, torch = self.ncfast_seconds, self.torch_seconds
        return {"ncfast/floor": None if fast is None else fast / self.floor_seconds,
                "torch/floor": None if torch is None else torch / self.floor_seconds,
                "torch/ncfast": None if None in (fast, torch) else torch / fast}


def pass2_arithmetic_seconds(features, labels, num_classes, weights, bias, repeats):
    """Seconds of pass 2's arithmetic alone where it runs the narrow kernel
    (``bench.profile.narrow_in_cache_seconds``, on the pass-2 plan of these rows); else None."""
    class_sums = ClassSums(num_classes, features.shape[1])
    class_sums.update(features, labels)
    stats = ResidualStats(Geometry.from_class_sums(class_sums.counts, class_sums.sums),
                          weights=weights, bias=bias)
    if stats.route != "classes" or not runs_narrow_kernel(stats.plan.classes_route()):
        return None
    return narrow_in_cache_seconds(features, labels, stats, repeats)


class ShapesRun:
    """The measurements of one run; the floors use the best rates it saw.

    The machine may be shared, so the read bandwidth and the square sgemm
    rate are measured again before every row, and each row's own GEMM rate
    with it; ``finish`` gives every row its floor at the run's best read
    and square rates.
    """

    def __init__(self, repeats, torch_rows, progress):
        self.repeats = repeats
        self.torch_rows = torch_rows
        self.progress = progress
        self.bandwidth = 0.0
        self.square_sgemm = 0.0
        self.square_dgemm = 0.0

    def step(self, task, row, what):
        self.progress.update(task, description=f"{row.shape} {row.spread}: {what}")

    def measure(self, shape, num_rows, spread, task):
        """Check and time ncfast and the torch route on one shape at one spread.

        Parameters
        ----------
        shape : tuple of int
            N × D × C as in ``SHAPES``.
        num_rows : int
            N of this run (``--scale``).
        spread : str
            A key of ``SPREADS``.
        task : rich.progress.TaskID
        """
        _, num_features, num_classes = shape
        collapsed = spread == "collapsed"
        self.progress.update(task, description=f"{shape_text(shape)} {spread}: data")
        features, labels, weights, bias = collapsed_features(
            num_rows, num_features, num_classes, spread=SPREADS[spread])
        num_means = int(np.count_nonzero(np.bincount(labels, minlength=num_classes)))
        row = Row(shape_text(shape), SHAPES.get(shape, ""), num_rows, num_features, num_classes,
                  spread, num_means, route_for(num_means, num_features), features.nbytes,
                  unavoidable_flops(num_rows, num_features, num_means, num_classes, collapsed),
                  pair_flops=float(2 * num_means) ** 2 * num_features,
                  scatter_flops=float64_scatter_flops(num_rows, num_features, num_means,
                                                              num_classes, collapsed))
        self.progress.advance(task)

        self.step(task, row, "machine rates")
        self.bandwidth = max(self.bandwidth, machine_read_bandwidth())
        self.square_sgemm = max(self.square_sgemm,
                                gemm_rate(SQUARE_SIDE, SQUARE_SIDE, SQUARE_SIDE))
        self.square_dgemm = max(self.square_dgemm, gemm_rate(
            SQUARE_SIDE // 2, SQUARE_SIDE // 2, SQUARE_SIDE // 2, dtype=np.float64))
        if row.gemm_flops:
            columns = own_gemm_columns(num_features, num_means, num_classes, collapsed)
            row.own_sgemm = gemm_rate(SGEMM_ROWS, num_features, columns)
            row.own_sgemm_shape = f"{SGEMM_ROWS}x{num_features}x{columns}"
        self.progress.advance(task)

        checked = slice(0, min(num_rows, SUITE_CHECK_ROWS, int(CHECK_WORK / num_features ** 2)))
        row.torch_skipped = self.torch_obstacle(labels, checked, num_classes)
        self.step(task, row, "check against the textbook route")
        arguments = (features[checked], labels[checked], num_classes, weights, bias)
        reference = ROUTES["textbook"](*arguments)
        try:
            check("ncfast", ROUTES["ncfast"](*arguments), reference)
        except AssertionError as error:
            row.check_failed = str(error)
        if row.torch_skipped is None:
            try:
                check("torch-gemm", ROUTES["torch-gemm"](*arguments), reference)
            except AssertionError as error:
                row.torch_skipped = f"its check failed: {error}"
        self.progress.advance(task)

        if row.check_failed is None:
            self.step(task, row, f"ncfast, best of {self.repeats}")
            row.ncfast_seconds = best_seconds(
                lambda: ROUTES["ncfast"](features, labels, num_classes, weights, bias),
                self.repeats)
            if num_classes <= SKINNY_CLASSES:
                self.step(task, row, "pass 2's arithmetic, rows in cache")
                row.arithmetic_seconds = pass2_arithmetic_seconds(
                    features, labels, num_classes, weights, bias, self.repeats)
        self.progress.advance(task)

        if row.torch_skipped is None:
            row.torch_rows = min(num_rows, self.torch_rows)
            self.step(task, row, f"torch route on {row.torch_rows:,} rows")
            timed = slice(0, row.torch_rows)
            seconds = best_seconds(lambda: ROUTES["torch-gemm"](
                features[timed], labels[timed], num_classes, weights, bias), 1)
            row.torch_seconds = seconds * num_rows / row.torch_rows
        self.progress.advance(task)
        return row

    def torch_obstacle(self, labels, checked, num_classes):
        """Why the torch route cannot run on this input, or None.

        Parameters
        ----------
        labels : int array of shape (N,)
        checked : slice
            The leading rows of the check.
        num_classes : int
        """
        empty_class = empty_class_obstacle(labels, min(checked.stop, self.torch_rows),
                                           num_classes)
        if empty_class is not None:
            return empty_class
        finish_bytes = TORCH_PAIR_BYTES * num_classes ** 2
        available = psutil.virtual_memory().available
        if finish_bytes > TORCH_MEMORY_SHARE * available:
            return (f"its C×C finish needs about {finish_bytes / 2**30:.1f} GiB, "
                    f"{available / 2**30:.1f} GiB available")
        return None

    def finish(self, row):
        """Give ``row`` its floor at the run's best rates, and its verdict."""
        sgemm, shape = max((self.square_sgemm, f"{SQUARE_SIDE}^3"),
                           (row.own_sgemm or 0.0, row.own_sgemm_shape))
        floor = Floor(self.bandwidth, sgemm, shape)
        flops = row.gemm_flops
        if row.scatter_flops:  # NC1 as a float64 scatter, in float32 flops, where it is faster
            flops += min(0.0, row.scatter_flops * sgemm / self.square_dgemm
                         - 2.0 * row.scatter_flops)
        row.floor_read_seconds, row.floor_gemm_seconds = floor.terms(row.read_bytes, flops)
        row.floor_pair_seconds = row.pair_flops / self.square_dgemm
        row.floor_seconds = floor.bound(row.read_bytes, flops) + row.floor_pair_seconds
        row.floor_sgemm = sgemm
        row.limit = floor_limit(row.classes, row.spread)
        if row.ncfast_seconds is not None:
            row.meets_floor, row.meets_torch = verdict(row.ncfast_seconds, row.floor_seconds,
                                                       row.limit)


#: Steps of ``ShapesRun.measure``, for the progress bar.
STEPS_PER_ROW = 5


def _verdict_text(row):
    if row.check_failed:
        return "check failed"
    misses = [name for name, met in (("floor", row.meets_floor), ("lead", row.meets_torch))
              if not met]
    return "pass" if not misses else "miss: " + ", ".join(misses)


def _seconds_text(seconds, scaled=False):
    """Seconds to 3 digits, ``~`` when scaled up from leading rows, ``-`` when not run."""
    if seconds is None:
        return "-"
    return ("~" if scaled else "") + f"{seconds:.3g}"


def _ratio_text(value):
    return "-" if value is None else f"{value:.3g}x"


def render(rows, scale, console):
    """Print the table; ``~`` marks a torch time scaled up from leading rows."""
    scaled = f" — SCALED RUN: every N divided by {scale:g}" if scale != 1 else ""
    table = Table(title=f"ncfast, its floor and the torch route on shapes from real models "
                        f"(seconds, both passes){scaled}")
    for header in ("shape", "N", "spread", "C'", "route", "ncfast s", "floor s", "read s",
                   "GEMM flops", "GEMM s", "pairs s", "torch s", "ncfast/floor", "torch/floor",
                   "torch/ncfast", "arith. bound", "verdict"):
        table.add_column(header, justify="left" if header in ("shape", "verdict") else "right")
    for row in rows:
        table.add_row(f"{row.shape}\n{row.name}".rstrip(), f"{row.rows:,}", row.spread,
                      f"{row.classes_with_rows:,}", row.route, _seconds_text(row.ncfast_seconds),
                      f"{row.floor_seconds:.3g}", f"{row.floor_read_seconds:.3g}",
                      f"{row.gemm_flops:.3g}", f"{row.floor_gemm_seconds:.3g}",
                      f"{row.floor_pair_seconds:.3g}",
                      _seconds_text(row.torch_seconds, row.torch_scaled),
                      *(_ratio_text(value) for value in row.ratios().values()),
                      _ratio_text(None if row.arithmetic_seconds is None
                                  else row.arithmetic_bound_seconds / row.floor_seconds),
                      _verdict_text(row))
    console.print(table)


def plot(rows, scale):
    """Bars of ncfast's and the torch route's time over the floor, per shape and spread.

    The floor is 1 and every bar starts there (a log axis with an automatic bottom made
    a bar's length, not its ratio, the thing seen: 1.36× looked like 5×), so a bar's
    length is its ratio; the floor's seconds are under each shape. Lines mark issue 18's
    targets for ncfast: each row's ``limit`` and ``1 / TORCH_SHARE`` (the lead over the
    torch route); and, at C <= 32, the least time ncfast's kernels allow
    (``Row.arithmetic_bound_seconds``). A torch time scaled up to N from its leading
    rows is hatched, and the legend says so; the legend names only what is drawn.

    Parameters
    ----------
    rows : list of Row
        Finished rows (``ShapesRun.finish``).
    scale : float
        ``--scale``, named in the title when not 1.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = Figure(figsize=(max(7.5, 1.3 * len(rows) + 3.5), 4.8), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(rows))
    width = 0.35
    scaled_rows = sorted({row.torch_rows for row in rows if row.torch_scaled})
    for offset, key, label, chosen, hatch in (
            (-width / 2, "ncfast/floor", "ncfast", lambda row: row.ncfast_seconds is not None,
             None),
            (width / 2, "torch/floor", "torch route",
             lambda row: row.torch_seconds is not None and not row.torch_scaled, None),
            (width / 2, "torch/floor", "torch route, time scaled up to N from its first "
             + " or ".join(f"{count:,}" for count in scaled_rows) + " rows",
             lambda row: row.torch_scaled, "//")):
        drawn = [index for index, row in enumerate(rows) if chosen(row)]
        if not drawn:
            continue
        ratios = [rows[index].ratios()[key] for index in drawn]
        bars = axes.bar(positions[drawn] + offset, [ratio - 1.0 for ratio in ratios], width,
                        bottom=1.0, color="C0" if key == "ncfast/floor" else "C2", hatch=hatch,
                        label=label)
        axes.bar_label(bars, [f"{ratio:.3g}×" for ratio in ratios], fontsize=7, padding=2,
                       bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    axes.axhline(1.0, color="black", linewidth=1.2, label="floor (1; its seconds under each "
                                                           "shape)")
    axes.hlines([row.limit for row in rows], positions - 1.2 * width, positions + 0.2 * width,
                colors="C3", linestyles="--",
                label="target: ncfast/floor at most the row's limit")
    bounded = [index for index, row in enumerate(rows) if row.arithmetic_seconds is not None]
    if bounded:
        axes.hlines([rows[index].arithmetic_bound_seconds / rows[index].floor_seconds
                     for index in bounded],
                    positions[bounded] - 1.2 * width, positions[bounded] + 0.2 * width,
                    colors="C4", linewidth=2.0,
                    label="least ncfast's kernels allow (pass 2's arithmetic, C ≤ "
                          f"{SKINNY_CLASSES})")
    axes.axhline(1 / TORCH_SHARE, color="C1", linestyle=":",
                 label=f"target: ncfast/floor ≤ {1 / TORCH_SHARE:g} (lead over torch)")
    axes.set_xticks(positions, [
        f"{row.shape}\n{row.spread}\nfloor {row.floor_seconds:.3g} s"
        + ("" if row.torch_seconds is not None else "\n(no torch)") for row in rows],
        fontsize=8)
    axes.set_xlabel("shape (N×D×C), spread and the floor's seconds (both passes)")
    axes.set_yscale("log")
    # Plain numbers ("1.5", not "1.5×10⁰"): ratios near 1 get labelled minor ticks.
    axes.yaxis.set_major_formatter(LogFormatter())
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axes.set_ylabel("time / floor (log scale)")
    axes.set_title("ncfast and the torch route over the floor" + (
        f" (SCALED RUN: N / {scale:g})" if scale != 1 else ""))
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench_shapes",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=parse_sizes,
                        default=list(SHAPES),
                        help="comma-separated NxDxC (default: the four of issue 18), e.g. "
                             "1e5x2048x1000")
    parser.add_argument("--spreads", default=",".join(SPREADS),
                        help=f"comma-separated subset of {','.join(SPREADS)} (default: both)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="ncfast runs per row (best)")
    parser.add_argument("--torch-rows", type=positive_int, default=1_000_000,
                        help="leading rows the torch route runs on, its time scaled to N "
                             "(default 1,000,000: every row of the grid's shapes)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="divide every N by this, for a trial run (default 1)")
    args = parser.parse_args(argv)
    spreads = args.spreads.split(",")
    unknown = sorted(set(spreads) - set(SPREADS))
    if unknown:
        parser.error(f"unknown spreads {unknown}; choose from {','.join(SPREADS)}")
    if not 1 <= args.scale < float("inf"):
        parser.error(f"--scale must be a finite number of at least 1; found {args.scale:g}")
    emptied = [shape_text(shape) for shape in args.shapes
               if round(shape[0] / args.scale) < MIN_SCALED_ROWS]
    if emptied:
        parser.error(f"--scale {args.scale:g} leaves fewer than {MIN_SCALED_ROWS} rows of "
                     f"{', '.join(emptied)}; divide by less")

    console = Console(width=200)
    load_before = os.getloadavg()
    console.print(f"load average {load_before}" + (
        f"; SCALED RUN: every N divided by {args.scale:g}" if args.scale != 1 else ""))
    rows = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        run = ShapesRun(args.repeats, args.torch_rows, progress)
        task = progress.add_task("", total=STEPS_PER_ROW * len(args.shapes) * len(spreads))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EMPTY_CLASSES_WARNING)
            for shape in args.shapes:
                for spread in spreads:
                    row = run.measure(shape, round(shape[0] / args.scale), spread, task)
                    rows.append(row)
                    progress.console.print(
                        f"{row.shape} {spread}: ncfast {_seconds_text(row.ncfast_seconds)} s, "
                        f"torch {_seconds_text(row.torch_seconds, row.torch_scaled)} s "
                        f"(load {os.getloadavg()[0]:.1f})")
    for row in rows:
        run.finish(row)
    console.print(f"floor rates (best of the run): read {run.bandwidth / 1e9:.1f} GB/s, "
                  f"square sgemm {run.square_sgemm / 1e9:.0f} GFLOP/s, square dgemm "
                  f"{run.square_dgemm / 1e9:.0f} GFLOP/s; each row's GEMM at the "
                  "larger of that and its own shape's rate (JSON: own_sgemm)")
    render(rows, args.scale, console)
    console.print("read s: one pass over the rows; GEMM s: the flops at the row's sgemm rate "
                  "(features route: NC1's part as a float64 scatter at the dgemm rate where "
                  "that is faster); "
                  "pairs s: the float64 Gram of [M~; W] at the square dgemm rate; "
                  "floor = read + max(read, GEMM) + pairs. ~: torch time of the leading "
                  "torch_rows rows scaled to N.\narith. bound (C ≤ "
                  f"{SKINNY_CLASSES}): read + max(read, pass 2's arithmetic alone: the narrow "
                  "kernel over rows in cache, every thread), over the floor: the least time "
                  "ncfast's kernels allow on this machine.\nverdict: floor, ncfast/floor ≤ "
                  f"{FLOOR_LIMITS['far']:g} far, ≤ {FLOOR_LIMITS['collapsed']:g} collapsed, ≤ "
                  f"{SKINNY_LIMIT:g} at C ≤ {SKINNY_CLASSES}; lead, torch/ncfast ≥ "
                  f"{TORCH_SHARE:g}·torch/floor (that is, ncfast/floor ≤ {1 / TORCH_SHARE:g})")
    if args.scale != 1:
        console.print(f"SCALED RUN (N / {args.scale:g}): the costs of an analysis that do not "
                      "grow with N (finalize, the pair sweep over classes) weigh more the fewer "
                      "the rows; these ratios say nothing about the full shapes")
    errors = Console(stderr=True, width=200)
    for row in rows:
        if row.check_failed:
            errors.print(f"ncfast's check failed on {row.shape} {row.spread}, not timed: "
                         f"{row.check_failed}", style="red", markup=False)
        if row.torch_skipped:
            console.print(f"torch route not run on {row.shape} {row.spread}: "
                          f"{row.torch_skipped}", markup=False)

    path = result_path("shapes")
    write_json_atomically(str(path), {
        "scale": args.scale,
        "machine": machine_facts(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "read_bandwidth_bytes_per_s": run.bandwidth,
        "square_sgemm_flops": run.square_sgemm,
        "square_dgemm_flops": run.square_dgemm,
        "rows": [dataclasses.asdict(row) | row.ratios()
                 | {"torch_scaled": row.torch_scaled,
                    "arithmetic_bound_seconds": row.arithmetic_bound_seconds}
                 for row in rows],
        "command": ["python", "-m", "bench.bench_shapes",
                    *(sys.argv[1:] if argv is None else argv)],
    })
    figure_path = path.with_suffix(".png")
    save_figure(plot(rows, args.scale), str(figure_path))
    console.print(f"wrote {path} and {figure_path.name}")
    return path


def failed_checks(path):
    """Rows of the results file at ``path`` whose correctness check failed."""
    return [row for row in json.loads(Path(path).read_text())["rows"] if row["check_failed"]]


if __name__ == "__main__":
    sys.exit(1 if failed_checks(main()) else 0)
