"""A catalogue of bad inputs and faults in reading models, data and scores.

Each case asserts the error type, that the message names the problem (``match=``), and that
nothing changed: the model's ``state_dict`` and train/eval mode, the wrapper's fitted scores
(names and fitted tensors), and the score or data objects handed in.

Categories:

* **model/data mismatch** (``MISMATCH``): integer images for a float model, a wrong channel
  count, an unbatched image, NaN/inf pixels, a wrong image size (custom CNN and a fixed-size
  timm ViT), NaN weights, outputs that hold no ``(batch, classes)`` logits; each through
  ``score``, ``fit_scores`` and ``evaluate`` of a wrapper that already has fitted scores (so a
  model read on good data still names the problem of a bad batch). Plus images on another
  device and a NaN batch after good ones.
* **heads** (``HEADS``): a ``head=`` or ``feature_layer=`` that does not exist, is not the head
  (a convolution, a hidden layer, a layer followed by more arithmetic, a layer that does not
  run, one head of a distilled timm model), a model without a linear head; each through the
  extractor and the wrapper.
* **loaders** (``LOADERS``): empty ID / OOD / fit loaders (named), a list or tuple of OOD
  loaders, an empty or badly named OOD mapping, batches that are not tensors, missing, one-hot,
  float or out-of-range labels.
* **score settings** (``SCORES``): out-of-range hyper-parameters of every configurable score,
  KNN with ``k`` larger than its bank, ViM with no residual space, unknown names and options,
  duplicate labels, unfitted scores, scores returning the wrong shape, mismatched state.
* **metrics** (``METRICS``): empty or non-finite scores, out-of-range ``tpr``, an unknown
  convention, mismatched predictions and labels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

from oodunleash import OODUnleash
from oodunleash.evaluation import metrics
from oodunleash.features.collect import FeatureExtractor, FeatureSet, LinearHead
from oodunleash.scores import (
    DICE,
    GEN,
    KNN,
    ODIN,
    OODScore,
    ReAct,
    ScoreNotFittedError,
    ViM,
    get_score,
    register_score,
)
from tests.helpers.toys import sequential_cnn

GEN_ = torch.Generator().manual_seed(0)


def cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return sequential_cnn(3, 6, classes, hidden=8).eval()


def sized_cnn() -> nn.Module:
    """A CNN whose Linear layer fixes the input size at 8x8."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 5)
    ).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=8, patch_size=4, depth=1
    ).eval()


def images(n: int = 8, size: int = 8, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=GEN_)


def labelled(n: int = 8, size: int = 8) -> list:
    return [(images(n, size), torch.arange(n) % 5)]


