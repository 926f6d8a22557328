"""What the callbacks trust, and the checks that refuse the rest (see ``docs/trust.md``).

One module, one job: decide whether something that came from outside our own processes — a
saved-documents file, a detector file named by a document, a result named by an outcome record —
is ours to use. Every refusal names what was refused and why.

- **Saved documents** (``<result>.docs.jsonl``, written before a derived run is sent) carry an
  HMAC-SHA256 over their whole text, keyed by the *publish secret* of the folder they are saved
  in: ``FOLDER/.hxn_ptycho_secret``, 32 random bytes written once with mode 0600 by the first
  writer. A republisher sends a file only when the secret is a private regular file owned by the
  republishing user (mode without group/other bits), the saved file is owned by that user too, and
  the HMAC matches — so a file planted by someone who cannot read our secret is refused, whatever
  catalog or key file it names. (A secret beside the documents, not the catalog's API key: a key
  rotation must not strand documents saved under the old key, and a catalog with no key at all
  must still be protected.)
- **Detector files** named by resource / stream_resource documents must resolve (symlinks and
  ``..`` followed) under the configured data roots — ``ExportConfig.data_roots``, default
  :data:`DEFAULT_DATA_ROOTS` plus ``$HXN_PTYCHO_DATA_ROOTS`` (``os.pathsep``-separated) — and,
  when the resource names a ``root``, under that root too; they must be regular files.
- **Results**: the job writes the SHA-256 of its result into its outcome record; a result is
  published only when the outcome names this job's result file and the file still has that digest.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hxn_ptycho.errors import BadInput

log = logging.getLogger(__name__)

SECRET_NAME = ".hxn_ptycho_secret"
DATA_ROOTS_ENV = "HXN_PTYCHO_DATA_ROOTS"
# HXN's detector folders: /data (hxntools' handlers) and its remapped /nsls2/data/hxn/legacy
DEFAULT_DATA_ROOTS: tuple[str, ...] = ("/data", "/nsls2/data")
# the job gets no catalog credential: it only computes (the runner publishes)
JOB_ENV_DROPPED = ("TILED_API_KEY",)


class Untrusted(BadInput):
    """Something from outside our own processes is refused; the message names it and why."""


# -- private folders and the publish secret ------------------------------------------------------

def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700 when we own it (a work folder holds
    every frame and result of a beamline's users); return it."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if p.stat().st_uid == os.getuid():
            os.chmod(p, 0o700)
    except OSError as exc:
        log.warning("cannot make %s private (0700): %s", p, exc)
    return p


def _check_private(path: Path) -> os.stat_result:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{path} is not a regular file")
    if st.st_uid != os.getuid():
        raise Untrusted(f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})")
    if st.st_mode & 0o077:
        raise Untrusted(f"{path} is readable or writable by others (mode {stat.S_IMODE(st.st_mode):o})")
    return st


def publish_secret(folder: str | os.PathLike, *, create: bool = False) -> bytes:
    """The publish secret of ``folder`` (``FOLDER/.hxn_ptycho_secret``, 0600, owned by us).

    ``create`` writes one (``O_EXCL``: the first writer wins) when there is none. Refused
    (:class:`Untrusted`) when it is not ours or not private."""
    path = Path(folder) / SECRET_NAME
    if create and not path.exists():
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, os.urandom(32).hex().encode())
            finally:
                os.close(fd)
    try:
        _check_private(path)
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise Untrusted(f"no publish secret {path}: the documents beside it were not saved by hxn-ptycho "
                        "as this user") from None
    except OSError as exc:
        raise Untrusted(f"cannot read the publish secret {path}: {exc}") from None
    if len(secret) < 32:
        raise Untrusted(f"the publish secret {path} is too short")
    return secret


def sign(text: str, folder: str | os.PathLike) -> str:
    """HMAC-SHA256 (hex) of ``text`` under ``folder``'s publish secret (created if needed)."""
    return hmac.new(publish_secret(folder, create=True), text.encode(), hashlib.sha256).hexdigest()


