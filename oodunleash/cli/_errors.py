"""How the command line fails: one line on stderr and an exit code a script can rely on."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "EXIT_CODES_HELP", "UsageError", "exit_code"]

EXIT_OK = 0
#: The work itself failed: training diverged, the Hub refused an upload, out of memory, ...
EXIT_FAILURE = 1
#: The command was wrong: a bad flag, a missing or empty directory, an unknown model or score.
EXIT_USAGE = 2

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  runtime failure (training diverged, the Hub refused an upload, out of memory, ...)
  2  usage or bad input (bad flag, missing or empty directory, unknown model or score,
     malformed NAME=DIR, an unreadable image, a checkpoint that does not fit the model)
"""


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit code 2."""


def exit_code(error: BaseException) -> int:
    """The exit code for an error that ends a command."""
    if isinstance(error, UsageError):
        return EXIT_USAGE
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from oodunleash import HubError

    # Checkpoint errors that describe the input (no such folder or repo, not a checkpoint, an
    # altered file, weights that do not fit) are bad input; the Hub's auth and connection
    # errors are failures.
    if isinstance(error, HubError) and isinstance(error, FileNotFoundError | ValueError):
        return EXIT_USAGE
    if isinstance(error, RepositoryNotFoundError | RevisionNotFoundError):
        return EXIT_USAGE
    return EXIT_FAILURE
