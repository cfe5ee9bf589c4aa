"""Scenarios of ``tests/test_distributed.py``, each runnable with 2 ranks and in one process.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT``
runs every scenario under DDP (gloo, CPU) and saves each rank's results to ``OUT/rank{r}.pt``;
the test runs the same functions in its own process with twice the batch size and compares.
Not a test module itself (no ``test_`` prefix): pytest does not collect it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from oodunleash import OODUnleash, Relative, TrainingDivergedError
from oodunleash.runtime.distributed import gather_samples, is_distributed, rank, world_size
from tests.helpers.toys import state_copy

#: Per-rank batch size under DDP; the single-process reference uses ``WORLD * BATCH``.
BATCH = 4
WORLD = 2


def make_data(n: int, seed: int = 0, dim: int = 8, classes: int = 3) -> TensorDataset:
    """Gaussian blobs with a learnable class signal, plus each sample's index."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) + F.one_hot(y, dim).float() * 1.5
    return TensorDataset(x, y, torch.arange(n))


def make_net(seed: int = 0, wide: bool = False) -> nn.Module:
    """A small MLP without BatchNorm or dropout, so DDP equals one process exactly.

    ``wide`` adds a 512x300 layer (153,600 weights): above LayerMasks' default
    ``sample_size`` (131,072), so UMAP trains that layer with the sampled-threshold mask.
    """
    torch.manual_seed(seed)
    if wide:
        return nn.Sequential(
            nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 512), nn.ReLU(), nn.Linear(512, 3)
        )
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def dist_sampler(dataset: TensorDataset, shuffle: bool) -> DistributedSampler:
    """A DistributedSampler for this process: over all ranks, or one replica in one process
    (whose shuffled order is the union of the ranks' orders, step by step)."""
    if is_distributed():
        return DistributedSampler(dataset, shuffle=shuffle, seed=0)
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=0)


# --------------------------------------------------------------------------- scenarios
def scenario_xi(batch: int) -> dict[str, Any]:
    """ξ over 37 samples (rank 1 reads one padding sample), from a plain loader (sharded by
    fit's helpers) and from a shuffled DistributedSampler."""
    data = make_data(37)
    net = make_net()
    plain = DataLoader(data, batch_size=batch)
    xi_plain = OODUnleash(net, seed=3).estimate_loss_constraint(plain, progress=False)
    shuffled = DataLoader(data, batch_size=batch, sampler=dist_sampler(data, shuffle=True))
    xi_shuffled = OODUnleash(net, seed=3).estimate_loss_constraint(shuffled, progress=False)
    return {"plain": xi_plain, "shuffled": xi_shuffled}


def scenario_gather(batch: int) -> dict[str, Any]:
    """Per-sample logits gathered over 37 samples, unshuffled and shuffled."""
    data = make_data(37)
    net = make_net().eval()
    out: dict[str, Any] = {}
    for shuffle in (False, True):
        loader = DataLoader(data, batch_size=batch, sampler=dist_sampler(data, shuffle))
        logits, index = [], []
        with torch.no_grad():
            for x, _, i in loader:
                logits.append(net(x))
                index.append(i)
        out[f"logits_{shuffle}"] = gather_samples(torch.cat(logits), loader)
        out[f"index_{shuffle}"] = gather_samples(torch.cat(index), loader)
    return out


def fitted_net() -> nn.Module:
    """``make_net(seed=1)`` trained a little on ``make_data(48, seed=1)`` (full-batch SGD, no
    DDP: the same on every rank). Flooding from above needs a trained model: ξ must lie below
    ln(3), the loss of a uniform guess, and the default recipe sets it to 3x the training
    loss."""
    net = make_net(seed=1)
    x, y, _ = make_data(48, seed=1).tensors
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return net


