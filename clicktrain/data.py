"""Data sets from their original on-disk formats, validated, with clear errors.

Fashion-MNIST and MNIST come as IDX files (gzip-compressed or not). Nothing is ever
downloaded: the Debian package ``dataset-fashion-mnist`` installs the files under
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def default_data_dir() -> str:
    return os.environ.get("CLICKTRAIN_DATA") or DEFAULT_FASHION_MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed), checking its header against its size."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}. Re-install the data set "
                        f"(e.g. apt-get install --reinstall dataset-fashion-mnist).", original=exc) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); "
                        f"expected e.g. train-images-idx3-ubyte from Fashion-MNIST or MNIST")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is corrupt or truncated: header says shape {dims} "
                        f"({expected} bytes), the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory} has no {stem}[.gz]. Point --data (or $CLICKTRAIN_DATA) at a directory holding "
                    f"the Fashion-MNIST/MNIST IDX files; on Debian: apt-get install dataset-fashion-mnist "
                    f"(installs {DEFAULT_FASHION_MNIST}).")


def load_idx_split(directory: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float ``(N, 1, H, W)`` scaled to [0, 1] and labels as int64 ``(N,)``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist. Install Fashion-MNIST with "
                        f"`apt-get install dataset-fashion-mnist` or pass --data DIR.")
    images_file, labels_file = (_find(directory, s) for s in _SPLIT_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_file} {images.shape} and {labels_file} {labels.shape} do not match "
                        f"(expected N images of HxW and N labels)")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def normalize(x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
    """Per-channel standardisation; returns (x, mean, std) so test data can reuse train stats."""
    if mean is None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    return (x - mean) / std, mean, std


# -- CIFAR-10 (python pickles) and image-folder trees ---------------------------------------
def load_cifar10(directory: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10's python format: ``data_batch_1..5`` and ``test_batch`` (pickled dicts with
    ``data`` uint8 (N, 3072) and ``labels``), as extracted from cifar-10-python.tar.gz."""
    import pickle

    directory = Path(directory)

    def load(name):
        path = directory / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 directory {directory} has no {name}; expected data_batch_1..5 and "
                            f"test_batch from cifar-10-python.tar.gz") from None
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})", original=exc) from None
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
            raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0), torch.from_numpy(labels)

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = load("test_batch")
    return torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]), x_test, y_test


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image_folder(directory: str | os.PathLike):
    """``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png`` (any PIL format); class ids
    follow the sorted class names of ``train``; every image is resized to the first one's size
    and loaded grey if the first is grey, else RGB."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    classes = sorted(p.name for p in (directory / "train").iterdir() if p.is_dir()) if (directory / "train").is_dir() else []
    if not classes:
        raise DataError(f"{directory} is not an image-folder tree: expected {directory}/train/<class>/<image> "
                        f"and {directory}/test/<class>/<image>")
    mode, size = None, None

    def split(name):
        nonlocal mode, size
        xs, ys = [], []
        for label, cls in enumerate(classes):
            folder = directory / name / cls
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            for f in files:
                try:
                    with Image.open(f) as img:
                        if mode is None:
                            mode, size = ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB"), img.size
                        arr = np.asarray(img.convert(mode).resize(size), dtype=np.float32) / 255.0
                except (UnidentifiedImageError, OSError) as exc:
                    raise DataError(f"cannot read image {f}: {exc}", original=exc) from None
                xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                ys.append(label)
        if not xs:
            raise DataError(f"{directory / name} holds no images of {IMAGE_SUFFIXES} in class folders {classes}")
        return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)

    x_train, y_train = split("train")
    x_test, y_test = split("test")
    return x_train, y_train, x_test, y_test


def load_dataset(directory: str | os.PathLike):
    """Detect the format of ``directory`` (IDX, CIFAR-10 python, image folder) and load it as
    ``(x_train, y_train, x_test, y_test, format_name)`` with images as float in [0, 1]."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist. Install Fashion-MNIST with "
                        f"`apt-get install dataset-fashion-mnist` (files in {DEFAULT_FASHION_MNIST}) or pass --data DIR.")
    if any(directory.glob("train-images-idx3-ubyte*")) or any(directory.glob("train-images.idx3-ubyte*")):
        return (*load_idx_split(directory, "train"), *load_idx_split(directory, "test"), "idx")
    if (directory / "data_batch_1").exists():
        return (*load_cifar10(directory), "cifar10")
    if (directory / "train").is_dir():
        return (*load_image_folder(directory), "image-folder")
    raise DataError(f"{directory}: no known data set format. Expected Fashion-MNIST/MNIST IDX files "
                    f"(train-images-idx3-ubyte.gz, ...), CIFAR-10 python batches (data_batch_1..5, test_batch), "
                    f"or an image-folder tree (train/<class>/*, test/<class>/*).")
