"""Image datasets for the out-of-distribution benchmarks.

Everything here yields ``(image, label)`` pairs where ``image`` is a ``float32`` tensor of
shape ``(1, 28, 28)`` and ``label`` a Python ``int``. All sets share one normalisation (the
Fashion-MNIST mean and standard deviation), so in-distribution and OOD images go through
exactly the same preprocessing and a detector cannot tell them apart by scale alone.

In-distribution data:

* :class:`FashionMNIST` read from the original IDX files (see :func:`find_fashion_mnist` for
  where they are looked for) and :func:`near_ood_split`, which holds some classes back as
  near-OOD data.
* :class:`DigitsID` and :func:`digits_near_ood_split`: scikit-learn's 8x8 digits in the same
  format, for demos on machines without Fashion-MNIST.

Far-OOD data shipped with the dependencies (no download needed): :class:`DigitsOOD`,
:class:`SamplePhotoCrops` and :class:`NoiseOOD`, gathered by :func:`ood_sets`.

Example:
    >>> from oodunleash.datasets import near_ood_split, ood_sets
    >>> splits = near_ood_split(id_classes=(0, 1, 2, 3, 4, 5))  # doctest: +SKIP
    >>> image, label = splits["train"][0]  # doctest: +SKIP
    >>> image.shape, splits["ood"][0][1]  # doctest: +SKIP
    (torch.Size([1, 28, 28]), -1)
    >>> sorted(ood_sets("fashion-mnist"))
    ['digits', 'gaussian', 'photos', 'uniform']
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import operator
import os
import pathlib
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_URL",
    "DigitsID",
    "DigitsOOD",
    "FashionMNIST",
    "NoiseOOD",
    "SamplePhotoCrops",
    "default_cache_dir",
    "digits_near_ood_split",
    "download_fashion_mnist",
    "fashion_mnist_available",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "near_ood_split",
    "ood_sets",
]

#: Base URL of the canonical Fashion-MNIST mirror. Tests point this at a local server.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Environment variable naming a directory that holds the four IDX files.
FASHION_MNIST_ENV = "OODUNLEASH_FASHION_MNIST"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
#: Mean and standard deviation of Fashion-MNIST pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.286
FASHION_MNIST_STD = 0.353
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

# SHA-256 of the *decompressed* IDX payloads. Hashing the decompressed bytes rather than the
# .gz keeps the check valid for mirrors and distributions that recompress the files.
FASHION_MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

Split = Literal["train", "test"]
Sample = tuple[torch.Tensor, int]

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
_SIDE = 28
_NUM_CLASSES = 10
_FIX = (
    "apt-get install -y dataset-fashion-mnist, set "
    f"{FASHION_MNIST_ENV} to a directory holding the IDX files, or pass download=True"
)


# --------------------------------------------------------------------------------------------
# Locating and downloading the files
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """Directory that ``download=True`` fills when no ``root`` is given.

    Returns:
        ``$XDG_CACHE_HOME/oodunleash/fashion-mnist``, or ``~/.cache/oodunleash/fashion-mnist``.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "oodunleash" / "fashion-mnist"


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    # The uncompressed file is preferred when both exist: it reads several times faster.
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _has_files(directory: pathlib.Path, splits: Sequence[str]) -> bool:
    return all(_idx_file(directory, stem) is not None for s in splits for stem in _FILES[s])


