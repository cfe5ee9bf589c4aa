"""oodunleash.bench is an application: `import oodunleash` leaves it out."""

from __future__ import annotations

import subprocess
import sys


def test_import_oodunleash_leaves_the_benchmark_out():
    code = (
        "import oodunleash, sys; "
        "loaded = [m for m in sys.modules if m.startswith('oodunleash.bench')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
