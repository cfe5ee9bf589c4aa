"""Save a checkpoint over ``FOLDER`` and SIGKILL this process at the ``KILL_AT``-th step that
changes the disk (0: never). ``MODE`` is ``exchange`` (the atomic swap) or ``fallback`` (the
two-rename swap used where the system has no atomic exchange).

    python tests/checkpoint/kill_worker.py FOLDER SEED KILL_AT MODE

Run by tests/checkpoint/test_faults.py (with the repository on PYTHONPATH) in a subprocess; prints ``steps=N`` when it is not killed.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import oodunleash.checkpoint.folder as folder_module
from tests.checkpoint.builders import tiny_umap


def main() -> None:
    folder, seed, kill_at, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    unleashed = tiny_umap(seed)
    steps = 0

    def fault_point() -> None:
        nonlocal steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    folder_module._fault_point = fault_point
    if mode == "fallback":
        folder_module._exchange = lambda a, b: False
    unleashed.save_pretrained(folder, keep_masks=True)
    print(f"steps={steps}")


if __name__ == "__main__":
    main()
