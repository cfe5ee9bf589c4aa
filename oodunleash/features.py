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
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import check_logits, iter_batches
from .distributed import (
    all_gather_variable,
    init_distributed,
    is_distributed,
    is_main_process,
    shard_loader,
)

__all__ = [
    "FeatureExtractor",
    "FeatureSet",
    "LinearHead",
    "collect_features",
    "gather_feature_set",
]

#: Per-sample fields of a :class:`FeatureSet` that :func:`collect_features` can keep.
PER_SAMPLE = ("logits", "features", "feature_maps", "labels")


@dataclass
class LinearHead:
    """The classifier's last layer, ``logits = features @ weight.T + bias``.

    Example:
        >>> head = LinearHead(torch.eye(2), torch.tensor([0.0, 1.0]))
        >>> head(torch.tensor([[2.0, 3.0]]))
        tensor([[2., 4.]])
    """

    weight: Tensor  # (classes, dim)
    bias: Tensor  # (classes,)

    @classmethod
    def from_module(cls, module: nn.Module) -> LinearHead:
        """A detached copy of a linear layer's current weight and bias.

        Args:
            module: A layer with a ``weight`` (an ``nn.Linear``, or a masked layer, which
                returns its masked weight) and an optional ``bias``. A weight of more than
                two dimensions is flattened to ``(classes, dim)``.

        Returns:
            The head; its bias is zeros when ``module`` has none.
        """
        weight = module.weight.detach()  # masked layers return their masked weight here
        bias = getattr(module, "bias", None)
        bias = bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
        return cls(weight.reshape(weight.shape[0], -1), bias)

    @property
    def num_classes(self) -> int:
        """The number of classes (output rows of :attr:`weight`)."""
        return self.weight.shape[0]

    def __call__(self, features: Tensor) -> Tensor:
        w = self.weight.to(features.device, features.dtype)
        return F.linear(features, w, self.bias.to(features.device, features.dtype))


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
def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.detach().abs().max()) if b.numel() else 1.0
    return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * max(1.0, scale))


def _is_timm(model: nn.Module) -> bool:
    return all(
        callable(getattr(model, attr, None))
        for attr in ("forward_features", "forward_head", "get_classifier")
    )


def _get_submodule(model: nn.Module, name: str, option: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"{option}={name!r}: the model has no submodule of that name. "
            + (f"Its nn.Linear layers are {linear}." if option == "head" else "")
        ) from None


