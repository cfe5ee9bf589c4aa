"""Bad inputs of the second catalogue: each gets an error that names the problem and the fix,
before any work, and leaves the model, the wrapper and the disk as they were.

Categories: tune's OOD sets; score on an empty batch; hostile checkpoint JSON; model outputs and
models UM could not read (a tuple, one logit, functional parameters, meta weights); training
data that does not fit the model (dict keys, channels, a size changing mid-epoch); optimiser
settings; Hub ids that cannot be fetched offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from oodunleash import OODUnleash
from oodunleash.checkpoint import CONFIG_NAME
from oodunleash.checkpoint.errors import CorruptCheckpointError
from oodunleash.scores import list_scores
from tests.helpers.fits import assert_same, snapshot

GEN = torch.Generator().manual_seed(0)


def cnn(in_channels: int = 1, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()  # fmt: skip


def batches(n: int = 3, channels: int = 1, size: int = 6, classes: int = 3) -> list:
    return [
        (torch.randn(8, channels, size, size, generator=GEN), torch.randint(0, classes, (8,)))
        for _ in range(n)
    ]


def refused_fit(unleashed: OODUnleash, data, error, match, **options) -> None:
    before = snapshot(unleashed)
    with pytest.raises(error, match=match):
        unleashed.fit(data, epochs=1, progress=False, **options)
    assert_same(before, snapshot(unleashed))


# --------------------------------------------------------------------------- tune
def test_tune_with_a_list_of_ood_loaders():
    from oodunleash import tune

    model, data = cnn(), batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"mapping \{name: loader\}, got a list.*'svhn'"):
        tune(model, data, data, [data], progress=False, verbose=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- empty batch
def test_every_score_on_an_empty_batch_gives_empty_scores():
    names = list(list_scores())
    unleashed = OODUnleash(cnn()).fit_scores(batches(4), names, progress=False)
    for name in names:
        out = unleashed.score(torch.zeros(0, 1, 6, 6), name)
        assert out.shape == (0,), name


# --------------------------------------------------------------------------- hostile JSON
@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deeply_nested_checkpoint_json(tmp_path, depth):
    folder = OODUnleash(cnn()).fit_scores(batches(), ["energy"], progress=False)
    folder = folder.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / CONFIG_NAME).read_text())
    text = json.dumps(config)
    nested = "[" * depth + "]" * depth
    text = text.replace('"results": null', f'"results": {{"x": {{"y": {nested}}}}}')
    (folder / CONFIG_NAME).write_text(text)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(
        CorruptCheckpointError, match="nests its JSON too deeply.*Save the checkpoint again"
    ):
        OODUnleash.from_pretrained(folder, model=cnn())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# --------------------------------------------------------------------------- model outputs
class TupleOutput(nn.Module):
    """Like a distilled timm model in distilled-training mode: (head, distillation head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = cnn()

    def forward(self, x):
        logits = self.body(x)
        return logits, logits


def test_tuple_output_names_a_fix_that_exists():
    unleashed = OODUnleash(TupleOutput(), score="energy")
    with pytest.raises(ValueError, match="returned tuple.*set_distilled_training") as info:
        unleashed.score(torch.randn(4, 1, 6, 6))
    assert "output_key" not in str(info.value)  # OODUnleash has no such option
    refused_fit(OODUnleash(TupleOutput(), constraint=0.3), batches(), ValueError, "tuple")


def test_one_logit_binary_classifier_needs_two_logits():
    torch.manual_seed(0)
    binary = nn.Sequential(nn.Flatten(), nn.Linear(36, 1))
    data = [(x, torch.zeros(8).long()) for x, _ in batches()]
    for constraint in ("relative", 0.3):
        refused_fit(
            OODUnleash(binary, constraint=constraint), data, ValueError,
            r"1 logit per image.*at least two logits.*torch.cat\(\[-z, z\]",
        )  # fmt: skip


class Functional(nn.Module):
    """A classifier with a bare parameter and no Conv/Linear module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(36, 3) * 0.1)

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_um_fine_tunes_a_model_without_conv_or_linear_modules():
    model = Functional()
    before = model.w.detach().clone()
    unleashed = OODUnleash(model, constraint=0.3, score="energy")
    unleashed.fit(batches(), epochs=1, progress=False)
    assert unleashed.is_fitted and not torch.equal(model.w, before)
    with pytest.raises(ValueError, match="matches no parameter"):  # UMAP has nothing to mask
        OODUnleash(Functional(), "umap")
    with pytest.raises(ValueError, match="matches no parameter"):  # a selection given is kept
        OODUnleash(Functional(), layers="fc")


def test_meta_weights_are_refused_before_the_fit():
    meta = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).to("meta")
    unleashed = OODUnleash(meta, constraint=0.3)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        unleashed.fit(batches(), epochs=1, progress=False, training={"amp": False})
    assert not unleashed.is_fitted and all(p.is_meta for p in meta.parameters())


def test_meta_weights_in_train_are_named_not_an_autocast_error():
    """The issue's stand-in for a model on another device, through the lower-level train():
    with amp=False it met torch.autocast's refusal of the device type."""
    from oodunleash.finetune.loop import TrainConfig, train

    meta = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).to("meta")
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        train(
            meta, list(meta.parameters()), batches(), loss_constraint=0.3,
            config=TrainConfig(epochs=1, amp=False), device=torch.device("meta"), progress=False,
        )  # fmt: skip


# --------------------------------------------------------------------------- training data
def test_dict_batches_name_accepted_and_found_keys():
    data = [{"img": x, "label": y} for x, y in batches()]
    refused_fit(
        OODUnleash(cnn(), constraint=0.3), data, TypeError,
        r"accepted keys are 'image', 'images', 'pixel_values'; found 'img', 'label'",
    )  # fmt: skip


@pytest.mark.parametrize("constraint", ["relative", 0.3])
def test_three_channel_images_for_a_one_channel_model(constraint):
    refused_fit(
        OODUnleash(cnn(1), constraint=constraint), batches(channels=3), ValueError,
        r"have 3 channels but the model's first layer '0' takes 1.*expand",
    )  # fmt: skip


def test_batches_changing_size_mid_epoch():
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    data = [*batches(2, size=6), *batches(1, size=8)]
    refused_fit(
        OODUnleash(fixed, constraint=0.3), data, ValueError,
        r"shape \(1, 8, 8\), but the first batch's were \(1, 6, 6\).*one size",
    )  # fmt: skip


# --------------------------------------------------------------------------- optimiser
@pytest.mark.parametrize("option", [{"weight_decay": -0.1}, {"momentum": -1.0}])
def test_negative_optimiser_settings(option):
    (key,) = option
    refused_fit(
        OODUnleash(cnn(), constraint=0.3), batches(), ValueError,
        rf"{key} must be a finite number of at least 0.*Use 0 for none", training=option,
    )  # fmt: skip


# --------------------------------------------------------------------------- Hub
def test_offline_hub_id_is_named(tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError, match=r"'someone/does-not-exist'.*local"):
        OODUnleash.from_pretrained(
            "someone/does-not-exist", local_files_only=True, cache_dir=tmp_path / "cache"
        )
    assert not any(Path(tmp_path / "cache").rglob("*.json"))
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
