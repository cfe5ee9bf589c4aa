"""What :func:`~oodunleash.tune` compares: candidate models and the score variants that read
them out."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from oodunleash.config import Relative
from oodunleash.finetune.constraint import DEFAULT_CONSTRAINT_FACTOR
from oodunleash.scores import OODScore, list_scores
from oodunleash.scores.base import score_grids
from oodunleash.scores.spec import ScoreSpec
from oodunleash.wrapper import METHOD_DEFAULTS, OODUnleash

__all__ = [
    "DEFAULT_FINETUNES",
    "SCORE_GRID",
    "CandidateSpec",
    "parse_finetune",
    "score_variants",
]

Kind = Literal["unchanged", "checkpoint", "finetune"]

#: Cost tier of each kind of candidate: a tie on validation goes to the lower tier.
TIERS: dict[str, int] = {"unchanged": 0, "checkpoint": 1, "finetune": 2}

#: The fine-tunes tried by default, in priority order (a time budget that cannot fit them all
#: drops the later ones of equal cost first). ``"um"`` and ``"umap"`` are the library's
#: defaults (ξ = ``DEFAULT_CONSTRAINT_FACTOR`` x the training loss); ``"control"`` runs the
#: same fine-tune with plain cross-entropy; ``"um 1.5x"`` / ``"um 3x"`` bracket the default ξ.
DEFAULT_FINETUNES: tuple[str, ...] = (
    "um",
    "umap",
    "um control",
    "umap control",
    "um 1.5x",
    "um 3x",
)

#: The hyperparameter values tried for the scores that have one that matters: each value
#: becomes its own variant, chosen on validation like the model. Each score declares its own
#: (:attr:`OODScore.grid`); this is the registry's, read at import.
SCORE_GRID: dict[str, tuple[str, str, tuple[Any, ...]]] = score_grids()

_FINETUNE = re.compile(r"^(um|umap)(?: (control|(\d+(?:\.\d+)?)x))?$")


@dataclass(frozen=True)
class CandidateSpec:
    """One model to read out: the unchanged input, an earlier checkpoint, or a fine-tune.

    Attributes:
        name: Its label in tables (``"unchanged"``, ``"umap"``, ``"um control"``, ...).
        kind: ``"unchanged"``, ``"checkpoint"`` or ``"finetune"``.
        priority: Position in the candidate list; breaks ties after the cost tier.
        method: ``"um"`` or ``"umap"`` (fine-tunes only).
        factor: ξ as a multiple of the training loss; ``None`` for a plain-CE control.
        state_dict: The weights of a checkpoint candidate.
    """

    name: str
    kind: Kind
    priority: int = 0
    method: str | None = None
    factor: float | None = None
    state_dict: Mapping[str, Any] | None = None

    @property
    def tier(self) -> int:
        """Cost tier: 0 unchanged, 1 checkpoint, 2 fine-tune."""
        return TIERS[self.kind]


def parse_finetune(name: str, priority: int = 0) -> CandidateSpec:
    """The fine-tune a name describes: ``"um"``, ``"umap"``, ``"<method> control"`` or
    ``"<method> <factor>x"`` (ξ = factor x the training loss).

    Example:
        >>> spec = parse_finetune("um 2x")
        >>> spec.method, spec.factor
        ('um', 2.0)
        >>> parse_finetune("umap control").factor is None
        True
    """
    match = _FINETUNE.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"Unknown fine-tune {name!r}: write 'um' or 'umap', optionally followed by "
            "' control' (plain cross-entropy) or ' <factor>x' (ξ = factor x the training "
            f"loss), e.g. {list(DEFAULT_FINETUNES)}."
        )
    method, control, factor = match.groups()
    if control == "control":
        value = None
    else:
        value = float(factor) if factor is not None else DEFAULT_CONSTRAINT_FACTOR
        if not value > 0:
            raise ValueError(f"The ξ factor of {name!r} must be positive.")
    return CandidateSpec(name.strip(), "finetune", priority, method, value)


def candidate_specs(
    finetunes: Sequence[str] | None,
    checkpoints: Mapping[str, Mapping[str, Any]] | None,
) -> list[CandidateSpec]:
    """The unchanged model first, then the checkpoints, then the fine-tunes."""
    specs = [CandidateSpec("unchanged", "unchanged", 0)]
    for name, state in (checkpoints or {}).items():
        if not isinstance(state, Mapping):
            raise TypeError(
                f"checkpoints[{name!r}] must be a state_dict (a mapping of tensors), got "
                f"{type(state).__name__}. Load a file first, e.g. safetensors.torch.load_file."
            )
        specs.append(
            CandidateSpec(f"checkpoint {name}", "checkpoint", len(specs), None, None, state)
        )
    names = DEFAULT_FINETUNES if finetunes is None else finetunes
    if isinstance(names, str):
        names = [names]
    specs += [parse_finetune(n, len(specs) + i) for i, n in enumerate(names)]
    taken = [s.name for s in specs]
    repeated = sorted({n for n in taken if taken.count(n) > 1})
    if repeated:
        raise ValueError(f"Candidate names must be unique; repeated: {repeated}.")
    return specs


def score_variants(
    scores: Iterable[str | ScoreSpec] | Mapping[str, str | OODScore | ScoreSpec] | None,
    train_size: int | None = None,
) -> dict[str, ScoreSpec | OODScore]:
    """``{label: score}`` to read every candidate out with: :class:`ScoreSpec` values keyed by
    their :attr:`~ScoreSpec.label`, the form the chosen score is saved and reloaded in.

    ``None`` means every registered score; a registered name in :data:`SCORE_GRID` expands to
    one variant per value (``"knn k=10"``, ...; the registered default keeps the bare name); a
    label with options (``"knn k=1"``) or a :class:`ScoreSpec` is that variant alone; a mapping
    keeps its labels. KNN variants whose ``k`` is not below ``train_size`` are left out.

    Example:
        >>> list(score_variants(["energy", "dice", "react p=85"]))
        ['energy', 'dice s=0.5', 'dice s=0.7', 'dice', 'react p=85']
    """
    if isinstance(scores, Mapping):
        if not scores:
            raise ValueError("scores is empty: name at least one score (see list_scores()).")
        return {label: _as_spec(score) for label, score in scores.items()}
    if scores is None:
        names: Iterable[str | ScoreSpec] = list_scores()
    else:
        names = [scores] if isinstance(scores, str | ScoreSpec) else scores
    out: dict[str, ScoreSpec | OODScore] = {}
    for name in names:
        spec = ScoreSpec.of(name)  # validates the name and options, resolves aliases
        if spec.options or spec.name not in SCORE_GRID:
            out[spec.label] = spec
            continue
        option, _, values = SCORE_GRID[spec.name]
        for value in values:
            if option == "k" and train_size is not None and value >= train_size:
                continue
            variant = ScoreSpec(spec.name, {option: value})
            out[variant.label] = variant
    if not out:
        raise ValueError("scores is empty: name at least one score (see list_scores()).")
    return out


def _as_spec(score: str | OODScore | ScoreSpec) -> ScoreSpec | OODScore:
    """A spec where the score is registered; an instance of an unregistered score as it is."""
    try:
        return ScoreSpec.of(score)
    except (TypeError, ValueError):
        if isinstance(score, OODScore):
            return score
        raise


def finetune(
    model: nn.Module,
    spec: CandidateSpec,
    train_loader: Iterable,
    training_loss: float | None,
    *,
    seed: int,
    epochs: int | None,
    wrapper_options: Mapping[str, Any],
    progress: bool,
) -> OODUnleash:
    """The one place :func:`~oodunleash.tune` fine-tunes: UM or UMAP on a deep copy of
    ``model`` (the caller's model is never touched), with ξ = ``spec.factor`` x
    ``training_loss`` (measured once and shared by every fine-tune), or plain
    cross-entropy for a control."""
    options = dict(wrapper_options)
    if spec.factor is not None:
        known = training_loss is not None
        options["constraint"] = spec.factor * training_loss if known else Relative(spec.factor)
    unleashed = OODUnleash(copy.deepcopy(model), spec.method, seed=seed, **options)
    flooding = spec.factor is not None
    return unleashed.fit(train_loader, epochs=epochs, flooding=flooding, progress=progress)


def estimated_seconds(
    spec: CandidateSpec, epochs: int | None, pass_s: float, read_s: float
) -> float:
    """Rough cost of a candidate: a fine-tune epoch counts as three forward passes over the
    training data (forward, backward, update), plus the read-out."""
    if spec.kind != "finetune":
        return read_s
    n_epochs = epochs if epochs is not None else METHOD_DEFAULTS[spec.method or "um"]["epochs"]
    return n_epochs * 3 * pass_s + read_s