def _search_plan(root: str | os.PathLike[str] | None) -> tuple[list[pathlib.Path], str]:
    """Directories to look in, in order, and a description of them for error messages.

    An explicit ``root`` or environment variable is authoritative: a typo there should give an
    error rather than silently fall back to some other copy of the data.
    """
    if root is not None:
        base = pathlib.Path(root).expanduser()
        # Also accept the layouts a parent directory commonly has (torchvision's included),
        # so pointing root at a shared data folder just works.
        dirs = [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
        return dirs, f"root={str(base)!r}"
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return [pathlib.Path(env).expanduser()], f"{FASHION_MNIST_ENV}={env!r}"
    dirs = [DEBIAN_FASHION_MNIST_DIR, default_cache_dir()]
    return dirs, " or ".join(str(d) for d in dirs)


def _download_target(root: str | os.PathLike[str] | None) -> pathlib.Path:
    if root is not None:
        return pathlib.Path(root).expanduser()
    env = os.environ.get(FASHION_MNIST_ENV)
    return pathlib.Path(env).expanduser() if env else default_cache_dir()


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """Locate a directory holding all four Fashion-MNIST IDX files.

    Looks, in order of precedence, at:

    1. ``root`` if given (also ``root/fashion-mnist`` and torchvision's
       ``root/FashionMNIST/raw``);
    2. otherwise the directory named by ``$OODUNLEASH_FASHION_MNIST`` if set;
    3. otherwise Debian's ``/usr/share/datasets/fashion-mnist`` (package
       ``dataset-fashion-mnist``) and then the download cache (:func:`default_cache_dir`).

    A given ``root`` or environment variable is not fallen back from: if the files are not
    there, the answer is ``None``. Each file may be gzipped (``.gz``) or not. The files are
    only checked for existence here; their contents are validated when loaded.

    Args:
        root: Directory to look in instead of the default locations.

    Returns:
        The absolute directory, or ``None`` if the files were not found.

    Example:
        >>> find_fashion_mnist()  # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    dirs, _ = _search_plan(root)
    for directory in dirs:
        if _has_files(directory, ("train", "test")):
            return directory.resolve()
    return None


def fashion_mnist_available() -> bool:
    """Whether Fashion-MNIST can be loaded without downloading.

    Returns:
        ``True`` if :func:`find_fashion_mnist` finds the files in a default location.
    """
    return find_fashion_mnist() is not None


def _payload_sha256(path: pathlib.Path) -> str:
    opener = gzip.open if _is_gzip(path) else open
    digest = hashlib.sha256()
    with opener(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_gzip(path: pathlib.Path) -> bool:
    # Judged by content, not by name: a renamed file should still load.
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _fetch(url: str, destination: pathlib.Path, sha256: str | None) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the destination and rename at the end, so an interrupted or failed
    # download never leaves a half-written file under the final name.
    fd, tmp_name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    tmp = pathlib.Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out, 1 << 20)
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = getattr(exc, "reason", exc)
            raise OSError(
                f"Could not download {url}: {reason}. Check the network connection, or "
                "get the files another way: apt-get install -y dataset-fashion-mnist, or set "
                f"{FASHION_MNIST_ENV} to a directory holding the IDX files."
            ) from exc
        if sha256 is not None:
            try:
                actual = _payload_sha256(tmp)
            except (OSError, EOFError, zlib.error) as exc:
                actual = f"unreadable ({exc})"
            if actual != sha256:
                raise ValueError(
                    f"Downloaded {url} has SHA-256 {actual}, expected {sha256}: the download is "
                    "corrupt or the server returned something else. Nothing was saved; retry "
                    "later, or apt-get install -y dataset-fashion-mnist."
                )
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    force: bool = False,
) -> pathlib.Path:
    """Download the four Fashion-MNIST IDX files (gzipped, about 30 MB in all).

    Files already present (gzipped or not) are kept unless ``force`` is set. Each file is
    written to a temporary name, checked against its known SHA-256 and only then renamed.

    Args:
        root: Target directory. Defaults to ``$OODUNLEASH_FASHION_MNIST`` if set, else
            :func:`default_cache_dir`.
        base_url: Where to download from; defaults to :data:`FASHION_MNIST_URL`. Any URL that
            ``urllib`` opens works, including ``file://``.
        force: Download again even if the files exist.

    Returns:
        The directory holding the files.

    Raises:
        OSError: A file could not be fetched.
        ValueError: A fetched file failed its checksum.

    Example:
        >>> download_fashion_mnist("~/data/fashion-mnist")  # doctest: +SKIP
        PosixPath('/home/me/data/fashion-mnist')
    """
    target = _download_target(root)
    base = base_url if base_url is not None else FASHION_MNIST_URL
    if not base.endswith("/"):
        base += "/"
    for split in ("train", "test"):
        for stem in _FILES[split]:
            if not force and _idx_file(target, stem) is not None:
                continue
            _fetch(base + stem + ".gz", target / (stem + ".gz"), FASHION_MNIST_SHA256.get(stem))
    return target.resolve()


# --------------------------------------------------------------------------------------------
# IDX decoding and validation
# --------------------------------------------------------------------------------------------


def _read_idx(path: pathlib.Path, magic: int, kind: str) -> tuple[tuple[int, ...], bytes]:
    """Decode one IDX file, returning its dimensions and the raw data after the header."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(
                f"{path}: damaged gzip stream ({exc}); the file is truncated or corrupt. "
                f"Delete it and reinstall: {_FIX}."
            ) from exc
    if len(raw) < 4:
        raise ValueError(
            f"{path}: only {len(raw)} bytes, too short for an IDX header; the file is "
            f"truncated. Delete it and reinstall: {_FIX}."
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        other = {_IMAGE_MAGIC: "an image file", _LABEL_MAGIC: "a label file"}.get(found)
        hint = f" It looks like {other}: are image and label files swapped?" if other else ""
        raise ValueError(
            f"{path}: bad magic number {found} (0x{found:08x}); an IDX {kind} file starts with "
            f"{magic} (0x{magic:08x}).{hint} Replace the file: {_FIX}."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: header is cut short ({len(raw)} of {header} bytes); the file is truncated. "
            f"Delete it and reinstall: {_FIX}."
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing data"
        raise ValueError(
            f"{path}: header declares dimensions {dims} ({expected} bytes of data) but the file "
            f"holds {actual} bytes; it is {state} or corrupt. Delete it and reinstall: {_FIX}."
        )
    return dims, raw[header:]


def _decode_split(images_path: pathlib.Path, labels_path: pathlib.Path) -> tuple[np.ndarray, ...]:
    dims, data = _read_idx(images_path, _IMAGE_MAGIC, "image")
    if len(dims) != 3 or dims[1:] != (_SIDE, _SIDE):
        raise ValueError(
            f"{images_path}: images have dimensions {dims}, expected (N, {_SIDE}, {_SIDE}); "
            f"this is not Fashion-MNIST. Replace the file: {_FIX}."
        )
    images = np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()
    dims_l, data_l = _read_idx(labels_path, _LABEL_MAGIC, "label")
    if len(dims_l) != 1:
        raise ValueError(
            f"{labels_path}: labels have dimensions {dims_l}, expected a single count. "
            f"Replace the file: {_FIX}."
        )
    labels = np.frombuffer(data_l, dtype=np.uint8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            f"labels; the two files belong to different sets or one is damaged. Replace "
            f"them: {_FIX}."
        )
    if len(labels) and labels.max() >= _NUM_CLASSES:
        bad = sorted({int(v) for v in labels[labels >= _NUM_CLASSES]})[:5]
        raise ValueError(
            f"{labels_path}: labels must lie in 0..{_NUM_CLASSES - 1}, found {bad}; the file is "
            f"corrupt or not Fashion-MNIST. Replace it: {_FIX}."
        )
    return images, labels


@functools.lru_cache(maxsize=4)
def _cached_split(
    images_path: str, labels_path: str, stamp: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    # `stamp` (mtimes and sizes) is part of the key so a replaced file is read afresh.
    del stamp
    images, labels = _decode_split(pathlib.Path(images_path), pathlib.Path(labels_path))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _check_split(split: str, allowed: Sequence[str] = ("train", "test")) -> None:
    if split not in allowed:
        raise ValueError(f"Unknown split {split!r}; use one of {', '.join(map(repr, allowed))}.")


def _load_shared(
    split: str, root: str | os.PathLike[str] | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`load_fashion_mnist` but returns the cached tensors themselves."""
    _check_split(split)
    dirs, where = _search_plan(root)
    directory = next((d for d in dirs if _has_files(d, (split,))), None)
    if directory is None:
        if not download:
            names = ", ".join(f"{stem}[.gz]" for stem in _FILES[split])
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files ({names}) not found in {where}. To fix: {_FIX}."
            )
        directory = download_fashion_mnist(_download_target(root))
    paths = [_idx_file(directory, stem) for stem in _FILES[split]]
    images_path, labels_path = (p.resolve() for p in paths if p is not None)
    stamp = tuple(v for p in (images_path, labels_path) for v in _stat_key(p))
    return _cached_split(str(images_path), str(labels_path), stamp)


def _stat_key(path: pathlib.Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_fashion_mnist(
    split: Split = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split as raw tensors.

    The files are found as described in :func:`find_fashion_mnist` and validated (magic
    numbers, declared sizes against actual sizes, image/label counts, label range). Decoded
    splits are cached in-process, keyed by file path and modification time; the returned
    tensors are copies, so modifying them is safe.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: Directory holding the IDX files instead of the default locations.
        download: If the files are not found, download them (see
            :func:`download_fashion_mnist`) into ``root``, ``$OODUNLEASH_FASHION_MNIST`` or the
            cache directory.

    Returns:
        ``(images, labels)``: ``uint8`` tensor of shape ``(N, 28, 28)`` and ``int64`` tensor of
        shape ``(N,)`` with values in ``0..9``.

    Raises:
        ValueError: Unknown split, or a file is corrupt (the message names the file).
        FileNotFoundError: The files are missing and ``download`` is false.

    Example:
        >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
        >>> images.shape, labels.dtype  # doctest: +SKIP
        (torch.Size([10000, 28, 28]), torch.int64)
    """
    images, labels = _load_shared(split, root, download)
    return images.clone(), labels.clone()


# --------------------------------------------------------------------------------------------
# Argument checking and splitting helpers
# --------------------------------------------------------------------------------------------


def _check_classes(classes: Sequence[int], num_classes: int = _NUM_CLASSES) -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)):
        raise TypeError(f"classes must be a sequence of class indices, got {classes!r}.")
    try:
        # operator.index rejects floats such as 2.5 instead of silently truncating them.
        result = tuple(operator.index(c) for c in classes)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"classes must be a sequence of integers, got {classes!r}.") from exc
    if not result:
        raise ValueError("classes is empty; give at least one class index.")
    bad = [c for c in result if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"Class indices {bad} out of range; valid indices are 0..{num_classes - 1}."
        )
    if len(set(result)) != len(result):
        raise ValueError(f"classes {result} contains duplicates.")
    return result


def _check_fraction(name: str, value: float, allow_zero: bool = True) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    return float(value)


def _check_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    array = np.asarray(indices).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"indices must be integer row numbers, got dtype {array.dtype}.")
    rows = torch.from_numpy(array.astype(np.int64))
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"indices must lie in 0..{n - 1} (rows of the split), got values outside.")
    return rows


