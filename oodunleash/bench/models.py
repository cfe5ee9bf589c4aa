"""Small reference classifiers for 28x28 images (Fashion-MNIST, scikit-learn digits).

These are the models the demo and the Fashion-MNIST benchmark train from scratch. Any other
``nn.Module`` classifier works with :class:`~oodunleash.OODUnleash` just as well.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MODEL_NAMES", "SmallCNN", "create_model"]

#: Names accepted by :func:`create_model`.
MODEL_NAMES: tuple[str, ...] = ("small_cnn", "resnet18")


class SmallCNN(nn.Module):
    """A small VGG-style CNN: three 3x3 conv blocks (32-64-128 channels), BatchNorm, ReLU,
    two 2x2 max-pools, global average pooling and a linear head ``fc``.

    About 94k parameters at the default width: it trains on Fashion-MNIST in seconds per epoch
    on a laptop CPU and is tiny enough to ship as a checkpoint.

    Args:
        num_classes: Number of output logits.
        in_chans: Input channels (1 for grayscale).
        width: Channels of the first block; the others are 2x and 4x this.

    Attributes:
        features: The convolutional trunk, ending in the pooled ``(batch, 4 * width)`` feature.
        fc: The linear classification head (the penultimate feature is its input).

    Example:
        >>> import torch
        >>> SmallCNN(num_classes=6)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 6])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1 or width < 1:
            raise ValueError(
                f"num_classes, in_chans and width must be positive, got {num_classes}, "
                f"{in_chans}, {width}."
            )
        c1, c2, c3 = width, 2 * width, 4 * width
        self.num_classes = num_classes
        self.num_features = c3
        self.features = nn.Sequential(
            _block(in_chans, c1),
            nn.MaxPool2d(2),
            _block(c1, c2),
            nn.MaxPool2d(2),
            _block(c2, c3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c3, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The penultimate feature, ``(batch, 4 * width)``."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


def _block(cin: int, cout: int) -> nn.Sequential:
    # No conv bias: the BatchNorm that follows has its own shift.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def create_model(name: str, num_classes: int, in_chans: int = 1) -> nn.Module:
    """Build one of the reference classifiers, randomly initialised.

    Args:
        name: ``"small_cnn"`` (:class:`SmallCNN`) or ``"resnet18"`` (timm's ResNet-18 with
            ``in_chans`` input channels; its standard stem works on 28x28 inputs).
        num_classes: Number of output logits.
        in_chans: Input channels.

    Returns:
        The model; its head is a linear layer named ``fc`` in both cases.

    Example:
        >>> create_model("small_cnn", 6).fc.out_features
        6
    """
    if name == "small_cnn":
        return SmallCNN(num_classes, in_chans)
    if name == "resnet18":
        import timm

        return timm.create_model(
            "resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
