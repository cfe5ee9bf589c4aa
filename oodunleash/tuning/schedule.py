"""Where :func:`~oodunleash.tune` spends its time: a short screening fine-tune for every
candidate, the full schedule only for the promising ones (successive halving), one read-out
per distinct model, and an estimate said up front.

A screening fine-tune runs the candidate's own recipe on the first :data:`SCREEN_FRACTION` of
an epoch's batches and is read out cheaply: the first :data:`SCREEN_FRACTION` of each
validation OOD set, score fitting on as many training batches, and no score that runs the
model backwards (ODIN, GradNorm). Its validation accuracy is measured on the whole
validation set. The final choice is made on fully trained candidates only.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from oodunleash.runtime.distributed import any_rank
from oodunleash.scores import OODScore, resolve_score
from oodunleash.tuning.result import ranked_candidates

__all__ = [
    "SCREEN_FRACTION",
    "failure_reason",
    "FirstBatches",
    "fingerprint",
    "plan_text",
    "screen",
    "screening_variants",
]

#: Share of an epoch (and of each validation OOD set) a screening fine-tune reads.
SCREEN_FRACTION = 0.25


class FirstBatches:
    """The first ``n`` batches of a re-iterable loader, re-iterable, with ``len()``.

    Example:
        >>> loader = FirstBatches([1, 2, 3, 4], 2)
        >>> list(loader), list(loader), len(loader)
        ([1, 2], [1, 2], 2)
    """

    def __init__(self, loader: Iterable, n: int) -> None:
        self.loader, self.n = loader, int(n)
        self.dataset = getattr(loader, "dataset", None)

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self) -> int:
        return self.n


def failure_reason(err: BaseException) -> str:
    """The error's type and first sentence: enough for a table note."""
    text = str(err).split("\n")[0]
    cut = text.find(". ")
    return f"{type(err).__name__}: {text[: cut + 1] if cut > 0 else text}"[:240]


def first_share(loader: Iterable, share: float = SCREEN_FRACTION) -> Iterable:
    """The first ``share`` of ``loader``'s batches (at least one); the loader itself when
    it has no length or is already that short."""
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return loader
    n = max(1, math.ceil(total * share))
    return loader if n >= total else FirstBatches(loader, n)


def screening_variants(variants: Mapping[str, Any]) -> dict[str, Any]:
    """The variants a screening read-out uses: all but those that run the model backwards
    (they cost several passes per batch); all of them if nothing else is left."""
    cheap = {}
    for label, variant in variants.items():
        try:
            score = variant if isinstance(variant, OODScore) else resolve_score(variant)
        except (TypeError, ValueError):
            continue
        if "gradients" not in score.requires:
            cheap[label] = variant
    return cheap or dict(variants)


def fingerprint(unleashed: Any) -> str:
    """A digest of the weights the wrapped model scores with (UMAP masks applied): two
    candidates with the same fingerprint are the same detector."""
    model = unleashed.export() if unleashed.masks_ is not None else unleashed.model
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def plan_text(
    finetunes: list[str],
    promote: int | None,
    epochs: int,
    variants: int,
    ood_sets: int,
    fusion: int = 0,
) -> str:
    """One line saying what :func:`~oodunleash.tune` will try.

    Example:
        >>> plan_text([], None, 0, 5, 6, fusion=3)
        'tune: the unchanged model only (no fine-tune), read out by 5 score variants and the fusions of its 3 best score families on 6 validation OOD sets.'
    """
    if not finetunes:
        what = "the unchanged model only (no fine-tune)"
    elif promote is None or len(finetunes) <= promote:
        what = (
            f"the unchanged model and {len(finetunes)} fine-tune(s) ({', '.join(finetunes)}) "
            f"for {epochs} epochs each"
        )
    else:
        what = (
            f"the unchanged model and {len(finetunes)} fine-tunes ({', '.join(finetunes)}) "
            f"screened on {SCREEN_FRACTION:g} epoch each, then the best {promote} for "
            f"{epochs} epochs"
        )
    fused = f" and the fusions of its {fusion} best score families" if fusion >= 2 else ""
    return (
        f"tune: {what}, read out by {variants} score variants{fused} on {ood_sets} validation "
        "OOD sets."
    )