def _stratified_holdout(
    labels: np.ndarray, fraction: float, seed: int, stage: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split row numbers into (kept, held out), holding out ``fraction`` of every class.

    Each class gets its own random stream, so a class's held-out rows do not depend on which
    other classes are present.
    """
    kept, held = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, stage, int(c)])
        rows = rows[rng.permutation(len(rows))]
        n_held = int(np.floor(len(rows) * fraction + 0.5))
        held.append(rows[:n_held])
        kept.append(rows[n_held:])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(kept)) if kept else empty,
        np.sort(np.concatenate(held)) if held else empty,
    )


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class _ImageTensorDataset(Dataset[Sample]):
    """Images held as one ``(N, 28, 28)`` tensor, normalised on access.

    ``data`` is either ``uint8`` in 0..255 or floating point in [0, 1]; ``targets`` is ``int64``.
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        normalize: bool,
        class_names: tuple[str, ...] = (),
    ) -> None:
        self.data = data
        self.targets = targets
        self.normalize = normalize
        self.class_names = class_names
        # Fold "to [0, 1]" and normalisation into one multiply-add per item.
        scale = 1.0 / 255.0 if data.dtype == torch.uint8 else 1.0
        if normalize:
            self._scale = scale / FASHION_MNIST_STD
            self._shift = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
        else:
            self._scale, self._shift = scale, 0.0

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> Sample:
        # Out-of-place on purpose: for float data `.to` returns the stored tensor itself.
        image = self.data[index].to(torch.float32) * self._scale + self._shift
        return image.unsqueeze(0), int(self.targets[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset at once, as the items would be.

        Returns:
            ``(images, labels)``: ``float32`` ``(N, 1, 28, 28)`` and ``int64`` ``(N,)``.
        """
        images = self.data.to(torch.float32) * self._scale + self._shift
        return images.unsqueeze(1), self.targets.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, normalize={self.normalize})"


class FashionMNIST(_ImageTensorDataset):
    """Fashion-MNIST as a map-style dataset of ``(float32 (1, 28, 28), int)`` pairs.

    The whole split is kept as one ``uint8`` tensor and items are sliced out of it, so access
    is fast and no image library is involved.

    Args:
        split: ``"train"`` or ``"test"``.
        classes: Optional subset of class indices (0..9). Only these classes are kept and their
            labels are re-mapped to ``0..len(classes) - 1`` in the order given.
        root: Directory holding the IDX files (see :func:`find_fashion_mnist`).
        download: Download the files if they are not found.
        normalize: Scale to [0, 1] then normalise with mean 0.286 and std 0.353.
        indices: Optional row numbers of the split to keep (e.g. a train/validation
            partition). Combined with ``classes``, rows of other classes are dropped.
        ood_label: If given, every item gets this label instead (used for OOD sets, e.g. -1).

    Attributes:
        data: ``uint8`` tensor ``(N, 28, 28)`` of the kept images.
        targets: ``int64`` tensor ``(N,)`` of the (re-mapped) labels.
        source_indices: ``int64`` tensor ``(N,)``: each item's row in the original split.
        classes: The original class indices kept.
        class_names: Names of the kept classes, in label order.

    Example:
        >>> shoes = FashionMNIST("test", classes=(5, 7, 9))  # doctest: +SKIP
        >>> shoes.class_names, len(shoes)  # doctest: +SKIP
        (('Sandal', 'Sneaker', 'Ankle boot'), 3000)
    """

    def __init__(
        self,
        split: Split = "train",
        classes: Sequence[int] | None = None,
        root: str | os.PathLike[str] | None = None,
        download: bool = False,
        normalize: bool = True,
        indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        ood_label: int | None = None,
    ) -> None:
        kept_classes = tuple(range(_NUM_CLASSES)) if classes is None else _check_classes(classes)
        images, labels = _load_shared(split, root, download)
        rows = (
            torch.arange(len(labels)) if indices is None else _check_indices(indices, len(labels))
        )
        lookup = torch.full((_NUM_CLASSES,), -1, dtype=torch.int64)
        lookup[list(kept_classes)] = torch.arange(len(kept_classes))
        targets = lookup[labels[rows]]
        rows, targets = rows[targets >= 0], targets[targets >= 0]
        if ood_label is not None:
            targets = torch.full_like(targets, int(ood_label))
        super().__init__(
            images[rows],
            targets,
            normalize,
            tuple(FASHION_MNIST_CLASSES[c] for c in kept_classes),
        )
        self.split = split
        self.classes = kept_classes
        self.source_indices = rows

    def __repr__(self) -> str:
        return (
            f"FashionMNIST(split={self.split!r}, classes={self.classes}, n={len(self)}, "
            f"normalize={self.normalize})"
        )


def near_ood_split(
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    download: bool = False,
    normalize: bool = True,
) -> dict[str, FashionMNIST]:
    """Near-OOD protocol on Fashion-MNIST: some classes are in-distribution, the rest OOD.

    Args:
        id_classes: In-distribution class indices; their labels become ``0..k-1`` in this
            order. The remaining classes are held back as OOD.
        root: Directory holding the IDX files (see :func:`find_fashion_mnist`).
        val_fraction: Fraction of each ID class's training images held out for validation,
            in [0, 1). Choose hyper-parameters on ``"val"``; never tune on the test sets.
        seed: Seed of the train/validation partition; the result is deterministic given it.
        download: Download the files if they are not found.
        normalize: Normalise like the other sets (see :class:`FashionMNIST`).

    Returns:
        Datasets ``"train"`` and ``"val"`` (disjoint parts of the ID training images),
        ``"test"`` (ID test images) and ``"ood"`` (test images of the held-back classes, all
        labelled -1).

    Example:
        >>> splits = near_ood_split((0, 1, 2, 3, 4, 5), val_fraction=0.1)  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'train': 32400, 'val': 3600, 'test': 6000, 'ood': 4000}
    """
    ids = _check_classes(id_classes)
    _check_fraction("val_fraction", val_fraction)
    ood_classes = tuple(c for c in range(_NUM_CLASSES) if c not in ids)
    if not ood_classes:
        raise ValueError("id_classes uses all 10 classes; hold at least one back as OOD.")
    _, labels = _load_shared("train", root, download)
    labels_np = labels.numpy()
    id_rows = np.flatnonzero(np.isin(labels_np, ids))
    train_pos, val_pos = _stratified_holdout(labels_np[id_rows], val_fraction, seed, stage=0)
    common = {"classes": ids, "root": root, "download": download, "normalize": normalize}
    return {
        "train": FashionMNIST("train", indices=id_rows[train_pos], **common),
        "val": FashionMNIST("train", indices=id_rows[val_pos], **common),
        "test": FashionMNIST("test", **common),
        "ood": FashionMNIST("test", ood_classes, root, download, normalize, ood_label=-1),
    }


@functools.lru_cache(maxsize=1)
def _digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    # 20x20 inside a 4-pixel border mirrors how MNIST-style digits sit in a 28x28 frame.
    big = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    framed = F.pad(big.clamp_(0.0, 1.0), (4, 4, 4, 4)).squeeze(1)
    return framed, torch.as_tensor(digits.target, dtype=torch.int64)


class DigitsOOD(_ImageTensorDataset):
    """scikit-learn's 1,797 handwritten digits as a far-OOD set for Fashion-MNIST.

    The 8x8 images (values 0..16) are scaled to [0, 1], upsampled to 20x20 (bilinear) and
    padded to 28x28, then normalised like Fashion-MNIST. Every label is -1.

    Args:
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> image, label = DigitsOOD()[0]
        >>> tuple(image.shape), label
        ((1, 28, 28), -1)
    """

    def __init__(self, normalize: bool = True) -> None:
        images, labels = _digits_28()
        super().__init__(images, torch.full_like(labels, -1), normalize)


class DigitsID(_ImageTensorDataset):
    """scikit-learn's digits as a 10-class in-distribution dataset in the 1x28x28 format.

    Meant for demos where Fashion-MNIST is missing. The 1,797 images are partitioned per
    class, deterministically given ``seed``: ``test_fraction`` of each class is the test
    split, and ``val_fraction`` of the remainder the validation split. The test split does
    not depend on ``val_fraction`` or ``classes``. Images are prepared as in
    :class:`DigitsOOD`.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        classes: Optional subset of digits; labels are re-mapped to ``0..len(classes) - 1`` in
            the order given.
        val_fraction: Fraction of the non-test images of each class used for validation, in
            [0, 1).
        test_fraction: Fraction of each class used for testing, in (0, 1).
        seed: Seed of the partition.
        normalize: Normalise with the Fashion-MNIST mean and std.
        ood_label: If given, every item gets this label instead.

    Attributes:
        data, targets, source_indices, classes, class_names: As in :class:`FashionMNIST`.

    Example:
        >>> train = DigitsID("train", classes=(0, 1, 2))
        >>> train.class_names, sorted(set(train.targets.tolist()))
        (('0', '1', '2'), [0, 1, 2])
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        classes: Sequence[int] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        seed: int = 0,
        normalize: bool = True,
        *,
        ood_label: int | None = None,
    ) -> None:
        _check_split(split, ("train", "val", "test"))
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction, allow_zero=False)
        kept_classes = tuple(range(10)) if classes is None else _check_classes(classes, 10)
        images, labels = _digits_28()
        labels_np = labels.numpy()
        rest, test = _stratified_holdout(labels_np, test_fraction, seed, stage=1)
        train_pos, val_pos = _stratified_holdout(labels_np[rest], val_fraction, seed, stage=2)
        rows_np = {"train": rest[train_pos], "val": rest[val_pos], "test": test}[split]
        rows_np = rows_np[np.isin(labels_np[rows_np], kept_classes)]
        rows = torch.from_numpy(rows_np)
        lookup = torch.full((10,), -1, dtype=torch.int64)
        lookup[list(kept_classes)] = torch.arange(len(kept_classes))
        targets = lookup[labels[rows]]
        if ood_label is not None:
            targets = torch.full_like(targets, int(ood_label))
        super().__init__(
            images[rows], targets, normalize, tuple(DIGIT_CLASSES[c] for c in kept_classes)
        )
        self.split = split
        self.classes = kept_classes
        self.source_indices = rows