def scenario_um(batch: int, xi: float | None, fitted: bool = True) -> dict[str, Any]:
    """UM on 48 samples from a plain, unshuffled loader (2 ranks x 6 steps of 4 = 6 x 8),
    from :func:`fitted_net` (or the untrained net). ``xi=None``: ξ from the training data, the
    relative recipe with factor 1 (the model's own training loss), so batches straddle it."""
    net = fitted_net() if fitted else make_net(seed=1)
    loader = DataLoader(make_data(48, seed=1), batch_size=batch)
    constraint = Relative(1.0) if xi is None else xi
    unleashed = OODUnleash(net, method="um", constraint=constraint).fit(
        loader, epochs=2, lr=0.05, progress=False
    )
    return {
        "xi": unleashed.loss_constraint_,
        "state": state_copy(net),
        "history": [{k: v for k, v in h.items() if k != "time_s"} for h in unleashed.history_],
    }


def scenario_um_outliers(batch: int) -> dict[str, Any]:
    """UM with outlier exposure; the outlier loader (shuffled, cycled twice) is sharded too."""
    net = make_net(seed=6)
    loader = DataLoader(make_data(48, seed=6), batch_size=batch)
    outliers = make_data(24, seed=7)
    outlier_loader = DataLoader(
        outliers, batch_size=batch // 2, sampler=dist_sampler(outliers, shuffle=True)
    )
    unleashed = OODUnleash(net, method="um", constraint=1e-3).fit(
        loader,
        epochs=2,
        lr=0.05,
        outlier_loader=outlier_loader,
        progress=False,
    )
    return {
        "state": state_copy(net),
        "history": [{k: v for k, v in h.items() if k != "time_s"} for h in unleashed.history_],
    }


SCORES = ["energy", "msp", "mahalanobis", "knn", "gradnorm"]


