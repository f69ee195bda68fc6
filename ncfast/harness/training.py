"""Train into the terminal phase and dump features at log-spaced epochs.

``train(config, out)`` validates every option, builds the data (with label
noise), the model, the loss and an SGD optimizer, and trains with a cosine
learning-rate schedule. At log-spaced epochs it writes a checkpoint of the
run folder (``ncfast.dumps``): train and test features of every measured
layer, the classifier's weights and bias, noisy and clean labels. After each
checkpoint it saves the training state (model, optimizer, schedule, shuffling
generator) atomically, so an interrupted run resumes where its last
checkpoint left off and gives the same result as an uninterrupted one.
"""
import dataclasses
import io
import math
import os
import pickle
import sys
from dataclasses import dataclass, field

import numpy as np

from ncfast.dumps import check_output_folder
from ncfast.harness.datasets import check_dataset_options, load_dataset
from ncfast.harness.losses import check_loss_options
from ncfast.harness.noise import check_noise_options

#: Model names (``ncfast.harness.models.build_model``).
MODELS = ("mlp", "cnn", "ufm")

#: File in the run folder holding the state to resume from.
TRAINING_STATE = "training_state.pt"

#: Rows per forward pass when features are extracted.
EXTRACT_BATCH = 4096

#: Seeds lie in [0, SEED_LIMIT): MNIST-1D seeds numpy's legacy generator, which takes no more.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class TrainConfig:
    """Every option of one training run (stored in the run folder's manifest).

    Attributes
    ----------
    dataset : {"mnist1d", "digits", "gaussian", "npz"}
    num_samples, num_features, num_classes, class_counts, data_path, balanced
        Dataset options (see ``ncfast.harness.datasets.load_dataset``).
    model : {"mlp", "cnn", "ufm"}
    width : int
        Feature dimension at the head's input.
    depth : int
        Hidden layers of the MLP trunk.
    head_depth : int
        Linear head layers L; L > 1 makes a bias-free deep linear head.
    batch_norm : bool
    bias : bool
        False for a bias-free network.
    loss : {"ce", "ls", "mse"}
    smoothing : float, optional
        Label smoothing alpha for "ls" (default 0.1).
    noise : float
        Fraction of training labels corrupted, in [0, 1).
    noise_kind : {"symmetric", "pair"}
    epochs : int
    batch_size : int, optional
        None trains full-batch.
    lr, momentum : float
        SGD with momentum; the learning rate follows a cosine schedule to 0.
    weight_decay : float
        L2 penalty ``weight_decay / 2 * ||theta||^2`` on the network's parameters.
    feature_decay : float, optional
        "ufm" only: penalty on the free features (default ``weight_decay``).
    feature_lr : float, optional
        "ufm" only: learning rate of the free features (default ``lr`` times
        the training rows, because the loss averages over rows while each
        feature row sees only its own gradient).
    checkpoints : int
        Log-spaced epochs at which features are dumped (the last is ``epochs``).
    seed : int
        In [0, 2**32).
    """

    dataset: str = "mnist1d"
    num_samples: int | None = None
    num_features: int | None = None
    num_classes: int | None = None
    class_counts: tuple | None = None
    data_path: str | None = None
    balanced: bool = False
    model: str = "mlp"
    width: int = 256
    depth: int = 3
    head_depth: int = 1
    batch_norm: bool = False
    bias: bool = True
    loss: str = "ce"
    smoothing: float | None = None
    noise: float = 0.0
    noise_kind: str = "symmetric"
    epochs: int = 200
    batch_size: int | None = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    feature_decay: float | None = None
    feature_lr: float | None = None
    checkpoints: int = 10
    seed: int = 0

    def to_dict(self):
        """JSON-safe dict of every option."""
        config = dataclasses.asdict(self)
        if config["class_counts"] is not None:
            config["class_counts"] = [int(count) for count in config["class_counts"]]
        return config

    def validate(self):
        """Raise ValueError (bad value) or TypeError (bad type) for any unusable option."""
        for name, kinds in OPTION_TYPES.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise TypeError(f"option {name} must be of type "
                                f"{' or '.join(kind.__name__ for kind in kinds)}; found {value!r}")
        if self.class_counts is not None and not all(
                isinstance(count, (int, np.integer)) for count in self.class_counts):
            raise TypeError(f"class_counts must be integers; found {self.class_counts!r}")
        check_dataset_options(self.dataset, num_samples=self.num_samples,
                              num_features=self.num_features, num_classes=self.num_classes,
                              class_counts=self.class_counts, path=self.data_path,
                              balanced=self.balanced)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        check_loss_options(self.loss, self.smoothing)
        check_noise_options(self.noise, self.noise_kind)
        for name in ("width", "depth", "head_depth", "epochs", "checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; found {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (or None for full batch); found "
                             f"{self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be positive and finite; found {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1); found {self.momentum}")
        for name in ("weight_decay", "feature_decay", "feature_lr"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"{name} must be non-negative and finite; found {value}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must lie in [0, 2**32); found {self.seed}")
        if self.model != "ufm":
            for name in ("feature_decay", "feature_lr"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to the unconstrained-features model "
                                     f"(model='ufm') only; the model is {self.model!r}")
        elif self.batch_norm:
            raise ValueError("batch_norm does not apply to the unconstrained-features model")


