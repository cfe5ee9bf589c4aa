"""`OODUnleash`: the object users hold. Wrap a classifier, fit, score, export."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import checkpoint
from .constraint import (
    DEFAULT_CONSTRAINT_FACTOR,
    check_loss_constraint,
    estimate_loss_constraint,
    relative_loss_constraint,
)
from .distributed import init_distributed, rank, shard_loader, sync_module
from .evaluation import ScoringMixin
from .masking import LayerMasks, LayerSelector, check_keep_ratio, select_layers
from .training import TrainConfig, train

__all__ = ["METHOD_DEFAULTS", "NotFittedError", "OODUnleash"]

Method = Literal["um", "umap"]

#: Fine-tune defaults per method (see the benchmark page for how they were chosen). UMAP's
#: mask options differ from the reference (keep 80% of each layer, every weight frozen): on
#: the Fashion-MNIST benchmark that cost 1.3 points of ID accuracy, and keeping 90% under one
#: threshold for the whole model, with the normalisation layers trainable, cost 0.8.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "um": {
        "epochs": 10,
        "lr": 0.01,
        "weight_decay": 5e-4,
        "keep_ratio": 0.8,
        "mask_mode": "layer",
        "train_norms": False,
    },
    "umap": {
        "epochs": 10,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "keep_ratio": 0.9,
        "mask_mode": "model",
        "train_norms": True,
    },
}


class NotFittedError(ValueError, AttributeError):
    """Raised when a fitted attribute or method is used before :meth:`OODUnleash.fit`."""


class _MaskedNetwork(nn.Module):
    """Model and its mask scores in one module, so DDP synchronises the score gradients."""

    def __init__(self, model: nn.Module, masks: LayerMasks) -> None:
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


#: Normalisation layers whose affine parameters ``fit(train_norms=True)`` trains.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _norm_affine_parameters(model: nn.Module) -> tuple[list[nn.Parameter], int]:
    """The trainable scale and shift parameters of ``model``'s normalisation layers, and how
    many such parameters the caller froze (``requires_grad=False``): those stay frozen, as
    UM leaves them."""
    params = [
        p
        for m in model.modules()
        if isinstance(m, _NORM_TYPES)
        for p in m.parameters(recurse=False)
    ]
    trainable = [p for p in params if p.requires_grad]
    return trainable, len(params) - len(trainable)


class OODUnleash(ScoringMixin):
    """Unleashing Mask for any image classifier.

    Args:
        model: Any ``nn.Module`` mapping an image batch to ``(batch, classes)`` logits: a timm
            model or your own. It is fine-tuned **in place** (``unleashed.model is model``);
            call :meth:`export` for an independent copy.
        method: ``"um"`` fine-tunes the weights; ``"umap"`` freezes them and learns a pruning
            mask (the result is a sparse model).
        layers, exclude: Which layers are masked, as name globs (``"layer4.*"``) and/or module
            types. Default: every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included).
        keep_ratio: UMAP: fraction of the chosen weights kept (default 0.9; the reference keeps
            0.8 of each layer).
        mask_mode: ``"model"`` (UMAP's default: one threshold over all chosen layers on
            per-layer standardised scores, so layers may keep different shares) or
            ``"layer"`` (each layer keeps ``keep_ratio``, as the reference does).
        mask_init: Initial UMAP scores, ``"random"`` (reference) or ``"magnitude"``.
        constraint: How :meth:`fit` sets ξ when none is given. ``"relative"`` (default):
            ``constraint_factor`` x the model's mean ID training cross-entropy.
            ``"masked"``: the paper's recipe, :meth:`estimate_loss_constraint` (the mean
            training CE with a random ``1 - constraint_keep_ratio`` of each chosen layer
            masked). The benchmark (``docs/benchmarks.md``) found the paper's recipe 20-26x the
            training loss on small models, where it wrecked accuracy.
        constraint_factor: See ``constraint`` (default 3).
        constraint_keep_ratio: Keep ratio of the random mask that estimates ξ (reference 0.965).
        score: Default OOD score used by :meth:`score` (see :func:`oodunleash.list_scores`).
        seed: Seeds the masks and the fine-tune; the same seed on CPU gives identical results.
        head: Name of the classifier head submodule (its input is the penultimate feature) for
            feature-based scores, when it cannot be found automatically (e.g. ``"fc"``).
        feature_layer: Name of the submodule whose output is the pre-pool feature map (ASH
            scores) on non-timm models, when it cannot be found automatically.

    Attributes:
        loss_constraint_: After :meth:`fit`: the ξ used (``None`` after
            ``fit(flooding=False)``).
        history_: After :meth:`fit`: one dict per epoch: ``loss``, ``ce``, ``accuracy``,
            ``frac_below_constraint`` (fraction of batches whose CE was below ξ), ``lr``,
            ``time_s``.
        masks_: After :meth:`fit`: the learnt :class:`~oodunleash.masking.LayerMasks` (UMAP
            only, else ``None``).
        train_config_: After :meth:`fit`: the :class:`~oodunleash.training.TrainConfig` used.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
        >>> data = DataLoader(TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))),
        ...                   batch_size=16)
        >>> unleashed = OODUnleash(net, method="um").fit(data, epochs=1, loss_constraint=0.5,
        ...                                                progress=False)
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
        mask_init: Literal["random", "magnitude"] = "random",
        constraint: Literal["relative", "masked"] = "relative",
        constraint_factor: float = DEFAULT_CONSTRAINT_FACTOR,
        constraint_keep_ratio: float = 0.965,
        score: str = "energy",
        seed: int = 0,
        head: str | None = None,
        feature_layer: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module classifier, got {type(model).__name__}."
            )
        if any("_oodunleash_mask" in m.__dict__ for m in model.modules()):
            raise ValueError(
                "This model still carries the UMAP mask of another OODUnleash. Wrap a plain "
                "copy instead: OODUnleash(other.export(), ...)."
            )
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"method must be 'um' or 'umap', got {method!r}.")
        self.model = model
        self.method: Method = method
        self.layers = layers
        self.exclude = exclude
        self.keep_ratio = check_keep_ratio(
            METHOD_DEFAULTS[method]["keep_ratio"] if keep_ratio is None else keep_ratio
        )
        if mask_mode is None:
            mask_mode = METHOD_DEFAULTS[method]["mask_mode"]
        if mask_mode not in ("layer", "model"):
            raise ValueError(f"mask_mode must be 'layer' or 'model', got {mask_mode!r}.")
        if mask_init not in ("random", "magnitude"):
            raise ValueError(f"mask_init must be 'random' or 'magnitude', got {mask_init!r}.")
        self.mask_mode = mask_mode
        self.mask_init = mask_init
        if constraint not in ("relative", "masked"):
            raise ValueError(f"constraint must be 'relative' or 'masked', got {constraint!r}.")
        self.constraint = constraint
        self.constraint_factor = constraint_factor
        self.constraint_keep_ratio = check_keep_ratio(constraint_keep_ratio)
        self.default_score = score
        self.seed = seed
        self.head = head
        self.feature_layer = feature_layer
        # Fail now, not after an epoch, when the selection is empty.
        self.layer_names: list[str] = list(select_layers(model, layers, exclude))
        self.masks_: LayerMasks | None = None
        self._init_scoring()

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

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
        return (
            f"OODUnleash({type(self.model).__name__}, method={self.method!r}, "
            f"layers={len(self.layer_names)}, keep_ratio={self.keep_ratio}, {state})"
        )

    # ------------------------------------------------------------------ ξ
    def estimate_loss_constraint(
        self,
        loader: Iterable,
        keep_ratio: float | None = None,
        *,
        init: Literal["random", "magnitude"] = "random",
        draws: int = 1,
        max_batches: int | None = None,
        progress: bool = True,
    ) -> float:
        """Estimate ξ: mean ID cross-entropy of the model with its chosen layers masked at
        ``keep_ratio`` (default: ``constraint_keep_ratio``, 0.965), in eval mode.

        The model is left unchanged. See :func:`oodunleash.constraint.estimate_loss_constraint`.
        Under ``torchrun`` the estimate covers all ranks' data (see :meth:`fit`).

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = DataLoader(
            ...     TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))), batch_size=16)
            >>> unleashed = OODUnleash(net)
            >>> xi = unleashed.estimate_loss_constraint(data, progress=False)
            >>> isinstance(xi, float), xi > 0
            (True, True)
            >>> xi == unleashed.estimate_loss_constraint(data, progress=False)  # seeded masks
            True

            On a trained model, pass it on with ``fit(loader, loss_constraint=xi)`` (or construct
            with ``constraint="masked"``). This untrained toy's ξ is not below ln(3), so
            :meth:`fit` would refuse it.
        """
        init_distributed()
        loader = shard_loader(loader)
        if self.masks_ is not None and self.masks_.is_attached:
            raise RuntimeError(
                "The model carries a learnt UMAP mask; estimate ξ on the original model: "
                "OODUnleash(original_model).estimate_loss_constraint(...)."
            )
        return estimate_loss_constraint(
            self.model,
            loader,
            self.constraint_keep_ratio if keep_ratio is None else keep_ratio,
            layers=self.layers,
            exclude=self.exclude,
            init=init,
            draws=draws,
            seed=self.seed,
            max_batches=max_batches,
            progress=progress,
        )

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        loader: Iterable,
        epochs: int | None = None,
        lr: float | None = None,
        loss_constraint: float | None = None,
        *,
        flooding: bool = True,
        optimizer: Any = "sgd",
        momentum: float = 0.9,
        weight_decay: float | None = None,
        schedule: Any = "cosine",
        amp: bool = False,
        max_grad_norm: float | None = None,
        freeze_norm_stats: bool = False,
        train_norms: bool | None = None,
        outlier_loader: Iterable | None = None,
        outlier_loss: Literal["oe", "energy"] | None = None,
        outlier_weight: float | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> OODUnleash:
        """Run the forgetting fine-tune on in-distribution data.

        Args:
            loader: ID training data yielding ``(images, labels)``.
            epochs: Fine-tune epochs (default 10).
            lr: Learning rate (default 0.01 for UM weights, 0.1 for UMAP scores).
            loss_constraint: ξ. ``None`` sets it by the ``constraint`` recipe (default: 3x the
                model's training loss). It must stay below ``ln(classes)``, the loss of a
                uniform guess: flooding above that trains the model to be wrong.
            flooding: ``False`` runs the same fine-tune with plain cross-entropy and no ξ
                (``loss_constraint_`` is then ``None``): the control that a UM/UMAP result
                should be compared with, since a gain the control also gets is not UM's.
            optimizer: ``"sgd"`` (momentum 0.9, Nesterov), ``"adam"``, ``"adamw"`` or a
                callable ``params -> Optimizer``.
            momentum: SGD momentum.
            weight_decay: Default 5e-4.
            schedule: ``"cosine"`` (per step, to zero), ``"constant"`` or a callable
                ``(optimizer, total_steps) -> scheduler``.
            amp: Mixed precision (float16 on CUDA, bfloat16 on CPU).
            max_grad_norm: Clip gradients to this norm.
            freeze_norm_stats: Keep BatchNorm running statistics fixed during the fine-tune
                (UMAP otherwise moves them although the weights are frozen).
            train_norms: UMAP: also train the affine parameters (scale and shift) of the
                normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...) with the scores.
                Default: on for UMAP when the model has such layers. Parameters you froze
                (``requires_grad=False``) stay frozen, as with UM. The reference freezes
                every weight (``False``); the benchmark page reports what this changes. UM
                trains them anyway, so it refuses ``True``.
            outlier_loader: Auxiliary outliers for outlier exposure (labels ignored).
            outlier_loss: ``"oe"`` (weight 0.5) or ``"energy"`` (Energy-OE, margins −25/−7,
                weight 0.1). Default ``"oe"`` when an outlier loader is given.
            outlier_weight: Weight of the outlier term.
            device: Move the model there first (default: where it is).
            progress: Show tqdm progress bars.

        Returns:
            ``self``, fitted.

        Under ``torchrun`` / ``accelerate launch`` the same call fits with
        DistributedDataParallel: the process group is started from the environment if needed, a
        plain ``DataLoader`` is given a ``DistributedSampler`` (``batch_size`` is then per rank),
        ξ is averaged over all ranks' data, only rank 0 shows progress, and the flooding term
        ``|CE − ξ|`` is taken per rank on its own batch. See ``docs/howto/distributed.md``.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = DataLoader(
            ...     TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))), batch_size=16)
            >>> unleashed = OODUnleash(net).fit(data, epochs=1, loss_constraint=0.5, progress=False)
            >>> unleashed.is_fitted, unleashed.loss_constraint_, len(unleashed.history_)
            (True, 0.5, 1)
            >>> sorted(unleashed.history_[0])
            ['accuracy', 'ce', 'epoch', 'frac_below_constraint', 'loss', 'lr', 'time_s']

            This untrained toy has a high training loss: the default ξ (3x that loss) would not be
            below ln(3) ≈ 1.10 and ``fit`` would refuse it, hence the explicit ξ above. The plain
            fine-tune control needs no ξ:

            >>> control = OODUnleash(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
            >>> control.fit(data, epochs=1, flooding=False, progress=False).loss_constraint_ is None
            True
        """
        defaults = METHOD_DEFAULTS[self.method]
        if train_norms and self.method != "umap":
            raise ValueError(
                "train_norms applies to UMAP, which freezes the weights; UM already trains "
                "every parameter, normalisation layers included. Drop train_norms, or use "
                "method='umap'."
            )
        norm_params, frozen_norms = _norm_affine_parameters(self.model)
        if train_norms and not norm_params:
            if frozen_norms:
                raise ValueError(
                    f"train_norms=True, but all {frozen_norms} scale/shift parameters of the "
                    "model's normalisation layers have requires_grad=False, and fit leaves "
                    "frozen parameters frozen. Unfreeze the ones to train "
                    "(param.requires_grad_(True)), or drop train_norms."
                )
            raise ValueError(
                "train_norms=True, but the model has no normalisation layer with affine "
                "parameters (BatchNorm, LayerNorm, GroupNorm, ...): there is nothing to train "
                "besides the scores. Drop train_norms."
            )
        if train_norms is None:
            train_norms = defaults["train_norms"] and bool(norm_params)
        config = TrainConfig(
            epochs=defaults["epochs"] if epochs is None else epochs,
            lr=defaults["lr"] if lr is None else lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=defaults["weight_decay"] if weight_decay is None else weight_decay,
            schedule=schedule,
            amp=amp,
            max_grad_norm=max_grad_norm,
            freeze_norm_stats=freeze_norm_stats,
            train_norms=train_norms,
            outlier_loss=outlier_loss or ("oe" if outlier_loader is not None else None),
            outlier_weight=outlier_weight,
        )
        if loss_constraint is not None:
            if not flooding:
                raise ValueError(
                    "flooding=False runs plain cross-entropy, which has no ξ: drop "
                    "loss_constraint, or keep flooding=True."
                )
            loss_constraint = check_loss_constraint(loss_constraint)
        # Under torchrun / accelerate launch: join the process group, read one shard of the
        # data per rank, start every rank from rank 0's weights (docs/howto/distributed.md).
        init_distributed()
        if device is not None:
            self.model.to(device)
        sync_module(self.model)
        loader = shard_loader(loader)
        if outlier_loader is not None:
            outlier_loader = shard_loader(outlier_loader, name="outlier_loader")
        if self.masks_ is not None:  # refitting UMAP starts again from the dense weights
            self.masks_.detach()
            self.masks_ = None
        # Seed inside a fork so the whole fit (shuffling included) is reproducible without
        # touching the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            # Offset by the rank so that dropout differs between ranks (rank 0 = one process);
            # masks and ξ use their own seeded generators and agree on every rank.
            torch.manual_seed(self.seed + rank())
            if not flooding:
                xi = None
            elif loss_constraint is not None:
                xi = loss_constraint
            elif self.constraint == "masked":
                xi = self.estimate_loss_constraint(loader, progress=progress)
            else:
                xi = relative_loss_constraint(
                    self.model, loader, self.constraint_factor, progress=progress
                )
            run = functools.partial(
                train,
                loader=loader,
                loss_constraint=xi,
                config=config,
                device=self.device,
                outlier_loader=outlier_loader,
                progress=progress,
            )
            if self.method == "um":
                history = self._fit_um(run)
            else:
                history = self._fit_umap(run, norm_params if config.train_norms else [])
        self.loss_constraint_ = xi
        self.history_ = history
        self.train_config_ = config
        self._on_refit()
        return self

    def _fit_um(self, run: Callable[..., list[dict[str, float]]]) -> list[dict[str, float]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return run(self.model, params, desc="UM")

    def _fit_umap(
        self, run: Callable[..., list[dict[str, float]]], norm_params: list[nn.Parameter]
    ) -> list[dict[str, float]]:
        """Train the mask scores, and ``norm_params`` with them (the weights stay frozen)."""
        masks = LayerMasks(
            self.model,
            self.layers,
            self.exclude,
            keep_ratio=self.keep_ratio,
            mode=self.mask_mode,
            init=self.mask_init,
            seed=self.seed,
        )
        frozen = {p: p.requires_grad for p in self.model.parameters()}
        for p in frozen:
            p.requires_grad_(False)
        for p in norm_params:
            p.requires_grad_(True)
        masks.attach()
        try:
            params = list(masks.parameters()) + norm_params
            history = run(_MaskedNetwork(self.model, masks), params, desc="UMAP")
        except BaseException:
            masks.detach()  # never leave the user's model half-masked
            raise
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)
        self.masks_ = masks
        return history

    # ------------------------------------------------------------------ export
    def export(self) -> nn.Module:
        """A plain copy of the unleashed model: same class as the input model, original
        ``state_dict`` keys, no mask machinery. UMAP masks are baked in (pruned weights are
        exact zeros). The wrapper itself is left as it is.

        Example:
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> _ = torch.manual_seed(0)
            >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
            >>> data = DataLoader(
            ...     TensorDataset(torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))), batch_size=16)
            >>> unleashed = OODUnleash(net, method="umap", keep_ratio=0.8)
            >>> plain = unleashed.fit(data, epochs=1, loss_constraint=0.5, progress=False).export()
            >>> type(plain) is nn.Sequential, plain is net
            (True, False)
            >>> plain.state_dict().keys() == net.state_dict().keys()
            True
            >>> bool((plain[3].weight == 0).any())  # pruned weights are exact zeros
            True
        """
        self._check_fitted("export()")
        if self.masks_ is not None:
            return self.masks_.baked_copy(self.model)
        import copy

        return copy.deepcopy(self.model)

    def sparsity(self) -> float:
        """Fraction of zero weights over the chosen layers of the (exported) model."""
        plain = self.export() if self.masks_ is not None else self.model
        zeros = total = 0
        for name in self.layer_names:
            w = plain.get_submodule(name).weight
            zeros += int((w == 0).sum())
            total += w.numel()
        return zeros / max(total, 1)

    # ------------------------------------------------------------------ checkpoints
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able: ``OODUnleash(model, **params)`` rebuilds an
        unfitted copy (layers as their resolved names)."""
        return {
            "method": self.method,
            "layers": list(self.layer_names),
            "keep_ratio": self.keep_ratio,
            "mask_mode": self.mask_mode,
            "mask_init": self.mask_init,
            "constraint": self.constraint,
            "constraint_factor": self.constraint_factor,
            "constraint_keep_ratio": self.constraint_keep_ratio,
            "score": self.default_score,
            "seed": self.seed,
            "head": self.head,
            "feature_layer": self.feature_layer,
        }

    def _checkpoint_state(self, what: str) -> checkpoint.WrapperState:
        if not self.is_fitted and not self.fitted_scores_:
            self._check_fitted(f"{what} (or fit_scores() for a post-hoc-only checkpoint)")
        return checkpoint.WrapperState(
            params=self.get_params(),
            layer_names=list(self.layer_names),
            fitted=self.is_fitted,
            loss_constraint=getattr(self, "loss_constraint_", None),
            history=list(getattr(self, "history_", [])),
            train_config=getattr(self, "train_config_", None),
            masks=self.masks_,
            fitted_scores=dict(self.fitted_scores_),
            results=self.last_results_,
            class_names=getattr(self, "class_names", None),
        )

    def save_pretrained(
        self, save_directory: checkpoint.PathLike, **options: Any
    ) -> checkpoint.Path:
        """Write the checkpoint (weights, ξ, masks, fitted scores, results) to a folder,
        atomically; a fitted or a post-hoc-only (``fit_scores``) wrapper. Returns the folder.

        ``options`` (see :func:`oodunleash.checkpoint.save_checkpoint`): ``keep_masks``,
        ``model_kwargs``, ``class_names``, the preprocessing (``input_size``, ``mean``,
        ``std``, ``interpolation``, ``crop_pct`` or ``data_config``), model card metadata
        (``base_model``, ``datasets``, ``license``, ``card_data``, ``model_card``, ``repo_id``)
        and ``overwrite``.
        """
        state = self._checkpoint_state("save_pretrained()")
        if "class_names" in options:
            state.class_names = options.pop("class_names")
        return checkpoint.save_checkpoint(save_directory, self.model, state, **options)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: checkpoint.PathLike,
        model: nn.Module | Callable[..., nn.Module] | None = None,
        **options: Any,
    ) -> OODUnleash:
        """Load a checkpoint folder or Hub repo, ready to score (fitted scores included).

        ``model``: for a custom architecture, the module or a factory (called with the
        recorded ``model_kwargs``); timm models are rebuilt from the checkpoint. ``options``
        (see :func:`oodunleash.checkpoint.load_checkpoint`): ``revision``, ``token``,
        ``cache_dir``, ``force_download``, ``local_files_only``, ``device``, ``verify``.
        """
        loaded = checkpoint.load_checkpoint(repo_id_or_path, model, **options)
        state = loaded.state
        try:
            unleashed = cls(loaded.model, **state.params)
        except (TypeError, ValueError) as exc:
            raise loaded.refused_params(exc) from exc
        if state.fitted:
            unleashed.loss_constraint_ = state.loss_constraint
            unleashed.history_ = state.history
            if state.train_config is not None:
                unleashed.train_config_ = state.train_config
        unleashed.masks_ = None if state.masks is None else state.masks.attach()
        unleashed.fitted_scores_ = state.fitted_scores
        unleashed.last_results_ = state.results
        if state.class_names is not None:
            unleashed.class_names = state.class_names
        return unleashed

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Save the checkpoint and upload it to a Hub model repo in one commit; returns the
        ``huggingface_hub`` ``CommitInfo`` (``None`` on ranks other than 0 under torchrun).

        ``options``: ``token``, ``private``, ``revision``, ``commit_message``,
        ``commit_description``, ``create_pr``, ``save_directory`` (see
        :func:`oodunleash.checkpoint.push_checkpoint`) and those of :meth:`save_pretrained`.
        """
        state = self._checkpoint_state("push_to_hub()")
        if "class_names" in options:
            state.class_names = options.pop("class_names")
        return checkpoint.push_checkpoint(repo_id, self.model, state, **options)
