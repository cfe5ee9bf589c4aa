"""Output paths, sizes and worker counts are checked before a command does any work: exit code
2 and a one-line message, nothing written (oodunleash.cli._checks)."""

from __future__ import annotations

import re

import pytest

from oodunleash.cli import _evaluate, _train
from tests.cli.commands import MODEL, model_args, run


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work replaced by a recorder: a check that passes reaches it."""
    started = []
    for module, name in (
        (_train, "cmd_fit"),
        (_train, "cmd_tune"),
        (_evaluate, "cmd_evaluate"),
        (_evaluate, "cmd_score"),
    ):
        monkeypatch.setattr(module, name, lambda args, n=name: started.append(n) or 0)
    return started


def _snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("command", "make", "match"),
    [
        ("fit", lambda t: ["--train-dir", str(t), "--out", str(_file(t))], "--out .* is a file"),
        ("tune", lambda t: [*_tune(t), "--out", str(_file(t))], "--out .* is a file"),
        ("tune", lambda t: [*_tune(t), "--json", str(t)], "--json .* is a folder"),
        ("score", lambda t: [str(t), "--out", str(t / "no" / "dir" / "s.csv")], "does not exist"),
        ("evaluate", lambda t: [*_evaluate_dirs(t), "--json", str(t)], "--json .* is a folder"),
        ("score", lambda t: [str(t), "--workers", "-1"], "--workers must be 0"),
        ("score", lambda t: [str(t), "--img-size", "100000"], "--img-size 100000 .* GiB.*smaller"),
    ],
)
def test_bad_outputs_refused_before_any_work(command, make, match, tmp_path, capsys, no_work):
    args = make(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = run([command, *model_args(MODEL), *args], capsys)
    assert code == 2, err
    assert err.startswith(f"oodunleash {command}: error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert no_work == []  # refused before the command started
    assert _snapshot(tmp_path) == before


def _tune(folder):
    return ["--train-dir", str(folder), "--val-dir", str(folder)]


def _evaluate_dirs(folder):
    return ["--id-dir", str(folder), "--ood-dir", f"x={folder}"]


def _file(folder):
    path = folder / "taken"
    path.write_text("mine")
    return path


def test_good_outputs_reach_the_command(tmp_path, capsys, no_work):
    code, _, err = run(
        ["score", *model_args(MODEL), str(tmp_path), "--out", str(tmp_path / "s.csv")], capsys
    )
    assert code == 0, err
    assert no_work == ["cmd_score"]