#: Type of each option (ints are accepted where floats are).
OPTION_TYPES = {
    "dataset": (str,), "num_samples": (int,), "num_features": (int,), "num_classes": (int,),
    "class_counts": (tuple, list), "data_path": (str,), "balanced": (bool,), "model": (str,),
    "width": (int,), "depth": (int,), "head_depth": (int,), "batch_norm": (bool,), "bias": (bool,),
    "loss": (str,), "smoothing": (float, int), "noise": (float, int), "noise_kind": (str,),
    "epochs": (int,), "batch_size": (int,), "lr": (float, int), "momentum": (float, int),
    "weight_decay": (float, int), "feature_decay": (float, int), "feature_lr": (float, int),
    "checkpoints": (int,), "seed": (int,)}

#: Options that may be None.
OPTIONAL = ("num_samples", "num_features", "num_classes", "class_counts", "data_path",
            "smoothing", "batch_size", "feature_decay", "feature_lr")


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes
    ----------
    path : str
        The run folder.
    model : torch.nn.Module
        The trained ``Network``.
    train_accuracy : float
        Accuracy on the (noisy) training labels at the last epoch.
    clean_train_accuracy : float
        Accuracy on the clean training labels.
    test_accuracy : float or None
        Accuracy on the test split (None for "ufm", which has no test inputs).
    terminal_epoch : int or None
        First checkpoint epoch with zero training error on the noisy labels
        (the terminal phase), or None if the run never reached it.
    dumped_epochs : list of int
    """

    path: str
    model: object
    train_accuracy: float
    clean_train_accuracy: float
    test_accuracy: float | None
    terminal_epoch: int | None
    dumped_epochs: list = field(default_factory=list)


def log_spaced_epochs(epochs, count):
    """Up to ``count`` distinct epochs in [1, epochs], log-spaced, ending at ``epochs``.

    Returns
    -------
    list of int, ascending
    """
    points = np.unique(np.round(np.logspace(0, math.log10(epochs), count)).astype(int))
    return [int(epoch) for epoch in points]


def train(config, out, *, progress=True, threads=1, device="cpu"):
    """Train one run and dump its features into the run folder ``out``.

    Parameters
    ----------
    config : TrainConfig
    out : str or PathLike
        Run folder; created once the dataset has loaded. An existing run
        folder of the same config is resumed from its last checkpoint.
    progress : bool
        Show a progress bar with the running loss and accuracy.
    threads : int
        Torch CPU threads while training (restored afterwards). The harness's
        models are small: their GEMMs run fastest on one thread, and several
        threads on busy cores can be tens of times slower.
    device : str
        Torch device to train on ("cpu", "cuda", "cuda:1"). Features and
        weights are dumped from the host either way; only CPU training is
        bitwise reproducible.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError, TypeError
        For a bad option, a dataset that does not fit the model, or an
        unwritable output folder — before any training.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; found {type(config).__name__}")
    config.validate()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int; found {threads!r}")
    device = check_device(device)
    out = os.fspath(out)
    check_output_folder(out, what="run folder", create=False)

    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(config, out, progress, device)
    finally:
        torch.set_num_threads(previous_threads)


