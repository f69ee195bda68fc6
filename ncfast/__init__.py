"""ncfast: neural-collapse metrics in two streaming passes with compiled kernels.

Public API: ``collapse`` (the one-call analysis), ``CollapseReport``, and the
streaming accumulators ``ClassSums`` (pass 1) and ``ResidualStats`` (pass 2)
with the ``Geometry`` that links them.
"""
from ncfast.accumulators import ClassSums, ResidualStats
from ncfast.api import collapse
from ncfast.geometry import Geometry
from ncfast.report import METRICS, CollapseReport

__version__ = "0.1.0"

__all__ = ["collapse", "CollapseReport", "ClassSums", "ResidualStats", "Geometry", "METRICS",
           "__version__"]
