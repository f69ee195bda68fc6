"""Neural collapse over the ranks of a ``torch.distributed`` process group.

Each rank of a DDP job feeds its own batches; the pass states are sums, so
each pass ends with one ``all_reduce`` of two flat buffers (the float64 sums
and the int64 counts), after one of four ints that checks that the ranks'
states have the same shapes (and, at the first, one of two ints that checks
that they hold the same classifier), and every rank then holds the same class
means and, at the end, the same ``CollapseReport``. No feature row leaves its
rank.

Requires torch (``import ncfast`` never imports it). Works with any backend
that sums float64 and int64 tensors: ``gloo`` (CPU buffers) and ``nccl``
(buffers on the current CUDA device). The kernels are ncfast's CPU kernels;
CUDA feature batches are copied to the host batch by batch.
"""
import math
import zlib

import numpy as np
import torch
import torch.distributed as dist

from ncfast.accumulators import ClassSums
from ncfast.engine import (NOISE_WITH_MEANS, ResidualPass, check_options, check_same_class_sums,
                           finalize_pass1, geometry_from_means_option)
from ncfast.geometry import PINV_RTOL
from ncfast.inputs import ArraySource, as_array, check_features, plain_tensor
from ncfast.kernels.cpu import release_pass1_scratch, release_scratch
from ncfast.plan import check_classifier
from ncfast.progress import stage_progress


