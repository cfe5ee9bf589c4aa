"""fit is all or nothing (oodunleash.finetune.rollback): interrupted, diverged or refused, it leaves the
model and the wrapper as they were."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from oodunleash import OODUnleash, TrainingDivergedError
from oodunleash.config import Relative
from oodunleash.evaluation.evaluator import Evaluator
from tests.helpers.fits import Interrupt, assert_same, dataset, make_net, snapshot, wrapper
from tests.helpers.toys import ConvNet, labelled_loader, state_copy

# The relative ξ reads the data once before training: pass 1 is ξ, pass 2 epoch 1, pass 3 epoch 2.
POINTS = {
    "xi estimate": (1, 1, KeyboardInterrupt),
    "epoch 1 batch 2": (2, 2, KeyboardInterrupt),
    "epoch 2": (3, 3, KeyboardInterrupt),
    "loader error": (3, 1, OSError),
}


@pytest.mark.parametrize("prefitted", [False, True], ids=["fresh", "refit"])
@pytest.mark.parametrize("method", ["um", "umap"])
@pytest.mark.parametrize("point", list(POINTS))
def test_interrupted_fit_changes_nothing(point, method, prefitted):
    data = dataset()
    unleashed = wrapper(method, prefitted, data)
    before = snapshot(unleashed)
    at_pass, batch, error = POINTS[point]
    with pytest.raises(error):
        unleashed.fit(
            Interrupt(DataLoader(data, batch_size=16), at_pass, batch, error),
            epochs=2,
            progress=False,
        )
    assert_same(before, snapshot(unleashed))
    if prefitted and method == "umap":
        assert unleashed.masks_.is_attached and unleashed.sparsity() > 0


@pytest.mark.parametrize("prefitted", [False, True], ids=["fresh", "refit"])
@pytest.mark.parametrize("method", ["um", "umap"])
def test_interrupt_during_bookkeeping_after_training_changes_nothing(
    method, prefitted, monkeypatch
):
    data = dataset()
    unleashed = wrapper(method, prefitted, data)
    before = snapshot(unleashed)

    def interrupted(self):
        raise KeyboardInterrupt

    # reset() runs after loss_constraint_, history_ and train_config_ have been set
    monkeypatch.setattr(Evaluator, "reset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        unleashed.fit(DataLoader(data, batch_size=16), epochs=1, progress=False)
    assert_same(before, snapshot(unleashed))


def test_nan_in_epoch_2_rolls_back_and_names_the_batch():
    data = dataset()
    x, y = data.tensors
    poisoned = x.clone()
    poisoned[40, 0, 0, 0] = math.nan
    unleashed = wrapper("um", True, data)
    before = snapshot(unleashed)
    epochs = iter([x, poisoned])

    class Epochs:
        def __len__(self):
            return 4

        def __iter__(self):
            images = next(epochs)
            return iter([(images[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])

    unleashed.constraint = 0.1
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, batch 3.*rolled back"):
        unleashed.fit(Epochs(), epochs=2, progress=False)
    unleashed.constraint = Relative(0.3)
    assert_same(before, snapshot(unleashed))


def test_umap_hands_the_model_back_in_its_mode():
    net = make_net()
    net.bn.train()  # a mixed-mode model stays mixed
    modes = [m.training for m in net.modules()]
    OODUnleash(net, "umap", constraint=0.2).fit(
        DataLoader(dataset(), batch_size=16), epochs=1, progress=False
    )
    assert [m.training for m in net.modules()] == modes
    OODUnleash(make_net(), "um", constraint=0.2).fit(
        DataLoader(dataset(), batch_size=16), epochs=1, progress=False
    )
    assert [m.training for m in net.modules()] == modes


def test_exploding_umap_is_refused_and_rolled_back():
    data = dataset()
    unleashed = wrapper("umap", True, data)
    before = snapshot(unleashed)
    with pytest.raises(TrainingDivergedError, match="diverged.*rolled back"):
        unleashed.fit(DataLoader(data, batch_size=16), epochs=2, lr=1e6, progress=False)
    assert_same(before, snapshot(unleashed))


def test_rollback_copy_costs_the_models_parameters_and_buffers_once():
    from oodunleash.finetune.rollback import RollbackCopy

    net = make_net()
    net.tied = nn.Linear(6, 3)
    net.tied.weight = net.fc.weight  # shared: copied once
    tensors = {id(t): t for t in [*net.parameters(), *net.buffers()]}.values()
    expected = sum(t.numel() * t.element_size() for t in tensors)
    saved = RollbackCopy(net)
    assert saved.nbytes == expected
    assert all(t.device.type == "cpu" for t in saved._copies)
    with torch.no_grad():
        net.fc.weight.mul_(0)
    saved.restore()
    assert net.tied.weight is net.fc.weight and bool(net.fc.weight.abs().sum() > 0)


def test_nan_loss_stops_and_rolls_the_whole_fit_back():
    model = ConvNet(dropout=0.5)
    x, y = next(iter(labelled_loader(n=32)))
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    batches = [(x, y), (x, y)]
    unleashed = OODUnleash(model, constraint=0.1)
    unleashed.fit(batches, epochs=1, progress=False)
    good = state_copy(model)
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, batch 2"):
        unleashed.fit(
            _EpochData([[(x, y), (x, y)], [(x, y), (poisoned, y)]]),
            epochs=2,
            progress=False,
        )
    after = state_copy(model)
    # all or nothing: epoch 1 of the failed fit is not kept either (it used to be)
    assert all(torch.equal(v, good[k]) for k, v in after.items())
    assert unleashed.loss_constraint_ == 0.1 and len(unleashed.history_) == 1


class _EpochData:
    """A loader that yields a different list of batches each epoch."""

    def __init__(self, epochs):
        self.epochs = epochs
        self.calls = 0

    def __len__(self):
        return len(self.epochs[0])

    def __iter__(self):
        batches = self.epochs[min(self.calls, len(self.epochs) - 1)]
        self.calls += 1
        return iter(batches)


def test_keyboard_interrupt_leaves_model_unmasked_and_unchanged():
    model = ConvNet(dropout=0.5)
    before = state_copy(model)
    x, y = next(iter(labelled_loader()))

    def interrupted():
        yield x, y
        raise KeyboardInterrupt

    class Loader:
        def __len__(self):
            return 2

        def __iter__(self):
            return interrupted()

    for method in ("umap", "um"):
        with pytest.raises(KeyboardInterrupt):
            OODUnleash(model, method=method, constraint=0.5).fit(Loader(), progress=False)
        assert not any("_oodunleash_mask" in m.__dict__ for m in model.modules())
        assert type(model.conv) is nn.Conv2d
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())
