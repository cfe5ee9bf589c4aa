"""Scoring and evaluation methods of :class:`~oodunleash.OODUnleash` (a mixin).

Placeholder with the energy score only; the score registry replaces it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ScoringMixin"]


class ScoringMixin:
    """OOD scoring for :class:`~oodunleash.OODUnleash`. Higher scores = more in-distribution."""

    def _init_scoring(self) -> None:
        self.fitted_scores_: dict = {}

    def _on_refit(self) -> None:
        # Fitted detectors describe the old features; a new fine-tune invalidates them.
        self.fitted_scores_ = {}

    @torch.no_grad()
    def score(self, x: Tensor, score: str | None = None) -> Tensor:
        """OOD score of each image in ``x`` (higher = more in-distribution)."""
        name = score or self.default_score
        if name != "energy":
            raise NotImplementedError(name)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(x.to(self.device))
        finally:
            self.model.train(was_training)
        return torch.logsumexp(logits.float(), dim=1)
