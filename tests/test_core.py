"""The wrapper end to end: ξ, UM, UMAP, export, determinism, bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import (
    LossConstraintTooHighError,
    NotFittedError,
    OODUnleash,
    TrainingDivergedError,
    flooding_loss,
)
from oodunleash.masking import LayerMasks, topk_mask


class SmallNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def make_loader(n=64, classes=3, size=8, batch=16, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x += y.view(-1, 1, 1, 1).float()  # learnable signal
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- flooding
def test_flooding_sign_flips_below_the_constraint():
    for ce_value, expected in [(0.9, 1.0), (0.1, -1.0)]:
        ce = torch.tensor(ce_value, requires_grad=True)
        loss = flooding_loss(ce, 0.5)
        loss.backward()
        assert ce.grad.item() == expected
        assert loss.item() == pytest.approx(abs(ce_value - 0.5) + 0.5)


def test_um_step_ascends_when_loss_is_below_constraint():
    torch.manual_seed(0)
    model = SmallNet().eval()
    loader = make_loader()
    # Pre-train so that CE is well below a large ξ, then one UM epoch must raise the CE.
    OODUnleash(model).fit(loader, epochs=5, lr=0.1, loss_constraint=1e-6, progress=False)
    unleashed = OODUnleash(model).fit(
        loader, epochs=1, lr=0.05, loss_constraint=1.0, progress=False
    )
    history = unleashed.history_[0]
    assert history["frac_below_constraint"] == 1.0
    from oodunleash import mean_cross_entropy

    before = mean_cross_entropy(copy.deepcopy(model), loader)
    OODUnleash(model).fit(loader, epochs=1, lr=0.05, loss_constraint=1.0, progress=False)
    assert mean_cross_entropy(model, loader) > before


# ---------------------------------------------------------------- ξ
def test_loss_constraint_matches_hand_computation_and_leaves_model_untouched():
    model = SmallNet()
    model.train()  # estimate must switch to eval mode (dropout off, BN running stats)
    loader = make_loader()
    state = params_of(model)
    unleashed = OODUnleash(model, seed=7)
    xi = unleashed.estimate_loss_constraint(loader, keep_ratio=0.7, progress=False)

    reference = copy.deepcopy(model).eval()
    masks = LayerMasks(reference, keep_ratio=0.7, seed=7)
    with torch.no_grad():
        for name in masks.layer_names:
            reference.get_submodule(name).weight.mul_(topk_mask(masks.layer_scores(name), 0.7))
        losses = [F.cross_entropy(reference(x), y, reduction="sum") for x, y in loader]
    expected = float(sum(losses) / len(loader.dataset))
    assert xi == pytest.approx(expected, rel=1e-6)
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model.conv) is nn.Conv2d


def test_fit_sets_constraint_by_recipe_when_not_given():
    from oodunleash import mean_cross_entropy

    loader = make_loader()
    torch.manual_seed(0)
    model = SmallNet()
    OODUnleash(model).fit(loader, epochs=30, lr=0.1, flooding=False, progress=False)
    state = params_of(model)
    # default: 3x the model's own training loss (eval mode)
    expected = 3 * mean_cross_entropy(model, loader)
    unleashed = OODUnleash(model, seed=3).fit(loader, epochs=1, progress=False)
    assert unleashed.loss_constraint_ == pytest.approx(expected)
    # the paper's recipe: the masked-model estimate
    model.load_state_dict(state)
    masked = OODUnleash(model, seed=3, constraint="masked", constraint_keep_ratio=0.9)
    expected = masked.estimate_loss_constraint(loader, progress=False)
    masked.fit(loader, epochs=1, progress=False)
    assert masked.loss_constraint_ == pytest.approx(expected)
    with pytest.raises(ValueError, match="constraint must be 'relative' or 'masked'"):
        OODUnleash(model, constraint="paper")


def test_constraint_at_or_above_chance_is_refused_before_any_step():
    model = SmallNet(classes=3)
    before = params_of(model)
    # Its own class (a ValueError), so that a sweep can catch it and go on.
    with pytest.raises(LossConstraintTooHighError, match=r"not below ln\(3\) = 1\.099.*uniform"):
        OODUnleash(model).fit(make_loader(), loss_constraint=1.2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_flooding_false_is_the_plain_cross_entropy_control():
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    loader = make_loader()
    control = OODUnleash(a, seed=1).fit(loader, epochs=2, flooding=False, progress=False)
    assert control.loss_constraint_ is None
    assert "control" in repr(control)
    assert control.history_[0]["frac_below_constraint"] == 0.0
    # identical to flooding at a level no batch ever reaches (ce > ξ everywhere: descent)
    tiny = OODUnleash(b, seed=1).fit(loader, epochs=2, loss_constraint=1e-9, progress=False)
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6)
    assert control.history_[-1]["ce"] == pytest.approx(tiny.history_[-1]["ce"], rel=1e-5)
    with pytest.raises(ValueError, match="flooding=False"):
        OODUnleash(a).fit(loader, loss_constraint=0.3, flooding=False, progress=False)


# ---------------------------------------------------------------- UM
def test_um_trains_dense_weights_and_leaves_no_mask():
    model = SmallNet()
    keys = list(model.state_dict())
    before = params_of(model)
    unleashed = OODUnleash(model, method="um").fit(
        make_loader(), epochs=2, loss_constraint=0.5, progress=False
    )
    assert unleashed.masks_ is None
    assert list(model.state_dict()) == keys
    assert not any("_oodunleash_mask" in m.__dict__ for m in model.modules())
    assert not torch.equal(before["fc.weight"], model.fc.weight)
    assert [h["epoch"] for h in unleashed.history_] == [1, 2]
    for key in ("loss", "ce", "accuracy", "frac_below_constraint", "lr", "time_s"):
        assert key in unleashed.history_[0]
    exported = unleashed.export()
    assert type(exported) is SmallNet and exported is not model
    x = torch.randn(4, 1, 8, 8)
    model.eval(), exported.eval()
    assert torch.equal(exported(x), model(x))


def test_same_seed_gives_identical_results():
    torch.manual_seed(0)
    a_model = SmallNet()
    b_model = copy.deepcopy(a_model)
    loader = make_loader()
    shuffled = DataLoader(loader.dataset, batch_size=16, shuffle=True)
    ua = OODUnleash(a_model, method="umap", seed=11).fit(shuffled, epochs=2, loss_constraint=0.5)
    ub = OODUnleash(b_model, method="umap", seed=11).fit(shuffled, epochs=2, loss_constraint=0.5)
    for name in ua.masks_.layer_names:
        assert torch.equal(ua.masks_.layer_scores(name), ub.masks_.layer_scores(name))
    assert ua.history_[-1]["loss"] == ub.history_[-1]["loss"]
    with pytest.raises(ValueError, match="carries the UMAP mask"):
        OODUnleash(b_model)
    c_model = ub.export()
    uc = OODUnleash(c_model, method="um", seed=2).fit(
        shuffled, epochs=1, loss_constraint=0.5, progress=False
    )
    d_model = ub.export()
    ud = OODUnleash(d_model, method="um", seed=2).fit(
        shuffled, epochs=1, loss_constraint=0.5, progress=False
    )
    assert uc.history_[0]["loss"] == ud.history_[0]["loss"]
    assert all(torch.equal(v, d_model.state_dict()[k]) for k, v in c_model.state_dict().items())


# ---------------------------------------------------------------- UMAP
def test_umap_freezes_weights_and_keeps_exact_fraction():
    model = SmallNet()
    before = params_of(model)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.75, exclude="fc")
    unleashed.fit(
        make_loader(), epochs=2, loss_constraint=0.5, freeze_norm_stats=True, train_norms=False
    )
    after = params_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN stats
    assert all(p.requires_grad for p in model.parameters())  # restored after fit
    assert unleashed.masks_.layer_names == ["conv"]
    exported = unleashed.export()
    assert int((exported.conv.weight == 0).sum()) == 72 - 54  # round(0.75 * 72) kept
    assert torch.equal(exported.fc.weight, model.fc.weight)


def test_umap_train_norms_trains_only_the_norm_affine_and_the_scores():
    model = SmallNet()
    before = params_of(model)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.75, exclude="fc")
    unleashed.fit(make_loader(), epochs=2, loss_constraint=0.5, train_norms=True)
    after = params_of(unleashed.export())
    assert not torch.equal(before["bn.weight"], after["bn.weight"])
    assert not torch.equal(before["bn.bias"], after["bn.bias"])
    assert torch.equal(before["fc.weight"], after["fc.weight"])  # weights stay frozen
    kept = after["conv.weight"] != 0
    assert torch.equal(after["conv.weight"][kept], before["conv.weight"][kept])
    assert unleashed.train_config_.train_norms
    assert all(p.requires_grad for p in model.parameters())  # restored after fit


def test_umap_train_norms_leaves_norm_parameters_the_user_froze_frozen():
    model = SmallNet()
    model.bn.bias.requires_grad_(False)
    before = params_of(model)
    unleashed = OODUnleash(model, method="umap", exclude="fc")
    unleashed.fit(make_loader(), epochs=2, loss_constraint=0.5, train_norms=True)
    after = params_of(unleashed.export())
    assert not torch.equal(before["bn.weight"], after["bn.weight"])
    assert torch.equal(before["bn.bias"], after["bn.bias"])
    assert not model.bn.bias.requires_grad and model.bn.weight.requires_grad
    # With every norm parameter frozen, the default trains none and True is refused.
    frozen = SmallNet()
    frozen.bn.requires_grad_(False)
    refit = OODUnleash(frozen, method="umap", exclude="fc")
    assert not refit.fit(make_loader(), epochs=1, loss_constraint=0.5).train_config_.train_norms
    with pytest.raises(ValueError, match="all 2 scale/shift.*requires_grad=False.*requires_grad_"):
        refit.fit(make_loader(), epochs=1, loss_constraint=0.5, train_norms=True)


def test_umap_defaults_one_threshold_keeping_90_percent_with_trainable_norms():
    model = SmallNet()
    bn_weight = model.bn.weight.detach().clone()
    unleashed = OODUnleash(model, method="umap", exclude="fc")
    assert (unleashed.keep_ratio, unleashed.mask_mode) == (0.9, "model")
    unleashed.fit(make_loader(), epochs=1, loss_constraint=0.5, progress=False)
    assert unleashed.train_config_.train_norms
    assert not torch.equal(model.bn.weight, bn_weight)
    # A model without normalisation layers is fine by default: there is just nothing to train.
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    plain_fit = OODUnleash(plain, method="umap").fit(make_loader(), epochs=1, loss_constraint=0.5)
    assert not plain_fit.train_config_.train_norms
    um = OODUnleash(SmallNet()).fit(make_loader(), epochs=1, loss_constraint=0.5)
    assert not um.train_config_.train_norms


def test_train_norms_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="train_norms applies to UMAP.*method='umap'"):
        OODUnleash(SmallNet(), method="um").fit(make_loader(), train_norms=True)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="no normalisation layer.*Drop train_norms"):
        OODUnleash(plain, method="umap").fit(make_loader(), train_norms=True)


def test_umap_moves_norm_stats_unless_frozen():
    model = SmallNet()
    before = model.bn.running_mean.clone()
    OODUnleash(model, method="umap").fit(make_loader(), epochs=1, loss_constraint=0.5)
    assert not torch.equal(before, model.bn.running_mean)


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("resnet18", {}, 32),
        ("convnext_atto", {}, 32),
        ("efficientnet_b0", {}, 32),
        ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ],
)
def test_timm_families_umap_export_loads_into_fresh_model(name, kwargs, size):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    keys = list(model.state_dict())
    loader = make_loader(n=8, batch=4, size=size, channels=3)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.8, mask_mode="layer")
    unleashed.fit(loader, epochs=1, lr=0.1, loss_constraint=0.5, progress=False)
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        masked_out = model(x)
    exported = unleashed.export().eval()
    assert type(exported) is type(model)
    assert not any("_oodunleash_mask" in m.__dict__ for m in exported.modules())
    fresh = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    fresh.load_state_dict(exported.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), masked_out, atol=1e-5)
        assert torch.allclose(exported(x), masked_out, atol=1e-5)
    weights = [exported.get_submodule(n).weight for n in unleashed.layer_names]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    expected = sum(w.numel() - round(0.8 * w.numel()) for w in weights)
    assert zeros == expected and abs(zeros / total - 0.2) < 0.01


# ---------------------------------------------------------------- errors
def test_export_before_fit_raises():
    with pytest.raises(NotFittedError, match=r"call \.fit"):
        OODUnleash(SmallNet()).export()


def test_loader_without_labels_is_rejected():
    images_only = DataLoader(torch.randn(8, 1, 8, 8), batch_size=4)
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        OODUnleash(SmallNet()).fit(images_only, progress=False)


def test_labels_outside_model_classes_are_rejected():
    loader = make_loader(classes=5)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 3\)"):
        OODUnleash(SmallNet(classes=3)).fit(loader, loss_constraint=0.1, progress=False)


def test_model_output_shape_is_checked():
    class Bad(SmallNet):
        def forward(self, x):
            return super().forward(x).unsqueeze(1)

    with pytest.raises(ValueError, match=r"logits of shape \(batch, classes\)"):
        OODUnleash(Bad()).fit(make_loader(), progress=False)


@pytest.mark.parametrize("xi", [0, -1.0, float("nan")])
def test_bad_loss_constraint(xi):
    with pytest.raises(ValueError, match="loss_constraint"):
        OODUnleash(SmallNet()).fit(make_loader(), loss_constraint=xi, progress=False)


def test_bad_keep_ratio_and_method():
    with pytest.raises(ValueError, match="keep_ratio"):
        OODUnleash(SmallNet(), method="umap", keep_ratio=1.2)
    with pytest.raises(ValueError, match="method"):
        OODUnleash(SmallNet(), method="prune")
    with pytest.raises(TypeError, match="nn.Module"):
        OODUnleash(lambda x: x)


def test_empty_loader_is_rejected():
    empty = DataLoader(TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no batches"):
        OODUnleash(SmallNet()).fit(empty, loss_constraint=0.1, progress=False)


def test_nan_loss_stops_and_rolls_the_whole_fit_back():
    model = SmallNet()
    x, y = next(iter(make_loader(n=32)))
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    batches = [(x, y), (x, y)]
    unleashed = OODUnleash(model)
    unleashed.fit(batches, epochs=1, loss_constraint=0.1, progress=False)
    good = params_of(model)
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, batch 2"):
        unleashed.fit(
            _EpochData([[(x, y), (x, y)], [(x, y), (poisoned, y)]]),
            epochs=2,
            loss_constraint=0.1,
            progress=False,
        )
    after = params_of(model)
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
    model = SmallNet()
    before = params_of(model)
    x, y = next(iter(make_loader()))

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
            OODUnleash(model, method=method).fit(Loader(), loss_constraint=0.5, progress=False)
        assert not any("_oodunleash_mask" in m.__dict__ for m in model.modules())
        assert type(model.conv) is nn.Conv2d
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())


def test_fit_releases_gradients():
    model = SmallNet()
    OODUnleash(model).fit(make_loader(), epochs=1, loss_constraint=0.5, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_high_constraint_warns_before_training():
    model = SmallNet(classes=3)
    with pytest.warns(UserWarning, match="more than a quarter"):
        OODUnleash(model).fit(make_loader(), epochs=1, loss_constraint=0.5, progress=False)


@pytest.mark.parametrize("method", ["um", "umap"])
def test_compiled_model_is_unwrapped_for_layer_names_export_and_saving(method, tmp_path):
    """A ``torch.compile``d model fits; layer names, the export and the checkpoint are those of
    the plain module: no ``_orig_mod.`` prefix, the user's class (issue 21)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(net, backend="eager")  # no compiler needed: the wrapper is the point
    data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    unleashed = OODUnleash(compiled, method, constraint=0.5).fit(data, epochs=1, progress=False)
    assert unleashed.layer_names == ["1", "3"]
    plain = unleashed.export()
    assert type(plain) is nn.Sequential
    assert set(plain.state_dict()) == set(net.state_dict())
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    reloaded = OODUnleash.from_pretrained(
        folder, nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    )
    x = torch.randn(5, 1, 4, 4)
    assert torch.allclose(reloaded.model(x), plain(x))
