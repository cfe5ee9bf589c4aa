"""All-or-nothing fits: a copy of everything ``fit`` may change, to put back on failure.

:class:`RollbackCopy` records a model's parameters, buffers and gradients (values and
devices), each module's class (UMAP swaps it to attach a mask) and mask attachment, each
module's train/eval mode, each parameter's ``requires_grad``, and the attributes of the
object that owns the fit. :meth:`RollbackCopy.restore` puts all of it back in place, keeping
every ``Parameter`` object (and so references the caller holds) the same.

The tensors are copied to CPU memory, so a model on an accelerator costs no device memory:
the copy's size is the model's parameters and buffers (plus any gradients it holds).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from oodunleash.masks.surgery import MASK_ATTR

__all__ = ["RollbackCopy"]


def _cpu_copy(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", copy=True)


class RollbackCopy:
    """A restorable copy of ``model`` and of the attributes of each of ``owners`` (shallow:
    the objects they refer to are kept, not copied).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
        >>> saved = RollbackCopy(net)
        >>> with torch.no_grad():
        ...     _ = net[0].weight.add_(1.0)
        >>> _ = net.train()
        >>> before = net[0].weight
        >>> saved.restore()
        >>> net.training, net[0].weight is before, torch.equal(net[0].weight, saved.weight(0))
        (False, True, True)
    """

    def __init__(self, model: nn.Module, owners: Iterable[Any] = ()) -> None:
        self._owners = [(owner, dict(vars(owner))) for owner in owners]
        self._modules: list[tuple[nn.Module, type, Any, bool]] = []
        # (module, name, tensor object, its value on CPU, its device); shared values copied once
        self._tensors: list[tuple[nn.Module, str, Tensor, Tensor, torch.device]] = []
        self._grads: dict[int, tuple[nn.Parameter, bool, Tensor | None]] = {}
        copies: dict[int, Tensor] = {}
        for module in model.modules():
            self._modules.append(
                (module, type(module), module.__dict__.get(MASK_ATTR), module.training)
            )
            for registry in (module._parameters, module._buffers):
                for name, tensor in registry.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in copies:
                        copies[id(tensor)] = _cpu_copy(tensor)
                    self._tensors.append((module, name, tensor, copies[id(tensor)], tensor.device))
                    if isinstance(tensor, nn.Parameter) and id(tensor) not in self._grads:
                        grad = None if tensor.grad is None else _cpu_copy(tensor.grad)
                        self._grads[id(tensor)] = (tensor, tensor.requires_grad, grad)
        self._copies = list(copies.values())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor memory the copy holds (on CPU)."""
        grads = [g for _, _, g in self._grads.values() if g is not None]
        return sum(t.numel() * t.element_size() for t in self._copies + grads)

    def weight(self, index: int) -> Tensor:
        """The saved value of the ``index``-th parameter or buffer (model order)."""
        return self._tensors[index][3]

    def restore_modes(self) -> None:
        """Put back each module's train/eval mode only."""
        for module, _, _, training in self._modules:
            module.training = training

    @torch.no_grad()
    def restore(self) -> None:
        """Put the model and the owners' attributes back as they were when copied."""
        for module, cls, mask, _ in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            if mask is None:
                module.__dict__.pop(MASK_ATTR, None)
            else:
                object.__setattr__(module, MASK_ATTR, mask)
        self.restore_modes()
        for module, name, tensor, value, device in self._tensors:
            registry = module._parameters if name in module._parameters else module._buffers
            registry[name] = tensor
            same = (tensor.device, tensor.shape, tensor.dtype) == (device, value.shape, value.dtype)
            if same:
                tensor.data.copy_(value)  # same storage: views and references stay valid
            else:
                tensor.data = value.to(device, copy=True)
        for param, requires_grad, grad in self._grads.values():
            param.requires_grad_(requires_grad)
            param.grad = None if grad is None else grad.to(param.device, copy=True)
        for owner, state in self._owners:
            vars(owner).clear()
            vars(owner).update(state)