class DistributedCollapse:
    """Two-pass neural-collapse analysis whose rows are spread over ranks.

    Every rank of ``group`` builds one with the same arguments, then calls,
    in this order (``finalize_pass1`` and ``report`` are collective: every
    rank must call them, whatever number of batches it fed)::

        analysis = DistributedCollapse(num_classes, num_features, weights=fc.weight)
        for features, labels in my_batches:
            analysis.update_pass1(features, labels)
        analysis.finalize_pass1()
        for features, labels in my_batches:   # the same rows again
            analysis.update_pass2(features, labels)
        report = analysis.report()            # the same on every rank

    Parameters
    ----------
    num_classes : int
        Number of classes C.
    num_features : int
        Feature width D.
    weights : array or tensor of shape (C, D), optional
        Last-layer classifier ``W`` (``nn.Linear.weight``); enables NC3, NC4
        and accuracy. The same on every rank (checked by the first collective).
    bias : array or tensor of shape (C,), optional
    means : array of shape (C, D) or CollapseReport, optional
        Measure against these class means (held-out features): pass 1 is
        skipped, start with ``update_pass2``.
    label_noise : bool
        Every batch comes with its clean labels: enables the label-noise
        metrics. Must be the same on every rank.
    global_mean : {"classes", "samples"}
    chunk_size : int, optional
    empty_classes : {"warn", "ignore", "raise"}
    pinv_rtol : float
        As in ``ncfast.collapse``.
    group : ProcessGroup, optional
        The ranks that share the rows; the default group when None.
    progress : bool or ncfast.StageProgress
        As in ``ncfast.collapse``, on this rank: the class-pair tiles (and, in
        ``collapse``, the rows of this rank's batches). Every rank that is given
        ``True`` tells its own; ``progress=dist.get_rank() == 0`` tells one.

    Attributes
    ----------
    same_rows_source, same_rows_fix : str
        How ``report`` names the rows and the fix when pass 2 read other rows
        than pass 1: pass 2 counts and sums its rows by class again, and ``report``
        compares those, over all ranks, with pass 1's (``check_same_class_sums``).
    checks_same_rows : bool
        Whether pass 2 does that (True). A caller that gives pass 2 the very
        arrays it gave pass 1 (``CollapseMonitor``'s held rows) sets it False
        before ``finalize_pass1``: pass 2 then neither sums its rows again nor
        keeps pass 1's C×D sums.
    """

    checks_same_rows = True
    same_rows_source = "the batches given to update_pass2"
    same_rows_fix = ("give update_pass2 the rows given to update_pass1, in any order (no random "
                     "augmentation, no drop_last with shuffling)")

    def __init__(self, num_classes, num_features, *, weights=None, bias=None, means=None,
                 label_noise=False, global_mean="classes", chunk_size=None,
                 empty_classes="warn", pinv_rtol=PINV_RTOL, group=None, progress=False):
        check_options(empty_classes=empty_classes, pinv_rtol=pinv_rtol, global_mean=global_mean)
        self.progress = stage_progress(progress)
        if label_noise and means is not None:
            raise ValueError(NOISE_WITH_MEANS)
        self.num_features = num_features
        self.label_noise = label_noise
        self.global_mean = global_mean
        self.chunk_size = chunk_size
        self.empty_classes = empty_classes
        self.pinv_rtol = pinv_rtol
        self.group = group
        # Checked now rather than after pass 1; float64 numpy copies.
        self._classifier = check_classifier(weights, bias, num_classes, num_features)
        # Whether the ranks were found to hold the same classifier and options (at the first
        # collective).
        self._same_setup = False
        self._report = None
        # Rows fed on this rank in the current pass: bad rows are named by their index
        # among them.
        self._rows_fed = 0
        # After pass 1: its sums over the group, and those of pass 2's rows on this rank.
        self._pass1_sums = self._rows_again = None
        # The options every rank must share, and the given means (their digest), for
        # ``_check_same_setup``: ranks measuring otherwise would report other numbers, or
        # one would raise alone and leave the others waiting in the next collective.
        setup = repr((global_mean, empty_classes, float(pinv_rtol))).encode()
        if means is None:
            self.class_sums = ClassSums(num_classes, num_features, track_clean=label_noise)
            self.residual_pass = None
        else:
            self.class_sums = None
            geometry = geometry_from_means_option(means, num_classes, num_features,
                                                  global_mean)
            with self.progress:
                self.residual_pass = ResidualPass(geometry, weights=self._classifier[0],
                                                  bias=self._classifier[1],
                                                  progress=self.progress)
            setup += np.ascontiguousarray(geometry.means).tobytes()
        self._setup_checksum = zlib.crc32(setup)

    def update_pass1(self, features, labels, clean_labels=None):
        """Add a local batch to pass 1 (class counts and sums).

        Parameters
        ----------
        features : tensor or array of shape (n, D)
        labels : int tensor or array of shape (n,)
        clean_labels : int tensor or array of shape (n,), required with ``label_noise``

        Raises
        ------
        ValueError
            For a bad row (a label outside ``[0, C)``, a NaN, ...), named by its
            index among the rows this rank has fed to the pass.
        """
        if self.class_sums is None:
            raise RuntimeError("pass 1 is finished (or skipped with means=); call update_pass2")
        for chunk in self._chunks(features, labels, clean_labels):
            self.class_sums.update(chunk.features, chunk.labels, chunk.clean_labels,
                                   row_offset=chunk.offset)

    def finalize_pass1(self):
        """Sum pass 1 over the group and build the class means (collective)."""
        if self.class_sums is None:
            raise RuntimeError("pass 1 is already finished (or skipped with means=)")
        release_pass1_scratch()
        self._check_same_setup()
        all_reduce_class_sums(self.class_sums, self.group)
        geometry, clean_geometry = finalize_pass1(
            self.class_sums, global_mean=self.global_mean, empty_classes=self.empty_classes)
        weights, bias = self._classifier
        with self.progress:
            self.residual_pass = ResidualPass(geometry, clean_geometry, weights=weights,
                                              bias=bias, progress=self.progress)
        if self.checks_same_rows:
            self._pass1_sums = self.class_sums
            self._rows_again = ClassSums(self.class_sums.num_classes, self.class_sums.num_features)
        self.class_sums = None
        self._rows_fed = 0

    def update_pass2(self, features, labels, clean_labels=None):
        """Add a local batch to pass 2 (the same rows as pass 1, in any order).

        Parameters
        ----------
        features, labels, clean_labels
            As in ``update_pass1``.
        """
        if self.residual_pass is None:
            raise RuntimeError("call finalize_pass1 on every rank before update_pass2")
        if self._report is not None:
            raise RuntimeError("the report is made; start a new DistributedCollapse")
        for chunk in self._chunks(features, labels, clean_labels):
            self.residual_pass.update(chunk.features, chunk.labels, chunk.clean_labels,
                                      row_offset=chunk.offset)
            if self._rows_again is not None:
                self._rows_again.update(chunk.features, chunk.labels, row_offset=chunk.offset)

    def report(self):
        """Sum pass 2 over the group and return the ``CollapseReport`` (collective).

        Every rank receives the same report; later calls return it again
        without communicating.

        Raises
        ------
        ValueError
            On every rank, when the ranks' pass-2 rows, summed by class, are not
            those of pass 1 (``same_rows_source``), or when ``means=`` skipped
            pass 1 and the ranks' classifiers differ.
        """
        if self.residual_pass is None:
            raise RuntimeError("call finalize_pass1 and update_pass2 before report")
        if self._report is None:
            release_scratch()  # this rank's pass-2 scratch, unless a run is going on
            self._check_same_setup()  # done by finalize_pass1, unless means= skipped it
            arrays = self.residual_pass.sum_arrays()
            if self._rows_again is not None:
                arrays += self._rows_again.sum_arrays()
            all_reduce_sums(arrays, self.group)
            if self._rows_again is not None:
                check_same_class_sums(self._pass1_sums, self._rows_again,
                                      self.residual_pass.stats.sq_norm_sums,
                                      source=self.same_rows_source, fix=self.same_rows_fix)
            self._report = self.residual_pass.report(pinv_rtol=self.pinv_rtol)
        return self._report

    def _check_same_setup(self):
        """Refuse, on every rank, classifiers, options or given means that differ between
        the ranks (collective, once).

        Each rank's metrics of ``W`` would be its own, and its rows would be scored by
        its own classifier; other options or means would give each rank other numbers
        (or an error on one rank alone). CRCs of this rank's float64 ``weights`` and
        ``bias`` (-1 without a classifier) and of its options and means are compared
        over the group by ``_extremes``.

        Raises
        ------
        ValueError
            Saying how to give every rank the same classifier, or the same options.
        """
        if self._same_setup or not (dist.is_available() and dist.is_initialized()):
            return
        weights, bias = self._classifier
        checksum = -1 if weights is None else zlib.crc32(bias.tobytes(),
                                                         zlib.crc32(weights.tobytes()))
        smallest, largest = _extremes([checksum, self._setup_checksum], self.group,
                                      _reduce_device(self.group))
        if smallest[1] != largest[1]:
            raise ValueError(
                "the ranks were given different options (global_mean, empty_classes, "
                "pinv_rtol or means=), so they would measure different numbers: pass every "
                "rank the same options (and the same means, e.g. broadcast from rank 0)")
        if smallest[0] != largest[0]:
            raise ValueError(
                "the ranks' classifiers differ (weights and bias are not the same on every "
                "rank), so the metrics of W and the accuracy would differ between the ranks: "
                "build the classifier after torch.manual_seed with the same seed on every "
                "rank, or broadcast its parameters from rank 0 (dist.broadcast(tensor, src=0) "
                "for each, as DistributedDataParallel does when it wraps the model)")
        self._same_setup = True

    def _chunks(self, features, labels, clean_labels):
        if self.label_noise != (clean_labels is not None):
            raise ValueError("pass clean_labels with every batch exactly when label_noise=True")
        features, labels = _on_host(features, "features"), _on_host(labels, "labels")
        if clean_labels is not None:
            clean_labels = _on_host(clean_labels, "clean_labels")
        num_rows, num_features = check_features(features, allow_empty=True)
        if num_rows == 0:  # ArraySource takes rows; an empty batch must still match
            if num_features != self.num_features:
                raise ValueError(f"features must have shape (n, {self.num_features}); found "
                                 f"{tuple(features.shape)}")
            for name, values in (("labels", labels), ("clean_labels", clean_labels)):
                if values is not None and tuple(np.shape(values)) != (0,):
                    raise ValueError(f"{name} has shape {tuple(np.shape(values))} but features "
                                     "has 0 rows; pass one label per feature row")
            return iter(())
        source = ArraySource(features, labels, clean_labels, chunk_size=self.chunk_size,
                             row_offset=self._rows_fed)
        self._rows_fed += source.num_rows
        return iter(source)