def digits_near_ood_split(
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    val_fraction: float = 0.1,
    test_fraction: float = 0.3,
    seed: int = 0,
    *,
    normalize: bool = True,
) -> dict[str, DigitsID]:
    """Near-OOD protocol on scikit-learn's digits, shaped like :func:`near_ood_split`.

    Args:
        id_classes: In-distribution digits; the others are held back as OOD.
        val_fraction: Fraction of the ID training part held out for validation, in [0, 1).
        test_fraction: Fraction of each digit used for testing, in (0, 1).
        seed: Seed of the partition.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Returns:
        ``"train"``, ``"val"``, ``"test"`` (ID) and ``"ood"`` (test-part images of the
        held-back digits, labelled -1).

    Example:
        >>> splits = digits_near_ood_split((0, 1, 2, 3, 4, 5))
        >>> sorted(splits), splits["ood"][0][1]
        (['ood', 'test', 'train', 'val'], -1)
    """
    ids = _check_classes(id_classes, 10)
    ood_classes = tuple(c for c in range(10) if c not in ids)
    if not ood_classes:
        raise ValueError("id_classes uses all 10 digits; hold at least one back as OOD.")
    common = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "normalize": normalize,
    }
    return {
        "train": DigitsID("train", ids, **common),
        "val": DigitsID("val", ids, **common),
        "test": DigitsID("test", ids, **common),
        "ood": DigitsID("test", ood_classes, ood_label=-1, **common),
    }


