"""The test suite. Its layout follows the library's, so the tests of a module sit where it does:

* ``tests/test_<module>.py`` tests ``oodunleash/<module>.py`` (``test_wrapper``, ``test_config``,
  ``test_constraint``, ``test_losses``, ``test_training``, ``test_fitting``, ``test_rollback``,
  ``test_resume``, ``test_masking``, ``test_evaluation``, ``test_scores``, ``test_tuning``...).
  A few cut across modules: ``test_bad_inputs`` (bad input to every public entry point),
  ``test_outliers`` (outlier exposure end to end), ``test_examples`` (``examples/``), and the
  site's own: ``test_docs``, ``test_benchmark_table``, ``test_browser``.
* ``tests/bench/``, ``tests/checkpoint/`` and ``tests/cli/`` test the subpackages
  ``oodunleash.bench``, ``oodunleash.checkpoint`` and ``oodunleash.cli``; fixtures they share
  are in their ``conftest.py``.
* ``tests/helpers/``: the toy models and data every test trains (``toys``), the small fit the
  rollback tests interrupt (``fits``), a fake Hugging Face Hub (``hub_server``), scripts loaded
  by path (``scripts``) and the fresh session of the docstring examples and docs pages
  (``session``).

The docstring examples' own set-up is the repository's ``conftest.py``.
"""
