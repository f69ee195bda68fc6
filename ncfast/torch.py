"""Neural collapse of a torch model's features, measured inside a training loop.

``CollapseMonitor(model, "fc", loader)`` hooks the input of the named module
(the penultimate features when it is the classifier) and ``measure()`` runs
the model over ``loader`` in eval mode under ``torch.no_grad()``, feeding the
captured rows to ncfast's two passes. Features that fit ``memory_budget`` are
held after one forward pass and measured in place (a CUDA model's on its GPU,
through DLPack, when CuPy is installed); larger ones are streamed, one forward
pass per ncfast pass. Under ``torch.distributed`` each process measures its
own rows and the pass states are summed over the ranks
(``ncfast.distributed.DistributedCollapse``), so every rank gets the report of
all of them.

``capture(model, layer, loader)`` is the same forward pass returning the
features themselves (``ncfast train`` dumps them).

Requires torch (``import ncfast`` never imports it; this module does).
"""
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ncfast.api import collapse
from ncfast.distributed import DistributedCollapse, on_every_rank
from ncfast.engine import check_same_rows
from ncfast.inputs import check_labels, default_chunk_rows, holds_class_indices, plain_tensor

#: Bytes of captured features (all layers, per process) that ``measure`` holds
#: for the one-pass route; beyond it the passes stream.
DEFAULT_MEMORY_BUDGET = 2 << 30

#: Bytes of the chunk each monitored layer fills before handing it on: a quarter of
#: ``collapse``'s chunks (``ncfast.inputs.CHUNK_TARGET_BYTES``), since it is held on the
#: features' device while training runs.
HELD_CHUNK_BYTES = 64 << 20

#: How the streamed route's two forward passes give the same rows (checked by the rows per
#: class, then by their class means).
STREAMED_ROWS_FIX = ("the streamed route needs the same rows in both forward passes: no "
                     "random augmentation, no drop_last with shuffling; or raise memory_budget "
                     "to hold them")


@dataclass(frozen=True)
class CapturedFeatures:
    """The features of one forward pass over a loader.

    Attributes
    ----------
    features : dict of str to tensor of shape (N, D_layer)
        Input of each hooked module, flattened per row, in the module's
        dtype and on its device.
    labels : int64 CPU tensor of shape (N,)
    clean_labels : int64 CPU tensor of shape (N,), or None
    """

    features: dict
    labels: torch.Tensor
    clean_labels: torch.Tensor | None


def capture(model, layer, loader, *, device=None, clean_labels=None):
    """Features of the named modules' inputs over one eval-mode forward pass.

    The model's train/eval state and its hooks are restored afterwards, also
    when an exception is raised.

    Parameters
    ----------
    model : nn.Module
    layer : str or list of str
        Names of modules in ``model.named_modules()`` whose input is captured.
    loader : re-iterable of (inputs, labels) or (inputs, labels, clean_labels)
        A ``DataLoader``, a list of batches, ...; ``model(inputs)`` runs on each.
    device : torch.device or str, optional
        Where the inputs (a tensor, or the tensors in a dict, list or tuple)
        are moved; by default the device of the model's first parameter.
    clean_labels : int array of shape (N,), optional
        True labels of the loader's rows, in the loader's order.

    Returns
    -------
    CapturedFeatures
    """
    rows = _ForwardPasses(model, layer, loader, device=device, clean_labels=clean_labels)
    held = {name: [] for name in rows.names}
    with rows.evaluating():
        rows.forward_pass(lambda name, chunk: held[name].append(chunk))
    first = held[rows.names[0]]
    if not first:
        raise ValueError("the loader yielded no rows")
    labels = torch.cat([chunk[1] for chunk in first])
    clean = torch.cat([chunk[2] for chunk in first]) if rows.label_noise else None
    features = {name: torch.cat([chunk[0] for chunk in chunks]) for name, chunks in held.items()}
    return CapturedFeatures(features, labels, clean)


