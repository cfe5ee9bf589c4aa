"""Deprecated: the checkpoint code moved to :mod:`oodunleash.checkpoint` (removal in the next
release). Every public name of this module still resolves, with a ``DeprecationWarning``.

``HubAuthError`` and ``HubConnectionError`` are no longer raised: ``huggingface_hub``'s own
typed errors (``HfHubHTTPError``, ``LocalTokenNotFoundError``, ``LocalEntryNotFoundError``...)
now reach the caller. ``HubMixin`` is gone: :class:`~oodunleash.OODUnleash` has
``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` itself.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import checkpoint as _checkpoint

_MOVED = set(_checkpoint.__all__)


class _HubAuthError(_checkpoint.HubError, PermissionError):
    """Deprecated, never raised: catch ``huggingface_hub.errors.HfHubHTTPError`` (401/403) or
    ``LocalTokenNotFoundError``."""


class _HubConnectionError(_checkpoint.HubError, ConnectionError):
    """Deprecated, never raised: catch ``huggingface_hub.errors.LocalEntryNotFoundError`` or
    ``HfHubHTTPError``."""


_RETIRED = {"HubAuthError": _HubAuthError, "HubConnectionError": _HubConnectionError}

__all__ = sorted(_MOVED | set(_RETIRED))


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"oodunleash.hub is deprecated: import {name} from oodunleash.checkpoint.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_checkpoint, name)
    if name in _RETIRED:
        warnings.warn(
            f"oodunleash.hub.{name} is deprecated and no longer raised: huggingface_hub's own "
            "errors reach the caller (see oodunleash.checkpoint.hub_io).",
            DeprecationWarning,
            stacklevel=2,
        )
        return _RETIRED[name]
    if name == "HubMixin":
        raise AttributeError(
            "oodunleash.hub.HubMixin was removed: OODUnleash has save_pretrained, "
            "from_pretrained and push_to_hub itself; the functions behind them are in "
            "oodunleash.checkpoint."
        )
    raise AttributeError(f"module 'oodunleash.hub' has no attribute {name!r}")
