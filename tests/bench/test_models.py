"""The reference classifiers in oodunleash.bench.models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodunleash import OODUnleash
from oodunleash.bench.models import MODEL_NAMES, SmallCNN, create_model


def test_small_cnn_shapes_and_head():
    net = SmallCNN(num_classes=6)
    x = torch.randn(3, 1, 28, 28)
    assert net(x).shape == (3, 6)
    assert net.forward_features(x).shape == (3, 128)
    assert isinstance(net.fc, nn.Linear) and net.fc.in_features == net.num_features == 128
    # Small enough to ship as a < 1 MB float32 checkpoint.
    assert sum(p.numel() for p in net.parameters()) * 4 < 1_000_000


def test_small_cnn_width_and_channels():
    net = SmallCNN(num_classes=3, in_chans=3, width=8)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert net.num_features == 32


def test_small_cnn_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        SmallCNN(num_classes=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_create_model(name):
    net = create_model(name, num_classes=4)
    net.eval()
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    assert isinstance(net.fc, nn.Linear)


def test_create_model_unknown():
    with pytest.raises(ValueError, match="small_cnn"):
        create_model("vgg99", 10)


def test_small_cnn_works_with_umap():
    net = SmallCNN(num_classes=3, width=4)
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 3, (8,))) for _ in range(2)]
    unleashed = OODUnleash(net, method="umap", constraint=0.5).fit(
        data, epochs=1, progress=False, training={"schedule": "constant"}
    )
    # The UMAP default keeps 90% of the masked weights, under one threshold for the model.
    assert unleashed.sparsity() == pytest.approx(0.1, abs=0.01)
