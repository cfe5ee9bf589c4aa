"""The oodunleash demo as a script: ``python examples/demo.py [--quick] [--dataset digits]``.

Same as ``oodunleash demo``: trains a small CNN on Fashion-MNIST (or scikit-learn's digits when
Fashion-MNIST is not installed), lets ``oodunleash.tune`` choose the fine-tune and the score on
validation data, compares the choice with the trained model on the test OOD sets, and writes
tables and plots to ``--out``.
"""

import sys

from oodunleash.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
