"""Progress of one analysis on stderr: the rows of each pass and the class-pair tiles.

``ncfast.collapse(..., progress=True)`` tells each stage as it runs: the rows of
pass 1, the tiles of the class-pair sweep (the longest stage at many classes:
2016 tiles, about two minutes on two cores, at 32,000 classes of 4096
features) and the rows of pass 2. On a terminal or in a notebook, a rich bar
per stage (gone when the analysis ends); elsewhere (a log file, a pipe), one
plain line per finished stage, as ``ncfast analyze`` and ``ncfast train`` do.
"""
import contextlib
import threading
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class StageProgress:
    """Tells an analysis's stages on stderr, or nothing when disabled.

    Used as a context manager around the analysis; ``stage`` opens one stage.

    Parameters
    ----------
    enabled : bool
    """

    def __init__(self, enabled):
        self.enabled = enabled
        self.console = Console(stderr=True) if enabled else None
        self.bars = None
        if enabled and (self.console.is_terminal or self.console.is_jupyter):
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)

    def __enter__(self):
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc_info):
        if self.bars is not None:
            self.bars.stop()

    @contextlib.contextmanager
    def stage(self, description="", total=None, unit="rows"):
        """A stage of ``total`` steps (None: not known) named ``description``, as a context
        manager.

        Yields
        ------
        callable
            ``advance(steps=1)``, safe to call from any thread: the sweep's tiles end
            on worker threads.
        """
        if not self.enabled:
            yield _ignore
            return
        if self.bars is not None:
            task = self.bars.add_task(description, total=total, unit=unit)
            yield lambda steps=1: self.bars.advance(task, steps)  # rich's bars hold a lock
            return
        done, lock, start = [0], threading.Lock(), time.perf_counter()

        def advance(steps=1):
            with lock:
                done[0] += steps

        yield advance
        self.console.print(f"ncfast: {description}: {done[0]:,} {unit} in "
                           f"{time.perf_counter() - start:.1f} s", markup=False,
                           highlight=False, soft_wrap=True)


def _ignore(steps=1):
    """``advance`` of a disabled progress."""


#: The progress of an analysis that tells nothing.
NO_PROGRESS = StageProgress(False)


def check_progress(progress):
    """Refuse a ``progress`` option that is not a bool."""
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False; found {progress!r}")
