"""Logits, penultimate features and feature maps from any classifier, over a whole loader.

:class:`~oodunleash.extractor.FeatureExtractor` reads a model batch by batch (see
:mod:`oodunleash.extractor`); :func:`collect_features` runs it over a loader and keeps what
the detectors need in a :class:`~oodunleash.feature_set.FeatureSet`; under
``torch.distributed`` :func:`gather_feature_set` is the one place where the ranks' results
are joined. The three names, and :class:`~oodunleash.heads.LinearHead`, are importable from
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._modules import model_device
from .batches import check_finite, check_labels, iter_batches
from .distributed import (
    all_gather_variable,
    init_distributed,
    is_distributed,
    is_main_process,
    shard_loader,
)
from .extractor import FeatureExtractor
from .feature_set import PER_SAMPLE, FeatureSet
from .heads import LinearHead

__all__ = [
    "PER_SAMPLE",
    "FeatureExtractor",
    "FeatureSet",
    "LinearHead",
    "collect_features",
    "gather_feature_set",
]


# --------------------------------------------------------------------------- collection
def _sample_indices(loader: Iterable) -> Tensor | None:
    """Dataset positions in the order this rank's loader yields them (DistributedSampler only:
    iterating it again gives the same order within an epoch)."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not isinstance(sampler, torch.utils.data.DistributedSampler):
        return None
    return torch.as_tensor(list(iter(sampler)), dtype=torch.long)


def gather_feature_set(data: FeatureSet, device: torch.device) -> FeatureSet:
    """Join the per-sample tensors of all ranks (a no-op in a single process).

    The one place where distributed evaluation meets: every rank ends with the whole data set,
    in dataset order, with the duplicates a ``DistributedSampler`` pads with dropped, so metrics
    equal a single-process run over the unshuffled data. Without a ``DistributedSampler`` the
    ranks' parts are concatenated in rank order.
    """
    if not is_distributed():
        return data
    gathered = {}
    names = [n for n in (*PER_SAMPLE, "index") if getattr(data, n) is not None]
    for name in names:
        gathered[name] = all_gather_variable(getattr(data, name).to(device)).cpu()
    extra = {k: all_gather_variable(v.to(device)).cpu() for k, v in data.extra.items()}
    out = replace(data, **gathered, extra=extra)
    if out.index is not None:
        order = torch.argsort(out.index, stable=True)
        sorted_index = out.index[order]
        first = torch.ones_like(sorted_index, dtype=torch.bool)
        first[1:] = sorted_index[1:] != sorted_index[:-1]
        out = out.select(order[first])
    return out


class _Collector:
    """Accumulates what :func:`collect_features` keeps, batch by batch, checking each batch."""

    def __init__(
        self,
        keep: set[str],
        per_batch: dict[str, Callable[[FeatureSet], Tensor]],
        store_device: torch.device | str,
        source: str,
    ) -> None:
        self.keep, self.per_batch, self.store_device = keep, per_batch, store_device
        self.source = source
        self.parts: dict[str, list[Tensor]] = {name: [] for name in keep}
        self.extra: dict[str, list[Tensor]] = {name: [] for name in per_batch}
        self.unlabelled = False
        self.seen = 0

    def add(self, batch: FeatureSet, step: int) -> None:
        self._check(batch, step)
        for name in self.keep:
            value = getattr(batch, name)
            if value is None:
                if name == "labels":
                    self.unlabelled = True
                    continue
                raise ValueError(f"The model gave no {name} for this batch.")
            value = value.detach()
            if value.is_floating_point():
                value = value.float()
            self.parts[name].append(value.to(self.store_device))
        for name, fn in self.per_batch.items():
            from .scores.base import check_score_output  # scores import this module

            with torch.no_grad():  # gradient scores switch autograd back on themselves
                out = check_score_output(name, fn(batch), len(batch.images))
            self.extra[name].append(out.to(self.store_device))
        self.seen += len(batch.images)

    def _check(self, batch: FeatureSet, step: int) -> None:
        where = f"batch {step} of the {self.source!r} data"
        for name in ("logits", "features"):
            value = getattr(batch, name)
            if name in self.keep and value is not None and not bool(torch.isfinite(value).all()):
                images_ok = bool(torch.isfinite(batch.images).all())
                check_finite(
                    value,
                    f"The model's {name} on {where}",
                    "the images are finite, so the model's weights or numerics are the cause."
                    if images_ok
                    else "the images hold NaN/inf: clean the data.",
                )
        if batch.labels is not None and "labels" in self.keep and batch.logits is not None:
            try:
                check_labels(batch.labels, batch.logits.shape[1])
            except (TypeError, ValueError) as err:
                raise type(err)(f"On {where}: {err}") from None

    def result(self, extractor: FeatureExtractor, device: torch.device) -> FeatureSet:
        out = FeatureSet(network=extractor, head=extractor.head, device=device)
        for name, values in self.parts.items():
            if values and not (name == "labels" and self.unlabelled):
                setattr(out, name, torch.cat(values))
        out.extra = {k: torch.cat(v) for k, v in self.extra.items()}
        return out


