"""The summary (oodunleash.bench.report): validation-only selection and the trade-off plot."""

from __future__ import annotations

import math

import pytest

from oodunleash.bench import plots, report
from oodunleash.bench.grid import from_name
from oodunleash.bench.report import select_configs


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


def _scored_seed(seed: int, runs: dict[str, tuple[float, float]]) -> dict:
    """A per-seed JSON with val and test blocks: name -> (accuracy, FPR95 on one OOD set)."""

    def block(acc: float, fpr: float) -> dict:
        return {"accuracy": acc, "metrics": {"energy": {"near": {"fpr95": fpr, "auroc": 90.0}}}}

    return {
        "seed": seed,
        "runs": {n: {"val": block(*v), "test": block(*v)} for n, v in runs.items()},
    }


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
