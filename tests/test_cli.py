"""The ``oodunleash`` command line end to end, on small generated image folders.

Most tests call :func:`oodunleash.cli.main` in-process; one runs ``python -m oodunleash``.
The model is timm's ``test_resnet`` at 32 px with random weights: these tests check what the
commands do with files, flags and exit codes, not detection quality.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import oodunleash
from oodunleash import OODUnleash
from oodunleash.cli import main
from tests.helpers.hub_server import FakeHub, use_fake_hub

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = "test_resnet"
#: Preprocessing flags of every model command: 32 px, mean/std 0.5, no loader processes.
PREPROCESSING = ["--img-size", "32", "--mean", "0.5", "--std", "0.5", "--workers", "0"]
TOKEN = "hf_fake_write_token"


def _write_images(folder: pathlib.Path, n: int, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.clip(rng.normal(colour, 25, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    """``train/``, ``val/`` (classes red and blue), ``ood_loose/`` (images, no class folder),
    ``ood_nested/`` (images in a sub-folder), ``empty/`` and ``broken/`` (one file is no
    image)."""
    root = tmp_path_factory.mktemp("images")
    for split, n, seed in (("train", 6, 0), ("val", 3, 1)):
        _write_images(root / split / "red", n, (200, 40, 40), seed)
        _write_images(root / split / "blue", n, (40, 40, 200), seed + 10)
    _write_images(root / "ood_loose", 4, (40, 200, 40), 2)
    _write_images(root / "ood_nested" / "any", 3, (128, 128, 128), 3)
    (root / "empty").mkdir()
    _write_images(root / "broken", 1, (0, 0, 0), 4)
    (root / "broken" / "img1.png").write_text("not a PNG")
    return root


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``main(args)``: exit code, stdout, stderr."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _model_args(model: str, *extra: str) -> list[str]:
    return [model, *PREPROCESSING, "--no-progress", "--batch-size", "4", *extra]


def _dirs(data: pathlib.Path, train: str = "train", val: str | None = "val") -> list[str]:
    """``--train-dir`` (and ``--val-dir``) flags for sub-folders of ``data``."""
    flags = ["--train-dir", str(data / train)]
    return flags + (["--val-dir", str(data / val)] if val else [])


#: A 1-epoch fine-tune with a ξ the random test model can reach.
QUICK_FIT = ["--epochs", "1", "--loss-constraint", "0.1"]


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> pathlib.Path:
    """A UM checkpoint folder written by ``oodunleash fit``."""
    out = tmp_path_factory.mktemp("ckpt") / "unleashed"
    torch.manual_seed(0)
    code = main(["fit", *_model_args(MODEL), *_dirs(data), *QUICK_FIT, "--out", str(out)])
    assert code == 0
    return out


def _read_csv(text: str) -> list[tuple[str, float]]:
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["path", "score"]
    return [(path, float(value)) for path, value in rows[1:]]


def _assert_same_scores(csv_text: str, reference_text: str) -> None:
    rows, reference = _read_csv(csv_text), _read_csv(reference_text)
    assert [p for p, _ in rows] == [p for p, _ in reference]
    assert [v for _, v in rows] == pytest.approx([v for _, v in reference], rel=1e-5)


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


def test_list_scores(capsys):
    code, out, _ = run(["list-scores"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert sorted(lines) == oodunleash.list_scores()
    assert "--fit-dir" in lines["knn"] and "--fit-dir" not in lines["energy"]


# --------------------------------------------------------------------------- fit
def test_fit_saves_the_model_with_its_preprocessing(checkpoint, capsys):
    import timm.data

    reloaded = OODUnleash.from_pretrained(checkpoint)
    assert reloaded.method == "um" and reloaded.loss_constraint_ == pytest.approx(0.1)
    assert reloaded.model.num_classes == 2
    config = timm.data.resolve_data_config({}, model=reloaded.model)
    assert config["input_size"] == (3, 32, 32)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    timm_config = json.loads((checkpoint / "config.json").read_text())
    assert timm_config["label_names"] == ["blue", "red"]


def test_fit_umap_prints_a_summary_and_prunes(data, tmp_path, capsys):
    out = tmp_path / "umap"
    umap = ["--method", "umap", "--keep-ratio", "0.5", "--out", str(out)]
    code, stdout, err = run(
        ["fit", *_model_args(MODEL), *_dirs(data, val=None), *QUICK_FIT, *umap], capsys
    )
    assert code == 0, err
    assert stdout.startswith("UMAP: ξ=0.1, last epoch CE")
    assert f"Saved: {out}" in stdout
    reloaded = OODUnleash.from_pretrained(out)
    assert reloaded.method == "umap"
    assert any(bool((p == 0).any()) for n, p in reloaded.model.named_parameters() if "conv" in n)


# --------------------------------------------------------------------------- evaluate / score
def test_evaluate_prints_a_table_and_writes_json(checkpoint, data, tmp_path, capsys):
    report = tmp_path / "results.json"
    code, out, err = run(
        [
            "evaluate",
            *_model_args(str(checkpoint)),
            "--id-dir",
            str(data / "val"),
            "--ood-dir",
            f"loose={data / 'ood_loose'}",
            "--ood-dir",
            f"nested={data / 'ood_nested'}",
            "--fit-dir",
            str(data / "train"),
            "--scores",
            "energy",
            "knn",
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0, err
    assert "AUROC" in out and "knn" in out and "nested" in out
    results = json.loads(report.read_text())
    assert set(results) == {"energy", "knn", "id_accuracy"}
    assert set(results["knn"]) == {"loose", "nested", "average"}
    assert 0 <= results["knn"]["loose"]["auroc"] <= 1
    assert 0 <= results["id_accuracy"] <= 1


def test_score_csv_matches_the_python_api(checkpoint, data, tmp_path, capsys):
    import timm.data

    out = tmp_path / "scores.csv"
    single = data / "val" / "red" / "img0.png"
    code, _, err = run(
        [
            "score",
            *_model_args(str(checkpoint)),
            str(data / "ood_loose"),
            str(single),
            "--score",
            "msp",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    rows = _read_csv(out.read_text())
    expected_paths = sorted((data / "ood_loose").glob("*.png")) + [single]
    assert [p for p, _ in rows] == [str(p) for p in expected_paths]
    # The same images through the Python API and the checkpoint's recorded preprocessing.
    unleashed = OODUnleash.from_pretrained(checkpoint)
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({}, model=unleashed.model)
    )
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in expected_paths])
    expected = unleashed.score(batch, "msp")
    assert [v for _, v in rows] == pytest.approx(expected.tolist(), rel=1e-4)


def test_timm_name_with_a_weights_file_scores_like_the_checkpoint(
    checkpoint, data, tmp_path, capsys
):
    from safetensors.torch import save_file

    state = OODUnleash.from_pretrained(checkpoint).model.state_dict()
    safetensors_file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors_file)
    torch_file = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, torch_file)

    inputs = [str(data / "ood_loose")]
    _, reference, _ = run(["score", *_model_args(str(checkpoint)), *inputs], capsys)
    for weights in (safetensors_file, torch_file):
        code, out, err = run(
            ["score", *_model_args(MODEL, "--checkpoint", str(weights)), *inputs], capsys
        )
        assert code == 0, err
        _assert_same_scores(out, reference)


# --------------------------------------------------------------------------- Hub
@pytest.fixture
def hub(tmp_path, monkeypatch):
    with (
        FakeHub(tokens=(TOKEN,)) as server,
        use_fake_hub(server, tmp_path / "hf-cache", monkeypatch, token=TOKEN),
    ):
        yield server


def test_push_then_score_from_the_hub(checkpoint, data, hub, capsys):
    code, out, err = run(["push", str(checkpoint), "me/unleashed"], capsys)
    assert code == 0, err
    assert out.startswith("Pushed ")
    stored = set(hub.repos["me/unleashed"].resolve("main").files)
    assert {"model.safetensors", "oodunleash_config.json", "config.json"} <= stored

    inputs = [str(data / "ood_loose")]
    _, local, _ = run(["score", *_model_args(str(checkpoint)), *inputs], capsys)
    code, remote, err = run(["score", *_model_args("hf-hub:me/unleashed"), *inputs], capsys)
    assert code == 0, err
    _assert_same_scores(remote, local)


def test_a_plain_timm_repo_on_the_hub_is_a_model(checkpoint, data, hub, tmp_path, capsys):
    from huggingface_hub import HfApi
    from timm.models import save_for_hf

    model = OODUnleash.from_pretrained(checkpoint).model
    folder = tmp_path / "plain"
    save_for_hf(model, str(folder), safe_serialization=True)
    api = HfApi(token=TOKEN)
    api.create_repo("me/plain")
    api.upload_folder(repo_id="me/plain", folder_path=folder)

    inputs = [str(data / "ood_loose")]
    _, local, _ = run(["score", *_model_args(str(checkpoint)), *inputs], capsys)
    code, remote, err = run(["score", *_model_args("hf-hub:me/plain"), *inputs], capsys)
    assert code == 0, err
    _assert_same_scores(remote, local)


def test_push_failures_are_one_line(checkpoint, data, hub, monkeypatch, capsys):
    code, _, err = run(["push", str(data / "train"), "me/x"], capsys)
    assert code == 2 and "not a checkpoint folder" in err
    code, _, err = run(["push", str(checkpoint), "me/x", "--token", "hf_wrong"], capsys)
    assert code == 1 and "me/x" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(["push", str(checkpoint), "me/x"], capsys)
    assert code == 1 and "No Hugging Face token" in err
    assert "me/x" not in hub.repos


# --------------------------------------------------------------------------- tune
def test_tune_reports_a_missing_tune_function(data, monkeypatch, capsys):
    monkeypatch.delattr(oodunleash, "tune", raising=False)
    monkeypatch.setitem(sys.modules, "oodunleash.tune", None)  # nor the module
    code, _, err = run(
        ["tune", *_model_args(MODEL), *_dirs(data)],
        capsys,
    )
    assert code == 2 and "no tune()" in err


def test_tune_saves_the_best(data, tmp_path, capsys):
    tune = getattr(oodunleash, "tune", None)
    if not callable(tune):
        pytest.skip("oodunleash.tune is not available in this version")
    out, report = tmp_path / "best", tmp_path / "tune.json"
    code, stdout, err = run(
        [
            "tune",
            *_model_args(MODEL),
            *_dirs(data),
            "--ood-dir",
            f"loose={data / 'ood_loose'}",
            "--epochs",
            "1",
            "--time-budget",
            "30",
            "--json",
            str(report),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert "Best: " in stdout
    assert json.loads(report.read_text())["best_name"] in stdout
    if "Saved: " in stdout:  # a fine-tune won (else the unchanged model did, and is kept)
        assert OODUnleash.from_pretrained(out).model.num_classes == 2


# --------------------------------------------------------------------------- demo / benchmark
# --------------------------------------------------------------------------- bad input
def _bad_cases(data: pathlib.Path, checkpoint: pathlib.Path) -> dict[str, tuple[list, str]]:
    id_ood = ["--id-dir", str(data / "val"), "--ood-dir", f"o={data / 'ood_loose'}"]
    return {
        "missing id dir": (
            ["evaluate", *_model_args(MODEL), "--id-dir", str(data / "nope"), "--ood-dir", "o=x"],
            "no such directory",
        ),
        "empty train dir": (
            ["fit", *_model_args(MODEL), *_dirs(data, "empty", None)],
            "empty",
        ),
        "empty ood dir": (
            ["evaluate", *_model_args(MODEL), *id_ood[:2], "--ood-dir", f"e={data / 'empty'}"],
            "no images",
        ),
        "unknown model": (["evaluate", *_model_args("resnet_nope"), *id_ood], "Unknown model"),
        "unknown score": (
            ["evaluate", *_model_args(MODEL), *id_ood, "--scores", "nope"],
            "Unknown OOD score 'nope'",
        ),
        "score needs fitting": (
            ["score", *_model_args(MODEL), str(data / "ood_loose"), "--score", "knn"],
            "--fit-dir",
        ),
        "duplicate ood name": (
            ["evaluate", *_model_args(MODEL), *id_ood, "--ood-dir", f"o={data / 'ood_nested'}"],
            "given twice",
        ),
        "missing weights file": (
            ["score", *_model_args(MODEL, "--checkpoint", "nope.safetensors"), str(data)],
            "nope.safetensors: no such file",
        ),
        "weights that do not fit": (
            [
                "score",
                *_model_args("resnet10t", "--checkpoint", str(checkpoint / "model.safetensors")),
                str(data / "ood_loose"),
            ],
            "does not fit",
        ),
        "val classes differ": (
            ["fit", *_model_args(MODEL), *_dirs(data, val="ood_nested")],
            "must match",
        ),
        "bad std": (
            # --std takes several numbers: the images go before it
            [
                "score",
                MODEL,
                str(data / "ood_loose"),
                *_model_args(MODEL, "--std", "0.5", "0.5")[1:],
            ],
            "--std takes 1 or 3 numbers",
        ),
        "keep ratio out of range": (
            ["fit", *_model_args(MODEL), *_dirs(data, val=None), "--method", "umap"]
            + ["--keep-ratio", "1.5"],
            "keep_ratio must be in (0, 1]",
        ),
        "unreadable image": (
            ["score", *_model_args(MODEL), str(data / "broken")],
            f"Cannot read the image {data / 'broken' / 'img1.png'}",
        ),
        "unreadable image in a worker": (
            ["score", *_model_args(MODEL, "--workers", "1"), str(data / "broken")],
            f"error: Cannot read the image {data / 'broken' / 'img1.png'}",
        ),
        "head size differs from the classes": (
            ["fit", *_model_args(MODEL, "--num-classes", "3"), *_dirs(data, val=None)],
            "has 3 classes but --train-dir has 2 (blue, red)",
        ),
        "missing image": (
            ["score", *_model_args(MODEL), str(data / "nope.png")],
            "no such file or directory",
        ),
        "not a checkpoint folder": (
            ["evaluate", *_model_args(str(data / "val")), *id_ood],
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
        ["fit", *_model_args(MODEL), *_dirs(data, val=None), "--epochs", "1"],
        capsys,
    )
    assert code == 1, err
    assert "LossConstraintTooHighError" in err and len(err.strip().splitlines()) == 1
