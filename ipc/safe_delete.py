"""Deleting only what this tool made, never through a symbolic link (issue 21 items 2 and 8).

The rule for every delete of ``clean``, ``chaos`` and ``sweep``:

* the **root** (the directory an entry is removed from) is opened with ``O_DIRECTORY | O_NOFOLLOW`` and
  everything after works relative to that descriptor: a root that is a symbolic link, not a directory,
  or not owned by this user is refused (``shared_ok``: a sticky directory owned by root, like ``/tmp``,
  is accepted too — entries in it are still checked one by one);
* an **entry** is looked at with ``lstat`` relative to the root: a symbolic link is never followed and
  never removed (:class:`Refused`, the caller reports it); only real directories, regular files and
  sockets owned by this user go;
* a directory is opened ``O_NOFOLLOW`` and must be the one lstat saw; ``check(fd)`` (the caller's
  recognition: a marker file, its contents) must accept it; then ``shutil.rmtree(name, dir_fd=root)``
  removes it without following any link inside (``shutil.rmtree.avoids_symlink_attacks``, true on
  Linux: the fd-based walk; on a platform without it we refuse rather than walk by path).

Directories made for a run's scratch space carry a marker, :data:`MARKER` (``<pid> <start time>``,
:func:`make_owned_dir`), so ``clean`` can tell ours from anything else and a dead owner from a live one
(the start time defeats pid reuse).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable

from ipc.proc import identity_alive, proc_starttime

MARKER = ".pagetrack-owner"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """A delete that the rule forbids (a link, not ours, not recognised): the message says why."""


def open_root(root: str | os.PathLike, *, shared_ok: bool = False) -> int:
    """A descriptor of the directory ``root`` (close it); :class:`Refused` if ``root`` is a symbolic
    link, not a directory, or owned by someone else (``shared_ok``: unless it is a sticky directory
    owned by root, like /tmp). FileNotFoundError if it does not exist."""
    root = os.fspath(root)
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode):
        raise Refused(f"{root} is a symbolic link (never followed)")
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{root} is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid and not (shared_ok and st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
        raise Refused(f"{root} is owned by uid {st.st_uid}, not by you (uid {uid})")
    fd = os.open(root, _DIR_FLAGS)
    if not os.path.samestat(st, os.fstat(fd)):
        os.close(fd)
        raise Refused(f"{root} changed while being checked")
    return fd


def lstat_at(root_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=root_fd, follow_symlinks=False)


def open_dir_at(root_fd: int, name: str, st: os.stat_result | None = None) -> int:
    """``name`` in ``root_fd`` opened as a directory without following a link (close it); with ``st``
    (its lstat) it must still be that directory."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=root_fd)
    except OSError as e:
        raise Refused(f"{name}: cannot open as a real directory ({e.strerror})") from None
    if st is not None and not os.path.samestat(st, os.fstat(fd)):
        os.close(fd)
        raise Refused(f"{name} changed while being checked")
    return fd


def remove_entry(root_fd: int, name: str, *, check: Callable[[int], str | None] | None = None,
                 label: str | None = None) -> bool:
    """Remove the entry ``name`` of the directory ``root_fd`` by the rule above; False if it was
    already gone. ``check(dir_fd)`` returns None to accept a directory, else why it is not ours.
    ``label`` names the entry in messages (default: ``name``)."""
    label = label or name
    if "/" in name or name in ("", ".", ".."):
        raise Refused(f"{label}: not a plain entry name")
    try:
        st = lstat_at(root_fd, name)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise Refused(f"{label} is a symbolic link (never followed, not removed)")
    if st.st_uid != os.geteuid():
        raise Refused(f"{label} is owned by uid {st.st_uid}, not by you")
    if stat.S_ISDIR(st.st_mode):
        if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover (Linux has the fd-based walk)
            raise Refused(f"{label}: this platform's rmtree could follow links; not removed")
        fd = open_dir_at(root_fd, name, st)
        try:
            why = check(fd) if check is not None else None
        finally:
            os.close(fd)
        if why:
            raise Refused(f"{label}: {why}")
        shutil.rmtree(name, dir_fd=root_fd)
        return True
    if check is not None:
        raise Refused(f"{label} is not a directory")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
        raise Refused(f"{label} is neither a directory, a regular file nor a socket")
    os.unlink(name, dir_fd=root_fd)
    return True


def remove_path(path: str | os.PathLike, *, marker: bool = False, shared_root: bool = False,
                check: Callable[[int], str | None] | None = None) -> bool:
    """:func:`remove_entry` of ``path`` in its parent directory (the root). ``marker``: a directory
    must hold this process's :data:`MARKER` (see :func:`make_owned_dir`); ``shared_root``: the parent
    may be a sticky root-owned directory (/tmp)."""
    path = os.path.abspath(os.fspath(path))
    root, name = os.path.split(path)
    if marker:
        check = _own_marker
    fd = open_root(root, shared_ok=shared_root)
    try:
        return remove_entry(fd, name, check=check, label=path)
    finally:
        os.close(fd)


def remove_quietly(path: str | os.PathLike, **kw) -> str | None:
    """:func:`remove_path` that never raises: None when done (or already gone), else why not."""
    try:
        remove_path(path, **kw)
        return None
    except (Refused, OSError) as e:
        return str(e) or type(e).__name__


# -- the owner marker ------------------------------------------------------------------------------


def make_owned_dir(prefix: str, dir: str | None = None) -> str:
    """``tempfile.mkdtemp(prefix=...)`` (mode 0700) holding :data:`MARKER` with this process's pid
    and start time; the directory is removed again if the marker cannot be written. ``dir`` (default:
    the temp dir) is resolved here, once: the path returned has no link in it to refuse later."""
    path = tempfile.mkdtemp(prefix=prefix, dir=os.path.realpath(dir or tempfile.gettempdir()))
    try:
        pid = os.getpid()
        fd = os.open(os.path.join(path, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid} {proc_starttime(pid) or 0}\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # just made by mkdtemp (0700): nobody else is in it
        raise
    return path


def read_marker(dir_fd: int) -> tuple[int, int | None] | None:
    """(pid, start time or None) from the :data:`MARKER` in the directory ``dir_fd``; None if it is
    missing, a link, not a regular file of ours or unreadable."""
    try:
        fd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        words = os.read(fd, 128).split()
        pid = int(words[0])
        start = int(words[1]) if len(words) > 1 and int(words[1]) > 0 else None
        return (pid, start) if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def marker_owner_alive(owner: tuple[int, int | None]) -> bool:
    """Is the process that wrote the marker still alive (same pid and start time)?"""
    return identity_alive(*owner)


def _own_marker(dir_fd: int) -> str | None:
    owner = read_marker(dir_fd)
    if owner is None:
        return f"no {MARKER} marker: not made by pagetrack-sim"
    if owner[0] != os.getpid():
        return f"its {MARKER} names pid {owner[0]}, not this process"
    return None
