"""What the benchmark runs: settings (model and training), ξ recipes and the fine-tune grid,
as typed dataclasses.

A fine-tune is a :class:`FineTune`: the method, how ξ is chosen (a :class:`TrainLossMultiple`
or a :class:`MaskedLoss`, or ``None`` for the plain cross-entropy control, which runs
``fit(flooding=False)``), the learning rate and epochs (the library's defaults unless given)
and, for UMAP, a :class:`UmapMask`. Its :attr:`FineTune.name` (e.g.
``"umap/train_x3/lr0.1/ep10/keep0.9/model/norms"``) keys the results; :func:`parse_finetune`
reads such names back (deprecated outside the command line).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

from torch import Tensor, nn

from oodunleash.bench.protocol import TensorLoader
from oodunleash.finetune.constraint import (
    DEFAULT_CONSTRAINT_FACTOR,
    estimate_loss_constraint,
    mean_cross_entropy,
)
from oodunleash.masks.layer_masks import select_layers
from oodunleash.wrapper import METHOD_DEFAULTS, OODUnleash

__all__ = [
    "MASKED_RECIPES",
    "REFERENCE_KEEP_RATIO",
    "FineTune",
    "MaskedLoss",
    "Setting",
    "TrainLossMultiple",
    "UmapMask",
    "default_grid",
    "from_name",
    "parse_finetune",
    "xi_candidates",
    "xi_value",
]

#: UMAP's keep ratio in a fine-tune name without ``/keep``: the reference's. Names keep their
#: meaning when a library default changes, because every option differing from the reference
#: is written in them.
REFERENCE_KEEP_RATIO = 0.8


# ------------------------------------------------------------------ ξ recipes
@dataclasses.dataclass(frozen=True)
class TrainLossMultiple:
    """ξ = ``factor`` x the final model's mean training cross-entropy (eval mode): the
    library's ``"relative"`` recipe."""

    factor: float

    @property
    def name(self) -> str:
        """``"train_x<factor>"``, e.g. ``"train_x3"``."""
        return f"train_x{self.factor:g}"


@dataclasses.dataclass(frozen=True)
class MaskedLoss:
    """ξ = the mean training cross-entropy of the final model with a mask keeping
    ``keep_ratio`` of every maskable layer (the paper's recipe), averaged over ``draws``.

    Args:
        name: How results call it (``"ref"``, ``"keep99"``, ...).
        keep_ratio: Fraction of each layer's weights the mask keeps.
        draws: Random masks averaged.
        init: ``"random"`` masks, or ``"magnitude"`` (prunes the smallest weights).
        dense_ends: Leave the first and last maskable layers (stem and head) dense.
    """

    name: str
    keep_ratio: float = 0.965
    draws: int = 1
    init: Literal["random", "magnitude"] = "random"
    dense_ends: bool = False

    def compute(
        self, model: nn.Module, loader: TensorLoader, seed: int, device: Any = None
    ) -> float:
        """This recipe's ξ for ``model`` (left unchanged) on its training ``loader``."""
        return estimate_loss_constraint(
            model,
            loader,
            device=device,
            keep_ratio=self.keep_ratio,
            exclude=_dense_ends(model) if self.dense_ends else None,
            init=self.init,
            draws=self.draws,
            seed=seed,
            progress=False,
        )


XiRecipe = TrainLossMultiple | MaskedLoss

#: The masked-model recipes the sweep computes for every run, by name.
MASKED_RECIPES: dict[str, MaskedLoss] = {
    r.name: r
    for r in (
        MaskedLoss("ref"),
        MaskedLoss("ref_avg3", draws=3),
        MaskedLoss("dense_ends", draws=3, dense_ends=True),
        MaskedLoss("keep99", keep_ratio=0.99, draws=3),
        MaskedLoss("magnitude", init="magnitude"),
    )
}
#: The multiples of the training loss stored with every run (any other is derived on demand).
STORED_MULTIPLES = (2, 3, 4, 8)


def _dense_ends(model: nn.Module) -> list[str]:
    """The first and last maskable layers (stem and head)."""
    names = list(select_layers(model))
    return [names[0], names[-1]]


def xi_candidates(
    model: nn.Module, loader: TensorLoader, seed: int, device: Any = None
) -> dict[str, float]:
    """Every stored ξ recipe's value for the trained ``model`` (left unchanged): the
    :data:`MASKED_RECIPES`, ``train_x2`` / ``x3`` / ``x4`` / ``x8``, and ``train_loss``.
    ``device``: where to run the model (default: where it is)."""
    train_loss = mean_cross_entropy(model, loader, device=device)
    out = {
        name: recipe.compute(model, loader, seed, device) for name, recipe in MASKED_RECIPES.items()
    }
    for k in STORED_MULTIPLES:
        out[TrainLossMultiple(k).name] = k * train_loss
    out["train_loss"] = train_loss
    return out


