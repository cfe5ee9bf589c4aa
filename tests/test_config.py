"""OODUnleash's options: one config, checked at the boundary, JSON round trip, deprecations."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.config import METHOD_DEFAULTS, Masked, Relative, UnleashConfig
from oodunleash.constraint import estimate_loss_constraint
from oodunleash.scores import get_score


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_method_defaults_have_one_home():
    from oodunleash import wrapper

    assert wrapper.METHOD_DEFAULTS is METHOD_DEFAULTS
    umap = OODUnleash(Net(), "umap")
    assert (umap.keep_ratio, umap.mask_mode, umap.mask_init) == (0.9, "model", "random")
    um = OODUnleash(Net(), "um")
    assert (um.keep_ratio, um.mask_mode, um.mask_init) == (None, None, None)


@pytest.mark.parametrize(
    ("option", "value"),
    [(np.float32(0.8), 0.8), (np.float64(0.5), 0.5), (torch.tensor(0.7), 0.7)],
)
def test_numpy_and_torch_scalars_count_as_numbers(option, value):
    unleashed = OODUnleash(Net(), "umap", keep_ratio=option, constraint=torch.tensor(0.2))
    assert type(unleashed.keep_ratio) is float
    assert unleashed.keep_ratio == pytest.approx(value)
    assert unleashed.constraint == pytest.approx(0.2) and type(unleashed.constraint) is float
    assert Relative(np.float32(2.0)).factor == 2.0
    assert OODUnleash(Net(), seed=np.int64(4)).seed == 4


@pytest.mark.parametrize(
    ("option", "value"), [("keep_ratio", 0.8), ("mask_mode", "layer"), ("mask_init", "random")]
)
def test_um_refuses_mask_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} applies to method='umap'.*Drop {option}"):
        OODUnleash(Net(), "um", **{option: value})


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"seed": None}, TypeError, "seed must be an int"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"method": "prune"}, ValueError, "method must be"),
        ({"method": "umap", "keep_ratio": 1.2}, ValueError, "keep_ratio"),
        ({"method": "umap", "keep_ratio": "high"}, ValueError, "keep_ratio"),
        ({"method": "umap", "mask_mode": "global"}, ValueError, "mask_mode must be"),
        ({"method": "umap", "mask_init": "zeros"}, ValueError, "mask_init must be"),
        ({"constraint": "paper"}, ValueError, "constraint must be 'relative' or 'masked'"),
        ({"constraint": -1.0}, ValueError, "positive, finite"),
        ({"constraint": float("nan")}, ValueError, "positive, finite"),
        ({"constraint": float("inf")}, ValueError, "positive, finite"),
        ({"constraint": [0.1]}, ValueError, "constraint must be a number"),
        ({"constraint": {"recipe": "paper"}}, ValueError, "needs 'recipe'"),
        ({"constraint": {"recipe": "relative", "scale": 2}}, ValueError, "constraint"),
        ({"score": "no-such-score"}, ValueError, "no-such-score"),
        ({"head": 3}, TypeError, "head must be the name of a submodule"),
        ({"layers": 3}, TypeError, "layers must be a name glob"),
        ({"layers": "nothing.*"}, ValueError, "nothing"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_option(options, error, match):
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(error, match=match):
        OODUnleash(net, **options)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    ("recipe", "match"),
    [(lambda: Relative(0), "Relative.factor"), (lambda: Masked(1.5), "Masked.keep_ratio")],
)
def test_recipes_check_their_parameter(recipe, match):
    with pytest.raises(ValueError, match=match):
        recipe()


def test_constraint_forms_and_shorthands():
    assert OODUnleash(Net()).config.loss_constraint == Relative(3.0)
    assert OODUnleash(Net(), constraint="masked").config.loss_constraint == Masked(0.965)
    assert OODUnleash(Net(), constraint=Relative()).constraint == "relative"  # shorthand
    assert OODUnleash(Net(), constraint=Masked(0.9)).constraint == Masked(0.9)
    assert OODUnleash(Net(), constraint=0.25).config.loss_constraint == 0.25


def test_deprecated_constraint_aliases_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match="constraint=Relative"):
        unleashed = OODUnleash(Net(), constraint_factor=2.0)
    assert unleashed.constraint == Relative(2.0)
    with pytest.warns(DeprecationWarning, match="constraint=Masked"):
        masked = OODUnleash(Net(), constraint="masked", constraint_keep_ratio=0.9)
    assert masked.constraint == Masked(0.9)
    with pytest.warns(DeprecationWarning):
        assert masked.constraint_keep_ratio == 0.9
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="Relative\\(factor=2"):
        OODUnleash(Net(), constraint="masked", constraint_factor=2)
    with warnings.catch_warnings():  # the default of the other recipe is harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        assert OODUnleash(Net(), constraint="masked", constraint_factor=3.0).constraint == "masked"


def test_fit_loss_constraint_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="constraint=ξ"):
        unleashed = OODUnleash(Net()).fit(loader(), epochs=1, loss_constraint=0.2, progress=False)
    assert unleashed.loss_constraint_ == 0.2
    new = OODUnleash(Net(), constraint=0.2).fit(loader(), epochs=1, progress=False)
    assert new.loss_constraint_ == 0.2


@pytest.mark.parametrize(
    "options",
    [
        {"method": "um"},
        {"method": "umap", "keep_ratio": 0.7, "mask_mode": "layer", "mask_init": "magnitude"},
        {"method": "umap", "layers": ["conv"], "constraint": Masked(0.9), "seed": 3},
        {"method": "um", "exclude": "fc", "constraint": Relative(2.5), "head": "fc"},
        {"method": "um", "constraint": 0.3, "score": get_score("knn", k=7)},
    ],
)
def test_get_params_is_json_and_rebuilds_an_equal_wrapper(options):
    unleashed = OODUnleash(Net(), **options)
    params = unleashed.get_params()
    assert json.loads(json.dumps(params)) == params
    again = OODUnleash(Net(), **json.loads(json.dumps(params)))
    assert again.get_params() == params
    assert UnleashConfig.from_dict(params).to_dict() == params


def test_get_params_names_layers_chosen_by_type():
    unleashed = OODUnleash(Net(), layers=nn.Conv2d)
    params = unleashed.get_params()
    assert params["layers"] == ["conv"] and params["exclude"] is None
    assert OODUnleash(Net(), **params).layer_names == unleashed.layer_names


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"method": "um", "keepratio": 0.5}, "Unknown option.*keepratio"),
        ({"method": "umap", "keep_ratio": 2}, "keep_ratio"),
        ({"method": "um", "seed": "0"}, "seed"),
        ({"method": "um", "constraint": -5}, "loss_constraint"),
    ],
)
def test_from_dict_names_the_wrong_field(data, match):
    with pytest.raises(ValueError, match=match):
        UnleashConfig.from_dict(data)


def test_repr_shows_keep_ratio_for_umap_only():
    assert "keep_ratio" not in repr(OODUnleash(Net(), "um"))
    assert "keep_ratio=0.9" in repr(OODUnleash(Net(), "umap"))


def test_estimate_loss_constraint_honours_mask_init():
    net = Net()
    data = loader()
    umap = OODUnleash(net, "umap", mask_init="magnitude", seed=2)
    expected = estimate_loss_constraint(net, data, 0.5, init="magnitude", seed=2, progress=False)
    assert umap.estimate_loss_constraint(data, 0.5, progress=False) == expected
    random = estimate_loss_constraint(net, data, 0.5, init="random", seed=2, progress=False)
    assert expected != random
    # the masked recipe's keep ratio is the default one
    masked = OODUnleash(net, constraint=Masked(0.5), seed=2)
    assert masked.estimate_loss_constraint(data, progress=False) == random


def test_options_of_a_release_0_1_checkpoint_load():
    um = {
        "method": "um",
        "keep_ratio": 0.8,  # recorded by 0.1 although UM never used it
        "mask_mode": "layer",
        "mask_init": "random",
        "constraint": "masked",
        "constraint_factor": 3.0,
        "constraint_keep_ratio": 0.9,
        "seed": 4,
        "default_score": "vim",
        "head": None,
        "feature_layer": None,
        "layer_names": ["conv", "fc"],
    }
    config = UnleashConfig.from_legacy(um)
    assert (config.keep_ratio, config.mask_mode, config.mask_init) == (None, None, None)
    assert config.constraint == Masked(0.9) and config.score == "vim" and config.seed == 4
    assert OODUnleash(Net(), **config.to_dict()).layer_names == ["conv", "fc"]
    umap = dict(um, method="umap", constraint="relative", keep_ratio=0.6, mask_mode="model")
    config = UnleashConfig.from_legacy(umap)
    assert (config.keep_ratio, config.mask_mode, config.constraint) == (0.6, "model", "relative")
    with pytest.raises(ValueError, match="keep_ratio"):
        UnleashConfig.from_legacy(dict(umap, keep_ratio=5))
