"""Small facts about a user's ``nn.Module`` that several stages need: where it lives, and the
plain module behind a ``torch.compile`` wrapper."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["check_materialised", "eval_mode", "model_device", "unwrap_compiled"]


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


_EVAL_LOCK = threading.Lock()
#: Per model in use: how many callers are inside :func:`eval_mode`, and the modes to restore.
_EVAL_USERS: dict[int, tuple[int, list[tuple[nn.Module, bool]]]] = {}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block; each module's own mode comes back after.

    Safe across threads: the first caller in switches to eval and the last one out restores,
    so one thread's exit never puts a model that another is still scoring back in train mode
    (BatchNorm would then use batch statistics and move its running averages).
    """
    key = id(model)
    with _EVAL_LOCK:
        count, modes = _EVAL_USERS.get(key, (0, []))
        if count == 0:
            modes = [(module, module.training) for module in model.modules()]
            model.eval()
        _EVAL_USERS[key] = (count + 1, modes)
    try:
        yield
    finally:
        with _EVAL_LOCK:
            count, modes = _EVAL_USERS.pop(key)
            if count > 1:
                _EVAL_USERS[key] = (count - 1, modes)
            else:
                for module, training in modes:
                    module.training = training


def check_materialised(model: nn.Module) -> None:
    """Refuse a model whose weights are on the ``meta`` device (shapes, no values)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(
            f"The model's {', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''} are on the meta "
            "device (shapes without values), so there is nothing to fine-tune. Materialise the "
            "model first: model.to_empty(device='cpu') then load_state_dict(...)."
        )
