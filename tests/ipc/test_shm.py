"""Shared-memory regions: create / attach / close / unlink, layouts, word indexing, permissions,
attachers never unlink, no resource-tracker noise."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, shm_segments

from ipc.errors import UsageError
from ipc.shm import (
    CACHE_LINE,
    SHM_DIR,
    Layout,
    Region,
    ShmError,
    ShmSpaceError,
    check_run_id,
    list_segments,
    segment_name,
    unlink_segment,
)


def small_layout(name: str = "test") -> Layout:
    return Layout(name, [
        ("a", "i8", (3,)),
        ("b", "u2", (100,)),
        ("c", "i8", (4, 8)),
        ("d", "f8", 1),
        ("e", "u1", (0,)),
        ("f", "i8", (2, 3, 8)),
    ])


def test_create_attach_close_unlink(run_id):
    lay = small_layout()
    name = segment_name(run_id, "test")
    r = Region.create(run_id, lay)
    try:
        assert r.owner and r.name == name
        assert os.path.exists(os.path.join(SHM_DIR, name))
        assert list_segments(run_id) == [name]
        a = Region.attach(run_id, lay)
        assert not a.owner
        r.v["a"][:] = [1, 2, 3]
        assert list(a.v["a"]) == [1, 2, 3]
        a.mem.store(a.word("c", 2) + 5, -7)
        assert r.v["c"][2, 5] == -7
        assert r.mem.fetch_add(r.word("a") + 1, 10) == 2 and a.v["a"][1] == 12
        a.close()
        a.close()  # idempotent
        assert a.closed and os.path.exists(os.path.join(SHM_DIR, name)), "attacher close unlinked"
        with pytest.raises(ValueError, match="released"):
            a.mem.load(0)
    finally:
        r.close()
    assert not os.path.exists(os.path.join(SHM_DIR, name)), "owner close did not unlink"
    r.close()  # idempotent
    with pytest.raises(ShmError, match="does not exist"):
        Region.attach(run_id, lay)


def test_context_manager_and_views_outliving_close(run_id):
    lay = small_layout()
    with Region.create(run_id, lay) as r:
        with Region.attach(run_id, lay) as a:
            kept = a.v["b"]  # a numpy view still alive at close: close must not raise
            kept_owner = r.v["c"]
            kept[:] = 5
        assert a.closed
        assert kept_owner[0, 0] == 0
        assert a.v == {}
    assert r.closed and not os.path.exists(os.path.join(SHM_DIR, r.name))
    # views made before close stay valid memory (no unmap under them: no segfault)
    assert int(kept.sum()) == 5 * kept.size
    kept_owner[1, 1] = 3
    assert kept_owner[1, 1] == 3
    del kept, kept_owner


def test_attach_missing_segment(run_id):
    with pytest.raises(ShmError, match="does not exist"):
        Region.attach(run_id, small_layout("nothere"))


def test_attach_too_small_and_duplicate_create(run_id):
    with Region.create(run_id, Layout("x", [("a", "i8", (8,))])):
        with pytest.raises(ShmError, match="needs"):
            Region.attach(run_id, Layout("x", [("a", "i8", (1000,))]))
        with pytest.raises(ShmError, match="already exists"):
            Region.create(run_id, Layout("x", [("a", "i8", (8,))]))


def test_bad_run_ids():
    for bad in ("", "a" * 25, "a_b", "a/b", "a b", "ä"):
        with pytest.raises(ShmError):
            check_run_id(bad)
    assert check_run_id("Run42") == "Run42"


def test_segment_mode_0600(run_id):
    with Region.create(run_id, small_layout()) as r:
        st = os.stat(os.path.join(SHM_DIR, r.name))
        assert stat.S_IMODE(st.st_mode) == 0o600


def test_layout_alignment_and_sizes(run_id):
    rng = np.random.default_rng(1)
    dtypes = ["i8", "u8", "u2", "u1", "f8", "i4"]
    for trial in range(50):
        fields = []
        for i in range(int(rng.integers(1, 8))):
            shape = tuple(int(x) for x in rng.integers(0, 40, size=int(rng.integers(1, 3))))
            fields.append((f"f{i}", dtypes[int(rng.integers(len(dtypes)))], shape))
        lay = Layout(f"l{trial}", fields)
        prev_end = 0
        for f in lay.fields.values():
            assert f.offset % CACHE_LINE == 0, (f, "not on a cache line")
            assert f.offset >= prev_end, "fields overlap"
            prev_end = f.offset + f.nbytes
        assert lay.nbytes % CACHE_LINE == 0 and lay.nbytes >= max(prev_end, CACHE_LINE)
    lay = small_layout()
    with Region.create(run_id, lay) as r:
        for name, view in r.v.items():
            assert view.ctypes.data % CACHE_LINE == 0, f"{name} view not 64-byte aligned"
            assert view.shape == lay[name].shape
        assert r.mem.nwords * 8 >= lay.nbytes
    with pytest.raises(ValueError, match="negative"):
        Layout("bad", [("a", "i8", (-1,))])


def test_word_indexing(run_id):
    lay = small_layout()
    with Region.create(run_id, lay) as r:
        assert r.word("a") == lay["a"].offset // 8
        assert r.word("c") == lay["c"].offset // 8
        assert r.word("c", 3) == r.word("c") + 24
        assert r.word("f", 1) == r.word("f") + 24
        assert r.word("f", 1, 2) == r.word("f") + 24 + 16
        assert r.word("f", 1, 2, 7) == r.word("f") + 24 + 16 + 7
        # word index and numpy view address the same memory
        r.mem.store(r.word("f", 1, 2) + 3, 99)
        assert r.v["f"][1, 2, 3] == 99
        with pytest.raises(IndexError):
            r.word("c", 4)
        with pytest.raises(IndexError):
            r.word("c", -1)
        with pytest.raises(IndexError):
            r.word("a", 0, 0)
        with pytest.raises(ShmError, match="not a 64-bit field"):
            r.word("b")
        with pytest.raises(KeyError):
            r.word("zzz")
        with pytest.raises(IndexError):
            r.mem.load(r.mem.nwords)


def attach_worker(run_id: str, how: str):
    r = Region.attach(run_id, small_layout())
    r.v["a"][0] += 1
    if how == "close":
        r.close()
    elif how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # "exit": just return with the mapping open


@pytest.mark.parametrize("how", ["close", "exit", "kill"])
def test_attaching_child_exit_does_not_unlink(ctx, procs, run_id, how):
    with Region.create(run_id, small_layout()) as r:
        for i in range(2):
            p = ctx.Process(target=attach_worker, args=(run_id, how))
            procs.append(p)
            p.start()
            p.join(30)
            assert p.exitcode == (-signal.SIGKILL if how == "kill" else 0)
            assert os.path.exists(os.path.join(SHM_DIR, r.name)), f"child ({how}) unlinked the segment"
            assert r.v["a"][0] == i + 1
        # still attachable
        with Region.attach(run_id, small_layout()) as a:
            assert a.v["a"][0] == 2


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from ipc.proc import forkserver_context
    from ipc.shm import Region, Layout

    def child(run_id):
        r = Region.attach(run_id, Layout("rt", [("a", "i8", (8,))]))
        r.v["a"][0] = 42
        r.close()

    if __name__ == "__main__":
        ctx = forkserver_context(["ipc.shm"])
        run_id = sys.argv[1]
        r = Region.create(run_id, Layout("rt", [("a", "i8", (8,))]))
        ps = [ctx.Process(target=child, args=(run_id,)) for _ in range(3)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        assert r.v["a"][0] == 42
        if sys.argv[2] == "close":
            r.close()
        print("ok")
""")


