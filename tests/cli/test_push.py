"""``oodunleash push`` to a (fake, local) Hugging Face Hub (oodunleash.cli._push)."""

from __future__ import annotations

from tests.cli.commands import assert_same_scores, model_args, run


def test_push_then_score_from_the_hub(checkpoint, data, hub, capsys):
    code, out, err = run(["push", str(checkpoint), "me/unleashed"], capsys)
    assert code == 0, err
    assert out.startswith("Pushed ")
    stored = set(hub.repos["me/unleashed"].resolve("main").files)
    assert {"model.safetensors", "oodunleash_config.json", "config.json"} <= stored

    inputs = [str(data / "ood_loose")]
    _, local, _ = run(["score", *model_args(str(checkpoint)), *inputs], capsys)
    code, remote, err = run(["score", *model_args("hf-hub:me/unleashed"), *inputs], capsys)
    assert code == 0, err
    assert_same_scores(remote, local)


def test_push_failures_are_one_line(checkpoint, data, hub, monkeypatch, capsys):
    code, _, err = run(["push", str(data / "train"), "me/x"], capsys)
    assert code == 2 and "not a checkpoint folder" in err
    code, _, err = run(["push", str(checkpoint), "me/x", "--token", "hf_wrong"], capsys)
    assert code == 1 and "me/x" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(["push", str(checkpoint), "me/x"], capsys)
    assert code == 1 and "No Hugging Face token" in err
    assert "me/x" not in hub.repos
