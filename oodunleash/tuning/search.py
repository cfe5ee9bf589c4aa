""":func:`tune`: pick the fine-tune and the OOD score on the user's validation data."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from oodunleash.evaluation.proxy import proxy_ood
from oodunleash.finetune.constraint import mean_cross_entropy
from oodunleash.finetune.loop import LossConstraintTooHighError, TrainingDivergedError
from oodunleash.runtime.distributed import any_rank, is_main_process
from oodunleash.scores import OODScore
from oodunleash.tuning import schedule
from oodunleash.tuning.arguments import check_calibration_loader, check_options
from oodunleash.tuning.candidates import (
    CandidateSpec,
    candidate_specs,
    estimated_seconds,
    finetune,
    score_variants,
)
from oodunleash.tuning.reader import Reader
from oodunleash.tuning.result import CandidateResult, TuneResult, recipe_name, select
from oodunleash.wrapper import METHOD_DEFAULTS, OODUnleash

__all__ = ["tune"]


def _length(loader: Iterable, attribute: str) -> int | None:
    try:
        return len(getattr(loader, attribute)) if attribute else len(loader)  # type: ignore[arg-type]
    except (AttributeError, TypeError):
        return None


def _validation_oods(
    val_loader: Iterable,
    ood_loaders: Mapping[str, Iterable] | None,
    ood_mode: str,
    families: Sequence[str] | None,
    size: int,
    seed: int,
) -> tuple[dict[str, Iterable], bool]:
    """The validation OOD sets, and whether proxies are among them."""
    if ood_mode not in ("replace", "extend"):
        raise ValueError(f"ood_mode must be 'replace' or 'extend', got {ood_mode!r}.")
    if ood_loaders is not None and not isinstance(ood_loaders, Mapping):  # before dict() reads it
        raise TypeError(
            f"ood_loaders must be a mapping {{name: loader}}, got a {type(ood_loaders).__name__}: "
            "name each OOD set, e.g. {'svhn': svhn_loader}, or pass None for proxy OOD."
        )
    given = dict(ood_loaders) if ood_loaders is not None else {}
    if ood_loaders is not None and not given:
        raise ValueError("ood_loaders is empty: pass {'name': loader, ...}, or None.")
    if given and ood_mode == "replace":
        return given, False
    proxies = proxy_ood(val_loader, families, n=size, seed=seed)
    clash = sorted(set(proxies) & set(given))
    if clash:
        raise ValueError(f"ood_loaders reuse proxy family names {clash}; rename them.")
    return {**proxies, **given}, True


class _Search:
    """Runs the candidates, cheapest first, within the time budget."""

    def __init__(self, model, train_loader, reader, specs, **settings: Any) -> None:
        self.model, self.train_loader, self.reader, self.specs = model, train_loader, reader, specs
        self.seed, self.epochs = settings["seed"], settings["epochs"]
        self.options, self.progress = settings["options"], settings["progress"]
        self.max_accuracy_drop, self.keep_all = settings["max_accuracy_drop"], settings["keep_all"]
        self.screen_reader, self.promote = settings["screen_reader"], settings["promote"]
        self.verbose = settings["verbose"]
        self.epoch_s: dict[str, float] = {}  # measured seconds per fine-tune epoch, per method
        self.pass_s = 0.0  # seconds of one forward pass over the training data
        self.training_loss: list[float] = []  # measured once, shared by the fine-tunes
        self.seen: dict[str, str] = {}  # weight fingerprint -> the candidate read out with them

    def choose(self, rows: Mapping[str, CandidateResult]) -> CandidateResult:
        """:func:`select` over the rows in candidate order (ties go to the first listed)."""
        return select([rows[s.name] for s in self.specs if s.name in rows], self.max_accuracy_drop)[
            0
        ]

    def n_epochs(self, spec: CandidateSpec) -> int:
        """The full schedule's epochs of a fine-tune."""
        return self.epochs if self.epochs is not None else METHOD_DEFAULTS[spec.method]["epochs"]

    def cost(self, spec: CandidateSpec) -> float:
        """Estimated seconds; a fine-tune's epoch cost is measured once its method has run."""
        if spec.kind == "finetune" and spec.method in self.epoch_s:
            return self.n_epochs(spec) * self.epoch_s[spec.method] + self.reader.read_s
        return estimated_seconds(spec, self.epochs, self.pass_s, self.reader.read_s)

    def screens(self, finetunes: list[CandidateSpec]) -> bool:
        """Whether the fine-tunes are screened first (more of them than get the full one)."""
        return self.promote is not None and len(finetunes) > self.promote

    def announce(self, oods: int, measured: bool) -> None:
        """Say what will run (before the first pass) and about how long the rest takes (once
        the unchanged model's read-out has been timed)."""
        finetunes = [s for s in self.specs if s.kind == "finetune"]
        if not measured:
            epochs = self.n_epochs(finetunes[0]) if finetunes else 0
            names, variants = [s.name for s in finetunes], len(self.reader.variants)
            fusion = self.reader.fusion
            print(schedule.plan_text(names, self.promote, epochs, variants, oods, fusion))
            return
        others = [s for s in self.specs[1:] if s.kind != "finetune"]
        full = finetunes[: self.promote] if self.screens(finetunes) else finetunes
        estimate = sum(self.cost(s) for s in others + full)
        if self.screens(finetunes):
            estimate += sum(schedule.screening_cost(self, s) for s in finetunes)
        print(
            f"tune: the unchanged model took {self.reader.read_s:.0f} s to read out; about "
            f"{estimate:.0f} s more to go."
        )

    def duplicate(self, name: str, unleashed: OODUnleash, seen: dict[str, str]) -> str | None:
        """The candidate already read out with the same weights, else ``None`` (recorded)."""
        key = schedule.fingerprint(unleashed)
        if key in seen:
            return seen[key]
        seen[key] = name
        return None

    def run(self, started: float, time_budget: float | None, fit_scale: float):
        """``(rows, kept models, dropped)``: the unchanged model first, always."""
        shown = self.progress and is_main_process()
        talk = self.verbose and is_main_process()
        if talk:
            self.announce(len(self.reader.oods), measured=False)
        bar = tqdm(total=len(self.specs), desc="tune", disable=not shown)
        bar.set_postfix_str("unchanged")
        kept = {"unchanged": OODUnleash(self.model, **self.options)}
        rows = {"unchanged": self.reader.read(self.specs[0], kept["unchanged"], None, 0.0)}
        bar.update()
        self.pass_s = self.reader.fit_s * fit_scale
        self.seen = {schedule.fingerprint(kept["unchanged"]): "unchanged"}
        if talk and len(self.specs) > 1:
            self.announce(len(self.reader.oods), measured=True)
        dropped: dict[str, str] = {}
        finetunes = [s for s in self.specs[1:] if s.kind == "finetune"]
        full = [s for s in self.specs[1:] if s.kind != "finetune"]
        if self.screens(finetunes):
            reference = rows["unchanged"].accuracy
            full += schedule.screen(self, finetunes, reference, started, time_budget, dropped)
        else:
            full += finetunes
        for spec in sorted(full, key=lambda s: (self.cost(s), s.priority)):
            bar.set_postfix_str(spec.name)
            bar.update()
            elapsed = time.perf_counter() - started
            over = time_budget is not None and elapsed + self.cost(spec) > time_budget
            if any_rank(over):  # under torchrun every rank must drop the same candidates
                dropped[spec.name] = (
                    f"time budget: needs about {self.cost(spec):.0f} s, "
                    f"{max(0.0, time_budget - elapsed):.0f} s of {time_budget:g} s left"
                )
                continue
            t0 = time.perf_counter()
            try:
                unleashed, xi = self.build(spec)
            except (LossConstraintTooHighError, TrainingDivergedError) as err:
                dropped[spec.name] = schedule.failure_reason(err)
                continue
            train_s = time.perf_counter() - t0
            if spec.kind == "finetune":
                self.epoch_s[spec.method] = train_s / max(1, len(unleashed.history_))
            twin = self.duplicate(spec.name, unleashed, self.seen)
            if twin is not None:  # the same detector: its row would repeat twin's
                dropped[spec.name] = f"identical weights to {twin!r}, which was read out"
                continue
            rows[spec.name] = self.reader.read(spec, unleashed, xi, train_s)
            kept[spec.name] = unleashed
            if not self.keep_all:  # free the models that lost
                kept = {name: kept[name] for name in [self.choose(rows).name]}
        bar.close()
        return rows, kept, dropped

    def build(
        self, spec: CandidateSpec, loader: Iterable | None = None, epochs: int | None = None
    ) -> tuple[OODUnleash, float | None]:
        """The wrapped model of a checkpoint or fine-tune candidate, and its ξ; a fine-tune
        reads ``loader`` (default the training data) for ``epochs`` (default the schedule's)."""
        if spec.kind == "checkpoint":
            copied = copy.deepcopy(self.model)
            copied.load_state_dict(dict(spec.state_dict or {}))
            return OODUnleash(copied, **self.options), None
        if spec.factor is not None and not self.training_loss:
            with torch.no_grad():
                loss = mean_cross_entropy(self.model, self.train_loader, progress=self.progress)
            self.training_loss.append(loss)
        unleashed = finetune(
            self.model,
            spec,
            self.train_loader if loader is None else loader,
            self.training_loss[0] if self.training_loss else None,
            seed=self.seed,
            epochs=self.epochs if epochs is None else epochs,
            wrapper_options=self.options,
            progress=self.progress,
        )
        return unleashed, unleashed.loss_constraint_


