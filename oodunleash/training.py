"""The forgetting fine-tune: UM (weights) or UMAP (mask scores) with the flooding objective.

Both minimise ``|CE − ξ| + ξ`` per batch (Ishida et al.'s flooding): gradient descent while
the batch loss is above ξ, gradient ascent below it, so the model settles around ξ instead of
driving the loss of memorised atypical samples to zero. An optional outlier-exposure term adds
OE or Energy-OE on auxiliary outliers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import check_labels, check_logits, images_of, iter_batches
from .distributed import (
    all_reduce_sum,
    any_rank,
    check_distributed_sampler,
    check_same_on_all_ranks,
    is_distributed,
    is_main_process,
    sync_buffers,
)

__all__ = [
    "LossConstraintTooHighError",
    "TrainConfig",
    "TrainingDivergedError",
    "energy_oe_loss",
    "flooding_loss",
    "oe_loss",
    "train",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the weights were restored to the last good epoch."""


class LossConstraintTooHighError(ValueError):
    """ξ is at or above ``ln(num_classes)``, the loss of a uniform guess. Raised before any
    training step, so the model is unchanged; a sweep can catch it and go on."""


def flooding_loss(ce: Tensor, level: float | None) -> Tensor:
    """The flooding objective ``|ce − level| + level``.

    Its gradient equals that of ``ce`` when ``ce > level`` and its negative below: descent
    above the level, ascent below. ``level=None`` gives plain cross-entropy (the control).

    Example:
        >>> ce = torch.tensor(0.2, requires_grad=True)
        >>> flooding_loss(ce, 0.5).backward()
        >>> ce.grad
        tensor(-1.)
    """
    if level is None:
        return ce
    return (ce - level).abs() + level


def oe_loss(outlier_logits: Tensor) -> Tensor:
    """Outlier exposure (Hendrycks et al. 2019): cross-entropy from the softmax to the uniform
    distribution, averaged over the outliers."""
    return -(outlier_logits.log_softmax(dim=1).mean(dim=1)).mean()


def energy_oe_loss(
    id_logits: Tensor, outlier_logits: Tensor, m_in: float = -25.0, m_out: float = -7.0
) -> Tensor:
    """Energy-bounded learning (Liu et al. 2020): squared hinge pushing ID energy below
    ``m_in`` and outlier energy above ``m_out`` (energy = −logsumexp of the logits)."""
    energy_in = -torch.logsumexp(id_logits, dim=1)
    energy_out = -torch.logsumexp(outlier_logits, dim=1)
    return F.relu(energy_in - m_in).pow(2).mean() + F.relu(m_out - energy_out).pow(2).mean()


def check_below_chance(loss_constraint: float | None, num_classes: int) -> None:
    """ξ must lie below ``ln(num_classes)``, the cross-entropy of a uniform guess: flooding
    around a higher level climbs *up* the loss and trains the model to be wrong. Above a
    quarter of it a warning is given: on the benchmark, such levels (ξ = 0.49 and 0.70 with
    6 classes) cost UM 13-18 points of ID accuracy."""
    if loss_constraint is None:
        return
    chance = math.log(num_classes)
    if 0.25 * chance < loss_constraint < chance and is_main_process():
        warnings.warn(
            f"The loss constraint ξ = {loss_constraint:.4g} is more than a quarter of the "
            f"loss of a uniform guess (ln({num_classes}) = {chance:.4g}); flooding this high "
            "usually costs ID accuracy. The default recipe (a multiple of the training loss) assumes a "
            "model trained to a low training loss; pass a smaller loss_constraint or "
            "constraint_factor if this one is not.",
            stacklevel=3,
        )
    if loss_constraint >= math.log(num_classes):
        raise LossConstraintTooHighError(
            f"The loss constraint ξ = {loss_constraint:.4g} is not below ln({num_classes}) = "
            f"{math.log(num_classes):.4g}, the loss of a uniform guess over {num_classes} "
            "classes; flooding towards it would train the model to be wrong. Pass a smaller "
            "loss_constraint, or lower constraint_factor (the default recipe sets ξ to a multiple "
            "of the training loss, too high for a model that fits its data this poorly)."
        )


