"""Reader and writer for the idx format of (Fashion-)MNIST, plain or gzipped.

Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a big-endian
uint32, then the data in big-endian order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from tfmq.errors import TfmqError

_TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx(.gz) file into an array, checking the magic number and the size."""
    path = Path(path)
    try:
        with _open(path) as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise TfmqError(f"cannot read idx file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPE_CODES:
        raise TfmqError(f"{path} is not an idx file (wrong magic number {raw[:4].hex() or 'empty'})")
    dtype = _TYPE_CODES[raw[2]]
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise TfmqError(f"{path} is truncated: its header promises {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_end
    if payload != expected:
        raise TfmqError(
            f"{path} is truncated or corrupt: shape {shape} needs {expected} data bytes, found {payload}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as idx (gzipped when the name ends in .gz); used by tests and by users' own data."""
    path = Path(path)
    array = np.asarray(array)
    code = next((c for c, d in _TYPE_CODES.items() if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize), None)
    if code is None:
        raise TfmqError(f"idx cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = array.astype(_TYPE_CODES[code]).tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as handle:
        handle.write(header + data)
