"""The fine-tune grid (oodunleash.bench.grid): names, defaults, settings and ξ recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodunleash.bench.grid import (
    MASKED_RECIPES,
    REFERENCE_KEEP_RATIO,
    FineTune,
    Setting,
    TrainLossMultiple,
    UmapMask,
    default_grid,
    from_name,
    parse_finetune,
    xi_candidates,
    xi_value,
)
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import TensorLoader, load_benchmark_data, train_classifier
from oodunleash.finetune.constraint import DEFAULT_CONSTRAINT_FACTOR, mean_cross_entropy
from oodunleash.wrapper import METHOD_DEFAULTS

X3 = TrainLossMultiple(3)


@pytest.mark.parametrize("ft", default_grid() + default_grid(quick=True))
def test_finetune_names_round_trip(ft):
    assert from_name(ft.name).name == ft.name
    assert from_name(ft.name).resolved() == ft.resolved()


def test_the_old_string_parser_warns_and_builds_the_dataclass():
    with pytest.warns(DeprecationWarning, match="build oodunleash.bench.grid.FineTune"):
        ft = parse_finetune("umap/train_x2.5/lr0.05/ep10/mag/keep0.9")
    assert ft == FineTune(
        "umap", TrainLossMultiple(2.5), 0.05, 10, UmapMask(keep_ratio=0.9, init="magnitude")
    )


def test_finetune_name_marks_magnitude_init():
    ft = FineTune("umap", X3, 0.1, 10, UmapMask(init="magnitude"))
    assert ft.name == "umap/train_x3/lr0.1/ep10/mag"


def test_finetune_defaults_come_from_the_library():
    um, umap = FineTune("um", X3).resolved(), FineTune("umap", None).resolved()
    assert (um.lr, um.epochs, um.mask) == (
        METHOD_DEFAULTS["um"]["lr"],
        METHOD_DEFAULTS["um"]["epochs"],
        None,
    )
    assert umap.lr == METHOD_DEFAULTS["umap"]["lr"]
    assert (umap.mask.keep_ratio, umap.mask.mode, umap.mask.train_norms) == (
        METHOD_DEFAULTS["umap"]["keep_ratio"],
        METHOD_DEFAULTS["umap"]["mask_mode"],
        METHOD_DEFAULTS["umap"]["train_norms"],
    )


def test_short_name_drops_only_the_method_defaults():
    keep90 = UmapMask(keep_ratio=0.9)
    assert FineTune("umap", X3, 0.1, 10, keep90).short_name == "umap/train_x3/keep0.9"
    assert FineTune("um", None, 0.01, 10).short_name == "um/control"
    # Not a default for this method, or only a prefix of one: kept.
    assert FineTune("um", X3, 0.1, 100).short_name == "um/train_x3/lr0.1/ep100"
    assert FineTune("umap", X3, 0.15, 10, UmapMask()).short_name == "umap/train_x3/lr0.15"


def test_default_grid_starts_with_the_library_defaults_and_their_controls():
    # A run cut short by its time budget must still test what the library does by default.
    default_xi = f"train_x{DEFAULT_CONSTRAINT_FACTOR:g}"
    first = [ft.name for ft in default_grid()[:4]]
    assert first == [
        "um/control/lr0.01/ep10",
        f"um/{default_xi}/lr0.01/ep10",
        "umap/control/lr0.1/ep10/keep0.9/model/norms",
        f"umap/{default_xi}/lr0.1/ep10/keep0.9/model/norms",
    ]
    assert default_xi in {ft.xi.name for ft in default_grid(quick=True) if ft.xi}
    # Every fine-tune with a constraint has its control somewhere in the grid.
    names = {ft.name for ft in default_grid()}
    assert all(ft.control().name in names for ft in default_grid())
    assert all(ft.control().is_control and ft.control().xi is None for ft in default_grid())


def test_a_grid_name_keeps_its_meaning_when_library_defaults_change():
    # "umap/.../ep1" was recorded with the reference's mask (keep 80% per layer, norms
    # frozen); it must not silently become the library's newer UMAP default.
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)
    )
    train = (torch.randn(32, 1, 4, 4), torch.randint(0, 2, (32,)))
    unleashed = from_name("umap/control/lr0.1/ep1").fit(net, train, None, seed=0)
    assert unleashed.keep_ratio == REFERENCE_KEEP_RATIO == 0.8
    assert unleashed.mask_mode == "layer"
    assert not unleashed.train_config_.train_norms
    assert METHOD_DEFAULTS["umap"]["keep_ratio"] != REFERENCE_KEEP_RATIO


def test_the_control_fits_without_flooding():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    train = (torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,)))
    control = FineTune("um", None, epochs=1).fit(net, train, 0.2, seed=0)
    assert control.loss_constraint_ is None  # fit(flooding=False): no ξ at all
    flooded = FineTune("um", X3, epochs=1).fit(net, train, 0.2, seed=0)
    assert flooded.loss_constraint_ == 0.2


def test_finetune_name_marks_keep_ratio_and_round_trips():
    ft = FineTune("umap", TrainLossMultiple(2.5), 0.05, 10, UmapMask(0.9, init="magnitude"))
    assert ft.name == "umap/train_x2.5/lr0.05/ep10/mag/keep0.9"
    assert from_name(ft.name) == ft
    assert ft.control() == FineTune("umap", None, 0.05, 10, UmapMask(0.9, init="magnitude"))
    with pytest.raises(ValueError, match="Unknown option 'fast'.*keep<ratio>.*'ends'"):
        from_name("umap/control/lr0.1/ep10/fast")


def test_finetune_names_choose_umaps_masked_layers():
    ends = from_name("umap/train_x3/lr0.1/ep10/keep0.9/ends")
    assert ends.mask.layers == "ends" and ends.mask.keep_ratio == 0.9
    assert ends.name.endswith("/keep0.9/ends")
    assert ends.control().mask.layers == "ends"
    head = from_name("umap/control/lr0.1/ep10/head")
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)
    )
    assert ends.mask.exclude(net) == ["0", "4"]
    assert head.mask.exclude(net) == ["0", "2"]
    assert from_name("umap/train_x3/lr0.1/ep10/stem").mask.exclude(net) == ["2", "4"]
    assert from_name("umap/control/lr0.1/ep10").mask.exclude(net) is None
    with pytest.raises(ValueError, match="are UMAP options.*Drop them"):
        from_name("um/train_x3/lr0.01/ep10/ends")
    with pytest.raises(ValueError, match="mask options are UMAP's"):
        FineTune("um", X3, mask=UmapMask())
    with pytest.raises(ValueError, match="layers must be 'all', 'ends', 'head' or 'stem'"):
        UmapMask(layers="tail")


def test_finetune_names_choose_one_threshold_for_the_whole_model():
    ft = from_name("umap/train_x3/lr0.1/ep10/keep0.9/ends/model")
    assert (ft.mask.mode, ft.mask.layers, ft.mask.keep_ratio) == ("model", "ends", 0.9)
    assert ft.name == "umap/train_x3/lr0.1/ep10/keep0.9/ends/model"
    assert ft.control().mask.mode == "model"
    assert from_name("umap/control/lr0.1/ep10").mask.mode == "layer"
    with pytest.raises(ValueError, match="are UMAP options.*Drop them"):
        from_name("um/train_x3/lr0.01/ep10/model")
    with pytest.raises(ValueError, match="mode must be 'layer' or 'model'"):
        UmapMask(mode="global")


def test_finetune_names_train_the_norm_layers():
    ft = from_name("umap/train_x3/lr0.1/ep10/keep0.9/model/norms")
    assert ft.mask.train_norms and ft.mask.mode == "model"
    assert ft.name == "umap/train_x3/lr0.1/ep10/keep0.9/model/norms"
    assert ft.control().mask.train_norms
    assert not from_name("umap/control/lr0.1/ep10").mask.train_norms
    with pytest.raises(ValueError, match="are UMAP options"):
        from_name("um/train_x3/lr0.01/ep10/norms")


def test_xi_value_derives_any_multiple_of_the_training_loss():
    xis = {"ref": 0.9, "train_x3": 0.3, "train_loss": 0.1}
    assert xi_value(xis, MASKED_RECIPES["ref"]) == 0.9
    assert xi_value(xis, X3) == 0.3
    assert xi_value(xis, TrainLossMultiple(2.5)) == pytest.approx(0.25)
    assert xi_value(xis, MASKED_RECIPES["dense_ends"]) is None
    assert xi_value({"ref": 0.9}, TrainLossMultiple(2)) is None  # no training loss stored
    with pytest.raises(ValueError, match="Unknown ξ recipe 'train_xbig'"):
        from_name("um/train_xbig/lr0.01/ep10")


def test_setting_parse_defaults_and_options():
    assert Setting.parse("resnet18").epochs == 20
    cfg = Setting.parse("small_cnn:noise=0.2:epochs=40")
    assert (cfg.model, cfg.label_noise, cfg.epochs) == ("small_cnn", 0.2, 40)
    with pytest.raises(ValueError, match="Unknown option 'lr'"):
        Setting.parse("small_cnn:lr=0.1")


@pytest.fixture(scope="module")
def digits_model():
    torch.manual_seed(0)
    data = load_benchmark_data("digits", eval_cap=200)
    x, y = data["train"]
    model = create_model("small_cnn", data["num_classes"])
    train_classifier(model, TensorLoader(x, y, 64, shuffle=True, seed=0), epochs=3, progress=False)
    return model, TensorLoader(x, y, 512, shuffle=False)


def test_xi_candidates_are_consistent(digits_model):
    model, loader = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xis = xi_candidates(model, loader, seed=0)
    train_loss = mean_cross_entropy(model, loader)
    assert xis["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    for k in (2, 3, 4, 8):
        assert xis[f"train_x{k}"] == pytest.approx(k * train_loss, rel=1e-5)
    # Masking out weights at random can only cost loss on average; the model is unchanged.
    for name in ("ref", "ref_avg3", "dense_ends", "keep99"):
        assert math.isfinite(xis[name]) and xis[name] > 0.5 * train_loss, name
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
