"""Running the benchmark: each (setting, seed) as stages over a typed record, and many of them
in parallel processes.

The stages of :func:`run_seed` are: :func:`train_stage` (train to the end, OOD metrics and a
checkpoint per epoch), :func:`xi_stage` (every ξ recipe from the final model),
:func:`evaluate_final`, then :func:`finetune_stage` (the grid from the final checkpoint). The
:class:`RunRecord` is written to ``<out>/seeds/<setting>_s<seed>.json`` after every stage and
every fine-tune, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from oodunleash.bench.grid import FineTune, Setting, default_grid, xi_candidates, xi_value
from oodunleash.bench.models import create_model
from oodunleash.bench.protocol import (
    ALL_SCORES,
    TensorLoader,
    evaluate_model,
    load_benchmark_data,
    noisy_labels,
    subsample,
    train_classifier,
)
from oodunleash.finetune.loop import LossConstraintTooHighError
from oodunleash.runtime.files import write_atomic
from oodunleash.scores import get_score

__all__ = [
    "RunRecord",
    "SeedRun",
    "evaluate_final",
    "finetune_stage",
    "load_checkpoint",
    "run_benchmark",
    "run_seed",
    "save_checkpoint",
    "train_stage",
    "xi_stage",
]


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save ``model.state_dict()`` with :func:`safetensors.torch.save_file` (no pickle), into a
    temporary file renamed at the end, so an interrupted save leaves no partial file."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a safetensors state dict saved by :func:`save_checkpoint` into ``model``."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


@dataclasses.dataclass
class RunRecord:
    """What one (setting, seed) measured; :meth:`to_json` is the per-seed results file."""

    setting: str
    model: str
    label_noise: float
    epochs: int
    seed: int
    dataset: str
    device: str
    train_size: int
    train_time_s: float = 0.0
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    xi: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: list[str] = dataclasses.field(default_factory=list)
    runs: dict[str, Any] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The per-seed results (``refused`` only when a fine-tune was refused)."""
        out = dataclasses.asdict(self)
        if not out["refused"]:
            del out["refused"]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Read a record :meth:`to_json` wrote."""
        return cls(**data)


@dataclasses.dataclass
class SeedRun:
    """Everything a stage needs that is not saved: the data, the model, where things go."""

    setting: Setting
    seed: int
    data: dict[str, Any]
    device: torch.device
    train: tuple[Tensor, Tensor]  # on the device, labels with the setting's noise
    fit_set: tuple[Tensor, Tensor]  # clean labels: what the ID-fitted scores learn from
    model: nn.Module
    json_path: pathlib.Path
    ckpt_dir: pathlib.Path
    checkpoints: str = "all"
    progress: bool = True
    report: bool = False
    final_state: dict[str, Tensor] | None = None

    def say(self, message: str) -> None:
        """Print a line for a finished stage (parallel runs, where progress bars would
        interleave)."""
        if self.report:
            print(f"{self.setting.spec} s{self.seed}: {message}", flush=True)

    def evaluate(self, model: nn.Module, split: str, scores: Sequence[str]) -> dict[str, Any]:
        """:func:`evaluate_model` on the ``"val"`` or ``"test"`` ID and OOD sets."""
        return evaluate_model(
            model,
            self.data[split],
            self.data[f"{split}_ood"],
            scores,
            fit_set=self.fit_set,
            num_classes=self.data["num_classes"],
        )

    def save(self, record: RunRecord) -> None:
        """Write the record, atomically."""
        write_atomic(self.json_path, json.dumps(record.to_json()))

    def checkpoint_path(self, epoch: int) -> pathlib.Path:
        """Where training saves the checkpoint of ``epoch``, and where a resume reads it."""
        return self.ckpt_dir / f"epoch{epoch:03d}.safetensors"


def _device_name(device: torch.device) -> str:
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


def train_stage(run: SeedRun, *, curve: bool = True) -> RunRecord:
    """Train the model to the end, with a checkpoint and (``curve``) val/test Energy and MSP
    metrics per epoch; the new record."""
    cfg, model = run.setting, run.model
    if run.checkpoints != "none":
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)

    def on_epoch(epoch: int) -> dict[str, Any]:
        if run.checkpoints == "all" or (run.checkpoints == "final" and epoch == cfg.epochs):
            save_checkpoint(model, run.checkpoint_path(epoch))
        if not curve:
            return {}
        return {split: run.evaluate(model, split, ("energy", "msp")) for split in ("test", "val")}

    started = time.perf_counter()
    history = train_classifier(
        model,
        TensorLoader(*run.train, 128, shuffle=True, seed=run.seed),
        epochs=cfg.epochs,
        device=run.device,
        on_epoch=on_epoch,
        progress=run.progress,
        desc=f"{cfg.spec} s{run.seed}",
    )
    train_time = time.perf_counter() - started
    run.say(f"trained {cfg.epochs} epochs in {train_time:.0f} s")
    run.final_state = copy.deepcopy(model.state_dict())
    return RunRecord(
        setting=cfg.spec,
        model=cfg.model,
        label_noise=cfg.label_noise,
        epochs=cfg.epochs,
        seed=run.seed,
        dataset=run.data["dataset"],
        device=_device_name(run.device),
        train_size=len(run.train[1]),
        train_time_s=train_time,
        curve=history,
    )


def xi_stage(run: SeedRun, record: RunRecord) -> None:
    """Every ξ recipe from the final model, on the (noisy) data it was trained on."""
    record.xi = xi_candidates(run.model, TensorLoader(*run.train, 1024, shuffle=False), run.seed)


def evaluate_final(run: SeedRun, record: RunRecord, scores: Sequence[str]) -> None:
    """The final model's validation and test metrics for every score."""
    record.runs["final"] = {
        split: run.evaluate(run.model, split, scores) for split in ("val", "test")
    }