@functools.lru_cache(maxsize=1)
def _gray_photos() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    weights = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    return tuple(
        (torch.from_numpy(np.asarray(img, dtype=np.float32)) @ weights).div_(255.0)
        for img in load_sample_images().images
    )


class SamplePhotoCrops(_ImageTensorDataset):
    """Grayscale 28x28 crops of scikit-learn's two sample photos, as a far-OOD set.

    Each crop picks a photo, a square size between ``min_size`` and ``max_size`` pixels and a
    position at random, and is resized to 28x28 (bilinear, antialiased). Labels are -1.

    Args:
        n: Number of crops.
        seed: Seed; the crops are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.
        min_size: Smallest crop side in pixels of the photo.
        max_size: Largest crop side (at most the photos' height, 427).

    Example:
        >>> crops = SamplePhotoCrops(n=10, seed=1)
        >>> len(crops), tuple(crops[0][0].shape)
        (10, (1, 28, 28))
    """

    def __init__(
        self,
        n: int = 2000,
        seed: int = 0,
        normalize: bool = True,
        min_size: int = 28,
        max_size: int = 160,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}.")
        photos = _gray_photos()
        limit = min(min(p.shape) for p in photos)
        if not 1 <= min_size <= max_size <= limit:
            raise ValueError(
                f"Need 1 <= min_size <= max_size <= {limit}, got min_size={min_size}, "
                f"max_size={max_size}."
            )
        rng = np.random.default_rng(seed)
        crops = torch.empty((n, _SIDE, _SIDE), dtype=torch.float32)
        for i in range(n):
            photo = photos[int(rng.integers(len(photos)))]
            size = int(rng.integers(min_size, max_size + 1))
            top = int(rng.integers(photo.shape[0] - size + 1))
            left = int(rng.integers(photo.shape[1] - size + 1))
            patch = photo[top : top + size, left : left + size][None, None]
            crops[i] = F.interpolate(
                patch, size=(_SIDE, _SIDE), mode="bilinear", align_corners=False, antialias=True
            )[0, 0]
        super().__init__(crops.clamp_(0.0, 1.0), torch.full((n,), -1), normalize)


