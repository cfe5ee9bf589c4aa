"""OODUnleash's options: one config, checked at the boundary, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from oodunleash import OODUnleash
from oodunleash.config import METHOD_DEFAULTS, Masked, Relative, UnleashConfig
from oodunleash.finetune.constraint import estimate_loss_constraint
from oodunleash.scores import get_score
from tests.helpers.toys import ConvNet, labelled_loader


def test_method_defaults_have_one_home():
    from oodunleash import wrapper

    assert wrapper.METHOD_DEFAULTS is METHOD_DEFAULTS
    umap = OODUnleash(ConvNet(width=4, batchnorm=False), "umap")
    assert (umap.keep_ratio, umap.mask_mode, umap.mask_init) == (0.9, "model", "random")
    um = OODUnleash(ConvNet(width=4, batchnorm=False), "um")
    assert (um.keep_ratio, um.mask_mode, um.mask_init) == (None, None, None)


@pytest.mark.parametrize(
    ("option", "value"),
    [(np.float32(0.8), 0.8), (np.float64(0.5), 0.5), (torch.tensor(0.7), 0.7)],
)
def test_numpy_and_torch_scalars_count_as_numbers(option, value):
    unleashed = OODUnleash(
        ConvNet(width=4, batchnorm=False), "umap", keep_ratio=option, constraint=torch.tensor(0.2)
    )
    assert type(unleashed.keep_ratio) is float
    assert unleashed.keep_ratio == pytest.approx(value)
    assert unleashed.constraint == pytest.approx(0.2) and type(unleashed.constraint) is float
    assert Relative(np.float32(2.0)).factor == 2.0
    assert OODUnleash(ConvNet(width=4, batchnorm=False), seed=np.int64(4)).seed == 4


@pytest.mark.parametrize(
    ("option", "value"), [("keep_ratio", 0.8), ("mask_mode", "layer"), ("mask_init", "random")]
)
def test_um_refuses_mask_options(option, value):
    with pytest.raises(ValueError, match=rf"{option} applies to method='umap'.*Drop {option}"):
        OODUnleash(ConvNet(width=4, batchnorm=False), "um", **{option: value})


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
    net = ConvNet(width=4, batchnorm=False)
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
    assert OODUnleash(ConvNet(width=4, batchnorm=False)).config.loss_constraint == Relative(2.0)
    assert OODUnleash(
        ConvNet(width=4, batchnorm=False), constraint="masked"
    ).config.loss_constraint == Masked(0.965)
    assert (
        OODUnleash(ConvNet(width=4, batchnorm=False), constraint=Relative()).constraint
        == "relative"
    )  # shorthand
    assert OODUnleash(
        ConvNet(width=4, batchnorm=False), constraint=Masked(0.9)
    ).constraint == Masked(0.9)
    assert (
        OODUnleash(ConvNet(width=4, batchnorm=False), constraint=0.25).config.loss_constraint
        == 0.25
    )


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
    unleashed = OODUnleash(ConvNet(width=4, batchnorm=False), **options)
    params = unleashed.get_params()
    assert json.loads(json.dumps(params)) == params
    again = OODUnleash(ConvNet(width=4, batchnorm=False), **json.loads(json.dumps(params)))
    assert again.get_params() == params
    assert UnleashConfig.from_dict(params).to_dict() == params


def test_get_params_names_layers_chosen_by_type():
    unleashed = OODUnleash(ConvNet(width=4, batchnorm=False), layers=nn.Conv2d)
    params = unleashed.get_params()
    assert params["layers"] == ["conv"] and params["exclude"] is None
    assert (
        OODUnleash(ConvNet(width=4, batchnorm=False), **params).layer_names == unleashed.layer_names
    )


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
    assert "keep_ratio" not in repr(OODUnleash(ConvNet(width=4, batchnorm=False), "um"))
    assert "keep_ratio=0.9" in repr(OODUnleash(ConvNet(width=4, batchnorm=False), "umap"))


def test_estimate_loss_constraint_honours_mask_init():
    net = ConvNet(width=4, batchnorm=False)
    data = labelled_loader(32, size=6, signal=False)
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
    assert OODUnleash(ConvNet(width=4, batchnorm=False), **config.to_dict()).layer_names == [
        "conv",
        "fc",
    ]
    umap = dict(um, method="umap", constraint="relative", keep_ratio=0.6, mask_mode="model")
    config = UnleashConfig.from_legacy(umap)
    # In release 0.1 "relative" meant 3x the training loss, and it still does for its files.
    assert (config.keep_ratio, config.mask_mode, config.constraint) == (0.6, "model", Relative(3.0))
    with pytest.raises(ValueError, match="keep_ratio"):
        UnleashConfig.from_legacy(dict(umap, keep_ratio=5))


@pytest.mark.parametrize("xi", [0, -1.0, float("nan")])
def test_bad_loss_constraint(xi):
    with pytest.raises(ValueError, match="loss_constraint"):
        OODUnleash(ConvNet(dropout=0.5), constraint=xi).fit(labelled_loader(), progress=False)


def test_bad_keep_ratio_and_method():
    with pytest.raises(ValueError, match="keep_ratio"):
        OODUnleash(ConvNet(dropout=0.5), method="umap", keep_ratio=1.2)
    with pytest.raises(ValueError, match="method"):
        OODUnleash(ConvNet(dropout=0.5), method="prune")
    with pytest.raises(TypeError, match="nn.Module"):
        OODUnleash(lambda x: x)
