"""Models the CLI reads (oodunleash.cli._models): a timm name with a weights file, a plain
timm repo on the Hub."""

from __future__ import annotations

import torch

from oodunleash import OODUnleash
from tests.cli.commands import (
    MODEL,
    TOKEN,
    assert_same_scores,
    model_args,
    run,
)


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
    _, reference, _ = run(
        ["score", *model_args(str(checkpoint)), "--score", "energy", *inputs], capsys
    )
    for weights in (safetensors_file, torch_file):
        code, out, err = run(
            ["score", *model_args(MODEL, "--checkpoint", str(weights)), *inputs], capsys
        )
        assert code == 0, err
        assert_same_scores(out, reference)


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
    _, local, _ = run(["score", *model_args(str(checkpoint)), "--score", "energy", *inputs], capsys)
    code, remote, err = run(["score", *model_args("hf-hub:me/plain"), *inputs], capsys)
    assert code == 0, err
    assert_same_scores(remote, local)