def xi_value(xis: dict[str, float], recipe: XiRecipe) -> float | None:
    """The ξ a recipe gives from a run's stored values: stored under its name, or (a multiple
    of the training loss) derived from ``train_loss``; ``None`` when ``xis`` has neither."""
    if recipe.name in xis:
        return xis[recipe.name]
    if isinstance(recipe, TrainLossMultiple) and "train_loss" in xis:
        return recipe.factor * xis["train_loss"]
    return None


def xi_recipe(name: str) -> XiRecipe:
    """The recipe a results name stands for: ``"train_x<k>"`` or a :data:`MASKED_RECIPES`
    key."""
    if name in MASKED_RECIPES:
        return MASKED_RECIPES[name]
    factor = name.removeprefix("train_x")
    try:
        if factor != name:
            return TrainLossMultiple(float(factor))
    except ValueError:
        pass
    raise ValueError(
        f"Unknown ξ recipe {name!r}: use train_x<k> (k x the training loss) or one of "
        f"{sorted(MASKED_RECIPES)}."
    )


# ------------------------------------------------------------------ fine-tunes
@dataclasses.dataclass(frozen=True)
class UmapMask:
    """UMAP's mask options. The defaults are the reference's (keep 80% of every layer, norms
    frozen); :meth:`library_default` gives :data:`~oodunleash.wrapper.METHOD_DEFAULTS`'.

    Args:
        keep_ratio: Fraction of the masked weights kept.
        mode: ``"layer"`` (each layer keeps ``keep_ratio``) or ``"model"`` (one threshold).
        init: Initial scores, ``"random"`` or ``"magnitude"``.
        layers: Masked layers: ``"all"``, all but the first and last (``"ends"``), the last
            only (``"head"``) or the first only (``"stem"``).
        train_norms: Also train the normalisation layers' scale and shift.
    """

    keep_ratio: float = REFERENCE_KEEP_RATIO
    mode: Literal["layer", "model"] = "layer"
    init: Literal["random", "magnitude"] = "random"
    layers: Literal["all", "ends", "head", "stem"] = "all"
    train_norms: bool = False

    def __post_init__(self) -> None:
        if self.layers not in ("all", "ends", "head", "stem"):
            raise ValueError(
                f"layers must be 'all', 'ends', 'head' or 'stem', got {self.layers!r}."
            )
        if self.mode not in ("layer", "model"):
            raise ValueError(f"mode must be 'layer' or 'model', got {self.mode!r}.")

    @classmethod
    def library_default(cls) -> UmapMask:
        """The mask :class:`~oodunleash.OODUnleash` uses for UMAP by default."""
        defaults = METHOD_DEFAULTS["umap"]
        return cls(
            keep_ratio=defaults["keep_ratio"],
            mode=defaults["mask_mode"],
            train_norms=defaults["train_norms"],
        )

    def exclude(self, model: nn.Module) -> list[str] | None:
        """The layers of ``model`` left unmasked (``None``: none)."""
        if self.layers == "all":
            return None
        if self.layers == "ends":
            return _dense_ends(model)
        names = list(select_layers(model))
        return names[:-1] if self.layers == "head" else names[1:]

    @property
    def suffix(self) -> str:
        """The name's options, e.g. ``"/keep0.9/model/norms"``."""
        parts = ["mag"] if self.init == "magnitude" else []
        if self.keep_ratio != REFERENCE_KEEP_RATIO:
            parts.append(f"keep{self.keep_ratio:g}")
        if self.layers != "all":
            parts.append(self.layers)
        if self.mode == "model":
            parts.append("model")
        if self.train_norms:
            parts.append("norms")
        return "".join(f"/{p}" for p in parts)


