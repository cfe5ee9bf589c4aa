"""One optimizer step of the fine-tune, and one epoch of them: the inner loop of
:func:`oodunleash.finetune.loop.train`, kept apart so that module reads as the set-up and the epochs.
Statistics stay on the device; divergence is checked every few steps, not per step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from oodunleash.finetune.divergence import DivergenceCheck
from oodunleash.finetune.losses import (
    check_below_chance,
    check_two_logits,
    energy_oe_loss,
    flooding_loss,
    oe_loss,
)
from oodunleash.finetune.options import TrainConfig
from oodunleash.runtime.batches import (
    cast_images,
    check_labels,
    check_logits,
    explain_forward_error,
    iter_batches,
)
from oodunleash.runtime.distributed import all_reduce_sum

__all__ = ["Step", "run_epoch"]


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


class Step:
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
        input_dtype: torch.dtype | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.forward = forward
        self.model = model  # named in the error of a forward pass that fails
        self.first_shape: tuple[int, ...] | None = None
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
        self.input_dtype = input_dtype  # a bfloat16 model takes float32 batches too

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

    def _explain(self, images: Tensor, err: RuntimeError) -> Exception:
        """A forward pass failed: name a batch whose image size changed, else the mismatch
        between the images and the model."""
        shape = tuple(images.shape[1:])
        if self.first_shape is not None and shape != self.first_shape:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            return ValueError(
                f"A training batch holds images of shape {shape}, but the first batch's were "
                f"{self.first_shape}, and the model fails on the new size ({reason}). Give all "
                "images one size in the dataset's transform (e.g. Resize + CenterCrop)."
            )
        if self.model is None:
            return err
        return explain_forward_error(self.model, images, err)

    def _loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n_id = labels.shape[0]
        # No autocast context at all without amp: it refuses some device types even disabled.
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.use_amp else None
        with amp or contextlib.nullcontext():
            try:
                logits = self.forward(images)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                raise self._explain(images, exc) from exc
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
        check_two_logits(logits.shape[1])
        if self.first_shape is None:
            self.first_shape = tuple(images.shape[1:])
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


def run_epoch(
    step: Step,
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
