"""Proxy OOD sets built from validation images (oodunleash.evaluation.proxy)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import proxy_ood
from oodunleash.evaluation.proxy import DEFAULT_FAMILIES, FAMILIES, proxy_images


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # Structured images: a bright square on a dark background, normalised-like range.
    x = torch.full((24, 2, 12, 12), -0.8)
    for i in range(24):
        r, c = (i * 5) % 8, (i * 3) % 8
        x[i, :, r : r + 4, c : c + 4] = 2.0
    return x + 0.05 * torch.randn(x.shape, generator=gen)


def test_every_family_keeps_shape_and_dtype(images):
    for dtype in (torch.float32, torch.float64):
        sets = proxy_images(images.to(dtype), seed=0)
        assert list(sets) == list(DEFAULT_FAMILIES) == list(FAMILIES)
        for name, x in sets.items():
            assert x.shape == images.shape, name
            assert x.dtype == dtype, name
            assert torch.isfinite(x).all(), name


def test_same_seed_same_images_other_seed_other_images(images):
    a, b, c = (proxy_images(images, seed=s) for s in (3, 3, 4))
    for name in FAMILIES:
        assert torch.equal(a[name], b[name]), name
        if name != "inverted":  # the only family without randomness
            assert not torch.equal(a[name], c[name]), name


def test_each_family_has_its_own_stream(images):
    alone = proxy_images(images, ["jigsaw"], seed=1)["jigsaw"]
    assert torch.equal(alone, proxy_images(images, seed=1)["jigsaw"])


def test_proxies_differ_from_every_id_image(images):
    flat_id = images.flatten(1)
    for name, x in proxy_images(images, seed=0).items():
        distance = torch.cdist(x.flatten(1), flat_id).min(dim=1).values
        assert (distance > 1e-3).all(), name


def test_noise_stays_in_the_images_range(images):
    low, high = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
    for name in ("gaussian", "uniform", "blurred_noise"):
        x = proxy_images(images, [name], seed=0)[name]
        assert (x.amin(dim=(0, 2, 3)) >= low - 1e-6).all(), name
        assert (x.amax(dim=(0, 2, 3)) <= high + 1e-6).all(), name
        # and it is not a constant: it has the images' spread, not a flat grey
        assert x.std() > 0.3 * images.std(), name


def test_blend_is_the_mean_of_two_different_images(images):
    blended = proxy_images(images, ["blend"], seed=0)["blend"]
    pair_means = (images[:, None] + images[None, :]) / 2  # [i, j] = mean of images i and j
    for i, x in enumerate(blended):
        errors = (pair_means[i] - x).flatten(1).abs().amax(dim=1)
        partner = int(errors.argmin())
        assert errors[partner] < 1e-5 and partner != i


def test_jigsaw_moves_patches_and_keeps_pixels(images):
    shuffled = proxy_images(images, ["jigsaw"], seed=0)["jigsaw"]
    same_values = torch.allclose(
        shuffled.flatten(1).sort(dim=1).values, images.flatten(1).sort(dim=1).values
    )
    assert same_values
    assert not torch.equal(shuffled, images)


def test_inverting_twice_gives_the_images_back(images):
    once = proxy_images(images, ["inverted"])["inverted"]
    assert torch.allclose(proxy_images(once, ["inverted"])["inverted"], images, atol=1e-6)


def test_flat_inputs_get_only_the_families_that_fit():
    vectors = torch.randn(10, 5)
    assert set(proxy_images(vectors)) == {f for f, spec in FAMILIES.items() if not spec[1]}
    with pytest.raises(ValueError, match="need \\(N, C, H, W\\) images"):
        proxy_images(vectors, ["jigsaw"])


def test_bad_arguments_are_named():
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="Unknown proxy families \\['fog'\\]"):
        proxy_images(x, ["fog"])
    with pytest.raises(ValueError, match="families is empty"):
        proxy_images(x, [])
    with pytest.raises(ValueError, match="N >= 2"):
        proxy_images(x[:1])
    with pytest.raises(ValueError, match="no batches"):
        proxy_ood(DataLoader(TensorDataset(torch.empty(0, 1, 8, 8))))
    with pytest.raises(ValueError, match="n must be an integer"):
        proxy_ood([x], n=1)


def test_proxy_ood_reads_labelled_or_bare_loaders_and_returns_named_loaders(images):
    labelled = DataLoader(TensorDataset(images, torch.zeros(len(images)).long()), batch_size=5)
    loaders = proxy_ood(labelled, ["gaussian", "blend"], n=20, seed=2)
    assert list(loaders) == ["gaussian", "blend"]
    first = next(iter(loaders["blend"]))[0]
    assert first.shape == (5, 2, 12, 12)  # the validation loader's batch size
    bare = proxy_ood([images[:10], images[10:]], ["blend"], n=20, seed=2, batch_size=7)
    assert torch.equal(bare["blend"].dataset.tensors[0], loaders["blend"].dataset.tensors[0])
    assert bare["blend"].batch_size == 7
