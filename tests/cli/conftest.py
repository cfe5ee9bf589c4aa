"""Fixtures of the CLI tests: generated image folders, a checkpoint ``oodunleash fit`` wrote,
a fake Hub."""

from __future__ import annotations

import pathlib

import pytest
import torch

from oodunleash.cli import main
from tests.cli.commands import (
    MODEL,
    QUICK_FIT,
    TOKEN,
    dirs,
    model_args,
    write_images,
)
from tests.helpers.hub_server import FakeHub, use_fake_hub


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> pathlib.Path:
    """``train/``, ``val/`` (classes red and blue), ``ood_loose/`` (images, no class folder),
    ``ood_nested/`` (images in a sub-folder), ``empty/`` and ``broken/`` (one file is no
    image)."""
    root = tmp_path_factory.mktemp("images")
    for split, n, seed in (("train", 6, 0), ("val", 3, 1)):
        write_images(root / split / "red", n, (200, 40, 40), seed)
        write_images(root / split / "blue", n, (40, 40, 200), seed + 10)
    write_images(root / "ood_loose", 4, (40, 200, 40), 2)
    write_images(root / "ood_nested" / "any", 3, (128, 128, 128), 3)
    (root / "empty").mkdir()
    write_images(root / "broken", 1, (0, 0, 0), 4)
    (root / "broken" / "img1.png").write_text("not a PNG")
    return root


@pytest.fixture(scope="session")
def checkpoint(data, tmp_path_factory) -> pathlib.Path:
    """A UM checkpoint folder written by ``oodunleash fit``."""
    out = tmp_path_factory.mktemp("ckpt") / "unleashed"
    torch.manual_seed(0)
    code = main(["fit", *model_args(MODEL), *dirs(data), *QUICK_FIT, "--out", str(out)])
    assert code == 0
    return out


# --------------------------------------------------------------------------- Hub
@pytest.fixture
def hub(tmp_path, monkeypatch):
    with (
        FakeHub(tokens=(TOKEN,)) as server,
        use_fake_hub(server, tmp_path / "hf-cache", monkeypatch, token=TOKEN),
    ):
        yield server