@dataclasses.dataclass(frozen=True)
class FineTune:
    """One fine-tune from the final checkpoint.

    Args:
        method: ``"um"`` or ``"umap"``.
        xi: How ξ is chosen; ``None`` is the control: the same fine-tune with plain
            cross-entropy, ``fit(flooding=False)``.
        lr, epochs: ``None``: the library's default for the method.
        mask: UMAP's mask (``None``: the library's default); UM takes none.
    """

    method: Literal["um", "umap"]
    xi: XiRecipe | None
    lr: float | None = None
    epochs: int | None = None
    mask: UmapMask | None = None

    def __post_init__(self) -> None:
        if self.method not in METHOD_DEFAULTS:
            raise ValueError(f"method must be 'um' or 'umap', got {self.method!r}.")
        if self.mask is not None and self.method != "umap":
            raise ValueError(
                f"mask options are UMAP's; {self.method!r} fine-tunes every weight. Drop "
                f"'{self.mask.suffix.lstrip('/') or 'mask'}' or use method 'umap'."
            )

    @property
    def is_control(self) -> bool:
        """Whether this is a plain cross-entropy control (no ξ)."""
        return self.xi is None

    def resolved(self) -> FineTune:
        """This fine-tune with the library's defaults written in."""
        defaults = METHOD_DEFAULTS[self.method]
        mask = self.mask
        if self.method == "umap" and mask is None:
            mask = UmapMask.library_default()
        return dataclasses.replace(
            self,
            lr=defaults["lr"] if self.lr is None else self.lr,
            epochs=defaults["epochs"] if self.epochs is None else self.epochs,
            mask=mask,
        )

    @property
    def name(self) -> str:
        """A readable id that keys the results, e.g. ``"um/train_x3/lr0.01/ep10"`` or
        ``"umap/control/lr0.1/ep10/keep0.9/model/norms"``."""
        r = self.resolved()
        xi = "control" if r.xi is None else r.xi.name
        suffix = r.mask.suffix if r.mask is not None else ""
        return f"{r.method}/{xi}/lr{r.lr:g}/ep{r.epochs}{suffix}"

    @property
    def short_name(self) -> str:
        """:attr:`name` without the learning rate and epochs where they are the library's
        defaults for the method, for plot labels: ``"umap/train_x3/keep0.9"``."""
        defaults = METHOD_DEFAULTS[self.method]
        parts = self.name.split("/")
        drop = {f"lr{defaults['lr']:g}", f"ep{defaults['epochs']}"}
        return "/".join(parts[:2] + [p for p in parts[2:] if p not in drop])

    def control(self) -> FineTune:
        """The same fine-tune without the constraint (plain cross-entropy)."""
        return dataclasses.replace(self, xi=None)

    def to_dict(self) -> dict[str, Any]:
        """The flat record stored in the results as ``"config"``."""
        r = self.resolved()
        mask = r.mask or UmapMask()
        umap = r.mask is not None
        return {
            "method": r.method,
            "xi": "control" if r.xi is None else r.xi.name,
            "lr": r.lr,
            "epochs": r.epochs,
            "mask_init": mask.init,
            "keep_ratio": mask.keep_ratio if umap else None,
            "masked": mask.layers,
            "mask_mode": mask.mode,
            "train_norms": mask.train_norms,
        }

    def fit(
        self, model: nn.Module, train: tuple[Tensor, Tensor], xi: float | None, seed: int
    ) -> OODUnleash:
        """Run this fine-tune on ``model`` (in place) as the benchmark does: ``train`` images
        and labels in shuffled batches of 128 (seeded by ``seed + 1``), the given ξ (ignored
        by a control). Returns the fitted :class:`~oodunleash.OODUnleash`; UMAP's masks are
        still attached to ``model``."""
        r = self.resolved()
        options: dict[str, Any] = {}
        fit_options: dict[str, Any] = {}
        if r.mask is not None:
            options = {
                "exclude": r.mask.exclude(model),
                "mask_init": r.mask.init,
                "keep_ratio": r.mask.keep_ratio,
                "mask_mode": r.mask.mode,
            }
            fit_options["training"] = {"train_norms": r.mask.train_norms}
        if r.is_control:
            fit_options["flooding"] = False
        else:
            options["constraint"] = xi
        # The benchmark reads every score itself (protocol.evaluate_model); Energy as the
        # wrapper's default keeps fit from building a KNN bank it would not use.
        unleashed = OODUnleash(model, r.method, seed=seed, score="energy", **options)
        return unleashed.fit(
            TensorLoader(*train, 128, shuffle=True, seed=seed + 1),
            epochs=r.epochs,
            lr=r.lr,
            progress=False,
            **fit_options,
        )


def parse_finetune(name: str) -> FineTune:
    """Deprecated: the :class:`FineTune` a name such as ``"umap/train_x3/lr0.1/ep10/keep0.9"``
    stands for. Kept for one release for the command line's ``--grid``; build the dataclass
    instead, e.g. ``FineTune("umap", TrainLossMultiple(3), mask=UmapMask(keep_ratio=0.9))``.
    """
    warnings.warn(
        "Fine-tune name strings are deprecated; build oodunleash.bench.grid.FineTune "
        f"instead (this one: {from_name(name)!r}).",
        DeprecationWarning,
        stacklevel=2,
    )
    return from_name(name)


