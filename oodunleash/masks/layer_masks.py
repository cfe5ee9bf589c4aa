"""Learnable top-k masks on the weights of chosen layers.

A mask is a tensor of *scores*, one per weight. The weights whose scores rank in the top
``keep_ratio`` fraction are kept, the rest are zeroed; gradients reach the scores through a
straight-through estimator (edge-popup, Ramanujan et al. 2020).

The mask is applied where the weight is *read*: each chosen module gets a dynamically made
subclass of its own class whose ``weight`` attribute returns ``raw_weight * mask``. This keeps
timm's own behaviour (``StdConv2d`` standardises the masked weight), reaches weights that a
parent module reads directly (``nn.MultiheadAttention`` reads ``out_proj.weight`` itself), keeps
the ``state_dict`` keys of the original model and survives ``copy.deepcopy``. The scores live
outside the model, in :class:`LayerMasks`, so the model's ``state_dict`` is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from oodunleash.masks.ops import (
    _MaskedWeight,
    _MaskedWeights,
    check_keep_ratio,
    num_kept,
    topk_mask,
)
from oodunleash.masks.selection import (
    DEFAULT_LAYER_TYPES,
    LayerSelector,
    _join,
    masked_parameters,
    select_layers,
    zero_fraction,
)
from oodunleash.masks.surgery import MASK_ATTR, masked_class, unmask_module
from oodunleash.masks.thresholds import JointThreshold, LayerThresholds

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerMasks",
    "attached_masks",
    "LayerSelector",
    "check_keep_ratio",
    "masked_parameters",
    "num_kept",
    "select_layers",
    "topk_mask",
    "zero_fraction",
]


def _score_key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "/")


# --------------------------------------------------------------------------- the mask set
class LayerMasks(nn.Module):
    """Score-based top-k masks for the chosen layers of one model.

    Args:
        model: The model whose layers are masked (it is not copied).
        layers, exclude: Layer selection, see :func:`select_layers`.
        keep_ratio: Fraction of each layer's weights kept, in (0, 1].
        mode: ``"layer"`` keeps ``keep_ratio`` of every layer (the reference default);
            ``"model"`` applies one threshold to per-layer standardised scores, so layers may keep
            different fractions while the whole selection keeps ``keep_ratio``.
        init: ``"random"`` (uniform, scale ``1/sqrt(fan_in)``, as in edge-popup) or
            ``"magnitude"`` (``|weight|``).
        seed: Seeds the random scores and the threshold samples.
        sample_size: Training-time masks (layer-wise mode) take their threshold from a fixed
            random sample of this many scores on larger layers, and on CPU keep the previous
            threshold while the sample's kept fraction stays within ``tolerance`` of
            ``keep_ratio``. Evaluation and :meth:`bake` always use the exact top-k. In the
            model-wide mode a sample of this size only brackets the exact threshold, which
            holds at training time too.
        tolerance: See ``sample_size``.

    The masks are inert until :meth:`attach` (or the :meth:`attached` context manager).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> masks = LayerMasks(net, keep_ratio=0.5, seed=0)
        >>> with masks.attached():
        ...     int((net[0].weight == 0).sum())
        32
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSelector | None = None,
        exclude: LayerSelector | None = None,
        keep_ratio: float = 0.8,
        mode: Literal["layer", "model"] = "layer",
        init: Literal["random", "magnitude"] = "random",
        seed: int = 0,
        sample_size: int = 131072,
        tolerance: float = 0.002,
    ) -> None:
        super().__init__()
        check_keep_ratio(keep_ratio)
        if mode not in ("layer", "model"):
            raise ValueError(f"mode must be 'layer' or 'model', got {mode!r}.")
        if init not in ("random", "magnitude"):
            raise ValueError(f"init must be 'random' or 'magnitude', got {init!r}.")
        self.keep_ratio = float(keep_ratio)
        self.mode = mode
        self.init = init
        self.seed = seed
        self.sample_size = sample_size
        self.tolerance = tolerance
        # Plain dicts: the modules belong to the model, not to this object.
        self._layers: dict[str, nn.Module] = select_layers(model, layers, exclude)
        maskable = masked_parameters(model)
        #: The masked parameter's name in its module (``weight``, ``in_proj_weight``, ...).
        self._param_names = {name: maskable[name][1] for name in self._layers}
        self.scores = nn.ParameterDict()
        samples: dict[str, Tensor] = {}
        self._cache: dict[str, tuple[tuple, Tensor]] = {}
        #: Every layer's masked weight of the current differentiable forward pass, and the
        #: versions it was made from; see :meth:`_read_masked`.
        self._batch: tuple[tuple, dict[str, Tensor]] | None = None
        self._kept_cache: dict[str, tuple[Tensor, Tensor]] = {}
        #: Every layer's masked weight, made in advance for one forward pass (see
        #: :meth:`precomputed`); ``None`` otherwise.
        self._ready: dict[str, Tensor] | None = None
        self._layer_thresholds = LayerThresholds(self.keep_ratio, tolerance, samples)
        self._joint = JointThreshold(self.keep_ratio, sample_size, seed)
        generator = torch.Generator().manual_seed(seed)
        for name in self._layers:
            weight = self.raw_weight(name)
            if init == "magnitude":
                scores = weight.detach().abs().clone().float()
            else:
                fan_in = weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                scores = torch.rand(weight.shape, generator=generator) * 2 * bound - bound
            self.scores[_score_key(name)] = nn.Parameter(scores.to(weight.device))
            if weight.numel() > sample_size:
                samples[name] = torch.randint(weight.numel(), (sample_size,), generator=generator)

    # ---------------------------------------------------------------- introspection
    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the masked layers, in model order."""
        return list(self._layers)

    def layer_scores(self, name: str) -> nn.Parameter:
        """The score tensor of layer ``name``."""
        return self.scores[_score_key(name)]

    def parameter_name(self, name: str) -> str:
        """The ``state_dict`` key of layer ``name``'s masked weight in the model.

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
            >>> masks = LayerMasks(net)
            >>> [masks.parameter_name(n) for n in masks.layer_names]
            ['0.weight', '1.in_proj_weight', '1.out_proj.weight']
        """
        param = self._param_names[name]
        module_name = name.removesuffix(param).removesuffix(".") if param != "weight" else name
        return _join(module_name, param)

    def raw_weight(self, name: str) -> nn.Parameter:
        """Layer ``name``'s weight parameter itself, unmasked (also while attached)."""
        return self._layers[name]._parameters[self._param_names[name]]

    def _all_scores(self) -> dict[str, Tensor]:
        return {name: self.layer_scores(name) for name in self._layers}

    @property
    def threshold_updates(self) -> int:
        """How many layer-wise training-time thresholds were (re)computed."""
        return self._layer_thresholds.updates

    @property
    def _samples(self) -> dict[str, Tensor]:
        """Per large layer, the fixed positions whose scores give its training threshold."""
        return self._layer_thresholds.samples

    @property
    def is_attached(self) -> bool:
        """Whether the masks are currently applied to the model."""
        return any(MASK_ATTR in m.__dict__ for m in self._layers.values())

    # ---------------------------------------------------------------- the masks
    def _cache_key(self, name: str, exact: bool, scores: Tensor | None = None) -> tuple:
        if self.mode == "model":  # exact at training time too: one key for both
            return tuple((s._version, s.data_ptr()) for s in self.scores.values())
        s = self.layer_scores(name) if scores is None else scores
        return (exact, s._version, s.data_ptr())

    def mask(self, name: str, exact: bool = True) -> Tensor:
        """The binary (0/1) mask of layer ``name``, in the dtype of its scores."""
        scores = self.layer_scores(name)
        return (~self._dropped(name, exact)).to(scores.dtype)

    def _dropped(self, name: str, exact: bool, scores: Tensor | None = None) -> Tensor:
        """Bool tensor of the pruned positions, recomputed only when the scores change.

        ``scores``, if given, is layer ``name``'s score tensor: this runs for every masked layer
        in every forward pass, where looking it up again costs more than the check itself."""
        scores = self.layer_scores(name) if scores is None else scores
        key = self._cache_key(name, exact, scores)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.mode == "model":
            for layer, layer_dropped in self._joint.drops(self._all_scores()).items():
                self._cache[layer] = (key, layer_dropped)
            return self._cache[name][1]
        thresholds = self._layer_thresholds
        if not exact and scores.is_cuda and thresholds.can_batch(all_scores := self._all_scores()):
            for layer, layer_dropped in thresholds.drops_batched(all_scores).items():
                self._cache[layer] = (self._cache_key(layer, exact), layer_dropped)
            return self._cache[name][1]
        if exact:
            dropped = topk_mask(scores, self.keep_ratio) == 0
        else:
            dropped = thresholds.drop(name, scores)
        self._cache[name] = (key, dropped)
        return dropped

    # Dynamo cannot trace the cache checks (tensor versions); under torch.compile the masks
    # run eagerly between the compiled pieces of the forward pass.
    @torch.compiler.disable
    def _read_masked(self, name: str, weight: Tensor, training: bool) -> Tensor:
        """What an attached module reads as its weight.

        In a differentiable forward pass every layer's masked weight is made at the first
        read, by one autograd function over all layers (``_MaskedWeights``), and the later
        reads return it: one Python call and two multi-tensor ops per pass instead of a
        custom autograd node, a mask application and a score gradient per layer. Elsewhere
        (evaluation, ``torch.no_grad``) each layer is masked alone.
        """
        if not self._masks_all_at_once():
            return self.masked_weight(name, weight, training)
        key = (training, *self._versions())
        if self._batch is None or self._batch[0] != key:
            self._batch = (key, self._masked_all(training))
        return self._batch[1][name]

    @contextlib.contextmanager
    def precomputed(self, training: bool) -> Iterator[None]:
        """Make every layer's masked weight now, eagerly, and have the layers read those
        for the forward passes inside the block.

        Under ``torch.compile`` this keeps the masks out of the compiled graph without
        breaking it: the masked weights enter it as inputs, so one graph covers the whole
        forward pass (and CUDA graphs can capture it), instead of one piece between every
        two masked layers.
        """
        if self._masks_all_at_once():
            ready = self._masked_all(training)
        else:
            ready = {
                name: self.masked_weight(name, self.raw_weight(name), training)
                for name in self._layers
            }
        self._ready = ready
        try:
            yield
        finally:
            self._ready = None

    def _kept(self, name: str, exact: bool) -> Tensor:
        """``~dropped`` of layer ``name``, made once per change of the mask."""
        dropped = self._dropped(name, exact)
        cached = self._kept_cache.get(name)
        if cached is None or cached[0] is not dropped:
            cached = self._kept_cache[name] = (dropped, ~dropped)
        return cached[1]

    def _masks_all_at_once(self) -> bool:
        """Whether a forward pass now makes every layer's masked weight at once: when it is
        differentiable (in the scores or the weights) and there is more than one layer."""
        return torch.is_grad_enabled() and len(self._layers) > 1 and self._any_requires_grad()

    def _any_requires_grad(self) -> bool:
        return any(s.requires_grad for s in self.scores.values()) or any(
            self.raw_weight(name).requires_grad for name in self._layers
        )

    def _versions(self) -> list[int]:
        """In-place versions of every score and weight tensor: any update changes one."""
        return [s._version for s in self.scores.values()] + [
            self.raw_weight(name)._version for name in self._layers
        ]

    def _masked_all(self, training: bool) -> dict[str, Tensor]:
        exact = not training
        names = list(self._layers)
        kept = [self._kept(name, exact) for name in names]
        weights = [self.raw_weight(name) for name in names]
        scores = [self.layer_scores(name) for name in names]
        masked = _MaskedWeights.apply(self, kept, *weights, *scores)
        return dict(zip(names, masked, strict=True))

    def masked_weight(self, name: str, weight: Tensor, training: bool = False) -> Tensor:
        """``weight * mask`` for layer ``name``, differentiable in the scores."""
        scores = self.layer_scores(name)
        exact = not (training and torch.is_grad_enabled())
        dropped = self._dropped(name, exact, scores)
        if torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad):
            return _MaskedWeight.apply(weight, scores, dropped)
        return weight.masked_fill(dropped, 0)

    def kept_fraction(self, exact: bool = True) -> dict[str, float]:
        """Fraction of weights each layer keeps (``exact=False``: the training-time mask)."""
        return {n: float(self.mask(n, exact=exact).mean()) for n in self._layers}

    # ---------------------------------------------------------------- attach / detach
    def attach(self) -> LayerMasks:
        """Apply the masks: every chosen module now reads its weight masked."""
        per_module: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for name, module in self._layers.items():
            if MASK_ATTR in module.__dict__:
                if module.__dict__[MASK_ATTR][0] is not self:
                    raise RuntimeError(f"Layer {name!r} is already masked by another LayerMasks.")
                continue
            per_module.setdefault(id(module), (module, {}))[1][self._param_names[name]] = name
        for module, names in per_module.values():
            module.__class__ = masked_class(type(module), tuple(sorted(names)))
            # object.__setattr__ keeps this reference out of nn.Module's registries.
            object.__setattr__(module, MASK_ATTR, (self, names))
        return self

    def detach(self) -> LayerMasks:
        """Remove the masks: every chosen module is its original class again."""
        for module in self._layers.values():
            unmask_module(module)
        return self

    @contextlib.contextmanager
    def attached(self) -> Iterator[LayerMasks]:
        """Context manager: masks applied inside, removed on exit (also on errors)."""
        was_attached = self.is_attached
        self.attach()
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()

    @contextlib.contextmanager
    def detached(self) -> Iterator[LayerMasks]:
        """Context manager: masks removed inside, re-applied on exit if they were applied."""
        was_attached = self.is_attached
        self.detach()
        try:
            yield self
        finally:
            if was_attached:
                self.attach()

    @torch.no_grad()
    def bake(self, model: nn.Module) -> nn.Module:
        """Multiply the exact masks into the weights of ``model`` (the masked model itself or a
        copy with the same layer names) and strip all mask machinery from it. Pruned weights
        become exact zeros."""
        for name in self._layers:
            unmask_module(model.get_submodule(self._module_name(name)))
        for name in self._layers:
            weight = model.get_parameter(self.parameter_name(name))
            weight.mul_(self.mask(name, exact=True).to(weight.device, weight.dtype))
        return model

    def baked_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the masks baked in; ``model`` itself is untouched."""
        with self.detached():
            plain = copy.deepcopy(model)
        return self.bake(plain)

    def baked_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with the exact masks multiplied into the masked weights,
        without copying the model (the other entries are the model's own tensors).

        Example:
            >>> net = nn.Sequential(nn.Linear(4, 4))
            >>> masks = LayerMasks(net, keep_ratio=0.5).attach()
            >>> int((masks.baked_state_dict(net)["0.weight"] == 0).sum())
            8
        """
        state = model.state_dict()  # reads the raw parameters, also while masks are attached
        for name in self._layers:
            key = self.parameter_name(name)
            weight = state[key]
            state[key] = weight * self.mask(name, exact=True).to(weight.device, weight.dtype)
        return state

    # ---------------------------------------------------------------- saving and loading
    def mask_state(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint needs, per layer name: ``"scores"`` (a detached CPU copy) and
        ``"mask"`` (the exact binary mask, bool, on CPU, ``True`` = kept).

        :meth:`load_mask_state` restores it into a ``LayerMasks`` made with the same options
        on the same architecture.
        """
        return {
            name: {
                "scores": self.layer_scores(name).detach().cpu().clone(),
                "mask": ~self._dropped(name, exact=True).cpu(),
            }
            for name in self._layers
        }

    @torch.no_grad()
    def load_mask_state(self, state: dict[str, dict[str, Tensor]]) -> LayerMasks:
        """Copy saved scores (from :meth:`mask_state`) into these masks and check that they
        reproduce the saved binary masks, where given.

        Raises:
            KeyError: a masked layer has no saved entry (the message lists them).
            ValueError: a shape differs from the layer's, or the scores do not reproduce the
                saved mask (damaged or from other options: ``keep_ratio``, ``mode``).
        """
        missing = [name for name in self._layers if name not in state]
        if missing:
            raise KeyError(f"The saved mask state lacks the layers {missing}.")
        for name in self._layers:
            scores = self.layer_scores(name)
            saved = state[name]["scores"]
            if tuple(saved.shape) != tuple(scores.shape):
                raise ValueError(
                    f"The saved scores of layer {name!r} have shape {tuple(saved.shape)}; the "
                    f"layer's weight has {tuple(scores.shape)}: a different architecture."
                )
            scores.copy_(saved.to(scores.device, scores.dtype))
        for name in self._layers:
            saved_mask = state[name].get("mask")
            if saved_mask is not None and not torch.equal(
                ~self._dropped(name, exact=True).cpu(), saved_mask.cpu().bool()
            ):
                raise ValueError(
                    f"The saved scores of layer {name!r} do not reproduce its saved mask: the "
                    f"state is damaged, or was saved with other options than keep_ratio="
                    f"{self.keep_ratio}, mode={self.mode!r}."
                )
        return self

    def _module_name(self, name: str) -> str:
        return self.parameter_name(name).rpartition(".")[0]

    def extra_repr(self) -> str:
        return (
            f"layers={len(self._layers)}, keep_ratio={self.keep_ratio}, mode={self.mode!r}, "
            f"init={self.init!r}"
        )


def attached_masks(model: nn.Module) -> LayerMasks | None:
    """The :class:`~oodunleash.masks.layer_masks.LayerMasks` attached to ``model``'s layers, if any.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> attached_masks(net) is None
        True
        >>> masks = LayerMasks(net).attach()
        >>> attached_masks(net) is masks
        True
    """
    for module in model.modules():
        if MASK_ATTR in module.__dict__:
            return module.__dict__[MASK_ATTR][0]
    return None