# --------------------------------------------------------------------------- snapshots
def snapshot(unleashed: OODUnleash) -> dict:
    """Everything a failed call must leave as it was."""
    model = unleashed.model
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "fitted": {
            name: {k: v.clone() for k, v in score.state_dict().items()}
            for name, score in unleashed.fitted_scores_.items()
        },
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["modes"] == after["modes"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(value, after["state"][key], rtol=0, atol=0, equal_nan=True)
    assert before["fitted"].keys() == after["fitted"].keys()
    for name, state in before["fitted"].items():
        assert state.keys() == after["fitted"][name].keys()
        for key, value in state.items():
            assert torch.equal(value, after["fitted"][name][key]), (name, key)


def fitted(model: nn.Module, size: int = 8, **options) -> OODUnleash:
    """A wrapper whose model was read on good data and whose KNN/ViM are fitted."""
    unleashed = OODUnleash(model, **options)
    unleashed.fit_scores(labelled(16, size), {"knn": KNN(k=3), "vim": "vim"}, progress=False)
    return unleashed


def run_entry(unleashed: OODUnleash, entry: str, data: torch.Tensor) -> None:
    """Hand ``data`` to one of the wrapper's entry points (KNN reads the features, once fitted)."""
    score = "knn" if unleashed.fitted_scores_ else "energy"
    if entry == "score":
        unleashed.score(data, score)
    elif entry == "fit_scores":
        unleashed.fit_scores([data], {"knn": KNN(k=3), "msp": "msp"}, progress=False)
    else:
        unleashed.evaluate([data], {"far": [images()]}, [score, "msp"], progress=False)


# --------------------------------------------------------------------------- mismatches
class Output(nn.Module):
    """The CNN with its logits returned as ``wrap(logits)``."""

    def __init__(self, wrap: Callable[[torch.Tensor], object]):
        super().__init__()
        self.net, self.wrap = cnn(), wrap
        self.eval()

    def forward(self, x):
        return self.wrap(self.net(x))


@dataclass
class Mismatch:
    model: Callable[[], nn.Module]
    data: Callable[[], torch.Tensor]
    error: type[Exception]
    match: str
    size: int = 8
    fit_first: bool = True


def _nan_image() -> torch.Tensor:
    x = images()
    x[3, 1, 2, 2] = float("nan")
    return x


def _inf_image() -> torch.Tensor:
    x = images()
    x[0, 0, 0, 0] = float("inf")
    return x


def _nan_weights() -> nn.Module:
    model = cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    return model


MISMATCH = {
    "uint8 images": Mismatch(
        cnn,
        lambda: torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8),
        TypeError,
        r"weights are torch.float32 but the images.*torch.uint8.*not floating point.*/ 255",
    ),
    "int64 images into a float64 model": Mismatch(
        lambda: cnn().double(),
        lambda: torch.ones(4, 3, 8, 8, dtype=torch.long),
        TypeError,
        r"weights are torch.float64 but the images.*torch.int64",
    ),
    "grayscale into RGB model": Mismatch(
        cnn,
        lambda: images(channels=1),
        ValueError,
        r"have 1 channels but the model's first layer '0' takes 3",
    ),
    "unbatched image": Mismatch(
        cnn,
        lambda: images(1)[0],
        ValueError,
        r"shape \(3, 8, 8\).*unbatched.*unsqueeze\(0\)",
    ),
    "NaN pixel": Mismatch(cnn, _nan_image, ValueError, r"contain 1 NaN/inf.*clean the data"),
    "inf pixel": Mismatch(cnn, _inf_image, ValueError, r"contain 1 NaN/inf.*clean the data"),
    "wrong size, custom CNN": Mismatch(
        sized_cnn,
        lambda: images(size=16),
        ValueError,
        r"Sequential failed on a batch of images of shape \(8, 3, 16, 16\).*float32 on cpu"
        r".*Torch said: mat1 and mat2",
    ),
    "wrong size, timm ViT": Mismatch(
        vit,
        lambda: images(size=16),
        ValueError,
        r"\(16, 16\) pixels but the model takes \(8, 8\).*img_size",
    ),
    "NaN weights": Mismatch(
        _nan_weights,
        images,
        ValueError,
        r"logits on the first batch contain .* NaN/inf.*weights",
        fit_first=False,
    ),
    "tuple output": Mismatch(
        lambda: Output(lambda z: (z, z.mean())),
        images,
        ValueError,
        r"returned tuple.*set_distilled_training",
        fit_first=False,
    ),
    "1-D output": Mismatch(
        lambda: Output(lambda z: z.sum(dim=1)),
        images,
        ValueError,
        r"logits of shape \(batch, classes\).*\(8,\)",
        fit_first=False,
    ),
    "dict output without logits": Mismatch(
        lambda: Output(lambda z: {"scores": z}),
        images,
        ValueError,
        r"with keys \['scores'\].*output_key",
        fit_first=False,
    ),
}


