"""Writing a checkpoint folder as a whole: everything goes into a temporary folder beside the
target, which is then swapped in with a rename, so that a crash or a kill at any instant leaves
the old checkpoint or the new one, never a mix. Files the library did not write are kept.

On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call. Where that is not available (other
systems, some file systems) it is two renames; a kill between them leaves the old checkpoint
under ``.<name>.oodunleash-old`` beside the target, which loading and the next save recover.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errnos
import os
import shutil
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["interrupted_backup", "write_folder"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fault_point() -> None:
    """Called before every step that changes the disk. Does nothing; the kill-during-save tests
    replace it (in a subprocess) to kill the process at each step in turn."""


def _backup_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.oodunleash-old")


def _staging_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.oodunleash-tmp-{os.getpid()}")


def interrupted_backup(target: Path) -> Path | None:
    """The previous checkpoint left beside a missing ``target`` by a save killed between its two
    renames (only where the atomic exchange is unavailable), else ``None``."""
    backup = _backup_path(target)
    return backup if not target.exists() and backup.is_dir() else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; ``False`` where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (errnos.EINVAL, errnos.ENOSYS, errnos.ENOTSUP):
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_writable(path: Path, what: str) -> None:
    # The mode bits too: a folder marked read-only is refused even for root, who may write it.
    if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o200:
        raise PermissionError(
            f"{what} {path} is read-only, so the checkpoint cannot be written there. Save to "
            "a writable folder, or make it writable (chmod u+w)."
        )


def _preflight(target: Path, ours: Collection[str], new: Collection[str], overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            f"save_directory {target} is a file; pass a folder (it is created if missing)."
        )
    parent = target.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
    _check_writable(parent, "The parent folder")
    if not target.exists():
        return
    _check_writable(target, "The folder")
    cwd = Path.cwd().resolve()
    if cwd == target.resolve() or target.resolve() in cwd.parents:
        raise ValueError(
            f"{target} is the working directory (or holds it): a checkpoint is written beside "
            "its folder and swapped in, which cannot be done to the folder a program runs in. "
            "Save into a folder of its own, e.g. save_pretrained('checkpoint')."
        )
    foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
    folders = [n for n in foreign if (target / n).is_dir() and not (target / n).is_symlink()]
    if folders:
        raise FileExistsError(
            f"{target} holds folders oodunleash did not write ({', '.join(folders[:5])}): a "
            "checkpoint needs a folder of its own. Save into a new or empty folder; nothing "
            "was written."
        )
    clashes = [n for n in foreign if n in new]
    if clashes and not overwrite:
        raise FileExistsError(
            f"{target} holds {', '.join(clashes)}, which oodunleash did not write (or which "
            "was edited since, or a format-1 model card, which kept no checksum to tell edits "
            "by); it is left as it is. Save into another folder, pass model_card=False to keep "
            "the README.md, or overwrite=True to replace it. Nothing was written."
        )


def _process_alive(pid_text: str) -> bool:
    """Whether the save that made a staging folder may still be running (then it is left)."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # an earlier save of this process, killed by an exception we did not see
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _recover(target: Path) -> None:
    """Finish or undo a save that was killed before it could clean up."""
    backup = _backup_path(target)
    if backup.is_dir():
        _fault_point()
        if target.exists():
            shutil.rmtree(backup)
        else:
            os.rename(backup, target)
    for staging in target.parent.glob(f".{target.name}.oodunleash-tmp-*"):
        if not _process_alive(staging.name.rsplit("-", 1)[-1]):  # a killed save's leftovers
            _fault_point()
            shutil.rmtree(staging, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    _fault_point()
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(staging: Path, target: Path) -> None:
    _fault_point()
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        _fault_point()
        shutil.rmtree(staging)  # now the old checkpoint
        return
    backup = _backup_path(target)
    os.rename(target, backup)
    _fault_point()
    os.rename(staging, target)
    _fault_point()
    shutil.rmtree(backup)


@contextlib.contextmanager
def _save_lock(parent: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``parent`` (the folder the swap happens in) for one save, so
    that two processes saving into one checkpoint take turns: each then reads which files the
    checkpoint it replaces owns *after* the other's swap. Without ``fcntl``: no lock."""
    if fcntl is None:
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_folder(
    target: Path,
    files: Mapping[str, bytes],
    ours: Callable[[Path], Collection[str]],
    *,
    overwrite: bool,
) -> None:
    """Make ``target`` hold ``files``, atomically as a whole.

    Entries of an existing ``target`` that ``ours(target)`` names (files of the previous
    checkpoint, read under the save lock) are replaced or dropped; any other file is kept
    (hard-linked into the new folder), unless it clashes with a name in ``files``: then the
    call refuses, or with ``overwrite`` replaces it. A folder holding sub-folders the library
    did not write is refused. Nothing is changed when the call raises.
    """
    if target.is_symlink():  # swap the folder it points to, and keep the link
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _save_lock(target.parent):
        _write_folder(target, files, ours(target), overwrite=overwrite)


def _write_folder(
    target: Path, files: Mapping[str, bytes], ours: Collection[str], *, overwrite: bool
) -> None:
    _preflight(target, ours, files, overwrite)
    _recover(target)
    staging = _staging_path(target)
    _fault_point()
    staging.mkdir()
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        if target.exists():
            for entry in target.iterdir():
                if entry.name not in ours and entry.name not in files:
                    _fault_point()
                    try:
                        os.link(entry, staging / entry.name, follow_symlinks=False)
                    except OSError:  # no hard links here (another device, FAT, ...)
                        shutil.copy2(entry, staging / entry.name, follow_symlinks=False)
        _fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, target)
    _fsync_dir(target.parent)
