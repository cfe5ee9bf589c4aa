"""The ``oodunleash`` entry point: version, help, and the exit codes of bad input and failures."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import oodunleash
from oodunleash.cli import main
from tests.cli.commands import (
    MODEL,
    dirs,
    model_args,
    run,
)
from tests.helpers.scripts import ROOT


# --------------------------------------------------------------------------- basics
def test_version_through_python_m_without_importing_the_benchmark():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "oodunleash", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"oodunleash {oodunleash.__version__}"
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "oodunleash.cli" in imported
    assert not {"oodunleash.benchmark", "oodunleash.bench", "oodunleash.demo"} & imported


def test_help_lists_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "tune", "evaluate", "score", "push", "list-scores", "demo", "benchmark"):
        assert command in out
    assert "exit codes" in out and "usage or bad input" in out


# --------------------------------------------------------------------------- demo / benchmark
# --------------------------------------------------------------------------- bad input
def _bad_cases(data: pathlib.Path, checkpoint: pathlib.Path) -> dict[str, tuple[list, str]]:
    id_ood = ["--id-dir", str(data / "val"), "--ood-dir", f"o={data / 'ood_loose'}"]
    return {
        "missing id dir": (
            ["evaluate", *model_args(MODEL), "--id-dir", str(data / "nope"), "--ood-dir", "o=x"],
            "no such directory",
        ),
        "empty train dir": (
            ["fit", *model_args(MODEL), *dirs(data, "empty", None)],
            "empty",
        ),
        "empty ood dir": (
            ["evaluate", *model_args(MODEL), *id_ood[:2], "--ood-dir", f"e={data / 'empty'}"],
            "no images",
        ),
        "unknown model": (["evaluate", *model_args("resnet_nope"), *id_ood], "Unknown model"),
        "unknown score": (
            ["evaluate", *model_args(MODEL), *id_ood, "--scores", "nope"],
            "Unknown OOD score 'nope'",
        ),
        "score needs fitting": (
            ["score", *model_args(MODEL), str(data / "ood_loose"), "--score", "knn"],
            "--fit-dir",
        ),
        "duplicate ood name": (
            ["evaluate", *model_args(MODEL), *id_ood, "--ood-dir", f"o={data / 'ood_nested'}"],
            "given twice",
        ),
        "missing weights file": (
            ["score", *model_args(MODEL, "--checkpoint", "nope.safetensors"), str(data)],
            "nope.safetensors: no such file",
        ),
        "weights that do not fit": (
            [
                "score",
                *model_args("resnet10t", "--checkpoint", str(checkpoint / "model.safetensors")),
                str(data / "ood_loose"),
            ],
            "does not fit",
        ),
        "val classes differ": (
            ["fit", *model_args(MODEL), *dirs(data, val="ood_nested")],
            "must match",
        ),
        "bad std": (
            # --std takes several numbers: the images go before it
            [
                "score",
                MODEL,
                str(data / "ood_loose"),
                *model_args(MODEL, "--std", "0.5", "0.5")[1:],
            ],
            "--std takes 1 or 3 numbers",
        ),
        "keep ratio out of range": (
            ["fit", *model_args(MODEL), *dirs(data, val=None), "--method", "umap"]
            + ["--keep-ratio", "1.5"],
            "keep_ratio must be in (0, 1]",
        ),
        "unreadable image": (
            ["score", *model_args(MODEL), str(data / "broken")],
            f"Cannot read the image {data / 'broken' / 'img1.png'}",
        ),
        "unreadable image in a worker": (
            ["score", *model_args(MODEL, "--workers", "1"), str(data / "broken")],
            f"error: Cannot read the image {data / 'broken' / 'img1.png'}",
        ),
        "head size differs from the classes": (
            ["fit", *model_args(MODEL, "--num-classes", "3"), *dirs(data, val=None)],
            "has 3 classes but --train-dir has 2 (blue, red)",
        ),
        "missing image": (
            ["score", *model_args(MODEL), str(data / "nope.png")],
            "no such file or directory",
        ),
        "not a checkpoint folder": (
            ["evaluate", *model_args(str(data / "val")), *id_ood],
            "not an oodunleash checkpoint",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing id dir",
        "empty train dir",
        "empty ood dir",
        "unknown model",
        "unknown score",
        "score needs fitting",
        "duplicate ood name",
        "missing weights file",
        "weights that do not fit",
        "val classes differ",
        "bad std",
        "missing image",
        "not a checkpoint folder",
        "keep ratio out of range",
        "unreadable image",
        "unreadable image in a worker",
        "head size differs from the classes",
    ],
)
def test_bad_input_exits_2_with_one_line(case, data, checkpoint, capsys):
    args, expected = _bad_cases(data, checkpoint)[case]
    code, out, err = run(args, capsys)
    assert code == 2, err
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"oodunleash {args[0]}: error: ")


def test_malformed_ood_dir_is_a_usage_error(data, capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", MODEL, "--id-dir", str(data / "val"), "--ood-dir", "no-equals-sign"])
    assert info.value.code == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_runtime_failure_exits_1(data, capsys):
    # A random model's training loss is far above ln(2): the default ξ recipe refuses it.
    code, _, err = run(
        ["fit", *model_args(MODEL), *dirs(data, val=None), "--epochs", "1"],
        capsys,
    )
    assert code == 1, err
    assert "LossConstraintTooHighError" in err and len(err.strip().splitlines()) == 1
