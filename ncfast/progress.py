"""Progress of one analysis on stderr: the rows of each pass and the class-pair tiles.

``ncfast.collapse(..., progress=True)`` tells each stage as it runs: the rows of
pass 1, the tiles of the class-pair sweep (the longest stage at many classes:
2016 tiles, 147 s of a 203 s analysis on two cores at 32,000 classes of 4096
features) and the rows of pass 2. On a terminal or in a notebook, a rich bar
per stage (gone when the analysis ends); elsewhere (a log file, a pipe), and
while a rich display of the caller's runs, one plain line per finished stage,
as ``ncfast analyze`` and ``ncfast train`` print theirs. A ``StageProgress``
given its caller's running display (``bars=``) adds the stages to it instead:
``ncfast analyze`` shows them under its bars of checkpoints and bytes.
"""
import contextlib
import sys
import threading
import time

import numpy as np
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class StageProgress:
    """Tells an analysis's stages on stderr, or nothing when disabled.

    Used as a context manager around the analysis (re-entrant: an inner ``with`` of the
    same object neither restarts nor stops the bars); ``stage`` opens one stage.

    Parameters
    ----------
    enabled : bool
    bars : rich.progress.Progress, optional
        A display of the caller's, running: each stage is a bar of it, removed when the
        stage ends (``ncfast analyze`` shows the stages under its own bars this way;
        ``collapse(..., progress=StageProgress(True, bars=my_progress))`` does the same
        in a script's display).
    """

    def __init__(self, enabled, *, bars=None):
        self.enabled = enabled
        self.borrowed = bars is not None
        self.bars = bars
        self._depth = 0  # of nested ``with`` blocks: the outermost starts and stops the bars
        if self.borrowed:
            return
        # Under a display of the caller's own (a rich Progress, which redirects stdout and
        # stderr through proxies while it runs) a second one would draw over it: lines then,
        # printed through the proxy, which shows them above the caller's bars.
        inside_display = any(isinstance(stream, FileProxy) for stream in (sys.stdout, sys.stderr))
        console = Console(stderr=True) if enabled and not inside_display else None
        if console is not None and (console.is_terminal or console.is_jupyter):
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=True)

    def __enter__(self):
        if self.bars is not None and not self.borrowed:
            if self._depth == 0:
                self.bars.start()
            self._depth += 1
        return self

    def __exit__(self, *exc_info):
        if self.bars is not None and not self.borrowed:
            self._depth -= 1
            if self._depth == 0:
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
            try:
                yield lambda steps=1: self.bars.advance(task, steps)  # rich's bars hold a lock
            finally:
                if self.borrowed:  # the caller's display outlives the analysis
                    self.bars.remove_task(task)
            if total is None and not self.borrowed:  # a stage of unknown size ends at its count
                completed = next(shown.completed for shown in self.bars.tasks
                                 if shown.id == task)
                self.bars.update(task, total=completed)
            return
        done, lock, start = [0], threading.Lock(), time.perf_counter()

        def advance(steps=1):
            with lock:
                done[0] += steps

        yield advance
        print(f"ncfast: {description}: {done[0]:,} {unit} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)


def _ignore(steps=1):
    """``advance`` of a disabled progress."""


#: The progress of an analysis that tells nothing.
NO_PROGRESS = StageProgress(False)


def stage_progress(progress):
    """The ``StageProgress`` of a ``progress`` option: a bool (numpy's included) or a
    ``StageProgress`` itself.

    Raises
    ------
    TypeError
        For anything else.
    """
    if isinstance(progress, StageProgress):
        return progress
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True, False or an ncfast.StageProgress; "
                        f"found {progress!r}")
    return StageProgress(bool(progress))