@pytest.mark.parametrize("entry", ["score", "fit_scores", "evaluate"])
@pytest.mark.parametrize("case", list(MISMATCH))
def test_model_data_mismatch_is_named(case, entry):
    spec = MISMATCH[case]
    if (case, entry) == ("unbatched image", "score"):
        pytest.skip("score() takes one 3-D image (tests/decision/test_inputs.py)")
    model = spec.model()
    unleashed = fitted(model, spec.size) if spec.fit_first else OODUnleash(model)
    data = spec.data()
    kept = data.clone()
    before = snapshot(unleashed)
    with pytest.raises(spec.error, match=spec.match) as err:
        run_entry(unleashed, entry, data)
    assert len(str(err.value)) < 600
    assert_same(before, snapshot(unleashed))
    assert torch.equal(data, kept) or torch.isnan(data).any()


def test_images_on_another_device_are_named():
    model = cnn().to("meta")
    data = images()
    with pytest.raises(ValueError, match=r"on cpu\) are not on the model's device meta"):
        FeatureExtractor(model)(data)


def test_nan_batch_after_good_batches_names_the_batch_and_keeps_fitted_scores():
    unleashed = fitted(cnn())
    bad = _nan_image()
    before = snapshot(unleashed)
    loader = [(images(), torch.arange(8) % 5), (bad, torch.arange(8) % 5)]
    with pytest.raises(ValueError, match=r"batch 1 of the 'fit scores' data: The images.*NaN"):
        unleashed.fit_scores(loader, {"knn": KNN(k=3), "vim": "vim"}, progress=False)
    assert_same(before, snapshot(unleashed))


# --------------------------------------------------------------------------- heads
class ScaledHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
        self.eval()

    def forward(self, x):
        return 2 * self.fc(self.body(x).mean((2, 3)))


class UnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.spare = cnn(), nn.Linear(8, 5)
        self.eval()

    def forward(self, x):
        return self.net(x)


def distilled() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=8,
        patch_size=4,
        depth=1,
    ).eval()


HEADS = {
    "head does not exist": (cnn, {"head": "fc"}, r"head='fc': the model has no submodule.*'6'"),
    "head is a convolution": (
        cnn,
        {"head": "0"},
        r"head='0' does not produce the model's output.*not the classifier head.*\['6'\]",
    ),
    "head is a hidden layer": (
        cnn,
        {"head": "4"},
        r"head='4' does not produce the model's output.*\['6'\]",
    ),
    "head followed by arithmetic": (
        ScaledHead,
        {"head": "fc"},
        r"head='fc' does not produce the model's output",
    ),
    "head does not run": (
        UnusedLayer,
        {"head": "spare"},
        r"head='spare' did not run.*'net.6'",
    ),
    "one head of a distilled model": (
        distilled,
        {"head": "head"},
        r"head='head' does not produce the model's output",
    ),
    "feature_layer does not exist": (
        cnn,
        {"feature_layer": "layer4"},
        r"feature_layer='layer4': the model has no submodule",
    ),
    "feature_layer is not the map": (
        cnn,
        {"feature_layer": "4", "maps": True},
        r"feature_layer='4' is not the pre-pool feature map",
    ),
    "no linear head": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        {},
        r"Could not find the classifier head.*\['2', '1'\].*head='name'",
    ),
}


@pytest.mark.parametrize("entry", ["extractor", "wrapper"])
@pytest.mark.parametrize("case", list(HEADS))
def test_wrong_head_is_refused(case, entry):
    make, options, match = HEADS[case]
    options = dict(options)
    maps = options.pop("maps", False)
    model = make()
    data = images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as err:
        if entry == "extractor":
            FeatureExtractor(model, **options)(data, maps=maps)
        else:
            OODUnleash(model, **options).score(data, "ash_s" if maps else "energy")
    assert len(str(err.value)) < 600
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A refused head leaves no hooks on the model.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- loaders
def _loaders(**kwargs):
    good = {"id": labelled(), "ood": {"far": [images()]}}
    return {**good, **kwargs}