@dataclass
class TrainConfig:
    """How the fine-tune runs. Defaults are documented in :meth:`OODUnleash.fit`.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable taking the parameters;
    ``schedule`` is ``"cosine"`` (per step, to zero), ``"constant"`` or a callable
    ``(optimizer, total_steps) -> scheduler`` stepped once per batch.

    Example:
        >>> TrainConfig(epochs=1, outlier_loss="energy").outlier_weight  # Energy-OE default
        0.1
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> history = train(net, list(net.parameters()), data, loss_constraint=0.5,
        ...                 config=TrainConfig(epochs=1), device=torch.device("cpu"),
        ...                 progress=False)
        >>> len(history), history[0]["epoch"]
        (1, 1)
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str | OptimizerFactory = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str | SchedulerFactory = "cosine"
    amp: bool = False
    max_grad_norm: float | None = None
    freeze_norm_stats: bool = False
    train_norms: bool = False  # UMAP: read by OODUnleash when it picks the trained parameters
    outlier_loss: Literal["oe", "energy"] | None = None
    outlier_weight: float | None = None
    energy_margins: tuple[float, float] = (-25.0, -7.0)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.outlier_loss not in (None, "oe", "energy"):
            raise ValueError(f"outlier_loss must be 'oe' or 'energy', got {self.outlier_loss!r}.")
        if self.outlier_loss is not None and self.outlier_weight is None:
            # The published defaults: 0.5 for OE, 0.1 for Energy-OE.
            self.outlier_weight = 0.5 if self.outlier_loss == "oe" else 0.1

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables shown by name)."""
        out = asdict(self)
        for key in ("optimizer", "schedule"):
            if callable(out[key]):
                out[key] = getattr(out[key], "__name__", "custom")
        return out


