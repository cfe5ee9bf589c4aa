"""Fashion-MNIST: where its files are, torchvision's reader and downloader, and the near-OOD split.

The files are the original IDX files (torchvision's format), gzipped or not. They are looked
for as :func:`find_fashion_mnist` describes: Debian's ``dataset-fashion-mnist`` package, a
directory named by ``$OODUNLEASH_FASHION_MNIST``, or torchvision's ``FashionMNIST/raw`` layout
under a data root. ``download=True`` uses torchvision's downloader (MD5-checked).

Example:
    >>> splits = near_ood_split(id_classes=(0, 1, 2, 3, 4, 5))  # doctest: +SKIP
    >>> image, label = splits["train"][0]  # doctest: +SKIP
    >>> image.shape, splits["ood"][0][1]  # doctest: +SKIP
    (torch.Size([1, 28, 28]), -1)
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from oodunleash.bench.images import (
    IMAGE_SIDE,
    ImageTensorDataset,
    check_classes,
    check_fraction,
    check_split,
    remap_labels,
    stratified_holdout,
)

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FashionMNIST",
    "default_cache_dir",
    "download_fashion_mnist",
    "fashion_mnist_available",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "near_ood_split",
]

#: Environment variable naming a directory that holds the four IDX files.
FASHION_MNIST_ENV = "OODUNLEASH_FASHION_MNIST"
#: Where Debian's ``dataset-fashion-mnist`` package installs the files.
DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
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

Split = Literal["train", "test"]

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NUM_CLASSES = 10
_FIX = (
    "apt-get install -y dataset-fashion-mnist, set "
    f"{FASHION_MNIST_ENV} to a directory holding the IDX files, or pass download=True"
)


# ------------------------------------------------------------------ locating the files
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


def _with_torchvision_layout(base: pathlib.Path) -> list[pathlib.Path]:
    # torchvision's download puts the files in <root>/FashionMNIST/raw.
    return [base, base / "FashionMNIST" / "raw"]


def _search_plan(root: str | os.PathLike[str] | None) -> tuple[list[pathlib.Path], str]:
    """Directories to look in, in order, and a description of them for error messages.

    An explicit ``root`` or environment variable is authoritative: a typo there should give an
    error rather than silently fall back to some other copy of the data.
    """
    if root is not None:
        base = pathlib.Path(root).expanduser()
        dirs = [*_with_torchvision_layout(base), base / "fashion-mnist"]
        return dirs, f"root={str(base)!r}"
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return _with_torchvision_layout(
            pathlib.Path(env).expanduser()
        ), f"{FASHION_MNIST_ENV}={env!r}"
    dirs = [DEBIAN_FASHION_MNIST_DIR, *_with_torchvision_layout(default_cache_dir())]
    return dirs, " or ".join(str(d) for d in dirs)


def _download_target(root: str | os.PathLike[str] | None) -> pathlib.Path:
    if root is not None:
        return pathlib.Path(root).expanduser()
    env = os.environ.get(FASHION_MNIST_ENV)
    return pathlib.Path(env).expanduser() if env else default_cache_dir()


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """Locate a directory holding all four Fashion-MNIST IDX files.

    Looks, in order of precedence, at:

    1. ``root`` if given (also torchvision's ``root/FashionMNIST/raw`` and
       ``root/fashion-mnist``);
    2. otherwise the directory named by ``$OODUNLEASH_FASHION_MNIST`` if set (or its
       ``FashionMNIST/raw``);
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


# ------------------------------------------------------------------ downloading
def download_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    force: bool = False,
) -> pathlib.Path:
    """Download the four Fashion-MNIST files with torchvision (about 30 MB, MD5-checked).

    The files land in ``<root>/FashionMNIST/raw`` (torchvision's layout), gzipped and
    extracted. They are downloaded into a temporary directory next to it and moved in only when
    all four passed their checksums, so a failed or interrupted download leaves nothing behind.
    Files already found under ``root`` are kept unless ``force`` is set.

    Args:
        root: Target directory. Defaults to ``$OODUNLEASH_FASHION_MNIST`` if set, else
            :func:`default_cache_dir`.
        base_url: An HTTP(S) server to download from instead of torchvision's mirror (the
            files under their canonical names).
        force: Download again even if the files exist.

    Returns:
        The directory holding the files.

    Raises:
        OSError: A file could not be fetched, or failed its checksum.

    Example:
        >>> download_fashion_mnist("~/data")  # doctest: +SKIP
        PosixPath('/home/me/data/FashionMNIST/raw')
    """
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    target = _download_target(root)
    found = find_fashion_mnist(target)
    if found is not None and not force:
        return found
    mirrors = TorchvisionFashionMNIST.mirrors if base_url is None else [base_url.rstrip("/") + "/"]
    # Named like torchvision's class, so that its raw folder is <root>/FashionMNIST/raw.
    downloader = type("FashionMNIST", (TorchvisionFashionMNIST,), {"mirrors": mirrors})
    final = target / "FashionMNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as staging:
        try:
            downloader(staging, train=False, download=True)
        except (RuntimeError, OSError) as exc:
            reason = " ".join(str(exc).split())  # torchvision's message spans lines
            raise OSError(
                f"Could not download Fashion-MNIST from {', '.join(mirrors)}: {reason} Check the "
                "network connection, or get the files another way: apt-get install -y "
                f"dataset-fashion-mnist, or set {FASHION_MNIST_ENV} to a directory holding the "
                "IDX files. Nothing was saved."
            ) from exc
        final.mkdir(parents=True, exist_ok=True)
        for path in (pathlib.Path(staging) / "FashionMNIST" / "raw").iterdir():
            os.replace(path, final / path.name)
    return final.resolve()


