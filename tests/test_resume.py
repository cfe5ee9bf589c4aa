"""A fit saved each epoch resumes to the uninterrupted result (oodunleash.finetune.resume)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from oodunleash import OODUnleash
from oodunleash.config import Relative
from oodunleash.finetune.resume import STATE_FILE, FitStateError
from tests.helpers.fits import Interrupt, assert_same, dataset, make_net, snapshot


def _history(unleashed):
    return [{k: v for k, v in rec.items() if k != "time_s"} for rec in unleashed.history_]


@pytest.mark.parametrize("method", ["um", "umap"])
def test_killed_fit_resumes_bit_identical(method, tmp_path):
    data = dataset(96)

    def fresh():
        return OODUnleash(make_net(), method, constraint=Relative(0.3), seed=5)

    def shuffled():
        return DataLoader(data, batch_size=16, shuffle=True)  # shuffled by torch's global RNG

    reference = fresh().fit(shuffled(), epochs=3, progress=False)

    killed = fresh()
    before = snapshot(killed)
    # pass 1 is ξ, pass 3 is epoch 2: killed at its second batch
    with pytest.raises(KeyboardInterrupt):
        killed.fit(Interrupt(shuffled(), 3, 2), epochs=3, checkpoint_dir=tmp_path, progress=False)
    assert_same(before, snapshot(killed))  # the kill lost nothing, changed nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary left

    killed.fit(shuffled(), epochs=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert killed.loss_constraint_ == reference.loss_constraint_
    assert _history(killed) == _history(reference)
    ref_state = reference.model.state_dict()
    for key, value in killed.model.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    if method == "umap":
        for name in reference.masks_.layer_names:
            assert torch.equal(
                killed.masks_.layer_scores(name), reference.masks_.layer_scores(name)
            )
        assert killed.sparsity() == reference.sparsity()


def test_fit_state_is_safetensors_with_json_and_checked_on_resume(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    OODUnleash(make_net(), constraint=0.3).fit(data, epochs=2, checkpoint_dir=tmp_path)
    with safe_open(str(tmp_path / STATE_FILE), "pt") as handle:
        record = json.loads(handle.metadata()["oodunleash_fit_state"])
        keys = set(handle.keys())
    assert record["epoch"] == 2 and len(record["history"]) == 2
    assert record["loss_constraint"] == 0.3
    assert "rng.cpu" in keys and any(k.startswith("optimizer.state.") for k in keys)
    other = OODUnleash(make_net(), constraint=0.3)
    before = snapshot(other)
    with pytest.raises(
        FitStateError, match=r"different options \(train_config.lr: saved 0.01, now 0.5\)"
    ):
        other.fit(data, epochs=2, lr=0.5, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same(before, snapshot(other))
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(FitStateError, match="not a readable fit state.*resume=False"):
        other.fit(data, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same(before, snapshot(other))


def test_resume_without_a_saved_state_starts_afresh(tmp_path):
    data = DataLoader(dataset(), batch_size=16)
    a = OODUnleash(make_net(), constraint=0.3).fit(
        data, epochs=1, checkpoint_dir=tmp_path / "new", resume=True, progress=False
    )
    b = OODUnleash(make_net(), constraint=0.3).fit(data, epochs=1, progress=False)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
