"""A resume state belongs to one run: another model, other data or an edited file is refused
before anything is loaded, and nothing on disk or in memory changes (oodunleash.finetune.resume)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from oodunleash import OODUnleash
from oodunleash.finetune.resume import STATE_FILE, FitStateError
from tests.helpers.fits import assert_same, dataset, make_net, snapshot
from tests.helpers.toys import ConvNet


def _fit_a(folder):
    data = DataLoader(dataset(), batch_size=16)
    OODUnleash(make_net(0), constraint=0.3).fit(
        data, epochs=2, checkpoint_dir=folder, progress=False
    )
    return data


def _resume(unleashed, data, folder):
    before, on_disk = snapshot(unleashed), (folder / STATE_FILE).read_bytes()
    with pytest.raises(FitStateError) as info:
        unleashed.fit(data, epochs=2, checkpoint_dir=folder, resume=True, progress=False)
    assert_same(before, snapshot(unleashed))
    assert (folder / STATE_FILE).read_bytes() == on_disk
    assert "resume=False" in str(info.value)
    return str(info.value)


def test_a_finished_state_is_not_taken_by_another_model(tmp_path):
    data = _fit_a(tmp_path)
    message = _resume(OODUnleash(make_net(1), constraint=0.3), data, tmp_path)
    assert "different model" in message


def test_resuming_into_another_architecture_is_refused(tmp_path):
    data = _fit_a(tmp_path)
    message = _resume(OODUnleash(ConvNet(width=4).eval(), constraint=0.3), data, tmp_path)
    assert "different architecture" in message


def test_resuming_on_other_data_is_refused(tmp_path):
    _fit_a(tmp_path)
    other = DataLoader(dataset(96), batch_size=16)
    message = _resume(OODUnleash(make_net(0), constraint=0.3), other, tmp_path)
    assert "other data" in message and "4 batches" in message


def test_the_same_run_still_resumes(tmp_path):
    data = _fit_a(tmp_path)
    again = OODUnleash(make_net(0), constraint=0.3)
    again.fit(data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert again.is_fitted and len(again.history_) == 2


def _edit(folder, **fields):
    path = folder / STATE_FILE
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["oodunleash_fit_state"])
    meta.update(fields)
    save_file(load_file(path), path, metadata={"oodunleash_fit_state": json.dumps(meta)})


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"epoch": 99}, "epoch 99, not an epoch of this 2-epoch fit"),
        ({"epoch": 0}, "epoch 0"),
        ({"history": "oops"}, "history that is not a list of 2"),
        ({"history": ["o", "o"]}, "entries are not epoch records"),
        ({"loss_constraint": -3}, "loss_constraint -3: ξ must be a positive"),
        ({"loss_constraint": None}, "loss_constraint None"),
        ({"run": None}, "does not say which model"),
    ],
)
def test_hand_edited_resume_file_is_refused(tmp_path, fields, problem):
    data = _fit_a(tmp_path)
    _edit(tmp_path, **fields)
    message = _resume(OODUnleash(make_net(0), constraint=0.3), data, tmp_path)
    assert problem in message


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    path = tmp_path / "state"
    path.write_text("mine")
    unleashed = OODUnleash(make_net(0), constraint=0.3)
    before = snapshot(unleashed)
    with pytest.raises(NotADirectoryError, match="checkpoint_dir .* is a file; pass a folder"):
        unleashed.fit(data, epochs=1, checkpoint_dir=path, progress=False)
    assert_same(before, snapshot(unleashed))
    assert path.read_text() == "mine"


def test_read_only_checkpoint_dir_is_refused_before_training(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    unleashed = OODUnleash(make_net(0), constraint=0.3)
    before = snapshot(unleashed)
    try:
        for folder in (locked, locked / "new"):
            with pytest.raises(PermissionError, match="read-only.*chmod u\\+w"):
                unleashed.fit(data, epochs=1, checkpoint_dir=folder, progress=False)
    finally:
        locked.chmod(0o700)
    assert_same(before, snapshot(unleashed))
    assert list(locked.iterdir()) == []