def _make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if callable(cfg.optimizer):
        return cfg.optimizer(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(
        f"optimizer must be 'sgd', 'adam', 'adamw' or a callable, got {cfg.optimizer!r}."
    )


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    if callable(cfg.schedule):
        return cfg.schedule(optimizer, total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"schedule must be 'cosine', 'constant' or a callable, got {cfg.schedule!r}.")


def _cycle(loader: Iterable) -> Iterator[Tensor]:
    """Endless stream of outlier images, re-iterating the loader when it runs out."""
    for cycle in itertools.count():
        empty = True
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles only when told
            sampler.set_epoch(cycle)
        for batch in loader:
            empty = False
            yield images_of(batch)
        if empty:
            raise ValueError("The outlier loader yielded no batches: is the dataset empty?")


@contextlib.contextmanager
def _norm_stats_frozen(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Keep BatchNorm layers in eval mode (running statistics fixed) while training."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    if enabled:
        for m in norms:
            m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def train(
    module: nn.Module,
    params: list[nn.Parameter],
    loader: Iterable,
    *,
    loss_constraint: float | None,
    config: TrainConfig,
    device: torch.device,
    outlier_loader: Iterable | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
    hook: Any = None,
) -> list[dict[str, float]]:
    """Run the fine-tune of ``params`` (which belong to ``module``) and return the history.

    ``module`` maps images to logits. On a NaN/inf loss the state of ``module`` is restored to
    the end of the last complete epoch and :class:`TrainingDivergedError` is raised; on any other
    exception (a ``KeyboardInterrupt`` included) the state is restored the same way and the
    exception propagates.

    ``hook`` (see :class:`oodunleash.resume.EpochHook`): ``hook.start(optimizer, scheduler,
    scaler)`` returns the first epoch and the history so far (a resumed fit);
    ``hook.epoch_end(history, optimizer, scheduler, scaler)`` runs after each epoch.
    """
    check_distributed_sampler(loader)
    if outlier_loader is not None and config.outlier_loss is None:
        # A copy: the caller's config stays as given.
        config = replace(config, outlier_loss="oe")
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch is None and not callable(config.schedule) and config.schedule != "constant":
        raise TypeError(
            "The cosine schedule needs len(loader); this loader has none. Pass "
            "schedule='constant' or a scheduler factory."
        )
    if steps_per_epoch == 0:
        raise ValueError("The data loader has no batches: is the dataset empty?")

    trained = module
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        # Uneven shards would leave one rank waiting in a gradient all-reduce forever.
        check_same_on_all_ranks(
            -1 if steps_per_epoch is None else steps_per_epoch,
            "the number of batches per epoch",
            device,
        )
        ids = [device] if device.type == "cuda" else None
        # The wrapper broadcasts rank 0's parameters and buffers, so all ranks start equal.
        # Gradients are averaged over ranks, so each rank's flooding term |CE_r - ξ| acts on
        # its own per-rank batch (like BatchNorm statistics), not on the global batch.
        trained = DistributedDataParallel(module, device_ids=ids)

    optimizer = _make_optimizer(params, config)
    scheduler = _make_scheduler(optimizer, config, (steps_per_epoch or 1) * config.epochs)
    use_amp = config.amp and device.type in ("cuda", "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    outliers = _cycle(outlier_loader) if outlier_loader is not None else None

    history: list[dict[str, float]] = []
    first_epoch = 0
    if hook is not None:
        first_epoch, history = hook.start(optimizer, scheduler, scaler)
    good_state = _snapshot(module)
    was_training = module.training
    show = progress and is_main_process()
    try:
        module.train()
        with _norm_stats_frozen(module, config.freeze_norm_stats):
            for epoch in range(first_epoch, config.epochs):
                sampler = getattr(loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                started = time.perf_counter()
                sums = torch.zeros(6, dtype=torch.float64)  # loss, ce, correct, below, n, out
                batches = 0
                bar = tqdm(
                    iter_batches(loader, device),
                    total=steps_per_epoch,
                    desc=f"{desc} {epoch + 1}/{config.epochs}",
                    disable=not show,
                    leave=False,
                )
                for step, (images, labels) in enumerate(bar):
                    n_id = images.shape[0]
                    if outliers is not None:
                        images = torch.cat([images, next(outliers).to(device)])
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        logits = trained(images)
                    logits = check_logits(logits, images.shape[0]).float()
                    check_labels(labels, logits.shape[1])
                    if epoch == 0 and step == 0:
                        check_below_chance(loss_constraint, logits.shape[1])
                    id_logits = logits[:n_id]
                    ce = F.cross_entropy(id_logits, labels)
                    loss = flooding_loss(ce, loss_constraint)
                    out_term = torch.zeros((), device=device)
                    if outliers is not None:
                        if config.outlier_loss == "oe":
                            out_term = oe_loss(logits[n_id:])
                        else:
                            out_term = energy_oe_loss(
                                id_logits, logits[n_id:], *config.energy_margins
                            )
                        loss = loss + config.outlier_weight * out_term
                    # Decided jointly: a rank raising alone would leave the others hanging.
                    # The handler below restores the last good state before this propagates.
                    if any_rank(not bool(torch.isfinite(loss)), device):
                        raise TrainingDivergedError(
                            f"The loss became {float(loss.detach())} at epoch {epoch + 1}, batch {step + 1}"
                            f"{' (on at least one rank)' if is_distributed() else ''}. "
                            f"The weights were restored to the end of epoch {epoch} "
                            f"({'the start of fitting' if epoch == 0 else 'the last good one'}). "
                            "Lower the learning rate, enable max_grad_norm, or check the inputs "
                            "for NaN."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if config.max_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    with torch.no_grad():
                        sums += torch.tensor(
                            [
                                float(loss) * n_id,
                                float(ce) * n_id,
                                float((id_logits.argmax(1) == labels).sum()),
                                float(loss_constraint is not None and float(ce) < loss_constraint),
                                n_id,
                                float(out_term) * n_id,
                            ],
                            dtype=torch.float64,
                        )
                    batches += 1
                    if show and step % 10 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}", ce=f"{ce.item():.4f}")
                bar.close()
                totals = all_reduce_sum(sums.to(device)).cpu()
                n_batches = all_reduce_sum(torch.tensor(float(batches), device=device)).item()
                n = totals[4].item()
                record = {
                    "epoch": epoch + 1,
                    "loss": totals[0].item() / n,
                    "ce": totals[1].item() / n,
                    "accuracy": totals[2].item() / n,
                    "frac_below_constraint": totals[3].item() / n_batches,
                    "lr": optimizer.param_groups[0]["lr"],
                    "time_s": time.perf_counter() - started,
                }
                if outliers is not None:
                    record["outlier_loss"] = totals[5].item() / n
                history.append(record)
                # Each rank's last forward moved its BatchNorm statistics on its own batch.
                sync_buffers(module)
                if hook is not None:
                    hook.epoch_end(history, optimizer, scheduler, scaler)
                good_state = _snapshot(module)
    except BaseException:
        # Never leave the model half-trained after an error or a Ctrl-C.
        module.load_state_dict(good_state)
        raise
    finally:
        module.train(was_training)
        # The last step's gradients would hold a model-sized block of memory for nothing.
        optimizer.zero_grad(set_to_none=True)
    return history
