"""Writing files so that an interrupted write never destroys what was saved before."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and a rename.

    A crash, a full disk or a killed process leaves either the old file or the new one under
    ``path``, never a truncated one; the temporary file is removed on errors. Results that took
    hours (a benchmark's per-seed JSON, a checkpoint a resumed run needs) are written this way.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "result.json"
        >>> write_atomic(target, '{"fpr95": 0.3}')
        >>> target.read_text()
        '{"fpr95": 0.3}'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
