"""``oodunleash push``: upload a saved checkpoint folder to a Hugging Face Hub model repo."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from oodunleash.cli._errors import UsageError

__all__ = ["cmd_push"]

_MODEL_CARD = "README.md"


class PushError(RuntimeError):
    """The Hub refused or failed the upload (exit 1)."""


def _checkpoint_file_names() -> tuple[str, ...]:
    """Every file name a checkpoint may hold, its config's first, bar the model card."""
    names = importlib.import_module("oodunleash.checkpoint")
    return tuple(
        getattr(names, constant)
        for constant in (
            "CONFIG_NAME",
            "WEIGHTS_NAME",
            "TIMM_CONFIG_NAME",
            "SCORES_NAME",
            "MASKS_NAME",
        )
    )


def _files_to_upload(folder: Path, known: tuple[str, ...]) -> list[str]:
    """The checkpoint files in ``folder`` (its config lists them, all present) and its card."""
    config_name = known[0]
    if not folder.is_dir():
        raise UsageError(f"DIR {folder}: no such directory.")
    config_path = folder / config_name
    if not config_path.is_file():
        raise UsageError(
            f"DIR {folder}: no {config_name}, so not a checkpoint folder. Write one with "
            "`oodunleash fit --out DIR` or OODUnleash.save_pretrained(DIR)."
        )
    try:
        listed = list(json.loads(config_path.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"DIR {folder}: {config_name} is unreadable or lists no files.") from None
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"DIR {folder}: the checkpoint is incomplete, {missing} missing.")
    present = [name for name in (*known, _MODEL_CARD) if (folder / name).is_file()]
    return sorted({*listed, *present} & {*known, _MODEL_CARD})


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the checkpoint files of DIR to REPO_ID (created when missing), in one commit."""
    from huggingface_hub import HfApi, get_token

    folder = Path(args.dir).expanduser()
    known = _checkpoint_file_names()
    files = _files_to_upload(folder, known)
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
            delete_patterns=list(known),
            revision=args.revision,
            commit_message=args.commit_message or f"Upload {folder.name} with oodunleash",
        )
    except Exception as exc:  # huggingface_hub's HTTP, auth and connection errors alike
        raise PushError(
            f"Uploading {folder} to {args.repo_id!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    print(f"Pushed {len(files)} files to {info.commit_url}")
    return 0
