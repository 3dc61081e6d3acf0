"""Output locations are input: checked before any work starts, written atomically after it.

- ``check_out_dir(path, flag, create=True)``: ``--out DIR``. It must be a directory (or be creatable:
  its nearest existing ancestor a writable directory), writable, with at least ``MIN_FREE_BYTES`` free
  on its file system. ``create=False`` only checks (nothing is created: the early checks of
  ``launch.py`` run before the command has validated the rest of its input).
- ``check_out_file(path, flag)``: ``--json FILE``, ``--trace FILE``: the parent directory exists
  and is writable, the path is not a directory, and there is ``MIN_FREE_BYTES`` of room.
- ``write_atomic(path, data, what=..., flag=...)``: a temporary file in the same directory, fsync,
  ``os.replace``. A write that fails (disk full, ...) removes its temporary file (no half-written
  ``.tmp`` is left) and then tries to keep what was measured: the same bytes go to
  ``rescue_dir()`` (``$PTS_RESCUE_DIR``, else ``<tmp>/pagetrack-sim-rescued``). Either way an
  ``OutputError`` follows, one line naming the path, the reason, what it held and where it went
  (or that it is lost when the rescue failed too).

Every failure is a ``UsageError`` (``OutputError`` is one), so ``launch.py`` prints one line and
exits 2. This module lives in ipc/ because every layer writes outputs (vm/ may not import lab/).
"""

from __future__ import annotations

import errno
import os
import secrets
import tempfile
from pathlib import Path

from ipc.errors import UsageError

MIN_FREE_BYTES = 1 << 20  # 1 MiB: room for at least a results document
RESCUE_ENV = "PTS_RESCUE_DIR"


class OutputError(UsageError):
    """An output could not be written (after the work was done); one line, exit 2."""


def _free_bytes(d: str) -> int | None:
    try:
        st = os.statvfs(d)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _check_dir(d: str, what: str, flag: str) -> None:
    """``d`` (an existing path) is a writable directory with room; else a UsageError."""
    if not os.path.isdir(d):
        raise UsageError(f"{flag}: {what}: {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: {what}: directory {d} is not writable")
    free = _free_bytes(d)
    if free is not None and free < MIN_FREE_BYTES:
        raise UsageError(f"{flag}: {what}: only {free / (1 << 20):.2f} MiB free on the file system of {d} "
                         f"(at least {MIN_FREE_BYTES >> 20} MiB needed)")


def _nearest_existing(p: str) -> str:
    """``p`` or its nearest ancestor that exists (a lexical walk up the absolute path)."""
    cur = os.path.abspath(p)
    while not os.path.lexists(cur):
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    return cur


def check_out_dir(path: str | os.PathLike, flag: str = "--out", *, create: bool = True) -> Path:
    """An output directory: exists (``create``: is created) or can be, is writable, has room."""
    p = str(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise UsageError(f"{flag}: {p} exists and is not a directory")
    if not os.path.isdir(p):
        anc = _nearest_existing(p)
        _check_dir(anc, p, flag)  # the directory that will hold it
        if create:
            try:
                os.makedirs(p, exist_ok=True)
            except OSError as e:
                raise UsageError(f"{flag}: cannot create {p}: {e.strerror}") from None
        else:
            return Path(p)
    _check_dir(p, p, flag)
    return Path(p)


def check_out_file(path: str | os.PathLike, flag: str) -> Path:
    """An output file: not a directory, its directory exists, is writable and has room."""
    p = str(path)
    if os.path.isdir(p):
        raise UsageError(f"{flag}: {p} is a directory")
    d = os.path.dirname(os.path.abspath(p))
    if not os.path.lexists(d):
        raise UsageError(f"{flag}: {p}: directory {d} does not exist")
    _check_dir(d, p, flag)
    return Path(p)


def rescue_dir() -> str:
    return os.environ.get(RESCUE_ENV) or os.path.join(tempfile.gettempdir(), "pagetrack-sim-rescued")


def _write_tmp_and_replace(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _rescue(path: str, data: bytes) -> str | None:
    """Write ``data`` under ``rescue_dir()`` (a fresh name); its path, or None if that failed too."""
    d = rescue_dir()
    name = os.path.basename(path) or "output"
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, f".{ext}") if dot and stem else (name, "")
    dest = None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, dest = tempfile.mkstemp(prefix=f"{stem}-", suffix=ext, dir=d)  # a fresh name, kept
        os.close(fd)
        _write_tmp_and_replace(dest, data)
        return dest
    except OSError:
        if dest is not None:
            try:
                os.unlink(dest)
            except OSError:
                pass
        return None


def write_atomic(path: str | os.PathLike, data: str | bytes, *, what: str = "the output",
                 flag: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (same-directory temp file, fsync, rename). On an OSError
    nothing half-written stays; the data is rescued if possible and an ``OutputError`` names the path,
    ``what`` was in it and where it went (or that it is lost)."""
    p = os.fspath(path)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        _write_tmp_and_replace(p, raw)
        return
    except OSError as e:
        reason = e.strerror or (errno.errorcode.get(e.errno or 0) or type(e).__name__)
    saved = _rescue(p, raw)
    head = f"{flag} {p}" if flag else p
    if saved:
        raise OutputError(f"{head}: not written ({reason}); {what} saved to {saved} instead") from None
    raise OutputError(f"{head}: not written ({reason}), nor to {rescue_dir()}: {what} is lost") from None
