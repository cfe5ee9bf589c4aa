"""Runs (oodunleash.bench.run): a tiny end-to-end run on digits, resuming, stopping, records."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from oodunleash.bench.grid import (
    MASKED_RECIPES,
    FineTune,
    MaskedLoss,
    TrainLossMultiple,
    UmapMask,
    default_grid,
)
from oodunleash.bench.run import run_benchmark


def test_run_benchmark_rejects_an_unknown_score_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown OOD score 'energi'.*Registered scores"):
        _tiny_run(tmp_path, default_grid(quick=True), scores=("energy", "energi"))
    assert not (tmp_path / "seeds").exists()


def _tiny_run(out, grid, **kwargs):
    """A 2-epoch small CNN on digits, one seed, capped evaluation sets."""
    return run_benchmark(
        ["small_cnn:epochs=2"],
        [0],
        out,
        dataset="digits",
        eval_cap=300,
        grid=grid,
        progress=False,
        **kwargs,
    )


@pytest.mark.slow
def test_run_benchmark_quick_end_to_end(tmp_path, capsys):
    # "magnitude" gives ξ close to the training loss: below ln(6) even for a 2-epoch model.
    grid = [FineTune("um", None, 0.01, 1), FineTune("um", MASKED_RECIPES["magnitude"], 0.01, 1)]
    summary = _tiny_run(tmp_path, grid, checkpoints="final", scores=("msp", "energy"))
    per_seed = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert set(per_seed["runs"]) == {"final"} | {ft.name for ft in grid}
    assert len(per_seed["curve"]) == 2
    assert (tmp_path / "checkpoints" / "small_cnn_epochs2_s0" / "epoch002.safetensors").is_file()
    fine = per_seed["runs"]["um/magnitude/lr0.01/ep1"]
    assert fine["xi_value"] == pytest.approx(per_seed["xi"]["magnitude"])
    for block in ("val", "test"):
        assert 0 <= fine[block]["accuracy"] <= 100
        assert set(fine[block]["metrics"]) == {"msp", "energy"}
    assert "small_cnn:epochs=2" in summary["settings"]
    assert (tmp_path / "tradeoff_small_cnn_epochs2.png").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "um/magnitude/lr0.01/ep1" in md and "final model" in md

    # Resuming adds the missing fine-tunes to the same final model, keeping what was done.
    # A ξ multiple the first run never stored is derived from its training loss.
    extra = FineTune("umap", TrainLossMultiple(0.5), 0.1, 1, UmapMask(0.9, "model", layers="ends"))
    _tiny_run(tmp_path, [*grid, extra], resume=True)
    resumed = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert set(resumed["runs"]) == set(per_seed["runs"]) | {extra.name}
    for name, run in per_seed["runs"].items():
        assert resumed["runs"][name] == run, name
    assert resumed["train_time_s"] == per_seed["train_time_s"]
    assert set(resumed["runs"][extra.name]["test"]["metrics"]) == {"msp", "energy"}
    assert resumed["runs"][extra.name]["config"]["keep_ratio"] == 0.9
    assert resumed["runs"][extra.name]["config"]["masked"] == "ends"
    assert resumed["runs"][extra.name]["config"]["mask_mode"] == "model"
    assert resumed["runs"][extra.name]["xi_value"] == pytest.approx(
        0.5 * per_seed["xi"]["train_loss"]
    )
    # Past its deadline, a run records what it skipped, even after its last finished fine-tune.
    late = FineTune("um", TrainLossMultiple(0.5), 0.01, 1)
    _tiny_run(tmp_path, [*grid, extra, late], resume=True, deadline=time.time() - 1)
    cut = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert cut["skipped"] == [late.name] and late.name not in cut["runs"]
    # A ξ the library refuses (100x the loss of a 2-epoch model is above ln 6) is recorded,
    # and the rest of the grid still runs.
    too_high = FineTune("um", TrainLossMultiple(100), 0.01, 1)
    after = FineTune("um", TrainLossMultiple(0.25), 0.01, 1)
    capsys.readouterr()
    _tiny_run(tmp_path, [too_high, after], resume=True, report=True)
    said = capsys.readouterr().out
    assert f"small_cnn:epochs=2 s0: refused {too_high.name}: ξ = " in said
    assert f"small_cnn:epochs=2 s0: {after.name} in " in said and "mean energy FPR95" in said
    refused = json.loads((tmp_path / "seeds" / "small_cnn_epochs2_s0.json").read_text())
    assert "not below ln(6)" in refused["refused"][too_high.name]
    assert too_high.name not in refused["runs"] and after.name in refused["runs"]
    assert (
        f"Refused before any step (ξ at or above the loss of a uniform guess): "
        f"{too_high.name} (seeds 0)" in (tmp_path / "results.md").read_text()
    )
    with pytest.raises(ValueError, match=r"No ξ recipe \['nope'\]"):
        _tiny_run(tmp_path, [FineTune("um", MaskedLoss("nope"), 0.01, 1)], resume=True)
    # Resuming on other training data would fine-tune on images the model never saw.
    with pytest.raises(ValueError, match="trained on .* images.*--train-size"):
        _tiny_run(tmp_path, grid, resume=True, train_size=200)
    # ... or on another data set; the refused resume leaves the saved results as they were.
    json_path = tmp_path / "seeds" / "small_cnn_epochs2_s0.json"
    relabelled = json.loads(json_path.read_text()) | {"dataset": "fashion-mnist"}
    json_path.write_text(json.dumps(relabelled))
    with pytest.raises(ValueError, match="trained on 'fashion-mnist'.*'digits'.*--dataset"):
        _tiny_run(tmp_path, [*grid, late], resume=True)
    assert json.loads(json_path.read_text()) == relabelled


def test_resume_without_an_earlier_run_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cannot resume.*--checkpoints final"):
        _tiny_run(tmp_path, default_grid(quick=True), resume=True)


_SLEEPING_POOL = """
import os, sys, time
from oodunleash.bench.run import in_processes

def sleeper(task):
    open(os.path.join(sys.argv[1], f"{os.getpid()}.pid"), "w").close()
    time.sleep(120)
    return task

if __name__ == "__main__":
    for _ in in_processes(sleeper, [0, 1], jobs=2):
        pass
"""


def _running(pid: int) -> bool:
    try:  # a zombie has exited; only its parent has not collected it yet
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_a_parallel_run_stops_its_workers(tmp_path):
    # `kill` (or a job scheduler) on `oodunleash benchmark --jobs N` used to leave the N
    # workers training on, unseen, until they finished.
    script = tmp_path / "pool.py"
    script.write_text(_SLEEPING_POOL)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pids_dir)])
    try:
        deadline = time.monotonic() + 120
        while len(list(pids_dir.iterdir())) < 2:
            assert parent.poll() is None, "the pool script exited before its workers started"
            assert time.monotonic() < deadline, "the workers did not start in 120 s"
            time.sleep(0.2)
        workers = [int(p.stem) for p in pids_dir.iterdir()]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in workers)
    finally:
        parent.kill()


def test_run_record_round_trips_through_json():
    from oodunleash.bench.run import RunRecord

    record = RunRecord("small_cnn", "small_cnn", 0.0, 25, 0, "digits", "cpu", 100)
    assert "refused" not in record.to_json()
    record.refused["um/train_x100/lr0.01/ep1"] = "too high"
    data = json.loads(json.dumps(record.to_json()))
    assert RunRecord.from_json(data) == record
    assert list(data)[:8] == ["setting", "model", "label_noise", "epochs", "seed", "dataset",
                              "device", "train_size"]  # fmt: skip