class NoiseOOD(_ImageTensorDataset):
    """Synthetic noise images as a far-OOD set.

    Pixels are drawn in image space [0, 1] and then normalised like Fashion-MNIST.

    Args:
        kind: ``"gaussian"`` (mean 0.5, std 0.25, clipped to [0, 1]) or ``"uniform"``.
        n: Number of images.
        seed: Seed; the images are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> noise = NoiseOOD("uniform", n=4)
        >>> len(noise), noise[0][1]
        (4, -1)
    """

    def __init__(
        self,
        kind: Literal["gaussian", "uniform"] = "gaussian",
        n: int = 2000,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}.")
        generator = torch.Generator().manual_seed(seed)
        shape = (n, _SIDE, _SIDE)
        if kind == "gaussian":
            images = torch.randn(shape, generator=generator).mul_(0.25).add_(0.5).clamp_(0, 1)
        elif kind == "uniform":
            images = torch.rand(shape, generator=generator)
        else:
            raise ValueError(f"Unknown noise kind {kind!r}; use 'gaussian' or 'uniform'.")
        super().__init__(images, torch.full((n,), -1), normalize)
        self.kind = kind


def ood_sets(
    kind: Literal["fashion-mnist", "digits"] = "fashion-mnist",
    *,
    n: int = 2000,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    normalize: bool = True,
) -> dict[str, Dataset[Sample]]:
    """The shipped far-OOD sets suited to an in-distribution dataset.

    For Fashion-MNIST as ID data: ``"digits"`` (:class:`DigitsOOD`), ``"photos"``
    (:class:`SamplePhotoCrops`), ``"gaussian"`` and ``"uniform"`` (:class:`NoiseOOD`).

    For digits as ID data: ``"fashion-mnist"`` (the Fashion-MNIST test set, labelled -1; only
    if the files are found or ``download`` is set), then ``"photos"``, ``"gaussian"`` and
    ``"uniform"``.

    Args:
        kind: The in-distribution data, ``"fashion-mnist"`` or ``"digits"``.
        n: Size of the generated sets (photos and noise).
        seed: Seed of the generated sets.
        root: Where to look for Fashion-MNIST (digits ID only).
        download: Download Fashion-MNIST if missing (digits ID only).
        normalize: Normalise with the Fashion-MNIST mean and std.

    Returns:
        Name to dataset, each yielding ``(float32 (1, 28, 28), -1)``.

    Example:
        >>> sets = ood_sets("fashion-mnist", n=100)
        >>> {name: len(ds) for name, ds in sets.items()}
        {'digits': 1797, 'photos': 100, 'gaussian': 100, 'uniform': 100}
    """
    sets: dict[str, Dataset[Sample]] = {}
    if kind == "fashion-mnist":
        sets["digits"] = DigitsOOD(normalize)
    elif kind == "digits":
        if download or find_fashion_mnist(root) is not None:
            sets["fashion-mnist"] = FashionMNIST(
                "test", root=root, download=download, normalize=normalize, ood_label=-1
            )
    else:
        raise ValueError(f"Unknown in-distribution kind {kind!r}; use 'fashion-mnist' or 'digits'.")
    sets["photos"] = SamplePhotoCrops(n, seed, normalize)
    sets["gaussian"] = NoiseOOD("gaussian", n, seed, normalize)
    sets["uniform"] = NoiseOOD("uniform", n, seed, normalize)
    return sets


