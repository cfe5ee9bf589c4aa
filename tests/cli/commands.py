"""Running ``oodunleash`` commands in the tests: the model and its flags, image folders, CSV.

The model is timm's ``test_resnet`` at 32 px with random weights: the CLI tests check what the
commands do with files, flags and exit codes, not detection quality. Most call
:func:`oodunleash.cli.main` in-process.
"""

from __future__ import annotations

import csv
import pathlib

import numpy as np
import pytest
from PIL import Image

from oodunleash.cli import main

MODEL = "test_resnet"


#: Preprocessing flags of every model command: 32 px, mean/std 0.5, no loader processes.
PREPROCESSING = ["--img-size", "32", "--mean", "0.5", "--std", "0.5", "--workers", "0"]


TOKEN = "hf_fake_write_token"


def write_images(folder: pathlib.Path, n: int, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(rng.normal(colour, 25, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``main(args)``: exit code, stdout, stderr."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def model_args(model: str, *extra: str) -> list[str]:
    return [model, *PREPROCESSING, "--no-progress", "--batch-size", "4", *extra]


def dirs(data: pathlib.Path, train: str = "train", val: str | None = "val") -> list[str]:
    """``--train-dir`` (and ``--val-dir``) flags for sub-folders of ``data``."""
    flags = ["--train-dir", str(data / train)]
    return flags + (["--val-dir", str(data / val)] if val else [])


#: A 1-epoch fine-tune with a ξ the random test model can reach.
QUICK_FIT = ["--epochs", "1", "--loss-constraint", "0.1"]


def read_csv(text: str) -> list[tuple[str, float]]:
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["path", "score"]
    return [(path, float(value)) for path, value in rows[1:]]


def assert_same_scores(csv_text: str, reference_text: str) -> None:
    rows, reference = read_csv(csv_text), read_csv(reference_text)
    assert [p for p, _ in rows] == [p for p, _ in reference]
    assert [v for _, v in rows] == pytest.approx([v for _, v in reference], rel=1e-5)
