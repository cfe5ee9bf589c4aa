"""fit is all or nothing; a fit saved each epoch resumes to the uninterrupted result; bad
inputs to fit are named before anything changes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash, TrainingDivergedError
from oodunleash.config import Relative
from oodunleash.evaluation import Evaluator
from oodunleash.resume import STATE_FILE, FitStateError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
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


# ---------------------------------------------------------------- resume
def _history(unleashed):
    return [{k: v for k, v in rec.items() if k != "time_s"} for rec in unleashed.history_]


@pytest.mark.parametrize("method", ["um", "umap"])
def test_killed_fit_resumes_bit_identical(method, tmp_path):
    data = dataset(96)

    def fresh():
        return OODUnleash(make_net(), method, constraint=Relative(0.3), seed=5)

    def shuffled():
        return DataLoader(data, batch_size=16, shuffle=True)  # shuffled by torch's global RNG

    reference = fresh().fit(shuffled(), epochs=3, progress=False)

    killed = fresh()
    before = snapshot(killed)
    # pass 1 is ξ, pass 3 is epoch 2: killed at its second batch
    with pytest.raises(KeyboardInterrupt):
        killed.fit(Interrupt(shuffled(), 3, 2), epochs=3, checkpoint_dir=tmp_path, progress=False)
    assert_same(before, snapshot(killed))  # the kill lost nothing, changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary left

    killed.fit(shuffled(), epochs=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert killed.loss_constraint_ == reference.loss_constraint_
    assert _history(killed) == _history(reference)
    ref_state = reference.model.state_dict()
    for key, value in killed.model.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    if method == "umap":
        for name in reference.masks_.layer_names:
            assert torch.equal(
                killed.masks_.layer_scores(name), reference.masks_.layer_scores(name)
            )
        assert killed.sparsity() == reference.sparsity()


def test_fit_state_is_safetensors_with_json_and_checked_on_resume(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    OODUnleash(make_net(), constraint=0.3).fit(data, epochs=2, checkpoint_dir=tmp_path)
    with safe_open(str(tmp_path / STATE_FILE), "pt") as handle:
        record = json.loads(handle.metadata()["oodunleash_fit_state"])
        keys = set(handle.keys())
    assert record["epoch"] == 2 and len(record["history"]) == 2
    assert record["loss_constraint"] == 0.3
    assert "rng.cpu" in keys and any(k.startswith("optimizer.state.") for k in keys)
    other = OODUnleash(make_net(), constraint=0.3)
    before = snapshot(other)
    with pytest.raises(
        FitStateError, match=r"different options \(train_config.lr: saved 0.01, now 0.5\)"
    ):
        other.fit(data, epochs=2, lr=0.5, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same(before, snapshot(other))
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(FitStateError, match="not a readable fit state.*resume=False"):
        other.fit(data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same(before, snapshot(other))


def test_resume_without_a_saved_state_starts_afresh(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    a = OODUnleash(make_net(), constraint=0.3).fit(
        data, epochs=1, checkpoint_dir=tmp_path / "new", resume=True, progress=False
    )
    b = OODUnleash(make_net(), constraint=0.3).fit(data, epochs=1, progress=False)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


# ---------------------------------------------------------------- bad inputs
def _generator_loader():
    return (batch for batch in DataLoader(dataset(), batch_size=16))


class _FrozenUM:
    pass


BAD_FITS = [
    ("max_grad_norm zero", {"max_grad_norm": 0}, ValueError, "max_grad_norm must be a positive"),
    ("max_grad_norm negative", {"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ("max_grad_norm nan", {"max_grad_norm": math.nan}, ValueError, "max_grad_norm"),
    ("max_grad_norm text", {"max_grad_norm": "1"}, ValueError, "max_grad_norm"),
    ("generator loader", {"loader": "generator"}, TypeError, "one-shot iterator.*DataLoader"),
    ("iterator loader", {"loader": "iterator"}, TypeError, "one-shot iterator.*list"),
    ("not iterable", {"loader": 5}, TypeError, "loader must be an iterable"),
    ("xi with control", {"loss_constraint": 0.2, "flooding": False}, ValueError, "no ξ"),
    ("resume without dir", {"resume": True}, ValueError, "checkpoint_dir"),
    ("outliers with dir", {"checkpoint_dir": "x", "outlier_loader": []}, ValueError, "outlier"),
    ("train_norms for UM", {"train_norms": True}, ValueError, "train_norms applies to UMAP"),
    ("fully frozen UM", {"frozen": True}, ValueError, "fully frozen.*method='umap'"),
    ("bad lr", {"lr": "fast"}, TypeError, "lr must be a number"),
]


@pytest.mark.parametrize(
    ("options", "error", "match"), [c[1:] for c in BAD_FITS], ids=[c[0] for c in BAD_FITS]
)
def test_bad_fit_inputs_are_named_and_change_nothing(options, error, match, tmp_path):
    options = dict(options)
    data = dataset()
    unleashed = wrapper("um", True, data)
    if options.pop("frozen", False):
        for p in unleashed.model.parameters():
            p.requires_grad_(False)
    before = snapshot(unleashed)
    loader = options.pop("loader", DataLoader(data, batch_size=16))
    if loader == "generator":
        loader = _generator_loader()
    elif loader == "iterator":
        loader = iter([data.tensors])
    if options.get("checkpoint_dir") == "x":
        options["checkpoint_dir"] = tmp_path
    with pytest.raises(error, match=match):
        unleashed.fit(loader, epochs=1, progress=False, **options)
    assert_same(before, snapshot(unleashed))
    assert not any(tmp_path.iterdir())


def test_exploding_umap_is_refused_and_rolled_back():
    data = dataset()
    unleashed = wrapper("umap", True, data)
    before = snapshot(unleashed)
    with pytest.raises(TrainingDivergedError, match="diverged.*rolled back"):
        unleashed.fit(DataLoader(data, batch_size=16), epochs=2, lr=1e6, progress=False)
    assert_same(before, snapshot(unleashed))


def test_progress_prints_a_one_line_summary(capsys):
    OODUnleash(make_net(), constraint=0.3).fit(
        DataLoader(dataset(), batch_size=16), epochs=2, progress=True
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("UM fit in ") and "ξ 0.3" in lines[0]
    assert "training CE" in lines[0] and "accuracy" in lines[0] and "(epoch 1 -> 2)" in lines[0]


def test_rollback_copy_costs_the_models_parameters_and_buffers_once():
    from oodunleash.rollback import RollbackCopy

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
