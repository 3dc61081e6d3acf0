"""Shared-memory regions: one declared layout per region, numpy views, owner-only unlink.

A region is one POSIX shared-memory segment named ``pts_<run_id>_<region>`` (``/dev/shm`` on
Linux). Its layout is declared once as a :class:`Layout` (an ordered list of numpy-typed fields,
each starting on its own 64-byte cache line). The owner (the coordinator of a run) creates and
unlinks every segment; other processes only attach.

Python 3.11 resource tracker: the owner creates ``/dev/shm/<name>`` itself (``O_CREAT | O_EXCL``,
0600: sized, reserved and mapped) and registers it with the run's resource tracker (as
``multiprocessing.shared_memory`` would) only once all of that succeeded; if the owner is SIGKILLed,
the tracker unlinks it once the last process of the run is gone (safety net). A creation that fails
unlinks what it made and never registers, so the tracker has nothing to say (``SharedMemory``
unregisters a name it never registered when its ``ftruncate`` / ``mmap`` fails: KeyError tracebacks
from the tracker after the one-line error). Attaching processes map ``/dev/shm/<name>`` directly and
never register, so an attaching process exiting can never unlink a segment early, and no "leaked
shared_memory" warning is produced by attachers.

Memory: the owner reserves every page of a segment when it creates it (``posix_fallocate``), so a
full ``/dev/shm`` is an ENOSPC at creation (:class:`ShmSpaceError`: one line, exit 2, the segment
unlinked), never a SIGBUS at the first touch of a page the tmpfs cannot supply. A filesystem that
cannot reserve (EINVAL / EOPNOTSUPP / ENOSYS) gets one warning line and sparse segments.

Mappings: owner and attachers alike map the segment with their own ``mmap`` object, and
:meth:`Region.close` never unmaps it explicitly: numpy views made from it keep no buffer export
(an explicit ``mmap.close()`` would succeed and leave them pointing at unmapped memory, a
segfault on the next access). Close releases the ``Mem`` (the C primitives then raise
``ValueError``), drops the views, and the mapping goes away with the last numpy view of it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import sys
import zlib
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from ipc import _prims
from ipc.errors import UsageError

CACHE_LINE = 64
SHM_DIR = "/dev/shm"
PREFIX = "pts_"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9]{1,24}$")


class ShmError(RuntimeError):
    """A segment could not be created, attached or does not match its layout."""


class ShmSpaceError(ShmError, UsageError):
    """``/dev/shm`` has no room for a segment: found when it is created (its memory is reserved
    then), so it is a one-line error and exit 2 (a ``UsageError``), never a SIGBUS mid-run."""


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.ENOMEM)
# posix_fallocate on a filesystem that cannot reserve (glibc emulates it where fallocate(2) is
# missing, but a filesystem may still refuse): sparse segments, after one warning line
_NO_FALLOCATE = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)
_fallocate_warned = False


def shm_free_bytes() -> int:
    """Bytes an unprivileged process may still allocate on the segments' filesystem (-1: unknown)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def reserve(fd: int, name: str, size: int) -> None:
    """Allocate every page of a new segment now (``posix_fallocate``): a tmpfs that is (nearly) full
    refuses here with ENOSPC. A sparse segment would be created all the same, and the first touch of
    a page the tmpfs cannot supply would kill that process with SIGBUS (the coordinator at set-up,
    or a vCPU mid-run). Attachers need nothing: the pages exist once the owner reserved them."""
    global _fallocate_warned
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in _NO_FALLOCATE:
            if not _fallocate_warned:
                _fallocate_warned = True
                sys.stderr.write(f"warning: shm: {SHM_DIR} cannot reserve segment memory "
                                 f"({errno.errorcode[e.errno]}): segments are sparse, a full {SHM_DIR} "
                                 f"may kill a process with SIGBUS\n")
                sys.stderr.flush()
            return
        if e.errno in _NO_SPACE:
            raise ShmSpaceError(f"shm: cannot reserve {name}: {size} bytes, {SHM_DIR} has {shm_free_bytes()} "
                                f"bytes free ({errno.errorcode[e.errno]})") from None
        raise ShmError(f"shm: cannot reserve {name}: {size} bytes: {e.strerror}") from None


@dataclass(frozen=True)
class Field:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # bytes, multiple of CACHE_LINE

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def word(self) -> int:
        """Word (8-byte) index of the field's start, as the C primitives address memory."""
        return self.offset // 8