def collapse(batches, *, num_classes, num_features, group=None, **options):
    """Neural collapse of the rows that all ranks of ``group`` hold (collective).

    Parameters
    ----------
    batches : re-iterable of (features, labels) or (features, labels, clean_labels)
        This rank's batches, read twice (a list, or an object whose
        ``__iter__`` starts over); feature tensors of shape (n, D).
    num_classes, num_features : int
    group : ProcessGroup, optional
    **options
        ``weights``, ``bias``, ``means``, ``label_noise``, ``global_mean``,
        ``chunk_size``, ``empty_classes``, ``pinv_rtol``, ``progress`` of
        ``DistributedCollapse``.

    Returns
    -------
    CollapseReport
        The same on every rank.
    """
    def set_up():
        # Checked here, not before: a rank that raised alone would leave the others waiting.
        if iter(batches) is batches:
            raise TypeError(
                "batches is a one-shot iterator (e.g. a generator), but the analysis reads the "
                "batches twice; pass a list or another re-iterable")
        return DistributedCollapse(num_classes, num_features, group=group, **options)

    def feed(update, rows_done):
        for batch in batches:
            update(*batch)
            rows_done(len(batch[0]))

    analysis = on_every_rank(set_up, group, "setting up the analysis")
    shown = analysis.progress
    with shown:
        if options.get("means") is None:
            with shown.stage("pass 1: class sums") as rows_done:
                on_every_rank(lambda: feed(analysis.update_pass1, rows_done), group, "pass 1")
            analysis.finalize_pass1()
        with shown.stage("pass 2: residuals") as rows_done:
            on_every_rank(lambda: feed(analysis.update_pass2, rows_done), group, "pass 2")
        return analysis.report()