LOADERS = {
    "empty OOD set": (
        "evaluate",
        _loaders(ood={"far": [images()], "svhn": []}),
        ValueError,
        r"'svhn' loader yielded no batches",
    ),
    "empty ID set": ("evaluate", _loaders(id=[]), ValueError, r"'ID' loader yielded no batches"),
    "empty fit set": ("fit", _loaders(id=[]), ValueError, r"'fit scores' loader yielded no"),
    "list of OOD loaders": (
        "evaluate",
        _loaders(
            ood=[torch.utils.data.DataLoader(images()), torch.utils.data.DataLoader(images())]
        ),
        TypeError,
        r"list of 2 loaders; pass a dict \{name: loader\}",
    ),
    "tuple of OOD loaders": (
        "evaluate",
        _loaders(ood=(torch.utils.data.DataLoader(images()),)),
        TypeError,
        r"tuple of 1 loaders; pass a dict",
    ),
    "empty OOD mapping": ("evaluate", _loaders(ood={}), ValueError, r"ood_loaders is empty"),
    "OOD names not strings": (
        "evaluate",
        _loaders(ood={0: [images()]}),
        TypeError,
        r"OOD set names must be non-empty strings",
    ),
    "batches of strings": (
        "fit",
        _loaders(id=["a", "b"]),
        TypeError,
        r"must yield \(images, labels\) batches of tensors; got str",
    ),
    "labels missing for Mahalanobis": (
        "fit",
        _loaders(id=[images()]),
        TypeError,
        r"must yield \(images, labels\) batches",
    ),
    "one-hot labels": (
        "fit",
        _loaders(id=[(images(), torch.eye(5)[torch.arange(8) % 5])]),
        TypeError,
        r"1-D tensor of class indices.*argmax",
    ),
    "float labels": (
        "evaluate",
        _loaders(id=[(images(), torch.zeros(8))]),
        TypeError,
        r"integer class indices, got dtype torch.float32",
    ),
    "ID labels out of range": (
        "evaluate",
        _loaders(id=[(images(), torch.arange(8))]),
        ValueError,
        r"batch 0 of the 'ID' data: Labels must lie in \[0, 5\).*0 to 7",
    ),
    "negative fit labels": (
        "fit",
        _loaders(id=[(images(), torch.arange(8) % 5 - 1)]),
        ValueError,
        r"'fit scores' data: Labels must lie in \[0, 5\).*-1 to 3",
    ),
}


@pytest.mark.parametrize("case", list(LOADERS))
def test_bad_loader_is_named(case):
    entry, loaders, error, match = LOADERS[case]
    unleashed = fitted(cnn())
    before = snapshot(unleashed)
    with pytest.raises(error, match=match):
        if entry == "fit":
            unleashed.fit_scores(
                loaders["id"], {"mahalanobis": "mahalanobis", "knn": KNN(k=3)}, progress=False
            )
        else:
            unleashed.evaluate(loaders["id"], loaders["ood"], ["knn", "msp"], progress=False)
    assert_same(before, snapshot(unleashed))


def test_labelled_scores_asked_for_by_label_keep_their_labels():
    """Not an error: variants fitted under labels come back under those labels."""
    unleashed = OODUnleash(cnn())
    unleashed.fit_scores(labelled(16), {"knn3": KNN(k=3), "knn5": KNN(k=5)}, progress=False)
    results = unleashed.evaluate(labelled(), {"far": [images()]}, ["knn3", "knn5"], progress=False)
    assert set(results.to_dict()) >= {"knn3", "knn5"} and "knn" not in results.to_dict()
    assert (results.id_scores["knn3"] != results.id_scores["knn5"]).any()


# --------------------------------------------------------------------------- score settings
def _train_set(n: int = 6, dim: int = 8) -> FeatureSet:
    feats = torch.rand(n, dim, generator=GEN_)
    return FeatureSet(
        logits=torch.randn(n, 3, generator=GEN_),
        features=feats,
        labels=torch.arange(n) % 3,
        head=LinearHead(torch.randn(3, dim, generator=GEN_), torch.zeros(3)),
    )