@pytest.mark.parametrize("mode", ["close", "leak"])
def test_no_resource_tracker_warning(tmp_path, run_id, mode):
    """A clean run (owner creates and closes, forkserver children attach) prints nothing from
    the resource tracker; an owner that forgets to close is warned about and cleaned up by it
    (the control proving the check can see a leak)."""
    script = tmp_path / "rt.py"
    script.write_text(_SCRIPT.format(root=str(ROOT)))
    res = subprocess.run([sys.executable, str(script), run_id, mode], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    name = segment_name(run_id, "rt")
    if mode == "close":
        assert "resource_tracker" not in res.stderr and "leaked" not in res.stderr, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
    else:
        assert "leaked shared_memory" in res.stderr
    assert name not in shm_segments()


def test_list_and_unlink_segment(run_id):
    r = Region.create(run_id, small_layout())
    try:
        assert r.name in list_segments()
        assert unlink_segment(r.name) is True
        assert unlink_segment(r.name) is False
        assert list_segments(run_id) == []
    finally:
        r.close()  # the segment is gone already: close tolerates it


# -- a full /dev/shm (issue 21, item 3): ENOSPC at creation, never SIGBUS at the first touch -------

def test_create_reserves_every_page(run_id):
    """The owner allocates the segment's memory when it creates it: a tmpfs without room says so
    then (a sparse segment would be created all the same and SIGBUS its first toucher)."""
    lay = Layout("resv", [("a", "i8", (100_000,)), ("b", "u1", (5000,))])
    with Region.create(run_id, lay) as r:
        st = os.stat(os.path.join(SHM_DIR, r.name))
        assert st.st_size == lay.nbytes
        assert st.st_blocks * 512 >= lay.nbytes, f"only {st.st_blocks * 512} of {lay.nbytes} bytes reserved"


def test_segment_larger_than_shm_is_refused_at_creation(run_id):
    """A segment larger than the whole /dev/shm: ShmSpaceError (a UsageError: exit 2, one line)
    naming the segment, its size and the free space; nothing left behind. tmpfs refuses such a size
    at once (nothing is allocated meanwhile), so the machine's /dev/shm is never filled."""
    vfs = os.statvfs(SHM_DIR)
    if vfs.f_blocks == 0:
        pytest.skip(f"{SHM_DIR} has no size limit")
    size = vfs.f_blocks * vfs.f_frsize + (1 << 20)
    lay = Layout("huge", [("a", "u1", (size,))])
    name = segment_name(run_id, "huge")
    try:
        r = Region.create(run_id, lay)
    except ShmSpaceError as e:
        err = e
    else:
        r.close()
        pytest.fail(f"a {size}-byte segment was created on a {SHM_DIR} of {vfs.f_blocks * vfs.f_frsize} bytes")
    assert isinstance(err, ShmError) and isinstance(err, UsageError)
    msg = str(err)
    assert re.fullmatch(rf"shm: cannot reserve {name}: {lay.nbytes} bytes, {SHM_DIR} has \d+ bytes free \(ENOSPC\)",
                        msg), msg
    assert "\n" not in msg
    assert not os.path.exists(os.path.join(SHM_DIR, name)) and list_segments(run_id) == []


# A private mount namespace whose /dev/shm is a fresh, small tmpfs (the machine's is not touched):
# what a full /dev/shm does to a real run. After the command, the tmpfs' leftovers on the last line.
_SMALL_SHM = ('mount -t tmpfs -o size="$SHM_SIZE",mode=1777 pts_small_shm /dev/shm || exit 97\n'
              '"$@"; rc=$?\n'
              'echo "LEFT:$(ls -A /dev/shm | tr "\\n" " ")"\n'
              'exit $rc\n')


def _in_small_shm(size: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHM_SIZE": size, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _SMALL_SHM, "sh", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)


@pytest.fixture(scope="module")
def small_shm():
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    p = _in_small_shm("64k", ["true"], timeout=30)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs on /dev/shm here: {p.stderr.strip()[:200]}")
    return _in_small_shm


_NEARLY_FULL = textwrap.dedent("""
    import os, sys
    from ipc.shm import Layout, Region, ShmSpaceError, list_segments
    small = Region.create("fill", Layout("small", [("a", "i8", (1000,))]))  # fits
    small.v["a"][:] = 7
    try:
        Region.create("fill", Layout("big", [("a", "u1", (1 << 20,))]))  # does not
    except ShmSpaceError as e:
        print("ERR", e)
    else:
        print("CREATED")
    blocks = os.stat("/dev/shm/" + small.name).st_blocks
    print("SEGMENTS", " ".join(list_segments("fill")), "BLOCKS", blocks)
    small.close()
""")


def test_nearly_full_shm_is_enospc_at_creation(small_shm):
    """A 256 KiB tmpfs: a small segment fits (its pages reserved), a 1 MiB one is refused at
    creation (before: created sparse, and the first touch of a page past the free space was a
    SIGBUS) and unlinked; the small one is unlinked by its close."""
    p = small_shm("256k", [sys.executable, "-c", _NEARLY_FULL])
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert re.fullmatch(r"ERR shm: cannot reserve pts_fill_big: 1048576 bytes, /dev/shm has \d+ bytes free "
                        r"\(ENOSPC\)", out[0]), p.stdout
    assert int(out[0].split(" has ")[1].split()[0]) < 1 << 20
    assert out[1].startswith("SEGMENTS pts_fill_small BLOCKS") and int(out[1].split()[-1]) * 512 >= 8000, out
    assert out[-1] == "LEFT:", out


def test_run_on_full_shm_exits_2_with_one_line(small_shm):
    """`launch.py run` on a /dev/shm too small for its segments: exit 2, one line naming the
    segment, its size and the free space, no traceback, no segment left (before: exit 135, SIGBUS,
    no output)."""
    p = small_shm("1m", [sys.executable, "launch.py", "run", "--vcpus", "2", "--duration", "0.5",
                         "--memory-mib", "4", "--quiet"])
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.fullmatch(r"error: shm: cannot (reserve|create) pts_\w+_\w+: \d+ bytes, /dev/shm has \d+ bytes "
                        r"free \(ENOSPC\)", err[0]), err[0]
    left = p.stdout.strip().splitlines()[-1]
    assert left.startswith("LEFT:") and "pts_" not in left, left


# -- creation failures are one line: nothing from the resource tracker, nothing left behind ---------

_HUGE = textwrap.dedent("""
    import sys
    from ipc.shm import Layout, Region, ShmError
    run_id = sys.argv[1]
    for _ in range(3):
        try:
            Region.create(run_id, Layout("huge", [("a", "u1", ((1 << 47) + 4096,))]))
        except ShmError as e:
            err = e
        else:
            sys.exit("created a 128 TiB segment")
    sys.exit(f"error: {type(err).__name__}: {err}")
""")


def test_failed_creation_is_one_line_without_tracker_noise(run_id):
    """A segment no tmpfs can hold (2**47 bytes): ShmSpaceError, one line; the resource tracker
    says nothing (before: SharedMemory's own failure path unregistered a name it never registered,
    and the tracker printed a KeyError traceback per attempt) and no segment is left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _HUGE, run_id], capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT), env=env)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert len(err) == 1, p.stderr
    assert "Traceback" not in p.stderr and "KeyError" not in p.stderr and "resource_tracker" not in p.stderr
    name = segment_name(run_id, "huge")
    assert re.fullmatch(rf"error: ShmSpaceError: shm: cannot (reserve|create) {name}: {(1 << 47) + 4096} bytes, "
                        rf"{SHM_DIR} has -?\d+ bytes free \(E[A-Z]+\)", err[0]), err[0]
    assert list_segments(run_id) == []


def test_created_segment_is_registered_with_the_tracker_after_success(run_id, monkeypatch):
    """Registered once created (the tracker's safety net), unregistered by the owner's close; a
    failed creation neither registers nor unregisters."""
    from multiprocessing import resource_tracker

    from ipc import shm
    calls = []
    monkeypatch.setattr(resource_tracker, "register", lambda n, t: calls.append(("reg", n, t)))
    monkeypatch.setattr(resource_tracker, "unregister", lambda n, t: calls.append(("unreg", n, t)))
    r = Region.create(run_id, small_layout())
    assert calls == [("reg", "/" + r.name, "shared_memory")]
    assert stat.S_IMODE(os.stat(os.path.join(SHM_DIR, r.name)).st_mode) == 0o600
    r.close()
    assert calls[1:] == [("unreg", "/" + r.name, "shared_memory")]
    calls.clear()

    def no_room(fd, off, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", no_room)
    with pytest.raises(ShmSpaceError, match=r"cannot reserve .*\(ENOSPC\)"):
        Region.create(run_id, small_layout())
    assert calls == [] and list_segments(run_id) == []


@pytest.mark.parametrize("code", ["EINVAL", "EOPNOTSUPP", "ENOSYS"])
def test_no_fallocate_warns_once_and_goes_sparse(run_id, monkeypatch, capsys, code):
    """A filesystem that cannot reserve: one warning line (once per process), the segment is
    created sparse and works."""
    import errno

    from ipc import shm

    def unsupported(fd, off, size):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(shm.os, "posix_fallocate", unsupported)
    monkeypatch.setattr(shm, "_fallocate_warned", False)
    lay = Layout("sparse", [("a", "i8", (100_000,))])
    for _ in range(2):
        with Region.create(run_id, lay) as r:
            r.v["a"][-1] = 5
            assert r.v["a"][-1] == 5
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: shm: ") and f"({errno.errorcode[getattr(errno, code)]})" in err[0], err
    assert list_segments(run_id) == []


@pytest.mark.parametrize("code", ["ENOSPC", "ENOMEM", "EFBIG"])
def test_fallocate_no_space_stays_an_error(run_id, monkeypatch, code):
    import errno

    from ipc import shm

    def no_space(fd, off, size):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(shm.os, "posix_fallocate", no_space)
    with pytest.raises(ShmSpaceError, match=rf"cannot reserve .*\({code}\)$"):
        Region.create(run_id, small_layout())
    assert list_segments(run_id) == []
