"""The benchmark's own logic: grid names, settings, label noise, ξ recipes, validation-only
selection, and a tiny end-to-end run on scikit-learn's digits."""

from __future__ import annotations

import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from oodunleash.bench import plots, report
from oodunleash.bench.grid import (
    MASKED_RECIPES,
    REFERENCE_KEEP_RATIO,
    FineTune,
    MaskedLoss,
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
from oodunleash.bench.protocol import (
    TensorLoader,
    evaluate_model,
    load_benchmark_data,
    noisy_labels,
    train_classifier,
)
from oodunleash.bench.report import select_configs
from oodunleash.bench.run import run_benchmark
from oodunleash.constraint import DEFAULT_CONSTRAINT_FACTOR, mean_cross_entropy
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


def test_label_noise_flips_to_another_class_at_the_rate():
    labels = torch.arange(20_000) % 6
    assert torch.equal(noisy_labels(labels, 0.0, 6, seed=0), labels)
    noisy = noisy_labels(labels, 0.2, 6, seed=0)
    flipped = noisy != labels
    assert 0.18 < flipped.float().mean() < 0.22
    assert noisy.min() >= 0 and noisy.max() <= 5
    # Same seed, same noise; another seed, other flips.
    assert torch.equal(noisy, noisy_labels(labels, 0.2, 6, seed=0))
    assert not torch.equal(noisy, noisy_labels(labels, 0.2, 6, seed=1))


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


def test_evaluate_model_fits_every_score_that_learns_from_id_data():
    torch.manual_seed(0)
    data = load_benchmark_data("digits", eval_cap=200)
    model = create_model("small_cnn", data["num_classes"])
    ood = {"noise": data["test_ood"]["gaussian"]}
    # DICE and ReAct learn from ID training data, as Mahalanobis and KNN do.
    with pytest.raises(ValueError, match=r"\['react', 'dice'\] learn from ID training data"):
        evaluate_model(model, data["test"], ood, ("energy", "react", "dice"))
    fit_set = (data["train"][0][:300], data["train"][1][:300])
    k = data["num_classes"]
    out = evaluate_model(
        model, data["test"], ood, ("react", "dice"), fit_set=fit_set, num_classes=k
    )
    assert set(out["metrics"]) == {"react", "dice"}
    assert 0 <= out["metrics"]["dice"]["noise"]["fpr95"] <= 100
    # Mahalanobis keeps a mean per class: a fit set missing a class is refused.
    one_class = fit_set[1] == fit_set[1][0]
    with pytest.raises(ValueError, match="fit_set has no image of class"):
        evaluate_model(
            model,
            data["test"],
            ood,
            ("mahalanobis",),
            fit_set=(fit_set[0][one_class], fit_set[1][one_class]),
            num_classes=k,
        )


def test_run_benchmark_rejects_an_unknown_score_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown OOD score 'energi'.*Registered scores"):
        _tiny_run(tmp_path, default_grid(quick=True), scores=("energy", "energi"))
    assert not (tmp_path / "seeds").exists()


def _seed_result(runs: dict[str, tuple[float, float]]) -> dict:
    """A per-seed JSON as run_seed writes it: name -> (val accuracy, val FPR95 on one set)."""

    def block(acc: float, fpr: float) -> dict:
        return {"accuracy": acc, "metrics": {"energy": {"near": {"fpr95": fpr, "auroc": 50.0}}}}

    out = {"runs": {}}
    for name, (acc, fpr) in runs.items():
        entry = {"val": block(acc, fpr)}
        if name != "final":
            entry["config"] = from_name(name).to_dict()
        out["runs"][name] = entry
    return out


def test_select_configs_takes_lowest_fpr_within_the_accuracy_budget():
    seeds = [
        _seed_result(
            {
                "final": (95.0, 60.0),
                "um/control/lr0.01/ep10": (95.0, 61.0),
                "um/train_x3/lr0.01/ep10": (94.2, 40.0),  # within 1 point: chosen
                "um/train_x4/lr0.01/ep10": (93.5, 30.0),  # better FPR, too costly
                "umap/control/lr0.1/ep10": (94.0, 45.0),
                "umap/train_x4/lr0.1/ep10": (92.0, 20.0),  # nothing within budget:
                "umap/train_x3/lr0.1/ep10": (93.0, 50.0),  # the most accurate is the fallback
            }
        )
    ]
    chosen = select_configs(seeds)
    assert chosen == {
        "um": "um/train_x3/lr0.01/ep10",
        "um_control": "um/control/lr0.01/ep10",
        "umap": "umap/train_x3/lr0.1/ep10",
        "umap_control": "umap/control/lr0.1/ep10",
    }
    # A looser budget admits the stronger, costlier fine-tune.
    assert select_configs(seeds, max_acc_drop=2.0)["um"] == "um/train_x4/lr0.01/ep10"


def test_select_configs_pairs_a_variant_with_its_own_control():
    seeds = [
        _seed_result(
            {
                "final": (95.0, 60.0),
                "umap/control/lr0.1/ep10": (94.5, 40.0),
                "umap/train_x3/lr0.1/ep10": (93.0, 30.0),  # too costly
                "umap/control/lr0.05/ep10/keep0.9": (94.8, 50.0),
                "umap/train_x3/lr0.05/ep10/keep0.9": (94.6, 35.0),
            }
        )
    ]
    chosen = select_configs(seeds)
    assert chosen["umap"] == "umap/train_x3/lr0.05/ep10/keep0.9"
    assert chosen["umap_control"] == "umap/control/lr0.05/ep10/keep0.9"


def test_select_configs_leaves_out_a_control_some_seeds_skipped():
    runs = {"final": (95.0, 60.0), "umap/train_x3/lr0.1/ep10": (94.5, 30.0)}
    seeds = [
        _seed_result({**runs, "umap/control/lr0.1/ep10": (94.5, 40.0)}),
        _seed_result(runs),  # the time budget skipped this seed's control
    ]
    assert select_configs(seeds) == {"umap": "umap/train_x3/lr0.1/ep10"}


def _scored_seed(seed: int, runs: dict[str, tuple[float, float]]) -> dict:
    """A per-seed JSON with val and test blocks: name -> (accuracy, FPR95 on one OOD set)."""

    def block(acc: float, fpr: float) -> dict:
        return {"accuracy": acc, "metrics": {"energy": {"near": {"fpr95": fpr, "auroc": 90.0}}}}

    return {
        "seed": seed,
        "runs": {n: {"val": block(*v), "test": block(*v)} for n, v in runs.items()},
    }


def test_partial_runs_compare_with_the_final_model_of_the_same_seeds():
    rs = [
        _scored_seed(0, {"final": (95.0, 60.0), "um/control/lr0.01/ep10": (94.0, 50.0)}),
        _scored_seed(1, {"final": (93.0, 20.0), "umap/control/lr0.1/ep10": (92.5, 10.0)}),
        _scored_seed(2, {"final": (94.0, 40.0), "umap/control/lr0.1/ep10": (93.0, 30.0)}),
    ]
    rows = {row["name"]: row for row in report._partial_runs(rs)}
    assert set(rows) == {"um/control/lr0.01/ep10", "umap/control/lr0.1/ep10"}
    umap = rows["umap/control/lr0.1/ep10"]
    assert umap["seeds"] == [1, 2]
    # The baseline is the final model of seeds 1 and 2; seed 0's stays out.
    assert umap["test"]["final_mean_fpr95"][0] == pytest.approx(30.0)
    assert umap["test"]["mean_fpr95"][0] == pytest.approx(20.0)
    assert umap["test"]["accuracy_change"][0] == pytest.approx(-0.75)
    assert rows["um/control/lr0.01/ep10"]["val"]["accuracy_change"] == (pytest.approx(-1.0), 0.0)
    # A run every seed finished is not partial.
    assert report._partial_runs(rs[1:]) == []


def test_tradeoff_pairs_each_seed_with_its_own_final_model():
    rs = [
        _scored_seed(0, {"final": (95.0, 60.0), "um/train_x3/lr0.01/ep10": (94.0, 30.0)}),
        _scored_seed(1, {"final": (93.0, 20.0), "um/train_x3/lr0.01/ep10": (93.0, 20.0)}),
        _scored_seed(2, {"final": (94.0, 40.0)}),
    ]
    (point,) = report.tradeoff(rs)
    assert point["name"] == "um/train_x3/lr0.01/ep10" and point["seeds"] == [0, 1]
    # Seed 0 halves its FPR95 at −1 point, seed 1 changes nothing: means −25% and −0.5.
    assert point["fpr95_change_pct"][0] == pytest.approx(-25.0)
    assert point["accuracy_change"][0] == pytest.approx(-0.5)
    assert point["fpr95_change_pct"][1] == pytest.approx(math.sqrt(2) * 25.0)


def test_tradeoff_labels_of_points_on_one_spot_do_not_overlap():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xlim(-1, 1)
    ax.set_ylim(-30, 5)
    names = ["umap/train_x3/lr0.1/ep10 (n=6)", "umap/control/lr0.1/ep10 (n=6)", "um (n=3)"]
    plots._label_points(ax, [(0.0, -14.0), (0.01, -14.1), (0.5, 0.0)], names)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    plt.close(fig)
    assert [t.get_text() for t in ax.texts] == names
    assert not boxes[0].overlaps(boxes[1])
    # A label with room keeps its place just above its point.
    assert ax.texts[2].xyann == (4, 3.0)


def _tiny_run(out, grid, **kwargs):
    """A 2-epoch small CNN on digits, one seed, capped evaluation sets."""
    return run_benchmark(
        ["small_cnn:epochs=2"],
        [0],
        out,
        dataset="digits",
        eval_cap=300,
        grid=grid,
        progress=False,
        **kwargs,
    )


@pytest.mark.slow
def test_run_benchmark_quick_end_to_end(tmp_path, capsys):
    # "magnitude" gives ξ close to the training loss: below ln(6) even for a 2-epoch model.
    grid = [FineTune("um", None, 0.01, 1), FineTune("um", MASKED_RECIPES["magnitude"], 0.01, 1)]
    summary = _tiny_run(tmp_path, grid, checkpoints="final", scores=("msp", "energy"))
    per_seed = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert set(per_seed["runs"]) == {"final"} | {ft.name for ft in grid}
    assert len(per_seed["curve"]) == 2
    assert (tmp_path / "checkpoints" / "small_cnn_epochs2_s0" / "epoch002.safetensors").is_file()
    fine = per_seed["runs"]["um/magnitude/lr0.01/ep1"]
    assert fine["xi_value"] == pytest.approx(per_seed["xi"]["magnitude"])
    for block in ("val", "test"):
        assert 0 <= fine[block]["accuracy"] <= 100
        assert set(fine[block]["metrics"]) == {"msp", "energy"}
    assert "small_cnn:epochs=2" in summary["settings"]
    assert (tmp_path / "tradeoff_small_cnn_epochs2.png").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "um/magnitude/lr0.01/ep1" in md and "final model" in md

    # Resuming adds the missing fine-tunes to the same final model, keeping what was done.
    # A ξ multiple the first run never stored is derived from its training loss.
    extra = FineTune("umap", TrainLossMultiple(0.5), 0.1, 1, UmapMask(0.9, "model", layers="ends"))
    _tiny_run(tmp_path, [*grid, extra], resume=True)
    resumed = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert set(resumed["runs"]) == set(per_seed["runs"]) | {extra.name}
    for name, run in per_seed["runs"].items():
        assert resumed["runs"][name] == run, name
    assert resumed["train_time_s"] == per_seed["train_time_s"]
    assert set(resumed["runs"][extra.name]["test"]["metrics"]) == {"msp", "energy"}
    assert resumed["runs"][extra.name]["config"]["keep_ratio"] == 0.9
    assert resumed["runs"][extra.name]["config"]["masked"] == "ends"
    assert resumed["runs"][extra.name]["config"]["mask_mode"] == "model"
    assert resumed["runs"][extra.name]["xi_value"] == pytest.approx(
        0.5 * per_seed["xi"]["train_loss"]
    )
    # Past its deadline, a run records what it skipped, even after its last finished fine-tune.
    late = FineTune("um", TrainLossMultiple(0.5), 0.01, 1)
    _tiny_run(tmp_path, [*grid, extra, late], resume=True, deadline=time.time() - 1)
    cut = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert cut["skipped"] == [late.name] and late.name not in cut["runs"]
    # A ξ the library refuses (100x the loss of a 2-epoch model is above ln 6) is recorded,
    # and the rest of the grid still runs.
    too_high = FineTune("um", TrainLossMultiple(100), 0.01, 1)
    after = FineTune("um", TrainLossMultiple(0.25), 0.01, 1)
    capsys.readouterr()
    _tiny_run(tmp_path, [too_high, after], resume=True, report=True)
    said = capsys.readouterr().out
    assert f"small_cnn:epochs=2 s0: refused {too_high.name}: ξ = " in said
    assert f"small_cnn:epochs=2 s0: {after.name} in " in said and "mean energy FPR95" in said
    refused = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert "not below ln(6)" in refused["refused"][too_high.name]
    assert too_high.name not in refused["runs"] and after.name in refused["runs"]
    assert (
        f"Refused before any step (ξ at or above the loss of a uniform guess): "
        f"{too_high.name} (seeds 0)" in (tmp_path / "results.md").read_text()
    )
    with pytest.raises(ValueError, match=r"No ξ recipe \['nope'\]"):
        _tiny_run(tmp_path, [FineTune("um", MaskedLoss("nope"), 0.01, 1)], resume=True)
    # Resuming on other training data would fine-tune on images the model never saw.
    with pytest.raises(ValueError, match="trained on .* images.*--train-size"):
        _tiny_run(tmp_path, grid, resume=True, train_size=200)
    # ... or on another data set; the refused resume leaves the saved results as they were.
    json_path = tmp_path / "seeds" / "small_cnn_epochs2_s0.json"
    relabelled = json.loads(json_path.read_text()) | {"dataset": "fashion-mnist"}
    json_path.write_text(json.dumps(relabelled))
    with pytest.raises(ValueError, match="trained on 'fashion-mnist'.*'digits'.*--dataset"):
        _tiny_run(tmp_path, [*grid, late], resume=True)
    assert json.loads(json_path.read_text()) == relabelled


def test_resume_without_an_earlier_run_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cannot resume.*--checkpoints final"):
        _tiny_run(tmp_path, default_grid(quick=True), resume=True)


_SLEEPING_POOL = """
import os, sys, time
from oodunleash.bench.run import in_processes

def sleeper(task):
    open(os.path.join(sys.argv[1], f"{os.getpid()}.pid"), "w").close()
    time.sleep(120)
    return task

if __name__ == "__main__":
    for _ in in_processes(sleeper, [0, 1], jobs=2):
        pass
"""


def _running(pid: int) -> bool:
    try:  # a zombie has exited; only its parent has not collected it yet
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_a_parallel_run_stops_its_workers(tmp_path):
    # `kill` (or a job scheduler) on `oodunleash benchmark --jobs N` used to leave the N
    # workers training on, unseen, until they finished.
    script = tmp_path / "pool.py"
    script.write_text(_SLEEPING_POOL)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pids_dir)])
    try:
        deadline = time.monotonic() + 120
        while len(list(pids_dir.iterdir())) < 2:
            assert parent.poll() is None, "the pool script exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start in 120 s"
            time.sleep(0.2)
        workers = [int(p.stem) for p in pids_dir.iterdir()]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in workers)
    finally:
        parent.kill()