class WrongShape(OODScore):
    name = "wrong_shape_catalogue"
    requires = frozenset({"logits"})

    def score(self, data):
        return data.logits


SCORES = {
    "KNN k=0": (lambda: KNN(k=0), ValueError, r"k must be at least 1, got 0"),
    "KNN sample_fraction 0": (lambda: KNN(sample_fraction=0), ValueError, r"sample_fraction"),
    "KNN bank dtype": (lambda: KNN(bank_dtype="int8"), ValueError, r"bank_dtype must be"),
    "ViM dim too large": (
        lambda: ViM(dim=8).fit(_train_set()),
        ValueError,
        r"dim=8 leaves no residual space for 8-d features",
    ),
    "ViM dim 0": (lambda: ViM(dim=0), ValueError, r"dim must be a positive"),
    "ReAct percentile 100": (lambda: ReAct(100), ValueError, r"percentile must be in \[0, 100\)"),
    "DICE sparsity 1": (lambda: DICE(1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    "DICE mask of another head": (
        lambda: DICE().fit(_train_set(dim=8)).score(_train_set(dim=4)),
        ValueError,
        r"DICE mask \(3, 8\) does not fit this head \(3, 4\)",
    ),
    "energy temperature 0": (
        lambda: get_score("energy", temperature=0),
        ValueError,
        r"temperature must be positive",
    ),
    "GEN gamma 0": (lambda: GEN(gamma=0), ValueError, r"gamma must be positive"),
    "GEN top_m 0": (lambda: GEN(top_m=0), ValueError, r"top_m must be at least 1"),
    "ODIN epsilon negative": (lambda: ODIN(epsilon=-1), ValueError, r"epsilon must be non-neg"),
    "unknown score": (lambda: get_score("knnn"), ValueError, r"Unknown OOD score 'knnn'"),
    "unknown option": (
        lambda: get_score("knn", kk=3),
        TypeError,
        r"Bad configuration for the 'knn' score.*options are: k, sample_fraction",
    ),
    "unfitted KNN": (
        lambda: KNN().score(_train_set()),
        ScoreNotFittedError,
        r"'knn' score learns from in-distribution training data.*fit_scores",
    ),
    "missing features": (
        lambda: KNN().fit(FeatureSet(logits=torch.zeros(2, 3))),
        ValueError,
        r"'knn' score needs features",
    ),
    "state of another score": (
        lambda: KNN().load_state_dict({"means": torch.zeros(2)}),
        ValueError,
        r"State for the 'knn' score does not match",
    ),
    "register without requires": (
        lambda: register_score(lambda data: data.logits, name="no_requires_catalogue"),
        ValueError,
        r"needs requires=",
    ),
    "register a taken name": (
        lambda: register_score(KNN),
        ValueError,
        r"named 'knn' is already registered; pass overwrite=True",
    ),
    "register unknown requirement": (
        lambda: register_score(lambda data: data.logits, name="odd_catalogue", requires={"pixels"}),
        ValueError,
        r"requires unknown inputs \['pixels'\]",
    ),
}


@pytest.mark.parametrize(
    ("k", "fraction", "n", "match"),
    [
        (10, 1.0, 6, r"KNN k=10 exceeds the bank of 6 training features.*k <= 6"),
        (4, 0.5, 3, r"KNN k=4 exceeds the bank of 3"),
    ],
)
def test_knn_with_k_larger_than_its_bank_warns(k, fraction, n, match):
    knn = KNN(k=k, sample_fraction=fraction)
    with pytest.warns(UserWarning, match=match):
        knn.fit(_train_set(n))
    assert knn.get_config()["k"] == k and len(knn.bank) == n


@pytest.mark.parametrize("case", list(SCORES))
def test_bad_score_setting_is_named(case):
    make, error, match = SCORES[case]
    with pytest.raises(error, match=match):
        make()


def _wrapper_call(how: str):
    def run(unleashed):
        if how == "duplicate labels":
            unleashed.evaluate(labelled(), [images()], ["knn", KNN(k=3)], progress=False)
        elif how == "empty scores":
            unleashed.evaluate(labelled(), [images()], [], progress=False)
        elif how == "non-string label":
            unleashed.evaluate(labelled(), [images()], {3: "knn"}, progress=False)
        elif how == "score of wrong type":
            unleashed.score(images(), 3)
        elif how == "unfitted score":
            unleashed.score(images(), "mahalanobis")
        elif how == "wrong output shape":
            unleashed.score(images(), WrongShape())
        elif how == "not a tensor":
            unleashed.score(images().numpy(), "knn")

    return run


WRAPPER_SCORES = {
    "duplicate labels": (ValueError, r"Two scores are named 'knn'"),
    "empty scores": (ValueError, r"scores is empty"),
    "non-string label": (TypeError, r"Score labels must be non-empty strings"),
    "score of wrong type": (TypeError, r"scores must be a registered name.*got int"),
    "unfitted score": (ScoreNotFittedError, r"\['mahalanobis'\].*fit_scores"),
    "wrong output shape": (ValueError, r"'wrong_shape_catalogue' must return a 1-D tensor"),
    "not a tensor": (TypeError, r"x must be a tensor batch of images, got ndarray"),
}


@pytest.mark.parametrize("case", list(WRAPPER_SCORES))
def test_bad_score_request_keeps_the_fitted_scores(case):
    error, match = WRAPPER_SCORES[case]
    unleashed = fitted(cnn())
    before = snapshot(unleashed)
    with pytest.raises(error, match=match):
        _wrapper_call(case)(unleashed)
    assert_same(before, snapshot(unleashed))


# --------------------------------------------------------------------------- metrics
NAN = [0.1, float("nan")]
METRICS = {
    "empty ID scores": (lambda: metrics.auroc([], [1.0]), r"id_scores is empty"),
    "empty OOD scores": (lambda: metrics.ood_metrics([1.0], []), r"ood_scores is empty"),
    "NaN ID scores": (lambda: metrics.auroc(NAN, [0.0]), r"id_scores contains 1 non-finite"),
    "inf OOD scores": (
        lambda: metrics.aupr_out([1.0], [float("inf")]),
        r"ood_scores contains 1 non-finite",
    ),
    "tpr 0": (lambda: metrics.fpr_at_tpr([1.0], [0.0], tpr=0), r"tpr must be in \(0, 1\]"),
    "tpr above 1": (lambda: metrics.fpr_at_tpr([1.0], [0.0], tpr=1.5), r"tpr must be in"),
    "unknown convention": (
        lambda: metrics.fpr_at_tpr([1.0], [0.0], positive="in"),
        r"positive must be 'id' or 'ood'",
    ),
    "predictions and labels differ in length": (
        lambda: metrics.accuracy([[0.0, 1.0]], [0, 1]),
        r"1 predictions but 2 labels",
    ),
    "average of nothing": (lambda: metrics.average_metrics({}), r"at least one OOD set"),
}


@pytest.mark.parametrize("case", list(METRICS))
def test_bad_metric_input_is_named(case):
    call, match = METRICS[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_a_failed_fit_leaves_a_fitted_score_unchanged():
    """Refitting a fitted KNN on data without features fails and keeps the old bank."""
    knn = KNN(k=3).fit(_train_set(6))
    bank = knn.bank.clone()
    with pytest.raises(ValueError, match="'knn' score needs features"):
        knn.fit(FeatureSet(logits=torch.zeros(2, 3)))
    assert torch.equal(knn.bank, bank)
    frozen = copy.deepcopy(knn.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        knn.load_state_dict({"bank": bank})
    assert all(torch.equal(v, knn.state_dict()[k]) for k, v in frozen.items())
