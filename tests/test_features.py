"""Reading logits, features and feature maps from timm and custom models; collection over a
loader; the distributed gather."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash.features import collect as features_module
from oodunleash.features.collect import FeatureExtractor, FeatureSet, collect_features
from oodunleash.masks.layer_masks import LayerMasks


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_custom_model_head_features_and_maps_by_hooks():
    net = cnn()
    out = FeatureExtractor(net)(X, maps=True)
    with torch.no_grad():
        expected_maps = net[:4](X)
        assert torch.allclose(out.logits, net(X))
    assert torch.allclose(out.feature_maps, expected_maps)
    assert torch.allclose(out.features, expected_maps.mean((2, 3)), atol=1e-6)
    assert torch.equal(out.head.weight, net[6].weight) and torch.equal(out.head.bias, net[6].bias)
    # Logits rebuilt from the maps (what ASH does) equal the model's.
    assert torch.allclose(out.logits_from_maps(out.feature_maps), out.logits, atol=1e-5)
    assert torch.allclose(out.head(out.features), out.logits, atol=1e-5)


def test_head_is_the_layer_producing_the_output_not_the_last_registered():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(6, 3)  # registered first, runs last
            self.body = nn.Linear(4, 6)
            self.aux = nn.Linear(6, 3)  # same shape, not the output

        def forward(self, x):
            h = torch.relu(self.body(x))
            self.aux(h)
            return self.classifier(h)

    net = Odd()
    ex = FeatureExtractor(net)
    out = ex(torch.randn(5, 4))
    assert ex._head_module is net.classifier
    assert torch.equal(out.head.weight, net.classifier.weight)


def test_named_head_and_feature_layer():
    net = cnn()
    out = FeatureExtractor(net, head="6", feature_layer="3")(X, maps=True)
    assert out.features.shape == (6, 16) and out.feature_maps.shape == (6, 16, 8, 8)
    with pytest.raises(ValueError, match="no submodule"):
        FeatureExtractor(net, head="fc")
    with pytest.raises(ValueError, match="not the pre-pool feature map"):
        FeatureExtractor(net, feature_layer="1")(X, maps=True)


def test_no_linear_head_names_the_option():
    net = nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"OODUnleash\(model, head="):
        FeatureExtractor(net)(X)


def test_model_without_maps_falls_back_to_features_with_a_warning():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10), nn.ReLU(), nn.Linear(10, 4))
    ex = FeatureExtractor(mlp)
    with pytest.warns(UserWarning, match="feature_layer"):
        out = ex(X, maps=True)
    assert torch.equal(out.feature_maps, out.features)
    assert torch.allclose(out.logits_from_maps(out.feature_maps), out.logits, atol=1e-5)


def test_masked_head_reads_the_masked_weight():
    net = cnn()
    masks = LayerMasks(net, layers="6", keep_ratio=0.5, seed=0)
    with masks.attached():
        out = FeatureExtractor(net)(X)
        assert int((out.head.weight == 0).sum()) == net[6].weight.numel() // 2
        assert torch.allclose(out.head(out.features), out.logits, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})],
)
def test_timm_models_use_forward_features_and_forward_head(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    ex = FeatureExtractor(model)
    with torch.no_grad():
        out = ex(x, maps=True)
        assert ex.mode == "timm"
        assert torch.allclose(out.logits, model(x), atol=1e-5)
        assert out.features.shape == (2, model.num_features)
        assert torch.allclose(out.logits_from_maps(out.feature_maps), out.logits, atol=1e-5)
    assert out.head.weight.shape == (5, model.num_features)
    if name == "resnet18":
        assert out.feature_maps.shape == (2, 512, 1, 1)


def test_timm_model_named_head_uses_hooks():
    model = timm.create_model("resnet18", num_classes=5, pretrained=False).eval()
    ex = FeatureExtractor(model, head="fc")
    with torch.no_grad():
        out = ex(torch.randn(2, 3, 32, 32))
    assert ex.mode == "hooks" and out.features.shape == (2, 512)


def loader(n=21, labels=True, batch_size=4):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    if labels:
        return DataLoader(TensorDataset(images, torch.arange(n) % 5), batch_size=batch_size)
    return DataLoader(TensorDataset(images), batch_size=batch_size)


def test_collect_keeps_what_is_asked_and_batch_scores():
    net = cnn()
    ex = FeatureExtractor(net)
    data = collect_features(
        ex,
        loader(),
        keep={"logits", "features", "labels"},
        per_batch={"maps_mean": lambda b: b.feature_maps.mean((1, 2, 3))},
        need_maps=True,
    )
    with torch.no_grad():
        images = torch.cat([b[0] for b in loader()])
        assert torch.allclose(data.logits, net(images), atol=1e-5)
        assert torch.allclose(data.extra["maps_mean"], net[:4](images).mean((1, 2, 3)), atol=1e-5)
    assert data.feature_maps is None and torch.equal(data.labels, torch.arange(21) % 5)
    assert torch.equal(data.index, torch.arange(21)) and len(data) == 21
    assert data.features.dtype == torch.float32 and data.features.device.type == "cpu"

    partial = collect_features(ex, loader(labels=False), keep={"logits", "labels"}, max_batches=2)
    assert len(partial) == 8 and partial.labels is None
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        collect_features(ex, loader(labels=False), need_labels=True)
    with pytest.raises(ValueError, match="one value per sample"):
        collect_features(ex, loader(), per_batch={"bad": lambda b: b.logits})


def test_feature_set_require_and_select():
    fs = FeatureSet(logits=torch.randn(4, 3), index=torch.arange(4))
    with pytest.raises(ValueError, match="'knn' score needs features"):
        fs.require("features", "knn")
    sub = fs.select(torch.tensor([2, 0]))
    assert torch.equal(sub.logits, fs.logits[[2, 0]]) and torch.equal(
        sub.index, torch.tensor([2, 0])
    )


def test_distributed_gather_restores_dataset_order_and_drops_padding(monkeypatch):
    """Simulate 2 ranks of a DistributedSampler over 5 samples (padded to 6): rank 0 holds
    positions [0, 2, 4], rank 1 holds [1, 3, 0] (0 repeated as padding)."""
    values = torch.arange(5, dtype=torch.float32) * 10
    rank0_index, rank1_index = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 0])

    def fake_gather(t):
        # This process is rank 0; rank 1's tensor of the same field is looked up by content.
        other = {
            id_: rank1
            for id_, rank1 in (
                ("index", rank1_index),
                ("logits", values[rank1_index, None]),
                ("extra", values[rank1_index] + 1),
            )
        }
        key = "index" if t.dtype == torch.long else ("logits" if t.dim() == 2 else "extra")
        return torch.cat([t, other[key].to(t.dtype)])

    monkeypatch.setattr(features_module, "is_distributed", lambda: True)
    monkeypatch.setattr(features_module, "all_gather_variable", fake_gather)
    local = FeatureSet(
        logits=values[rank0_index, None],
        index=rank0_index,
        extra={"s": values[rank0_index] + 1},
    )
    gathered = features_module.gather_feature_set(local, torch.device("cpu"))
    assert torch.equal(gathered.index, torch.arange(5))
    assert torch.equal(gathered.logits[:, 0], values)
    assert torch.equal(gathered.extra["s"], values + 1)


# --------------------------------------------------------------------------- checked heads
def test_wrong_named_head_is_refused_naming_the_candidates():
    net = cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"head='0'.*not the classifier head.*\['6'\]"):
        FeatureExtractor(net, head="0")(X)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10), nn.ReLU(), nn.Linear(10, 4))
    with pytest.raises(ValueError, match=r"head='1'.*\['3'\]") as err:
        FeatureExtractor(mlp, head="1")(X)
    assert len(str(err.value)) < 400
    # Nothing is left attached to the model, and its weights are untouched.
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in mlp.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_head_check_catches_a_linear_head_that_is_not_the_last_operation():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return 2 * self.fc(torch.relu(self.body(x)))

    with pytest.raises(ValueError, match=r"head='fc' does not produce the model's output"):
        FeatureExtractor(Scaled(), head="fc")(torch.randn(5, 4))
    with pytest.raises(ValueError, match="Could not find the classifier head"):
        FeatureExtractor(Scaled())(torch.randn(5, 4))


def test_nonlinear_named_head_gives_features_but_no_linear_head():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(192, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    ).eval()
    out = FeatureExtractor(net, head="2")(X)
    assert out.features.shape == (6, 8) and out.head is None
    with pytest.raises(ValueError, match="needs head"):
        out.logits_from_features(out.features)


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "shared"),
    [
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, 32, 0),
        ("levit_128s", {"img_size": 64}, 64, 1),
    ],
)
def test_timm_distilled_models_read_both_heads(name, kwargs, size, shared):
    """get_classifier() is (head, head_dist); the eval output is their mean: DeiT's heads read
    two tokens (features side by side), LeViT's one pooled feature (BatchNorm + Linear heads)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.randn(3, 3, size, size)
    ex = FeatureExtractor(model)
    with torch.no_grad():
        out = ex(x)
        expected = model(x)
    assert isinstance(model.get_classifier(), tuple) and ex._shared == bool(shared)
    dim = model.num_features * (1 if shared else 2)
    assert out.features.shape == (3, dim) and out.head.weight.shape == (5, dim)
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert torch.allclose(out.head(out.features), expected, atol=1e-5)
    with pytest.raises(ValueError, match="not the classifier head"):
        FeatureExtractor(model, head="head")(x)


