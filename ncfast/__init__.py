"""ncfast: neural-collapse metrics in two streaming passes with compiled kernels.

Public API: ``collapse`` (the one-call analysis) and ``CollapseReport``; for
streaming and merging partial states yourself, the pass-1 state
``ClassSums``, ``finalize_pass1`` (its ``Geometry``), the pass-2 states
``ResidualStats`` (one set of rows) and ``ResidualPass`` (with label noise),
whose ``report`` gives the ``CollapseReport``.
"""
from ncfast.accumulators import ClassSums, ResidualStats
from ncfast.api import collapse
from ncfast.engine import ResidualPass, finalize_pass1
from ncfast.geometry import Geometry
from ncfast.report import METRICS, CollapseReport

__version__ = "0.1.0"

__all__ = ["collapse", "CollapseReport", "ClassSums", "ResidualStats", "ResidualPass",
           "finalize_pass1", "Geometry", "METRICS", "__version__"]