def screening_cost(search: Any, spec: Any) -> float:
    """Estimated seconds of one screening fine-tune and its cheap read-out."""
    epoch_s = search.epoch_s.get(spec.method, 3 * search.pass_s)
    return SCREEN_FRACTION * (epoch_s + search.reader.read_s)


def screen(
    search: Any,
    specs: list[Any],
    reference_accuracy: float,
    started: float,
    time_budget: float | None,
    dropped: dict[str, str],
) -> list[Any]:
    """Screen every fine-tune in ``specs`` with a short run of its own recipe; return the
    ones that get the full schedule: the ``search.promote`` best on the screening read-out
    among those within the accuracy floor. The others go to ``dropped`` with the reason."""
    from oodunleash.finetune.loop import LossConstraintTooHighError, TrainingDivergedError

    short = first_share(search.train_loader)
    share = len(short) / len(search.train_loader) if short is not search.train_loader else 1.0
    rows, seen = {}, {}
    for spec in specs:
        elapsed = time.perf_counter() - started
        over = time_budget is not None and elapsed + screening_cost(search, spec) > time_budget
        if any_rank(over):  # under torchrun every rank must screen the same candidates
            dropped[spec.name] = f"time budget: {max(0.0, time_budget - elapsed):.0f} s left"
            continue
        t0 = time.perf_counter()
        try:
            unleashed, xi = search.build(spec, short, epochs=1)
        except (LossConstraintTooHighError, TrainingDivergedError) as err:
            dropped[spec.name] = failure_reason(err)
            continue
        train_s = time.perf_counter() - t0
        search.epoch_s.setdefault(spec.method, train_s / share)
        twin = search.duplicate(spec.name, unleashed, seen)
        if twin is not None:
            dropped[spec.name] = f"identical weights to {twin!r} after the screening fine-tune"
            continue
        rows[spec.name] = search.screen_reader.read(spec, unleashed, xi, train_s)
    floor = reference_accuracy - search.max_accuracy_drop - 1e-9
    eligible = [r for r in rows.values() if r.accuracy >= floor]
    order = {s.name: s.priority for s in specs}
    eligible.sort(key=lambda r: order[r.name])
    promoted = [r.name for r in ranked_candidates(eligible)[: search.promote]]
    went_on = ", ".join(promoted) or "none"
    for name, row in rows.items():
        if name not in promoted:
            why = "below the accuracy floor" if row.accuracy < floor else f"{went_on} did better"
            dropped[name] = (
                f"screened out ({why}): after {SCREEN_FRACTION:g} epoch, val accuracy "
                f"{row.accuracy:.2f}%, mean FPR95 {row.mean_fpr95:.1f}% ({row.best_score}) on "
                "the screening sets"
            )
    return [s for s in specs if s.name in promoted]


def screen_fit_batches(batches: int | None, max_fit_batches: int | None) -> int | None:
    """Training batches a screening read-out fits its scores on, of ``batches`` in all."""
    if batches is None:
        return max_fit_batches
    share = len(first_share(range(batches)))
    return share if max_fit_batches is None else min(share, max_fit_batches)


def check_promote(promote: int | None) -> int | None:
    """``promote``, refused with the fix unless it is a positive int or ``None``."""
    if promote is not None and (isinstance(promote, bool) or not isinstance(promote, int)):
        raise TypeError(f"promote must be a number of fine-tunes or None, got {promote!r}.")
    if promote is not None and promote < 1:
        raise ValueError(f"promote must be at least 1 (or None: no screening), got {promote}.")
    return promote
