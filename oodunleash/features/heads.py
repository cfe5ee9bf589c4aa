"""The classifier head: reading it as one linear map, checking it against the model's output,
and the forward hooks that capture its input without sharing state between threads.

A head is one module, or several whose outputs the model averages (timm's distilled models:
``get_classifier()`` returns ``(head, head_dist)`` and the eval output is their mean). The
penultimate feature is the head's input, or the heads' inputs side by side when they differ.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "HeadHooks",
    "LinearHead",
    "close",
    "linear_head",
    "output_candidates",
    "record_outputs",
]


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


def close(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` reproduces ``b`` up to the rounding of ``b``'s dtype.

    Example:
        >>> close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.00001]))
        True
    """
    if not isinstance(a, Tensor) or a.shape != b.shape:
        return False
    # Relative to the logits' scale (not to 1): tiny logits of a fresh model must still tell a
    # wrong head from the right one.
    scale = float(b.detach().abs().max()) if b.numel() else 1.0
    rtol = 1e-3 if b.dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * 0.1 * scale + 1e-12)


def _has_weight_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    one_by_one = isinstance(module, nn.Conv2d) and weight.shape[2:].numel() == 1
    return weight.dim() == 2 or one_by_one


def _probe(module: nn.Module, dim: int, like: Tensor) -> LinearHead | None:
    """The affine map of a head without a weight matrix (e.g. BatchNorm then Linear, as timm's
    ``NormLinear``), read by running it on 0 and the unit vectors. Only in eval mode: in train
    mode BatchNorm would use (and update) batch statistics."""
    if any(m.training for m in module.modules() if isinstance(m, _BatchNorm | nn.Dropout)):
        return None
    # Built on the device: a copy from the host would wait for the device on every batch.
    eye = torch.eye(dim, device=like.device, dtype=like.dtype)
    probe = torch.cat([eye.new_zeros(1, dim), eye])
    with torch.no_grad():
        out = module(probe)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != dim + 1:
        return None
    bias = out[0].detach()
    return LinearHead((out[1:] - bias).detach().T.contiguous(), bias)


def linear_head(
    heads: Sequence[nn.Module], like: Sequence[Tensor], shared: bool
) -> LinearHead | None:
    """One :class:`LinearHead` for the average of ``heads``: on one shared input when
    ``shared``, else on their inputs side by side. ``like`` holds an example input row of each
    head (its width, dtype and device). ``None`` if a head has no weight matrix and cannot be
    probed."""
    parts = []
    for module, example in zip(heads, like, strict=True):
        if _has_weight_matrix(module):
            parts.append(LinearHead.from_module(module))
        elif example.dim() == 2:
            part = _probe(module, example.shape[1], example)
            if part is None:
                return None
            parts.append(part)
        else:
            return None
    if len(parts) == 1:
        return parts[0]
    bias = torch.stack([p.bias for p in parts]).mean(dim=0)
    if shared:
        return LinearHead(torch.stack([p.weight for p in parts]).mean(dim=0), bias)
    return LinearHead(torch.cat([p.weight for p in parts], dim=1) / len(parts), bias)


# --------------------------------------------------------------------------- hooks
class _Recorder:
    """Where hooks write: a dict per thread, present only while that thread records, so
    concurrent forward passes through the same model never see each other's tensors."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def store(self) -> dict[Any, Any] | None:
        return getattr(self._local, "store", None)

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[Any, Any]]:
        previous, self._local.store = self.store, {}
        try:
            yield self._local.store
        finally:
            self._local.store = previous

    # A copied or pickled model keeps its hooks; theirs record nothing.
    def __deepcopy__(self, memo: dict) -> _Recorder:
        return _Recorder()

    def __reduce__(self) -> tuple:
        return (_Recorder, ())


class _Keep:
    """A forward (pre-)hook keeping a module's input or output under ``key``."""

    def __init__(self, recorder: _Recorder, key: Any, output: bool) -> None:
        self.recorder, self.key, self.output = recorder, key, output

    def __call__(self, _module: nn.Module, args: tuple, out: Any = None) -> None:
        store = self.recorder.store
        if store is not None:
            store[self.key] = out if self.output else (args[0] if args else None)


class HeadHooks:
    """Hooks attached once on the head(s) (and the feature-map layer): they keep the heads'
    inputs and outputs and the maps of the forward pass run inside :meth:`recording`, in the
    calling thread's own storage. Removed when this object is garbage-collected or by
    :meth:`remove`."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        self.recorder = _Recorder()
        self.handles = []
        for i, head in enumerate(heads):
            self.handles.append(head.register_forward_pre_hook(_Keep(self.recorder, i, False)))
            self.handles.append(head.register_forward_hook(_Keep(self.recorder, ("out", i), True)))

    def watch_maps(self, module: nn.Module) -> None:
        """Also keep ``module``'s output, under ``"maps"``."""
        self.handles.append(module.register_forward_hook(_Keep(self.recorder, "maps", True)))

    def recording(self) -> contextlib.AbstractContextManager[dict[Any, Any]]:
        """Record the hooked tensors of the forward passes run inside, in this thread."""
        return self.recorder.recording()

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __del__(self) -> None:
        self.remove()


@contextlib.contextmanager
def record_outputs(
    model: nn.Module, which: Callable[[nn.Module], bool], record: Callable[[str, Any], None]
) -> Iterator[None]:
    """Temporary hooks on the modules ``which`` selects, recording ``(name, output)`` of the
    forward passes this thread runs inside (another thread's passes are ignored)."""
    thread = threading.get_ident()

    def hook(name: str) -> Callable:
        def keep(_m: nn.Module, _a: tuple, out: Any) -> None:
            if threading.get_ident() == thread:
                record(name, out)

        return keep

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if which(m)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def output_candidates(model: nn.Module, run: Callable[[], Tensor], limit: int = 6) -> list[str]:
    """Names of the submodules whose output has the shape of the model's logits: where to look
    for the head (at most ``limit``, last run first)."""
    outputs: list[tuple[str, Any]] = []
    with record_outputs(model, lambda m: m is not model, lambda n, o: outputs.append((n, o))):
        logits = run()
    names = []
    for name, out in reversed(outputs):
        if (
            isinstance(out, Tensor)
            and out.dim() > 1
            and out.flatten(1).shape == logits.shape
            and name not in names
        ):
            names.append(name)
    return names[:limit]