class FeatureExtractor:
    """Read logits, penultimate features and pre-pool feature maps of ``model`` in one pass.

    Args:
        model: The classifier (timm or custom), mapping images to ``(batch, classes)`` logits.
        head: Name of the classifier head submodule (its input is the penultimate feature).
            Default: found automatically.
        feature_layer: Name of the submodule whose output is the pre-pool feature map (used
            by ASH). Default: ``forward_features`` for timm models, else found automatically.

    The model is not put in eval mode here; callers decide.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
        >>> out = FeatureExtractor(net)(torch.randn(4, 2, 2, 2))
        >>> out.logits.shape, out.features.shape, out.head.weight.shape
        (torch.Size([4, 3]), torch.Size([4, 5]), torch.Size([3, 5]))
    """

    def __init__(
        self, model: nn.Module, head: str | None = None, feature_layer: str | None = None
    ) -> None:
        self.model = model
        self.head_name = head
        self.feature_layer = feature_layer
        self.mode: str | None = None  # "timm" or "hooks", decided on the first batch
        self._head_module: nn.Module | None = None
        self._maps_module: nn.Module | None = None
        self._maps_checked = False
        if head is not None:
            self._head_module = _get_submodule(model, head, "head")
        if feature_layer is not None:
            self._maps_module = _get_submodule(model, feature_layer, "feature_layer")

    # ------------------------------------------------------------------ public
    @property
    def head(self) -> LinearHead | None:
        """The current weights of the classifier head, or ``None`` if it is not linear."""
        module = self._head_module
        if module is None or not isinstance(getattr(module, "weight", None), Tensor):
            return None
        if module.weight.dim() != 2 and not (
            isinstance(module, nn.Conv2d) and module.weight.shape[2:].numel() == 1
        ):
            return None
        return LinearHead.from_module(module)

    def logits(self, images: Tensor) -> Tensor:
        """Plain forward pass (keeps autograd as the caller sets it)."""
        return check_logits(self.model(images), images.shape[0])

    def __call__(self, images: Tensor, *, maps: bool = False) -> FeatureSet:
        """One forward pass: logits and features, plus feature maps when ``maps``."""
        if self.mode is None:
            self._resolve(images)
        if maps and self.mode == "hooks" and self._maps_module is None:
            self._find_maps_module(images)
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
        return head(maps.flatten(2).mean(dim=2) if maps.dim() > 2 else maps)

    # ------------------------------------------------------------------ resolution
    def _classifier(self, feats: Tensor) -> Tensor:
        return self.model.get_classifier()(feats)

    def _resolve(self, images: Tensor) -> None:
        if self.head_name is None and self.feature_layer is None and _is_timm(self.model):
            with torch.no_grad():
                try:
                    expected = self.logits(images)
                    fmap = self.model.forward_features(images)
                    feats = self.model.forward_head(fmap, pre_logits=True)
                    logits = self._classifier(feats)
                    ok = isinstance(logits, Tensor) and _close(logits, expected)
                except (RuntimeError, TypeError, AttributeError, NotImplementedError):
                    ok = False
            if ok:
                classifier = self.model.get_classifier()
                if isinstance(classifier, nn.Module):
                    self._head_module = classifier
                self.mode = "timm"
                return
        if self._head_module is None:
            self._find_head(images)
        self.mode = "hooks"

    def _find_head(self, images: Tensor) -> None:
        calls: list[tuple[str, nn.Module, Tensor]] = []
        with (
            _hooks(
                self.model,
                lambda m: isinstance(m, nn.Linear),
                lambda name, m, out: calls.append((name, m, out)),
            ),
            torch.no_grad(),
        ):
            logits = self.logits(images)
        matches = [(n, m) for n, m, out in calls if isinstance(out, Tensor) and _close(out, logits)]
        if not matches:
            sized = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"Could not find the classifier head of {type(self.model).__name__}: no nn.Linear "
                f"layer produces the model's {logits.shape[1]}-class output (nn.Linear layers: "
                f"{sized or 'none'}). Name the layer whose input is the penultimate feature "
                "with OODUnleash(model, head='name'), e.g. head='fc'."
            )
        self._head_module = matches[-1][1]

    def _find_maps_module(self, images: Tensor) -> None:
        head = self._head_module
        captured: dict[str, Tensor] = {}
        outputs: list[tuple[nn.Module, Tensor]] = []

        def keep_input(_m, args):
            captured["features"] = args[0]

        handle = head.register_forward_pre_hook(keep_input)
        try:
            with (
                _hooks(
                    self.model,
                    lambda m: m is not self.model,
                    lambda name, m, out: outputs.append((m, out)),
                ),
                torch.no_grad(),
            ):
                self.logits(images)
        finally:
            handle.remove()
        feats = _flat(captured["features"])
        found, best_size = None, 0
        for module, out in outputs:
            if (
                isinstance(out, Tensor)
                and out.dim() > 2
                and out.shape[:2] == feats.shape[:2]
                and out.shape[2:].numel() >= best_size  # the map before pooling, not after
                and _close(out.flatten(2).mean(dim=2), feats)
            ):
                found, best_size = module, out.shape[2:].numel()
        if found is None:
            # Models without a pooled feature map (MLPs, functional activations after the last
            # layer): feature-map scores act on the penultimate features, seen as 1x1 maps.
            warnings.warn(
                f"Could not find the pre-pool feature maps of {type(self.model).__name__} (a "
                "module output whose spatial mean is the classifier's input); scores on feature "
                "maps (ASH) use the penultimate features instead. Name the layer with "
                "OODUnleash(model, feature_layer='layer4') to use its maps.",
                stacklevel=3,
            )
            found = _FEATURES_AS_MAPS
        self._maps_module = found

    def _hooked_forward(self, images: Tensor, maps: bool) -> tuple[Tensor | None, Tensor, Tensor]:
        captured: dict[str, Tensor] = {}

        def keep_input(_m, args):
            captured["features"] = args[0]

        def keep_output(_m, _args, out):
            captured["maps"] = out

        handles = [self._head_module.register_forward_pre_hook(keep_input)]
        if maps and self._maps_module is _FEATURES_AS_MAPS:
            maps = False
            captured["maps"] = None
        elif maps:
            handles.append(self._maps_module.register_forward_hook(keep_output))
        try:
            logits = self.logits(images)
        finally:
            for h in handles:
                h.remove()
        if "features" not in captured:
            raise ValueError(
                f"The head layer {self.head_name or type(self._head_module).__name__!r} did not "
                "run in the forward pass; name the classifier head with head='...'."
            )
        fmap = captured.get("maps")
        if "maps" in captured and fmap is None:
            fmap = _flat(captured["features"])
        if maps and not self._maps_checked:
            pooled = (
                None if fmap is None else (fmap.flatten(2).mean(dim=2) if fmap.dim() > 2 else fmap)
            )
            if pooled is None or not _close(pooled, _flat(captured["features"])):
                raise ValueError(
                    f"The output of feature_layer={self.feature_layer!r} is not the pre-pool "
                    "feature map: its spatial mean differs from the classifier's input, so logits "
                    "cannot be rebuilt from it. Name the layer right before global average "
                    "pooling, or use a timm model."
                )
            self._maps_checked = True
        return fmap, captured["features"], logits


