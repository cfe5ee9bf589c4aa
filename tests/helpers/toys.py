"""The small models and data the tests train: one definition, shared by every test module.

``ConvNet`` is the toy classifier (a convolution, optional batch norm and dropout, a global mean
and a linear head), ``sequential_cnn`` the same idea as an ``nn.Sequential`` with a hidden layer;
their arguments reproduce each variant the tests need, and the layers are created in one fixed
order, so a seeded model starts from the same weights wherever it is built. ``labelled_loader`` is its data: Gaussian images whose labels are, optionally, added to
the pixels so a few epochs learn them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ConvNet(nn.Module):
    """conv 3x3 → [batch norm] → ReLU → [dropout] → mean over the image → linear.

    The layers are named ``conv``, ``bn``, ``drop`` and ``fc`` whichever are switched on (an
    ``nn.Identity`` stands in for a missing one, which has no parameters).
    """

    def __init__(
        self,
        classes: int = 3,
        *,
        channels: int = 1,
        width: int = 8,
        batchnorm: bool = True,
        dropout: float = 0.0,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=padding)
        self.bn = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


def sequential_cnn(
    channels: int,
    width: int,
    classes: int,
    *,
    hidden: int,
    pool: int = 1,
    batchnorm: bool = False,
) -> nn.Sequential:
    """conv 3x3 → [batch norm] → ReLU → average pool to ``pool`` x ``pool`` → linear →
    ReLU → linear: an ``nn.Sequential``, for the tests that name its layers by index."""
    norm = [nn.BatchNorm2d(width)] if batchnorm else []
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        *norm,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(width * pool * pool, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def labelled_loader(
    n: int = 64,
    classes: int = 3,
    size: int = 8,
    batch: int = 16,
    seed: int = 0,
    channels: int = 1,
    signal: bool = True,
) -> DataLoader:
    """``n`` seeded images and labels; with ``signal`` each label is added to its image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    if signal:
        x += y.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()``, to compare with after a call."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
