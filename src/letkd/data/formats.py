"""Readers for the official on-disk formats: idx (MNIST family), CIFAR pickles, archives.

Nothing here runs code from a data file: CIFAR pickles go through a restricted unpickler that
can only rebuild numpy arrays, and archives are extracted only after every member was checked
to stay inside the target folder.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataFormatError", "RefusedPickleError", "read_idx", "restricted_pickle_load", "read_cifar_pickle",
    "safe_extract_tar", "safe_extract_zip",
]


class DataFormatError(ValueError):
    """A data file exists but is not in the expected format (or is truncated)."""


class RefusedPickleError(DataFormatError, pickle.UnpicklingError):
    """A data pickle that holds something other than plain data and numpy arrays (never run)."""


# --------------------------------------------------------------------------------------- idx
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (``.gz`` or raw), checking its magic number and size.

    Format (yann.lecun.com/exdb/mnist): two zero bytes, a type code (0x08 = uint8), the number
    of dimensions, then one big-endian uint32 per dimension, then the data.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataFormatError(f"{path}: cannot read as an idx file (gzip or raw): {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path}: not an idx file: expected the magic bytes 00 00 <type> <ndim> with type one of "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}, got {raw[:4].hex(' ') or 'an empty file'}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise DataFormatError(f"{path}: expected an idx file with {expect_ndim} dimensions, it has {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        raise DataFormatError(
            f"{path}: idx header says shape {shape} ({need} bytes in all) but the file has {len(raw)} bytes"
            + (" (truncated: download it again)" if len(raw) < need else " (trailing data)")
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# ----------------------------------------------------------------------------- CIFAR pickles
def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 pickles (protocol < 3) call to rebuild a ``bytes`` object."""
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _reconstruct
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: this data pickle may only contain plain data and "
                "numpy arrays (a CIFAR file never needs anything else; the file may be malicious)"
            ) from None


def restricted_pickle_load(data: bytes | io.BufferedIOBase, *, encoding: str = "latin1") -> Any:
    """Unpickle plain data + numpy arrays only; any other class raises ``UnpicklingError``."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    return _RestrictedUnpickler(f, encoding=encoding).load()


def _plain(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("latin1")
    if isinstance(obj, dict):
        return {_plain(k): v for k, v in obj.items()}
    return obj


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Load one CIFAR python-version file (``train``, ``test``, ``meta``) safely; str keys."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = restricted_pickle_load(f)
    except pickle.UnpicklingError as e:
        if "refused" in str(e):
            raise RefusedPickleError(f"{path}: {e}") from None
        raise DataFormatError(f"{path}: not a readable CIFAR python pickle (UnpicklingError: {e})") from None
    except Exception as e:  # truncated / not a pickle
        raise DataFormatError(f"{path}: not a readable CIFAR python pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return _plain(obj)


# ---------------------------------------------------------------------------------- archives
def _inside(target: Path, name: str) -> Path:
    dest = (target / name).resolve()
    if os.path.isabs(name) or (dest != target and target not in dest.parents):
        raise DataFormatError(f"archive member {name!r} would be written outside {target}; refusing to extract")
    return dest


def safe_extract_tar(archive: str | os.PathLike, target: str | os.PathLike, *, prefix: str = "") -> None:
    """Extract regular files and folders (optionally only those under ``prefix``) of a tar archive."""
    target = Path(target).resolve()
    with tarfile.open(archive, "r:*") as tf:
        members = []
        for m in tf.getmembers():
            if prefix and not (m.name == prefix or m.name.startswith(prefix.rstrip("/") + "/")):
                continue
            if not (m.isfile() or m.isdir()):
                raise DataFormatError(f"{archive}: member {m.name!r} is a link or device; refusing to extract")
            _inside(target, m.name)
            members.append(m)
        if not members:
            raise DataFormatError(f"{archive}: no member under {prefix!r}")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(target, members=members, **kw)


def safe_extract_zip(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extract a zip archive after checking that no member escapes ``target``."""
    target = Path(target).resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _inside(target, info.filename)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise DataFormatError(f"{archive}: member {info.filename!r} is a symlink; refusing to extract")
        zf.extractall(target)