class Layout:
    """An ordered, cache-line-aligned set of numpy fields: the one declaration of a region.

    ``Layout("rcu", [("hdr", np.int64, (8,)), ("slots", np.int64, (n, 8))])``
    """

    def __init__(self, name: str, fields: list[tuple[str, Any, tuple[int, ...] | int]]):
        self.name = name
        self.fields: dict[str, Field] = {}
        off = 0
        for fname, dt, shape in fields:
            shp = (shape,) if isinstance(shape, int) else tuple(shape)
            if any(s < 0 for s in shp):
                raise ValueError(f"layout {name}: field {fname} has a negative dimension {shp}")
            f = Field(fname, np.dtype(dt), shp, off)
            self.fields[fname] = f
            off += -(-max(f.nbytes, 1) // CACHE_LINE) * CACHE_LINE
        self.nbytes = max(off, CACHE_LINE)

    def __getitem__(self, name: str) -> Field:
        return self.fields[name]

    def views(self, buf) -> dict[str, np.ndarray]:
        return {
            f.name: np.ndarray(f.shape, dtype=f.dtype, buffer=buf, offset=f.offset)
            for f in self.fields.values()
        }


def line_key(region: str) -> int:
    """The key under which virtual time's line table knows a region's cache lines: from its layout
    name only, so that two runs (different run ids) hash the same lines to the same entries."""
    return (zlib.crc32(region.encode()) & 0x7FFFFFFF) + 1


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ShmError(f"bad run id {run_id!r}: 1-24 letters/digits")
    return run_id


def segment_name(run_id: str, region: str) -> str:
    return f"{PREFIX}{check_run_id(run_id)}_{region}"


class Region:
    """A mapped segment with its layout's numpy views (``region.v[field]``) and a ``Mem``
    (``region.mem``) for the C primitives, which address words (``region.word(field)``)."""

    def __init__(self, name: str, layout: Layout, owner: bool, mm: mmap.mmap, unlink):
        self.name = name
        self.layout = layout
        self.owner = owner
        self._mm = mm
        self._buf = memoryview(mm)
        self._unlink = unlink
        self.mem = _prims.Mem(self._buf)
        self.mem.vkey = line_key(layout.name)  # virtual time prices its lines' transfers (ipc/vtime.py)
        self.v = layout.views(self._buf)
        self.closed = False

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(cls, run_id: str, layout: Layout) -> Region:
        name = segment_name(run_id, layout.name)
        path = os.path.join(SHM_DIR, name)
        size = layout.nbytes

        def failed(e: OSError) -> ShmError:
            if e.errno in _NO_SPACE:  # no inode left (nr_inodes), or a size the tmpfs cannot hold
                return ShmSpaceError(f"shm: cannot create {name}: {size} bytes, {SHM_DIR} has "
                                     f"{shm_free_bytes()} bytes free ({errno.errorcode[e.errno]})")
            return ShmError(f"cannot create segment {name} ({size} bytes): {e.strerror}")

        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise ShmError(f"segment {name} already exists (stale run? try `launch.py clean`)") from None
        except OSError as e:
            raise failed(e) from None
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                os.ftruncate(fd, size)
            except OSError as e:
                raise failed(e) from None
            reserve(fd, name, size)  # a full /dev/shm: ENOSPC now, not SIGBUS later
            try:
                mm = mmap.mmap(fd, size)
            except OSError as e:
                raise failed(e) from None
        except BaseException:
            try:
                os.unlink(path)  # never registered: the tracker knows nothing of it
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)
        # the name as multiprocessing.shared_memory registers it (the tracker shm_unlinks it)
        resource_tracker.register("/" + name, "shared_memory")

        def unlink() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            resource_tracker.unregister("/" + name, "shared_memory")

        try:
            return cls(name, layout, True, mm, unlink)
        except BaseException:
            unlink()
            raise

    @classmethod
    def attach(cls, run_id: str, layout: Layout) -> Region:
        name = segment_name(run_id, layout.name)
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        except FileNotFoundError:
            raise ShmError(f"segment {name} does not exist (run gone?)") from None
        try:
            size = os.fstat(fd).st_size
            if size < layout.nbytes:
                raise ShmError(f"segment {name} has {size} bytes, layout {layout.name} needs {layout.nbytes}")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, layout, False, mm, None)

    # -- use ----------------------------------------------------------------------------
    def word(self, field: str, *index: int) -> int:
        """Word index (for ``mem`` and the C lock/RCU/histogram types) of ``field[index]``;
        ``index`` may name leading axes only (the start of that sub-array)."""
        f = self.layout[field]
        if f.dtype.itemsize != 8:
            raise ShmError(f"{self.layout.name}.{field} is not a 64-bit field")
        if len(index) > len(f.shape):
            raise IndexError(f"{self.layout.name}.{field}: too many indices {index} for shape {f.shape}")
        flat, stride = 0, int(np.prod(f.shape, dtype=np.int64))
        for i, n in zip(index, f.shape, strict=False):
            stride //= n
            if not 0 <= i < n:
                raise IndexError(f"{self.layout.name}.{field}: index {index} outside shape {f.shape}")
            flat += i * stride
        return f.word + flat

    def close(self) -> None:
        """Drop the mapping (see the module doc: it goes with the last numpy view of it); the
        owner also unlinks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.mem.release()
        self.v = {}
        try:
            self._buf.release()
        except BufferError:
            pass  # a memoryview export of our own survives; it keeps the mapping
        self._buf = None
        self._mm = None
        if self._unlink is not None:
            self._unlink()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_segments(run_id: str | None = None) -> list[str]:
    """Names of our segments in /dev/shm (of one run, or all)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    pre = PREFIX if run_id is None else f"{PREFIX}{run_id}_"
    return sorted(n for n in names if n.startswith(pre))


def unlink_segment(name: str) -> bool:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return True
    except FileNotFoundError:
        return False
