"""The calibration and the preprocessing in a checkpoint: saved, loaded back (no pickle), the
same images flagged; damaged files refused; preprocessing recorded without arguments."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from oodunleash import OODUnleash
from oodunleash.checkpoint import CALIBRATION_NAME, CONFIG_NAME, CorruptCheckpointError
from tests.checkpoint.builders import PREPROCESSING, TinyNet, images, loader, timm_um


def calibrated(score: str = "knn") -> OODUnleash:
    torch.manual_seed(0)
    unleashed = OODUnleash(TinyNet(), "um", constraint=0.9, score=score)
    unleashed.fit(loader(), epochs=1, progress=False)
    return unleashed.calibrate(loader(n=40, seed=5), progress=False)


def test_round_trip_flags_the_same_images(tmp_path):
    unleashed = calibrated()
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["calibration"] == {
        "score": "knn",
        "score_config": config["calibration"]["score_config"],
        "n": 40,
    }
    again = OODUnleash.from_pretrained(folder, model=TinyNet)
    assert torch.equal(again.calibration_scores_, unleashed.calibration_scores_)
    x = torch.cat([images(), images() * 3, images() + 2])
    before, after = unleashed.predict(x, alpha=0.1), again.predict(x, alpha=0.1)
    assert before.is_ood.any() and not before.is_ood.all()
    assert torch.equal(before.is_ood, after.is_ood)
    # calibrate() rounded KNN's bank to its saved float16 form: the reloaded scores are equal.
    assert torch.equal(before.scores, after.scores)
    assert torch.equal(before.p_values, after.p_values)


def test_energy_round_trip_is_exact_and_timm_keeps_its_preprocessing(tmp_path):
    unleashed = timm_um(["energy"])
    unleashed.calibrate(loader(n=40, seed=5), progress=False)
    folder = unleashed.save_pretrained(tmp_path / "ckpt", **PREPROCESSING)
    again = OODUnleash.from_pretrained(folder)
    x = images()
    assert torch.equal(again.predict(x, 0.1).p_values, unleashed.predict(x, 0.1).p_values)
    assert again.preprocessing["input_size"] == [3, 16, 16]
    assert again.preprocessing["mean"] == [0.5, 0.5, 0.5]
    # Saved again without arguments: the preprocessing it knows is recorded.
    resaved = again.save_pretrained(tmp_path / "resaved")
    config = json.loads((resaved / CONFIG_NAME).read_text())
    assert config["preprocessing"]["input_size"] == [3, 16, 16]
    assert (resaved / CALIBRATION_NAME).is_file()


def test_preprocessing_set_on_the_wrapper_is_recorded_unasked(tmp_path):
    unleashed = calibrated("energy")
    unleashed.preprocessing = {"input_size": (3, 16, 16), "mean": 0.5, "std": 0.25}
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["preprocessing"] == {"input_size": [3, 16, 16], "mean": [0.5], "std": [0.25]}
    assert (
        OODUnleash.from_pretrained(folder, model=TinyNet).preprocessing == config["preprocessing"]
    )
    # What save_pretrained is given is what the wrapper knows from then on.
    unleashed.save_pretrained(tmp_path / "other", input_size=(3, 12, 12), mean=0.1, std=0.2)
    assert unleashed.preprocessing == {"input_size": [3, 12, 12], "mean": [0.1], "std": [0.2]}


def test_an_uncalibrated_save_drops_the_old_file(tmp_path):
    unleashed = calibrated("energy")
    folder = unleashed.save_pretrained(tmp_path / "ckpt")
    assert (folder / CALIBRATION_NAME).is_file()
    unleashed.calibration_ = None
    unleashed.save_pretrained(folder)
    assert not (folder / CALIBRATION_NAME).exists()
    assert OODUnleash.from_pretrained(folder, model=TinyNet).calibration_ is None


def test_damaged_calibration_is_refused(tmp_path):
    folder = calibrated("energy").save_pretrained(tmp_path / "ckpt")
    save_file({"scores": torch.zeros(7, dtype=torch.float64)}, str(folder / CALIBRATION_NAME))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        OODUnleash.from_pretrained(folder, model=TinyNet)
    with pytest.raises(CorruptCheckpointError, match="should hold 40 calibration scores"):
        OODUnleash.from_pretrained(folder, model=TinyNet, verify=False)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["calibration"]["n"] = "many"
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="'calibration'.*positive integer"):
        OODUnleash.from_pretrained(folder, model=TinyNet, verify=False)
