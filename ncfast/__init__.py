"""ncfast: neural-collapse metrics in two streaming passes with compiled kernels.

Public API: ``collapse`` (the one-call analysis) and ``CollapseReport``; for
streaming and merging partial states yourself, the pass-1 state
``ClassSums``, ``finalize_pass1`` (its ``Geometry``), the pass-2 states
``ResidualStats`` (one set of rows) and ``ResidualPass`` (with label noise),
whose ``report`` gives the ``CollapseReport``; ``release_scratch`` drops the
chunk scratch that their ``update`` calls keep between chunks; ``StageProgress``
shows ``collapse``'s stages in a rich display of the caller's.

The names load on first use (PEP 562): ``import ncfast`` is instant, so the
command line answers ``--help`` and Ctrl-C at once, before numpy, Numba and
the kernels load.
"""
import importlib
import os

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {"collapse": "ncfast.api", "CollapseReport": "ncfast.report",
           "METRICS": "ncfast.report", "ClassSums": "ncfast.accumulators",
           "ResidualStats": "ncfast.accumulators", "ResidualPass": "ncfast.engine",
           "finalize_pass1": "ncfast.engine", "Geometry": "ncfast.geometry",
           "release_scratch": "ncfast.kernels.cpu", "StageProgress": "ncfast.progress"}

__all__ = ["collapse", "CollapseReport", "ClassSums", "ResidualStats", "ResidualPass",
           "finalize_pass1", "Geometry", "METRICS", "release_scratch", "StageProgress",
           "__version__"]


def thread_setting_problem(environ=os.environ):
    """What is wrong with ``NUMBA_NUM_THREADS`` for the kernels, or None.

    Numba refuses 0 or less with an error that does not name the variable, and warns
    and ignores what is not a whole number: ncfast says so before loading Numba.
    """
    setting = environ.get("NUMBA_NUM_THREADS")
    if setting is None:
        return None
    try:
        threads = int(setting)
    except ValueError:
        threads = 0
    if threads >= 1:
        return None
    return (f"NUMBA_NUM_THREADS={setting!r}: ncfast's kernels run on that many Numba threads, "
            "which must be a whole number of at least 1; unset it to use every core")


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ncfast' has no attribute {name!r}")
    problem = thread_setting_problem()
    if problem is not None:
        raise ValueError(problem)
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
