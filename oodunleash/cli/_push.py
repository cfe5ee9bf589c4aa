"""``oodunleash push``: upload a saved checkpoint folder to a Hugging Face Hub model repo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._errors import UsageError

__all__ = ["cmd_push"]


class PushError(RuntimeError):
    """The Hub refused or failed the upload (exit 1)."""


def _checkpoint_files(folder: Path) -> list[str]:
    """The files of the checkpoint in ``folder`` (its config lists them), checked present."""
    from ..hub import CONFIG_NAME, TIMM_CONFIG_NAME

    if not folder.is_dir():
        raise UsageError(f"DIR {folder}: no such directory.")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise UsageError(
            f"DIR {folder}: no {CONFIG_NAME}, so not a checkpoint folder. Write one with "
            "`oodunleash fit --out DIR` or OODUnleash.save_pretrained(DIR)."
        )
    try:
        listed = json.loads(config_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"DIR {folder}: {CONFIG_NAME} is unreadable or lists no files.") from None
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"DIR {folder}: the checkpoint is incomplete, {missing} missing.")
    extras = [n for n in (TIMM_CONFIG_NAME, "README.md") if (folder / n).is_file()]
    return sorted({CONFIG_NAME, *listed, *extras})


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the checkpoint files of DIR to REPO_ID (created when missing), in one commit."""
    from huggingface_hub import HfApi, get_token

    from ..hub import CONFIG_NAME, MASKS_NAME, SCORES_NAME, TIMM_CONFIG_NAME, WEIGHTS_NAME

    folder = Path(args.dir).expanduser()
    files = _checkpoint_files(folder)
    token = args.token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token. "
            "Nothing was uploaded."
        )
    api = HfApi(token=token, library_name="oodunleash")
    try:
        repo = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
        if args.revision:
            api.create_branch(repo, branch=args.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            allow_patterns=files,
            # Files of an earlier checkpoint that this one lacks (e.g. UMAP masks) would
            # otherwise stay next to it.
            delete_patterns=[CONFIG_NAME, WEIGHTS_NAME, TIMM_CONFIG_NAME, SCORES_NAME, MASKS_NAME],
            revision=args.revision,
            commit_message=args.commit_message or f"Upload {folder.name} with oodunleash",
        )
    except Exception as exc:  # huggingface_hub's HTTP, auth and connection errors alike
        raise PushError(
            f"Uploading {folder} to {args.repo_id!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    print(f"Pushed {len(files)} files to {info.commit_url}")
    return 0
