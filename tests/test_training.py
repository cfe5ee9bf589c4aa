"""The training loop (oodunleash.finetune.loop): the flooding step, UMAP's norm layers, deferred
divergence checks, no per-step host reads, compile, fast path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodunleash import OODUnleash
from oodunleash.finetune import step as _step
from oodunleash.finetune.loop import TrainConfig, TrainingDivergedError, train
from oodunleash.masks.layer_masks import LayerMasks
from tests.helpers.toys import ConvNet, labelled_loader, state_copy

CPU = torch.device("cpu")


def batches(n: int, seed: int = 0, size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (8,), generator=g)
        x = torch.randn(8, 3, size, size, generator=g) + y.view(-1, 1, 1, 1)
        out.append((x, y))
    return out


class Counting:
    """A loader over fixed batches that counts how many it handed out."""

    def __init__(self, data: list) -> None:
        self.data = data
        self.served = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        for batch in self.data:
            self.served += 1
            yield batch


def fit(model, data, **config):
    config.setdefault("epochs", 1)
    return train(
        model,
        [p for p in model.parameters() if p.requires_grad],
        data,
        loss_constraint=0.1,
        config=TrainConfig(**config),
        device=CPU,
        progress=False,
    )


# --------------------------------------------------------------------------- divergence
@pytest.mark.parametrize(("bad_batch", "check_every", "stopped_after"), [(3, 4, 4), (6, 4, 8)])
def test_nan_stops_within_one_check_window_and_restores(bad_batch, check_every, stopped_after):
    torch.manual_seed(0)
    model = ConvNet(channels=3)
    data = batches(12)
    fit(model, data[:2])  # a first fit; the failing one must come back to this state
    good = state_copy(model)
    poisoned = [(x.clone(), y) for x, y in data]
    poisoned[bad_batch - 1][0][0, 0, 0, 0] = float("nan")
    loader = Counting(poisoned)
    with pytest.raises(TrainingDivergedError, match=f"became nan at epoch 1, batch {bad_batch}"):
        fit(model, loader, check_every=check_every)
    assert loader.served == stopped_after  # at most check_every steps past the bad one
    assert all(torch.equal(v, good[k]) for k, v in state_copy(model).items())


def test_nan_in_a_later_epoch_keeps_the_good_epochs():
    torch.manual_seed(0)
    model = ConvNet(channels=3)
    start = state_copy(model)

    class TwoEpochs(Counting):
        def __iter__(self):
            self.data = batches(3) if self.served == 0 else poisoned
            yield from super().__iter__()

    poisoned = [(x.clone(), y) for x, y in batches(3, seed=1)]
    poisoned[1][0][:] = float("inf")
    with pytest.raises(TrainingDivergedError, match="epoch 2, batch 2.*end of epoch 1"):
        fit(model, TwoEpochs(batches(3)), epochs=2)
    after = state_copy(model)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert not torch.equal(after["fc.weight"], start["fc.weight"])  # epoch 1 was kept


def test_a_finite_but_exploding_loss_counts_as_divergence():
    # From batch 5 on the inputs are 1e8 times larger: a finite loss ~1e8 (what a huge
    # learning rate produces), far above the first loss and ln(3), for a whole window.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 3))  # no BatchNorm to absorb the scale
    good = state_copy(model)
    data = [(x * (1e8 if i >= 4 else 1.0), y) for i, (x, y) in enumerate(batches(12))]
    with pytest.raises(TrainingDivergedError, match=r"stayed above 1000x .* batch 8"):
        fit(model, data, check_every=4)
    assert all(torch.equal(v, good[k]) for k, v in state_copy(model).items())
    # The rule reads only whole windows above the limit, and can be switched off.
    history = fit(nn.Sequential(nn.Flatten(), nn.Linear(108, 3)), data, divergence_factor=None)
    assert history[0]["loss"] > 1e6


def test_a_modestly_rising_loss_is_not_divergence():
    # Several times the first loss (inputs scaled mid-epoch) is a bad fine-tune, not a
    # diverged one.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 3))
    data = [(x * (30.0 if i >= 4 else 1.0), y) for i, (x, y) in enumerate(batches(12))]
    with torch.no_grad():
        first, later = (F.cross_entropy(model(x), y) for x, y in (data[0], data[4]))
    assert later > 5 * first
    assert len(fit(model, data, check_every=4, schedule="constant")) == 1


def _count_host_reads(monkeypatch) -> list[str]:
    """From now on, every read of a tensor on the host (a device sync on a GPU) is listed.
    Host-side label checks are left out."""
    monkeypatch.setattr(_step, "check_labels", lambda labels, classes: None)
    reads: list[str] = []
    for method in ("item", "tolist", "cpu", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


def test_no_host_read_per_step(monkeypatch):
    # Tensors are read on the host (a device sync on a GPU) once per check window and per
    # epoch, not once per step.
    reads = _count_host_reads(monkeypatch)
    torch.manual_seed(0)
    data = batches(4) * 10  # 40 steps
    fit(ConvNet(channels=3), data, check_every=20)
    per_40_steps = len(reads)
    reads.clear()
    fit(
        ConvNet(channels=3), data * 2, check_every=20
    )  # 80 steps: two more checks, no more per step
    assert reads.count("item") == 0
    assert len(reads) - per_40_steps <= 2 * 4, reads  # one transfer and three host reads
    assert per_40_steps <= 12, reads


def test_model_wide_umap_reads_nothing_per_step_on_the_gpu_path(monkeypatch):
    """UMAP's default mask as it runs on a GPU (one stable sort of all scores; forced here on
    the CPU, whose bracketed selection counts on the host) adds no host read per step."""
    reads = _count_host_reads(monkeypatch)

    def umap_run(steps: int) -> None:
        torch.manual_seed(0)
        model = ConvNet(channels=3)
        masks = LayerMasks(model, keep_ratio=0.9, mode="model").attach()
        masks._joint.sort_all = True
        for p in model.parameters():
            p.requires_grad_(False)
        config = TrainConfig(epochs=1, check_every=20, schedule="constant")
        data = batches(4) * (steps // 4)
        train(
            model,
            list(masks.parameters()),
            data,
            loss_constraint=0.1,
            config=config,
            device=CPU,
            progress=False,
        )

    umap_run(40)
    per_40_steps = len(reads)
    reads.clear()
    umap_run(80)  # two more checks, no more per step
    assert len(reads) - per_40_steps <= 2 * 4, reads
    assert per_40_steps <= 12, reads


def test_check_settings_are_validated():
    with pytest.raises(ValueError, match="check_every must be a positive integer"):
        TrainConfig(check_every=0)
    with pytest.raises(ValueError, match="divergence_factor must be above 1"):
        TrainConfig(divergence_factor=0.5)
    with pytest.raises(TypeError, match="compile must be True/False or a dict"):
        TrainConfig(compile="yes")


# --------------------------------------------------------------------------- parameters
def test_train_norms_adds_the_normalisation_layers_to_the_trained_parameters():
    torch.manual_seed(0)
    model = ConvNet(channels=3)
    before = state_copy(model)
    config = TrainConfig(epochs=1, train_norms=True)
    train(model, [], batches(3), loss_constraint=0.1, config=config, device=CPU, progress=False)
    after = state_copy(model)
    assert not torch.equal(after["bn.weight"], before["bn.weight"])
    assert not torch.equal(after["bn.bias"], before["bn.bias"])
    assert torch.equal(after["conv.weight"], before["conv.weight"])
    assert torch.equal(after["fc.weight"], before["fc.weight"])
    model.bn.bias.requires_grad_(False)  # frozen by the caller: stays frozen
    train(model, [], batches(3), loss_constraint=0.1, config=config, device=CPU, progress=False)
    assert torch.equal(state_copy(model)["bn.bias"], after["bn.bias"])


# --------------------------------------------------------------------------- fast path
def _same_run(config_a: dict, config_b: dict, atol: float, model: nn.Module | None = None):
    torch.manual_seed(0)
    model = ConvNet(channels=3) if model is None else model
    twin = copy.deepcopy(model)
    data = batches(4, size=8)
    history_a = fit(model, data, epochs=2, **config_a)
    history_b = fit(twin, data, epochs=2, **config_b)
    for a, b in zip(history_a, history_b, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=atol)
        assert a["accuracy"] == b["accuracy"]
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=atol), name


def test_compiled_training_step_matches_eager():
    # Inductor generates and builds C++ kernels: a small MLP keeps that to seconds.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 3))
    _same_run({}, {"compile": True}, atol=1e-5, model=mlp)


def test_compiled_umap_fit_matches_eager_in_one_graph():
    """UMAP under fit(compile=True): the same losses, masks and weights as eager, and the
    masked layers no longer split the compiled forward pass (no graph breaks)."""
    from torch._dynamo.utils import counters

    net = nn.Sequential(
        nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
    )
    data = batches(4, size=4)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        unleashed = OODUnleash(copy.deepcopy(net), "umap", constraint=0.3)
        unleashed.fit(data, epochs=2, progress=False, training={"compile": compiled})
        runs[compiled] = unleashed
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, kept over all steps
    eager, compiled = runs[False], runs[True]
    for a, b in zip(eager.history_, compiled.history_, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    for name in eager.layer_names:
        assert torch.equal(eager.masks_.mask(name), compiled.masks_.mask(name)), name
    for key, value in eager.model.state_dict().items():
        assert torch.allclose(value.float(), compiled.model.state_dict()[key].float(), atol=1e-5)


def test_channels_last_matches_the_default_layout():
    _same_run({}, {"channels_last": True}, atol=1e-4)


def test_bfloat16_autocast_on_cpu_trains_close_to_float32():
    _same_run({}, {"amp": True, "channels_last": True}, atol=0.05)


def test_a_bfloat16_model_fits_on_float32_batches():
    """Batches are cast to the model's dtype: a bfloat16 model trains on float32 images."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net = net.to(torch.bfloat16)
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    before = net[1].weight.detach().clone()
    OODUnleash(net, constraint=0.3).fit(data, epochs=1, progress=False)
    assert net[1].weight.dtype == torch.bfloat16
    assert not torch.equal(net[1].weight, before)