def on_every_rank(work, group, what):
    """``work()`` on this rank, then one ``all_reduce`` that tells every rank which failed.

    A rank whose ``work`` raised would never reach the next collective, and
    the others would wait in it until the backend's timeout (30 minutes and
    more). So every rank reports here whether its ``work`` raised: that rank
    raises its own error, and the others a ``ValueError`` naming it.

    Parameters
    ----------
    work : callable
        This rank's share, without collectives.
    group : ProcessGroup or None
    what : str
        The step, for the other ranks' error ("pass 1").

    Returns
    -------
    The result of ``work()``.
    """
    failure = result = None
    try:
        result = work()
    except Exception as error:  # any failure must reach the other ranks
        failure = error
    if dist.is_available() and dist.is_initialized():
        failed = torch.zeros(dist.get_world_size(group), dtype=torch.int64,
                             device=_reduce_device(group))
        failed[dist.get_rank(group)] = failure is not None
        dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
        ranks = np.flatnonzero(failed.cpu().numpy()).tolist()
        if failure is None and ranks:
            several = len(ranks) > 1
            raise ValueError(
                f"rank{'s' if several else ''} {', '.join(map(str, ranks))} of the group "
                f"failed in {what} ({'their errors say' if several else 'its error says'} "
                "why), so this rank stops too")
    if failure is not None:
        raise failure
    return result


