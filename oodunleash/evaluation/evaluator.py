"""Scoring and evaluation of one model: :class:`Evaluator`, which :class:`~oodunleash.OODUnleash`
owns and calls.

One pass, many detectors: each data set goes through the model once; its logits and
penultimate features are cached and every detector reads the cache. Detectors that need the
pre-pool feature maps (ASH) or the images themselves (ODIN) are computed batch by batch in the
same pass, so the maps are never stored and the data are loaded once. Fitting detectors on the
ID training set is one pass as well.

Scores are **higher for in-distribution** samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from oodunleash.evaluation.metrics import Positive, accuracy
from oodunleash.evaluation.results import EvaluationResults
from oodunleash.features.collect import FeatureExtractor, FeatureSet, collect_features
from oodunleash.runtime.batches import named_ood_loaders
from oodunleash.runtime.modules import eval_mode, model_device, unwrap_compiled
from oodunleash.scores import OODScore, ScoreNotFittedError, list_scores, resolve_score
from oodunleash.scores.base import check_score_output as _check_output
from oodunleash.scores.resolve import resolve_scores
from oodunleash.scores.spec import ScoreSpec as ConfiguredScore

__all__ = ["Evaluator", "ScoreSpec", "ScoreSpecs", "evaluator_attribute"]

#: A score: a registered name (see :func:`oodunleash.list_scores`) or label (``"knn k=1"``), an
#: :class:`OODScore`, or a :class:`~oodunleash.scores.spec.ScoreSpec` (name + options).
ScoreSpec = str | OODScore | ConfiguredScore

#: One score, several, or ``{label: score}`` to run variants of one score side by side
#: (``{"dice_50": DICE(0.5), "dice_90": DICE(0.9)}``); results are keyed by the labels.
ScoreSpecs = ScoreSpec | Sequence[ScoreSpec] | Mapping[str, ScoreSpec]

#: Requirements served from the batch during the pass instead of the cache.
_BATCHWISE = frozenset({"gradients", "feature_maps"})


def _eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    # Each module's own mode comes back, and concurrent score() calls share one switch.
    return eval_mode(model)


def evaluator_attribute(
    name: str,
    doc: str,
    *,
    convert: Callable[[Any], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
) -> property:
    """An attribute of a class holding an :class:`Evaluator` as ``_evaluator`` that reads and
    writes the evaluator's own ``name``: a value set is ``check``ed, then stored as
    ``convert(value)``. One copy of each setting, so the two never disagree."""

    def get(owner: Any) -> Any:
        return getattr(owner._evaluator, name)

    def set_(owner: Any, value: Any) -> None:
        if check is not None:
            check(value)
        setattr(owner._evaluator, name, value if convert is None else convert(value))

    return property(get, set_, doc=doc)


class Evaluator:
    """OOD scoring and evaluation of one model. Higher scores = more in-distribution.

    Args:
        model: The classifier (read, never trained; put in eval mode while it is read).
        head: Name of the classifier head submodule, when it cannot be found automatically.
        feature_layer: Name of the submodule whose output is the pre-pool feature map.
        default_score: The score :meth:`score` and :meth:`evaluate` use when none is named.

    Attributes:
        fitted_scores: ``{name: OODScore}`` filled by :meth:`fit_scores`.
        last_results: The :class:`~oodunleash.evaluation.results.EvaluationResults` of the last
            :meth:`evaluate` call, or ``None``.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> Evaluator(net).score(torch.randn(5, 1, 4, 4)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str | None = None,
        feature_layer: str | None = None,
        default_score: ScoreSpec = "energy",
    ) -> None:
        resolve_score(default_score)  # fail at construction on an unknown name
        self.model = model
        self.head = head
        self.feature_layer = feature_layer
        self.default_score = default_score
        self.fitted_scores: dict[str, OODScore] = {}
        self.last_results: EvaluationResults | None = None
        self._extractor: FeatureExtractor | None = None

    def reset(self) -> None:
        """Forget fitted detectors and the feature extractor: they describe a model whose
        weights have since changed."""
        self.fitted_scores = {}
        self._extractor = None

    @property
    def feature_extractor(self) -> FeatureExtractor:
        """The :class:`~oodunleash.features.collect.FeatureExtractor` reading the model."""
        # A torch.compile wrapper's forward skips the hooks that read features: read the
        # module it wraps (same weights).
        model = unwrap_compiled(self.model)
        ex = self._extractor
        if (
            ex is None
            or ex.model is not model
            or (ex.head_name, ex.feature_layer) != (self.head, self.feature_layer)
        ):
            ex = self._extractor = FeatureExtractor(
                model, head=self.head, feature_layer=self.feature_layer
            )
        return ex

    def _resolve(self, scores: ScoreSpecs, *, reuse_fitted: bool) -> dict[str, OODScore]:
        """``{label: instance}``. With ``reuse_fitted``, a name or label that
        :meth:`fit_scores` stored resolves to that fitted instance."""
        return resolve_scores(scores, self.fitted_scores if reuse_fitted else {})

    def _instances(self, scores: ScoreSpecs | None) -> dict[str, OODScore]:
        """Instances to evaluate: fitted ones where ``fit_scores`` made them, new ones else."""
        if scores is None:
            default = self._resolve(self.default_score, reuse_fitted=True)
            return default | self.fitted_scores
        return self._resolve(scores, reuse_fitted=True)

    @staticmethod
    def _check_ready(instances: Mapping[str, OODScore]) -> None:
        unfitted = [name for name, s in instances.items() if not s.is_fitted]
        if unfitted:
            raise ScoreNotFittedError(
                f"The score(s) {unfitted} learn from in-distribution training data and have not "
                f"been fitted: call unleashed.fit_scores(train_loader, scores={unfitted}) first, "
                "or pass fit_loader=train_loader to evaluate(); a score such as 'energy' needs no "
                "training data."
            )

    # ------------------------------------------------------------------ fitting
    def fit_scores(
        self,
        loader: Iterable,
        scores: ScoreSpecs | None = None,
        *,
        max_batches: int | None = None,
        progress: bool = True,
    ) -> Evaluator:
        """Fit detectors on ID training data in one pass of the model; store them in
        ``fitted_scores``.

        Args:
            loader: ID training data, ``(images, labels)`` batches (labels are needed by
                Mahalanobis, Relative Mahalanobis and SHE).
            scores: Names or :class:`OODScore` instances (fitted in place), or
                ``{label: score}`` to keep variants of one score apart (they are stored under
                the labels); default every registered score (and the constructor's ``score``
                if it is an instance). Scores that need no fitting are stored as they are.
            max_batches: Use only this many batches (e.g. a subset of a large training set).
            progress: Show a progress bar.

        Returns:
            ``self``.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> from oodunleash import OODUnleash
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> train_data = DataLoader(
            ...     TensorDataset(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))), batch_size=16)
            >>> unleashed = OODUnleash(net).fit_scores(train_data, ["knn", "msp"], progress=False)
            >>> sorted(unleashed.fitted_scores_)
            ['knn', 'msp']
            >>> unleashed.score(torch.randn(5, 1, 4, 4), "knn").shape
            torch.Size([5])
        """
        if scores is None:
            scores = {name: name for name in list_scores()}
            if isinstance(self.default_score, OODScore):  # it replaces its registered namesake
                scores[self.default_score.name] = self.default_score
            elif isinstance(
                self.default_score, ConfiguredScore
            ):  # a variant: fitted beside the rest
                scores[self.default_score.label] = self.default_score
        instances = self._resolve(scores, reuse_fitted=False)
        to_fit = [s for s in instances.values() if s.needs_fit]
        if to_fit:
            needs = set().union(*(s.requires for s in to_fit))
            with _eval_mode(self.model):
                data = collect_features(
                    self.feature_extractor,
                    loader,
                    keep=needs & {"logits", "features", "feature_maps", "labels"},
                    need_labels="labels" in needs,
                    device=model_device(self.model),
                    max_batches=max_batches,
                    progress=progress,
                    desc="fit scores",
                )
                with torch.no_grad():
                    for instance in to_fit:
                        instance.fit(data)
        self.fitted_scores.update(instances)
        return self

    # ------------------------------------------------------------------ scoring
    def score(self, x: Tensor, score: ScoreSpec | None = None) -> Tensor:
        """OOD score of each image in ``x``: a 1-D tensor, higher = more in-distribution.

        Args:
            x: A batch of images.
            score: A registered name or an :class:`OODScore`; default the ``score`` given to
                the constructor. Scores that learn from training data must have been fitted
                with :meth:`fit_scores`.

        Returns:
            ``(batch,)`` scores, on the device of ``x``.

        Example:
            >>> from oodunleash import OODUnleash
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> unleashed = OODUnleash(net, score="energy")  # a score that needs no ID data
            >>> x = torch.randn(5, 1, 4, 4)
            >>> unleashed.score(x).shape
            torch.Size([5])
            >>> msp = unleashed.score(x, "msp")  # the maximum softmax probability
            >>> bool(((msp > 0) & (msp <= 1)).all())
            True
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor batch of images, got {type(x).__name__}.")
        instance = next(iter(self._instances(score or self.default_score).values()))
        self._check_ready({instance.name: instance})
        x = x.to(model_device(self.model))
        with _eval_mode(self.model), torch.no_grad():
            data = self.feature_extractor(x, maps="feature_maps" in instance.requires)
            data.images = x
            out = instance.score(data)
        return _check_output(instance.name, out, x.shape[0]).to(x.device)

    def _score_loader(
        self,
        loader: Iterable,
        instances: Mapping[str, OODScore],
        *,
        with_labels: bool,
        max_batches: int | None,
        progress: bool,
        desc: str,
    ) -> tuple[dict[str, Tensor], FeatureSet]:
        batchwise = {n: s for n, s in instances.items() if s.requires & _BATCHWISE}
        cached = {n: s for n, s in instances.items() if n not in batchwise}
        needs = set().union(*(s.requires for s in cached.values())) if cached else set()
        keep = {"logits"} | (needs & {"features"}) | ({"labels"} if with_labels else set())
        with _eval_mode(self.model):
            data = collect_features(
                self.feature_extractor,
                loader,
                keep=keep,
                per_batch={n: s.score for n, s in batchwise.items()},
                need_maps=any("feature_maps" in s.requires for s in batchwise.values()),
                device=model_device(self.model),
                store_device=model_device(self.model),  # the scores read it there
                max_batches=max_batches,
                progress=progress,
                desc=desc,
            )
            out = {}
            with torch.no_grad():
                for name, instance in instances.items():
                    if name in batchwise:
                        out[name] = data.extra[name]
                    else:
                        out[name] = _check_output(name, instance.score(data), len(data))
        return out, data

    def evaluate(
        self,
        id_loader: Iterable,
        ood_loaders: Mapping[str, Iterable] | Iterable,
        scores: ScoreSpecs | None = None,
        *,
        fit_loader: Iterable | None = None,
        positive: Positive = "id",
        tpr: float = 0.95,
        max_batches: int | None = None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ) -> EvaluationResults:
        """Score an ID test set and OOD sets with many detectors; compute the metrics.

        Each data set goes through the model once; every detector reads that pass (ODIN adds
        its own forward/backward passes on the same batches).

        Args:
            id_loader: ID test data (``(images, labels)`` for the ID accuracy, or images).
            ood_loaders: ``{name: loader}``, or one loader (named ``"ood"``).
            scores: Names or :class:`OODScore` instances, or ``{label: score}`` to compare
                variants of one score in the same pass (results are keyed by the labels).
                Default: the constructor's ``score`` plus every score fitted with
                :meth:`fit_scores`.
            fit_loader: ID training data; when given, scores not fitted yet are fitted first.
            positive: FPR95 convention: ``"id"`` (default; fraction of OOD accepted when 95% of
                ID is kept, as in the Unleashing Mask paper) or ``"ood"`` (fraction of ID
                rejected when 95% of OOD is detected). See :mod:`oodunleash.evaluation.metrics`.
            tpr: True-positive rate of the FPR metric.
            max_batches: Use only this many batches of each loader.
            progress: Show progress bars.
            device: Move the model there first (default: where it is).

        Returns:
            :class:`~oodunleash.evaluation.results.EvaluationResults` (also stored as ``last_results``, the wrapper's ``last_results_``):
            ``.to_dict()`` is ``{score: {ood_name: {"auroc", "aupr_in", "aupr_out", "fpr95"},
            "average": {...}}, "id_accuracy": float}``.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> from oodunleash import OODUnleash
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
            >>> images, labels = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
            >>> id_data = DataLoader(TensorDataset(images, labels), batch_size=16)
            >>> noise = DataLoader(TensorDataset(5 * torch.randn(16, 1, 4, 4)), batch_size=16)
            >>> unleashed = OODUnleash(net).fit_scores(id_data, ["knn", "vim"], progress=False)
            >>> results = unleashed.evaluate(
            ...     id_data, {"noise": noise}, ["msp", "knn", "vim"], progress=False)
            >>> sorted(results.to_dict()["vim"]["noise"])
            ['aupr_in', 'aupr_out', 'auroc', 'fpr95']
            >>> unleashed.last_results_ is results
            True
        """
        if device is not None:
            self.model.to(device)
        oods = named_ood_loaders(ood_loaders)
        instances = self._instances(scores)
        if fit_loader is not None:
            unfitted = {n: s for n, s in instances.items() if not s.is_fitted}
            if unfitted:
                self.fit_scores(fit_loader, unfitted, max_batches=max_batches, progress=progress)
                instances = {n: self.fitted_scores.get(n, s) for n, s in instances.items()}
        self._check_ready(instances)

        common = {"max_batches": max_batches, "progress": progress}
        id_out, id_data = self._score_loader(
            id_loader, instances, with_labels=True, desc="ID", **common
        )
        ood_out = {
            name: self._score_loader(loader, instances, with_labels=False, desc=name, **common)[0]
            for name, loader in oods.items()
        }
        acc = None
        if id_data.labels is not None and id_data.logits is not None:
            acc = accuracy(id_data.logits, id_data.labels)
        results = EvaluationResults.from_scores(
            id_out,
            {s: {o: ood_out[o][s] for o in oods} for s in instances},
            id_accuracy=acc,
            positive=positive,
            tpr=tpr,
        )
        self.last_results = results
        return results
