"""Checkpoints of unleashed models: a folder on disk, or a Hugging Face Hub repo.

:meth:`OODUnleash.save_pretrained <oodunleash.OODUnleash.save_pretrained>`,
:meth:`~oodunleash.OODUnleash.from_pretrained` and :meth:`~oodunleash.OODUnleash.push_to_hub`
call the functions here. The layout is described in :mod:`oodunleash.checkpoint.format`.

Example:
    >>> import tempfile
    >>> import torch
    >>> from torch import nn
    >>> from oodunleash import OODUnleash
    >>> def make_net():
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> unleashed = OODUnleash(make_net(), "umap", constraint=0.5).fit(data, epochs=1,
    ...                                                            progress=False)
    >>> folder = unleashed.save_pretrained(tempfile.mkdtemp() + "/ckpt")
    >>> again = OODUnleash.from_pretrained(folder, model=make_net)
    >>> x = torch.randn(4, 1, 4, 4)
    >>> torch.equal(again.model(x), unleashed.model(x))
    True
    >>> # The default score, KNN, saves its feature bank in float16 (``KNN(save_dtype=...)``).
    >>> torch.allclose(again.score(x), unleashed.score(x), atol=1e-3)
    True
"""

import os
from pathlib import Path  # noqa: F401 - the return type OODUnleash.save_pretrained names

from oodunleash.checkpoint import format as _format
from oodunleash.checkpoint.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    HubError,
    IncompatibleCheckpointError,
)
from oodunleash.checkpoint.format import *  # noqa: F403 - the layout's file names and version, as format.__all__ lists
from oodunleash.checkpoint.hub_io import download_checkpoint, push_checkpoint
from oodunleash.checkpoint.load import load_checkpoint
from oodunleash.checkpoint.save import save_checkpoint
from oodunleash.checkpoint.state import LoadedCheckpoint, WrapperState
from oodunleash.checkpoint.tensors import pack_bits, unpack_bits
from oodunleash.checkpoint.timm_config import record_known_preprocessing, remember_preprocessing

#: A folder argument: a string or any path-like object.
PathLike = str | os.PathLike

__all__ = [
    "record_known_preprocessing",
    "remember_preprocessing",
    "PathLike",
    *_format.__all__,
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "HubError",
    "IncompatibleCheckpointError",
    "LoadedCheckpoint",
    "WrapperState",
    "download_checkpoint",
    "load_checkpoint",
    "pack_bits",
    "push_checkpoint",
    "save_checkpoint",
    "unpack_bits",
]
