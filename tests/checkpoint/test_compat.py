"""Checkpoints written by an earlier release still load and score exactly as they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from oodunleash import OODUnleash
from tests.checkpoint.fixtures.checkpoint_v0_1.make_fixture import make_sequential

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_v0_1"

EXPECTED = json.loads((FIXTURES / "expected_scores.json").read_text())


def _load(name: str, tmp_path: Path) -> OODUnleash:
    # A copy, so that nothing a load might write can touch the committed files.
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    model = make_sequential if name == "sequential_umap" else None
    return OODUnleash.from_pretrained(folder, model=model)


@pytest.mark.parametrize("name", sorted(EXPECTED["checkpoints"]))
def test_v0_1_checkpoint_reproduces_its_scores(name, tmp_path):
    loaded = _load(name, tmp_path)
    inputs = torch.tensor(EXPECTED["inputs"])
    for score, values in EXPECTED["checkpoints"][name].items():
        assert torch.allclose(loaded.score(inputs, score), torch.tensor(values), atol=1e-5), score


def test_v0_1_umap_checkpoint_keeps_its_mask(tmp_path):
    loaded = _load("sequential_umap", tmp_path)
    assert loaded.masks_ is not None and loaded.masks_.is_attached
    assert loaded.masks_.layer_names == ["0", "3", "5"]
    kept = loaded.masks_.kept_fraction()
    assert all(abs(fraction - 0.7) < 0.02 for fraction in kept.values()), kept
    assert loaded.class_names == ["a", "b", "c"]


def test_the_constraint_recipe_is_recorded_with_its_factor(tmp_path):
    """A checkpoint names the ξ recipe's factor, so it keeps its meaning if the default
    changes (release 0.1 wrote "relative" and meant 3x; see ``UnleashConfig.from_legacy``)."""
    from oodunleash.checkpoint.format import CONFIG_NAME
    from oodunleash.config import DEFAULT_CONSTRAINT_FACTOR, Relative

    unleashed = OODUnleash(make_sequential(), score="energy")
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))]
    folder = unleashed.fit_scores(batches, progress=False).save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / CONFIG_NAME).read_text())
    recorded = config["params"]["constraint"]
    assert recorded == {"recipe": "relative", "factor": DEFAULT_CONSTRAINT_FACTOR}
    for written, expected in (
        (dict(recorded, factor=2.5), Relative(2.5)),
        ("relative", Relative()),
    ):
        config["params"]["constraint"] = written
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        loaded = OODUnleash.from_pretrained(folder, model=make_sequential())
        assert loaded.config.loss_constraint == expected
