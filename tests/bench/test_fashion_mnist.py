"""Fashion-MNIST through torchvision (oodunleash.bench.fashion_mnist): files, validation,
download offline, splits."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import pathlib
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

from oodunleash.bench import datasets as ds
from tests.bench.fake_data import (
    STEMS,
    assert_sample,
    idx_bytes,
    write_fake_fmnist,
    write_split,
)
from tests.helpers.scripts import ROOT, load_script

real_data = pytest.mark.usefixtures("fashion_mnist_dir")


def corrupt(tmp_path: pathlib.Path, how: str) -> pathlib.Path:
    """Write a test split with one defect; return the path the error should name."""
    images, labels = write_split(tmp_path, "test", 5, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    lab = tmp_path / "t10k-labels-idx1-ubyte"
    if how == "bad magic":
        img.write_bytes(idx_bytes(1234, (5, 28, 28), images.tobytes()))
        return img
    if how == "swapped":
        lab.write_bytes(idx_bytes(2051, (5, 28, 28), images.tobytes()))
        return lab
    if how == "truncated":
        img.write_bytes(img.read_bytes()[:-100])
        return img
    if how == "trailing data":
        img.write_bytes(img.read_bytes() + b"\0" * 3)
        return img
    if how == "short header":
        lab.write_bytes(b"\x00\x00\x08")
        return lab
    if how == "truncated gzip":
        gz = tmp_path / "t10k-images-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(img.read_bytes())[:-200])
        img.unlink()
        return gz
    if how == "count mismatch":
        lab.write_bytes(idx_bytes(2049, (4,), labels[:4].tobytes()))
        return img
    if how == "label range":
        bad = labels.copy()
        bad[2] = 12
        lab.write_bytes(idx_bytes(2049, (5,), bad.tobytes()))
        return lab
    if how == "wrong size":
        img.write_bytes(idx_bytes(2051, (5, 32, 32), bytes(5 * 32 * 32)))
        return img
    raise AssertionError(how)


class Mirror(NamedTuple):
    path: pathlib.Path
    arrays: dict[str, tuple]


@pytest.fixture
def mirror(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Mirror:
    """A directory laid out like the canonical server, torchvision's checksums set to match."""
    directory = tmp_path / "mirror"
    arrays = write_fake_fmnist(directory, gz=True)
    resources = [
        (name, hashlib.md5((directory / name).read_bytes()).hexdigest())
        for name, _ in TorchvisionFashionMNIST.resources
    ]
    monkeypatch.setattr(TorchvisionFashionMNIST, "resources", resources)
    return Mirror(directory, arrays)


@pytest.fixture
def served(mirror: Mirror):
    """The mirror on a local HTTP server (torchvision's downloader speaks HTTP): its URL."""
    with load_script("scripts/check_site.py").serve(mirror.path) as url:
        yield url


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


ALL_FILES = sorted(s + ext for pair in STEMS.values() for s in pair for ext in ("", ".gz"))