def check_device(device):
    """The ``torch.device`` named ``device``, or ValueError when torch cannot use it."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown torch device {device!r} ({error}); use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a cpu or cuda device; found {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    return device


def _train(config, out, progress, device):
    import torch
    from tqdm.auto import tqdm

    from ncfast.dumps import RunWriter, write_atomically
    from ncfast.harness.losses import make_loss
    from ncfast.harness.models import build_model
    from ncfast.harness.noise import corrupt_labels

    data = load_dataset(config.dataset, num_samples=config.num_samples,
                        num_features=config.num_features, num_classes=config.num_classes,
                        class_counts=config.class_counts, path=config.data_path,
                        balanced=config.balanced, seed=config.seed)
    check_batches(config, data.y_train.size)
    noisy_labels = corrupt_labels(data.y_train, config.noise, num_classes=data.num_classes,
                                  kind=config.noise_kind, seed=config.seed)
    check_clean_rows(config.noise, data.y_train, noisy_labels)
    torch.manual_seed(config.seed)
    model = build_model(config.model, input_shape=data.input_shape,
                        num_classes=data.num_classes, num_train=data.y_train.size,
                        width=config.width, depth=config.depth, head_depth=config.head_depth,
                        batch_norm=config.batch_norm, bias=config.bias).to(device)
    writer = RunWriter(out, config=config.to_dict(), num_classes=data.num_classes)

    clean_labels = data.y_train if config.noise > 0 else None
    splits = {"train": (_inputs(config, data.x_train).to(device), noisy_labels, clean_labels)}
    if config.model != "ufm":  # free features exist for the training rows only
        splits["test"] = (torch.from_numpy(data.x_test).to(device), data.y_test, None)
    train_inputs = splits["train"][0]
    train_targets = torch.from_numpy(noisy_labels).to(device)
    loss_function = make_loss(config.loss, config.smoothing)
    optimizer = _optimizer(config, model, num_train=train_targets.numel())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    shuffling = torch.Generator().manual_seed(config.seed)

    state_path = os.path.join(out, TRAINING_STATE)
    start_epoch, terminal_epoch = 0, None
    if os.path.exists(state_path):
        start_epoch, terminal_epoch = _resume(state_path, model, optimizer, schedule, shuffling)

    dump_epochs = log_spaced_epochs(config.epochs, config.checkpoints)
    batch_size = config.batch_size or train_targets.numel()
    description = f"{config.model}/{config.loss} noise={config.noise:g}"
    # A bar on a terminal; in a log (not a terminal) one plain line per dumped checkpoint.
    bar_shown = progress and sys.stderr.isatty()
    bar = tqdm(range(start_epoch + 1, config.epochs + 1), initial=start_epoch,
               total=config.epochs, desc=description, unit="epoch", disable=not bar_shown)
    accuracies = {}
    for epoch in bar:
        loss, accuracy = _train_epoch(model, loss_function, optimizer, train_inputs,
                                      train_targets, batch_size, shuffling)
        schedule.step()
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}")
        if epoch not in dump_epochs:
            continue
        if progress and not bar_shown:
            print(f"{description}: epoch {epoch}/{config.epochs}, loss {loss:.4f}, train "
                  f"accuracy {accuracy:.4f}; dumping features", file=sys.stderr, flush=True)
        dumped, accuracies = _extract(model, splits)
        if epoch not in writer.checkpoints():
            writer.write_checkpoint(
                epoch, dumped, weights=_numpy(model.classifier.weight),
                bias=None if model.classifier.bias is None else _numpy(model.classifier.bias),
                classifier_layer="penultimate")
        if terminal_epoch is None and accuracies["train"] == 1.0:
            terminal_epoch = epoch
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "shuffling": shuffling.get_state(),
                 "epoch": epoch, "terminal_epoch": terminal_epoch}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomically(state_path, lambda stream: stream.write(buffer.getvalue()))
    bar.close()
    if not accuracies:  # resumed a finished run: measure the final model
        _, accuracies = _extract(model, splits)
    return TrainResult(path=out, model=model, train_accuracy=accuracies["train"],
                       clean_train_accuracy=accuracies.get("train_clean", accuracies["train"]),
                       test_accuracy=accuracies.get("test"), terminal_epoch=terminal_epoch,
                       dumped_epochs=writer.checkpoints())


def check_batches(config, num_train):
    """Raise ValueError when the MLP's BatchNorm would be given a batch of one row.

    BatchNorm cannot normalise a single row in training mode (a convolution's
    BatchNorm can: it also averages over positions).

    Parameters
    ----------
    config : TrainConfig
    num_train : int
        Training rows.
    """
    if config.model != "mlp" or not config.batch_norm:
        return
    batch_size = config.batch_size or num_train
    if 1 in (min(batch_size, num_train), num_train % batch_size):
        raise ValueError(
            f"batch_norm needs at least 2 rows in every batch, but batch_size {batch_size} "
            f"leaves a batch of 1 row of the {num_train} training rows; choose another batch "
            "size")


def check_clean_rows(noise, clean_labels, noisy_labels):
    """Raise ValueError when label noise leaves uncorrupted rows in fewer than 2 classes.

    The label-noise metrics that ``ncfast analyze`` measures on a noisy run
    (memorization, dilation) compare the means of the clean rows' classes.

    Parameters
    ----------
    noise : float
        The noise rate (0: nothing to check).
    clean_labels, noisy_labels : int arrays of shape (N,)
    """
    clean_classes = np.unique(clean_labels[noisy_labels == clean_labels]).size
    if noise > 0 and clean_classes < 2:
        raise ValueError(
            f"noise {noise} leaves uncorrupted rows in {clean_classes} class(es) of the "
            f"{clean_labels.size} training rows, and the label-noise metrics compare the means "
            "of at least 2 classes' clean rows: lower the noise rate or give more samples")


def _resume(state_path, model, optimizer, schedule, shuffling):
    """Load the saved training state into the training objects.

    Returns
    -------
    epoch, terminal_epoch : int, int or None
        The epoch the state was saved after, and the terminal epoch seen by then.

    Raises
    ------
    ValueError
        When the file cannot be read as this run's training state.
    """
    import torch

    try:
        # On the host: the shuffling state must stay there; the loads below move the rest.
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        shuffling.set_state(state["shuffling"])
        return state["epoch"], state["terminal_epoch"]
    except (RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{state_path}: not a readable training state of this run ({reason}); the file "
            "is corrupt: delete it to train the run again from its start (the checkpoints "
            "dumped so far are kept)") from None


def _inputs(config, rows):
    """Training inputs as a tensor: the rows, or their indices for free features."""
    import torch

    return torch.arange(len(rows)) if config.model == "ufm" else torch.from_numpy(rows)


def _optimizer(config, model, *, num_train):
    import torch

    if config.model != "ufm":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    features = model.trunk.features
    others = [parameter for parameter in model.parameters() if parameter is not features]
    feature_decay = config.weight_decay if config.feature_decay is None else config.feature_decay
    feature_lr = config.lr * num_train if config.feature_lr is None else config.feature_lr
    return torch.optim.SGD(
        [{"params": [features], "lr": feature_lr, "weight_decay": feature_decay},
         {"params": others, "weight_decay": config.weight_decay}],
        lr=config.lr, momentum=config.momentum)


def _train_epoch(model, loss_function, optimizer, inputs, targets, batch_size, shuffling):
    """One pass over the training rows in shuffled batches.

    Returns
    -------
    loss, accuracy : float
        Averaged over the epoch's batches, as the model trained.
    """
    import torch

    model.train()
    order = torch.randperm(targets.numel(), generator=shuffling).to(targets.device)
    total_loss = correct = 0.0
    for batch in order.split(batch_size):
        logits = model(inputs[batch])
        loss = loss_function(logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * batch.numel()
        correct += (logits.argmax(dim=1) == targets[batch]).sum().item()
    return total_loss / targets.numel(), correct / targets.numel()


def _extract(model, splits):
    """Features of every layer for each split, in eval mode (``ncfast.torch.capture``).

    Parameters
    ----------
    splits : dict
        ``{split: (inputs, labels, clean_labels or None)}``.

    Returns
    -------
    dumped : dict
        ``{split: {"features": {layer: float32 array of shape (N, D)},
        "labels": ..., "clean_labels": ...}}`` as ``RunWriter`` takes it.
    accuracies : dict of str to float
        Classifier accuracy per split against its labels, and
        ``"train_clean"`` against the clean training labels.
    """
    import torch

    from ncfast.torch import capture

    modules = _layer_modules(model)
    dumped, accuracies = {}, {}
    for split, (inputs, labels, clean_labels) in splits.items():
        batches = list(zip(inputs.split(EXTRACT_BATCH),
                           torch.from_numpy(labels).split(EXTRACT_BATCH)))
        captured = capture(model, list(modules.values()), batches).features
        with torch.no_grad():
            predicted = model.classifier(captured["classifier"]).argmax(dim=1).cpu().numpy()
        dumped[split] = {"features": {name: captured[module].cpu().numpy()
                                      for name, module in modules.items()},
                         "labels": labels, "clean_labels": clean_labels}
        accuracies[split] = float(np.mean(predicted == labels))
        if clean_labels is not None:
            accuracies[f"{split}_clean"] = float(np.mean(predicted == clean_labels))
    return dumped, accuracies


def _layer_modules(model):
    """``{layer: module}``: the module of ``model`` whose input is each layer that
    ``Network.layers`` names (the trunk output feeds ``head.0``, ``linear{i}`` feeds
    ``head.{i}``, the penultimate features feed the classifier)."""
    modules = {"trunk": "head.0"} if len(model.head) else {}
    modules.update({f"linear{index}": f"head.{index}" for index in range(1, len(model.head))})
    return modules | {"penultimate": "classifier"}


def _numpy(parameter):
    return parameter.detach().cpu().numpy().copy()
