"""A fresh start for code that reads as a new Python session: the docstring examples
(``--doctest-modules``, set up by the repository's ``conftest.py``) and the documentation pages
(``--markdown-docs``, set up by ``docs/conftest.py``).

Both begin from ``torch.manual_seed(0)`` with only the built-in OOD scores registered, and run
torch single-threaded (``OODUNLEASH_DOCS_THREADS`` overrides): as fast for their tiny models,
and immune to OpenMP's busy-waiting when other processes share the cores.
"""

from __future__ import annotations

import os

THREADS_ENV = "OODUNLEASH_DOCS_THREADS"

#: The OOD scores registered before any example ran; an example that registers its own (the
#: scores tutorial, ``register_score``'s docstring) must not leak it into the next one.
_builtin_scores: list[str] | None = None


def example_threads() -> int:
    """How many threads torch runs examples with: ``OODUNLEASH_DOCS_THREADS``, else 1."""
    return int(os.environ.get(THREADS_ENV, "1"))


def fresh_start() -> None:
    """Seed torch with 0 and unregister every OOD score an earlier example registered."""
    global _builtin_scores
    try:
        from oodunleash.scores import list_scores, unregister_score
    except ImportError:  # a docs page may run before the module exists; it is skipped then
        pass
    else:
        if _builtin_scores is None:
            _builtin_scores = list_scores()
        for name in set(list_scores()) - set(_builtin_scores):
            unregister_score(name)
    import torch

    torch.manual_seed(0)
