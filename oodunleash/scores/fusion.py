"""Fused scores: several scores, each normalised against its values on ID data, averaged.

Scores that look at different things (distances in feature space, the energy of the logits,
Mahalanobis) fail on different OOD sets; averaging them once each is on a common scale lets
one cover for another. Two normalisations against ID reference values: ``"z"`` (minus the
mean, over the standard deviation) and ``"rank"`` (the fraction of reference values below,
ties counted half). :func:`fuse` does it on values already computed (e.g. cached by
``tune``); :class:`Fused` is the same as a registered, fittable, saveable score.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from oodunleash.features import FeatureSet
from oodunleash.scores.base import OODScore, get_score, register_score
from oodunleash.scores.spec import ScoreSpec

__all__ = ["FUSION_METHODS", "Fused", "fuse", "normalise"]

#: The normalisations :func:`fuse` knows.
FUSION_METHODS = ("z", "rank")

MemberSpec = str | OODScore | tuple[str, Mapping[str, Any]] | Sequence[Any]


def normalise(values: Tensor, reference: Tensor, method: str = "z") -> Tensor:
    """``values`` on the scale of the ID ``reference`` values: z-scores, or ranks in [0, 1].
    Tensors or arrays; a float32 tensor comes back.

    Example:
        >>> ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
        >>> normalise(torch.tensor([1.5, 3.0]), ref, "rank")
        tensor([0.5000, 0.8750])
    """
    if method not in FUSION_METHODS:
        raise ValueError(f"method must be one of {FUSION_METHODS}, got {method!r}.")
    values = torch.as_tensor(values).detach().double()
    reference = torch.as_tensor(reference).detach().double().flatten().to(values.device)
    if reference.numel() < 2:
        raise ValueError("Normalising needs at least two ID reference values.")
    if method == "z":
        std = reference.std().clamp(min=1e-12)
        return ((values - reference.mean()) / std).float()
    ordered = reference.sort().values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    upto = torch.searchsorted(ordered, values.contiguous(), right=True)
    return ((below + upto).double() / (2 * ordered.numel())).float()


def fuse(
    values_by_member: Mapping[str, Tensor],
    id_reference_values: Mapping[str, Tensor],
    method: str = "z",
) -> Tensor:
    """The mean over members of each member's values normalised against its ID reference
    values (:func:`normalise`); higher = more ID, as for every member.

    Args:
        values_by_member: ``{member: (n,) scores}`` of the samples to score (tensors or
            arrays).
        id_reference_values: ``{member: (m,) scores}`` of ID samples (validation or held-out
            training data), the same members.
        method: ``"z"`` or ``"rank"``.

    Example:
        >>> ref = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0, 20.0])}
        >>> fuse({"a": torch.tensor([2.0]), "b": torch.tensor([0.0])}, ref)
        tensor([0.])
    """
    if not values_by_member:
        raise ValueError("fuse needs at least one member's values.")
    if set(values_by_member) != set(id_reference_values):
        raise ValueError(
            f"fuse needs ID reference values for exactly the members it fuses: values for "
            f"{sorted(values_by_member)}, references for {sorted(id_reference_values)}."
        )
    values_by_member = {k: torch.as_tensor(v) for k, v in values_by_member.items()}
    lengths = {name: tuple(v.shape) for name, v in values_by_member.items()}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"Each member needs one 1-D tensor of the same length; got {lengths}.")
    parts = [
        normalise(values, id_reference_values[name], method)
        for name, values in values_by_member.items()
    ]
    return torch.stack(parts).mean(dim=0)


def _member_spec(spec: Any) -> list[Any]:
    """``[name, options that differ from the defaults]`` (JSON-able) of a member given as a
    name or label (``"knn k=1"``), a pair, a :class:`ScoreSpec` or an instance."""
    if isinstance(spec, str | OODScore | ScoreSpec):
        found = ScoreSpec.of(spec)
    elif isinstance(getattr(spec, "name", None), str) and hasattr(spec, "options"):
        found = ScoreSpec(spec.name, dict(spec.options or {}))  # a spec-like object
    elif isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[0], str):
        if not isinstance(spec[1], Mapping):
            raise TypeError(f"A member's options must be a dict, got {spec[1]!r}.")
        found = ScoreSpec(spec[0], dict(spec[1]))
    else:
        raise TypeError(
            "A fused score's members are registered names or labels, (name, options) pairs, "
            f"ScoreSpecs or OODScore instances; got {spec!r}."
        )
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in found.options.items()}
    return [found.name, options]


@register_score(aliases=["fusion"])
class Fused(OODScore):
    """The average of member scores, each normalised against its values on ID data.

    Args:
        members: Registered names or labels (``"knn k=1"``), ``(name, options)`` pairs,
            :class:`~oodunleash.scores.ScoreSpec` or :class:`OODScore` instances (at least
            two); kept as ``[name, options that differ from the defaults]``. Default KNN and Mahalanobis, which fail on different OOD sets
            (near against far OOD, see the issue-31 benchmark).
        method: ``"z"`` (z-scores) or ``"rank"`` (ranks among the ID reference values).
        reference_fraction: :meth:`fit` holds out this seeded fraction of the training data
            for the reference values and fits the members on the rest (a member scored on
            its own training samples, KNN's above all, looks more ID than on new ones);
            ``0`` fits and references on all of it. :meth:`set_reference` replaces the
            reference with values on other ID data, e.g. validation.
        max_reference: Reference values kept (and saved) per member, a seeded subset.
        seed: Seeds the hold-out and the subset.

    Fitted state (all tensors): the members' states under ``m<i>.`` and ``reference``,
    ``(members, values)`` ID scores, sorted per member.
    """

    name = "fused"
    needs_fit = True
    requires = frozenset({"features"})  # replaced per instance by the members' union

    def __init__(
        self,
        members: Iterable[MemberSpec] = ("knn", "mahalanobis"),
        method: str = "z",
        reference_fraction: float = 0.2,
        max_reference: int = 10_000,
        seed: int = 0,
    ) -> None:
        if isinstance(members, str | OODScore):
            members = [members]
        specs = [_member_spec(m) for m in members]
        if len(specs) < 2:
            raise ValueError("A fused score needs at least two members, e.g. ['knn', 'vim'].")
        if any(name == self.name for name, _ in specs):
            raise ValueError("A fused score cannot have a fused member; list its members.")
        if method not in FUSION_METHODS:
            raise ValueError(f"method must be one of {FUSION_METHODS}, got {method!r}.")
        if not 0 <= reference_fraction < 1:
            raise ValueError(f"reference_fraction must be in [0, 1), got {reference_fraction}.")
        if max_reference < 2:
            raise ValueError(f"max_reference must be at least 2, got {max_reference}.")
        self.members = specs
        self.method = method
        self.reference_fraction = float(reference_fraction)
        self.max_reference = int(max_reference)
        self.seed = int(seed)
        self.scores = [get_score(name, **options) for name, options in specs]
        gradient = [s.name for s in self.scores if "gradients" in s.requires]
        if gradient:
            raise ValueError(
                f"Gradient scores {gradient} run the model themselves, so a fused score cannot "
                "compute their ID reference from cached features; fuse their values with "
                "oodunleash.scores.fuse instead."
            )
        self.requires = frozenset().union(*(s.requires for s in self.scores))
        self.reference: Tensor | None = None

    @classmethod
    def from_fitted(
        cls,
        members: Mapping[str, OODScore] | Sequence[OODScore],
        reference: Mapping[str, Tensor] | Sequence[Tensor],
        method: str = "z",
        **options: Any,
    ) -> Fused:
        """A fitted fused score from members fitted elsewhere (used as they are, not copied)
        and their scores on ID data, e.g. a search's fitted variants and cached validation
        scores; ``reference`` is keyed like ``members`` when both are mappings.

        Example:
            >>> from oodunleash.scores import get_score
            >>> feats = FeatureSet(logits=torch.randn(6, 3))
            >>> msp, energy = get_score("msp"), get_score("energy")
            >>> fused = Fused.from_fitted([msp, energy], [msp.score(feats), energy.score(feats)])
            >>> fused.is_fitted, fused.member_labels
            (True, ['msp', 'energy'])
        """
        labelled = isinstance(members, Mapping)
        scores = list(members.values()) if labelled else list(members)
        if labelled and isinstance(reference, Mapping):
            missing = set(members) - set(reference)
            if missing:
                raise ValueError(f"No ID reference values for the members {sorted(missing)}.")
            reference = [reference[label] for label in members]
        fused = cls(scores, method, **options)
        unfitted = [s.name for s in scores if not s.is_fitted]
        if unfitted:
            raise ValueError(f"The members {unfitted} are not fitted: fit them first.")
        fused.scores = scores
        return fused.set_reference(reference)

    @property
    def member_labels(self) -> list[str]:
        """One label per member: its name, with ``#i`` where a name repeats."""
        names = [s.name for s in self.scores]
        return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]

    def _subset(self, n: int, size: int, offset: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + offset)
        return torch.randperm(n, generator=gen)[:size]

    def fit(self, data: FeatureSet) -> Fused:
        n = len(data)
        if n < 2:
            raise ValueError(f"The fused score needs at least two ID training samples, got {n}.")
        held = round(n * self.reference_fraction)
        if self.reference_fraction > 0 and not 2 <= held <= n - 2:
            # Fitting every registered score on a small set should not fail for this one.
            warnings.warn(
                f"The fused score cannot hold out {self.reference_fraction:g} of {n} training "
                "samples for its ID reference (too few on one side): it takes the reference "
                "from the training samples themselves. Fit on more data, or call "
                "set_reference with scores on other ID data.",
                stacklevel=2,
            )
            held = 0
        if held:
            order = self._subset(n, n)
            reference, rest = (
                data.select(order[:held].sort().values),
                data.select(order[held:].sort().values),
            )
        else:
            reference = rest = data
        for score in self.scores:
            score.fit(rest)
        self.set_reference([score.score(reference) for score in self.scores])
        return self

    def set_reference(self, values: Sequence[Tensor] | Mapping[str, Tensor]) -> Fused:
        """Use these ID scores (one tensor per member, in order or by :attr:`member_labels`)
        as the reference the members are normalised against."""
        if isinstance(values, Mapping):
            missing = set(self.member_labels) - set(values)
            if missing:
                raise ValueError(f"No reference values for the members {sorted(missing)}.")
            values = [values[label] for label in self.member_labels]
        if len(values) != len(self.scores) or len({v.numel() for v in values}) != 1:
            raise ValueError(
                f"set_reference needs one tensor per member ({len(self.scores)}), all of one "
                "length."
            )
        stacked = torch.stack([v.detach().float().flatten().cpu() for v in values])
        if stacked.shape[1] < 2:
            raise ValueError("The ID reference needs at least two samples.")
        if stacked.shape[1] > self.max_reference:
            stacked = stacked[:, self._subset(stacked.shape[1], self.max_reference, 1)]
        self.reference = stacked.sort(dim=1).values.contiguous()
        return self

    @property
    def is_fitted(self) -> bool:
        return self.reference is not None and all(s.is_fitted for s in self.scores)

    def score(self, data: FeatureSet) -> Tensor:
        self.check_fitted()
        values = [s.score(data) for s in self.scores]
        return self.combine(values).to(values[0].device)

    def combine(self, member_values: Sequence[Tensor]) -> Tensor:
        """The fused score of values the members already computed (one tensor per member, in
        order): each normalised against its stored ID reference, then averaged. What
        :meth:`score` does after the members have scored."""
        self.check_fitted()
        if len(member_values) != len(self.scores):
            raise ValueError(
                f"combine needs one tensor per member ({len(self.scores)}), got "
                f"{len(member_values)}."
            )
        labels = self.member_labels
        values = dict(zip(labels, member_values, strict=True))
        return fuse(values, dict(zip(labels, self.reference, strict=True)), self.method)

    def state_dict(self) -> dict[str, Tensor]:
        if not self.is_fitted:
            return {}
        state = {"reference": self.reference.detach().cpu().contiguous()}
        for i, score in enumerate(self.scores):
            state.update({f"m{i}.{k}": v for k, v in score.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> Fused:
        grouped: dict[int, dict[str, Tensor]] = {i: {} for i in range(len(self.scores))}
        unknown = []
        for key, value in state.items():
            head, _, rest = key.partition(".")
            index = int(head[1:]) if head[:1] == "m" and head[1:].isdigit() else -1
            if key != "reference" and (index not in grouped or not rest):
                unknown.append(key)
            elif key != "reference":
                grouped[index][rest] = value
        if unknown or "reference" not in state:
            raise ValueError(
                f"State for the {self.name!r} score does not match: expected keys "
                f"'reference' and 'm<i>.<key>' for {len(self.scores)} members, got "
                f"{sorted(state)}."
            )
        for score, member_state in zip(self.scores, grouped.values(), strict=True):
            score.load_state_dict(member_state)
        self.reference = torch.as_tensor(state["reference"]).float()
        if self.reference.shape[0] != len(self.scores):
            raise ValueError(
                f"The fused reference holds {self.reference.shape[0]} members, expected "
                f"{len(self.scores)}."
            )
        return self