def from_name(name: str) -> FineTune:
    """The :class:`FineTune` a results name stands for (the inverse of
    :attr:`FineTune.name`), for reading results back."""
    method, xi, lr, epochs, *options = name.split("/")
    mask: dict[str, Any] = {}
    for option in options:
        if option == "mag":
            mask["init"] = "magnitude"
        elif option == "norms":
            mask["train_norms"] = True
        elif option == "model":
            mask["mode"] = "model"
        elif option.startswith("keep"):
            mask["keep_ratio"] = float(option.removeprefix("keep"))
        elif option in ("ends", "head", "stem"):
            mask["layers"] = option
        else:
            raise ValueError(
                f"Unknown option {option!r} in fine-tune {name!r}: use 'mag' (magnitude-"
                "initialised UMAP scores), 'keep<ratio>' (UMAP keep ratio, e.g. keep0.9), "
                "'ends' (UMAP leaves the first and last layer dense), 'head' or 'stem' (UMAP "
                "masks only the last or only the first layer), 'model' (one UMAP threshold "
                "for the whole model, mask_mode='model'), 'norms' (UMAP also trains the "
                "normalisation layers' scale and shift)."
            )
    if mask and method != "umap":
        raise ValueError(
            f"'/{'/'.join(options)}' are UMAP options; {method!r} fine-tunes every weight. "
            "Drop them or use method 'umap'."
        )
    return FineTune(
        method,  # type: ignore[arg-type]
        None if xi == "control" else xi_recipe(xi),
        float(lr.removeprefix("lr")),
        int(epochs.removeprefix("ep")),
        UmapMask(**mask) if method == "umap" else None,
    )


def default_grid(quick: bool = False) -> list[FineTune]:
    """The fine-tunes the sweep runs for every setting and seed, most important first (a run
    with a deadline skips the tail of the list): the library's defaults and their controls,
    then the variants measured in ``docs/benchmarks.md``."""
    default_xi = TrainLossMultiple(DEFAULT_CONSTRAINT_FACTOR)
    if quick:
        return [
            FineTune("um", None, epochs=1),
            FineTune("um", default_xi, epochs=1),
            FineTune("umap", None, epochs=1),
            FineTune("umap", default_xi, epochs=1),
        ]
    x2, x4, x8 = (TrainLossMultiple(k) for k in (2, 4, 8))
    reference, keep90 = UmapMask(), UmapMask(keep_ratio=0.9)
    magnitude = UmapMask(init="magnitude")
    ref, dense_ends = MASKED_RECIPES["ref"], MASKED_RECIPES["dense_ends"]
    return [
        # the library defaults and their controls
        FineTune("um", None),
        FineTune("um", default_xi),
        FineTune("umap", None),
        FineTune("umap", default_xi),
        # the reference's UMAP: keep 80% of each layer, norms frozen
        FineTune("umap", None, mask=reference),
        FineTune("umap", default_xi, mask=reference),
        # UMAP keeping 90% of each layer
        FineTune("umap", None, mask=keep90),
        FineTune("umap", default_xi, mask=keep90),
        FineTune("umap", TrainLossMultiple(2.5), mask=keep90),
        # other multiples of the training loss
        FineTune("um", x2),
        FineTune("um", x4),
        FineTune("umap", x2, mask=reference),
        FineTune("umap", x4, mask=reference),
        # the paper's recipe: a random mask keeping 96.5% of every layer
        FineTune("um", ref),
        FineTune("umap", ref, mask=reference),
        # UMAP starting from a magnitude mask instead of a random one
        FineTune("umap", None, mask=magnitude),
        FineTune("umap", default_xi, mask=magnitude),
        # a higher fine-tune learning rate
        FineTune("um", None, lr=0.05),
        FineTune("um", default_xi, lr=0.05),
        # the other masked-model ξ recipes
        FineTune("um", dense_ends),
        FineTune("umap", dense_ends, mask=reference),
        FineTune("um", MASKED_RECIPES["keep99"]),
        FineTune("um", MASKED_RECIPES["magnitude"]),
        FineTune("um", x8),
    ]


@dataclasses.dataclass(frozen=True)
class Setting:
    """A model and how it is trained: ``"small_cnn"``, ``"resnet18"``, with optional
    ``:noise=0.2`` (symmetric label noise on the training labels) and ``:epochs=N``."""

    model: str
    epochs: int
    label_noise: float = 0.0
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Setting:
        """Read ``"model[:noise=R][:epochs=N]"``; ResNet-18 trains 20 epochs, others 25."""
        model, *opts = spec.split(":")
        kwargs: dict[str, Any] = {"epochs": {"resnet18": 20}.get(model, 25)}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "noise":
                kwargs["label_noise"] = float(value)
            elif key == "epochs":
                kwargs["epochs"] = int(value)
            else:
                raise ValueError(f"Unknown option {key!r} in setting {spec!r}.")
        return cls(model=model, spec=spec, **kwargs)

    @property
    def tag(self) -> str:
        """The setting as a file name part: ``"small_cnn_noise0.2"``."""
        return self.spec.replace(":", "_").replace("=", "")
