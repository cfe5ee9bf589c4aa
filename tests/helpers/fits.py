"""A small fit to interrupt, and a snapshot of everything a fit may change: shared by the
tests of rollback, resume and fit's input checks."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.config import Relative
from tests.helpers.toys import ConvNet


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = ConvNet(width=6, dropout=0.3)
    net.fc.bias.requires_grad_(False)  # a frozen parameter must stay frozen
    return net.eval()  # the user's mode must come back


class Interrupt:
    """Iterates ``loader``; raises ``error`` at batch ``batch`` of pass ``at_pass`` (1-based)."""

    def __init__(self, loader, at_pass, batch, error=KeyboardInterrupt):
        self.loader, self.at_pass, self.batch, self.error = loader, at_pass, batch, error
        self.passes = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, item in enumerate(self.loader, 1):
            if (self.passes, i) == (self.at_pass, self.batch):
                raise self.error("stop")
            yield item


def snapshot(unleashed):
    """Everything a fit may change, in comparable form."""
    model = unleashed.model
    fitted = unleashed.is_fitted
    return {
        "tensors": {
            f"{n}.{k}": v.detach().clone()
            for n, m in model.named_modules()
            for k, v in [*m._parameters.items(), *m._buffers.items()]
            if v is not None
        },
        "modes": [m.training for m in model.modules()],
        "classes": [type(m) for m in model.modules()],
        "masked": ["_oodunleash_mask" in m.__dict__ for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "is_fitted": fitted,
        "xi": getattr(unleashed, "loss_constraint_", "unset"),
        "history": copy.deepcopy(getattr(unleashed, "history_", None)),
        "train_config": getattr(unleashed, "train_config_", None),
        "masks": unleashed.masks_,
        "scores": dict(unleashed.fitted_scores_),
        "results": unleashed.last_results_,
        "sparsity": unleashed.sparsity() if fitted else None,
    }


def assert_same(before, after):
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
    for key in ("modes", "classes", "masked", "requires_grad", "is_fitted", "xi", "history"):
        assert before[key] == after[key], key
    assert all(a is b for a, b in zip(before["grads"], after["grads"], strict=True))
    for key in ("train_config", "masks", "results"):
        assert before[key] is after[key], key
    assert before["scores"].keys() == after["scores"].keys()
    assert all(before["scores"][k] is after["scores"][k] for k in before["scores"])
    assert before["sparsity"] == after["sparsity"]


def wrapper(method, prefitted, data):
    unleashed = OODUnleash(make_net(), method, constraint=Relative(0.3), seed=1)
    if prefitted:
        unleashed.fit(DataLoader(data, batch_size=16), epochs=1, progress=False)
        unleashed.fit_scores(DataLoader(data, batch_size=32), ["msp", "knn"], progress=False)
        unleashed.evaluate(
            DataLoader(data, batch_size=32),
            {"noise": DataLoader(TensorDataset(torch.randn(16, 1, 6, 6)), batch_size=16)},
            progress=False,
        )
        unleashed.model.eval()
    return unleashed
