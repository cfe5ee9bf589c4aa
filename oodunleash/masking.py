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
import fnmatch
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "LayerMasks",
    "LayerSelector",
    "masked_parameters",
    "num_kept",
    "select_layers",
    "topk_mask",
]

#: Module types masked when the user names no layers: their ``weight``, and for
#: ``nn.MultiheadAttention`` the input projection (``in_proj_weight``, or ``q/k/v_proj_weight``
#: when keys and values have their own sizes); its ``out_proj`` is an ``nn.Linear``. Subclasses
#: count too (timm's ``StdConv2d``, ``Conv2dSame``).
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.MultiheadAttention,
)

#: Weight parameters of ``nn.MultiheadAttention`` itself (not of a child module).
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: A layer selection: a name glob (``"layer4.*"``), a module type, or a sequence of both.
LayerSelector = str | type[nn.Module] | Sequence[str | type[nn.Module]]

_MASK_ATTR = "_oodunleash_mask"


# --------------------------------------------------------------------------- layer selection
def _as_rules(selector: LayerSelector | None) -> tuple[list[str], list[type]]:
    if selector is None:
        return [], []
    items = [selector] if isinstance(selector, str | type) else list(selector)
    globs, types = [], []
    for item in items:
        if isinstance(item, str):
            globs.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"Layer selectors are name globs (str) or nn.Module subclasses; got {item!r}."
            )
    return globs, types


def _matches(name: str, module: nn.Module, globs: list[str], types: list[type]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs) or isinstance(module, tuple(types))


def _is_maskable(weight: object) -> bool:
    # Lazy modules have no shape yet; masking them would freeze a placeholder.
    return (
        isinstance(weight, nn.Parameter)
        and not isinstance(weight, nn.parameter.UninitializedParameter)
        and weight.dim() >= 2
    )


def _join(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def masked_parameters(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Every weight a mask can apply to: ``{layer name: (module, parameter name)}``.

    A module's 2-D-or-more ``weight`` is listed under the module's name; an
    ``nn.MultiheadAttention`` projection under ``"<module name>.in_proj_weight"`` (or
    ``q_proj_weight``, ...), since the module holds it itself.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.MultiheadAttention(4, 2))
        >>> list(masked_parameters(net))
        ['0', '1.in_proj_weight', '1.out_proj']
    """
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if _is_maskable(module._parameters.get("weight")):
            found[name] = (module, "weight")
        if isinstance(module, nn.MultiheadAttention):
            for param in _ATTENTION_WEIGHTS:
                if _is_maskable(module._parameters.get(param)):
                    found[_join(name, param)] = (module, param)
    return found


def _weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns a weight a mask can apply to, by layer name."""
    return {name: module for name, (module, _) in masked_parameters(model).items()}


def select_layers(
    model: nn.Module,
    layers: LayerSelector | None = None,
    exclude: LayerSelector | None = None,
) -> dict[str, nn.Module]:
    """Choose the modules whose ``weight`` gets a mask.

    Args:
        model: Any classifier.
        layers: Name globs and/or module types to include. ``None`` means every
            :data:`DEFAULT_LAYER_TYPES` module (``nn.Conv1d/2d/3d``, ``nn.Linear`` and
            ``nn.MultiheadAttention``'s projections, subclasses too); a warning names any other
            module with a weight of two or more dimensions that is left dense
            (``nn.Embedding``, ``nn.ConvTranspose2d``, ...).
        exclude: Name globs and/or module types to leave dense, applied after ``layers``.

    Returns:
        ``{layer name: module}`` in model order. A layer name is the module's qualified
        name, or ``"<module>.in_proj_weight"`` (and ``q/k/v_proj_weight``) for the input
        projection of an ``nn.MultiheadAttention`` (see :func:`masked_parameters`).

    Raises:
        ValueError: if the selection matches nothing; the message lists the available layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(36, 3))
        >>> list(select_layers(net, exclude="2"))
        ['0']
    """
    candidates = _weighted_modules(model)
    inc_globs, inc_types = _as_rules(layers)
    exc_globs, exc_types = _as_rules(exclude)
    if layers is None:
        inc_types = list(DEFAULT_LAYER_TYPES)
    chosen = {
        name: module
        for name, module in candidates.items()
        if _matches(name, module, inc_globs, inc_types)
        and not _matches(name, module, exc_globs, exc_types)
    }
    if layers is None:
        _warn_left_dense(candidates, chosen, exc_globs, exc_types)
    if not chosen:
        available = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates.items())
        raise ValueError(
            f"The layer selection (layers={layers!r}, exclude={exclude!r}) matches no "
            f"parameter. Layers with a weight to mask: {available or 'none'}. "
            "Pass name globs such as 'layer4.*' or module types such as nn.Conv2d."
        )
    return chosen