@real_data
def test_real_load_shapes_and_labels() -> None:
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = ds.load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.bincount(labels).tolist() == [n // 10] * 10
    # Results are copies of the in-process cache: modifying them must not leak.
    images[:] = 0
    assert ds.load_fashion_mnist("test")[0].any()


@real_data
def test_real_dataset_items_and_normalisation() -> None:
    test = ds.FashionMNIST("test")
    assert len(test) == 10_000 and len(test.class_names) == 10
    assert_sample(test[0])
    x, y = test.tensors()
    assert x.shape == (10_000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
    raw_images, raw_labels = ds.load_fashion_mnist("test")
    assert torch.equal(y, raw_labels)
    plain = ds.FashionMNIST("test", normalize=False)
    assert torch.allclose(plain[3][0][0], raw_images[3].float() / 255)
    xb, yb = next(iter(DataLoader(test, batch_size=16)))
    assert xb.shape == (16, 1, 28, 28) and yb.dtype == torch.int64


@real_data
def test_real_class_subset_is_remapped_in_given_order() -> None:
    _, raw = ds.load_fashion_mnist("test")
    subset = ds.FashionMNIST("test", classes=(7, 2))
    assert subset.class_names == ("Sneaker", "Pullover")
    assert len(subset) == 2000
    original = raw[subset.source_indices]
    assert torch.equal(subset.targets, torch.where(original == 7, 0, 1))
    assert set(original.tolist()) == {7, 2}
    # indices select rows of the full split; classes then drop rows of other classes.
    rows = torch.nonzero(raw == 7).flatten()[:5].tolist() + [int(torch.nonzero(raw == 0)[0])]
    picked = ds.FashionMNIST("test", classes=(7, 2), indices=rows)
    assert picked.source_indices.tolist() == rows[:5] and picked.targets.tolist() == [0] * 5


@real_data
def test_near_ood_split_real() -> None:
    _, train_raw = ds.load_fashion_mnist("train")
    _, test_raw = ds.load_fashion_mnist("test")
    splits = ds.near_ood_split(id_classes=(0, 1, 2, 3, 4, 5), val_fraction=0.1, seed=0)
    assert set(splits) == {"train", "val", "test", "ood"}
    train, val = (
        set(splits["train"].source_indices.tolist()),
        set(splits["val"].source_indices.tolist()),
    )
    assert not train & val
    id_rows = set(torch.nonzero(train_raw < 6).flatten().tolist())
    assert train | val == id_rows
    assert torch.bincount(train_raw[splits["val"].source_indices]).tolist() == [600] * 6
    for name in ("train", "val", "test"):
        assert set(splits[name].targets.tolist()) == set(range(6))
        assert_sample(splits[name][0])
    assert torch.equal(test_raw[splits["test"].source_indices], splits["test"].targets)
    ood = splits["ood"]
    assert len(ood) == 4000 and set(ood.targets.tolist()) == {-1}
    assert set(test_raw[ood.source_indices].tolist()) == {6, 7, 8, 9}
    assert ood[0][1] == -1

    again = ds.near_ood_split(seed=0)
    other = ds.near_ood_split(seed=1)
    assert torch.equal(again["val"].source_indices, splits["val"].source_indices)
    assert not torch.equal(other["val"].source_indices, splits["val"].source_indices)


@real_data
def test_near_ood_split_custom_classes_and_zero_val() -> None:
    _, train_raw = ds.load_fashion_mnist("train")
    splits = ds.near_ood_split(id_classes=(9, 0), val_fraction=0.0)
    assert len(splits["val"]) == 0 and len(splits["train"]) == 12_000
    assert splits["train"].class_names == ("Ankle boot", "T-shirt/top")
    original = train_raw[splits["train"].source_indices]
    assert torch.equal(splits["train"].targets, torch.where(original == 9, 0, 1))
    assert len(splits["ood"]) == 8000


@pytest.mark.parametrize("gz", [True, False])
def test_gz_and_raw_files_load(tmp_path: pathlib.Path, gz: bool) -> None:
    arrays = write_fake_fmnist(tmp_path, gz=gz)
    assert ds.find_fashion_mnist(tmp_path) == tmp_path.resolve()
    for split in ("train", "test"):
        images, labels = ds.load_fashion_mnist(split, root=tmp_path)
        assert np.array_equal(images.numpy(), arrays[split][0])
        assert np.array_equal(labels.numpy(), arrays[split][1])
        assert labels.dtype == torch.int64


def test_mixed_and_misnamed_compression(tmp_path: pathlib.Path) -> None:
    images, labels = write_split(tmp_path, "test", 7, gz=True)
    # An uncompressed file with a .gz name: compression is detected from content.
    raw_labels = idx_bytes(2049, (7,), labels.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(raw_labels)
    got_images, got_labels = ds.load_fashion_mnist("test", root=tmp_path)
    assert np.array_equal(got_images.numpy(), images)
    assert np.array_equal(got_labels.numpy(), labels)


def test_bad_indices(tmp_path: pathlib.Path) -> None:
    write_split(tmp_path, "test", 5)
    assert len(ds.FashionMNIST("test", root=tmp_path, indices=np.array([4, 0]))) == 2
    with pytest.raises(IndexError, match=r"0\.\.4"):
        ds.FashionMNIST("test", root=tmp_path, indices=[5])
    with pytest.raises(TypeError, match="integer row numbers"):
        ds.FashionMNIST("test", root=tmp_path, indices=np.ones(5, dtype=bool))


def test_rewritten_file_is_read_afresh(tmp_path: pathlib.Path) -> None:
    write_split(tmp_path, "test", 5)
    assert len(ds.load_fashion_mnist("test", root=tmp_path)[1]) == 5
    write_split(tmp_path, "test", 8)
    assert len(ds.load_fashion_mnist("test", root=tmp_path)[1]) == 8


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("bad magic", r"not a readable IDX image file \(no valid IDX header\)"),
        ("swapped", r"not a readable IDX label file \(.*1 dimension instead of 3\)"),
        ("truncated", r"image file \(shape '\[5, 28, 28\]' is invalid for input of size 3820"),
        ("trailing data", r"image file \(shape .* size 3923\); it is truncated, corrupt"),
        ("short header", r"not a readable IDX label file \(no valid IDX header\)"),
        ("truncated gzip", r"image file \(Compressed file ended"),
        ("count mismatch", "holds 5 images but .* holds 4 labels"),
        ("label range", r"labels must lie in 0\.\.9, found \[12\]"),
        ("wrong size", r"expected \(N, 28, 28\)"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path: pathlib.Path, how: str, match: str) -> None:
    culprit = corrupt(tmp_path, how)
    with pytest.raises(ValueError, match=match) as info:
        ds.load_fashion_mnist("test", root=tmp_path)
    message = str(info.value)
    assert str(culprit.resolve()) in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def test_missing_files_error_names_location_and_fix(isolated: pathlib.Path) -> None:
    empty = isolated / "empty"
    empty.mkdir()
    assert ds.find_fashion_mnist(empty) is None
    with pytest.raises(FileNotFoundError) as info:
        ds.load_fashion_mnist("train", root=empty)
    message = str(info.value)
    assert str(empty) in message and "train-images-idx3-ubyte[.gz]" in message
    assert "download=True" in message and "OODUNLEASH_FASHION_MNIST" in message
    # Only the test split present: it loads, but find() wants the whole dataset.
    write_split(empty, "test", 3)
    assert ds.find_fashion_mnist(empty) is None
    assert len(ds.FashionMNIST("test", root=empty)) == 3


def test_env_var_resolution(isolated: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, root_dir = isolated / "from-env", isolated / "from-root"
    env_arrays = write_fake_fmnist(env_dir)
    write_fake_fmnist(root_dir, gz=False)
    assert ds.find_fashion_mnist() is None and not ds.fashion_mnist_available()

    monkeypatch.setenv(ds.FASHION_MNIST_ENV, str(env_dir))
    assert ds.find_fashion_mnist() == env_dir.resolve()
    assert ds.fashion_mnist_available()
    images, _ = ds.load_fashion_mnist("train")
    assert np.array_equal(images.numpy(), env_arrays["train"][0])
    assert ds.find_fashion_mnist(root_dir) == root_dir.resolve()  # root wins over env

    # A set but wrong env var is an error, not a silent fallback to another copy.
    write_fake_fmnist(isolated / "no-debian")
    monkeypatch.setenv(ds.FASHION_MNIST_ENV, str(isolated / "typo"))
    assert ds.find_fashion_mnist() is None
    with pytest.raises(FileNotFoundError, match="OODUNLEASH_FASHION_MNIST="):
        ds.load_fashion_mnist("test")


def test_debian_then_cache_fallback(isolated: pathlib.Path) -> None:
    cache = ds.default_cache_dir()
    assert cache == isolated / "xdg-cache" / "oodunleash" / "fashion-mnist"
    write_fake_fmnist(cache)
    assert ds.find_fashion_mnist() == cache.resolve()
    write_fake_fmnist(isolated / "no-debian")
    assert ds.find_fashion_mnist() == (isolated / "no-debian").resolve()


def test_root_accepts_parent_layouts(tmp_path: pathlib.Path) -> None:
    write_fake_fmnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert ds.find_fashion_mnist(tmp_path) == (tmp_path / "FashionMNIST" / "raw").resolve()
    assert len(ds.FashionMNIST("train", root=tmp_path)) == 20


def test_synthetic_near_ood_split(tmp_path: pathlib.Path) -> None:
    arrays = write_fake_fmnist(tmp_path)
    splits = ds.near_ood_split(id_classes=(1, 3), root=tmp_path, val_fraction=0.5, seed=3)
    assert sorted(
        splits["val"].source_indices.tolist() + splits["train"].source_indices.tolist()
    ) == [1, 3, 11, 13]
    assert set(arrays["test"][1][splits["ood"].source_indices.numpy()]) == set(range(10)) - {1, 3}


def test_download_into_cache(
    isolated: pathlib.Path, mirror: Mirror, served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision's own downloader, pointed at a local mirror: no network.
    monkeypatch.setattr(TorchvisionFashionMNIST, "mirrors", [served])
    with pytest.raises(FileNotFoundError):
        ds.load_fashion_mnist("test")
    images, labels = ds.load_fashion_mnist("test", download=True)
    assert np.array_equal(images.numpy(), mirror.arrays["test"][0])
    raw = ds.default_cache_dir() / "FashionMNIST" / "raw"  # torchvision's layout
    assert leftovers(raw) == ALL_FILES
    assert leftovers(ds.default_cache_dir()) == ["FashionMNIST"]  # no staging left behind
    assert ds.find_fashion_mnist() == raw.resolve()
    # Already there: a second download=True does not touch the (now gone) server.
    for path in mirror.path.iterdir():
        path.unlink()
    assert len(ds.FashionMNIST("train", download=True)) == 20


def test_download_into_root_from_base_url(
    tmp_path: pathlib.Path, mirror: Mirror, served: str
) -> None:
    if True:
        base = served.rstrip("/")
        target = tmp_path / "data"
        raw = target / "FashionMNIST" / "raw"
        assert ds.download_fashion_mnist(target, base_url=base) == raw.resolve()
        images, _ = ds.load_fashion_mnist("train", root=target)
        assert np.array_equal(images.numpy(), mirror.arrays["train"][0])
        # A file missing on the server (HTTP 404) fails cleanly, naming the server, and
        # keeps what was saved before.
        (raw / "t10k-labels-idx1-ubyte.gz").unlink()
        (raw / "t10k-labels-idx1-ubyte").unlink()
        (mirror.path / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(OSError, match=r"Could not download Fashion-MNIST from http://.*404"):
            ds.download_fashion_mnist(target, base_url=base)
        assert leftovers(target) == ["FashionMNIST"]
        assert "t10k-labels-idx1-ubyte.gz" not in leftovers(raw)
        assert "train-images-idx3-ubyte" in leftovers(raw)


def test_download_checksum_mismatch_leaves_nothing(
    tmp_path: pathlib.Path, served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = [(name, "0" * 32) for name, _ in TorchvisionFashionMNIST.resources]
    monkeypatch.setattr(TorchvisionFashionMNIST, "resources", bad)
    monkeypatch.setattr(TorchvisionFashionMNIST, "mirrors", [served])
    target = tmp_path / "data"
    with pytest.raises(OSError, match="corrupted.*Nothing was saved"):
        ds.load_fashion_mnist("train", root=target, download=True)
    assert leftovers(target) == []


def test_download_unreachable_source(tmp_path: pathlib.Path) -> None:
    closed = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    missing = f"http://127.0.0.1:{closed.server_address[1]}/"
    closed.server_close()  # nothing listens there now
    with pytest.raises(OSError, match="Could not download Fashion-MNIST from http://127"):
        ds.download_fashion_mnist(tmp_path / "data", base_url=missing)
    assert leftovers(tmp_path / "data") == []


@pytest.mark.parametrize(("require", "outcome"), [("1", "1 error"), ("0", "1 skipped")])
def test_missing_data_fixture(tmp_path: pathlib.Path, require: str, outcome: str) -> None:
    env = dict(os.environ)
    env.update(
        {
            ds.FASHION_MNIST_ENV: str(tmp_path),  # an empty directory: data "missing"
            "OODUNLEASH_REQUIRE_FASHION_MNIST": require,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_real_load_shapes_and_labels",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert (result.returncode != 0) == (require == "1")
