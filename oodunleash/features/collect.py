"""Logits, penultimate features and feature maps from any classifier, over a whole loader.

:class:`~oodunleash.features.extractor.FeatureExtractor` reads a model batch by batch (see
:mod:`oodunleash.features.extractor`); :func:`collect_features` runs it over a loader and keeps what
the detectors need in a :class:`~oodunleash.features.feature_set.FeatureSet`; under
``torch.distributed`` :func:`gather_feature_set` is the one place where the ranks' results
are joined. The three names, and :class:`~oodunleash.features.heads.LinearHead`, are importable from
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from oodunleash.features.extractor import FeatureExtractor
from oodunleash.features.feature_set import PER_SAMPLE, FeatureSet, check_score_output
from oodunleash.features.heads import LinearHead
from oodunleash.runtime.batches import (
    check_label_dtype,
    check_label_range,
    iter_batches,
    nonfinite_error,
    nonfinite_images_error,
)
from oodunleash.runtime.distributed import (
    all_gather_variable,
    init_distributed,
    is_distributed,
    is_main_process,
    shard_loader,
)
from oodunleash.runtime.modules import model_device

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


#: Kept tensors wait on the model's device and move to the store device together once they
#: hold this many bytes (and at the end of the pass): one copy per chunk instead of per batch.
_MOVE_BYTES = 256 * 2**20

#: What a NaN/inf in the logits or features of finite images points to.
_NUMERICS_FIX = "the images are finite, so the model's weights or numerics are the cause."


class _BatchChecks:
    """The checks of every batch of a pass, computed on the device as the batches come and read
    back once, by :meth:`raise_first`: NaN/inf in the images and in the kept logits and
    features, labels outside the model's classes. The error raised is the one the first failing
    batch would raise if each batch were read back on its own."""

    def __init__(self, source: str, device: torch.device | str) -> None:
        self.source = source
        self.zero = torch.zeros((), dtype=torch.long, device=device)
        # A row per batch (NaN/inf count of the images, logits, features; lowest and highest
        # label) and what its messages name: the step, the images, the number of classes.
        self.rows: list[Tensor] = []
        self.about: list[tuple[int, SimpleNamespace, int | None]] = []

    def where(self, step: int) -> str:
        return f"batch {step} of the {self.source!r} data"

    def _nonfinite(self, values: Tensor | None) -> Tensor:
        if values is None or not values.is_floating_point():
            return self.zero
        return torch.isfinite(values).logical_not_().sum()

    def add(
        self,
        step: int,
        images: Tensor,
        logits: Tensor | None = None,
        features: Tensor | None = None,
        labels: Tensor | None = None,
        classes: int | None = None,
    ) -> None:
        """Count this batch's problems on the device; ``labels`` are checked against the
        model's number of ``classes``. A wrong label dtype needs no read-back: it raises at
        once, after the batch's other checks are recorded (they come first in
        :meth:`raise_first`)."""
        low = high = self.zero
        wrong_dtype, range_of = None, None
        if labels is not None and classes is not None:
            try:
                check_label_dtype(labels)
            except TypeError as err:
                wrong_dtype = TypeError(f"On {self.where(step)}: {err}")
            if wrong_dtype is None and labels.numel():
                low, high = torch.aminmax(labels)
                range_of = classes
        counts = (self._nonfinite(images), self._nonfinite(logits), self._nonfinite(features))
        self.rows.append(torch.stack([*counts, low.long(), high.long()]))
        described = SimpleNamespace(shape=images.shape, dtype=images.dtype, device=images.device)
        self.about.append((step, described, range_of))
        if wrong_dtype is not None:
            raise wrong_dtype

    def raise_first(self) -> None:
        """Read back the batches added since the last call (one host sync) and raise the first
        batch's error, if any."""
        if not self.rows:
            return
        table = torch.stack(self.rows).tolist()
        about, self.rows, self.about = self.about, [], []
        for (step, images, classes), row in zip(about, table, strict=True):
            bad_images, bad_logits, bad_features, low, high = row
            where = self.where(step)
            if bad_images:
                raise ValueError(f"On {where}: {nonfinite_images_error(images, bad_images)}")
            for name, bad in (("logits", bad_logits), ("features", bad_features)):
                if bad:
                    raise nonfinite_error(f"The model's {name} on {where}", bad, _NUMERICS_FIX)
            if classes is not None:
                try:
                    check_label_range(low, high, classes)
                except ValueError as err:
                    raise ValueError(f"On {where}: {err}") from None