def test_import_oodunleash_leaves_the_benchmark_out():
    code = (
        "import oodunleash, sys; "
        "old = ('oodunleash.benchmark', 'oodunleash.datasets', 'oodunleash.demo', "
        "'oodunleash.models'); "
        "loaded = [m for m in sys.modules if m.startswith('oodunleash.bench') or m in old]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("oodunleash.benchmark", "oodunleash.bench.run", "run_seed"),
        ("oodunleash.datasets", "oodunleash.bench.datasets", "FashionMNIST"),
        ("oodunleash.demo", "oodunleash.bench.demo", "run_demo"),
        ("oodunleash.models", "oodunleash.bench.models", "SmallCNN"),
    ],
)
def test_old_paths_warn_and_reexport(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        "assert any(issubclass(w.category, DeprecationWarning) and 'oodunleash.bench' in "
        "str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        f"assert getattr(old, {name!r}) is getattr(importlib.import_module({new!r}), {name!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_classifier_uses_the_library_loop_and_calls_back_after_each_epoch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    seen = []

    def on_epoch(epoch):
        # Called when the epoch's last step is done: the weights are that epoch's.
        seen.append((epoch, net[1].weight.detach().clone()))
        return {"probe": epoch}

    history = train_classifier(
        net, TensorLoader(x, y, 16, seed=0), epochs=2, lr=0.1, on_epoch=on_epoch, progress=False
    )
    assert [h["epoch"] for h in history] == [1, 2] and [h["probe"] for h in history] == [1, 2]
    assert all(0 <= h["accuracy"] <= 100 and h["loss"] > 0 for h in history)
    assert [e for e, _ in seen] == [1, 2] and not torch.equal(seen[0][1], seen[1][1])
    assert torch.equal(seen[1][1], net[1].weight)


def test_run_record_round_trips_through_json():
    from oodunleash.bench.run import RunRecord

    record = RunRecord("small_cnn", "small_cnn", 0.0, 25, 0, "digits", "cpu", 100)
    assert "refused" not in record.to_json()
    record.refused["um/train_x100/lr0.01/ep1"] = "too high"
    data = json.loads(json.dumps(record.to_json()))
    assert RunRecord.from_json(data) == record
    assert list(data)[:8] == ["setting", "model", "label_noise", "epochs", "seed", "dataset",
                              "device", "train_size"]  # fmt: skip
