"""Fields of oodunleash_config.json edited by hand are refused on loading, naming the field,
instead of being taken on trust (oodunleash.checkpoint.consistency)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oodunleash import OODUnleash
from oodunleash.checkpoint import CONFIG_NAME
from oodunleash.checkpoint.errors import CheckpointMismatchError, CorruptCheckpointError
from tests.checkpoint.builders import TinyNet, tiny_umap


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "ckpt"
    return tiny_umap(1).save_pretrained(
        folder, keep_masks=True, class_names=["a", "b", "c"], input_size=(3, 16, 16)
    )


def _edit(pristine: Path, tmp_path: Path, change) -> Path:
    folder = Path(shutil.copytree(pristine, tmp_path / "ckpt"))
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def _set(path: str, value, *, drop_digests: bool = False):
    def change(config):
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
        if drop_digests:  # as written before digests were recorded
            del config["field_sha256"]

    return change


def _refused(folder: Path, error: type[Exception], match: str) -> None:
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(error, match=match):
        OODUnleash.from_pretrained(folder, model=TinyNet)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    ("path", "value", "drop", "error", "match"),
    [
        ("fitted", False, False, CorruptCheckpointError, r"field 'fitted' does not match.*edited"),
        ("fitted", False, True, CorruptCheckpointError, r"'fitted' is false, but .* holds a fit"),
        ("loss_constraint", None, False, CorruptCheckpointError, r"'loss_constraint'.*edited"),
        ("class_names", ["a", "b"], False, CorruptCheckpointError, r"2 names but.*is 3"),
        ("model.num_classes", 99, False, CorruptCheckpointError, r"3 names but.*is 99"),
        ("params.layers", 5, False, CorruptCheckpointError, r"'params.layers' must be.*got 5"),
        (
            "preprocessing.input_size",
            [3, -1, -1],
            False,
            CorruptCheckpointError,
            r"'preprocessing.input_size' must be \(channels, height, width\).*\[3, -1, -1\]",
        ),
    ],
)
def test_edited_field_is_refused(pristine, tmp_path, path, value, drop, error, match):
    folder = _edit(pristine, tmp_path, _set(path, value, drop_digests=drop))
    _refused(folder, error, match + r".*save the checkpoint again")


def test_class_count_is_checked_on_the_model(pristine, tmp_path):
    def change(config):
        config["class_names"] = None  # no names is allowed: the model is what tells
        config["model"]["num_classes"] = 99

    folder = _edit(pristine, tmp_path, change)
    _refused(folder, CheckpointMismatchError, r"records 99 classes.*the model has 3.*fix that")


def test_unedited_checkpoint_still_loads(pristine, tmp_path):
    folder = Path(shutil.copytree(pristine, tmp_path / "ckpt"))
    loaded = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert loaded.is_fitted and loaded.class_names == ["a", "b", "c"]