def _warn_left_dense(
    candidates: dict[str, nn.Module],
    chosen: dict[str, nn.Module],
    exc_globs: list[str],
    exc_types: list[type],
) -> None:
    """The default selection names the weighted layers it leaves dense (those the user
    excluded are left out of the warning: that was asked for)."""
    left = [
        f"{name} ({type(module).__name__})"
        for name, module in candidates.items()
        if name not in chosen and not _matches(name, module, exc_globs, exc_types)
    ]
    if left:
        warnings.warn(
            f"The default layer selection masks nn.Conv1d/2d/3d, nn.Linear and "
            f"nn.MultiheadAttention weights; these weighted layers stay dense: "
            f"{', '.join(left)}. Pass layers= (name globs or module types) to mask them, or "
            "exclude= to silence this.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- mask arithmetic
def num_kept(numel: int, keep_ratio: float) -> int:
    """How many of ``numel`` weights a mask keeps: ``round(keep_ratio * numel)``, at least 1."""
    return max(1, min(numel, round(keep_ratio * numel)))


def topk_mask(scores: Tensor, keep_ratio: float) -> Tensor:
    """Exact top-k mask: exactly :func:`num_kept` ones, ties broken by position.

    Example:
        >>> topk_mask(torch.tensor([0.3, 0.1, 0.3, 0.2]), 0.5)
        tensor([1., 0., 1., 0.])
    """
    flat = scores.detach().reshape(-1)
    n = flat.numel()
    k = num_kept(n, keep_ratio)
    if k == n:
        return torch.ones_like(scores)
    threshold = _threshold(flat, keep_ratio)
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[:missing]
        keep[ties] = True
    return keep.view_as(scores).to(scores.dtype)


def _kth_smallest(values: Tensor, k: int, *, by_sort: bool | None = None) -> Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    On CPU ``kthvalue`` (a quickselect, linear time) is much faster than a sort. On CUDA it is
    the other way round: ``kthvalue`` of a single long row runs a radix select in one thread
    block, reported 20x slower than sorting the row (pytorch/pytorch#75599), so a CUDA tensor
    is sorted. ``by_sort`` forces either way (``None``: sort on CUDA only).

    Example:
        >>> _kth_smallest(torch.tensor([0.3, 0.1, 0.4, 0.2]), 2)
        tensor(0.2000)
    """
    if by_sort is None:
        by_sort = values.is_cuda
    if by_sort:
        return values.sort().values[k - 1]
    return values.kthvalue(k).values


def _threshold(values: Tensor, keep_ratio: float) -> Tensor:
    """The score at or above which ``keep_ratio`` of ``values`` lie (the k-th largest)."""
    m = values.numel()
    return _kth_smallest(values, m - num_kept(m, keep_ratio) + 1)


class _MaskedWeight(torch.autograd.Function):
    """The weight with its dropped entries zeroed; the gradient also reaches the scores
    (straight-through: d loss / d score = d loss / d masked weight x weight).

    Takes the *dropped* positions as a bool tensor: ``masked_fill`` reads a quarter of the
    bytes of a float mask and needs no conversion, and the score gradient needs no mask at
    all. Both matter on small inputs, where these element-wise passes rival the convolutions.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, dropped: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(weight, dropped)
        return weight.masked_fill(dropped, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, dropped = ctx.saved_tensors
        grad_weight = grad.masked_fill(dropped, 0) if ctx.needs_input_grad[0] else None
        grad_scores = grad * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None


class _MaskedWeights(torch.autograd.Function):
    """Every masked layer's weight at once: ``weight * kept`` and the straight-through
    gradients of :class:`_MaskedWeight`, as multi-tensor (``torch._foreach_*``) ops over all
    layers. Inputs after ``owner`` and ``kept``: all weights, then all scores."""

    @staticmethod
    def forward(ctx, owner: LayerMasks, kept: list[Tensor], *tensors: Tensor) -> tuple[Tensor, ...]:
        weights = list(tensors[: len(kept)])
        ctx.owner, ctx.kept = owner, kept
        ctx.save_for_backward(*weights)
        return tuple(torch._foreach_mul(weights, kept))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        # The pass's graph is spent: the next forward pass makes new masked weights.
        ctx.owner._batch = None
        weights = list(ctx.saved_tensors)
        n = len(weights)
        grads = list(grads)
        grad_weights: list[Tensor | None] = [None] * n
        grad_scores: list[Tensor | None] = [None] * n
        if any(ctx.needs_input_grad[2 : 2 + n]):
            grad_weights = list(torch._foreach_mul(grads, ctx.kept))
        if any(ctx.needs_input_grad[2 + n :]):
            grad_scores = list(torch._foreach_mul(grads, weights))
        return (None, None, *grad_weights, *grad_scores)


# --------------------------------------------------------------------------- module surgery
_MASKED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _masked_property(param: str) -> property:
    def read(module: nn.Module) -> Tensor:
        owner, names = module.__dict__[_MASK_ATTR]
        return owner._read_masked(names[param], module._parameters[param], module.training)

    return property(read)


def _masked_class(cls: type, params: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``params`` read as masked weights (made once per class)."""
    key = (cls, params)
    if key not in _MASKED_CLASSES:
        _MASKED_CLASSES[key] = type(
            f"Masked{cls.__name__}",
            (cls,),
            {
                **{param: _masked_property(param) for param in params},
                "_oodunleash_original_class": cls,
                "__module__": cls.__module__,
            },
        )
    return _MASKED_CLASSES[key]


def _unmask_module(module: nn.Module) -> None:
    if _MASK_ATTR in module.__dict__:
        module.__class__ = module._oodunleash_original_class
        del module.__dict__[_MASK_ATTR]


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
        self._samples: dict[str, Tensor] = {}
        self._thresholds: dict[str, Tensor] = {}
        #: How many training-time thresholds were (re)computed; see :meth:`_training_drop`.
        self.threshold_updates = 0
        self._cache: dict[str, tuple[tuple, Tensor]] = {}
        #: Every layer's masked weight of the current differentiable forward pass, and the
        #: versions it was made from; see :meth:`_read_masked`.
        self._batch: tuple[tuple, dict[str, Tensor]] | None = None
        self._kept_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._batch_plan: tuple[torch.device, Tensor, Tensor] | None = None
        self._joint_buffer: Tensor | None = None
        self._joint_sample: Tensor | None = None
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
                self._samples[name] = torch.randint(
                    weight.numel(), (sample_size,), generator=generator
                )

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

    @property
    def is_attached(self) -> bool:
        """Whether the masks are currently applied to the model."""
        return any(_MASK_ATTR in m.__dict__ for m in self._layers.values())

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
            for layer, layer_dropped in self._model_wise_drops().items():
                self._cache[layer] = (key, layer_dropped)
            return self._cache[name][1]
        if not exact and scores.is_cuda and self._can_batch():
            for layer, layer_dropped in self._training_drops_batched().items():
                self._cache[layer] = (self._cache_key(layer, exact), layer_dropped)
            return self._cache[name][1]
        if exact:
            dropped = topk_mask(scores, self.keep_ratio) == 0
        else:
            dropped = self._training_drop(name, scores)
        self._cache[name] = (key, dropped)
        return dropped

    def _training_drop(self, name: str, scores: Tensor | None = None) -> Tensor:
        """Approximate top-k mask for training steps.

        On small inputs the exact threshold of every layer, recomputed after every optimizer
        step, costs more than the convolutions. Two savings keep the kept fraction within
        about 0.5% of the target: the threshold of a large layer comes from a fixed random
        sample of its scores (one standard deviation of the kept fraction is
        ``sqrt(p(1-p)/m)``, 0.11% for m = 131072), and on CPU the previous threshold is kept
        while the sample's kept fraction stays within ``tolerance`` of the target (a compare
        and a sum instead of a selection). On GPUs the selection is cheap and a host sync per
        layer is not, so it is always recomputed there.
        """
        scores = (self.layer_scores(name) if scores is None else scores).detach()
        sample = self._samples.get(name)
        if sample is not None and sample.device != scores.device:
            sample = self._samples[name] = sample.to(scores.device)
        values = scores.reshape(-1) if sample is None else scores.reshape(-1)[sample]
        threshold = self._thresholds.get(name)
        dropped = None
        if scores.is_cuda or threshold is None or threshold.device != scores.device:
            threshold = None
        else:
            below = values < threshold
            kept = 1.0 - int(below.sum()) / values.numel()
            if abs(kept - self.keep_ratio) > self.tolerance:
                threshold = None
            elif sample is None:  # the check compared every score: that is the mask
                dropped = below.view_as(scores)
        if threshold is None:
            threshold = self._thresholds[name] = _threshold(values, self.keep_ratio)
            self.threshold_updates += 1
        return scores < threshold if dropped is None else dropped

    def _can_batch(self) -> bool:
        """Whether all layers' scores share one device and dtype (one tensor can hold them)."""
        first = next(iter(self.scores.values()))
        return len(self.scores) > 1 and all(
            s.device == first.device and s.dtype == first.dtype for s in self.scores.values()
        )

    def _training_drops_batched(self) -> dict[str, Tensor]:
        """The training-time masks of every layer at once, equal to :meth:`_training_drop`
        recomputing each threshold (what it does on GPUs).

        On a GPU a small training step is bound by the host launching kernels, not by the
        device running them, and one sort per layer was half of what UMAP added to a step
        (``examples/benchmark_speed.py --device cuda``). Here every layer's sample is gathered
        into one row of a ``(layers, sample)`` matrix, padded with +inf, and a single batched
        sort gives all thresholds. The cost is one transient copy of all scores.
        """
        scores = [self.layer_scores(name).detach() for name in self._layers]
        device = scores[0].device
        if self._batch_plan is None or self._batch_plan[0] != device:
            self._batch_plan = (device, *self._batch_index(device))
        _, index, kth = self._batch_plan
        sentinel = torch.full((1,), math.inf, device=device, dtype=scores[0].dtype)
        flat = torch.cat([s.reshape(-1) for s in scores] + [sentinel])
        thresholds = flat[index].sort(dim=1).values.gather(1, kth).squeeze(1)
        self.threshold_updates += len(scores)
        return {
            name: s < thresholds[i]
            for i, (name, s) in enumerate(zip(self._layers, scores, strict=True))
        }

    def _batch_index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row ``i`` indexes layer ``i``'s threshold sample (or all its scores) in the
        concatenation of all scores, padded with the index of a final +inf entry; ``kth``
        holds each row's 0-based position of the threshold after sorting."""
        sizes = [self.layer_scores(name).numel() for name in self._layers]
        width = max(
            len(self._samples.get(n, range(m))) for n, m in zip(self._layers, sizes, strict=True)
        )
        sentinel = sum(sizes)
        rows, kth, offset = [], [], 0
        for name, m in zip(self._layers, sizes, strict=True):
            row = self._samples.get(name, torch.arange(m)).cpu() + offset
            n = row.numel()
            kth.append(n - num_kept(n, self.keep_ratio))
            rows.append(torch.cat([row, torch.full((width - n,), sentinel, dtype=row.dtype)]))
            offset += m
        return torch.stack(rows).to(device), torch.tensor(kth, device=device).unsqueeze(1)

    def _standardised_scores(self) -> Tensor:
        """Every layer's scores standardised per layer, ``(s - mean) / std``, concatenated in
        layer order into one reused buffer.

        Standardised first because raw scores of different layers live on different scales
        (the random init follows fan-in): one raw threshold would prune some layers away.
        """
        scores = [self.layer_scores(name).detach() for name in self._layers]
        total = sum(s.numel() for s in scores)
        flat = self._joint_buffer
        if flat is None or flat.device != scores[0].device or flat.numel() != total:
            flat = self._joint_buffer = torch.empty(total, device=scores[0].device)
        offset = 0
        for s in scores:
            s = s.float().reshape(-1)
            part = flat[offset : offset + s.numel()]
            torch.sub(s, s.mean(), out=part)
            part.div_(s.std().clamp_min(1e-12))
            offset += s.numel()
        return flat

    def _joint_threshold(self, flat: Tensor, k: int) -> Tensor:
        """The ``k``-th smallest entry of ``flat``, exactly, without selecting over all of it.

        A selection over every score of the model (11M for a ResNet-18) after every optimizer
        step cost more than half a CPU training step. A fixed random sample of the scores
        brackets the answer between two of its order statistics, eight standard deviations of
        a sample quantile apart; the selection then runs over the scores inside that bracket
        only (about 1.5% of them), after one count of the scores below it. Should the bracket
        miss (never seen; it needs an eight-sigma sample), the full selection runs instead, so
        the result is always the exact one. On CUDA a sort of all scores is cheap and the
        counts would each cost a host sync, so it sorts.
        """
        n = flat.numel()
        m = self.sample_size
        if flat.is_cuda or n <= 8 * m:
            return _kth_smallest(flat, k)
        if self._joint_sample is None or self._joint_sample.device != flat.device:
            generator = torch.Generator().manual_seed(self.seed + 1)
            self._joint_sample = torch.randint(n, (m,), generator=generator).to(flat.device)
        sample = flat[self._joint_sample]
        q = k / n
        margin = 8 * math.sqrt(q * (1 - q) / m) + 1 / m
        low = _kth_smallest(sample, max(1, math.floor((q - margin) * m)))
        high = _kth_smallest(sample, min(m, math.ceil((q + margin) * m)))
        below_low = flat < low
        below = int(torch.count_nonzero(below_low))
        # Scores in [low, high]: at most high, and not below low.
        bracket = flat[(flat <= high).logical_xor_(below_low)]
        if below < k <= below + bracket.numel():
            return _kth_smallest(bracket, k - below)
        return _kth_smallest(flat, k)

    def _model_wise_drops(self) -> dict[str, Tensor]:
        """The pruned positions of every layer under one threshold over all standardised
        scores: exactly :func:`topk_mask` of their concatenation, ties broken by position."""
        flat = self._standardised_scores()
        n = flat.numel()
        k = num_kept(n, self.keep_ratio)
        if k == n:
            dropped = torch.zeros(n, dtype=torch.bool, device=flat.device)
        else:
            threshold = self._joint_threshold(flat, n - k + 1)
            kept = flat > threshold
            missing = k - int(torch.count_nonzero(kept))
            if missing > 0:  # ties at the threshold: the first ones in layer order are kept
                ties = (flat == threshold).nonzero().squeeze(1)[:missing]
                kept[ties] = True
            dropped = kept.logical_not_()
        drops, offset = {}, 0
        for name in self._layers:
            shape = self.layer_scores(name).shape
            size = math.prod(shape)
            drops[name] = dropped[offset : offset + size].view(shape)
            offset += size
        return drops

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
        grad = torch.is_grad_enabled()
        if not grad or len(self._layers) == 1 or not self._any_requires_grad():
            return self.masked_weight(name, weight, training)
        key = (training, *self._versions())
        if self._batch is None or self._batch[0] != key:
            self._batch = (key, self._masked_all(training))
        return self._batch[1][name]

    def _kept(self, name: str, exact: bool) -> Tensor:
        """``~dropped`` of layer ``name``, made once per change of the mask."""
        dropped = self._dropped(name, exact)
        cached = self._kept_cache.get(name)
        if cached is None or cached[0] is not dropped:
            cached = self._kept_cache[name] = (dropped, ~dropped)
        return cached[1]

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
            if _MASK_ATTR in module.__dict__:
                if module.__dict__[_MASK_ATTR][0] is not self:
                    raise RuntimeError(f"Layer {name!r} is already masked by another LayerMasks.")
                continue
            per_module.setdefault(id(module), (module, {}))[1][self._param_names[name]] = name
        for module, names in per_module.values():
            module.__class__ = _masked_class(type(module), tuple(sorted(names)))
            # object.__setattr__ keeps this reference out of nn.Module's registries.
            object.__setattr__(module, _MASK_ATTR, (self, names))
        return self

    def detach(self) -> LayerMasks:
        """Remove the masks: every chosen module is its original class again."""
        for module in self._layers.values():
            _unmask_module(module)
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
            _unmask_module(model.get_submodule(self._module_name(name)))
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


def check_keep_ratio(keep_ratio: float) -> float:
    """Validate a keep ratio (fraction of weights kept)."""
    if not isinstance(keep_ratio, int | float) or not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(
            f"keep_ratio must be in (0, 1] (the fraction of weights kept), got {keep_ratio!r}. "
            "For example 0.8 keeps 80% of each layer."
        )
    return float(keep_ratio)
