"""Small facts about a user's ``nn.Module`` that several stages need: where it lives, and the
plain module behind a ``torch.compile`` wrapper."""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["model_device", "unwrap_compiled"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (then buffer); CPU for a module with neither.

    Example:
        >>> model_device(nn.Linear(2, 2))
        device(type='cpu')
    """
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (``OptimizedModule._orig_mod``), else
    ``model`` itself. Export, checkpoints and layer names use the plain module, so that its
    ``state_dict`` keys carry no ``_orig_mod.`` prefix.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_compiled(net) is net
        True
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model