# --------------------------------------------------------------------------- outputs, dtypes
class _HFOutput(dict):
    """What transformers' ModelOutput is: an ordered mapping whose items are attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = cnn(), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "object":
            return _HFOutput(loss=None, logits=logits, hidden_states=None)
        if self.kind == "dict":
            return {"pooled": logits.mean(1), "logits": logits}
        return {"scores": logits}


@pytest.mark.parametrize("kind", ["object", "dict"])
def test_hugging_face_style_outputs_are_read(kind):
    model = _Wrapped(kind).eval()
    out = FeatureExtractor(model)(X, maps=True)
    with torch.no_grad():
        expected = model.net(X)
    assert torch.allclose(out.logits, expected) and out.features.shape == (6, 16)
    assert torch.allclose(out.head(out.features), expected, atol=1e-5)


def test_output_key_names_another_item():
    model = _Wrapped("other").eval()
    with pytest.raises(ValueError, match="output_key"):
        FeatureExtractor(model)(X)
    out = FeatureExtractor(model, output_key="scores")(X)
    assert out.logits.shape == (6, 5)
    with pytest.raises(ValueError, match=r"output_key='nope'.*\['scores'\]"):
        FeatureExtractor(model, output_key="nope")(X)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_float32_batches_are_cast_to_the_model_dtype(dtype):
    net = cnn().to(dtype)
    out = FeatureExtractor(net)(X, maps=True)
    with torch.no_grad():
        expected = net(X.to(dtype))
    assert out.logits.dtype == dtype and torch.equal(out.logits, expected)
    data = collect_features(FeatureExtractor(net), loader(), keep={"features", "labels"})
    assert data.features.dtype == torch.float32 and len(data) == 21


def test_hooks_survive_copies_and_pickling_and_leave_with_the_extractor():
    import copy
    import gc
    import io

    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 2, 2, 2)
    ex = FeatureExtractor(net)
    features = ex(x).features
    copied = copy.deepcopy(net)  # what export() does
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(copied(x), net(x)) and torch.equal(loaded(x), net(x))
    assert torch.equal(FeatureExtractor(copied)(x).features, features)
    assert net[3]._forward_pre_hooks
    del ex
    gc.collect()
    assert not net[3]._forward_pre_hooks and not net[3]._forward_hooks


def test_models_that_adapt_their_input_are_not_refused():
    """Input checks run only when the forward fails: a model that converts uint8 pixels or
    adds the channel dimension itself is read as usual."""

    class Adapting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn()

        def forward(self, x):  # (batch, 8, 8) uint8 -> (batch, 3, 8, 8) float
            return self.net(x.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1))

    model = Adapting().eval()
    pixels = torch.randint(0, 255, (4, 8, 8), dtype=torch.uint8)
    out = FeatureExtractor(model)(pixels)
    with torch.no_grad():
        assert torch.equal(out.logits, model(pixels))
    assert out.features.shape == (4, 16)


def test_bfloat16_model_scores_float32_batches_end_to_end():
    from oodunleash import OODUnleash

    net = cnn().to(torch.bfloat16)
    data = [
        (torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(16) % 5)
    ]
    unleashed = OODUnleash(net).fit_scores(data, ["residual", "vim"], progress=False)
    far = [5 * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))]
    with pytest.warns(UserWarning, match="k=50 exceeds the bank of 16"):
        unleashed.fit_scores(data, ["knn"], progress=False)
    results = unleashed.evaluate(data, {"far": far}, ["vim", "odin", "energy"], progress=False)
    assert set(results.to_dict()) >= {"vim", "odin", "energy"}
    assert unleashed.score(far[0], "vim").dtype == torch.float32
