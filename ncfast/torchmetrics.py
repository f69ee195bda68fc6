"""Neural collapse as a torchmetrics ``Metric``, for code that computes metrics that way.

Requires torchmetrics (``pip install "ncfast[torchmetrics]"``); ``import ncfast``
never imports it.
"""
from numbers import Integral

import torch
from torch import nn

from ncfast.api import collapse
from ncfast.errors import raise_bad_row
from ncfast.inputs import holds_class_indices, plain_tensor
from ncfast.kernels.cpu import MAX_RESIDUAL_NORM
from ncfast.torch import import_extra, measurable

torchmetrics = import_extra("torchmetrics", "torchmetrics")
dim_zero_cat = import_extra("torchmetrics.utilities", "torchmetrics").dim_zero_cat


class NeuralCollapse(torchmetrics.Metric):
    """Neural-collapse metrics of the features passed to ``update``.

    ::

        metric = NeuralCollapse(num_classes=10, classifier=model.fc)
        for inputs, labels in loader:
            metric.update(penultimate_features(inputs), labels)
        metric.compute()        # {"nc1": tensor(...), "nc2_etf": ..., ...}

    Memory: the two passes need the class means before the residuals, so the
    metric holds every row it is given until ``reset()``: N×D values in the
    metric's dtype (float32 unless ``set_dtype``: 4·N·D bytes, e.g. 102 MB
    for 50,000 × 512) on the features' device, plus 8 bytes per label.
    ``compute_on_cpu=True`` (a torchmetrics option) moves them to host memory
    after each ``update``. Across processes the states sync the torchmetrics
    way (``"cat"``): at ``compute`` every process receives every process's
    rows, so each holds the rows of all of them. ``ncfast.torch.CollapseMonitor``
    streams instead, holding nothing beyond a memory budget.

    Parameters
    ----------
    num_classes : int
        C; labels are class indices in [0, C).
    classifier : nn.Linear, optional
        Enables NC3, NC4 and accuracy; its weight and bias are read at each
        ``compute``. The metric refers to it without owning it: it is not a
        submodule, so the metric never moves or saves it, and deep copies of
        the metric (``clone()``, also within a copied model) refer to the same one.
    label_noise : bool
        ``update`` takes the clean labels too (memorization, dilation, ...).
    **kwargs
        torchmetrics options (``compute_on_cpu``, ``sync_on_compute``, ...).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_classes, *, classifier=None, label_noise=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) \
                or num_classes < 2:
            raise ValueError(f"num_classes must be an int of at least 2; found {num_classes!r}")
        num_classes = int(num_classes)
        if classifier is not None and not isinstance(classifier, nn.Linear):
            raise TypeError(f"classifier must be an nn.Linear; found {type(classifier).__name__}")
        if classifier is not None and classifier.out_features != num_classes:
            raise ValueError(f"classifier has {classifier.out_features} outputs but num_classes "
                             f"is {num_classes}")
        self.num_classes = num_classes
        self.label_noise = label_noise
        self._classifier = _Shared(classifier)
        # Rows are kept flattened (1-D states), so that a process without rows, whose
        # states torchmetrics sends as empty 1-D tensors, can be gathered with the others.
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("num_features", default=torch.tensor(0), dist_reduce_fx="max")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        if label_noise:
            self.add_state("clean_labels", default=[], dist_reduce_fx="cat")

    @property
    def classifier(self):
        """The ``nn.Linear`` given at construction (shared by copies of the metric), or None."""
        return self._classifier.target

    def update(self, features, labels, clean_labels=None):
        """Add a batch of rows (copied: a buffer reused for the next batch does not
        change them).

        Parameters
        ----------
        features : tensor of shape (n, D)
        labels : int tensor of shape (n,)
        clean_labels : int tensor of shape (n,)
            Required exactly when the metric was built with ``label_noise=True``.

        Raises
        ------
        ValueError
            As ``ncfast.collapse`` words it, for the first row (counted within the
            batch) whose label or clean label is outside [0, C) or whose features are
            not finite in the metric's dtype, or for a tensor on the meta device. A
            refused batch adds no row.
        """
        stored, rows = self._checked(features, labels, clean_labels)
        for name, values in rows.items():
            getattr(self, name).append(values)
        self.features.append(stored.reshape(-1))
        self.num_features = torch.tensor(stored.shape[1], device=stored.device)

    def _checked(self, features, labels, clean_labels):
        """A batch as ``update`` keeps it, or ``update``'s error for it.

        Returns
        -------
        stored : tensor of shape (n, D)
            A copy of the features in the metric's dtype.
        rows : dict of str to int64 tensor of shape (n,)
            Copies of the labels (and clean labels), by the name of their state.
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch tensor; found {type(features).__name__}: "
                            "convert with torch.as_tensor(features)")
        features = plain_tensor(features, "features")
        if features.ndim != 2:
            raise ValueError(f"features must be 2-D (n, D); found shape {tuple(features.shape)}: "
                             "flatten them with features.reshape(len(features), -1)")
        if not features.is_floating_point():
            raise TypeError(f"features must be floating point; found dtype {features.dtype}")
        if self.label_noise != (clean_labels is not None):
            raise ValueError("pass clean_labels with every update exactly when label_noise=True")
        if int(self.num_features) not in (0, features.shape[1]):
            raise ValueError(f"features have {features.shape[1]} columns but earlier updates "
                             f"had {int(self.num_features)}")
        rows = {"labels": labels} if clean_labels is None else \
            {"labels": labels, "clean_labels": clean_labels}
        checked = {}
        for name, values in rows.items():
            if isinstance(values, torch.Tensor):
                values = plain_tensor(values, name)
            values = torch.as_tensor(values, device=features.device)
            if values.shape != (len(features),) or not holds_class_indices(values):
                raise ValueError(f"{name} must be integers of shape ({len(features)},); found "
                                 f"dtype {values.dtype}, shape {tuple(values.shape)}")
            checked[name] = values.to(torch.int64, copy=True)
        stored = features.detach().to(self.dtype, copy=True)
        _refuse_bad_rows(features, stored, checked["labels"], checked.get("clean_labels"),
                         self.num_classes)
        return stored, checked

    def sync(self, *args, **kwargs):
        """torchmetrics' ``Metric.sync``; a process without rows first adds zero-row
        states of the right dtypes (torchmetrics would send float labels)."""
        if isinstance(self.labels, list) and not self.labels:
            self.features.append(torch.empty(0, dtype=self.dtype, device=self.device))
            self.labels.append(torch.empty(0, dtype=torch.int64, device=self.device))
            if self.label_noise:
                self.clean_labels.append(torch.empty(0, dtype=torch.int64, device=self.device))
        super().sync(*args, **kwargs)

    def forward(self, features, labels, clean_labels=None):
        """Add a batch of rows (``update``) and return the metrics of that batch alone.

        Unlike torchmetrics' default ``forward``, which resets the state to measure
        the batch and then merges the earlier rows back, the batch is measured from
        its own rows: a batch that cannot be measured alone leaves every row in
        place, a batch of another width is refused as ``update`` refuses it, and
        classes without rows in the batch are not warned about. With
        ``dist_sync_on_step=True`` torchmetrics' ``forward`` runs.

        Returns
        -------
        dict of str to float64 tensor
            As ``compute``, of this batch's rows; empty when the batch alone has no
            metrics: fewer than two classes have rows in it (a short last batch,
            say), or, with label noise, fewer than two have clean rows (label equal
            to clean label). Its rows are added all the same.

        Raises
        ------
        ValueError
            As ``update``, or as ``ncfast.collapse`` words it when the batch's rows
            cannot be measured otherwise (its class means coincide, say). A refused
            batch adds no row.
        """
        if self.dist_sync_on_step:
            return super().forward(features, labels, clean_labels)
        # Measured before update keeps the rows (checking them again), so that a batch
        # that raises adds none.
        stored, rows = self._checked(features, labels, clean_labels)
        batch_labels, batch_clean = rows["labels"], rows.get("clean_labels")
        # The labels of which the batch alone needs two classes: those of its clean rows,
        # whose class means memorization and dilation compare, with label noise.
        needed = batch_labels if batch_clean is None else \
            batch_labels[batch_labels == batch_clean]
        self._forward_cache = {}
        if len(needed.unique()) >= 2:
            self._forward_cache = self._metrics(stored, batch_labels, batch_clean,
                                                empty_classes="ignore")
        self.update(features, labels, clean_labels)
        return self._forward_cache

    def compute(self):
        """The scalar metrics of every row added since the last ``reset``.

        Returns
        -------
        dict of str to float64 tensor
            ``CollapseReport.metrics()``: the metrics defined for these inputs.
        """
        labels = dim_zero_cat(self.labels)
        if len(labels) == 0:
            raise ValueError("NeuralCollapse.compute() before any update(); add rows first")
        clean = dim_zero_cat(self.clean_labels) if self.label_noise else None
        features, width = dim_zero_cat(self.features), int(self.num_features)
        # The gathered rows are flat; only rows of one width make the widest processes' D
        # per row (processes of several widths gave rows cut at another width).
        if features.numel() != len(labels) * width:
            raise ValueError(
                f"the processes updated with features of different widths: {len(labels)} rows "
                f"hold {features.numel()} values, not {len(labels)} × {width} (the widest); "
                "every process must pass features of the same layer")
        return self._metrics(features.reshape(len(labels), width), labels, clean)

    def _metrics(self, features, labels, clean, **options):
        """``CollapseReport.metrics()`` of these rows as float64 tensors; ``options`` go
        to ``ncfast.collapse``."""
        features = measurable(features)
        weights = bias = None
        if self.classifier is not None:
            weights = self.classifier.weight.detach()
            bias = None if self.classifier.bias is None else self.classifier.bias.detach()
        report = collapse(features, labels.to(features.device),
                          clean_labels=None if clean is None else clean.to(features.device),
                          num_classes=self.num_classes, weights=weights, bias=bias, **options)
        return {name: torch.tensor(value, dtype=torch.float64)
                for name, value in report.metrics().items()}


