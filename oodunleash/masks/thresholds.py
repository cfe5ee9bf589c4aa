"""Training-time thresholds of the masks, cheap enough to recompute after every optimizer step.

:class:`LayerThresholds` keeps ``keep_ratio`` of every layer (sampled thresholds, reused on CPU
while they hold, selected for all layers in one batched sort on GPUs). :class:`JointThreshold`
keeps ``keep_ratio`` of all layers together under one threshold over per-layer standardised
scores, exactly. Both take the scores as ``{layer name: tensor}`` in model order and return
the *dropped* positions as bool tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oodunleash.masks.ops import _kth_smallest, _threshold, drop_below, num_kept

__all__ = ["JointThreshold", "LayerThresholds"]


class LayerThresholds:
    """Approximate per-layer top-k masks for training steps.

    On small inputs the exact threshold of every layer, recomputed after every optimizer step,
    costs more than the convolutions. Two savings keep the kept fraction within about 0.5% of
    the target: the threshold of a large layer comes from a fixed random sample of its scores
    (``samples``: one standard deviation of the kept fraction is ``sqrt(p(1-p)/m)``, 0.11% for
    m = 131072), and on CPU the previous threshold is kept while the sample's kept fraction
    stays within ``tolerance`` of the target (a compare and a sum instead of a selection). On
    GPUs the selection is cheap and a host sync per layer is not, so it is always recomputed
    there, for all layers in one batched sort (:meth:`drops_batched`).
    """

    def __init__(self, keep_ratio: float, tolerance: float, samples: dict[str, Tensor]) -> None:
        self.keep_ratio = keep_ratio
        self.tolerance = tolerance
        #: Per large layer, the fixed positions whose scores give its threshold.
        self.samples = samples
        self.thresholds: dict[str, Tensor] = {}
        #: How many thresholds were (re)computed.
        self.updates = 0
        self._plan: tuple[torch.device, Tensor, Tensor] | None = None

    def drop(self, name: str, scores: Tensor) -> Tensor:
        """The pruned positions of layer ``name`` at the current ``scores``."""
        scores = scores.detach()
        sample = self.samples.get(name)
        if sample is not None and sample.device != scores.device:
            sample = self.samples[name] = sample.to(scores.device)
        values = scores.reshape(-1) if sample is None else scores.reshape(-1)[sample]
        threshold = self.thresholds.get(name)
        dropped = None
        if scores.is_cuda or threshold is None or threshold.device != scores.device:
            threshold = None
        else:
            below = values < threshold
            kept = 1.0 - int(torch.count_nonzero(below)) / values.numel()
            if abs(kept - self.keep_ratio) > self.tolerance:
                threshold = None
            elif sample is None:  # the check compared every score: that is the mask
                dropped = below.view_as(scores)
        if threshold is None:
            threshold = self.thresholds[name] = _threshold(values, self.keep_ratio)
            self.updates += 1
        return scores < threshold if dropped is None else dropped

    @staticmethod
    def can_batch(scores: dict[str, Tensor]) -> bool:
        """Whether all layers' scores share one device and dtype (one tensor can hold them)."""
        first = next(iter(scores.values()))
        return len(scores) > 1 and all(
            s.device == first.device and s.dtype == first.dtype for s in scores.values()
        )

    def drops_batched(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every layer's pruned positions at once, equal to :meth:`drop` recomputing each
        threshold (what it does on GPUs).

        On a GPU a small training step is bound by the host launching kernels, not by the
        device running them, and one sort per layer was half of what UMAP added to a step
        (``examples/benchmark_speed.py --device cuda``). Here every layer's sample is gathered
        into one row of a ``(layers, sample)`` matrix, padded with +inf, and a single batched
        sort gives all thresholds. The cost is one transient copy of all scores.
        """
        detached = [s.detach() for s in scores.values()]
        device = detached[0].device
        if self._plan is None or self._plan[0] != device:
            self._plan = (device, *self._batch_index(scores, device))
        _, index, kth = self._plan
        sentinel = torch.full((1,), math.inf, device=device, dtype=detached[0].dtype)
        flat = torch.cat([s.reshape(-1) for s in detached] + [sentinel])
        thresholds = flat[index].sort(dim=1).values.gather(1, kth).squeeze(1)
        self.updates += len(detached)
        return {
            name: s < thresholds[i]
            for i, (name, s) in enumerate(zip(scores, detached, strict=True))
        }

    def _batch_index(
        self, scores: dict[str, Tensor], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Row ``i`` indexes layer ``i``'s threshold sample (or all its scores) in the
        concatenation of all scores, padded with the index of a final +inf entry; ``kth``
        holds each row's 0-based position of the threshold after sorting."""
        sizes = {name: s.numel() for name, s in scores.items()}
        width = max(len(self.samples.get(n, range(m))) for n, m in sizes.items())
        sentinel = sum(sizes.values())
        rows, kth, offset = [], [], 0
        for name, m in sizes.items():
            row = self.samples.get(name, torch.arange(m)).cpu() + offset
            n = row.numel()
            kth.append(n - num_kept(n, self.keep_ratio))
            rows.append(torch.cat([row, torch.full((width - n,), sentinel, dtype=row.dtype)]))
            offset += m
        return torch.stack(rows).to(device), torch.tensor(kth, device=device).unsqueeze(1)


class JointThreshold:
    """One exact threshold over all layers' standardised scores.

    Exactly :func:`~oodunleash.masks.layer_masks.topk_mask` of the concatenated ``(s - mean) / std`` of
    every layer (ties broken by position, in layer order), at training time as at evaluation.

    Two ways to the same mask: on CPU a bracketed selection (:meth:`select`), which counts on
    the host; on GPUs (``sort_all=None``) one stable sort of all scores, whose first ``k``
    positions are the kept ones, so that a training step reads nothing back to the host.
    """

    def __init__(
        self, keep_ratio: float, sample_size: int, seed: int, sort_all: bool | None = None
    ) -> None:
        self.keep_ratio = keep_ratio
        self.sample_size = sample_size
        self.seed = seed
        #: Mask by one sort of all scores (``None``: on CUDA tensors only).
        self.sort_all = sort_all
        self.sample: Tensor | None = None
        self._buffer: Tensor | None = None

    def standardised(self, scores: dict[str, Tensor]) -> Tensor:
        """Every layer's scores standardised per layer, ``(s - mean) / std``, concatenated in
        layer order into one reused buffer.

        Standardised first because raw scores of different layers live on different scales
        (the random init follows fan-in): one raw threshold would prune some layers away.
        """
        detached = [s.detach() for s in scores.values()]
        total = sum(s.numel() for s in detached)
        flat = self._buffer
        if flat is None or flat.device != detached[0].device or flat.numel() != total:
            flat = self._buffer = torch.empty(total, device=detached[0].device)
        offset = 0
        for s in detached:
            s = s.float().reshape(-1)
            part = flat[offset : offset + s.numel()]
            torch.sub(s, s.mean(), out=part)
            part.div_(s.std().clamp_min(1e-12))
            offset += s.numel()
        return flat

    def select(self, flat: Tensor, k: int) -> tuple[Tensor, int | None]:
        """The ``k``-th smallest entry of ``flat``, exactly, without selecting over all of it,
        and how many entries lie below it when that came for free (else ``None``).

        A selection over every score of the model (11M for a ResNet-18) after every optimizer
        step cost more than half a CPU training step. A fixed random sample of the scores
        brackets the answer between two of its order statistics, eight standard deviations of
        a sample quantile apart; the selection then runs over the scores inside that bracket
        only (about 1.5% of them), after one count of the scores below it. Should the bracket
        miss (it takes an eight-sigma sample), the full selection runs instead, so the result
        is always the exact one. On CUDA a sort of all scores is cheap and the counts would
        each cost a host sync, so it sorts (and :meth:`drops` sorts there without it).
        """
        n, m = flat.numel(), self.sample_size
        if flat.is_cuda or n <= 8 * m:
            return _kth_smallest(flat, k), None
        if self.sample is None or self.sample.device != flat.device:
            generator = torch.Generator().manual_seed(self.seed + 1)
            self.sample = torch.randint(n, (m,), generator=generator).to(flat.device)
        sample = flat[self.sample]
        q = k / n
        margin = 8 * math.sqrt(q * (1 - q) / m) + 1 / m
        low = _kth_smallest(sample, max(1, math.floor((q - margin) * m)))
        high = _kth_smallest(sample, min(m, math.ceil((q + margin) * m)))
        below_low = flat < low
        below = int(torch.count_nonzero(below_low))
        # Scores in [low, high]: at most high, and not below low.
        bracket = flat[(flat <= high).logical_xor_(below_low)]
        if below < k <= below + bracket.numel():
            threshold = _kth_smallest(bracket, k - below)
            return threshold, below + int(torch.count_nonzero(bracket < threshold))
        return _kth_smallest(flat, k), None

    def drops(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every layer's pruned positions under the one threshold."""
        flat = self.standardised(scores)
        n = flat.numel()
        k = num_kept(n, self.keep_ratio)
        sort_all = flat.is_cuda if self.sort_all is None else self.sort_all
        if k == n:
            dropped = torch.zeros(n, dtype=torch.bool, device=flat.device)
        elif sort_all:
            # Descending and stable: among equal scores the earlier positions come first and
            # are the ones kept, as drop_below keeps them.
            order = flat.sort(descending=True, stable=True).indices
            dropped = torch.ones(n, dtype=torch.bool, device=flat.device)
            dropped[order[:k]] = False
        else:
            threshold, below = self.select(flat, n - k + 1)
            dropped = drop_below(flat, threshold, k, None if below is None else n - below)
        drops, offset = {}, 0
        for name, s in scores.items():
            drops[name] = dropped[offset : offset + s.numel()].view(s.shape)
            offset += s.numel()
        return drops