class CollapseMonitor:
    """Measure neural collapse of a model's features inside a training loop.

    ::

        monitor = CollapseMonitor(model, "fc", train_loader, every=5)
        for epoch in range(epochs):
            train_one_epoch(model, ...)
            report = monitor.step()      # a CollapseReport every 5th epoch, else None
        monitor.history                  # [(5, report), (10, report), ...]

    Parameters
    ----------
    model : nn.Module
        A ``DistributedDataParallel`` wrapper is looked through: its module
        runs, and layer names may omit the ``module.`` prefix.
    layer : str or list of str
        Module(s) whose input is measured (e.g. ``"fc"``: the penultimate
        features). Several layers are captured in the same forward passes.
        Inputs of more than two dimensions (convolution maps) are flattened
        per row.
    loader : re-iterable of (inputs, labels) or (inputs, labels, clean_labels)
        Batches the model runs on: ``model(inputs)``. The streamed route reads
        it twice and needs the same rows both times (any order; no random
        augmentation, no ``drop_last`` with shuffling).
    classifier : nn.Linear, str or dict, optional
        The linear classifier (or its name) whose weights ``W`` and bias
        enable NC3, NC4 and accuracy; read at each ``measure``. By default a
        hooked module that is an ``nn.Linear`` is its layer's classifier. A
        module or name applies to every layer; a dict ``{layer: classifier or
        None}`` chooses per layer (layers not in it keep the default).
    every : int
        ``step()`` measures at every ``every``-th call.
    device : torch.device or str, optional
        Where the inputs (a tensor, or the tensors in a dict, list or tuple)
        are moved; by default the model's device.
    clean_labels : int array of shape (N,), optional
        True labels of the loader's rows in the loader's order (a loader
        that does not shuffle): enables memorization, dilation and the other
        label-noise metrics. A loader of ``(inputs, noisy, clean)`` does too,
        in any order.
    num_classes : int, optional
        C; by default the classifier's ``out_features``. Required without a
        classifier.
    memory_budget : int
        Bytes of captured features (all layers, this process) held for the
        one-pass route; beyond it ``measure`` streams (two forward passes).
        0 always streams. Holding also takes one chunk (about 64 MiB) per
        layer being filled.

    Attributes
    ----------
    history : list of (int, report)
        What ``step`` measured: the call count and the report (a dict of
        reports with several layers).
    """

    def __init__(self, model, layer, loader, *, classifier=None, every=1, device=None,
                 clean_labels=None, num_classes=None, memory_budget=DEFAULT_MEMORY_BUDGET):
        self._passes = _ForwardPasses(model, layer, loader, device=device,
                                      clean_labels=clean_labels)
        self._classifiers = _resolve_classifiers(self._passes, classifier)
        self.num_classes = _resolve_num_classes(num_classes, self._classifiers)
        if isinstance(every, bool) or not isinstance(every, Integral) or every < 1:
            raise ValueError(f"every must be a positive int; found {every!r}")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, Integral) or \
                memory_budget < 0:
            raise ValueError(f"memory_budget must be a non-negative int (bytes); found "
                             f"{memory_budget!r}")
        self.every = int(every)
        self.memory_budget = int(memory_budget)
        self.steps = 0
        self.history = []

    def step(self):
        """Count one call (an epoch); measure at every ``every``-th.

        Returns
        -------
        CollapseReport, dict of str to CollapseReport, or None
            As ``measure``, or None when this call does not measure.
        """
        self.steps += 1
        if self.steps % self.every:
            return None
        result = self.measure()
        self.history.append((self.steps, result))
        return result

    def measure(self):
        """Run the model over the loader and measure the hooked layers' features.

        Under ``torch.distributed`` this is collective: every rank calls it
        and receives the report of all ranks' rows. When a rank fails in a
        pass (its forward pass, a bad row), that rank raises its error and the
        others a ValueError naming it.

        Returns
        -------
        CollapseReport
            For one layer; a dict ``{layer: CollapseReport}`` for a list.
        """
        passes = self._passes
        with passes.evaluating():
            reports = _Measurement(self, passes).run()
        return reports if passes.several else reports[passes.names[0]]