class _Store:
    """Per-sample tensors of a pass by name: they wait where they were computed and move to
    ``device`` together, once they hold :data:`_MOVE_BYTES` and at the end."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.moved: dict[str, list[Tensor]] = {}
        self.waiting: dict[str, list[Tensor]] = {}
        self.waiting_bytes = 0

    def add(self, name: str, value: Tensor) -> None:
        self.waiting.setdefault(name, []).append(value)
        if value.device != self.device:
            self.waiting_bytes += value.numel() * value.element_size()
            if self.waiting_bytes >= _MOVE_BYTES:
                self._move()

    def _move(self) -> None:
        for name, values in self.waiting.items():
            if values:
                self.moved.setdefault(name, []).append(torch.cat(values).to(self.device))
        self.waiting, self.waiting_bytes = {}, 0

    def result(self) -> dict[str, Tensor]:
        self._move()
        return {n: p[0] if len(p) == 1 else torch.cat(p) for n, p in self.moved.items()}


class _Collector:
    """Accumulates what :func:`collect_features` keeps, batch by batch, on the model's device;
    the batches' checks wait in :attr:`checks` for one read-back."""

    def __init__(
        self,
        keep: set[str],
        per_batch: dict[str, Callable[[FeatureSet], Tensor]],
        device: torch.device,
        store_device: torch.device | str,
        source: str,
    ) -> None:
        self.keep, self.per_batch = keep, per_batch
        self.checks = _BatchChecks(source, device)
        self.parts, self.extra = _Store(store_device), _Store(store_device)
        self.unlabelled = False
        self.seen = 0

    def add(self, batch: FeatureSet, step: int) -> None:
        checked = [getattr(batch, n) if n in self.keep else None for n in ("logits", "features")]
        labels = batch.labels if "labels" in self.keep and batch.logits is not None else None
        classes = batch.logits.shape[1] if labels is not None else None
        self.checks.add(step, batch.images, *checked, labels=labels, classes=classes)
        for name in self.keep:
            value = getattr(batch, name)
            if value is None:
                if name == "labels":
                    self.unlabelled = True
                    continue
                raise ValueError(f"The model gave no {name} for this batch.")
            value = value.detach()
            self.parts.add(name, value.float() if value.is_floating_point() else value)
        for name, fn in self.per_batch.items():
            with torch.no_grad():  # gradient scores switch autograd back on themselves
                out = check_score_output(name, fn(batch), len(batch.images), to_cpu=False)
            self.extra.add(name, out)
        self.seen += len(batch.images)

    def result(self, extractor: FeatureExtractor, device: torch.device) -> FeatureSet:
        out = FeatureSet(network=extractor, head=extractor.head, device=device)
        for name, value in self.parts.result().items():
            if not (name == "labels" and self.unlabelled):
                setattr(out, name, value)
        out.extra = self.extra.result()
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


def _extract(
    extractor: FeatureExtractor, images: Tensor, maps: bool, step: int, checks: _BatchChecks
) -> FeatureSet:
    """One batch through the model; its images' NaN/inf check waits in ``checks``."""
    with torch.no_grad():
        try:
            return extractor(images, maps=maps, check=False)
        except (TypeError, ValueError) as err:  # name the data set and the batch
            checks.add(step, images)  # NaN/inf images explain a failure first
            checks.raise_first()
            raise type(err)(f"On {checks.where(step)}: {err}") from err


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
        store_device: Where the kept tensors live (pass ``device`` to keep them, and the
            score math that reads them, on the model's device).
        max_batches: Stop after this many batches.
        progress: Show a progress bar (main process only).
        desc: The data's name, in the progress bar and in errors.

    Every batch is checked: its images and kept logits and features must be finite, and kept
    labels must be class indices of the model's outputs. The checks run on the device and are
    read back once, after the last batch (a problem raises then, or when the pass fails); the
    error names the first failing batch and ``desc``, as if each batch were checked alone.
    Nothing else is copied to the host per batch: kept tensors move to ``store_device`` in
    chunks of 256 MiB and at the end.

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
    collector = _Collector(keep, per_batch or {}, device, store_device, desc)
    batches = _progress(
        loader,
        device,
        need_labels=need_labels,
        max_batches=max_batches,
        progress=progress,
        desc=desc,
    )
    try:
        for step, (images, labels) in enumerate(batches):
            batch = _extract(extractor, images, want_maps, step, collector.checks)
            batch.labels, batch.images = labels, images
            collector.add(batch, step)
    except Exception:
        collector.checks.raise_first()  # a problem in an earlier batch is the one to report
        raise
    collector.checks.raise_first()
    result = collector.result(extractor, device)
    index = _sample_indices(loader)
    if index is not None:
        result.index = index[: collector.seen]
    elif not is_distributed():
        result.index = torch.arange(collector.seen)
    # else: a loader oodunleash cannot shard is this rank's own shard: no dataset positions,
    # so the ranks' parts are concatenated (equal positions would drop other ranks' samples).
    return gather_feature_set(result, device)