def scenario_metrics(batch: int) -> dict[str, Any]:
    """fit_scores + evaluate with plain loaders (sharded by oodunleash) over odd-sized sets:
    the ranks' logits and features must be gathered without the padding."""
    net = make_net(seed=8)
    unleashed = OODUnleash(net)
    train = DataLoader(make_data(45, seed=8), batch_size=batch)
    unleashed.fit_scores(train, scores=["mahalanobis", "knn"], progress=False)
    test = DataLoader(make_data(37, seed=9), batch_size=batch)
    ood = make_data(29, seed=10)
    ood.tensors[0].mul_(3.0)
    evaluated = []  # samples in the main forward pass of each batch (not gradnorm's own)

    def count(_module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled():
            evaluated.append(args[0].shape[0])

    hook = net.register_forward_pre_hook(count)
    results = unleashed.evaluate(
        test, {"far": DataLoader(ood, batch_size=batch)}, scores=SCORES, progress=False
    )
    hook.remove()
    # Lists of batches cannot be sharded by oodunleash: each rank passes its own shard (here
    # positions r, r + 2, ...), and the parts are concatenated, none dropped.
    x, y, _ = make_data(37, seed=9).tensors
    xo = ood.tensors[0]
    r, n = rank(), world_size()
    shard = [(x[i : i + batch * n], y[i : i + batch * n]) for i in range(0, len(x), batch * n)]
    own = [(bx[r::n], by[r::n]) for bx, by in shard] if n > 1 else shard
    ood_own = [(xo[i : i + batch * n][r::n],) for i in range(0, len(xo), batch * n)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        listed = unleashed.evaluate(own, {"far": ood_own}, scores=["energy", "knn"], progress=False)
    return {
        "results": results.to_dict(),
        "evaluated": sum(evaluated),
        "listed": listed.to_dict(),
        "warnings": [str(w.message) for w in caught],
    }


def scenario_umap(batch: int) -> dict[str, Any]:
    """UMAP (descent regime) with a shuffled DistributedSampler and a layer large enough for
    the sampled training threshold; records the training-time mask of that layer every step."""
    net = make_net(seed=2, wide=True)
    data = make_data(48, seed=2)
    loader = DataLoader(data, batch_size=batch, sampler=dist_sampler(data, shuffle=True))
    big = net[2]
    seen: list[Tensor] = []

    def record(module: nn.Module, _args: Any) -> None:
        # Inside the training forward: ``weight`` reads raw * (sampled-threshold mask).
        if module.training and torch.is_grad_enabled():
            seen.append(module.weight.detach() != 0)

    hook = big.register_forward_pre_hook(record)
    unleashed = OODUnleash(
        net, method="umap", keep_ratio=0.5, mask_mode="layer", seed=5, constraint=1e-3
    ).fit(loader, epochs=2, lr=0.1, progress=False)
    hook.remove()
    masks = unleashed.masks_
    return {
        "xi": unleashed.loss_constraint_,
        "scores": {n: masks.layer_scores(n).detach().clone() for n in masks.layer_names},
        "masks": {n: masks.mask(n).clone() for n in masks.layer_names},
        "train_masks": torch.stack(seen),
        "sampled": sorted(masks._samples),  # layers whose training threshold is sampled
        "threshold_updates": masks.threshold_updates,
        "history": [{k: v for k, v in h.items() if k != "time_s"} for h in unleashed.history_],
    }


def scenario_umap_compiled(batch: int, compile_: bool = True) -> dict[str, Any]:
    """The UMAP default under ``fit(compile=...)`` (Dynamo and AOTAutograd, no code
    generation: the masked weights enter the compiled graph as inputs); with
    ``compile_=False`` the same fit in eager mode, the reference."""
    net = make_net(seed=3, wide=True)
    data = make_data(48, seed=3)
    loader = DataLoader(data, batch_size=batch, sampler=dist_sampler(data, shuffle=True))
    compile_arg = {"backend": "aot_eager"} if compile_ else False
    unleashed = OODUnleash(net, method="umap", seed=5, constraint=1e-3).fit(
        loader, epochs=1, lr=0.1, progress=False, training={"compile": compile_arg}
    )
    masks = unleashed.masks_
    return {
        "scores": {n: masks.layer_scores(n).detach().clone() for n in masks.layer_names},
        "masks": {n: masks.mask(n).clone() for n in masks.layer_names},
    }


def scenario_progress() -> dict[str, Any]:
    """What each rank prints to stderr during a fit with progress bars on."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        # factor 0.5: the untrained net's loss x 4 would be above chance (refused)
        # Energy: a KNN default would warn (k > this tiny bank) on every rank, not progress.
        OODUnleash(make_net(), "um", constraint=Relative(0.5), score="energy").fit(
            DataLoader(make_data(16), batch_size=BATCH),
            epochs=1,
            progress=True,
        )
    return {"stderr": buffer.getvalue()}


def scenario_nan(batch: int) -> dict[str, Any]:
    """Sample 3 is NaN: under DDP only rank 1 reads it, yet both ranks must stop together."""
    data = make_data(32)
    data.tensors[0][3] = float("nan")
    net = make_net()
    before = state_copy(net)
    try:
        OODUnleash(net, constraint=0.5).fit(
            DataLoader(data, batch_size=batch), epochs=1, progress=False
        )
        message = None
    except TrainingDivergedError as error:
        message = str(error)
    restored = all(torch.equal(before[k], v) for k, v in state_copy(net).items())
    return {"message": message, "restored": restored}


class _UnevenShards(Sampler[int]):
    """A rank-aware sampler (it has ``num_replicas``/``rank``) with unequal shards."""

    def __init__(self) -> None:
        self.num_replicas, self.rank = world_size(), rank()
        self.indices = list(range(8)) if self.rank == 0 else list(range(8, 20))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def scenario_uneven() -> dict[str, Any]:
    """Ranks with 2 and 3 batches: both must raise instead of waiting for each other."""
    loader = DataLoader(make_data(20), batch_size=BATCH, sampler=_UnevenShards())
    try:
        OODUnleash(make_net(), constraint=0.5).fit(loader, epochs=1, progress=False)
        return {"message": None}
    except ValueError as error:
        return {"message": str(error)}


def scenario_batchnorm() -> dict[str, Any]:
    """A model with BatchNorm: its running statistics move per rank during the last step."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    loader = DataLoader(make_data(32, seed=11), batch_size=BATCH, shuffle=True)
    OODUnleash(net, constraint=1e-3).fit(loader, epochs=1, progress=False)
    return {"state": state_copy(net)}


def scenario_after_fit() -> dict[str, Any]:
    """After fit the model is a plain module again: no DDP hook averages its gradients, and a
    second fit stays in sync across ranks."""
    net = make_net(seed=4)
    loader = DataLoader(make_data(32, seed=4), batch_size=BATCH)
    OODUnleash(net, constraint=1e-3).fit(loader, epochs=1, progress=False)
    x, y, _ = make_data(8, seed=10 + rank()).tensors  # different data on each rank
    net.zero_grad(set_to_none=True)  # fit leaves the last step's (averaged) gradients
    reference = copy.deepcopy(net)
    F.cross_entropy(net(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    local_grads = all(
        torch.equal(p.grad, q.grad)
        for p, q in zip(net.parameters(), reference.parameters(), strict=True)
    )
    net.zero_grad()
    OODUnleash(net, constraint=1e-3).fit(loader, epochs=1, progress=False)
    return {"local_grads": local_grads, "refit_state": state_copy(net)}


def scenario_tune() -> dict[str, Any]:
    """``tune`` under torchrun: every rank fits the same candidates, measures the same
    validation metrics and keeps the same model and score."""
    from oodunleash import tune

    x, y, _ = make_data(96, seed=5).tensors
    net = make_net(seed=5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):  # train to a low loss so ξ = 3x it is a sensible constraint
        optimizer.zero_grad()
        F.cross_entropy(net(x[:64]), y[:64]).backward()
        optimizer.step()
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=BATCH)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=BATCH)
    far = DataLoader(
        TensorDataset(4 * torch.randn(24, 8, generator=torch.Generator().manual_seed(6))),
        batch_size=BATCH,
    )
    result = tune(
        net, train, val, {"far": far}, epochs=1, finetunes=["um", "um control"],
        scores=["energy", "msp", "knn"], progress=False, verbose=False,
    )  # fmt: skip
    rows = result.to_dict()["candidates"]
    return {
        "best": result.best_name,
        "rows": {name: (row["accuracy"], row["mean_fpr95"]) for name, row in rows.items()},
        # every variant's validation metrics, the fused ones built from the gathered values
        "metrics": {name: row["scores"] for name, row in rows.items()},
        "dropped": result.dropped,  # the screening (default promote=1) must agree too
        "state": state_copy(result.best.model),
    }


def run_all(out_dir: str) -> None:
    """Every scenario under torchrun; results of rank r go to ``out_dir/rank{r}.pt``."""
    if dist.is_initialized():
        raise RuntimeError("the worker must start without a process group")
    results: dict[str, Any] = {}
    # First call: oodunleash must start the process group itself from torchrun's env vars.
    results["xi"] = scenario_xi(BATCH)
    results["auto_init"] = {
        "initialized": dist.is_initialized(),
        "world": world_size(),
        "backend": dist.get_backend(),
    }
    results["gather"] = scenario_gather(BATCH)
    results["um_descent"] = scenario_um(BATCH, 1e-3, fitted=False)
    results["um_ascent"] = scenario_um(BATCH, 1.05)
    results["um_mixed"] = scenario_um(BATCH, None)
    results["um_outliers"] = scenario_um_outliers(BATCH)
    results["umap"] = scenario_umap(BATCH)
    results["umap_compiled"] = scenario_umap_compiled(BATCH)
    results["metrics"] = scenario_metrics(BATCH)
    results["progress"] = scenario_progress()
    results["nan"] = scenario_nan(BATCH)
    results["uneven"] = scenario_uneven()
    results["after_fit"] = scenario_after_fit()
    results["batchnorm"] = scenario_batchnorm()
    results["tune"] = scenario_tune()
    torch.save(results, os.path.join(out_dir, f"rank{rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_all(sys.argv[1])