def _refuse_bad_rows(features, stored, labels, clean_labels, num_classes):
    """Raise ``ncfast.collapse``'s error for the first bad row of a batch, if any.

    Parameters
    ----------
    features : tensor of shape (n, D)
        The batch as given (its bad row is quoted from it).
    stored : tensor of shape (n, D)
        The batch in the metric's dtype: a value that overflows it is not finite there.
    labels, clean_labels : int64 tensors of shape (n,) (clean labels may be None)
    num_classes : int
    """
    bad = ~torch.isfinite(stored).all(dim=1)
    for values in (labels, clean_labels):
        if values is not None:
            bad |= (values < 0) | (values >= num_classes)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        rows = slice(row, row + 1)
        largest = features[row].detach().abs().max().item()
        # Within what ncfast measures (MAX_RESIDUAL_NORM), but not within the metric's dtype.
        if largest < MAX_RESIDUAL_NORM and not torch.isfinite(stored[row]).all():
            raise ValueError(
                f"row {row} has a value of magnitude {largest:.4g}, beyond the metric's dtype "
                f"{str(stored.dtype).removeprefix('torch.')} (largest "
                f"{torch.finfo(stored.dtype).max:.4g}): give the metric a wider dtype "
                "(metric.set_dtype(torch.float32)) or rescale the features")
        raise_bad_row(row, labels[rows].cpu(),
                      None if clean_labels is None else clean_labels[rows].cpu(),
                      features[rows].detach().double().cpu(), num_classes=num_classes)


class _Shared:
    """Holds an object that deep copies of its holder share instead of copying.

    ``Metric.clone()`` and ``MetricCollection.clone(prefix=...)`` deep-copy a
    metric; its classifier must stay the model's own, whose weights train on.
    (Pickling copies it, as it copies the model.)
    """

    def __init__(self, target):
        self.target = target

    def __deepcopy__(self, memo):
        return self