def verify_saved(path: str | os.PathLike, body: str, mac: Any) -> None:
    """Refuse (:class:`Untrusted`) a saved-documents file we did not write: it must be owned by this
    user and carry the HMAC of its ``body`` under its folder's publish secret."""
    p = Path(path)
    st = os.lstat(p)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        raise Untrusted(f"refusing saved documents {p}: not a regular file owned by this user")
    if not isinstance(mac, str) or not mac:
        raise Untrusted(f"refusing saved documents {p}: they carry no signature (not written by hxn-ptycho)")
    want = hmac.new(publish_secret(p.parent), body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        raise Untrusted(f"refusing saved documents {p}: their signature does not match the publish secret "
                        f"of {p.parent} (changed, or not written by us)")


def same_catalog(named: Any, ours: Any) -> bool:
    """Whether a catalog named in a saved file (a URL, config file or server folder) is ``ours``."""
    if not named:
        return True
    from .catalog import CatalogConfig
    if isinstance(ours, CatalogConfig):
        if str(named).startswith(("http://", "https://")):
            return str(named).rstrip("/") == ours.uri.rstrip("/")
        return False
    if ours is None:
        return False
    a, b = str(named), str(ours)
    if a.startswith(("http://", "https://")) or b.startswith(("http://", "https://")):
        return a.rstrip("/") == b.rstrip("/")
    pa, pb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    pa = pa.parent if pa.name == "catalog.json" else pa
    pb = pb.parent if pb.name == "catalog.json" else pb
    return pa == pb


# -- detector files named by documents ------------------------------------------------------------

def data_roots(configured: Iterable[str] | None = None) -> tuple[Path, ...]:
    """The folders detector files may be read from: ``configured``, else the defaults and
    ``$HXN_PTYCHO_DATA_ROOTS``."""
    if configured is None:
        env = [r for r in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if r]
        configured = (*DEFAULT_DATA_ROOTS, *env)
    return tuple(dict.fromkeys(Path(os.path.realpath(os.path.expanduser(r))) for r in configured))


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def refuse_data_file(path: str, roots: tuple[Path, ...], own_root: str | None = None) -> str | None:
    """Why the detector file ``path`` may not be read (None: it may), after resolving symlinks and ``..``:
    it must lie under one of ``roots`` and, when its resource names a root, under that root; an
    existing one must be a regular file (not a device, FIFO or folder)."""
    real = Path(os.path.realpath(path))
    if own_root:
        top = Path(os.path.realpath(own_root))
        if not _under(real, top):
            return f"the detector file {path} resolves to {real}, outside its resource's root {own_root}"
    if not any(_under(real, r) for r in roots):
        return (f"the detector file {path} resolves to {real}, outside the data roots "
                f"({', '.join(map(str, roots)) or 'none'}): set --data-roots or ${DATA_ROOTS_ENV} to read it")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(real).st_mode):
            return f"the detector file {path} ({real}) is not a regular file"
    return None


# -- results and outcome records ------------------------------------------------------------------

def check_result(result_file: str | os.PathLike | None, outcome: dict) -> None:
    """Refuse (:class:`Untrusted`) a success outcome whose result is not this job's result file as
    the job wrote it: the outcome must name ``result_file`` and give its SHA-256, and the file must
    still have it.

    Hashed once: the job records the file's fingerprint (inode, size, modification and status-change
    times, :func:`~hxn_ptycho.h5util.file_fingerprint`) taken before it hashed the file; a file that
    still has that fingerprint has not been written or replaced since, so its digest is the job's and
    it is not read again. Any other file (replaced, rewritten, or an outcome without a fingerprint) is
    hashed and compared as before."""
    from hxn_ptycho.h5util import file_fingerprint, file_sha256
    named = outcome.get("result_file")
    if result_file is None or not named:
        raise Untrusted("the outcome record names no result file")
    if Path(named).resolve() != Path(result_file).resolve():
        raise Untrusted(f"the outcome record names {named}, not this job's result {result_file}")
    want = outcome.get("result_sha256")
    if not isinstance(want, str) or not want:
        raise Untrusted(f"the outcome record gives no digest of {named}")
    stat = outcome.get("result_stat")
    try:
        if isinstance(stat, dict) and stat and file_fingerprint(named) == stat:
            return                                  # unchanged since the job hashed it
        got = file_sha256(named)
    except OSError as exc:
        raise Untrusted(f"cannot read the result {named}: {exc}") from None
    if not hmac.compare_digest(got, want):
        raise Untrusted(f"the result {named} changed after the job wrote it (SHA-256 {got[:12]}…, "
                        f"the outcome record says {want[:12]}…)")


def job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job: ours without the catalog credentials, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_ENV_DROPPED}
    env.update(extra or {})
    for k in JOB_ENV_DROPPED:
        env.pop(k, None)
    return env


def job_time_limit(spec: Any, configured: float | None = None) -> float:
    """Seconds a job may run before it is ended: ``configured``, else 900 s + 0.05 s per view and
    iteration (tens of times what a CPU rank needs: a guard against a hung job, not a budget)."""
    if configured is not None:
        return float(configured)
    views = int(getattr(spec.geometry, "n_views", None) or 10_000)
    iterations = int(getattr(spec.params, "iterations", None) or 500)
    return 900.0 + 0.05 * views * iterations
