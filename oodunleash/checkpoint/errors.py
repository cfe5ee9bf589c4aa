"""The errors of the checkpoint format itself.

Failures of the Hub (no token, a missing repo or revision, no network) are not wrapped: the
typed errors of ``huggingface_hub`` (``RepositoryNotFoundError``, ``RevisionNotFoundError``,
``GatedRepoError``, ``LocalEntryNotFoundError``, ``HfHubHTTPError``...) reach the caller as they
are, with a note added where oodunleash knows more (e.g. the folder a failed push left behind).
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "HubError",
    "IncompatibleCheckpointError",
]


class HubError(Exception):
    """Base class of the checkpoint format's own errors (the name predates the split of
    checkpoints from the Hub client; it is kept as the one thing to catch)."""


class CheckpointNotFoundError(HubError, FileNotFoundError):
    """No checkpoint where one was expected: a missing folder or file, or a folder or Hub repo
    that holds no ``oodunleash_config.json``."""


class IncompatibleCheckpointError(HubError, ValueError):
    """The checkpoint was written by a newer, incompatible oodunleash, or needs a timm
    architecture or a registered score this installation does not have."""


class CorruptCheckpointError(HubError, ValueError):
    """A checkpoint file is truncated, altered, unreadable, or breaks the format's schema."""


class CheckpointMismatchError(HubError, ValueError):
    """The model given to ``from_pretrained`` does not match the checkpoint's weights."""


def add_note(error: BaseException, note: str) -> None:
    """Attach ``note`` to ``error`` (shown under its traceback; Python 3.11+), or append it to
    the message on older Pythons."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.args = (*error.args[:-1], f"{error.args[-1] if error.args else ''} {note}")
