"""The oodunleash demo as a script: ``python examples/demo.py [--quick] [--dataset digits]``.

Same as ``oodunleash demo``: trains a small CNN on Fashion-MNIST (or scikit-learn's digits when
Fashion-MNIST is not installed), runs UM and UMAP and a plain cross-entropy control from the
trained model, prints a before/after table and writes plots to ``--out``.
"""

import sys

from oodunleash.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
