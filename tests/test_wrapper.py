"""OODUnleash end to end: UM and UMAP fit, export, determinism, compiled models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from oodunleash import NotFittedError, OODUnleash
from tests.helpers.toys import ConvNet, labelled_loader, state_copy


# ---------------------------------------------------------------- UM
def test_um_trains_dense_weights_and_leaves_no_mask():
    model = ConvNet(dropout=0.5)
    keys = list(model.state_dict())
    before = state_copy(model)
    unleashed = OODUnleash(model, method="um", constraint=0.5).fit(
        labelled_loader(), epochs=2, progress=False
    )
    assert unleashed.masks_ is None
    assert list(model.state_dict()) == keys
    assert not any("_oodunleash_mask" in m.__dict__ for m in model.modules())
    assert not torch.equal(before["fc.weight"], model.fc.weight)
    assert [h["epoch"] for h in unleashed.history_] == [1, 2]
    for key in ("loss", "ce", "accuracy", "frac_below_constraint", "lr", "time_s"):
        assert key in unleashed.history_[0]
    exported = unleashed.export()
    assert type(exported) is ConvNet and exported is not model
    x = torch.randn(4, 1, 8, 8)
    model.eval(), exported.eval()
    assert torch.equal(exported(x), model(x))


def test_same_seed_gives_identical_results():
    torch.manual_seed(0)
    a_model = ConvNet(dropout=0.5)
    b_model = copy.deepcopy(a_model)
    loader = labelled_loader()
    shuffled = DataLoader(loader.dataset, batch_size=16, shuffle=True)
    ua = OODUnleash(a_model, method="umap", seed=11, constraint=0.5).fit(shuffled, epochs=2)
    ub = OODUnleash(b_model, method="umap", seed=11, constraint=0.5).fit(shuffled, epochs=2)
    for name in ua.masks_.layer_names:
        assert torch.equal(ua.masks_.layer_scores(name), ub.masks_.layer_scores(name))
    assert ua.history_[-1]["loss"] == ub.history_[-1]["loss"]
    with pytest.raises(ValueError, match="carries the UMAP mask"):
        OODUnleash(b_model)
    c_model = ub.export()
    uc = OODUnleash(c_model, method="um", seed=2, constraint=0.5).fit(
        shuffled, epochs=1, progress=False
    )
    d_model = ub.export()
    ud = OODUnleash(d_model, method="um", seed=2, constraint=0.5).fit(
        shuffled, epochs=1, progress=False
    )
    assert uc.history_[0]["loss"] == ud.history_[0]["loss"]
    assert all(torch.equal(v, d_model.state_dict()[k]) for k, v in c_model.state_dict().items())


# ---------------------------------------------------------------- UMAP
def test_umap_freezes_weights_and_keeps_exact_fraction():
    model = ConvNet(dropout=0.5)
    before = state_copy(model)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.75, exclude="fc", constraint=0.5)
    unleashed.fit(
        labelled_loader(), epochs=2, training={"freeze_norm_stats": True, "train_norms": False}
    )
    after = state_copy(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN stats
    assert all(p.requires_grad for p in model.parameters())  # restored after fit
    assert unleashed.masks_.layer_names == ["conv"]
    exported = unleashed.export()
    assert int((exported.conv.weight == 0).sum()) == 72 - 54  # round(0.75 * 72) kept
    assert torch.equal(exported.fc.weight, model.fc.weight)


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
    loader = labelled_loader(n=8, batch=4, size=size, channels=3)
    unleashed = OODUnleash(model, method="umap", keep_ratio=0.8, mask_mode="layer", constraint=0.5)
    unleashed.fit(loader, epochs=1, lr=0.1, progress=False)
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
        OODUnleash(ConvNet(dropout=0.5)).export()


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