def resume_stage(run: SeedRun) -> RunRecord:
    """An earlier run's record, its final model loaded: training is not repeated."""
    final_ckpt = run.checkpoint_path(run.setting.epochs)
    missing = [str(p) for p in (run.json_path, final_ckpt) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Cannot resume: {', '.join(missing)} not found. Resuming needs the earlier run's "
            "JSON and its final checkpoint (run it with --checkpoints final or all)."
        )
    record = RunRecord.from_json(json.loads(run.json_path.read_text()))
    # Fine-tuning on other data than the model was trained on would measure nothing.
    if record.dataset != run.data["dataset"]:
        raise ValueError(
            f"Cannot resume {run.json_path}: it was trained on {record.dataset!r}, this run "
            f"loads {run.data['dataset']!r}. Pass the earlier run's --dataset."
        )
    if record.train_size != len(run.train[1]):
        raise ValueError(
            f"Cannot resume {run.json_path}: it was trained on {record.train_size} images, "
            f"this run loads {len(run.train[1])}. Pass the earlier run's --train-size."
        )
    load_checkpoint(run.model, final_ckpt)
    run.final_state = copy.deepcopy(run.model.state_dict())
    return record


def _mean_fpr(block: dict[str, Any], score: str) -> float:
    return float(np.mean([m["fpr95"] for m in block["metrics"][score].values()]))


def _finetune_one(run: SeedRun, record: RunRecord, ft: FineTune, scores: Sequence[str]) -> None:
    """Run one fine-tune from the final model and store its results (or its refusal)."""
    assert run.final_state is not None
    run.model.load_state_dict(run.final_state)
    xi = None if ft.xi is None else xi_value(record.xi, ft.xi)
    started = time.perf_counter()
    try:
        unleashed = ft.fit(run.model, run.train, xi, run.seed)
    except LossConstraintTooHighError as err:
        # Refused before any step (a ξ recipe too high for this model): the rest of the
        # grid still runs, and the refusal is part of the results.
        record.refused[ft.name] = str(err)
        run.say(f"refused {ft.name}: ξ = {xi:.4g} is not below ln({run.data['num_classes']})")
        return
    fitted = unleashed.export()
    if unleashed.masks_ is not None:
        unleashed.masks_.detach()
    result = {
        "config": ft.to_dict(),
        "xi_value": xi,
        "time_s": time.perf_counter() - started,
        "history": unleashed.history_,
        "val": run.evaluate(fitted, "val", scores),
        "test": run.evaluate(fitted, "test", scores),
    }
    record.runs[ft.name] = result
    score = "energy" if "energy" in scores else scores[0]
    run.say(
        f"{ft.name} in {result['time_s']:.0f} s: test accuracy "
        f"{result['test']['accuracy']:.2f}, mean {score} FPR95 "
        f"{_mean_fpr(result['test'], score):.1f} (final model "
        f"{_mean_fpr(record.runs['final']['test'], score):.1f})"
    )


def finetune_stage(
    run: SeedRun, record: RunRecord, grid: Sequence[FineTune], deadline: float | None = None
) -> None:
    """Every fine-tune of ``grid`` the record lacks, from the final model, saving after each;
    those that would start after ``deadline`` (a ``time.time()`` value) are skipped."""
    # A resumed run keeps the scores it was started with.
    scores = list(record.runs["final"]["test"]["metrics"])
    todo = [ft for ft in grid if ft.name not in record.runs | record.refused]
    unknown = sorted({ft.xi.name for ft in todo if ft.xi and xi_value(record.xi, ft.xi) is None})
    if unknown:
        raise ValueError(
            f"No ξ recipe {unknown} in {run.json_path} (it has {sorted(record.xi)}): that run "
            "predates them. Use one of those (or train_x<k> for any multiple k of its "
            "train_loss), or start a fresh run in another --out."
        )
    longest = 0.0
    desc = f"{record.setting} s{run.seed} fine-tunes"
    for ft in tqdm(todo, desc=desc, disable=not run.progress):
        if deadline is not None and time.time() + longest > deadline:
            record.skipped.append(ft.name)
            run.save(record)
            run.say(f"skipped {ft.name} (time budget)")
            continue
        started = time.perf_counter()
        _finetune_one(run, record, ft, scores)
        longest = max(longest, time.perf_counter() - started)
        # A fine-tune an earlier, deadline-cut run skipped is no longer missing.
        record.skipped = [n for n in record.skipped if n not in record.runs]
        run.save(record)


