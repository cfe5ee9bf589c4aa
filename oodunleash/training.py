"""The forgetting fine-tune: UM (weights) or UMAP (mask scores) with the flooding objective.

Both minimise ``|CE − ξ| + ξ`` per batch (Ishida et al.'s flooding): gradient descent while
the batch loss is above ξ, gradient ascent below it, so the model settles around ξ instead of
driving the loss of memorised atypical samples to zero. An optional outlier-exposure term adds
OE or Energy-OE on auxiliary outliers.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._divergence import DivergenceCheck, TrainingDivergedError
from ._losses import (
    LossConstraintTooHighError,
    check_below_chance,
    energy_oe_loss,
    flooding_loss,
    oe_loss,
)
from .batches import cast_images, check_labels, check_logits, images_of, iter_batches, model_dtype
from .distributed import (
    all_reduce_sum,
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
    "norm_affine_parameters",
    "oe_loss",
    "train",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


#: Normalisation layers whose affine parameters (scale and shift) ``train_norms`` trains.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def norm_affine_parameters(module: nn.Module) -> tuple[list[nn.Parameter], int]:
    """The trainable scale and shift parameters of ``module``'s normalisation layers, and how
    many such parameters the caller froze (``requires_grad=False``): those stay frozen.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
        >>> net[2].bias.requires_grad_(False)  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> trainable, frozen = norm_affine_parameters(net)
        >>> len(trainable), frozen
        (3, 1)
    """
    params = [
        p
        for m in module.modules()
        if isinstance(m, NORM_TYPES)
        for p in m.parameters(recurse=False)
    ]
    trainable = [p for p in params if p.requires_grad]
    return trainable, len(params) - len(trainable)


@dataclass
class TrainConfig:
    """How the fine-tune runs. Defaults are documented in :meth:`OODUnleash.fit`.

    ``optimizer`` is ``"sgd"``, ``"adam"``, ``"adamw"`` or a callable taking the parameters;
    ``schedule`` is ``"cosine"`` (per step, to zero), ``"constant"`` or a callable
    ``(optimizer, total_steps) -> scheduler`` stepped once per batch.

    ``train_norms``: :func:`train` also trains the scale and shift of ``module``'s
    normalisation layers (:func:`norm_affine_parameters`; parameters with
    ``requires_grad=False`` stay frozen), besides ``params``.

    Speed: ``compile`` runs the forward pass through ``torch.compile`` (``True``, or a dict of
    its keyword arguments such as ``{"mode": "max-autotune"}``); ``channels_last`` moves the
    model and the 4-D image batches to that memory format; ``amp`` runs the forward pass in
    float16 on CUDA and bfloat16 on CPU.

    Divergence: the loss is not read on the host after every step (that would be a device
    sync per step); every ``check_every`` steps and at the end of each epoch the losses of
    the steps since the last check are inspected at once. A NaN or infinite loss, or a
    check window in which *every* loss exceeds ``divergence_factor`` x max(first loss,
    ln(classes)) (the loss of a uniform guess), raises :class:`TrainingDivergedError`, at most
    ``check_every`` steps after it began. ``divergence_factor=None`` checks finiteness only.

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
    train_norms: bool = False
    outlier_loss: Literal["oe", "energy"] | None = None
    outlier_weight: float | None = None
    energy_margins: tuple[float, float] = (-25.0, -7.0)
    compile: bool | dict[str, Any] = False
    channels_last: bool = False
    check_every: int = 20
    divergence_factor: float | None = 1e3

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
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(
                f"check_every must be a positive integer (steps between divergence checks), "
                f"got {self.check_every!r}."
            )
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(
                f"divergence_factor must be above 1 (or None), got {self.divergence_factor!r}."
            )
        if not isinstance(self.compile, bool | dict):
            raise TypeError(
                f"compile must be True/False or a dict of torch.compile keyword arguments, "
                f"got {self.compile!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables shown by name)."""
        out = asdict(self)
        for key in ("optimizer", "schedule"):
            if callable(out[key]):
                out[key] = getattr(out[key], "__name__", "custom")
        return out


# --------------------------------------------------------------------------- set-up
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


def _steps_per_epoch(loader: Iterable, config: TrainConfig) -> int | None:
    """``len(loader)`` (``None`` if it has none), checked against what the config needs."""
    try:
        steps = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps = None
    if steps is None and not callable(config.schedule) and config.schedule != "constant":
        raise TypeError(
            "The cosine schedule needs len(loader); this loader has none. Pass "
            "schedule='constant' or a scheduler factory."
        )
    if steps == 0:
        raise ValueError("The data loader has no batches: is the dataset empty?")
    return steps


def _trained_module(module: nn.Module, steps: int | None, device: torch.device) -> nn.Module:
    """``module`` itself, or wrapped in DistributedDataParallel under a process group."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Uneven shards would leave one rank waiting in a gradient all-reduce forever.
    check_same_on_all_ranks(
        -1 if steps is None else steps, "the number of batches per epoch", device
    )
    ids = [device] if device.type == "cuda" else None
    # The wrapper broadcasts rank 0's parameters and buffers, so all ranks start equal.
    # Gradients are averaged over ranks, so each rank's flooding term |CE_r - ξ| acts on
    # its own per-rank batch (like BatchNorm statistics), not on the global batch.
    return DistributedDataParallel(module, device_ids=ids)


def _with_norm_parameters(
    module: nn.Module, params: list[nn.Parameter], config: TrainConfig
) -> list[nn.Parameter]:
    """``params``, plus the normalisation layers' trainable scale and shift when
    ``config.train_norms`` asks for them (each parameter once)."""
    if not config.train_norms:
        return params
    seen = {id(p) for p in params}
    return params + [p for p in norm_affine_parameters(module)[0] if id(p) not in seen]


# --------------------------------------------------------------------------- the loop
class _Step:
    """One optimizer step on one batch; statistics stay on the device."""

    def __init__(
        self,
        forward: Callable[[Tensor], Any],
        params: list[nn.Parameter],
        loss_constraint: float | None,
        config: TrainConfig,
        device: torch.device,
        total_steps: int,
        outliers: Iterator[Tensor] | None,
    ) -> None:
        self.forward = forward
        self.params = params
        self.loss_constraint = loss_constraint
        self.config = config
        self.device = device
        self.outliers = outliers
        self.optimizer = _make_optimizer(params, config)
        self.scheduler = _make_scheduler(self.optimizer, config, total_steps)
        self.use_amp = config.amp and device.type in ("cuda", "cpu")
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        fp16 = self.use_amp and self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.checked_range = False
        self.input_dtype: torch.dtype | None = None

    def _inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # Labels are range-checked while still on the host, where the check costs no sync
        # (labels already on the device are checked on the first step only).
        self.host_labels = labels if labels.device.type == "cpu" else None
        images = cast_images(images.to(self.device, non_blocking=True), self.input_dtype)
        if self.outliers is not None:
            images = torch.cat([images, next(self.outliers).to(self.device, non_blocking=True)])
        if self.config.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def _loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n_id = labels.shape[0]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            try:
                logits = self.forward(images)
            except ValueError as exc:
                if "Expected more than 1 value per channel" not in str(exc):
                    raise
                raise ValueError(
                    f"A training batch of {images.shape[0]} sample(s) reached a BatchNorm layer, "
                    "which cannot normalise one value per channel in train mode. Drop the "
                    "short last batch (DataLoader(..., drop_last=True)) or use a batch size "
                    "that divides the data set."
                ) from exc
        logits = check_logits(logits, images.shape[0]).float()
        if self.host_labels is not None or not self.checked_range:
            check_labels(labels if self.host_labels is None else self.host_labels, logits.shape[1])
        if not self.checked_range:
            check_below_chance(self.loss_constraint, logits.shape[1])
            self.checked_range = True
        id_logits = logits[:n_id]
        ce = F.cross_entropy(id_logits, labels)
        loss = flooding_loss(ce, self.loss_constraint)
        out_term = torch.zeros((), device=self.device)
        if self.outliers is not None:
            if self.config.outlier_loss == "oe":
                out_term = oe_loss(logits[n_id:])
            else:
                out_term = energy_oe_loss(id_logits, logits[n_id:], *self.config.energy_margins)
            loss = loss + self.config.outlier_weight * out_term
        return loss, ce, out_term, id_logits

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
        """Train on one batch; return the loss, the step's statistics ``(loss, ce, correct,
        below ξ, outlier loss)`` (sums over the batch, on the device) and the class count."""
        images, labels = self._inputs(images, labels)
        loss, ce, out_term, id_logits = self._loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        n_id = labels.shape[0]
        with torch.no_grad():
            below = (
                ce < self.loss_constraint
                if self.loss_constraint is not None
                else torch.zeros((), dtype=torch.bool, device=self.device)
            )
            stats = torch.stack(
                [
                    loss * n_id,
                    ce * n_id,
                    (id_logits.argmax(1) == labels).sum().float(),
                    below.float(),
                    out_term * n_id,
                ]
            )
        return loss, stats, id_logits.shape[1]


def _run_epoch(
    step: _Step,
    loader: Iterable,
    epoch: int,
    divergence: DivergenceCheck,
    bar: tqdm,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's record for the history."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    started = time.perf_counter()
    # float64 sums; MPS has no float64.
    dtype = torch.float32 if step.device.type == "mps" else torch.float64
    sums = torch.zeros(5, dtype=dtype, device=step.device)  # loss, ce, correct, below, out
    n = batches = 0
    for images, labels in iter_batches(loader, None):
        loss, stats, num_classes = step(images, labels)
        sums += stats
        n += labels.shape[0]
        batches += 1
        divergence.record(loss, num_classes)
        bar.update()
        if divergence.due:
            last = divergence.check(epoch, batches)
            if not bar.disable:
                bar.set_postfix(loss=f"{last:.4f}")
    divergence.check(epoch, batches)  # the end of an epoch is always checked
    counts = torch.tensor([n, batches], dtype=dtype, device=step.device)
    totals = all_reduce_sum(torch.cat([sums, counts])).cpu().tolist()
    loss, ce, correct, below, out, n, batches = totals
    record = {
        "epoch": epoch + 1,
        "loss": loss / n,
        "ce": ce / n,
        "accuracy": correct / n,
        "frac_below_constraint": below / batches,
        "lr": step.optimizer.param_groups[0]["lr"],
        "time_s": time.perf_counter() - started,
    }
    if step.outliers is not None:
        record["outlier_loss"] = out / n
    return record


def _forward(trained: nn.Module, config: TrainConfig) -> Callable[[Tensor], Any]:
    """The module's forward pass, compiled if the config asks for it."""
    if config.channels_last:
        trained.to(memory_format=torch.channels_last)
    if config.compile is False:
        return trained
    options = {} if config.compile is True else dict(config.compile)
    return torch.compile(trained, **options)


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

    ``module`` maps images to logits. When the loss diverges (see :class:`TrainConfig`) the
    state of ``module`` is restored to the end of the last complete epoch and
    :class:`TrainingDivergedError` is raised; on any other exception (a ``KeyboardInterrupt``
    included) the state is restored the same way and the exception propagates.

    ``hook`` (see :class:`oodunleash.resume.EpochHook`): ``hook.start(optimizer, scheduler,
    scaler)`` returns the first epoch and the history so far (a resumed fit);
    ``hook.epoch_end(history, optimizer, scheduler, scaler)`` runs after each epoch.
    """
    check_distributed_sampler(loader)
    if outlier_loader is not None and config.outlier_loss is None:
        # A copy: the caller's config stays as given.
        config = replace(config, outlier_loss="oe")
    steps_per_epoch = _steps_per_epoch(loader, config)
    params = _with_norm_parameters(module, params, config)
    trained = _trained_module(module, steps_per_epoch, device)
    step = _Step(
        _forward(trained, config),
        params,
        loss_constraint,
        config,
        device,
        (steps_per_epoch or 1) * config.epochs,
        _cycle(outlier_loader) if outlier_loader is not None else None,
    )
    step.input_dtype = model_dtype(module)  # a bfloat16 model takes float32 batches too
    divergence = DivergenceCheck(config, device)
    history: list[dict[str, float]] = []
    first_epoch = 0
    if hook is not None:
        first_epoch, history = hook.start(step.optimizer, step.scheduler, step.scaler)
    good_state = _snapshot(module)
    was_training = module.training
    show = progress and is_main_process()
    try:
        module.train()
        with _norm_stats_frozen(module, config.freeze_norm_stats):
            for epoch in range(first_epoch, config.epochs):
                label = f"{desc} {epoch + 1}/{config.epochs}"
                with tqdm(total=steps_per_epoch, desc=label, disable=not show, leave=False) as bar:
                    history.append(_run_epoch(step, loader, epoch, divergence, bar))
                # Each rank's last forward moved its BatchNorm statistics on its own batch.
                sync_buffers(module)
                if hook is not None:
                    hook.epoch_end(history, step.optimizer, step.scheduler, step.scaler)
                good_state = _snapshot(module)
    except BaseException:
        # Never leave the model half-trained after an error or a Ctrl-C.
        module.load_state_dict(good_state)
        raise
    finally:
        module.train(was_training)
        # The last step's gradients would hold a model-sized block of memory for nothing.
        step.optimizer.zero_grad(set_to_none=True)
    return history
