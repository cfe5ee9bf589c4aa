"""The ``oodunleash`` command line: fit, tune, evaluate, score and push your own model on your
own image folders; the Fashion-MNIST demo and benchmark.

Run ``oodunleash --help`` (or ``python -m oodunleash --help``); docs/cli.md has examples.
Every command ends with exit code 0 on success, 1 on a runtime failure and 2 on bad usage or
input, with a one-line message on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from oodunleash.cli._checks import check_arguments
from oodunleash.cli._errors import EXIT_USAGE, exit_code

__all__ = ["main"]


def _one_line(error: BaseException) -> str:
    """The error's message on one line. An error re-raised from a ``DataLoader`` worker carries
    the worker's traceback: its last line is the original message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        name, sep, message = lines[-1].partition(": ")  # "package.module.ErrorType: message"
        lines = [message if sep and " " not in name else lines[-1]]
    return " ".join(" ".join(lines).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oodunleash`` console script; returns the exit code.

    Example:
        >>> main(["list-scores"])  # doctest: +ELLIPSIS
        ash_b...
        0
    """
    from oodunleash.cli._parser import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse reports bad flags itself, with exit code 2
    try:
        check_arguments(args)  # output paths and sizes, before any work
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"oodunleash {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        code = exit_code(error)
        prefix = "" if code == EXIT_USAGE else f"{type(error).__name__}: "
        print(f"oodunleash {args.command}: error: {prefix}{_one_line(error)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
