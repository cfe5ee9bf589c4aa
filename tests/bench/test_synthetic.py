"""The generated far-OOD sets: photo crops, noise, glyphs (oodunleash.bench.synthetic)."""

from __future__ import annotations

import pytest
import torch

from oodunleash.bench import datasets as ds
from tests.bench.fake_data import assert_sample


def test_sample_photo_crops_deterministic() -> None:
    a = ds.SamplePhotoCrops(n=40, seed=5, normalize=False)
    b = ds.SamplePhotoCrops(n=40, seed=5, normalize=False)
    c = ds.SamplePhotoCrops(n=40, seed=6, normalize=False)
    assert len(a) == 40 and set(a.targets.tolist()) == {-1}
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    assert a.data.min() >= 0 and a.data.max() <= 1 and a.data.std() > 0.05
    assert_sample(ds.SamplePhotoCrops(n=3)[2])


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_ood(kind: str) -> None:
    noise = ds.NoiseOOD(kind, n=500, seed=1, normalize=False)
    assert len(noise) == 500 and noise[0][1] == -1
    assert noise.data.min() >= 0 and noise.data.max() <= 1
    assert abs(noise.data.mean().item() - 0.5) < 0.01
    assert torch.equal(noise.data, ds.NoiseOOD(kind, n=500, seed=1).data)
    assert not torch.equal(noise.data, ds.NoiseOOD(kind, n=500, seed=2).data)
    normed = ds.NoiseOOD(kind, n=500, seed=1)[7][0]
    assert torch.allclose(normed[0], (noise.data[7] - 0.286) / 0.353, atol=1e-5)


def test_glyphs_ood_shape_range_determinism() -> None:
    glyphs = ds.GlyphsOOD(n=16, seed=3, normalize=False)
    assert len(glyphs) == 16
    image, label = glyphs[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == -1
    raw = glyphs.data
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    per_image = raw.flatten(1)
    assert bool((per_image.amax(1) > 0.3).all())  # every image shows a glyph
    assert bool((per_image.mean(1) < 0.6).all())  # ...on a dark background
    assert torch.equal(ds.GlyphsOOD(n=16, seed=3, normalize=False).data, raw)
    assert not torch.equal(ds.GlyphsOOD(n=16, seed=4, normalize=False).data, raw)
    normalized = ds.GlyphsOOD(n=16, seed=3).tensors()[0]
    expected = (raw.unsqueeze(1) - ds.FASHION_MNIST_MEAN) / ds.FASHION_MNIST_STD
    assert torch.allclose(normalized, expected, atol=1e-5)
    assert "GlyphsOOD" in ds.__all__
    with pytest.raises(ValueError):
        ds.GlyphsOOD(n=-1)
