"""``score`` and ``predict`` on the inputs users hold: each kind against the tensor preprocessed
by hand, with the wrapper's recorded preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodunleash import OODUnleash

#: 16 px images resized to 8 px (crop_pct 1: no crop), bilinear, mean/std per channel.
PREPROCESSING = {
    "input_size": (3, 8, 8),
    "mean": (0.2, 0.4, 0.6),
    "std": (0.5, 0.25, 0.2),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


def by_hand(image: Image.Image, channels: int = 3) -> torch.Tensor:
    """Resize to 8x8 (PIL, bilinear), scale to [0, 1], normalise: what timm's eval transform
    does with PREPROCESSING."""
    image = image.convert("L" if channels == 1 else "RGB").resize((8, 8), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    mean = np.array(PREPROCESSING["mean"][:channels], dtype=np.float32)
    std = np.array(PREPROCESSING["std"][:channels], dtype=np.float32)
    return torch.from_numpy((pixels - mean) / std).permute(2, 0, 1)


def pictures(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def unleashed() -> OODUnleash:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    wrapper = OODUnleash(net, score="energy")
    wrapper.preprocessing = PREPROCESSING
    return wrapper


@pytest.fixture
def files(tmp_path) -> list:
    paths = []
    for i, picture in enumerate(pictures(5)):
        picture.save(tmp_path / f"img{i}.png")
        paths.append(tmp_path / f"img{i}.png")
    return paths


def expected(unleashed: OODUnleash) -> torch.Tensor:
    return unleashed.score(torch.stack([by_hand(p) for p in pictures(5)]))


def test_paths_and_pil_images_are_preprocessed_as_recorded(unleashed, files):
    reference = expected(unleashed)
    assert torch.allclose(unleashed.score(files, batch_size=2), reference, atol=1e-5)
    assert torch.allclose(unleashed.score([str(p) for p in files]), reference, atol=1e-5)
    assert torch.allclose(unleashed.score(files[3]), reference[3:4], atol=1e-5)
    assert torch.allclose(unleashed.score(str(files[3])), reference[3:4], atol=1e-5)
    assert torch.allclose(unleashed.score(pictures(5), batch_size=3), reference, atol=1e-5)
    assert torch.allclose(unleashed.score(pictures(5)[1]), reference[1:2], atol=1e-5)


def test_tensors_and_loaders(unleashed):
    batch = torch.stack([by_hand(p) for p in pictures(5)])
    reference = unleashed.score(batch)
    assert torch.allclose(unleashed.score(batch[2]), reference[2:3])  # one 3-D image
    assert torch.allclose(unleashed.score(list(batch)), reference, atol=1e-6)  # 3-D tensors
    loader = DataLoader(TensorDataset(batch, torch.zeros(5)), batch_size=2)
    assert torch.allclose(unleashed.score(loader, progress=True), reference, atol=1e-6)
    generator = (batch[i : i + 3] for i in (0, 3))
    assert torch.allclose(unleashed.score(generator), reference, atol=1e-6)
    assert torch.allclose(unleashed.score([batch[:1], batch[1:]]), reference, atol=1e-6)


def test_predict_takes_the_same_inputs(unleashed, files):
    unleashed.calibrate(torch.randn(40, 3, 8, 8), progress=False)
    from_files = unleashed.predict(files, alpha=0.1)
    by_tensor = unleashed.predict(torch.stack([by_hand(p) for p in pictures(5)]), alpha=0.1)
    assert torch.equal(from_files.labels, by_tensor.labels)
    assert torch.allclose(from_files.scores, by_tensor.scores, atol=1e-5)
    assert len(unleashed.predict(pictures(1)[0])) == 1


def test_one_channel_preprocessing_reads_images_as_grayscale(files):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    wrapper = OODUnleash(net, score="energy")
    wrapper.preprocessing = {**PREPROCESSING, "input_size": (1, 8, 8), "mean": 0.2, "std": 0.5}
    reference = wrapper.score(torch.stack([by_hand(p, channels=1) for p in pictures(5)]))
    assert torch.allclose(wrapper.score(files), reference, atol=1e-5)  # RGB files, read as L


def test_images_without_preprocessing_say_how_to_give_it(files):
    wrapper = OODUnleash(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), score="energy")
    with pytest.raises(ValueError, match="no recorded preprocessing.*unleashed.preprocessing ="):
        wrapper.score(files)
    wrapper.score(torch.randn(2, 3, 8, 8))  # tensors need none


def test_bad_inputs_are_named(unleashed, files):
    with pytest.raises(TypeError, match="not a mix"):
        unleashed.score([files[0], torch.randn(2, 3, 8, 8)])
    with pytest.raises(TypeError, match="Cannot read images from a dict"):
        unleashed.score({"x": 1})
    with pytest.raises(TypeError, match="Batch 0 of the loader is a str"):
        unleashed.score(iter(["abc"]))
    with pytest.raises(ValueError, match="shape"):
        unleashed.score(torch.randn(8, 8))
    with pytest.raises(ValueError, match="Cannot read the image"):
        unleashed.score(files[0].parent / "missing.png")
    with pytest.raises(TypeError, match="tensor batch of images, got ndarray.*from_numpy"):
        unleashed.score(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        unleashed.score([])
    with pytest.raises(TypeError, match="preprocessing must be a dict"):
        unleashed.preprocessing = "imagenet"
