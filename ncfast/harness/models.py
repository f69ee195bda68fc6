"""Models: a trunk, then a linear head whose last layer is the classifier.

Every model is a :class:`Network`: a trunk (MLP, 1-D CNN or free features)
maps inputs to ``width`` features, then ``head_depth`` linear layers map those
to logits. ``Network.layers`` returns the features that ncfast measures: the
input of the classifier (``"penultimate"``) and, in a deep linear head
(``head_depth`` > 1, all layers bias-free), the trunk output (``"trunk"``)
and the outputs of the inner head layers (``"linear1"``, ...).
"""
import math

import torch
from torch import nn



class Network(nn.Module):
    """A trunk followed by a linear head.

    Parameters
    ----------
    trunk : nn.Module
        Maps a batch of inputs to features of shape (batch, width).
    width : int
        Trunk output size, also the width of the inner head layers.
    num_classes : int
    head_depth : int
        Linear layers after the trunk (L); the last is the classifier. With
        L > 1 every head layer is bias-free (a deep linear head).
    bias : bool
        Whether the classifier has a bias (only when ``head_depth`` is 1).

    Notes
    -----
    Inner head layers start orthogonal (Saxe et al. 2014), so the head keeps
    the scale of its input at any depth. With PyTorch's default (smaller)
    initialisation a deep head trained with weight decay can leave its
    minority classes at the zero local minimum (minority collapse).
    """

    def __init__(self, trunk, *, width, num_classes, head_depth=1, bias=True):
        super().__init__()
        self.trunk = trunk
        self.head = nn.ModuleList(nn.Linear(width, width, bias=False)
                                  for _ in range(head_depth - 1))
        for linear in self.head:
            nn.init.orthogonal_(linear.weight)
        self.classifier = nn.Linear(width, num_classes, bias=bias and head_depth == 1)

    def layers(self, inputs):
        """Features of every measured layer.

        Parameters
        ----------
        inputs : tensor of shape (batch, *input_shape)

        Returns
        -------
        dict of str to tensor of shape (batch, width)
            ``"penultimate"`` (the classifier's input), and with a deep head
            ``"trunk"`` and ``"linear1"`` ... ``"linear{L-2}"`` before it.
        """
        features = self.trunk(inputs)
        if not self.head:
            return {"penultimate": features}
        layers = {"trunk": features}
        for index, linear in enumerate(self.head, start=1):
            features = linear(features)
            layers[f"linear{index}"] = features
        layers["penultimate"] = layers.pop(f"linear{len(self.head)}")
        return layers

    def forward(self, inputs):
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.layers(inputs)["penultimate"])

    def end_to_end_weights(self):
        """The product ``W_L ... W_1`` of the head, of shape (num_classes, width)."""
        weights = self.classifier.weight
        for linear in reversed(self.head):
            weights = weights @ linear.weight
        return weights


def mlp_trunk(in_features, *, width, depth, batch_norm=False, bias=True):
    """``depth`` blocks of Linear → (BatchNorm) → ReLU, ``in_features`` to ``width``."""
    blocks = []
    for index in range(depth):
        blocks.append(nn.Linear(in_features if index == 0 else width, width, bias=bias))
        if batch_norm:
            blocks.append(nn.BatchNorm1d(width, affine=bias))
        blocks.append(nn.ReLU())
    return nn.Sequential(*blocks)


def conv1d_trunk(length, *, width, channels=32, batch_norm=False, bias=True):
    """Three strided Conv1d → (BatchNorm) → ReLU blocks, then Linear → ReLU to ``width``.

    Inputs of shape (batch, length), e.g. MNIST-1D's (batch, 40); each
    convolution halves the length.
    """
    blocks = [nn.Unflatten(1, (1, length))]
    for index in range(3):
        blocks.append(nn.Conv1d(1 if index == 0 else channels, channels, kernel_size=5,
                                stride=2, padding=2, bias=bias))
        if batch_norm:
            blocks.append(nn.BatchNorm1d(channels, affine=bias))
        blocks.append(nn.ReLU())
    reduced = length
    for _ in range(3):
        reduced = (reduced - 1) // 2 + 1
    blocks += [nn.Flatten(), nn.Linear(channels * reduced, width, bias=bias), nn.ReLU()]
    return nn.Sequential(*blocks)


class FreeFeatures(nn.Module):
    """Unconstrained features: one free parameter row per training sample.

    The inputs are sample indices, so ``forward(indices)`` returns the rows
    ``features[indices]`` of shape (batch, width).
    """

    def __init__(self, num_samples, width):
        super().__init__()
        self.features = nn.Parameter(torch.randn(num_samples, width))

    def forward(self, indices):
        return self.features[indices]


def build_model(name, *, input_shape, num_classes, num_train, width=256, depth=3,
                head_depth=1, batch_norm=False, bias=True):
    """Build a model by name.

    Parameters
    ----------
    name : {"mlp", "cnn", "ufm"}
        ReLU MLP; small 1-D CNN (inputs of shape (length,)); unconstrained
        features model (features as free parameters, inputs are row indices).
    input_shape : tuple of int
        Shape of one input row.
    num_classes : int
    num_train : int
        Training rows (the number of free feature rows of "ufm").
    width : int
        Feature dimension at the head's input.
    depth : int
        Hidden layers of the MLP trunk.
    head_depth : int
        Linear head layers L (L > 1: bias-free deep linear head).
    batch_norm : bool
        BatchNorm after each hidden layer (MLP, CNN).
    bias : bool
        False for a bias-free trunk and classifier.

    Returns
    -------
    Network
    """
    if name == "mlp":
        trunk = mlp_trunk(math.prod(input_shape), width=width, depth=depth,
                          batch_norm=batch_norm, bias=bias)
        trunk = nn.Sequential(nn.Flatten(), trunk)
    elif name == "cnn":
        if len(input_shape) != 1:
            raise ValueError(
                f"the cnn model reads 1-D signals of shape (length,); found input shape "
                f"{tuple(input_shape)}")
        trunk = conv1d_trunk(input_shape[0], width=width, batch_norm=batch_norm, bias=bias)
    elif name == "ufm":
        trunk = FreeFeatures(num_train, width)
    else:
        # TrainConfig.validate names the choices; only a direct call lands here.
        raise ValueError(f"unknown model {name!r}")
    return Network(trunk, width=width, num_classes=num_classes, head_depth=head_depth, bias=bias)