def prepare(
    setting: str,
    seed: int,
    out_dir: str | os.PathLike[str],
    data: dict[str, Any],
    device: str,
    fit_size: int,
    **options: Any,
) -> SeedRun:
    """The :class:`SeedRun` of one (setting, seed): model, noisy training labels, paths."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    cfg = Setting.parse(setting)
    k = data["num_classes"]
    out = pathlib.Path(out_dir)
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    tag = f"{cfg.tag}_s{seed}"
    images, labels = data["train"]
    return SeedRun(
        setting=cfg,
        seed=seed,
        data=data,
        device=dev,
        train=(images.to(dev), noisy_labels(labels, cfg.label_noise, k, seed).to(dev)),
        fit_set=subsample(images, labels, fit_size, seed),
        model=create_model(cfg.model, k).to(dev),
        json_path=out / "seeds" / f"{tag}.json",
        ckpt_dir=out / "checkpoints" / tag,
        **options,
    )


def run_seed(
    setting: str,
    seed: int,
    out_dir: str | os.PathLike[str],
    *,
    data: dict[str, Any] | None = None,
    dataset: str = "fashion-mnist",
    train_size: int | None = None,
    eval_cap: int | None = None,
    grid: Sequence[FineTune] | None = None,
    device: str = "cpu",
    scores: Sequence[str] = ALL_SCORES,
    fit_size: int = 10000,
    checkpoints: str = "all",
    deadline: float | None = None,
    curve: bool = True,
    resume: bool = False,
    progress: bool = True,
    report: bool = False,
) -> dict[str, Any]:
    """Run one (setting, seed): training with per-epoch OOD metrics, ξ recipes, the fine-tune
    grid. With ``resume``, an earlier run's JSON and final checkpoint (``checkpoints="all"``
    or ``"final"``) replace training, and only the fine-tunes that JSON lacks are run.
    ``report`` prints a line per finished stage. Returns the JSON content."""
    if data is None:
        data = load_benchmark_data(dataset, train_size=train_size, eval_cap=eval_cap)
    run = prepare(
        setting,
        seed,
        out_dir,
        data,
        device,
        fit_size,
        checkpoints=checkpoints,
        progress=progress,
        report=report,
    )
    if resume:
        record = resume_stage(run)
    else:
        record = train_stage(run, curve=curve)
        xi_stage(run, record)
        evaluate_final(run, record, scores)
        run.save(record)
    finetune_stage(run, record, default_grid() if grid is None else grid, deadline)
    run.save(record)
    return record.to_json()


def _worker(args: tuple) -> str:
    setting, seed, out_dir, kwargs = args
    torch.set_num_threads(kwargs.pop("threads", 1))
    run_seed(setting, seed, out_dir, **kwargs)
    return f"{setting} s{seed}"


def run_benchmark(
    settings: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    jobs: int = 1,
    quick: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every (setting, seed), ``jobs`` at a time in separate processes (one process
    when ``jobs == 1``), then :func:`~oodunleash.bench.report.summarize`. Extra keyword
    arguments go to :func:`run_seed`."""
    from oodunleash.bench.report import summarize

    started = time.perf_counter()
    kwargs.setdefault("grid", default_grid(quick))
    for name in kwargs.get("scores", ()):
        get_score(name)  # an unknown name fails here, not after hours of training

    tasks = [(s, seed, str(out_dir), dict(kwargs)) for s in settings for seed in seeds]
    if jobs <= 1:
        for setting, seed, out, kw in tasks:
            run_seed(setting, seed, out, **kw)
    else:
        for task in tasks:
            task[3]["progress"] = False
            task[3]["report"] = True
        for done in in_processes(_worker, tasks, jobs):
            print(f"done: {done}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return summarize(out_dir, wall_time_s=time.perf_counter() - started)


def in_processes(func: Callable[[Any], Any], tasks: Sequence[Any], jobs: int) -> Iterator[Any]:
    """Yield ``func(task)`` for every task as ``jobs`` spawned processes finish them.

    The workers stop with this process: on an exception, Ctrl-C, or a SIGTERM (the signal a
    scheduler or ``kill`` sends), which is turned into ``SystemExit`` so that the pool is
    terminated instead of left running. Whatever a worker saved before stays, since results
    and checkpoints are written atomically.
    """
    import multiprocessing as mp
    import signal
    import threading

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = None
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
        previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        with mp.get_context("spawn").Pool(jobs) as pool:  # spawn: CUDA cannot be forked
            yield from pool.imap_unordered(func, tasks)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