class _ForwardPasses:
    """Forward passes of a model over a loader with pre-hooks on the measured modules.

    Each hook copies its module's input rows, with the batch's labels, into
    chunks of ``default_chunk_rows(D)`` rows; a finished chunk
    ``(features, labels, clean_labels or None)`` goes to the pass's
    ``deliver(layer, chunk)``.
    """

    def __init__(self, model, layer, loader, *, device=None, clean_labels=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module; found {type(model).__name__}")
        self.model = _unwrapped(model)
        self.several = not isinstance(layer, str)
        self.names = [layer] if not self.several else list(layer)
        if not self.names or not all(isinstance(name, str) for name in self.names):
            raise TypeError(f"layer must be a module name or a non-empty list of them; found "
                            f"{layer!r}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"layer lists a module twice: {self.names}")
        self.modules = {name: find_module(self.model, name) for name in self.names}
        # Told apart without iterating: a DataLoader with worker processes starts them
        # when iterated. Iterable as for ``iter``: by ``__iter__`` or by ``__getitem__``.
        iterable = isinstance(loader, Iterable) or hasattr(type(loader), "__getitem__")
        if isinstance(loader, Iterator) or not iterable:
            kind = ("a one-shot iterator (e.g. a generator)" if isinstance(loader, Iterator)
                    else f"not iterable ({type(loader).__name__})")
            raise TypeError(
                f"loader is {kind}, but the monitor runs over it at every measurement; pass a "
                "DataLoader, a list of batches or another re-iterable")
        self.loader = loader
        self.device = torch.device(device) if device is not None else _model_device(self.model)
        self.clean_labels = None
        if clean_labels is not None:
            if _shuffles(loader):
                raise ValueError(
                    "clean_labels follow the loader's order, but this loader shuffles; pass a "
                    "loader without shuffling, or one that yields (inputs, labels, clean_labels)")
            given = (plain_tensor(clean_labels, "clean_labels").cpu()
                     if isinstance(clean_labels, torch.Tensor)
                     else np.asarray(clean_labels))
            # Rank and dtype as collapse checks them (float labels were truncated by .long()).
            check_labels(given, len(given) if given.ndim else 0, "clean_labels")
            self.clean_labels = torch.as_tensor(given).long()
        self.label_noise = self.clean_labels is not None
        self.widths = {}

    @contextmanager
    def evaluating(self):
        """Eval mode and ``no_grad`` inside; every module's train flag restored after."""
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            self.model.eval()
            with torch.no_grad():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def forward_pass(self, deliver):
        """Run the model over the loader once, delivering every layer's chunks.

        Returns
        -------
        int64 array of shape (C_seen,)
            Rows per label value seen (labels outside ``[0, C)`` are left to
            ncfast's checks), to compare two passes.
        """
        layers = {name: _LayerRows(name, lambda chunk, name=name: deliver(name, chunk))
                  for name in self.names}
        handles = [module.register_forward_pre_hook(layers[name].hook)
                   for name, module in self.modules.items()]
        counts = np.zeros(0, np.int64)
        offset = 0
        try:
            for index, batch in enumerate(self.loader):
                inputs, labels, clean = self._split(batch, index, offset)
                for rows in layers.values():
                    rows.expect(index, labels, clean)
                self.model(_on_device(inputs, self.device))
                for rows in layers.values():
                    rows.check_ran()
                offset += len(labels)
                valid = labels[labels >= 0].numpy()
                counts = _add_counts(counts, np.bincount(valid))
            if self.clean_labels is not None and offset != len(self.clean_labels):
                raise ValueError(f"clean_labels has {len(self.clean_labels)} entries but the "
                                 f"loader yielded {offset} rows; pass one per row")
            for rows in layers.values():
                rows.flush()
        finally:
            for handle in handles:
                handle.remove()
        for name, rows in layers.items():
            if rows.width is not None:
                self.widths[name] = rows.width
        return counts

    def _split(self, batch, index, offset):
        """``(inputs, labels, clean_labels or None)`` of one batch, labels as CPU int64."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            found = type(batch).__name__ + (f" of {len(batch)} items"
                                            if isinstance(batch, (tuple, list)) else "")
            raise TypeError(
                f"batch {index} of the loader is a {found}; each batch must be a tuple "
                "(inputs, labels) or (inputs, labels, clean_labels)")
        inputs, labels = batch[0], _cpu_labels(batch[1], f"labels of batch {index}")
        clean = None
        if len(batch) == 3:
            try:
                clean = _cpu_labels(batch[2], f"clean labels of batch {index}")
            except TypeError as error:  # often not clean labels at all (sample indices)
                raise TypeError(f"{error}; the third item of a batch is read as its clean "
                                "labels (label noise): a loader whose batches carry other "
                                "data there must yield (inputs, labels)") from None
        if index == 0 and self.clean_labels is None:
            self.label_noise = clean is not None
        if (clean is not None) != (self.label_noise and self.clean_labels is None):
            raise ValueError(
                f"batch {index} {'has' if clean is not None else 'lacks'} clean labels, unlike "
                "the others (or clean_labels= was given as well): pass clean labels once, "
                "either in every batch or as clean_labels=")
        if self.clean_labels is not None:
            clean = self.clean_labels[offset:offset + len(labels)]
            if len(clean) < len(labels):
                raise ValueError(f"clean_labels has {len(self.clean_labels)} entries but the "
                                 f"loader yields more rows; pass one per row")
        if clean is not None and len(clean) != len(labels):
            raise ValueError(f"batch {index} has {len(labels)} labels but {len(clean)} clean "
                             "labels; pass one of each per row")
        return inputs, labels, clean


class _LayerRows:
    """The rows one hooked module receives, copied into fixed-size chunks."""

    def __init__(self, name, deliver):
        self.name = name
        self.deliver = deliver
        self.width = None
        self.buffer = self.labels = self.clean = None
        self.filled = 0
        self.batch_index = None
        self.batch_labels = self.batch_clean = None

    def expect(self, index, labels, clean):
        """Set the index in the loader and the labels of the batch about to run forward."""
        self.batch_index, self.batch_labels, self.batch_clean = index, labels, clean

    def hook(self, module, args):
        if self.batch_labels is None:
            raise ValueError(f"module {self.name!r} ran twice in one forward pass; hook a "
                               "module that runs once per batch")
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"module {self.name!r} received no tensor as its first positional "
                            "input; hook a module called as module(features)")
        features = args[0].detach()
        labels, clean = self.batch_labels, self.batch_clean
        self.batch_labels = None
        if not features.is_floating_point():
            raise TypeError(f"the input of module {self.name!r} has dtype {features.dtype}; "
                            "hook a module whose input is floating-point features")
        if features.ndim < 2:
            raise ValueError(
                f"the input of module {self.name!r} has shape {tuple(features.shape)} for "
                f"batch {self.batch_index} of {len(labels)} labels; hook a module whose input "
                "has one row per sample, batch first")
        if len(features) != len(labels):
            raise ValueError(
                f"batch {self.batch_index} of the loader has {len(labels)} labels, but the "
                f"input of module {self.name!r} has {len(features)} rows (shape "
                f"{tuple(features.shape)}): either that batch's labels are not one per "
                "sample, or the module's input does not have one row per sample, batch first "
                "(then hook a module whose input does)")
        self._add(features.flatten(1), labels, clean)

    def check_ran(self):
        if self.batch_labels is not None:
            raise ValueError(f"module {self.name!r} did not run in the model's forward pass; "
                               "hook a module that runs on every batch")

    def _add(self, features, labels, clean):
        if self.buffer is None:
            self.width = features.shape[1]
            self._new_buffer(features)
        elif features.shape[1] != self.width:
            raise ValueError(f"the input of module {self.name!r} has {features.shape[1]} "
                             f"features per row in one batch and {self.width} in an earlier one")
        start = 0
        while start < len(features):
            take = min(len(features) - start, len(self.buffer) - self.filled)
            rows = slice(self.filled, self.filled + take)
            self.buffer[rows].copy_(features[start:start + take])
            self.labels[rows].copy_(labels[start:start + take])
            if clean is not None:
                self.clean[rows].copy_(clean[start:start + take])
            self.filled += take
            start += take
            if self.filled == len(self.buffer):
                self.deliver((self.buffer, self.labels, self.clean))
                self._new_buffer(features)

    def _new_buffer(self, like):
        rows = default_chunk_rows(self.width, HELD_CHUNK_BYTES)
        self.buffer = torch.empty((rows, self.width), dtype=like.dtype, device=like.device)
        self.labels = torch.empty(rows, dtype=torch.int64)
        self.clean = torch.empty(rows, dtype=torch.int64) if self.batch_clean is not None or \
            self.clean is not None else None
        self.filled = 0

    def flush(self):
        """Deliver the last, partial chunk (copied, so the full buffer is freed)."""
        if self.filled:
            rows = slice(0, self.filled)
            self.deliver((self.buffer[rows].clone(), self.labels[rows].clone(),
                          None if self.clean is None else self.clean[rows].clone()))
        self.buffer = self.labels = self.clean = None


class _Measurement:
    """One ``CollapseMonitor.measure``: pass 1 while holding rows within the budget, then
    in place, or streamed through pass states."""

    def __init__(self, monitor, passes):
        self.monitor = monitor
        self.passes = passes
        self.distributed = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
        self.held = {name: [] for name in passes.names}
        self.held_bytes = 0
        self.streaming = False
        self.analyses = {}

    def run(self):
        """Measure every layer: ``{layer: CollapseReport}``.

        Under ``torch.distributed`` each rank's share of a pass (its forward passes and
        pass states) runs through ``on_every_rank``: when it fails on one rank, that rank
        raises its error and the others one naming it, instead of waiting in the
        pass's collective.
        """
        passes = self.passes
        first_counts = on_every_rank(lambda: passes.forward_pass(self._pass1), None,
                                     "pass 1 of CollapseMonitor.measure")
        if not self.streaming and not self.distributed:
            return {name: self._in_place(name) for name in passes.names}
        widths, label_noise, any_streaming = self._shapes()
        on_every_rank(lambda: self._build_analyses(widths, label_noise), None,
                      "pass 1 of CollapseMonitor.measure")
        for name in passes.names:
            # Where every rank replays its held rows, pass 2 reads the very arrays of pass 1:
            # nothing to check (the ranks must agree, their states are summed together).
            self.analyses[name].checks_same_rows = any_streaming
            self.analyses[name].finalize_pass1()
        on_every_rank(lambda: self._pass2(first_counts), None,
                      "pass 2 of CollapseMonitor.measure")
        return {name: self.analyses[name].report() for name in passes.names}

    def _build_analyses(self, widths, label_noise):
        """The pass states of the layers whose rows were all held (this rank's share)."""
        for name in self.passes.names:
            if name not in self.analyses:
                self._build_analysis(name, widths[name], label_noise)

    def _pass2(self, first_counts):
        """This rank's pass 2: a second forward pass, which must give pass 1's rows per
        class, or the held rows replayed."""
        if self.streaming:
            second_counts = self.passes.forward_pass(
                lambda name, chunk: self.analyses[name].update_pass2(*_noise(chunk)))
            check_same_rows(first_counts, second_counts, source="the loader",
                            fix=STREAMED_ROWS_FIX)
        else:
            for name in self.passes.names:
                for chunk in self.held[name]:
                    self.analyses[name].update_pass2(*_noise(chunk))

    def _pass1(self, name, chunk):
        if name in self.analyses:
            self.analyses[name].update_pass1(*_noise(chunk))
            return
        size = chunk[0].element_size() * chunk[0].nelement()
        if not self.streaming and self.held_bytes + size <= self.monitor.memory_budget:
            self.held[name].append(chunk)
            self.held_bytes += size
            return
        self.streaming = True
        self._build_analysis(name, chunk[0].shape[1], chunk[2] is not None)
        self.analyses[name].update_pass1(*_noise(chunk))

    def _build_analysis(self, name, width, label_noise):
        """Build the layer's pass states and add its held rows to pass 1 (then dropped when
        the second pass streams, kept to replay otherwise)."""
        weights, bias = self._classifier(name)
        # In one process (no process group) DistributedCollapse reduces nothing.
        analysis = DistributedCollapse(self.monitor.num_classes, width, weights=weights,
                                       bias=bias, label_noise=label_noise)
        analysis.same_rows_source, analysis.same_rows_fix = "the loader", STREAMED_ROWS_FIX
        for chunk in self.held[name]:
            analysis.update_pass1(*_noise(chunk))
        if self.streaming:
            self.held[name] = []
        self.analyses[name] = analysis

    def _shapes(self):
        """Each layer's width, whether rows carry clean labels, and whether some rank
        streams, agreed by every rank (a rank without rows learns them from the others)."""
        names = self.passes.names
        local = [self.passes.widths.get(name, 0) for name in names] + [
            int(self.passes.label_noise), int(self.streaming)]
        if self.distributed:
            local = _all_reduce_max(local)
        widths = local[:len(names)]
        if min(widths) == 0:
            raise ValueError("the loader yielded no rows; pass at least one row per class")
        return dict(zip(names, widths)), bool(local[-2]), bool(local[-1])

    def _classifier(self, name):
        classifier = self.monitor._classifiers[name]
        if classifier is None:
            return None, None
        bias = None if classifier.bias is None else classifier.bias.detach()
        return classifier.weight.detach(), bias

    def _in_place(self, name):
        """``ncfast.collapse`` of the rows held for one layer."""
        chunks = self.held[name]
        if not chunks:
            raise ValueError("the loader yielded no rows; pass at least one row per class")
        weights, bias = self._classifier(name)
        options = {"num_classes": self.monitor.num_classes, "weights": weights, "bias": bias}
        if chunks[0][0].is_cuda:  # one device array, read in place by the GPU backend
            clean = None if chunks[0][2] is None else torch.cat([chunk[2] for chunk in chunks])
            return collapse(measurable(torch.cat([chunk[0] for chunk in chunks])),
                            torch.cat([chunk[1] for chunk in chunks]), clean_labels=clean,
                            **options)
        return collapse([_noise(chunk) for chunk in chunks], **options)


def import_extra(name, extra):
    """Import module ``name`` for ``ncfast.<extra>``, or raise an ImportError naming the
    extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"ncfast.{extra} needs {name} ({error}): pip install "
                          f"'ncfast[{extra}]'") from None


def measurable(features):
    """Features where ``ncfast.collapse`` reads them: a CUDA tensor stays on its GPU when
    CuPy is installed (the GPU backend reads it in place through DLPack), else it is
    copied to the host."""
    if features.is_cuda and importlib.util.find_spec("cupy") is None:
        return features.cpu()
    return features


def _noise(chunk):
    """A chunk's (features, labels) or (features, labels, clean_labels) for the passes."""
    return chunk if chunk[2] is not None else chunk[:2]


def _add_counts(total, counts):
    size = max(len(total), len(counts))
    return np.pad(total, (0, size - len(total))) + np.pad(counts, (0, size - len(counts)))


def _all_reduce_max(values):
    """Element-wise maximum of a list of ints over the default process group."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def _cpu_labels(labels, what):
    """A batch's labels (``what``: "labels of batch 3", ...) as an int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        labels = plain_tensor(labels, what).cpu()
    else:
        labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 1 or not holds_class_indices(labels):
        raise TypeError(f"{what} must be a 1-D tensor of integer class indices; "
                        f"found dtype {labels.dtype}, shape {tuple(labels.shape)} (one-hot "
                        "labels: labels.argmax(dim=1))")
    return labels.long()


def _shuffles(loader):
    """Whether a ``DataLoader`` draws its rows in a random order (its sampler, or that of
    its batch sampler, is a random one or one that shuffles)."""
    data = torch.utils.data
    random_samplers = (data.RandomSampler, data.SubsetRandomSampler, data.WeightedRandomSampler)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for sampler in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(sampler, random_samplers) or getattr(sampler, "shuffle", False):
            return True
    return False


def _unwrapped(model):
    """The module a ``DistributedDataParallel`` (or ``DataParallel``) wrapper runs."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def find_module(model, name):
    """The submodule of ``model`` called ``name`` (a leading ``module.`` of a DDP wrapper
    may be given or not).

    Raises
    ------
    ValueError
        Naming some of the modules there are.
    """
    modules = dict(_unwrapped(model).named_modules())
    for candidate in (name, name.removeprefix("module.")):
        if candidate in modules and candidate:
            return modules[candidate]
    names = [key for key in modules if key]
    if not names:
        raise ValueError(
            f"the model ({type(_unwrapped(model)).__name__}) has no submodules, so no module "
            f"{name!r}: wrap it, e.g. in nn.Sequential(model), and name its module '0'")
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    missing = (f"the model has no module {name!r}" if name.removeprefix("module.") else
               f"{name!r} names the model itself, not one of its modules")
    raise ValueError(f"{missing}; its modules are: {shown}")


def _on_device(inputs, device):
    """``inputs`` with every tensor in it moved to ``device``: a tensor, or the tensors
    inside dicts, lists and tuples (e.g. a tokenizer's ``{"input_ids": ..., ...}``),
    nested; anything else as it is."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({key: _on_device(value, device) for key, value in inputs.items()})
    if isinstance(inputs, (list, tuple)):
        moved = [_on_device(value, device) for value in inputs]
        return type(inputs)(*moved) if hasattr(inputs, "_fields") else type(inputs)(moved)
    return inputs


def _model_device(model):
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


#: The ``classifier`` choice of a layer left to the default rule.
_DEFAULT = object()


def _resolve_classifiers(passes, classifier):
    """``{layer: nn.Linear or None}`` from the ``classifier`` option."""
    if isinstance(classifier, dict):
        unknown = set(classifier) - set(passes.names)
        if unknown:
            raise ValueError(f"classifier names layers that are not measured: {sorted(unknown)}")
        chosen = {name: classifier.get(name, _DEFAULT) for name in passes.names}
    else:
        chosen = {name: _DEFAULT if classifier is None else classifier for name in passes.names}
    resolved = {}
    for name, choice in chosen.items():
        if choice is _DEFAULT:
            module = passes.modules[name]
            choice = module if isinstance(module, nn.Linear) else None
        elif isinstance(choice, str):
            choice = find_module(passes.model, choice)
        if choice is not None and not isinstance(choice, nn.Linear):
            raise TypeError(f"the classifier of layer {name!r} must be an nn.Linear; found "
                            f"{type(choice).__name__}")
        resolved[name] = choice
    return resolved


def _resolve_num_classes(num_classes, classifiers):
    outputs = {name: linear.out_features for name, linear in classifiers.items()
               if linear is not None}
    if num_classes is None:
        if not outputs:
            raise ValueError("pass num_classes=: no measured layer has a classifier to take it "
                             "from")
        if len(set(outputs.values())) > 1:
            raise ValueError(f"the classifiers have different numbers of outputs {outputs}; "
                             "pass num_classes= and classifier={layer: ...} for the others")
        return next(iter(outputs.values()))
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or \
            num_classes < 2:
        raise ValueError(f"num_classes must be an int of at least 2; found {num_classes!r}")
    num_classes = int(num_classes)
    for name, count in outputs.items():
        if count != num_classes:
            raise ValueError(
                f"layer {name!r} is measured with an nn.Linear of {count} outputs as its "
                f"classifier, but num_classes is {num_classes}; pass classifier={{{name!r}: "
                "None} to measure it without one")
    return num_classes
