"""The CPU backend: Numba kernels on the module's worker threads, numpy arrays.

The public host states (``ClassSums``, ``ResidualStats``) are the CPU's own
pass states: their ``update`` methods run the kernels, so the states the
engine adds chunks into are those states themselves.
"""
import numba
import numpy as np

from ncfast.geometry import symmetric_eigh
from ncfast.inputs import IterableSource, as_source, carries_clean_labels, num_features_of
from ncfast.kernels import cpu, pairs
from ncfast.sweep import PAIR_TILE


class CpuBackend:
    """Numba kernels and numpy arrays (see ``ncfast.backends``)."""

    name = "cpu"
    xp = np
    pair_tile = PAIR_TILE

    @staticmethod
    def map_tasks(function, num_tasks):
        """``function(task)`` for each task, on the pass worker threads, results in order."""
        return cpu.run_tasks(function, num_tasks, numba.get_num_threads())

    #: The plan's eigendecomposition (LAPACK, on one BLAS thread).
    symmetric_eigh = staticmethod(symmetric_eigh)

    @staticmethod
    def reduce_tile(dots, tile, rows, cols):
        """One sweep tile through ``ncfast.kernels.pairs.reduce_tile``."""
        sums = np.zeros(len(pairs.SLOTS))
        logits = tile.global_logits.shape[0] > 0
        row_side = pairs.TileSide.empty(rows, logits)
        col_side = pairs.TileSide.empty(cols, logits)
        pairs.reduce_tile(np.ascontiguousarray(dots), tile, sums, row_side, col_side)
        return sums, row_side, col_side

    @staticmethod
    def source(features, labels, clean_labels=None, *, chunk_size=None):
        """The host chunk source of ``collapse``'s inputs."""
        return HostSource(as_source(features, labels, clean_labels, chunk_size=chunk_size))

    @staticmethod
    def pass1_state(class_sums):
        return class_sums

    @staticmethod
    def pass2_states(residual_pass, source):
        """The host ``ResidualStats`` themselves (the source needs no sizing here)."""
        return residual_pass.parts()

    @staticmethod
    def finish_pass1(state, class_sums, source):
        """``ClassSums.update`` added into the host state and raised; pass 1's scratch
        goes (``ncfast.kernels.cpu.release_pass1_scratch``)."""
        cpu.release_pass1_scratch()

    @staticmethod
    def finish_pass2(states, residual_pass, source):
        """Nothing to do: ``ResidualStats.update`` added into the host states and raised."""


class HostSource:
    """A host chunk source (``ncfast.inputs``), read the same way by both passes.

    Attributes
    ----------
    host : ArraySource or IterableSource
    """

    def __init__(self, host):
        self.host = host

    @property
    def num_features(self):
        return num_features_of(self.host)

    @property
    def num_rows(self):
        """Rows of the input, or None for a chunk source (not known before it is read)."""
        return getattr(self.host, "num_rows", None)

    @property
    def carries_clean_labels(self):
        """Whether the chunks bring clean labels of their own (chunk sources)."""
        return carries_clean_labels(self.host)

    @property
    def rereads(self):
        """Whether each pass iterates a chunk source again, which may yield other rows
        (``IterableSource.rereads``)."""
        return isinstance(self.host, IterableSource) and self.host.rereads

    def label_summary(self):
        """``ncfast.inputs.LabelSummary`` of the labels; see ``ArraySource``.

        Raises
        ------
        ValueError
            For a chunk source, whose labels are not known before it is read.
        """
        if not hasattr(self.host, "label_summary"):
            raise ValueError("num_classes is required when features is a chunk source")
        return self.host.label_summary()

    def chunks(self, pass_number):
        """The chunks of pass ``pass_number`` (1 or 2): the same host chunks each time."""
        return iter(self.host)

    @staticmethod
    def context():
        """The run's ``ncfast.kernels.cpu.scratch_scope``: the threads' chunk-sized scratch
        is kept from chunk to chunk and dropped when the run ends."""
        return cpu.scratch_scope()


CPU = CpuBackend()