#: Characters :class:`GlyphsOOD` draws: capital letters and a few symbols, no digits.
GLYPH_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ&@#%?$"
#: The matplotlib-bundled fonts :class:`GlyphsOOD` draws with (files in ``mpl-data/fonts/ttf``).
GLYPH_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)

__all__ += ["GLYPH_CHARACTERS", "GLYPH_FONTS", "GlyphsOOD"]


@functools.cache
def _glyph_outline(char: str, font: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and codes of ``char`` in ``font``, centred on the origin, height 1."""
    import matplotlib
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    fname = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font
    path = TextPath((0, 0), char, size=1.0, prop=FontProperties(fname=str(fname)))
    vertices = np.asarray(path.vertices, dtype=np.float64)
    lo, hi = vertices.min(0), vertices.max(0)
    vertices = (vertices - (lo + hi) / 2) / max(float(hi[1] - lo[1]), 1e-6)
    return vertices, np.asarray(path.codes)


class GlyphsOOD(_ImageTensorDataset):
    """Rendered letters and symbols: auxiliary outliers for outlier exposure.

    Each image is one character of :data:`GLYPH_CHARACTERS` (capital letters A-Z and
    ``&@#%?$``, no digits) in one of matplotlib's bundled DejaVu fonts (:data:`GLYPH_FONTS`:
    Sans, Serif and Mono in several weights and slants), at a random height (50-95% of the
    image), rotation (±30°), horizontal stretch, position and brightness, drawn bright on
    black like Fashion-MNIST and rasterised with 4x4 supersampling. The set is disjoint from
    every benchmark OOD set (Fashion-MNIST classes, scikit-learn digits, photo crops, noise),
    so training against it and testing on those sets does not leak test data. Needs
    matplotlib (no download, no display).

    Args:
        n: Number of images.
        seed: Seed; the images are deterministic given it.
        normalize: Normalise with the Fashion-MNIST mean and std.

    Example:
        >>> glyphs = GlyphsOOD(n=8)
        >>> image, label = glyphs[0]
        >>> image.shape, label
        (torch.Size([1, 28, 28]), -1)
    """

    def __init__(self, n: int = 2000, seed: int = 0, normalize: bool = True) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}.")
        from matplotlib.path import Path

        sub = 4
        side = _SIDE * sub
        # Pixel-centre coordinates of the supersampled grid, y pointing up.
        coords = (np.arange(side) + 0.5) / sub
        xx, yy = np.meshgrid(coords, _SIDE - coords)
        grid = np.stack([xx.ravel(), yy.ravel()], axis=1)
        rng = np.random.default_rng(seed)
        images = torch.empty((n, _SIDE, _SIDE), dtype=torch.float32)
        for i in range(n):
            char = GLYPH_CHARACTERS[int(rng.integers(len(GLYPH_CHARACTERS)))]
            font = GLYPH_FONTS[int(rng.integers(len(GLYPH_FONTS)))]
            vertices, codes = _glyph_outline(char, font)
            height = rng.uniform(0.5, 0.95) * _SIDE
            stretch = rng.uniform(0.8, 1.25)
            angle = np.deg2rad(rng.uniform(-30.0, 30.0))
            cos, sin = np.cos(angle), np.sin(angle)
            scaled = vertices * height * np.array([stretch, 1.0])
            rotated = scaled @ np.array([[cos, sin], [-sin, cos]])
            lo, hi = rotated.min(0), rotated.max(0)
            # Random position that keeps the glyph inside the image where it fits.
            centre = np.array(
                [
                    rng.uniform(min(-lo[d], _SIDE / 2), max(_SIDE - hi[d], _SIDE / 2))
                    for d in range(2)
                ]
            )
            # Even-odd fill over the closed contours, so counters (O, B, @) stay open.
            # Only points in the glyph's bounding box are tested.
            box = np.all((grid >= lo + centre) & (grid <= hi + centre), axis=1)
            points = grid[box]
            hits = np.zeros(len(points), dtype=bool)
            for contour in Path(rotated + centre, codes).to_polygons(closed_only=True):
                hits ^= Path(contour).contains_points(points)
            inside = np.zeros(len(grid), dtype=bool)
            inside[box] = hits
            mask = torch.from_numpy(inside.reshape(side, side).astype(np.float32))
            coverage = F.avg_pool2d(mask[None, None], sub)[0, 0]
            images[i] = coverage * float(rng.uniform(0.6, 1.0))
        super().__init__(images.clamp_(0.0, 1.0), torch.full((n,), -1), normalize)
