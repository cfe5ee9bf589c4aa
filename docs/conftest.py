"""Run the code of the documentation pages as tests: ``pytest --markdown-docs docs/``.

pytest-markdown-docs collects every fenced Python block of ``docs/**/*.md``. This file (kept out of
the site by ``exclude_docs`` in ``mkdocs.yml``) adds what a tutorial site needs on top:

* **Material's fence syntax.** Pages write ``{.python continuation}`` and ``{.python notest}``
  (the brace form that ``pymdownx.superfences`` renders); the option
  ``--markdown-docs-syntax=superfences`` is switched on here so the plain command works.
* **One run per block.** A ``continuation`` block shares the state of the blocks before it.
  pytest-markdown-docs does that by re-running all earlier blocks of the page for every block,
  which would train a tutorial's model once per block. The runner below keeps each page's
  namespace and runs only the new block in it (line numbers stay those of the page). Running a
  single block with ``-k`` still runs everything before it, so every block stays testable alone.
  Should a future pytest-markdown-docs drop the private hook used here, the plugin's own
  behaviour (re-running) takes over: slower, equally correct.
* **A scratch directory per page.** Blocks run with the working directory set to a fresh
  temporary directory per page, so a tutorial that writes ``my-model/`` leaves nothing in the repo.
* **Pages that wait for a module.** A page may declare what it needs in an HTML comment::

      <!-- docs-test: requires oodunleash.scores oodunleash.OODUnleash.evaluate -->

  Each name is a module, or a module followed by attributes. While one is missing, the page's
  blocks are skipped with a reason naming it. ``OODUNLEASH_DOCS_REQUIRE_ALL=1`` (set it in CI
  once every module has landed) turns those skips into failures.
* **A fresh start per page**, as for the docstring examples (:mod:`tests.helpers.session`):
  every page starts from ``torch.manual_seed(0)`` with only the built-in scores (a page's own are
  unregistered before the next page), and torch runs single-threaded
  (``OODUNLEASH_DOCS_THREADS`` overrides).
* **Quiet output.** What a block prints (progress bars included) is shown only when it fails, or
  always with ``OODUNLEASH_DOCS_SHOW_OUTPUT=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pathlib
import re

import pytest

from tests.helpers.session import example_threads, fresh_start

REQUIRE_ALL_ENV = "OODUNLEASH_DOCS_REQUIRE_ALL"
SHOW_OUTPUT_ENV = "OODUNLEASH_DOCS_SHOW_OUTPUT"
REQUIRES = re.compile(r"^<!--\s*docs-test:\s*requires\s+(?P<names>[^>]*?)\s*-->", re.MULTILINE)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "markdowndocs_syntax"):
        config.option.markdowndocs_syntax = "superfences"
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(example_threads())


# --------------------------------------------------------------------------- requirements
def _missing(name: str) -> str | None:
    """``None`` when ``name`` (a module, or a module then attributes) exists, else why not."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # the module itself is absent: try its parent
            return f"importing {module_name} failed: {error}"
        except Exception as error:  # noqa: BLE001 - a module mid-write may raise anything
            return f"importing {module_name} failed: {type(error).__name__}: {error}"
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{name} does not exist yet"
            obj = getattr(obj, attr)
        return None
    return f"{name} does not exist yet"


def page_requirements(path: pathlib.Path) -> list[str]:
    """The names a page declares with ``<!-- docs-test: requires ... -->``."""
    return [n for m in REQUIRES.finditer(path.read_text("utf8")) for n in m["names"].split()]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strict = os.environ.get(REQUIRE_ALL_ENV) == "1"
    verdicts: dict[pathlib.Path, list[str]] = {}
    for item in items:
        path = pathlib.Path(str(item.path))
        if path.suffix != ".md":
            continue
        if path not in verdicts:
            reasons = [r for r in map(_missing, page_requirements(path)) if r is not None]
            verdicts[path] = reasons
        if verdicts[path] and not strict:
            item.add_marker(pytest.mark.skip(reason="; ".join(verdicts[path])))


# --------------------------------------------------------------------------- scratch directory
@pytest.fixture(scope="session")
def _page_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[pathlib.Path, pathlib.Path]:
    return {}


@pytest.fixture(autouse=True)
def _page_workdir(
    request: pytest.FixtureRequest,
    _page_dirs: dict[pathlib.Path, pathlib.Path],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = pathlib.Path(str(request.node.path))
    if path.suffix != ".md":
        return
    if path not in _page_dirs:
        _page_dirs[path] = tmp_path_factory.mktemp(path.stem)
    monkeypatch.chdir(_page_dirs[path])


# --------------------------------------------------------------------------- shared-state runner
try:  # private API of pytest-markdown-docs 0.9: fall back to its default runner without it
    from pytest_markdown_docs._runners import DefaultRunner, register_runner
except ImportError:  # pragma: no cover
    DefaultRunner = register_runner = None

#: The page whose namespace is kept: ``(path, source run so far, namespace)``.
_state: dict[str, tuple[str, dict]] = {}


if register_runner is not None:

    @register_runner(default=True)
    class SharedStateRunner(DefaultRunner):
        """Run only the new block of a page, in the namespace its earlier blocks left."""

        def runtest(self, test, args, *, asyncio_runner=None):
            key = str(test.source_path)
            previous = _state.pop(key, None)
            _state.clear()  # keep one page alive at a time
            if previous is not None and previous[0] and test.source.startswith(previous[0]):
                done, namespace = previous
                for name, value in args.items():  # fixtures requested by this block
                    namespace.setdefault(name, value)
                # Blank lines in place of the code already run keep the page's line numbers.
                source = "\n" * done.count("\n") + test.source[len(done) :]
            else:
                namespace, source = args, test.source
                fresh_start()
            output = io.StringIO()
            quiet = os.environ.get(SHOW_OUTPUT_ENV) != "1"
            try:
                with (
                    contextlib.redirect_stdout(output) if quiet else contextlib.nullcontext(),
                    contextlib.redirect_stderr(output) if quiet else contextlib.nullcontext(),
                ):
                    super().runtest(
                        dataclasses.replace(test, source=source),
                        namespace,
                        asyncio_runner=asyncio_runner,
                    )
            except BaseException as error:
                if output.getvalue():
                    error.add_note(f"--- output of the block ---\n{output.getvalue()}")
                raise
            _state[key] = (test.source, namespace)
