"""Mean ± standard deviation over seeds, and the two-standard-error rule for verdicts.

Every statement a reproduction checks comes down to comparisons of seeded
settings, each decided by one rule stated in its report (:data:`RULE`):

- two settings: the difference of their means is beyond two standard errors
  of that difference (:func:`compare`);
- a setting against a tolerance: its mean is beyond two standard errors on
  the good side of it (:func:`below`);
- a relation between two quantities over runs: the least-squares slope is
  beyond two of its standard errors from zero (:func:`fit_line`).

Each gives ``HELD`` (beyond two standard errors the claimed way),
``CONTRADICTED`` (beyond two standard errors the other way) or ``UNDECIDED``
(within two standard errors: this grid cannot tell), never a verdict from
one seed, and :func:`combine` turns the verdicts of a statement's cells into
the statement's.
"""
import math
from dataclasses import dataclass

import numpy as np

HELD, CONTRADICTED, UNDECIDED = "held", "contradicted", "undecided"

#: Multiple of the standard error a difference must exceed to count.
STANDARD_ERRORS = 2.0


def resolution_in_stds(seeds):
    """The least difference of two settings' means, in standard deviations of their seeds
    (equal on both sides), that :data:`RULE` counts with ``seeds`` seeds a side:
    ``STANDARD_ERRORS * sqrt(2 / seeds)`` (1.6 at 3 seeds, 1.3 at 5)."""
    return STANDARD_ERRORS * math.sqrt(2.0 / seeds)

