"""`OODUnleash`: the object users hold. Wrap a classifier, fit, score, export."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from oodunleash import checkpoint, decision
from oodunleash.config import (
    METHOD_DEFAULTS,
    ConstraintSpec,
    Method,
    UnleashConfig,
    check_constraint,
)
from oodunleash.decision.methods import Decisions
from oodunleash.evaluation.evaluator import Evaluator, ScoreSpec, ScoreSpecs, evaluator_attribute
from oodunleash.evaluation.results import EvaluationResults
from oodunleash.features.collect import FeatureExtractor
from oodunleash.finetune import fitting
from oodunleash.finetune.loop import TrainingDivergedError
from oodunleash.finetune.rollback import RollbackCopy
from oodunleash.masks.layer_masks import (
    LayerMasks,
    LayerSelector,
    masked_parameters,
    select_layers,
    zero_fraction,
)
from oodunleash.runtime.distributed import is_main_process
from oodunleash.runtime.modules import model_device, unwrap_compiled
from oodunleash.scores import resolve_score

__all__ = ["METHOD_DEFAULTS", "NotCalibratedError", "NotFittedError", "OODUnleash"]

NotCalibratedError = decision.NotCalibratedError


class NotFittedError(ValueError, AttributeError):
    """Raised when a fitted attribute or method is used before :meth:`OODUnleash.fit`."""


class OODUnleash(Decisions):
    """Unleashing Mask for any image classifier.

    Args:
        model: Any ``nn.Module`` mapping an image batch to ``(batch, classes)`` logits: a timm
            model or your own. It is fine-tuned **in place** (``unleashed.model is model``);
            call :meth:`export` for an independent copy.
        method: ``"um"`` fine-tunes the weights; ``"umap"`` freezes them and learns a pruning
            mask (the result is a sparse model).
        layers, exclude: Which layers are masked, as name globs (``"layer4.*"``) and/or module
            types. Default: every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included).
        keep_ratio: UMAP only: fraction of the chosen weights kept (default 0.9; the reference
            keeps 0.8 of each layer).
        mask_mode: UMAP only: ``"model"`` (default: one threshold over all chosen layers on
            per-layer standardised scores, so layers may keep different shares) or
            ``"layer"`` (each layer keeps ``keep_ratio``, as the reference does).
        mask_init: UMAP only: initial scores, ``"random"`` (default, the reference) or
            ``"magnitude"``; also the mask :meth:`estimate_loss_constraint` draws.
        constraint: How :meth:`fit` sets ξ: a number (ξ itself);
            :class:`~oodunleash.config.Relative` (``"relative"``, the default:
            ``Relative(factor=2.0)``, 2x the model's mean ID training cross-entropy); or
            :class:`~oodunleash.config.Masked` (``"masked"``: the paper's recipe,
            :meth:`estimate_loss_constraint`, ``Masked(keep_ratio=0.965)``). See
            ``docs/benchmarks.md`` for how they compare.
        score: Default OOD score of :meth:`score` and :meth:`evaluate` (see
            :func:`oodunleash.list_scores`). The default, ``"knn"``, was chosen on validation
            data (``docs/benchmarks.md``); it reads the ID training features, which :meth:`fit`
            collects in one more pass over its loader (:meth:`fit_scores` without a
            fine-tune). ``"energy"`` needs none.
        seed: Seeds the masks and the fine-tune; the same seed on CPU gives identical results.
        head: Name of the classifier head submodule (its input is the penultimate feature) for
            feature-based scores, when it cannot be found automatically (e.g. ``"fc"``).
        feature_layer: Name of the submodule whose output is the pre-pool feature map (ASH
            scores) on non-timm models, when it cannot be found automatically.

    The options are checked on construction (:class:`~oodunleash.config.UnleashConfig`);
    ``OODUnleash(model, **unleashed.get_params())`` builds an equal, unfitted wrapper.

    Attributes:
        loss_constraint_: After :meth:`fit`: the ξ used (``None`` after
            ``fit(flooding=False)``).
        history_: After :meth:`fit`: one dict per epoch (``loss``, ``ce``, ``accuracy``,
            ``frac_below_constraint``: the share of batches whose CE was below ξ, ...).
        masks_: After :meth:`fit`: the learnt :class:`~oodunleash.masks.layer_masks.LayerMasks` (UMAP
            only, else ``None``).
        train_config_: After :meth:`fit`: the :class:`~oodunleash.finetune.loop.TrainConfig` used.
        fitted_scores_: ``{name: OODScore}`` filled by :meth:`fit_scores` (reset by ``fit``).
        last_results_: The :class:`~oodunleash.evaluation.results.EvaluationResults` of the last
            :meth:`evaluate` call, or ``None``.
        calibration_: After :meth:`calibrate`: the :class:`~oodunleash.decision.Calibration`
            (the default score on held-out ID images) that :meth:`predict` reads, else
            ``None`` (reset by ``fit``).
        preprocessing: The data config the model was trained with (``input_size``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``), or ``None``: how image files and PIL
            images are turned into tensors, and what :meth:`save_pretrained` records.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))),
        ...                   batch_size=16)
        >>> unleashed = OODUnleash(net, method="um", constraint=0.5).fit(data, epochs=1,
        ...                                                              progress=False)
        >>> unleashed.score(torch.randn(5, 1, 4, 4)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method = "um",
        *,
        layers: LayerSelector | None = None,
        exclude: LayerSelector | None = None,
        keep_ratio: float | None = None,
        mask_mode: Literal["layer", "model"] | None = None,
        mask_init: Literal["random", "magnitude"] | None = None,
        constraint: ConstraintSpec = "relative",
        score: ScoreSpec = "knn",
        seed: int = 0,
        head: str | None = None,
        feature_layer: str | None = None,
    ) -> None:
        fitting.check_model(model)
        config = UnleashConfig(
            method, layers, exclude, keep_ratio, mask_mode, mask_init, constraint, score, seed,
            head, feature_layer,
        ).resolve()  # fmt: skip
        self.model = model
        self._evaluator = Evaluator(model)
        config.set_attributes(self)  # self.method, self.layers, ..., self.feature_layer
        # Fail now, not after an epoch, when the selection is empty.
        plain = unwrap_compiled(model)  # names without torch.compile's `_orig_mod.` prefix
        try:
            self.layer_names: list[str] = list(select_layers(plain, layers, exclude))
        except ValueError:
            # UM masks nothing: a model with no Conv/Linear weight (functional parameters) is
            # fine-tuned all the same; the layers only define what sparsity() reports.
            if self.method != "um" or layers is not None or exclude is not None:
                raise
            self.layer_names = []
        self.masks_: LayerMasks | None = None
        self.calibration_: decision.Calibration | None = None
        self._preprocessing: dict[str, Any] | None = None

    # What scoring reads lives on the evaluator; the wrapper's names are views of it, settable.
    default_score = evaluator_attribute(
        "default_score",
        "The score :meth:`score` and :meth:`evaluate` use when none is named.",
        check=resolve_score,  # an unknown name fails when set, not when first scored
    )
    head = evaluator_attribute("head", "The classifier head's name, or ``None`` to find it.")
    feature_layer = evaluator_attribute(
        "feature_layer",
        "Name of the submodule giving the pre-pool feature map, or ``None`` to find it.",
    )
    fitted_scores_ = evaluator_attribute(
        "fitted_scores",
        "``{name: OODScore}`` filled by :meth:`fit_scores` (reset by :meth:`fit`).",
        convert=dict,
    )
    last_results_ = evaluator_attribute(
        "last_results", "The results of the last :meth:`evaluate` call, or ``None``."
    )

    @property
    def config(self) -> UnleashConfig:
        """The options as an :class:`~oodunleash.config.UnleashConfig` (checked again)."""
        return UnleashConfig.from_attributes(self)

    def get_params(self) -> dict[str, Any]:
        """The constructor's options, JSON-able: ``OODUnleash(model, **params)`` rebuilds an
        equal, unfitted wrapper (layers selected by module type are given by name).

        Example:
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
            >>> params = OODUnleash(net, "umap", keep_ratio=0.8).get_params()
            >>> params["keep_ratio"], params["mask_mode"]
            (0.8, 'model')
            >>> OODUnleash(net, **params).get_params() == params
            True
        """
        return self.config.to_dict(layer_names=self.layer_names)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return model_device(self.model)

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has completed."""
        return hasattr(self, "loss_constraint_")

    def _check_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This OODUnleash instance is not fitted yet: call .fit(train_loader) before "
                f"{what}."
            )

    def __repr__(self) -> str:
        if not self.is_fitted:
            state = "not fitted"
        elif self.loss_constraint_ is None:
            state = "fitted without flooding (control)"
        else:
            state = f"ξ={self.loss_constraint_:.4g}"
        keep = f"keep_ratio={self.keep_ratio}, " if self.method == "umap" else ""
        return (
            f"OODUnleash({type(self.model).__name__}, method={self.method!r}, "
            f"layers={len(self.layer_names)}, {keep}{state})"
        )

    def estimate_loss_constraint(
        self,
        loader: Iterable,
        keep_ratio: float | None = None,
        *,
        init: Literal["random", "magnitude"] | None = None,
        draws: int = 1,
        max_batches: int | None = None,
        progress: bool = True,
    ) -> float:
        """Estimate ξ by the paper's recipe: mean ID cross-entropy of the model with its chosen
        layers masked at ``keep_ratio`` (default: the ``Masked`` constraint's, else 0.965), in
        eval mode. The mask is drawn as ``init`` says (default: ``mask_init`` for UMAP,
        ``"random"`` for UM).

        The model is left unchanged. See :func:`oodunleash.finetune.constraint.estimate_loss_constraint`.
        Under ``torchrun`` the estimate covers all ranks' data (see :meth:`fit`).

        Example:
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = [(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,)))]
            >>> unleashed = OODUnleash(net)
            >>> xi = unleashed.estimate_loss_constraint(data, progress=False)
            >>> xi == unleashed.estimate_loss_constraint(data, progress=False)  # seeded masks
            True
        """
        return fitting.masked_constraint(
            self.model, self.config, loader, keep_ratio, masks=self.masks_, init=init,
            draws=draws, max_batches=max_batches, progress=progress,
        )  # fmt: skip

    def fit(
        self,
        loader: Iterable,
        epochs: int | None = None,
        lr: float | None = None,
        *,
        flooding: bool = True,
        training: Mapping[str, Any] | None = None,
        outlier_loader: Iterable | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
    ) -> OODUnleash:
        """Run the forgetting fine-tune on in-distribution data.

        All or nothing: if anything fails or interrupts the fit (an error, a divergence, a
        Ctrl-C), the model and this wrapper are put back exactly as they were before the call
        (weights, buffers, masks, train/eval modes, ``requires_grad``, fitted attributes). The
        copy that allows it lives in CPU memory, the size of the model's parameters and buffers.

        Args:
            loader: ID training data yielding ``(images, labels)``: a ``DataLoader`` or a list
                of batches (it is read several times, so not a generator).
            epochs: Fine-tune epochs (default 10).
            lr: Learning rate (default 0.01 for UM weights, 0.1 for UMAP scores).
            flooding: ``False`` runs the same fine-tune with plain cross-entropy and no ξ
                (``loss_constraint_`` is then ``None``): the control that a UM/UMAP result
                should be compared with, since a gain the control also gets is not UM's.
            training: How the fine-tune trains: a dict of
                :class:`~oodunleash.finetune.options.TrainConfig` options (``optimizer``,
                ``weight_decay``, ``schedule``, ``amp``, ``compile``, ``train_norms``,
                ``outlier_loss``, ...; each optional, with its default there), e.g.
                ``{"amp": True, "weight_decay": 0.0}``.
            outlier_loader: Auxiliary outliers for outlier exposure (labels ignored).
            device: Move the model there first (default: where it is).
            progress: Show tqdm progress bars and a one-line summary at the end.
            checkpoint_dir: Save a resumable state there after each epoch
                (:mod:`oodunleash.finetune.resume`; not with ``outlier_loader``).
            resume: Continue the fit saved in ``checkpoint_dir`` (a fresh fit if there is
                none yet); on CPU the result is bit-identical to an uninterrupted fit. The
                call must have the same options as the interrupted one.

        Returns:
            ``self``, fitted.

        Raises:
            TrainingDivergedError: The loss became NaN, infinite or exploded; the fit was
                rolled back.

        Under ``torchrun`` / ``accelerate launch`` the same call fits with
        DistributedDataParallel (``docs/howto/distributed.md``).

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = DataLoader(
            ...     TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))), batch_size=16)
            >>> unleashed = OODUnleash(net, constraint=0.5).fit(data, epochs=1, progress=False)
            >>> unleashed.is_fitted, unleashed.loss_constraint_, len(unleashed.history_)
            (True, 0.5, 1)
            >>> sorted(unleashed.history_[0])
            ['accuracy', 'ce', 'epoch', 'frac_below_constraint', 'loss', 'lr', 'time_s']

            (This toy's training loss is high: the default ξ, 2x it, would not be below ln(3) and
            ``fit`` would refuse it.) The plain fine-tune control needs no ξ:

            >>> control = OODUnleash(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
            >>> control.fit(data, epochs=1, flooding=False, progress=False).loss_constraint_ is None
            True
        """
        fitting.check_materialised(self.model)
        config, norm_params = fitting.fit_config(
            self.model, self.method, epochs, lr, training, loader, outlier_loader
        )
        saved = fitting.saved_fit_state(checkpoint_dir, resume, outlier_loader)
        started = time.perf_counter()
        rollback = RollbackCopy(self.model, owners=(self, self._evaluator))
        try:
            if self.masks_ is not None:  # refitting UMAP starts again from the dense weights
                self.masks_.detach()
                self.masks_ = None
            spec = check_constraint(self.constraint)
            xi, history, self.masks_ = fitting.run_fit(
                self.model, self.config, config, loader, outlier_loader=outlier_loader,
                constraint=spec if flooding else None, norm_params=norm_params,
                estimate_masked=self.estimate_loss_constraint, params=self.get_params(),
                device=device, progress=progress, checkpoint_dir=checkpoint_dir, saved=saved,
            )  # fmt: skip
            rollback.restore_modes()  # UMAP trains through a wrapper module; hand back the user's
            self.loss_constraint_ = xi
            self.history_ = history
            self.train_config_ = config
            self._evaluator.reset()  # fitted detectors describe the old features
            self.calibration_ = None  # and so does a calibration
            if resolve_score(self.default_score).needs_fit:  # KNN's bank: one more pass
                with torch.random.fork_rng(devices=[]):  # iterating a loader draws a seed
                    self._evaluator.fit_scores(loader, [self.default_score], progress=progress)
        except TrainingDivergedError as exc:
            rollback.restore()
            raise fitting.rolled_back(exc) from exc
        except BaseException:
            rollback.restore()
            raise
        if progress and is_main_process():
            print(fitting.summary(self.method, xi, history, time.perf_counter() - started))
        return self

    def export(self) -> nn.Module:
        """A plain copy of the unleashed model: same class as the input model, original
        ``state_dict`` keys, no mask machinery. UMAP masks are baked in (pruned weights are
        exact zeros). The wrapper itself is left as it is.

        Example:
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = [(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))] * 4
            >>> unleashed = OODUnleash(net, method="umap", keep_ratio=0.8, constraint=0.5)
            >>> plain = unleashed.fit(data, epochs=1, progress=False).export()
            >>> type(plain) is nn.Sequential, plain is net
            (True, False)
            >>> plain.state_dict().keys() == net.state_dict().keys()
            True
            >>> bool((plain[3].weight == 0).any())  # pruned weights are exact zeros
            True
        """
        self._check_fitted("export()")
        plain = unwrap_compiled(self.model)  # a torch.compile wrapper's own module
        if self.masks_ is not None:
            return self.masks_.baked_copy(plain)
        return copy.deepcopy(plain)

    def sparsity(self) -> float:
        """Fraction of zero weights over the chosen layers of the (exported) model."""
        plain = self.export() if self.masks_ is not None else unwrap_compiled(self.model)
        weights = masked_parameters(plain)  # layer name -> (module, parameter name)
        return zero_fraction(getattr(*weights[name]) for name in self.layer_names)

    @property
    def feature_extractor(self) -> FeatureExtractor:
        """The :class:`~oodunleash.features.collect.FeatureExtractor` reading this model."""
        return self._evaluator.feature_extractor

    def fit_scores(
        self, loader: Iterable, scores: ScoreSpecs | None = None, **options: Any
    ) -> OODUnleash:
        """Fit detectors on ID training data in one pass of the model; store them in
        ``fitted_scores_``; return ``self``. ``options`` (``max_batches``, ``progress``): see
        :meth:`oodunleash.evaluation.evaluator.Evaluator.fit_scores`. Refitting the default score
        drops the calibration, which described the old one."""
        calibrated = self.calibration_ and self.fitted_scores_.get(self.calibration_.score)
        self._evaluator.fit_scores(loader, scores, **options)
        if (
            calibrated is not None
            and self.fitted_scores_.get(self.calibration_.score) is not calibrated
        ):
            self.calibration_ = None
        return self

    def score(
        self,
        x: decision.ImageInput,
        score: ScoreSpec | None = None,
        *,
        batch_size: int = 64,
        progress: bool = False,
    ) -> Tensor:
        """OOD score of each image in ``x``: a 1-D tensor, higher = more in-distribution.

        ``x``: a preprocessed 4-D batch or 3-D image (scores come back on its device), or,
        scored in batches of ``batch_size`` (scores on the CPU): a path or a list of paths, a
        PIL image or a list of them (preprocessed as :attr:`preprocessing` says), or a
        ``DataLoader`` / iterable of batches. See
        :meth:`oodunleash.evaluation.evaluator.Evaluator.score`."""
        if isinstance(x, Tensor) and x.dim() in (3, 4):
            return self._evaluator.score(x if x.dim() == 4 else x.unsqueeze(0), score)
        return decision.score_inputs(self, x, score, batch_size=batch_size, progress=progress)

    def evaluate(
        self,
        id_loader: Iterable,
        ood_loaders: Mapping[str, Iterable] | Iterable,
        scores: ScoreSpecs | None = None,
        **options: Any,
    ) -> EvaluationResults:
        """Score an ID test set and OOD sets with many detectors; compute the metrics; store
        them in ``last_results_``. ``options`` (``fit_loader``, ``positive``, ``tpr``,
        ``max_batches``, ``progress``, ``device``): see
        :meth:`oodunleash.evaluation.evaluator.Evaluator.evaluate`."""
        return self._evaluator.evaluate(id_loader, ood_loaders, scores, **options)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, what: str, options: dict[str, Any]) -> checkpoint.WrapperState:
        if not self.is_fitted and not self.fitted_scores_:
            self._check_fitted(f"{what} (or fit_scores() for a post-hoc-only checkpoint)")
        checkpoint.record_known_preprocessing(self, options)  # recorded unasked
        return checkpoint.WrapperState.of(self, class_names=options.pop("class_names", None))

    def save_pretrained(
        self, save_directory: checkpoint.PathLike, **options: Any
    ) -> checkpoint.Path:
        """Write the checkpoint (weights, ξ, masks, fitted scores, calibration, results) to a
        folder, atomically, for a fitted or a post-hoc-only (``fit_scores``) wrapper; returns
        the folder. ``options``: see :func:`oodunleash.checkpoint.save_checkpoint` (the
        preprocessing ``input_size``/``mean``/``std``, default :attr:`preprocessing`;
        ``class_names``, ``overwrite``, ...).
        """
        state = self._checkpoint_state("save_pretrained()", options)
        folder = checkpoint.save_checkpoint(save_directory, self.model, state, **options)
        checkpoint.remember_preprocessing(self, options)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: checkpoint.PathLike,
        model: nn.Module | Callable[..., nn.Module] | None = None,
        **options: Any,
    ) -> OODUnleash:
        """Load a checkpoint folder or Hub repo, ready to score (fitted scores included).
        ``model``: for a custom architecture, the module or a factory (called with the
        recorded ``model_kwargs``); timm models are rebuilt from the checkpoint. ``options``:
        see :func:`oodunleash.checkpoint.load_checkpoint`."""
        loaded = checkpoint.load_checkpoint(repo_id_or_path, model, **options)
        try:
            unleashed = cls(loaded.model, **loaded.state.params)
        except (TypeError, ValueError) as exc:
            raise loaded.refused_params(exc) from exc
        loaded.state.restore(unleashed)
        return unleashed

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Save the checkpoint and upload it to a Hub model repo in one commit; returns the
        ``huggingface_hub`` ``CommitInfo`` (``None`` on ranks other than 0 under torchrun).
        ``options``: see :func:`oodunleash.checkpoint.push_checkpoint`."""
        state = self._checkpoint_state("push_to_hub()", options)
        info = checkpoint.push_checkpoint(repo_id, self.model, state, **options)
        checkpoint.remember_preprocessing(self, options)
        return info
