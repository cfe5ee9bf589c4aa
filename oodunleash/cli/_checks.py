"""Checks of a command's arguments that need no model or data: run before any work, so that a
bad output path or an impossible size fails in a second with exit code 2, not after a
fine-tune with the result lost."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from oodunleash.cli._errors import UsageError

__all__ = ["check_arguments"]

#: Bytes per pixel of one decoded, resized float32 RGB image, with the copies the
#: transforms make on the way (PIL image, resized copy, tensor).
_BYTES_PER_PIXEL = 3 * 4 * 3


def _available_memory() -> int | None:
    """Bytes of memory this machine can still give (``MemAvailable``), else its total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_image_size(args: argparse.Namespace) -> None:
    size = getattr(args, "img_size", None)
    if size is None:
        return
    batch = getattr(args, "batch_size", None) or 1
    needed = batch * size * size * _BYTES_PER_PIXEL
    available = _available_memory()
    if available is not None and needed > available:
        largest = int((available / (batch * _BYTES_PER_PIXEL)) ** 0.5)
        raise UsageError(
            f"--img-size {size} with --batch-size {batch} needs about {needed / 2**30:.0f} GiB "
            f"for one batch of images, and this machine has {available / 2**30:.0f} GiB free. "
            f"Use a smaller --img-size (at most about {largest}) or --batch-size."
        )


def _check_folder_out(path: str | None, flag: str) -> None:
    """A checkpoint folder to be written: not a file, and its nearest existing folder
    writable."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{flag} {path} is a file; pass a folder for the checkpoint.")
    _check_writable(target, flag, path)


def _check_file_out(path: str | None, flag: str) -> None:
    """A file to be written: not a folder, in a folder that exists and is writable."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; pass a file name, e.g. {path}/out.json.")
    if not target.parent.is_dir():
        raise UsageError(
            f"{flag} {path}: the folder {target.parent} does not exist. Create it first "
            f"(mkdir -p {target.parent}), or write somewhere else."
        )
    _check_writable(target, flag, path)


def _check_writable(target: Path, flag: str, path: str) -> None:
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: {folder} is not writable. Write somewhere else.")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments that would make a command fail after its work (exit code 2)."""
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise UsageError(
            f"--workers must be 0 (load in the main process) or a positive number of "
            f"processes, got {workers}."
        )
    _check_image_size(args)
    command = getattr(args, "command", None)
    if command in ("fit", "tune"):
        _check_folder_out(getattr(args, "out", None), "--out")
    if command == "score":
        _check_file_out(getattr(args, "out", None), "--out")
    if command in ("evaluate", "tune"):
        _check_file_out(getattr(args, "json", None), "--json")
