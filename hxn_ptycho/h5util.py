"""Small HDF5 helpers shared by the scan and result files: atomic writes, field checks."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from .errors import BadInput


class FileFormatError(BadInput):
    """A scan or result file is missing a field or has a malformed one; the message names it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A unique temporary name beside ``path``, renamed into place only on success (removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, mode)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes (read in 1 MiB blocks)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> dict[str, int]:
    """What changes whenever a file's bytes do: its inode, size, and modification and status-change
    times in ns (the status-change time cannot be set back by a user; a replacement is a new inode)."""
    st = os.stat(path)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def file_sha256_fingerprint(path: str | os.PathLike) -> tuple[str, dict[str, int] | None]:
    """(SHA-256, fingerprint) of a file: the fingerprint (:func:`file_fingerprint`) taken before the
    file is read, None when the file changed while it was read. Whoever later finds the same
    fingerprint knows the digest without reading the file again (the publisher: hashed once)."""
    before = file_fingerprint(path)
    digest = file_sha256(path)
    return digest, before if file_fingerprint(path) == before else None


def remove_parts(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` (or a job's rank 0) left beside ``path`` when the
    process writing them was killed (``.NAME.*.part``); return what was removed."""
    path = Path(path)
    gone = []
    for part in path.parent.glob(f".{path.name}.*.part"):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            gone.append(part)
    return gone


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file beside ``path``; rename it into place only on success."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", locking=False) as f:   # the flags of the readers (read_h5): one process may hold both
            yield f


def read_h5(path: str | os.PathLike, **kwargs) -> h5py.File:
    """Open one of our HDF5 files for reading, without HDF5's file lock.

    Our files are written under a temporary name and renamed into place whole (:func:`atomic_h5`), or
    grown by a SWMR writer, so a reader never needs the lock. Taking it fails at random: a process
    forked (a job's ``mpiexec``, any subprocess) while a writer held a file open inherits the writer's
    exclusive ``flock`` until it closes its descriptors, and a reader that asks for the lock then gets
    EAGAIN ("unable to lock file, errno = 11") although the file is whole."""
    return h5py.File(path, "r", locking=False, **kwargs)


def open_h5(path: str | os.PathLike, kind: str) -> h5py.File:
    """Open an HDF5 file for reading, with an error that names the file and what it should be."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{kind} file not found: {path}")
    try:
        return read_h5(path)
    except OSError as exc:
        raise FileFormatError(f"{kind} file {path} is not a readable HDF5 file ({exc})") from None


def require(f: h5py.File, name: str, kind: str) -> h5py.Dataset:
    if name not in f:
        raise FileFormatError(f"{kind} file {f.filename}: missing field '{name}'")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise FileFormatError(f"{kind} file {f.filename}: field '{name}' is not a dataset")
    return obj


def require_shape(arr_shape: tuple, expected: tuple, name: str, kind: str, filename: str) -> None:
    """``expected`` may hold None for a free axis."""
    ok = len(arr_shape) == len(expected) and all(e is None or e == a for a, e in zip(arr_shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise FileFormatError(f"{kind} file {filename}: field '{name}' has shape {tuple(arr_shape)}, expected {want}")


def require_finite(arr: np.ndarray, name: str, kind: str, filename: str) -> None:
    if not np.all(np.isfinite(arr)):
        raise FileFormatError(f"{kind} file {filename}: field '{name}' contains NaN or infinite values")


def scalar(f: h5py.File, name: str, kind: str, positive: bool = True) -> float:
    ds = require(f, name, kind)
    try:
        value = float(np.asarray(ds[()]).reshape(()))
    except (TypeError, ValueError):
        raise FileFormatError(f"{kind} file {f.filename}: field '{name}' is not a scalar number") from None
    if not np.isfinite(value) or (positive and value <= 0):
        raise FileFormatError(f"{kind} file {f.filename}: field '{name}' = {value} must be a positive finite number")
    return value


def h5_differences(a_path: str | os.PathLike, b_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(datasets, attributes) in either HDF5 file that are missing from the other or differ there,
    compared strictly, both ways: a dataset by its path, the root's attributes by name, another
    object's as ``path@name`` (e.g. a live scan file against the post-stop export of its run)."""
    ds: set[str] = set()
    at: set[str] = set()
    with read_h5(a_path) as a, read_h5(b_path) as b:
        for x, y in ((a, b), (b, a)):
            names: list[str] = []
            x.visit(names.append)
            for k in names:
                if isinstance(x[k], h5py.Dataset) and (k not in y or not np.array_equal(x[k][()], y[k][()])):
                    ds.add(k)
                at |= {f"{k}@{m}" for m in x[k].attrs
                       if k not in y or m not in y[k].attrs or not np.array_equal(x[k].attrs[m], y[k].attrs[m])}
            at |= {m for m in x.attrs if m not in y.attrs or not np.array_equal(x.attrs[m], y.attrs[m])}
    return sorted(ds), sorted(at)
