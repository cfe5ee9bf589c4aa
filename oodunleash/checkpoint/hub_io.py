"""Checkpoints to and from the Hugging Face Hub, through ``huggingface_hub``'s own calls.

The Hub's typed errors (``RepositoryNotFoundError``, ``RevisionNotFoundError``,
``GatedRepoError``, ``LocalEntryNotFoundError``, ``HfHubHTTPError``...) reach the caller
unchanged; where oodunleash knows something more it adds a note to them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oodunleash.checkpoint.errors import CheckpointNotFoundError, add_note
from oodunleash.checkpoint.format import (
    CHECKPOINT_FILES,
    CONFIG_NAME,
    MODEL_CARD_NAME,
    format_major,
    listed_files,
    package_version,
    read_json,
)
from oodunleash.runtime.distributed import is_main_process

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn

    from oodunleash.checkpoint.state import WrapperState

__all__ = ["download_checkpoint", "push_checkpoint"]

_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


def download_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """Fetch a checkpoint into the Hub cache and return its snapshot folder.

    The small config comes first: a repo that is no oodunleash checkpoint, or one written by a
    newer incompatible version, is refused before its weights are downloaded. The other files
    are then taken at the config's commit, so a push in between cannot mix two versions.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    common: dict[str, Any] = {
        "repo_type": "model",
        "token": token,
        "cache_dir": cache_dir,
        "force_download": force_download,
        "local_files_only": local_files_only,
        "library_name": "oodunleash",
        "library_version": package_version(),
    }
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **common))
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):  # offline, not cached: the client's error
            raise LocalEntryNotFoundError(
                f"Cannot load the Hub repo {repo_id!r}: it is not in the local cache, and the Hub "
                "cannot be reached (offline: HF_HUB_OFFLINE=1, local_files_only=True or no "
                "connection). Connect and try again, download it first (huggingface-cli "
                f"download {repo_id}), or pass a local checkpoint folder."
            ) from exc
        raise CheckpointNotFoundError(
            f"The Hub repo {repo_id!r} has no {CONFIG_NAME}: it is not an oodunleash checkpoint. "
            "(A plain timm repo loads with timm.create_model('hf-hub:...'); wrap the result in "
            "OODUnleash.)"
        ) from exc
    except RepositoryNotFoundError as exc:
        if "/" not in repo_id:
            add_note(exc, f"There is no local folder {repo_id!r} either.")
        raise
    where = f"the Hub repo {repo_id!r}"
    config = read_json(config_path)
    format_major(config, where)
    files = [name for name in listed_files(config, where) if name != CONFIG_NAME]
    commit = config_path.parent.name
    pinned = commit if _COMMIT_HASH.match(commit) else revision
    if not files:
        return config_path.parent
    folder = snapshot_download(repo_id, revision=pinned, allow_patterns=files, **common)
    return Path(folder)


def push_checkpoint(
    repo_id: str,
    model: nn.Module,
    state: WrapperState,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    save_directory: str | os.PathLike[str] | None = None,
    **save_options: Any,
) -> CommitInfo | None:
    """Save a checkpoint and upload it to a Hub model repo in one commit
    (``HfApi.upload_folder``); under ``torchrun`` only rank 0 uploads (others get ``None``).

    Checkpoint files of an earlier push that this checkpoint lacks (e.g. the masks file) are
    deleted in the same commit; other files in the repo are left alone. If the upload fails,
    the Hub's error is raised with a note naming the folder that holds the complete checkpoint
    (also as ``error.local_copy``), ready for ``huggingface_hub.upload_folder``.
    """
    from huggingface_hub import HfApi

    from oodunleash.checkpoint.save import save_checkpoint

    if not is_main_process():
        return None
    keep_folder = save_directory is not None
    if save_directory is not None:
        folder = Path(save_directory).expanduser()
    else:
        folder = Path(tempfile.mkdtemp(prefix="oodunleash-push-")) / "checkpoint"
    try:
        save_checkpoint(folder, model, state, repo_id=repo_id, **save_options)
    except BaseException:
        if not keep_folder:
            shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    api = HfApi(token=token, library_name="oodunleash", library_version=package_version())
    method = str(state.params.get("method", "")).upper()
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload unleashed model ({method})",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            allow_patterns=[*CHECKPOINT_FILES, MODEL_CARD_NAME],
            delete_patterns=list(CHECKPOINT_FILES),
        )
    except Exception as exc:
        add_note(
            exc,
            f"oodunleash: the complete checkpoint is kept in {folder}; retry with "
            f"huggingface_hub.upload_folder(repo_id={repo_id!r}, folder_path={str(folder)!r}), "
            "or load it with OODUnleash.from_pretrained(that folder).",
        )
        exc.local_copy = folder  # type: ignore[attr-defined]
        raise
    if not keep_folder:
        shutil.rmtree(folder.parent, ignore_errors=True)
    return info
