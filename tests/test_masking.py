"""Masks: selection, exact keep ratios, where the mask applies, gradients."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash
from oodunleash.masks import ops as _mask_ops
from oodunleash.masks import thresholds as _thresholds
from oodunleash.masks.layer_masks import LayerMasks, num_kept, select_layers, topk_mask
from oodunleash.masks.ops import _kth_smallest
from tests.helpers.toys import ConvNet


@pytest.mark.parametrize("n", [1, 7, 288, 1000, 4096])
@pytest.mark.parametrize("keep", [0.01, 0.5, 0.8, 0.965, 1.0])
def test_topk_mask_keeps_exactly_k(n, keep):
    scores = torch.randn(n)
    mask = topk_mask(scores, keep)
    k = num_kept(n, keep)
    assert int(mask.sum()) == k
    if k < n:  # every kept score is at least every dropped one
        assert scores[mask.bool()].min() >= scores[~mask.bool()].max()


@pytest.mark.parametrize("values", [torch.randn(1001), torch.randint(0, 5, (300,)).float()])
def test_kth_smallest_by_sort_matches_kthvalue(values):
    # CUDA takes the sort path (kthvalue is slow there); both must give the same order statistic,
    # ties included.
    ordered = values.sort().values
    for k in (1, 2, len(values) // 2, len(values) - 1, len(values)):
        by_select = _kth_smallest(values, k, by_sort=False)
        by_sort = _kth_smallest(values, k, by_sort=True)
        assert by_select.dim() == by_sort.dim() == 0
        assert by_select == by_sort == ordered[k - 1]


def test_topk_mask_handles_ties():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    mask = topk_mask(scores, 0.5)  # k = 3: the 3.0 and the first two 2.0s
    assert mask.tolist() == [0, 1, 1, 0, 0, 1]
    assert int(topk_mask(torch.zeros(10), 0.3).sum()) == 3


@pytest.mark.parametrize("seed", range(6))
def test_topk_mask_equals_a_stable_sort_with_and_without_ties(seed):
    # The reference: sort by score, descending, earlier positions first among equals; keep
    # the first k. Coarse scores put thousands of ties at the threshold, fine ones none.
    gen = torch.Generator().manual_seed(seed)
    for scores in (
        torch.randint(0, 9, (2000,), generator=gen).float(),
        torch.rand(2000, generator=gen),
    ):
        for keep in (0.1, 0.5, 0.9, 0.999):
            k = num_kept(scores.numel(), keep)
            order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
            expected = torch.zeros(scores.numel())
            expected[order[:k]] = 1
            assert torch.equal(topk_mask(scores, keep), expected), (keep, scores.dtype)


def test_default_selection_includes_conv_linear_and_timm_subclasses():
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))  # materialise the lazy layer
    assert list(select_layers(model)) == ["0", "3"]
    mha = nn.MultiheadAttention(8, 2)
    assert "out_proj" in select_layers(mha)


def test_selection_by_glob_type_and_exclude():
    model = timm.create_model("resnet18", num_classes=3)
    convs = select_layers(model, layers=nn.Conv2d)
    assert "fc" not in convs and "conv1" in convs
    layer4 = select_layers(model, layers="layer4.*")
    assert all(name.startswith("layer4.") for name in layer4) and len(layer4) == 5
    no_head = select_layers(model, exclude=["fc", "conv1"])
    assert "fc" not in no_head and "conv1" not in no_head and "layer1.0.conv1" in no_head


def test_selection_matching_nothing_names_available_layers():
    with pytest.raises(ValueError, match=r"matches no parameter.*conv \(Conv2d\).*fc \(Linear\)"):
        select_layers(ConvNet(width=4, padding=0), layers="head*")
    with pytest.raises(TypeError, match="name globs"):
        select_layers(ConvNet(width=4, padding=0), layers=[3])


def test_attach_keeps_state_dict_keys_and_masks_the_forward():
    model = ConvNet(width=4, padding=0).eval()
    keys = list(model.state_dict())
    masks = LayerMasks(model, keep_ratio=0.5, seed=1)
    x = torch.randn(2, 1, 6, 6)
    with masks.attached():
        assert list(model.state_dict()) == keys
        masked_out = model(x)
        assert int((model.conv.weight == 0).sum()) == 18
        # the raw parameter is untouched
        assert int((model.conv._parameters["weight"] == 0).sum()) == 0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv.weight.mul_(masks.mask("conv"))
        reference.fc.weight.mul_(masks.mask("fc"))
    assert torch.allclose(reference(x), masked_out)
    assert type(model.conv) is nn.Conv2d  # detached: original class again


def test_mask_reaches_weights_read_by_a_parent_module():
    # nn.MultiheadAttention reads out_proj.weight itself, never calling out_proj.forward.
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(3, 1, 8)
    masks = LayerMasks(mha, layers="out_proj", keep_ratio=0.5)
    with masks.attached():
        out = mha(x, x, x)[0]
    zeroed = copy.deepcopy(mha)
    with torch.no_grad():
        zeroed.out_proj.weight.mul_(masks.mask("out_proj"))
    assert torch.allclose(zeroed(x, x, x)[0], out, atol=1e-6)
    assert not torch.allclose(mha(x, x, x)[0], out)


def test_std_conv_standardises_the_masked_weight():
    conv = StdConv2d(2, 3, 3).eval()
    model = nn.Sequential(conv)
    masks = LayerMasks(model, keep_ratio=0.6)
    x = torch.randn(1, 2, 5, 5)
    with masks.attached():
        out = model(x)
    w = conv._parameters["weight"] * masks.mask("0")
    w = F.batch_norm(w.reshape(1, 3, -1), None, None, training=True, momentum=0.0, eps=conv.eps)
    expected = F.conv2d(
        x, w.reshape_as(conv._parameters["weight"]), conv.bias, padding=conv.padding
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_straight_through_gradient_reaches_scores():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    masks = LayerMasks(model, keep_ratio=0.5).attach()
    x = torch.randn(6, 5)
    weight = model[0]._parameters["weight"]
    effective = weight.detach() * masks.mask("0")
    effective.requires_grad_(True)
    # gradient w.r.t. the effective weight, computed by hand
    hidden = torch.tanh(F.linear(x, effective, model[0].bias))
    F.linear(hidden, model[2].weight, model[2].bias).sum().backward()
    model(x).sum().backward()
    scores_grad = masks.layer_scores("0").grad
    assert torch.allclose(scores_grad, effective.grad * weight.detach(), atol=1e-6)
    masks.detach()


def test_mask_recomputed_after_scores_change_and_deepcopy_works():
    model = ConvNet(width=4, padding=0)
    masks = LayerMasks(model, keep_ratio=0.5).attach()
    before = masks.mask("fc").clone()
    with torch.no_grad():
        masks.layer_scores("fc").neg_()
    assert not torch.equal(before, masks.mask("fc"))
    model.train()
    optimizer = torch.optim.SGD(masks.parameters(), lr=0.1)
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    optimizer.step()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 1, 6, 6)
    model.eval()
    clone.eval()
    assert torch.allclose(clone(x), model(x))
    masks.detach()


def test_model_wise_mode_keeps_exact_total_fraction():
    model = timm.create_model("resnet18", num_classes=3)
    masks = LayerMasks(model, keep_ratio=0.7, mode="model", seed=0)
    fractions = masks.kept_fraction()
    total = sum(masks.mask(n).numel() for n in masks.layer_names)
    kept = sum(int(masks.mask(n).sum()) for n in masks.layer_names)
    assert kept == num_kept(total, 0.7)
    # per-layer standardisation: no layer is pruned away despite fan-in-scaled random scores
    assert min(fractions.values()) > 0.6 and max(fractions.values()) < 0.8


def test_training_mask_uses_sampled_threshold_within_half_a_percent():
    layer = nn.Linear(1000, 500)  # 500k weights > 65536 sample
    masks = LayerMasks(nn.Sequential(layer), keep_ratio=0.8, seed=3)
    approx = masks.mask("0", exact=False)
    assert abs(float(approx.mean()) - 0.8) < 0.005
    assert int(masks.mask("0", exact=True).sum()) == num_kept(500_000, 0.8)


@pytest.mark.parametrize("keep", [0.8, 0.9, 0.35])
def test_batched_training_masks_equal_per_layer_selection(keep):
    # GPUs select every layer's threshold in one batched sort; it must give the masks the
    # per-layer path gives when it recomputes (sampled and unsampled layers, one-weight rows).
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20), nn.Linear(20, 1, bias=False))
    masks = LayerMasks(model, keep_ratio=keep, seed=1, sample_size=500)
    assert set(masks._samples) == {"0", "1"}  # 1200 and 600 weights are sampled, 20 are not
    thresholds, scores = masks._layer_thresholds, masks._all_scores()
    batched = thresholds.drops_batched(scores)
    for name in masks.layer_names:
        assert torch.equal(batched[name], thresholds.drop(name, scores[name])), name
    with torch.no_grad():  # an optimizer step moves scores; the batched result follows
        masks.layer_scores("1").mul_(-1)
    assert torch.equal(thresholds.drops_batched(scores)["1"], thresholds.drop("1", scores["1"]))


def test_magnitude_init_keeps_largest_weights_and_seed_reproduces():
    model = ConvNet(width=4, padding=0)
    masks = LayerMasks(model, keep_ratio=0.5, init="magnitude")
    w = model.fc.weight.detach().abs().flatten()
    kept = masks.mask("fc").flatten().bool()
    assert w[kept].min() >= w[~kept].max()
    a, b = LayerMasks(model, seed=5), LayerMasks(model, seed=5)
    assert torch.equal(a.layer_scores("conv"), b.layer_scores("conv"))
    assert not torch.equal(a.layer_scores("conv"), LayerMasks(model, seed=6).layer_scores("conv"))


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, "0.5"])
def test_bad_keep_ratio(keep):
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        LayerMasks(ConvNet(width=4, padding=0), keep_ratio=keep)


def _reference_model_wise_drops(masks: LayerMasks) -> dict[str, torch.Tensor]:
    """The model-wide mask computed the plain way: one exact top-k over all standardised
    scores."""
    parts = []
    for name in masks.layer_names:
        s = masks.layer_scores(name).detach().float().reshape(-1)
        parts.append((s - s.mean()) / s.std().clamp_min(1e-12))
    joint = topk_mask(torch.cat(parts), masks.keep_ratio)
    sizes = [p.numel() for p in parts]
    return {
        name: (part == 0).view_as(masks.layer_scores(name))
        for name, part in zip(masks.layer_names, joint.split(sizes), strict=True)
    }


def _assert_model_wise_masks_exact(masks: LayerMasks) -> None:
    reference = _reference_model_wise_drops(masks)
    # The bracketed selection (CPU) and one stable sort of all scores (CUDA's way, no host
    # reads) must both give the exact top-k.
    for sort_all in (None, True):
        masks._joint.sort_all = sort_all
        masks._cache.clear()
        for exact in (True, False):  # training-time masks are the exact ones in this mode
            for name in masks.layer_names:
                assert torch.equal(masks._dropped(name, exact), reference[name]), (
                    name,
                    exact,
                    sort_all,
                )
    masks._joint.sort_all = None


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layers", [None, "1", ["0", "3"]])
def test_model_wise_masks_equal_the_exact_top_k(seed, layers):
    # More scores than 8 samples: the threshold comes from the bracketed selection.
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(256, 100)
    )
    masks = LayerMasks(
        model, layers=layers, keep_ratio=0.9, mode="model", seed=seed, sample_size=500
    )
    _assert_model_wise_masks_exact(masks)
    with torch.no_grad():  # an optimizer-like update: the masks follow it exactly
        for name in masks.layer_names:
            masks.layer_scores(name).add_(torch.randn_like(masks.layer_scores(name)), alpha=0.1)
    _assert_model_wise_masks_exact(masks)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_model_wise_masks_exact_with_ties_and_a_missed_bracket(keep, monkeypatch):
    model = nn.Sequential(nn.Linear(100, 300), nn.Linear(300, 200), nn.Linear(200, 10))
    masks = LayerMasks(model, keep_ratio=keep, mode="model", seed=4, sample_size=500)
    with torch.no_grad():  # coarse scores: thousands of ties at any threshold
        for name in masks.layer_names:
            masks.layer_scores(name).copy_(torch.randint(0, 7, masks.layer_scores(name).shape))
    _assert_model_wise_masks_exact(masks)
    # A sample that brackets the wrong place (only the largest score) must fall back to the
    # full selection.
    masks._cache.clear()
    largest = int(masks._joint.standardised(masks._all_scores()).argmax())
    masks._joint.sample = torch.full((500,), largest)
    selected_sizes = []
    select = _thresholds._kth_smallest

    def spy(values, k, **kwargs):
        selected_sizes.append(values.numel())
        return select(values, k, **kwargs)

    monkeypatch.setattr(_thresholds, "_kth_smallest", spy)
    _assert_model_wise_masks_exact(masks)
    assert 92_000 in selected_sizes  # the full selection over all scores ran


# --------------------------------------------------------------------------- coverage
class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv3d(x[:, None, :, :, None])[:, 0, :, :, 0]  # a 3-D conv on the way
        return self.fc(F.relu(self.conv(x)).mean(2))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0].mean(1))


def _sequence_loader(shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, *shape, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize(
    ("net", "shape", "expected"),
    [
        (Conv1dNet, (2, 10), ["conv", "conv3d", "fc"]),
        (AttentionNet, (5, 4), ["embed", "attn.in_proj_weight", "attn.out_proj", "head"]),
    ],
)
def test_umap_masks_conv1d_conv3d_and_attention_projections_and_export_bakes_them(
    net, shape, expected
):
    torch.manual_seed(0)
    model = net()
    assert list(select_layers(model)) == expected
    unleashed = OODUnleash(model, method="umap", constraint=0.2).fit(
        _sequence_loader(shape), epochs=1, progress=False
    )
    masks = unleashed.masks_
    assert masks.layer_names == expected
    plain = unleashed.export()
    assert type(plain) is net and plain.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, *shape)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)  # the masked forward, baked
    for name in expected:
        baked = plain.get_parameter(masks.parameter_name(name))
        assert torch.equal(baked == 0, masks.mask(name) == 0), name
    assert all(not type(m).__name__.startswith("Masked") for m in plain.modules())


def test_attention_with_separate_key_and_value_sizes_masks_all_three_projections():
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    masks = LayerMasks(mha, keep_ratio=0.5).attach()
    assert masks.layer_names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"]
    assert type(mha).__name__ == "MaskedMultiheadAttention"
    reads = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
    for read in reads:  # every projection reads masked
        assert int((read == 0).sum()) == read.numel() // 2
    q, k, v = torch.randn(3, 1, 8), torch.randn(4, 1, 6), torch.randn(4, 1, 5)
    masked_out = mha(q, k, v)[0]
    plain = masks.baked_copy(mha)
    assert type(plain) is nn.MultiheadAttention
    assert torch.allclose(plain(q, k, v)[0], masked_out, atol=1e-6)
    masks.detach()
    assert type(mha) is nn.MultiheadAttention


def test_default_selection_warns_naming_weighted_layers_it_leaves_dense():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ConvTranspose1d(4, 4, 1), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"stay dense: 0 \(Embedding\), 1 \(ConvTranspose1d\)"):
        assert list(select_layers(model)) == ["2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded or explicitly chosen: nothing to say
        select_layers(model, exclude=["0", "1"])
        select_layers(model, layers=nn.Linear)


# --------------------------------------------------------------------------- checkpoint API
def test_mask_state_round_trip_and_checks():
    torch.manual_seed(0)
    model = AttentionNet()
    masks = LayerMasks(model, keep_ratio=0.7, mode="model", seed=1)
    with torch.no_grad():
        for name in masks.layer_names:
            masks.layer_scores(name).normal_()  # learnt scores, unlike a fresh init
    state = masks.mask_state()
    assert set(state) == set(masks.layer_names)
    assert state["attn.in_proj_weight"]["mask"].dtype == torch.bool
    fresh = LayerMasks(model, keep_ratio=0.7, mode="model", seed=2).load_mask_state(state)
    for name in masks.layer_names:
        assert torch.equal(fresh.mask(name), masks.mask(name))
    assert torch.equal(fresh.raw_weight("head"), model.head.weight)
    baked = masks.baked_state_dict(model)
    reference = masks.baked_copy(model).state_dict()
    assert baked.keys() == reference.keys()
    assert all(torch.equal(baked[k], reference[k]) for k in baked)
    other = LayerMasks(model, keep_ratio=0.5, mode="model")
    with pytest.raises(ValueError, match="do not reproduce its saved mask.*keep_ratio=0.5"):
        other.load_mask_state(state)
    with pytest.raises(KeyError, match="lacks the layers"):
        fresh.load_mask_state({k: v for k, v in state.items() if k != "head"})
    state["head"]["scores"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="layer 'head' have shape \\(2, 2\\)"):
        fresh.load_mask_state(state)


# --------------------------------------------------------------------------- batched masking
@pytest.mark.parametrize("mode", ["layer", "model"])
def test_one_autograd_function_masks_all_layers_with_the_per_layer_results(mode, monkeypatch):
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(5)]
    blocks = [layer for conv in convs for layer in (conv, nn.BatchNorm2d(16), nn.ReLU())]
    model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    twin = copy.deepcopy(model)
    # A small sample: the layer-wise training thresholds come from samples, as on big models.
    options = {"keep_ratio": 0.9, "mode": mode, "seed": 3, "sample_size": 500}
    masks = LayerMasks(model, **options).attach()
    per_layer = LayerMasks(twin, **options).attach()
    # The reference reads every layer through its own autograd function, as before batching.
    monkeypatch.setattr(per_layer, "_read_masked", per_layer.masked_weight)
    calls = {"batched": 0, "single": 0}
    batched_apply, single_apply = _mask_ops._MaskedWeights.apply, _mask_ops._MaskedWeight.apply

    def count(kind, apply):
        def counted(*args):
            calls[kind] += 1
            return apply(*args)

        return counted

    monkeypatch.setattr(_mask_ops._MaskedWeights, "apply", count("batched", batched_apply))
    monkeypatch.setattr(_mask_ops._MaskedWeight, "apply", count("single", single_apply))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (masks, per_layer)]
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):  # masks change between steps; each step rebuilds all masked weights
        outputs = []
        for net, optimizer in zip((model, twin), optimizers, strict=True):
            optimizer.zero_grad()
            out = net(x)
            out.square().sum().backward()
            optimizer.step()
            outputs.append(out.detach())
        assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
        for name in masks.layer_names:
            assert torch.equal(masks.mask(name, exact=False), per_layer.mask(name, exact=False))
            assert torch.equal(masks.layer_scores(name), per_layer.layer_scores(name)), name
    n = len(masks.layer_names)
    assert calls == {"batched": 3, "single": 3 * n}  # one call per pass, not one per layer
    model.eval()
    with torch.no_grad():  # evaluation reads each layer alone, no autograd function
        model(x)
    assert calls["batched"] == 3
    masks.detach(), per_layer.detach()