def _fit_scale(train_loader: Iterable, max_fit_batches: int | None) -> float:
    """How many score-fitting passes make one pass over the whole training data."""
    batches = _length(train_loader, "")
    if max_fit_batches is None or batches is None or batches <= max_fit_batches:
        return 1.0
    return batches / max_fit_batches


def tune(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    ood_loaders: Mapping[str, Iterable] | None = None,
    *,
    max_accuracy_drop: float = 1.0,
    seed: int = 0,
    time_budget: float | None = None,
    ood_mode: Literal["replace", "extend"] = "replace",
    finetunes: Sequence[str] | None = None,
    checkpoints: Mapping[str, Mapping[str, Any]] | None = None,
    scores: Sequence[str] | Mapping[str, str | OODScore] | None = None,
    epochs: int | None = None,
    proxy_families: Sequence[str] | None = None,
    proxy_size: int = 1000,
    max_fit_batches: int | None = None,
    head: str | None = None,
    feature_layer: str | None = None,
    keep_all: bool = False,
    promote: int | None = 1,
    fusion: int = 3,
    calibration_loader: Iterable | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TuneResult:
    """Choose a fine-tune and an OOD score on validation data; never worse than ``model`` there.

    Candidates: ``model`` itself (read-only), the ``checkpoints`` given, and the
    ``finetunes`` (default: UM and UMAP with the library's ξ, their plain cross-entropy
    controls, and UM with ξ at 2x and 4x the training loss), each on a deep copy. Every
    candidate is read out by every score variant (all registered scores; DICE sparsity, ReAct
    percentile and KNN ``k`` at a few values each): one pass over the training data fits
    them, one pass per validation set scores them all. The fine-tunes are first screened
    with a quarter epoch each, and only the best ``promote`` get the full schedule, so the
    whole search costs about two ``fit`` calls (``docs/benchmarks/tune-cost.md``). The
    choice, among candidates whose validation accuracy is at most ``max_accuracy_drop`` points
    below ``model``'s: the best mean rank of AUROC over the validation OOD sets (each set ranks
    the scores, then each candidate's best; :func:`~oodunleash.tuning.result.ranked`), then
    the lowest mean FPR95; a tie goes to the cheaper candidate (no fine-tune first). ``model``
    with its best score is always eligible, so on validation the result never ranks below it.

    Args:
        model: The trained classifier. It is not modified.
        train_loader: ID training data, ``(images, labels)``: fine-tunes and fitted scores.
        val_loader: Labelled ID validation data (accuracy, and the ID side of the metrics).
            Use an unshuffled loader.
        ood_loaders: ``{name: loader}`` of validation OOD data. ``None`` (the usual case):
            proxy outliers built from the validation images (:func:`~oodunleash.proxy_ood`).
        max_accuracy_drop: Allowed loss of validation accuracy, in points (percent).
        seed: Seeds the fine-tunes and the proxy sets.
        time_budget: Seconds. Candidates run cheapest first; one whose estimated cost no
            longer fits is dropped (the most expensive go first), and the result says which.
            ``model`` itself is always read out.
        ood_mode: With ``ood_loaders``: ``"replace"`` the proxies by them, or ``"extend"`` the
            proxies with them.
        finetunes: Fine-tune names: ``"um"``, ``"umap"``, ``"<method> control"``,
            ``"<method> <factor>x"``; ``[]`` for post-hoc scores only.
        checkpoints: ``{name: state_dict}`` of earlier training checkpoints of ``model``
            (the paper's intermediate stage), read out as extra candidates.
        scores: Registered score names (those in ``SCORE_GRID`` expand to their variants) or
            ``{label: score}``; default every registered score.
        epochs: Fine-tune epochs (default: the method's, 10).
        proxy_families, proxy_size: Families and size of the proxy sets (see
            :func:`~oodunleash.proxy_ood`).
        max_fit_batches: Fit the scores on at most this many training batches.
        head, feature_layer: Passed to :class:`~oodunleash.OODUnleash` for models whose head or
            feature maps are not found automatically.
        keep_all: Keep every candidate's model and fitted score variants (under their labels)
            in ``result.unleashed``, for comparisons on test data; costs memory. By default
            only the chosen model is kept, with only the chosen score.
        promote: Successive halving: when there are more fine-tunes than this, each is first
            screened with a quarter-epoch run of its recipe and a cheap read-out
            (:mod:`~oodunleash.tuning.schedule`), and only the ``promote`` best within the
            accuracy floor get the full schedule and the full read-out; the choice is made
            on those. ``None``: every fine-tune runs the full schedule (slow).
        fusion: Fused scores as candidates: on each candidate model, every combination of
            two or more of its ``fusion`` best score families on validation (the best variant
            of each, gradient scores left out) is tried, each member z-normalised against its
            values on the ID validation images and the results averaged
            (:mod:`~oodunleash.tuning.fusion`); computed from the cached values, no extra
            pass. ``0``: single scores only.
        calibration_loader: ID images that neither ``train_loader`` nor ``val_loader`` holds:
            the choice is calibrated on them (:meth:`~oodunleash.OODUnleash.calibrate`), so
            ``result.best.predict(x, alpha)`` works at once. Not the validation images: the
            choice was made on their scores, which would no longer be exchangeable with new ID
            images, and the false-alarm guarantee would not hold.
        progress: Show progress bars.
        verbose: Say up front what will run and about how long it takes; print the
            validation table when done.

    Returns:
        A :class:`~oodunleash.tuning.TuneResult`: ``.best`` (an ``OODUnleash`` whose
        ``score()`` uses the chosen score), ``.best_name``, every candidate's validation
        metrics, ``.to_markdown()``, ``.to_dict()``, ``.plot(path)``.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_options(max_accuracy_drop, time_budget, fusion)
    check_calibration_loader(calibration_loader, train_loader, val_loader)
    oods, proxy = _validation_oods(
        val_loader, ood_loaders, ood_mode, proxy_families, proxy_size, seed
    )
    specs = candidate_specs(finetunes, checkpoints)
    reader = Reader(
        train_loader,
        val_loader,
        oods,
        score_variants(scores, _length(train_loader, "dataset")),
        max_fit_batches=max_fit_batches,
        keep_all=keep_all,
        progress=progress,
        fusion=fusion,
    )
    variants = reader.variants
    screen_reader = Reader(
        train_loader,
        val_loader,
        {name: schedule.first_share(loader) for name, loader in oods.items()},
        schedule.screening_variants(variants),
        max_fit_batches=schedule.screen_fit_batches(_length(train_loader, ""), max_fit_batches),
        keep_all=False,
        progress=progress,
        fusion=fusion,
    )
    search = _Search(
        model,
        train_loader,
        reader,
        specs,
        screen_reader=screen_reader,
        promote=schedule.check_promote(promote),
        verbose=verbose,
        seed=seed,
        epochs=epochs,
        # Every candidate is read out by every score after its fit, and the chosen score
        # becomes the result's default: a default that learns (KNN) would cost a pass for nothing.
        options={"head": head, "feature_layer": feature_layer, "score": "energy"},
        max_accuracy_drop=max_accuracy_drop,
        keep_all=keep_all,
        progress=progress,
    )
    rows, kept, dropped = search.run(
        started, time_budget, _fit_scale(train_loader, max_fit_batches)
    )
    ordered = {s.name: rows[s.name] for s in specs if s.name in rows}
    chosen = search.choose(rows)
    result = TuneResult(
        best=kept[chosen.name],
        best_name=recipe_name(chosen.name, chosen.best_score),
        best_candidate=chosen.name,
        best_score=chosen.best_score,
        candidates=ordered,
        reference_accuracy=rows["unchanged"].accuracy,
        max_accuracy_drop=float(max_accuracy_drop),
        ood_sets=list(oods),
        proxy=proxy,
        dropped=dropped,
        skipped_scores=dict(reader.skipped),
        time_s=time.perf_counter() - started,
        unleashed=kept if keep_all else {},
    )
    if calibration_loader is not None:
        result.best.calibrate(calibration_loader, progress=progress)
    if verbose and is_main_process():
        print(result.to_markdown())
    return result