#: Marks a model whose feature-map scores read the penultimate features.
_FEATURES_AS_MAPS = nn.Identity()


def _flat(t: Tensor) -> Tensor:
    return t.flatten(1) if t.dim() > 2 else t


@contextlib.contextmanager
def _hooks(
    model: nn.Module,
    which: Callable[[nn.Module], bool],
    record: Callable[[str, nn.Module, Any], None],
) -> Iterator[None]:
    handles = []
    for name, module in model.named_modules():
        if which(module):
            handles.append(
                module.register_forward_hook(lambda m, _a, out, n=name: record(n, m, out))
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    per_batch = per_batch or {}
    if device is None:
        param = next(extractor.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    want_maps = "feature_maps" in keep or bool(need_maps)
    parts: dict[str, list[Tensor]] = {name: [] for name in keep}
    unlabelled = False
    extra: dict[str, list[Tensor]] = {name: [] for name in per_batch}
    seen = 0
    total = None
    with contextlib.suppress(TypeError):
        total = len(loader)  # type: ignore[arg-type]
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    batches = tqdm(
        iter_batches(loader, device, need_labels=need_labels),
        total=total,
        desc=desc,
        disable=not (progress and is_main_process()),
        leave=False,
    )
    for step, (images, labels) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        with torch.no_grad():
            batch = extractor(images, maps=want_maps)
        batch.labels = labels
        batch.images = images
        for name in keep:
            value = getattr(batch, name)
            if value is None:
                if name == "labels":
                    unlabelled = True
                    continue
                raise ValueError(f"The model gave no {name} for this batch.")
            value = value.detach()
            if value.is_floating_point():
                value = value.float()
            parts[name].append(value.to(store_device))
        for name, fn in per_batch.items():
            with torch.no_grad():  # gradient scores switch autograd back on themselves
                out = fn(batch)
            if not isinstance(out, Tensor) or out.shape != (images.shape[0],):
                raise ValueError(
                    f"Score {name!r} must return a 1-D tensor with one value per sample "
                    f"({images.shape[0]}), got "
                    f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}."
                )
            extra[name].append(out.detach().float().to(store_device))
        seen += images.shape[0]
    result = FeatureSet(network=extractor, head=extractor.head, device=device)
    for name, values in parts.items():
        if values and not (name == "labels" and unlabelled):
            setattr(result, name, torch.cat(values))
    result.extra = {k: torch.cat(v) for k, v in extra.items()}
    index = _sample_indices(loader)
    if index is not None:
        result.index = index[:seen]
    elif not is_distributed():
        result.index = torch.arange(seen)
    # else: a loader oodunleash cannot shard is this rank's own shard: no dataset positions,
    # so the ranks' parts are concatenated (equal positions would drop other ranks' samples).
    return gather_feature_set(result, device)
