"""Divergence of a fine-tune, detected without reading the loss back to the host each step.

The losses of the steps since the last check stay on the device; :class:`DivergenceCheck`
reads them at once every ``TrainConfig.check_every`` steps and at the end of each epoch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oodunleash.finetune.options import TrainConfig, TrainingDivergedError
from oodunleash.runtime.distributed import all_reduce_sum, is_distributed

__all__ = ["DivergenceCheck", "TrainingDivergedError"]


class DivergenceCheck:
    """The losses of the steps since the last check, kept on the device (no host sync per
    step) and inspected every ``check_every`` steps and at the end of each epoch."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.window = torch.zeros(config.check_every, device=device)
        self.filled = 0
        self.first_loss: Tensor | None = None
        self.limit_floor = 0.0  # ln(classes), known after the first step

    def record(self, loss: Tensor, num_classes: int) -> None:
        """Keep one step's loss (a device-side copy, no sync)."""
        loss = loss.detach().float()
        if self.first_loss is None:
            self.first_loss = loss.clone()
            self.limit_floor = math.log(max(num_classes, 2))
        self.window[self.filled].copy_(loss)
        self.filled += 1

    @property
    def due(self) -> bool:
        """Whether the window is full: time for :meth:`check`."""
        return self.filled == self.config.check_every

    def check(self, epoch: int, steps_done: int) -> float | None:
        """Raise :class:`TrainingDivergedError` if the window diverged; else return the
        window's last loss (for the progress bar), or ``None`` if the window is empty."""
        if self.filled == 0:
            return None
        window = self.window[: self.filled]
        exploded = torch.zeros((), device=self.device)
        if self.config.divergence_factor is not None and self.first_loss is not None:
            limit = self.config.divergence_factor * self.first_loss.clamp_min(self.limit_floor)
            exploded = (window.min() > limit).float()
        # Summed over ranks: one rank raising alone would leave the others hanging.
        flags = all_reduce_sum(torch.cat([(~torch.isfinite(window)).float(), exploded[None]]))
        filled, self.filled = self.filled, 0
        flags, values = torch.cat([flags, window]).cpu().split([filled + 1, filled])
        bad = flags[:filled].nonzero()
        if len(bad) == 0 and not flags[filled]:
            return float(values[-1])
        where = int(bad[0]) if len(bad) else filled - 1
        value = float(values[where])
        ranks = " (on at least one rank)" if is_distributed() else ""
        what = (
            f"became {value}"
            if len(bad)
            else f"stayed above {self.config.divergence_factor:g}x its first value (or "
            f"ln(classes)) for {filled} steps, up to {value:.4g}"
        )
        raise TrainingDivergedError(
            f"The loss {what} at epoch {epoch + 1}, batch {steps_done - filled + where + 1}"
            f"{ranks}. The weights were restored to the end of epoch {epoch} "
            f"({'the start of fitting' if epoch == 0 else 'the last good one'}). "
            "Lower the learning rate, enable max_grad_norm, or check the inputs for NaN."
        )