def test_batchnorm_with_a_last_batch_of_one_is_named_and_rolled_back():
    """BatchNorm1d cannot train on one sample: the error says so and names the fix
    (drop_last=True), and the fit leaves the model as it was."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    data = [
        (torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))),
        (torch.randn(1, 1, 4, 4), torch.tensor([1])),
    ]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="drop_last=True"):
        OODUnleash(net, constraint=0.3).fit(data, epochs=1, progress=False)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_fit_passes_compile_and_channels_last_to_the_training_config():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    unleashed = OODUnleash(net, constraint=0.3).fit(
        data,
        epochs=1,
        progress=False,
        training={"compile": {"backend": "eager"}, "channels_last": True},
    )
    assert unleashed.train_config_.compile == {"backend": "eager"}
    assert unleashed.train_config_.channels_last is True


# --------------------------------------------------------------------------- flooding
def test_um_step_ascends_when_loss_is_below_constraint():
    torch.manual_seed(0)
    model = ConvNet(dropout=0.5).eval()
    loader = labelled_loader()
    # Pre-train so that CE is well below a large ξ, then one UM epoch must raise the CE.
    OODUnleash(model, constraint=1e-6).fit(loader, epochs=5, lr=0.1, progress=False)
    unleashed = OODUnleash(model, constraint=1.0).fit(loader, epochs=1, lr=0.05, progress=False)
    history = unleashed.history_[0]
    assert history["frac_below_constraint"] == 1.0
    from oodunleash import mean_cross_entropy

    before = mean_cross_entropy(copy.deepcopy(model), loader)
    OODUnleash(model, constraint=1.0).fit(loader, epochs=1, lr=0.05, progress=False)
    assert mean_cross_entropy(model, loader) > before


def test_flooding_false_is_the_plain_cross_entropy_control():
    torch.manual_seed(0)
    a = ConvNet(dropout=0.5)
    b = copy.deepcopy(a)
    loader = labelled_loader()
    control = OODUnleash(a, seed=1).fit(loader, epochs=2, flooding=False, progress=False)
    assert control.loss_constraint_ is None
    assert "control" in repr(control)
    assert control.history_[0]["frac_below_constraint"] == 0.0
    # identical to flooding at a level no batch ever reaches (ce > ξ everywhere: descent)
    tiny = OODUnleash(b, seed=1, constraint=1e-9).fit(loader, epochs=2, progress=False)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6)
    assert control.history_[-1]["ce"] == pytest.approx(tiny.history_[-1]["ce"], rel=1e-5)


# --------------------------------------------------------------------------- norm layers
def test_umap_train_norms_trains_only_the_norm_affine_and_the_scores():
    model = ConvNet(dropout=0.5)
    before = state_copy(model)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.75, exclude="fc", constraint=0.5)
    unleashed.fit(labelled_loader(), epochs=2, training={"train_norms": True})
    after = state_copy(unleashed.export())
    assert not torch.equal(before["bn.weight"], after["bn.weight"])
    assert not torch.equal(before["bn.bias"], after["bn.bias"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])  # weights stay frozen
    kept = after["conv.weight"] != 0
    assert torch.equal(after["conv.weight"][kept], before["conv.weight"][kept])
    assert unleashed.train_config_.train_norms
    assert all(p.requires_grad for p in model.parameters())  # restored after fit


def test_umap_train_norms_leaves_norm_parameters_the_user_froze_frozen():
    model = ConvNet(dropout=0.5)
    model.bn.bias.requires_grad_(False)
    before = state_copy(model)
    unleashed = OODUnleash(model, method="umap", exclude="fc", constraint=0.5)
    unleashed.fit(labelled_loader(), epochs=2, training={"train_norms": True})
    after = state_copy(unleashed.export())
    assert not torch.equal(before["bn.weight"], after["bn.weight"])
    assert torch.equal(before["bn.bias"], after["bn.bias"])
    assert not model.bn.bias.requires_grad and model.bn.weight.requires_grad
    # With every norm parameter frozen, the default trains none and True is refused.
    frozen = ConvNet(dropout=0.5)
    frozen.bn.requires_grad_(False)
    refit = OODUnleash(frozen, method="umap", exclude="fc", constraint=0.5)
    assert not refit.fit(labelled_loader(), epochs=1).train_config_.train_norms
    with pytest.raises(ValueError, match="all 2 scale/shift.*requires_grad=False.*requires_grad_"):
        refit.fit(labelled_loader(), epochs=1, training={"train_norms": True})


def test_umap_defaults_one_threshold_keeping_90_percent_with_trainable_norms():
    model = ConvNet(dropout=0.5)
    bn_weight = model.bn.weight.detach().clone()
    unleashed = OODUnleash(model, method="umap", exclude="fc", constraint=0.5)
    assert (unleashed.keep_ratio, unleashed.mask_mode) == (0.9, "model")
    unleashed.fit(labelled_loader(), epochs=1, progress=False)
    assert unleashed.train_config_.train_norms
    assert not torch.equal(model.bn.weight, bn_weight)
    # A model without normalisation layers is fine by default: there is just nothing to train.
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    plain_fit = OODUnleash(plain, method="umap", constraint=0.5).fit(labelled_loader(), epochs=1)
    assert not plain_fit.train_config_.train_norms
    um = OODUnleash(ConvNet(dropout=0.5), constraint=0.5).fit(labelled_loader(), epochs=1)
    assert not um.train_config_.train_norms


def test_train_norms_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="train_norms applies to UMAP.*method='umap'"):
        OODUnleash(ConvNet(dropout=0.5), method="um").fit(
            labelled_loader(), training={"train_norms": True}
        )
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="no normalisation layer.*Drop train_norms"):
        OODUnleash(plain, method="umap").fit(labelled_loader(), training={"train_norms": True})


def test_umap_moves_norm_stats_unless_frozen():
    model = ConvNet(dropout=0.5)
    before = model.bn.running_mean.clone()
    OODUnleash(model, method="umap", constraint=0.5).fit(labelled_loader(), epochs=1)
    assert not torch.equal(before, model.bn.running_mean)


def test_fit_releases_gradients():
    model = ConvNet(dropout=0.5)
    OODUnleash(model, constraint=0.5).fit(labelled_loader(), epochs=1, progress=False)
    assert all(p.grad is None for p in model.parameters())
