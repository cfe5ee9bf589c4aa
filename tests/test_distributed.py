"""fit / ξ / gathering under torchrun with 2 CPU processes (gloo) against one process.

One ``torchrun --nproc_per_node 2`` launch runs every scenario of ``tests/ddp_worker.py``
(module-scoped fixture, ~25 s on 2 cores); each test compares the ranks with each other and with
the same scenario run here in one process with twice the per-rank batch size.

What equivalence holds, and is asserted:

* ξ and gathered per-sample outputs equal one process over the same data, also when the
  ``DistributedSampler`` pads (37 samples on 2 ranks) and when it shuffles: rtol 1e-6.
* Fitted weights / UMAP scores equal a one-process fit with batch ``2 * per-rank batch`` when
  every batch lies on the same side of ξ (pure descent or pure ascent): the flooding sign is
  then the same on every rank, and DDP's gradient average is the gradient of the union batch.
  atol 1e-5 on weights (float32 all-reduce vs. one big batch; observed ~3e-8).
* When batches straddle ξ, DDP optimises the mean over ranks of ``|CE_r − ξ| + ξ`` (flooding
  per rank batch), which is *not* the union objective ``|CE − ξ| + ξ``: the test reproduces the
  per-rank objective by hand in one process (atol 1e-5) and checks that it differs from the
  union fit by far more than the tolerance.
* UMAP scores, exact masks and every step's sampled training threshold are bit-identical on
  both ranks; against one process they agree up to float rounding (scores atol 1e-5, masks with
  at most 0.01% of entries flipped by a rounding-level tie at the threshold).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from oodunleash import flooding_loss
from tests import ddp_worker as worker
from tests.helpers.toys import same_state, state_copy

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).resolve().parent

SINGLE_BATCH = worker.WORLD * worker.BATCH  # one process reads both ranks' batches at once
RTOL = 1e-6  # ξ, logits: float32 sums in a different order
ATOL_WEIGHTS = 1e-5  # weights after 12 SGD steps: float32 all-reduce vs one big batch


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _history(runs: dict[str, Any]) -> list[dict[str, float]]:
    return runs["history"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run the worker under ``torchrun --standalone --nproc_per_node 2``; each rank's results."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(  # the repository: the worker imports tests.helpers
        [str(TESTS.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(worker.WORLD), str(TESTS / "ddp_worker.py"), str(out)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as error:  # a hang in a collective must not block CI
        pytest.fail(f"torchrun did not finish in 300 s:\n{error.stdout}\n{error.stderr}")
    if done.returncode != 0:
        pytest.fail(
            f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(worker.WORLD)]


# --------------------------------------------------------------------------- set-up
def test_fit_starts_the_process_group_from_torchrun_env(ranks):
    # The worker never calls init_process_group: estimate_loss_constraint did, from the env.
    for r in ranks:
        assert r["auto_init"] == {"initialized": True, "world": 2, "backend": "gloo"}


def test_only_rank_0_prints_progress(ranks):
    assert "UM 1/1" in ranks[0]["progress"]["stderr"]
    assert "training loss for ξ" in ranks[0]["progress"]["stderr"]
    assert ranks[1]["progress"]["stderr"] == ""


# --------------------------------------------------------------------------- ξ and gathering
def test_xi_equals_single_process_despite_padding_and_shuffling(ranks):
    single = worker.scenario_xi(SINGLE_BATCH)
    for r in ranks:
        for key in ("plain", "shuffled"):
            # Bit-identical across ranks: all read the same all-reduced sums.
            assert r["xi"][key] == ranks[0]["xi"][key]
            assert r["xi"][key] == pytest.approx(single[key], rel=RTOL)
        # Shuffling only changes the order in which the losses are summed, i.e. the last bits.
        assert r["xi"]["shuffled"] == pytest.approx(r["xi"]["plain"], rel=RTOL)


def test_xi_would_differ_if_padding_were_counted(ranks):
    # Guards the test above: counting sample 0 twice (rank 1's padding) moves ξ measurably.
    data = worker.make_data(37)
    net = worker.make_net().eval()
    from oodunleash.masks.layer_masks import LayerMasks

    with torch.no_grad(), LayerMasks(net, keep_ratio=0.965, seed=3).attached():
        x, y, _ = data.tensors
        ce = F.cross_entropy(net(x), y, reduction="none").double()
        padded = (ce.sum() + ce[0]) / 38
    assert abs(float(padded) - ranks[0]["xi"]["plain"]) > 100 * RTOL * ranks[0]["xi"]["plain"]


def test_gather_restores_dataset_order_and_drops_padding(ranks):
    net = worker.make_net().eval()
    x, _, _ = worker.make_data(37).tensors
    with torch.no_grad():
        expected = net(x)
    for r in ranks:
        gathered = r["gather"]
        # shuffle=False: exactly the single-process pass, in dataset order, 37 rows.
        assert torch.equal(gathered["index_False"], torch.arange(37))
        torch.testing.assert_close(gathered["logits_False"], expected, rtol=RTOL, atol=1e-6)
        # shuffle=True: the sampler's order, every sample once, rows aligned with their index.
        index = gathered["index_True"]
        assert torch.equal(index.sort().values, torch.arange(37))
        assert not torch.equal(index, torch.arange(37))
        torch.testing.assert_close(gathered["logits_True"], expected[index], rtol=RTOL, atol=1e-6)


# --------------------------------------------------------------------------- UM
@pytest.mark.parametrize(
    ("scenario", "xi", "fitted", "below"),
    [("um_descent", 1e-3, False, 0.0), ("um_ascent", 1.05, True, 1.0)],
)
def test_um_equals_single_process_with_the_union_batch(ranks, scenario, xi, fitted, below):
    single = worker.scenario_um(SINGLE_BATCH, xi, fitted=fitted)
    assert _max_diff(ranks[0][scenario]["state"], ranks[1][scenario]["state"]) == 0.0
    assert _max_diff(ranks[0][scenario]["state"], single["state"]) < ATOL_WEIGHTS
    for ddp_epoch, one_epoch in zip(_history(ranks[0][scenario]), _history(single), strict=True):
        # Every batch of every rank on the same side of ξ: the premise of the equivalence.
        assert ddp_epoch["frac_below_constraint"] == one_epoch["frac_below_constraint"] == below
        for key in ("loss", "ce", "accuracy", "lr"):
            assert ddp_epoch[key] == pytest.approx(one_epoch[key], rel=RTOL, abs=1e-9)


def _per_rank_flooding_reference(xi: float) -> dict[str, torch.Tensor]:
    """One process reproducing DDP's objective: mean over ranks of |CE_r − ξ| + ξ.

    Same optimiser and schedule as fit's defaults (SGD, momentum 0.9, Nesterov, weight decay
    5e-4, per-step cosine). An unshuffled DistributedSampler hands rank r the samples at
    positions r, r + 2, ... of each union batch.
    """
    net = worker.fitted_net()
    loader = DataLoader(worker.make_data(48, seed=1), batch_size=SINGLE_BATCH)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    epochs = 2
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader) * epochs)
    for _ in range(epochs):
        for x, y, _ in loader:
            per_rank = [
                flooding_loss(F.cross_entropy(net(x[r :: worker.WORLD]), y[r :: worker.WORLD]), xi)
                for r in range(worker.WORLD)
            ]
            optimizer.zero_grad()
            torch.stack(per_rank).mean().backward()
            optimizer.step()
            scheduler.step()
    return state_copy(net)


def test_um_floods_per_rank_when_batches_straddle_xi(ranks):
    ddp = ranks[0]["um_mixed"]
    assert _max_diff(ddp["state"], ranks[1]["um_mixed"]["state"]) == 0.0
    # ξ estimated from the training data: batches fall on both sides of it.
    assert any(0.0 < h["frac_below_constraint"] < 1.0 for h in _history(ddp))
    union = worker.scenario_um(SINGLE_BATCH, None)
    assert ddp["xi"] == pytest.approx(union["xi"], rel=RTOL)
    per_rank = _per_rank_flooding_reference(ddp["xi"])
    assert _max_diff(ddp["state"], per_rank) < ATOL_WEIGHTS
    # The single-process union objective |CE − ξ| is a different fit, by far more than the
    # tolerance: the comparison above can tell the two apart.
    assert _max_diff(ddp["state"], union["state"]) > 1000 * ATOL_WEIGHTS


def test_um_with_outlier_exposure_equals_single_process(ranks):
    # The outlier loader is sharded and reshuffled on every pass (set_epoch) like the ID one.
    single = worker.scenario_um_outliers(SINGLE_BATCH)
    ddp = ranks[0]["um_outliers"]
    assert _max_diff(ddp["state"], ranks[1]["um_outliers"]["state"]) == 0.0
    assert _max_diff(ddp["state"], single["state"]) < ATOL_WEIGHTS
    for ddp_epoch, one_epoch in zip(_history(ddp), _history(single), strict=True):
        assert ddp_epoch["outlier_loss"] == pytest.approx(one_epoch["outlier_loss"], rel=RTOL)


# --------------------------------------------------------------------------- UMAP
def test_umap_masks_and_thresholds_identical_on_every_rank(ranks):
    a, b = ranks[0]["umap"], ranks[1]["umap"]
    assert a["sampled"] == ["2"]  # the 512x300 layer takes its threshold from a sample
    assert a["train_masks"].shape == (12, 512, 300)  # 2 epochs x 6 steps of that layer
    assert torch.equal(a["train_masks"], b["train_masks"])
    # Thresholds are reused or recomputed from the scores alone, so the ranks decide alike.
    assert a["threshold_updates"] == b["threshold_updates"]
    assert _max_diff(a["scores"], b["scores"]) == 0.0
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
    # keep_ratio 0.5, exact top-k: half of every layer.
    assert all(float(m.mean()) == pytest.approx(0.5, abs=1e-3) for m in a["masks"].values())


def test_umap_equals_single_process_with_the_union_batch(ranks):
    # Shuffled DistributedSampler; one process uses a 1-replica DistributedSampler with the
    # same seed, whose permutation is the union of the two ranks' batches step by step.
    ddp = ranks[0]["umap"]
    single = worker.scenario_umap(SINGLE_BATCH)
    assert all(h["frac_below_constraint"] == 0.0 for h in _history(ddp))
    assert _max_diff(ddp["scores"], single["scores"]) < ATOL_WEIGHTS
    flipped = (ddp["train_masks"] != single["train_masks"]).float().mean()
    assert float(flipped) <= 1e-4
    for name, mask in ddp["masks"].items():
        assert float((mask != single["masks"][name]).float().mean()) <= 1e-4


def test_compiled_umap_under_ddp_equals_eager_single_process(ranks):
    # Masked weights made before the compiled forward pass must still reach every rank's
    # gradient all-reduce: both ranks end equal, and equal to one eager process.
    a, b = ranks[0]["umap_compiled"], ranks[1]["umap_compiled"]
    assert _max_diff(a["scores"], b["scores"]) == 0.0
    single = worker.scenario_umap_compiled(SINGLE_BATCH, compile_=False)
    assert _max_diff(a["scores"], single["scores"]) < ATOL_WEIGHTS
    for name, mask in a["masks"].items():
        assert float((mask != single["masks"][name]).float().mean()) <= 1e-4


# --------------------------------------------------------------------------- failure modes
def test_nan_on_one_rank_stops_every_rank_and_restores_weights(ranks):
    single = worker.scenario_nan(SINGLE_BATCH)
    assert single["message"] is not None and single["restored"]
    for r in ranks:
        assert r["nan"]["restored"]
        assert "epoch 1, batch 1 (on at least one rank)" in r["nan"]["message"]
    assert "became nan" in ranks[1]["nan"]["message"]  # rank 1 read the NaN sample


def test_uneven_shards_raise_on_every_rank_instead_of_hanging(ranks):
    for r in ranks:
        assert "ranks disagree on the number of batches per epoch: from 2 to 3" in (
            r["uneven"]["message"] or ""
        )


def test_model_after_fit_is_plain_and_refits_in_sync(ranks):
    for r in ranks:
        # Gradients of a later backward are this rank's own, not all-reduced.
        assert r["after_fit"]["local_grads"]
    assert (
        _max_diff(ranks[0]["after_fit"]["refit_state"], ranks[1]["after_fit"]["refit_state"]) == 0
    )


def test_batchnorm_statistics_identical_on_every_rank_after_fit(ranks):
    # Every rank must hold the same model afterwards, running statistics included, or the
    # ranks would evaluate their shards with slightly different models.
    a, b = ranks[0]["batchnorm"]["state"], ranks[1]["batchnorm"]["state"]
    assert _max_diff(a, b) == 0.0
    assert float(a["1.running_mean"].abs().sum()) > 0  # the statistics did move


# --------------------------------------------------------------------------- evaluation
def _flatten(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_evaluate_metrics_equal_single_process(ranks):
    # 37 ID and 29 OOD test samples (both padded on rank 1), scores that read logits
    # (energy, msp), fitted features (mahalanobis, knn: fit_scores gathers 45 training
    # samples) and per-batch gradients (gradnorm, computed on the plain model).
    single = _flatten(worker.scenario_metrics(SINGLE_BATCH)["results"])
    for r in ranks:
        ddp = _flatten(r["metrics"]["results"])
        assert ddp.keys() == single.keys()
        assert {k.split("/")[0] for k in ddp} >= set(worker.SCORES)
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, rel=RTOL, abs=1e-9), key
        # Each rank evaluated its own shard only: 19 + 15 of the 37 + 29 test samples.
        assert r["metrics"]["evaluated"] == 34


def test_evaluate_concatenates_shards_it_cannot_shard_itself(ranks):
    # Each rank passes a list holding its own half of the data: nothing may be dropped.
    single = _flatten(worker.scenario_metrics(SINGLE_BATCH)["listed"])
    for r in ranks:
        ddp = _flatten(r["metrics"]["listed"])
        assert ddp.keys() == single.keys()
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, rel=RTOL, abs=1e-9), key
    # ... and rank 0 alone says that oodunleash left those iterables as they were.
    assert any("cannot shard it" in w for w in ranks[0]["metrics"]["warnings"])
    assert ranks[1]["metrics"]["warnings"] == []


def test_tune_makes_the_same_choice_on_every_rank(ranks):
    first, second = (r["tune"] for r in ranks)
    # Both fine-tunes screened, one trained fully (or none, below the accuracy floor).
    assert {"unchanged"} <= set(first["rows"]) and len(first["rows"]) <= 2
    assert set(first["rows"]) | set(first["dropped"]) == {"unchanged", "um", "um control"}
    assert first["dropped"] == second["dropped"]
    assert first["best"] == second["best"]
    assert first["rows"] == second["rows"]  # validation metrics gathered over both shards
    assert first["metrics"] == second["metrics"]
    assert any(" + " in label for label in first["metrics"]["unchanged"])  # fused variants
    assert same_state(first["state"], second["state"])
