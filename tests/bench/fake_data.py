"""Tiny Fashion-MNIST IDX files written on the fly, and the check every data set's sample passes."""

from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np
import torch

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write(path: pathlib.Path, data: bytes, gz: bool) -> pathlib.Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_split(
    directory: pathlib.Path, split: str, n: int, seed: int = 0, gz: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    img_stem, lab_stem = STEMS[split]
    write(directory / img_stem, idx_bytes(2051, (n, 28, 28), images.tobytes()), gz)
    write(directory / lab_stem, idx_bytes(2049, (n,), labels.tobytes()), gz)
    return images, labels


def write_fake_fmnist(directory: pathlib.Path, gz: bool = True) -> dict[str, tuple]:
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "train": write_split(directory, "train", 20, seed=1, gz=gz),
        "test": write_split(directory, "test", 10, seed=2, gz=gz),
    }


def assert_sample(sample: tuple) -> None:
    image, label = sample
    assert isinstance(image, torch.Tensor)
    assert image.dtype == torch.float32
    assert image.shape == (1, 28, 28)
    assert type(label) is int