def _progress(
    loader: Iterable,
    device: torch.device,
    *,
    need_labels: bool,
    max_batches: int | None,
    progress: bool,
    desc: str,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The loader's batches on ``device`` (at most ``max_batches``), behind a progress bar."""
    total = None
    with contextlib.suppress(TypeError):
        total = len(loader)  # type: ignore[arg-type]
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    batches = iter_batches(loader, device, need_labels=need_labels, source=f"{desc!r} loader")
    bar = tqdm(
        batches, total=total, desc=desc, disable=not (progress and is_main_process()), leave=False
    )
    for step, batch in enumerate(bar):
        if max_batches is not None and step >= max_batches:
            break
        yield batch


def collect_features(
    extractor: FeatureExtractor,
    loader: Iterable,
    *,
    keep: Iterable[str] = ("logits", "features"),
    per_batch: dict[str, Callable[[FeatureSet], Tensor]] | None = None,
    need_labels: bool = False,
    need_maps: bool | None = None,
    device: torch.device | None = None,
    store_device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    desc: str = "features",
) -> FeatureSet:
    """Run ``extractor`` once over ``loader`` and keep the per-sample fields in ``keep``.

    Args:
        extractor: The model's :class:`FeatureExtractor`.
        loader: Yields images or ``(images, labels)``.
        keep: Which of ``logits``, ``features``, ``feature_maps``, ``labels`` to keep (float32,
            on ``store_device``).
        per_batch: Functions of each batch's :class:`FeatureSet` (with ``images`` and feature
            maps) whose 1-D outputs are kept in ``extra`` under their key: scores that need
            the images (gradients) or the feature maps, which are too large to keep.
        need_labels: Raise if a batch has no labels.
        need_maps: Compute feature maps for ``per_batch`` (default: when ``keep`` has them).
        device: Where the model runs (default: its parameters' device).
        store_device: Where the kept tensors live.
        max_batches: Stop after this many batches.
        progress: Show a progress bar (main process only).
        desc: The data's name, in the progress bar and in errors.

    Every batch is checked: kept logits and features must be finite, and kept labels must be
    class indices of the model's outputs; errors name the batch and ``desc``.

    Returns:
        A :class:`FeatureSet` over the whole loader (all ranks' data under DDP).
    """
    keep = set(keep)
    unknown = keep - set(PER_SAMPLE)
    if unknown:
        raise ValueError(f"keep must be a subset of {PER_SAMPLE}, got {sorted(unknown)}.")
    # Under torchrun each rank reads its own shard of a plain DataLoader (max_batches then
    # counts per rank); gather_feature_set joins the shards. The sampler needs the group.
    init_distributed()
    loader = shard_loader(loader)
    device = model_device(extractor.model) if device is None else device
    want_maps = "feature_maps" in keep or bool(need_maps)
    collector = _Collector(keep, per_batch or {}, store_device, desc)
    batches = _progress(
        loader,
        device,
        need_labels=need_labels,
        max_batches=max_batches,
        progress=progress,
        desc=desc,
    )
    for step, (images, labels) in enumerate(batches):
        with torch.no_grad():
            try:
                batch = extractor(images, maps=want_maps)
            except (TypeError, ValueError) as err:  # name the data set and the batch
                raise type(err)(f"On batch {step} of the {desc!r} data: {err}") from err
        batch.labels, batch.images = labels, images
        collector.add(batch, step)
    result = collector.result(extractor, device)
    index = _sample_indices(loader)
    if index is not None:
        result.index = index[: collector.seen]
    elif not is_distributed():
        result.index = torch.arange(collector.seen)
    # else: a loader oodunleash cannot shard is this rank's own shard: no dataset positions,
    # so the ranks' parts are concatenated (equal positions would drop other ranks' samples).
    return gather_feature_set(result, device)
