"""Training losses: cross-entropy, label smoothing, MSE on one-hot targets.

Importing this module does not import torch; building a loss does.
"""
#: Names accepted by :func:`make_loss`.
LOSSES = ("ce", "ls", "mse")

#: Label smoothing alpha used by "ls" when none is given.
DEFAULT_SMOOTHING = 0.1


def check_loss_options(name, smoothing):
    """Raise ValueError for an unknown loss or a smoothing it cannot take."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if smoothing is not None:
        if name != "ls":
            raise ValueError(f"smoothing applies to the 'ls' loss only; the loss is {name!r}")
        if not 0.0 < smoothing < 1.0:
            raise ValueError(f"label smoothing must lie in (0, 1); found {smoothing}")


def one_hot_mse(logits, labels):
    """``||logits - onehot(y)||^2 / (2 B)``: half the squared error summed over classes,
    averaged over the batch (the convention of the closed form in docs/metrics.md).

    Parameters
    ----------
    logits : float tensor of shape (B, C)
    labels : int64 tensor of shape (B,)

    Returns
    -------
    scalar tensor
    """
    from torch.nn import functional

    targets = functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return 0.5 * (logits - targets).square().sum(dim=1).mean()


def make_loss(name, smoothing=None):
    """The loss function for a name.

    Parameters
    ----------
    name : {"ce", "ls", "mse"}
        Cross-entropy; cross-entropy with label smoothing; MSE on one-hot targets.
    smoothing : float, optional
        Label smoothing alpha in (0, 1) for "ls" (default 0.1).

    Returns
    -------
    callable
        ``loss(logits of shape (B, C), labels of shape (B,))`` -> scalar tensor.
    """
    check_loss_options(name, smoothing)
    if name == "mse":
        return one_hot_mse
    from torch import nn

    return nn.CrossEntropyLoss(label_smoothing=smoothing or DEFAULT_SMOOTHING
                               if name == "ls" else 0.0)
