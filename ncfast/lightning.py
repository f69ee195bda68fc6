"""Neural collapse as a Lightning ``Callback``: measured at the end of chosen epochs, logged.

Requires Lightning (``pip install "ncfast[lightning]"``); ``import ncfast``
never imports it.
"""
from numbers import Integral

from ncfast.torch import DEFAULT_MEMORY_BUDGET, CollapseMonitor, import_extra

Callback = import_extra("lightning.pytorch", "lightning").Callback


class NeuralCollapse(Callback):
    """Measure neural collapse at the end of every ``every_n_epochs``-th training epoch.

    ::

        trainer = Trainer(callbacks=[NeuralCollapse("model.fc", every_n_epochs=5)])

    logs ``nc/nc1``, ``nc/nc2_etf``, ... (every scalar of the report that is
    defined) through the module's logger; with several layers,
    ``nc/<layer>/nc1``, .... Each measurement is a ``CollapseMonitor.measure``
    of the LightningModule (``module(inputs)`` must run its forward) in eval
    mode; under DDP every rank measures its shard of the loader and logs the
    report of all ranks. The layer names, the classifier and ``num_classes``
    are checked against the module when the fit starts, before any training.

    Parameters
    ----------
    layer : str or list of str
        Module(s) of the LightningModule whose input is measured.
    every_n_epochs : int
        Measure after epochs n, 2n, ... (counting from 1).
    loader : re-iterable of batches, optional
        What to measure; by default the trainer's training dataloader
        (augmented rows are measured as they come; see ``CollapseMonitor``
        for what the streamed route needs).
    classifier, num_classes, clean_labels, memory_budget
        As in ``ncfast.torch.CollapseMonitor``.
    prefix : str
        Start of every logged name.

    Attributes
    ----------
    history : list of (int, report)
        Each measured epoch (Lightning's 0-based ``current_epoch``) and its
        ``CollapseReport`` (a dict of them with several layers).
    """

    def __init__(self, layer, every_n_epochs=1, *, loader=None, classifier=None,
                 num_classes=None, clean_labels=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                 prefix="nc/"):
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, Integral) or \
                every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int; found {every_n_epochs!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, the start of every logged name (\"nc/\" by "
                            f"default); found {type(prefix).__name__} {prefix!r}")
        self.layer = layer
        self.every_n_epochs = int(every_n_epochs)
        self.loader = loader
        self.monitor_options = {"classifier": classifier, "num_classes": num_classes,
                                "clean_labels": clean_labels, "memory_budget": memory_budget}
        self.prefix = prefix
        self.history = []

    def on_fit_start(self, trainer, pl_module):
        """Check the layer names, the classifier and ``num_classes`` against the module, so
        that a mistake fails before the first epoch rather than after ``every_n_epochs``."""
        # The trainer's dataloader is not set up yet; the monitor iterates its loader only
        # in measure(), so an empty list stands in for it.
        CollapseMonitor(pl_module, self.layer, [] if self.loader is None else self.loader,
                        **self.monitor_options)

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        loader = self.loader if self.loader is not None else trainer.train_dataloader
        if loader is None:
            raise ValueError("the trainer has no training dataloader; pass loader= to "
                             "NeuralCollapse")
        if self.loader is None and isinstance(loader, (dict, list, tuple)):
            raise ValueError(f"the trainer has {len(loader)} training dataloaders; pass the "
                             "one to measure as loader= to NeuralCollapse")
        monitor = CollapseMonitor(pl_module, self.layer, loader, device=pl_module.device,
                                  **self.monitor_options)
        # The trainer casts each batch to the module's precision ("16-true", "bf16-true",
        # "64-true") before its forward; the measured forward passes need the same.
        handle = pl_module.register_forward_pre_hook(
            lambda module, inputs: trainer.precision_plugin.convert_input(inputs))
        try:
            result = monitor.measure()
        finally:
            handle.remove()
        self.history.append((trainer.current_epoch, result))
        reports = result if isinstance(result, dict) else {None: result}
        logged = {}
        for layer, report in reports.items():
            start = self.prefix if layer is None else f"{self.prefix}{layer}/"
            logged.update({start + name: value for name, value in report.metrics().items()})
        # Every rank holds the same report: the maximum over ranks is that value exactly.
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=True,
                           reduce_fx="max")