# ------------------------------------------------------------------ reading and validation
def _is_gzip(path: pathlib.Path) -> bool:
    # Judged by content, not by name: a renamed file should still load.
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_idx(path: pathlib.Path, kind: Literal["image", "label"]) -> torch.Tensor:
    """One IDX file through torchvision's reader (which reads uncompressed files only)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if kind == "image" else read_label_file
    try:
        if not _is_gzip(path):
            return reader(str(path))
        with tempfile.TemporaryDirectory() as tmp:
            plain = pathlib.Path(tmp) / path.name.removesuffix(".gz")
            with gzip.open(path, "rb") as source, open(plain, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            return reader(str(plain))
    except (AssertionError, TypeError, ValueError, RuntimeError, KeyError, EOFError, zlib.error,
            gzip.BadGzipFile) as exc:  # fmt: skip
        # torchvision checks the header with bare asserts.
        reason = str(exc) or "no valid IDX header"
        raise ValueError(
            f"{path}: not a readable IDX {kind} file ({reason}); it is truncated, corrupt, "
            f"or not the {kind} file. Delete it and reinstall: {_FIX}."
        ) from exc


def _decode_split(
    images_path: pathlib.Path, labels_path: pathlib.Path
) -> tuple[torch.Tensor, torch.Tensor]:
    images = _read_idx(images_path, "image")
    if tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(
            f"{images_path}: images have dimensions {tuple(images.shape)}, expected "
            f"(N, {IMAGE_SIDE}, {IMAGE_SIDE}); this is not Fashion-MNIST. Replace the file: {_FIX}."
        )
    labels = _read_idx(labels_path, "label")
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
    return _decode_split(pathlib.Path(images_path), pathlib.Path(labels_path))


def _load_shared(
    split: str, root: str | os.PathLike[str] | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`load_fashion_mnist` but returns the cached tensors themselves."""
    check_split(split)
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
    """Load one Fashion-MNIST split as raw tensors, read by torchvision.

    The files are found as described in :func:`find_fashion_mnist` and validated (torchvision's
    header checks, image size, image/label counts, label range). Decoded splits are cached
    in-process, keyed by file path and modification time; the returned tensors are copies, so
    modifying them is safe.

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


def _check_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    array = np.asarray(indices).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"indices must be integer row numbers, got dtype {array.dtype}.")
    rows = torch.from_numpy(array.astype(np.int64))
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"indices must lie in 0..{n - 1} (rows of the split), got values outside.")
    return rows


# ------------------------------------------------------------------ datasets
class FashionMNIST(ImageTensorDataset):
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
        kept_classes = (
            tuple(range(_NUM_CLASSES)) if classes is None else check_classes(classes, _NUM_CLASSES)
        )
        images, labels = _load_shared(split, root, download)
        rows = (
            torch.arange(len(labels)) if indices is None else _check_indices(indices, len(labels))
        )
        targets = remap_labels(labels[rows], kept_classes, _NUM_CLASSES)
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
    ids = check_classes(id_classes, _NUM_CLASSES)
    check_fraction("val_fraction", val_fraction)
    ood_classes = tuple(c for c in range(_NUM_CLASSES) if c not in ids)
    if not ood_classes:
        raise ValueError("id_classes uses all 10 classes; hold at least one back as OOD.")
    _, labels = _load_shared("train", root, download)
    labels_np = labels.numpy()
    id_rows = np.flatnonzero(np.isin(labels_np, ids))
    train_pos, val_pos = stratified_holdout(labels_np[id_rows], val_fraction, seed, stage=0)
    common = {"classes": ids, "root": root, "download": download, "normalize": normalize}
    return {
        "train": FashionMNIST("train", indices=id_rows[train_pos], **common),
        "val": FashionMNIST("train", indices=id_rows[val_pos], **common),
        "test": FashionMNIST("test", **common),
        "ood": FashionMNIST("test", ood_classes, root, download, normalize, ood_label=-1),
    }
