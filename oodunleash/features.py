"""Logits, penultimate features and feature maps from any classifier, in one forward pass.

:class:`FeatureExtractor` reads a model three ways:

* **timm models** (``forward_features`` / ``forward_head`` / ``get_classifier``): the feature
  maps are ``forward_features(x)``, the features ``forward_head(maps, pre_logits=True)`` and the
  logits ``classifier(features)``; checked once against ``model(x)``.
* **other models**: forward hooks. The classifier head is the last ``nn.Linear`` run in the
  forward pass whose output *is* the model's output (or the layer named by ``head=``); its
  input is the penultimate feature. The feature maps are the output of the last module whose
  spatial mean equals that feature (or of the layer named by ``feature_layer=``).

:func:`collect_features` runs an extractor over a loader and keeps what the detectors need in
a :class:`FeatureSet`; under ``torch.distributed`` :func:`gather_feature_set` is the one place
where the ranks' results are joined.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._modules import model_device
from .batches import (
    cast_images,
    check_finite,
    check_labels,
    check_logits,
    check_model_input,
    explain_forward_error,
    iter_batches,
    model_dtype,
)
from .distributed import (
    all_gather_variable,
    init_distributed,
    is_distributed,
    is_main_process,
    shard_loader,
)
from .heads import HeadHooks, LinearHead, close, linear_head, output_candidates, record_outputs

__all__ = [
    "FeatureExtractor",
    "FeatureSet",
    "LinearHead",
    "collect_features",
    "gather_feature_set",
]

#: Per-sample fields of a :class:`FeatureSet` that :func:`collect_features` can keep.
PER_SAMPLE = ("logits", "features", "feature_maps", "labels")


_HOW_TO_GET = {
    "logits": "build it with FeatureSet(logits=...)",
    "features": "build it with FeatureSet(features=...)",
    "feature_maps": (
        "use a timm model, or name the layer whose output is the pre-pool feature map with "
        "OODUnleash(model, feature_layer='layer4')"
    ),
    "labels": "pass a loader yielding (images, labels) to fit_scores",
    "head": (
        "the classifier head must be an nn.Linear: name it with OODUnleash(model, head='fc') "
        "or build the FeatureSet with head=LinearHead(weight, bias)"
    ),
    "images": "gradient-based scores are computed from images: use unleashed.score/evaluate",
    "network": "gradient-based scores need the model: FeatureSet(images=..., network=model)",
}


@dataclass
class FeatureSet:
    """What detectors read: per-sample tensors of a batch or a whole data set, plus context.

    Every field is optional; a score calls :meth:`require` for what it needs, which fails with a
    message naming the fix. Per-sample fields share the first dimension.

    Attributes:
        logits: ``(n, classes)`` model outputs.
        features: ``(n, dim)`` penultimate features (the classifier head's input).
        feature_maps: ``(n, channels, ...)`` pre-pool feature maps.
        labels: ``(n,)`` class labels (ID training data).
        head: The last layer's weight and bias.
        images: ``(n, ...)`` inputs, for gradient-based scores.
        network: The :class:`FeatureExtractor` (or any ``nn.Module``/callable images → logits)
            that produced the set, for scores that run the model.
        index: ``(n,)`` position of each sample in its data set.
        device: Where heavy computations should run (the model's device); defaults to the
            device of the tensors.
    """

    logits: Tensor | None = None
    features: Tensor | None = None
    feature_maps: Tensor | None = None
    labels: Tensor | None = None
    head: LinearHead | None = None
    images: Tensor | None = None
    network: Any = None
    index: Tensor | None = None
    device: torch.device | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def require(self, what: str, by: str = "this score") -> Any:
        """The field ``what``; raises a ``ValueError`` naming the fix when it is missing."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(
                f"The {by!r} score needs {what.replace('_', ' ')}, which this model/data does "
                f"not provide: {_HOW_TO_GET.get(what, 'provide it in the FeatureSet')}."
            )
        return value

    def __len__(self) -> int:
        for name in (*PER_SAMPLE, "images"):
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        return 0

    @property
    def compute_device(self) -> torch.device:
        """Where heavy computations on this set should run.

        Returns:
            :attr:`device` when set, else the device of the first per-sample tensor (or
            ``images``) present, else the CPU.
        """
        if self.device is not None:
            return torch.device(self.device)
        for name in (*PER_SAMPLE, "images"):
            value = getattr(self, name)
            if value is not None:
                return value.device
        return torch.device("cpu")

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Logits of (modified) penultimate features, through the head."""
        return self.require("head", "logits from features")(features)

    def logits_from_maps(self, maps: Tensor) -> Tensor:
        """Logits of (modified) feature maps: the model's own head where known, else the
        spatial mean through the linear head (global average pooling)."""
        if isinstance(self.network, FeatureExtractor):
            return self.network.logits_from_maps(maps)
        pooled = maps.flatten(2).mean(dim=2) if maps.dim() > 2 else maps
        return self.logits_from_features(pooled)

    def forward_logits(self, images: Tensor) -> Tensor:
        """Run the model (with autograd as the caller sets it) on ``images``."""
        network = self.require("network", "gradient")
        if isinstance(network, FeatureExtractor):
            return network.logits(images)
        return network(images)

    def select(self, rows: Tensor | slice) -> FeatureSet:
        """The same set restricted to ``rows`` (per-sample fields only)."""
        kept = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if f.name in (*PER_SAMPLE, "images", "index") and getattr(self, f.name) is not None
        }
        return replace(self, **kept, extra={k: v[rows] for k, v in self.extra.items()})


# --------------------------------------------------------------------------- extractor
def _is_timm(model: nn.Module) -> bool:
    return all(
        callable(getattr(model, attr, None))
        for attr in ("forward_features", "forward_head", "get_classifier")
    )


def _get_submodule(model: nn.Module, name: str, option: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-6:]
        raise ValueError(
            f"{option}={name!r}: the model has no submodule of that name. "
            + (f"Its last nn.Linear layers are {linear}." if option == "head" else "")
        ) from None


def _flat(t: Tensor) -> Tensor:
    return t.flatten(1) if t.dim() > 2 else t


def _pooled(maps: Tensor) -> Tensor:
    return maps.flatten(2).mean(dim=2) if maps.dim() > 2 else maps


#: Marks a model whose feature-map scores read the penultimate features.
_FEATURES_AS_MAPS = nn.Identity()


class FeatureExtractor:
    """Read logits, penultimate features and pre-pool feature maps of ``model`` in one pass.

    Args:
        model: The classifier (timm or custom), mapping images to ``(batch, classes)`` logits,
            or to an output holding them under ``"logits"`` / ``.logits`` (Hugging Face).
        head: Name of the classifier head submodule (its input is the penultimate feature).
            Default: found automatically; timm's distilled models (two heads) are read as
            their eval output combines them.
        feature_layer: Name of the submodule whose output is the pre-pool feature map (used
            by ASH). Default: ``forward_features`` for timm models, else found automatically.
        output_key: Where the logits are in a model output that is a mapping or an object
            (default ``"logits"``).

    The first batch resolves and checks how the model is read: the head must reproduce the
    model's logits from the features (a wrong ``head=`` is refused, naming the submodules
    whose output has the logits' shape), and a model/data mismatch (dtype, device, channels,
    size, an unbatched image, NaN pixels) is reported naming both sides. Floating-point images
    are cast to the model's dtype. The model is not put in eval mode here; callers decide.

    Threads: after the first call an extractor (and the model it reads) may be shared by
    threads scoring at once. Its hooks are attached once, on the first call, and each thread
    reads what they capture in its own storage; nothing is attached per call.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
        >>> out = FeatureExtractor(net)(torch.randn(4, 2, 2, 2))
        >>> out.logits.shape, out.features.shape, out.head.weight.shape
        (torch.Size([4, 3]), torch.Size([4, 5]), torch.Size([3, 5]))
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | None = None,
        feature_layer: str | None = None,
        output_key: str | None = None,
    ) -> None:
        self.model = model
        self.head_name = head
        self.feature_layer = feature_layer
        self.output_key = output_key
        self.mode: str | None = None  # "timm" or "hooks", decided on the first batch
        self._heads: tuple[nn.Module, ...] = ()
        self._like: tuple[Tensor, ...] = ()  # an input row of each head
        self._shared = True  # whether the heads read one input
        self._linear = True  # whether the LinearHead reproduces the logits
        self._hooks: HeadHooks | None = None
        self._maps_module: nn.Module | None = None
        self._maps_checked = False
        self._lock = threading.Lock()
        if head is not None:
            self._heads = (_get_submodule(model, head, "head"),)
        if feature_layer is not None:
            self._maps_module = _get_submodule(model, feature_layer, "feature_layer")

    # ------------------------------------------------------------------ public
    @property
    def head(self) -> LinearHead | None:
        """The current weights of the classifier head as one linear map, or ``None`` if it is
        not linear."""
        if self.mode is None:
            if len(self._heads) == 1 and isinstance(
                getattr(self._heads[0], "weight", None), Tensor
            ):
                return LinearHead.from_module(self._heads[0])
            return None
        if not self._linear:
            return None
        return linear_head(self._heads, self._like, self._shared)

    @property
    def _head_module(self) -> nn.Module | None:
        return self._heads[0] if self._heads else None

    def logits(self, images: Tensor) -> Tensor:
        """Plain forward pass (keeps autograd as the caller sets it)."""
        return self._forward(self._prepare(images))

    def __call__(self, images: Tensor, *, maps: bool = False) -> FeatureSet:
        """One forward pass: logits and features, plus feature maps when ``maps``."""
        images = self._prepare(images)
        if self.mode == "timm":
            fmap = self.model.forward_features(images)
            feats = self.model.forward_head(fmap, pre_logits=True)
            logits = self._classifier(feats)
        else:
            fmap, feats, logits = self._hooked_forward(images, maps)
        return FeatureSet(
            logits=logits,
            features=_flat(feats),
            feature_maps=fmap if maps else None,
            head=self.head,
            network=self,
            device=images.device,
        )

    def logits_from_maps(self, maps: Tensor) -> Tensor:
        """Logits from (modified) feature maps: the timm head, or global average pooling
        followed by the linear head."""
        if self.mode == "timm":
            return self._classifier(self.model.forward_head(maps, pre_logits=True))
        head = self.head
        if head is None:
            raise ValueError(
                "Scores on feature maps need a linear classifier head on custom models: name it "
                "with OODUnleash(model, head='fc')."
            )
        return head(_pooled(maps))

    # ------------------------------------------------------------------ forward
    def _prepare(self, images: Tensor) -> Tensor:
        """Resolve on the first batch; check and cast every batch."""
        if self.mode is None:
            with self._lock:
                if self.mode is None:
                    self._resolve(images)
        check_model_input(self.model, images, full=False)
        return cast_images(images, model_dtype(self.model))

    def _forward(self, images: Tensor) -> Tensor:
        return check_logits(self.model(images), images.shape[0], self.output_key)

    def _classifier(self, feats: Tensor) -> Tensor:
        return self.model.get_classifier()(feats)

    def _hooked_forward(self, images: Tensor, maps: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        with self._hooks.recording() as store:
            logits = self._forward(images)
        inputs = [store.get(i) for i in range(len(self._heads))]
        if any(t is None for t in inputs):
            raise ValueError(
                f"The head layer {self.head_name or type(self._heads[0]).__name__!r} did not "
                "run in the forward pass; name the classifier head with head='...'."
            )
        feats = inputs[0] if self._shared else torch.cat([_flat(t) for t in inputs], dim=1)
        if not maps:
            return None, feats, logits
        if self._maps_module is _FEATURES_AS_MAPS:
            self._warn_no_maps()
            return _flat(feats), feats, logits
        fmap = store.get("maps")
        if not self._maps_checked:
            if not isinstance(fmap, Tensor) or not close(_pooled(fmap), _flat(feats)):
                raise ValueError(
                    f"The output of feature_layer={self.feature_layer!r} is not the pre-pool "
                    "feature map: its spatial mean differs from the classifier's input, so "
                    "logits cannot be rebuilt from it. Name the layer right before global "
                    "average pooling, or use a timm model."
                )
            self._maps_checked = True
        return fmap, feats, logits

    def _warn_no_maps(self) -> None:
        if not self._maps_checked:
            self._maps_checked = True
            # Models without a pooled feature map (MLPs, functional activations after the last
            # layer): feature-map scores act on the penultimate features, seen as 1x1 maps.
            warnings.warn(
                f"Could not find the pre-pool feature maps of {type(self.model).__name__} (a "
                "module output whose spatial mean is the classifier's input); scores on feature "
                "maps (ASH) use the penultimate features instead. Name the layer with "
                "OODUnleash(model, feature_layer='layer4') to use its maps.",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ resolution
    def _resolve(self, images: Tensor) -> None:
        """Decide how to read the model, on the first batch, and check it."""
        check_model_input(self.model, images)
        images = cast_images(images, model_dtype(self.model))
        with torch.no_grad():
            try:
                output = self.model(images)
            except (RuntimeError, AssertionError) as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                raise explain_forward_error(self.model, images, err) from err
            expected = check_logits(output, images.shape[0], self.output_key)
            check_finite(
                expected,
                "The model's logits on the first batch",
                "the images are finite, so the weights or the numerics are the cause (e.g. a "
                "float16 overflow).",
            )
            if self._try_timm(images, expected):
                self.mode = "timm"
                return
            heads = self._heads or self._timm_heads() or self._find_head(images, expected)
            self._attach(heads, images, expected)
        self.mode = "hooks"

    def _try_timm(self, images: Tensor, expected: Tensor) -> bool:
        if self._heads or self.feature_layer is not None or not _is_timm(self.model):
            return False
        classifier = self.model.get_classifier()
        if not isinstance(classifier, nn.Module):
            return False
        try:
            feats = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            logits = classifier(feats)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            return False
        if not close(logits, expected):
            return False
        self._heads, self._like, self._shared = (classifier,), (_flat(feats)[:1],), True
        head = linear_head(self._heads, self._like, True)
        self._linear = head is not None and close(head(_flat(feats)), expected)
        return True

    def _timm_heads(self) -> tuple[nn.Module, ...]:
        """timm's distilled models: ``get_classifier()`` returns ``(head, head_dist)``."""
        if not _is_timm(self.model):
            return ()
        classifier = self.model.get_classifier()
        if isinstance(classifier, tuple | list) and all(
            isinstance(m, nn.Module) for m in classifier
        ):
            return tuple(classifier)
        return ()

    def _candidates(self, images: Tensor) -> str:
        names = output_candidates(self.model, lambda: self._forward(images))
        return f"Submodules whose output has the logits' shape: {names or 'none'}."

    def _find_head(self, images: Tensor, expected: Tensor) -> tuple[nn.Module, ...]:
        calls: list[tuple[str, Tensor]] = []
        with record_outputs(
            self.model, lambda m: isinstance(m, nn.Linear), lambda n, o: calls.append((n, o))
        ):
            self._forward(images)
        matches = [n for n, out in calls if isinstance(out, Tensor) and close(out, expected)]
        if not matches:
            raise ValueError(
                f"Could not find the classifier head of {type(self.model).__name__}: no "
                f"nn.Linear layer produces the model's {expected.shape[1]}-class output. "
                f"{self._candidates(images)} Name the layer whose input is the penultimate "
                "feature with OODUnleash(model, head='name'), e.g. head='fc'."
            )
        return (self.model.get_submodule(matches[-1]),)

    def _attach(self, heads: tuple[nn.Module, ...], images: Tensor, expected: Tensor) -> None:
        """Hook the head(s), check that they reproduce the model's output, find the maps."""
        hooks = HeadHooks(heads)
        with hooks.recording() as store:
            self._forward(images)
        inputs = [store.get(i) for i in range(len(heads))]
        outputs = [store.get(("out", i)) for i in range(len(heads))]
        ran = all(isinstance(t, Tensor) for t in (*inputs, *outputs))
        if not ran or not close(torch.stack([_flat(o) for o in outputs]).mean(dim=0), expected):
            hooks.remove()
            name = self.head_name or "the classifier head"
            problem = "did not run" if not ran else "does not produce the model's output"
            raise ValueError(
                f"head={name!r} {problem} (logits of shape {tuple(expected.shape)}): it is not "
                f"the classifier head. {self._candidates(images)} Name the layer whose input is "
                "the penultimate feature with head='...'."
            )
        self._heads, self._hooks = heads, hooks
        self._shared = all(t is inputs[0] for t in inputs)
        self._like = tuple(_flat(t)[:1].detach() for t in inputs)
        feats = _flat(inputs[0]) if self._shared else torch.cat([_flat(t) for t in inputs], 1)
        head = linear_head(heads, self._like, self._shared)
        self._linear = head is not None and close(head(feats), expected)
        self._find_maps_module(images, _flat(feats))

    def _find_maps_module(self, images: Tensor, feats: Tensor) -> None:
        """Found now, with the head, so that the hooks never change after the first call."""
        if self._maps_module is None:
            outputs: list[tuple[str, Tensor]] = []
            with record_outputs(
                self.model, lambda m: m is not self.model, lambda n, o: outputs.append((n, o))
            ):
                self._forward(images)
            found, best_size = None, 0
            for name, out in outputs:
                if (
                    isinstance(out, Tensor)
                    and out.dim() > 2
                    and out.shape[:2] == feats.shape[:2]
                    and out.shape[2:].numel() >= best_size  # the map before pooling, not after
                    and close(_pooled(out), feats)
                ):
                    found, best_size = name, out.shape[2:].numel()
            self._maps_module = (
                _FEATURES_AS_MAPS if found is None else self.model.get_submodule(found)
            )
        if self._maps_module is not _FEATURES_AS_MAPS:
            self._hooks.watch_maps(self._maps_module)


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
            batch = extractor(images, maps=want_maps)
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
