"""The Fashion-MNIST benchmark as a script; arguments as for ``oodunleash benchmark``.

Example (the run recorded in docs/benchmarks.md, on one H100)::

    python examples/benchmark_fmnist.py --settings small_cnn resnet18 small_cnn:noise=0.2 \\
        --seeds 0 1 2 --device cuda --jobs 9 --time-budget 420
"""

import sys

from oodunleash.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
