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
