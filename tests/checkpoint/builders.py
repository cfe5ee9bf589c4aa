"""Models, data and comparisons shared by the checkpoint tests (and the kill-during-save worker,
which runs in a subprocess)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.scores import get_score
from tests.helpers.toys import ConvNet, labelled_loader, same_state

CLASS_NAMES = ["cat", "dog", "bird"]


class TinyNet(ConvNet):
    """A custom (non-timm) classifier: the path that needs model= on loading. A class of its
    own, with the keyword arguments a factory is called with, because checkpoints record both."""

    def __init__(self, num_classes: int = 3, width: int = 4) -> None:
        super().__init__(num_classes, channels=3, width=width)


def loader(n: int = 48, size: int = 16, seed: int = 0) -> DataLoader:
    """Colour images without a learnable signal: the checkpoint tests only fit to save."""
    return labelled_loader(n, size=size, seed=seed, channels=3, signal=False)


def ood_loader(n: int = 32, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.rand(n, 3, size, size, generator=g) * 4), batch_size=16)


def images() -> torch.Tensor:
    """A fixed batch to compare scores on."""
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(7))


#: Preprocessing of the tiny timm models (trained at 16 px, normalised to [-1, 1]).
PREPROCESSING = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def timm_um(scores: list[str], evaluate: bool = False) -> OODUnleash:
    """A fitted UM wrapper of a tiny timm model (its convolutions but the stem masked), with
    ``scores`` fitted and, with ``evaluate``, one evaluation recorded."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    unleashed = OODUnleash(
        model, "um", layers=nn.Conv2d, exclude="stem.*", score="energy", constraint=0.9
    )
    unleashed.fit(loader(), epochs=1, progress=False)
    unleashed.fit_scores(loader(), scores, progress=False)
    if evaluate:
        unleashed.evaluate(loader(seed=3), {"noise": ood_loader()}, scores, progress=False)
    return unleashed


def timm_umap(scores: list[str]) -> OODUnleash:
    """A fitted UMAP wrapper of a tiny timm model (layers ``layer*``, keep 0.7)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    unleashed = OODUnleash(model, "umap", layers="layer*", keep_ratio=0.7, seed=3, constraint=0.5)
    unleashed.fit(loader(), epochs=1, progress=False)
    if scores:
        unleashed.fit_scores(loader(), scores, progress=False)
    return unleashed


def custom_umap() -> OODUnleash:
    """A fitted model-wise UMAP wrapper of :class:`TinyNet` with Mahalanobis fitted."""
    torch.manual_seed(0)
    unleashed = OODUnleash(
        TinyNet(width=4), "umap", keep_ratio=0.6, mask_mode="model", constraint=0.8
    )
    unleashed.fit(loader(), epochs=1, progress=False)
    unleashed.fit_scores(loader(), ["mahalanobis"], progress=False)
    return unleashed


def tiny_umap(seed: int) -> OODUnleash:
    """A small fitted UMAP wrapper with a KNN score; the same ``seed`` gives the same wrapper."""
    torch.manual_seed(seed)
    unleashed = OODUnleash(TinyNet(), "umap", keep_ratio=0.6, seed=seed, constraint=0.5)
    unleashed.fit(loader(seed=seed), epochs=1, progress=False)
    unleashed.fit_scores(loader(seed=seed), ["knn"], progress=False)
    return unleashed


def assert_same_scoring(a: OODUnleash, b: OODUnleash, x: torch.Tensor) -> None:
    """``b`` (loaded) computes exactly what ``a`` (in memory) computes."""
    a.model.eval()
    b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    default = a.default_score if isinstance(a.default_score, str) else a.default_score.name
    if default in a.fitted_scores_:  # a fitted default (KNN): checked below against its state
        assert torch.equal(b.score(x), b.score(x, default))
    else:
        assert torch.equal(a.score(x), b.score(x))
    assert set(a.fitted_scores_) == set(b.fitted_scores_)
    for name, score in a.fitted_scores_.items():
        # A score's own state_dict may summarise (KNN saves a float16 bank): compare with the
        # score rebuilt from that state in memory, so any loss added by the checkpoint shows.
        reference = get_score(score.name, **score.get_config()).load_state_dict(score.state_dict())
        assert torch.equal(a.score(x, reference), b.score(x, name)), name
        assert same_state(b.fitted_scores_[name].state_dict(), score.state_dict()), name
