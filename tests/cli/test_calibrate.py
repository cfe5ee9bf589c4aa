"""``oodunleash calibrate``, ``score --alpha``, what the commands say about the preprocessing,
1-channel checkpoints, the near-chance warning, ``--workers`` and ``list-scores``."""

from __future__ import annotations

import csv
import warnings

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.cli._preprocessing import default_workers
from tests.cli.commands import MODEL, dirs, model_args, run, write_images


def read_decisions(text: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(text.splitlines()))
    assert rows and list(rows[0]) == ["path", "label", "score", "p_value", "is_ood"]
    return rows


def test_calibrate_then_score_alpha_flags_what_python_flags(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "calibrated"
    code, _, err = run(
        ["calibrate", *model_args(str(checkpoint)), "--calib-dir", str(data / "val"),
         "--alpha", "0.2", "--score", "energy", "--out", str(out)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "Calibrated on 6 images (energy)" in err
    inputs = [str(data / "ood_loose"), str(data / "train")]
    code, csv_text, err = run(["score", *model_args(str(out)), *inputs, "--alpha", "0.2"], capsys)
    assert code == 0, err
    rows = read_decisions(csv_text)
    assert {r["label"] for r in rows} <= {"blue", "red"}
    # Python, from the same checkpoint, on the same files: the same decisions.
    unleashed = OODUnleash.from_pretrained(out)
    assert unleashed.calibration_.n == 6
    result = unleashed.predict([r["path"] for r in rows], alpha=0.2)
    assert [int(r["is_ood"]) for r in rows] == result.is_ood.int().tolist()
    assert [float(r["p_value"]) for r in rows] == pytest.approx(result.p_values.tolist())
    assert [r["label"] for r in rows] == [["blue", "red"][i] for i in result.labels.tolist()]


def test_score_alpha_with_calib_dir_and_fdr(checkpoint, data, capsys):
    flags = ["--score", "msp", "--calib-dir", str(data / "val"), "--alpha", "0.25"]
    code, out, err = run(
        ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), *flags], capsys
    )
    assert code == 0, err
    per_image = read_decisions(out)
    code, out, err = run(
        ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), *flags, "--fdr"], capsys
    )
    assert code == 0, err
    fdr = read_decisions(out)
    assert [r["p_value"] for r in fdr] == [r["p_value"] for r in per_image]
    # BH flags a subset of what the per-image test flags.
    assert all(r["is_ood"] <= p["is_ood"] for r, p in zip(fdr, per_image, strict=True))


def test_score_alpha_refuses_without_calibration_or_with_too_few(checkpoint, data, capsys):
    code, _, err = run(
        ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), "--alpha", "0.1"],
        capsys,
    )
    assert code == 2 and "not calibrated" in err and "--calib-dir" in err
    code, _, err = run(
        ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), "--score", "energy",
         "--calib-dir", str(data / "val"), "--alpha", "0.01"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "at least 99 calibration images" in err
    code, _, err = run(
        ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), "--fdr"], capsys
    )
    assert code == 2 and "--fdr goes with --alpha" in err


def test_commands_print_the_preprocessing_and_take_interpolation(checkpoint, data, capsys):
    code, out, err = run(
        ["evaluate", *model_args(str(checkpoint)), "--id-dir", str(data / "val"),
         "--ood-dir", f"o={data / 'ood_loose'}", "--scores", "energy"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("preprocessing (recorded in the checkpoint")
    args = ["score", *model_args(str(checkpoint)), str(data / "ood_loose"), "--score", "energy"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert (
        "preprocessing (recorded in the checkpoint, overridden by --img-size --mean --std)" in err
    )
    assert "RGB 3x32x32" in err and "mean (0.5, 0.5, 0.5)" in err
    code, _, err = run([*args, "--interpolation", "nearest"], capsys)
    assert code == 0 and "(nearest," in err and "--interpolation" in err


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory):
    """A 1-channel timm model saved from Python with its preprocessing."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=2, in_chans=1)
    data = DataLoader(
        TensorDataset(torch.randn(16, 1, 32, 32), torch.randint(0, 2, (16,))), batch_size=8
    )
    unleashed = OODUnleash(model, constraint=0.3, score="energy")
    unleashed.fit(data, epochs=1, progress=False)
    folder = tmp_path_factory.mktemp("gray") / "ckpt"
    unleashed.save_pretrained(
        folder, input_size=(1, 32, 32), mean=0.5, std=0.25, interpolation="bilinear", crop_pct=1.0
    )
    return folder


def test_one_channel_checkpoint_scores_colour_files(gray_checkpoint, data, capsys):
    args = ["score", str(gray_checkpoint), "--no-progress", "--workers", "0"]
    code, out, err = run([*args, str(data / "ood_loose")], capsys)
    assert code == 0, err
    assert "grayscale 1x32x32" in err and "mean (0.5)" in err and "(bilinear," in err
    rows = list(csv.reader(out.splitlines()))[1:]
    python = OODUnleash.from_pretrained(gray_checkpoint).score([p for p, _ in rows])
    assert [float(v) for _, v in rows] == pytest.approx(python.tolist(), rel=1e-5)


def test_model_near_chance_on_its_training_folder_warns_about_preprocessing(data, tmp_path, capsys):
    """A checkpoint that knows red from blue, given a folder where they are swapped: the
    warning names the preprocessing flags (a real mismatch gives the same near-chance sign)."""
    torch.manual_seed(0)
    code, _, err = run(
        ["fit", *model_args(MODEL), *dirs(data), "--epochs", "6", "--loss-constraint", "0.05",
         "--out", str(tmp_path / "trained")],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    swapped = tmp_path / "swapped"
    write_images(swapped / "red", 6, (40, 40, 200), 0)
    write_images(swapped / "blue", 6, (200, 40, 40), 10)
    code, _, err = run(
        ["fit", *model_args(str(tmp_path / "trained")), "--train-dir", str(swapped),
         "--epochs", "1", "--out", str(tmp_path / "again")],
        capsys,
    )  # fmt: skip
    assert "accuracy on --train-dir is" in err and "near chance" in err
    assert "--img-size, --mean, --std, --interpolation and --crop-pct" in err


def test_constraint_above_chance_names_the_preprocessing_flags(data, tmp_path, capsys):
    code, _, err = run(
        ["fit", *model_args(MODEL), *dirs(data), "--epochs", "1", "--loss-constraint", "5",
         "--out", str(tmp_path / "x")],
        capsys,
    )  # fmt: skip
    assert code == 1  # a runtime failure, as before, with the hint added
    assert "is not below ln(2)" in err and "--interpolation" in err


def test_default_workers_leave_a_core_and_raise_no_warning():
    import os

    workers = default_workers()
    assert 0 <= workers <= min(4, max(len(os.sched_getaffinity(0)) - 1, 0))
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(loader)) == 2


def test_list_scores_says_what_each_reads(capsys):
    code, out, _ = run(["list-scores"], capsys)
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0
    assert "reads logits" in lines["energy"] and "--fit-dir" not in lines["energy"]
    assert "features" in lines["knn"] and "--fit-dir" in lines["knn"]
    assert "input gradients" in lines["odin"] and "pre-pool feature maps" in lines["ash_b"]
