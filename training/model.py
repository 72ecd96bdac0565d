"""The nets: a CNN (the shipped model) and the lab's fully connected MLP, both
with BatchNorm before each hidden activation and Dropout in the dense part.
``batch_norm=False`` builds the same net without BatchNorm (the study's control).
"""

from __future__ import annotations

from collections.abc import Sequence

from mxnet.gluon import HybridBlock, nn

ARCHS = ("cnn", "mlp")


def _conv_block(net: nn.HybridSequential, channels: int, batch_norm: bool) -> None:
    # With BatchNorm the conv bias is redundant (BN's beta shifts the same way).
    net.add(nn.Conv2D(channels, kernel_size=3, use_bias=not batch_norm))
    if batch_norm:
        net.add(nn.BatchNorm())
    net.add(nn.Activation("relu"))


def _dense_block(
    net: nn.HybridSequential, units: int, batch_norm: bool, activation: str, dropout: float
) -> None:
    net.add(nn.Dense(units, use_bias=not batch_norm))
    if batch_norm:
        net.add(nn.BatchNorm())
    net.add(nn.Activation(activation))
    if dropout > 0:
        net.add(nn.Dropout(dropout))


def build_net(
    arch: str = "cnn",
    batch_norm: bool = True,
    dropout: float = 0.5,
    *,
    hidden: Sequence[int] | None = None,
    activation: str = "relu",
    num_classes: int = 10,
) -> HybridBlock:
    """A fresh, uninitialized HybridBlock taking (N, 1, 28, 28) float32.

    - ``cnn``: 2 x [conv3x3 32 -> conv3x3 32 -> maxpool] with 64 in the second,
      each conv followed by BatchNorm then ReLU; a dense block of ``hidden[0]``
      (default 256) units with BatchNorm, ReLU and Dropout; the classifier.
    - ``mlp``: the lab's net: dense hidden layers (default 256, 128), each
      Dense -> BatchNorm -> activation -> Dropout; the classifier.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    net = nn.HybridSequential()
    with net.name_scope():
        if arch == "cnn":
            for channels in (32, 64):
                _conv_block(net, channels, batch_norm)
                _conv_block(net, channels, batch_norm)
                net.add(nn.MaxPool2D(pool_size=2))
            net.add(nn.Flatten())
            for units in hidden or (256,):
                _dense_block(net, units, batch_norm, activation, dropout)
        else:
            net.add(nn.Flatten())
            for units in hidden or (256, 128):
                _dense_block(net, units, batch_norm, activation, dropout)
        net.add(nn.Dense(num_classes))
    return net