def all_reduce_class_sums(class_sums, group=None):
    """Sum a ``ClassSums`` over ``group`` in place, its float64 sums as exactly as adding the
    ranks' states one by one would (``ClassSums.__iadd__``).

    A plain ``all_reduce`` of the sums rounds once per rank, which the sums' errors
    (``ClassSums.sum_errors``) cannot keep: with rows 1e12 from the origin and a spread of
    1e-2, 512 ranks moved the means by half the spread. So where some rank's sums carry
    errors (float64 rows), each rank splits each sum into a multiple of a power of two
    ``G`` common to the ranks (per class: ``2^(e + ceil(log2 W) - 52)`` for the ranks'
    largest ``|sum| < 2^e`` and ``W`` ranks), whose total over the ranks is exact, and the
    rest, which is added to its error; then both are reduced. Where no rank has errors
    (float32 rows, whose float64 sums are exact) the sums alone are reduced: one
    ``all_reduce`` of C×D values, the errors left untouched. The ranks' states must have
    one shape (``all_reduce_sums`` checks it first).

    Parameters
    ----------
    class_sums : ClassSums
    group : ProcessGroup, optional
        Without an initialised process group nothing is reduced.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    device = _reduce_device(group)
    _check_same_shapes(class_sums.sum_arrays(), group, device)
    pairs = [(class_sums.sums, class_sums.sum_errors)]
    counts = [class_sums.counts]
    if class_sums.track_clean:
        pairs.append((class_sums.clean_sums, class_sums.clean_sum_errors))
        counts.append(class_sums.clean_counts)
    # One MAX all_reduce: each class's largest |sum| over the ranks, and any errors at all.
    largest = np.concatenate([np.abs(sums).max(axis=1) for sums, _ in pairs]
                             + [[float(any(np.any(errors) for _, errors in pairs))]])
    shared = torch.from_numpy(largest).to(device)
    dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
    largest = shared.cpu().numpy()
    if not largest[-1]:
        all_reduce_sums([*counts, *(sums for sums, _ in pairs)], group)
        return
    for index, (sums, errors) in enumerate(pairs):
        split_on_grid(sums, errors, largest[index * sums.shape[0]:(index + 1) * sums.shape[0]],
                      dist.get_world_size(group))
    all_reduce_sums([*counts, *(array for pair in pairs for array in pair)], group)


def split_on_grid(sums, errors, largest, num_parts):
    """Move each float64 sum's part off a power-of-two grid into its error, in place, so that
    ``num_parts`` such sums add up exactly (``all_reduce_class_sums``).

    Parameters
    ----------
    sums, errors : float64 arrays of shape (C, D)
        A state's sums and their rounding errors; ``sums + errors`` is kept (to
        float64's precision of the errors).
    largest : float64 array of shape (C,)
        Each class's largest ``|sum|`` over all the parts, ``< 2^e``: the grid is
        ``2^(e + ceil(log2 num_parts) - 52)``, so a total of ``num_parts`` multiples of
        it, each at most ``2^e``, needs at most 53 bits, whatever the order of the
        additions.
    num_parts : int
    """
    exponents = np.frexp(largest)[1] + math.ceil(math.log2(max(num_parts, 1))) - 52
    grid = np.ldexp(1.0, np.maximum(exponents, -1074))[:, None]  # no underflow to 0
    on_grid = np.round(sums / grid) * grid  # exact: a power-of-two scale, then integers
    errors += sums - on_grid  # exact: both are multiples of the sum's ulp, within half a grid
    sums[...] = on_grid


def all_reduce_sums(arrays, group=None):
    """Sum numpy arrays over ``group`` in place, one ``all_reduce`` per dtype.

    Parameters
    ----------
    arrays : list of float64 or int64 numpy arrays
        Every rank passes arrays of the same shapes in the same order.
    group : ProcessGroup, optional
        Without an initialised process group (a single process) nothing is reduced.

    Raises
    ------
    ValueError
        On every rank, when the ranks' arrays differ in shape (checked first, by
        one small ``all_reduce``).
    """
    unsupported = {str(array.dtype) for array in arrays} - {"float64", "int64"}
    if unsupported:
        raise TypeError(f"all_reduce_sums sums float64 and int64 arrays; found {unsupported}")
    if not (dist.is_available() and dist.is_initialized()):
        return  # one process, no group: its sums are the totals
    device = _reduce_device(group)
    _check_same_shapes(arrays, group, device)
    for dtype in (np.float64, np.int64):
        same_dtype = [array for array in arrays if array.dtype == dtype]
        if not same_dtype:
            continue
        flat = torch.from_numpy(np.concatenate([array.ravel() for array in same_dtype]))
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.cpu().numpy()
        start = 0
        for array in same_dtype:
            array[...] = flat[start:start + array.size].reshape(array.shape)
            start += array.size


def _reduce_device(group):
    """Where the group's collectives take their tensors: the current CUDA device for
    ``nccl``, the host otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_shapes(arrays, group, device):
    """Refuse, on every rank, arrays whose shapes differ between the ranks.

    Summing buffers of different sizes aborts the process (gloo) or hangs; so
    the ranks first compare their sizes and a hash of their shapes
    (``_extremes``), and every rank raises the same error when they differ.

    Raises
    ------
    ValueError
        Naming this rank's shapes and the range of sizes over the ranks.
    """
    shapes = [tuple(array.shape) for array in arrays]
    # The hash of a tuple of ints is the same in every process (no hash randomisation).
    sizes = [sum(array.size for array in arrays), hash(tuple(shapes)) % (1 << 62)]
    smallest, largest = _extremes(sizes, group, device)
    if largest != smallest:
        raise ValueError(
            f"the ranks hold states of different shapes (this rank's arrays: {shapes}; from "
            f"{smallest[0]} to {largest[0]} values over the ranks): build DistributedCollapse "
            "with the same num_classes, num_features and label_noise on every rank")


def _extremes(values, group, device):
    """Element-wise minimum and maximum of a list of ints over the group, in one
    ``all_reduce`` (the maximum of the values and of their negatives).

    Returns
    -------
    smallest, largest : list of int
        Equal on every rank; equal to each other when every rank passed the same values.
    """
    tensor = torch.tensor(values + [-value for value in values], dtype=torch.int64,
                          device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    extremes = tensor.tolist()
    return [-value for value in extremes[len(values):]], extremes[:len(values)]


def _on_host(values, what):
    """A numpy or torch CPU view of a batch's ``values`` (``ncfast.inputs.as_array``), a
    tensor copied off an accelerator; a tensor numpy cannot view (meta device, sparse,
    nested) is refused, as by ``ncfast.collapse``, before any copy.

    Parameters
    ----------
    values : tensor, array or array-like
    what : str
        Name used in error messages ("features", "labels", ...).
    """
    if isinstance(values, torch.Tensor):
        return plain_tensor(values, what).cpu()
    return as_array(values, what)
