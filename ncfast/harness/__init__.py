"""PyTorch training harness: train into the terminal phase and dump features for ncfast.

Needs the ``harness`` extra (torch, mnist1d, scikit-learn); ``import ncfast``
does not import this package, and this package imports torch only where a
model is built or trained.

- ``datasets``: MNIST-1D, scikit-learn digits, a Gaussian mixture, a user ``.npz``.
- ``noise``: symmetric and pair-flip label noise at an exact rate.
- ``models``: MLP, 1-D CNN and unconstrained-features trunks, with a (deep) linear head.
- ``losses``: cross-entropy, label smoothing, MSE on one-hot targets.
- ``training``: ``TrainConfig`` and ``train``, writing a resumable run folder.
- ``reproduce``: the three reproductions behind ``ncfast reproduce``.
"""
from ncfast.harness.datasets import DATASETS, Dataset, load_dataset
from ncfast.harness.noise import NOISE_KINDS, corrupt_labels
from ncfast.harness.training import TrainConfig, TrainResult, train

__all__ = ["DATASETS", "Dataset", "load_dataset", "NOISE_KINDS", "corrupt_labels",
           "TrainConfig", "TrainResult", "train"]