RULE = (
    "Each setting is run with K seeds and reported as mean ± sample standard deviation "
    "(s) over them. Two settings A and B are compared by the difference of their means "
    "against its standard error SE = sqrt(s_A²/K_A + s_B²/K_B): the comparison **held** "
    "when the difference exceeds 2 SE in the claimed direction, was **contradicted** when "
    "it exceeds 2 SE the other way, and is **undecided** otherwise (so is any comparison "
    "with fewer than 2 seeds a side, or with a seed whose value is not finite). A value "
    "against a tolerance uses SE = s/sqrt(K) the same way; a relation over runs uses the "
    "least-squares slope and its standard error. "
    "A statement made of several comparisons held when every one held, was contradicted "
    "when any one was, and is undecided otherwise.")


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of one quantity over seeds.

    Attributes
    ----------
    mean : float
    std : float
        Sample standard deviation (``ddof=1``); NaN for fewer than 2 values.
    count : int
        Finite values the mean and std are of.
    left_out : int
        Values left out: None, NaN or ±inf (a seed without a finite value). A
        comparison with a side that left any out is undecided (:func:`compare`):
        the rule's mean is over all K seeds, and it is not finite when one of
        them is not.
    """

    mean: float
    std: float
    count: int
    left_out: int = 0

    @classmethod
    def of(cls, values):
        """The spread of the finite values of a sequence (None, NaN and ±inf are left out and
        counted in ``left_out``)."""
        values = np.array([math.nan if value is None else value for value in values],
                          dtype=np.float64)
        finite = values[np.isfinite(values)]
        left_out = int(values.size - finite.size)
        if finite.size == 0:
            return cls(math.nan, math.nan, 0, left_out)
        std = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        return cls(float(finite.mean()), std, int(finite.size), left_out)

    @property
    def standard_error(self):
        """``std / sqrt(count)`` (NaN for fewer than 2 values)."""
        return self.std / math.sqrt(self.count) if self.count > 1 else math.nan

    def __str__(self):
        if self.count == 0:
            return "-"
        text = f"{self.mean:.4g} ± {self.std:.2g}" if self.count > 1 else f"{self.mean:.4g}"
        if self.left_out:
            text += f" ({self.count} of {self.count + self.left_out} seeds finite)"
        return text


@dataclass(frozen=True)
class Comparison:
    """One decided comparison.

    Attributes
    ----------
    difference : float
        Claimed side minus the other (``a - b``, or ``mean - tolerance``).
    standard_error : float
    verdict : {"held", "contradicted", "undecided"}
    left_out : int
        Seeds' values left out of the sides' spreads (None, NaN, ±inf); when
        any were, the verdict is undecided.
    """

    difference: float
    standard_error: float
    verdict: str
    left_out: int = 0

    def __str__(self):
        # The same significant digits on both sides of the comparison: rounding them alike
        # never shows a difference below its 2 SE beside "held" (nor beyond it beside
        # "undecided").
        missing = (f"; {self.left_out} seed value{'s' if self.left_out > 1 else ''} not "
                   "finite" if self.left_out else "")
        return f"{self.difference:+.3g} (2 SE {STANDARD_ERRORS * self.standard_error:.3g}" \
               f"{missing}): {self.verdict}"


def _decide(difference, standard_error, claimed, left_out=0):
    """The verdict on ``difference`` being ``claimed`` ("lower": < 0, "higher": > 0)."""
    if claimed not in ("lower", "higher"):
        raise ValueError(f"claimed must be 'lower' or 'higher'; found {claimed!r}")
    if left_out or not (math.isfinite(difference) and math.isfinite(standard_error)) \
            or abs(difference) <= STANDARD_ERRORS * standard_error:
        return Comparison(difference, standard_error, UNDECIDED, left_out)
    agrees = difference < 0 if claimed == "lower" else difference > 0
    return Comparison(difference, standard_error, HELD if agrees else CONTRADICTED)


def compare(a, b, *, claimed):
    """Decide the claim that ``a`` is lower (or higher) than ``b``.

    Parameters
    ----------
    a, b : Spread
    claimed : {"lower", "higher"}

    Returns
    -------
    Comparison
        Of ``a.mean - b.mean`` against ``sqrt(se_a^2 + se_b^2)``; undecided when
        either side left out a seed's value (``Spread.left_out``).
    """
    return _decide(a.mean - b.mean, math.hypot(a.standard_error, b.standard_error), claimed,
                   a.left_out + b.left_out)


def below(spread, tolerance):
    """Decide the claim that ``spread``'s quantity is below ``tolerance``.

    Returns
    -------
    Comparison
        Of ``mean - tolerance`` against the standard error of the mean; undecided
        when a seed's value was left out (``Spread.left_out``).
    """
    return _decide(spread.mean - tolerance, spread.standard_error, "lower", spread.left_out)


@dataclass(frozen=True)
class Line:
    """Least-squares line ``y = intercept + slope * x`` and the verdict on its slope.

    Attributes
    ----------
    slope, intercept : float
    slope_error : float
        Standard error of the slope (``n - 2`` degrees of freedom).
    count : int
        Points fitted.
    comparison : Comparison
        Of the slope against 0, claimed positive.
    """

    slope: float
    intercept: float
    slope_error: float
    count: int
    comparison: Comparison


def fit_line(x, y):
    """Fit ``y = a + b x`` by least squares and decide ``b > 0``.

    Parameters
    ----------
    x, y : sequence of float, length n
        Non-finite pairs are left out; fewer than 3 points, or no spread in
        ``x``, leave the slope undecided.

    Returns
    -------
    Line
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    count = int(x.size)
    spread_x = float(np.sum((x - x.mean()) ** 2)) if count else 0.0
    if count < 3 or spread_x == 0.0:
        return Line(math.nan, math.nan, math.nan, count,
                    Comparison(math.nan, math.nan, UNDECIDED))
    slope = float(np.sum((x - x.mean()) * (y - y.mean())) / spread_x)
    intercept = float(y.mean() - slope * x.mean())
    residual = y - intercept - slope * x
    slope_error = math.sqrt(float(np.sum(residual ** 2)) / (count - 2) / spread_x)
    return Line(slope, intercept, slope_error, count, _decide(slope, slope_error, "higher"))


def combine(verdicts):
    """A statement's verdict from its comparisons' (:data:`RULE`).

    Parameters
    ----------
    verdicts : iterable of str

    Returns
    -------
    str
        ``HELD`` when there is at least one and all held; ``CONTRADICTED``
        when any was; ``UNDECIDED`` otherwise.
    """
    verdicts = list(verdicts)
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return HELD if verdicts and all(verdict == HELD for verdict in verdicts) else UNDECIDED


def tally(verdicts):
    """``"k held, j contradicted, u undecided of n"`` for a list of verdicts."""
    verdicts = list(verdicts)
    return (f"{verdicts.count(HELD)} held, {verdicts.count(CONTRADICTED)} contradicted, "
            f"{verdicts.count(UNDECIDED)} undecided of {len(verdicts)}")
