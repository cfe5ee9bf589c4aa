"""Reading a classifier: :class:`FeatureExtractor` gives logits, penultimate features and
pre-pool feature maps of any model in one forward pass.

* **timm models** (``forward_features`` / ``forward_head`` / ``get_classifier``): the feature
  maps are ``forward_features(x)``, the features ``forward_head(maps, pre_logits=True)`` and the
  logits ``classifier(features)``; checked once against ``model(x)``.
* **other models**, and timm's distilled models (two heads): forward hooks, attached once. The
  classifier head is the last ``nn.Linear`` run in the forward pass whose output *is* the
  model's output (or the layer named by ``head=``, checked the same way); its input is the
  penultimate feature. The feature maps are the output of the last module whose spatial mean
  equals that feature (or of the layer named by ``feature_layer=``).
"""

from __future__ import annotations

import threading
import warnings
from typing import NoReturn

import torch
from torch import Tensor, nn

from oodunleash.features.feature_set import FeatureSet
from oodunleash.features.heads import (
    HeadHooks,
    LinearHead,
    close,
    linear_head,
    output_candidates,
    record_outputs,
)
from oodunleash.runtime.batches import (
    cast_images,
    check_finite,
    check_logits,
    check_model_input,
    diagnose_input,
    explain_forward_error,
    model_dtype,
)

__all__ = ["FeatureExtractor"]


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
    whose output has the logits' shape). Every batch is checked for NaN/inf pixels, and a
    forward pass that fails is reported naming both sides (integer images for a float model,
    another device, the channel count, an unbatched image, the image size). Floating-point
    images are cast to the model's dtype. The model is not put in eval mode here; callers
    decide.

    Threads: after the first call an extractor (and the model it reads, in eval mode) may be
    shared by threads scoring at once. Its hooks are attached once, on the first call, and each
    thread reads what they capture in its own storage; nothing is attached per call. The hooks
    are removed when the extractor is garbage-collected; copies and pickles of the model carry
    inert ones.

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

    def __call__(self, images: Tensor, *, maps: bool = False, check: bool = True) -> FeatureSet:
        """One forward pass: logits and features, plus feature maps when ``maps``.

        ``check=False`` leaves out the per-call NaN/inf check of the images (a host sync) for a
        caller that checks them itself, as :func:`~oodunleash.features.collect.collect_features` does
        once per data set; the first call checks them all the same."""
        images = self._prepare(images, check)
        if self.mode == "timm":
            try:
                fmap = self.model.forward_features(images)
            except (RuntimeError, AssertionError) as err:
                self._explain(images, err)
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
    def _prepare(self, images: Tensor, check: bool = True) -> Tensor:
        """Resolve on the first batch; check (unless the caller does) and cast every batch (a
        model already read can still be handed data that does not fit it)."""
        if self.mode is None:
            with self._lock:
                if self.mode is None:
                    self._resolve(images)
                    return cast_images(images, model_dtype(self.model))
        if check:
            check_model_input(self.model, images)
        return cast_images(images, model_dtype(self.model))

    def _forward(self, images: Tensor) -> Tensor:
        try:
            output = self.model(images)
        except (RuntimeError, AssertionError) as err:
            self._explain(images, err)
        try:
            return check_logits(output, images.shape[0], self.output_key)
        except ValueError as err:  # e.g. an unbatched image read as a batch of channels
            problem = diagnose_input(self.model, images)
            if problem is None:
                raise
            raise ValueError(problem) from err

    def _explain(self, images: Tensor, err: Exception) -> NoReturn:
        """Re-raise a failed forward pass as an error naming the data and the model."""
        if isinstance(err, torch.OutOfMemoryError):
            raise err
        raise explain_forward_error(self.model, images, err) from err

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
        return store.get("maps"), feats, logits

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
            expected = self._forward(images)
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
        if self.feature_layer is not None:  # a named layer is checked now, like a named head
            with self._hooks.recording() as store:
                self._forward(images)
            self._check_maps(store.get("maps"), feats)

    def _check_maps(self, fmap: Tensor | None, feats: Tensor) -> None:
        if not isinstance(fmap, Tensor) or not close(_pooled(fmap), _flat(feats)):
            self._hooks.remove()
            raise ValueError(
                f"The output of feature_layer={self.feature_layer!r} is not the pre-pool "
                "feature map: its spatial mean differs from the classifier's input, so "
                "logits cannot be rebuilt from it. Name the layer right before global "
                "average pooling, or use a timm model."
            )
        self._maps_checked = True
