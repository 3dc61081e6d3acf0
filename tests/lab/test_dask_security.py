"""Issue 21 item 1: nobody but the run runs code on the sweep's Dask cluster.

The LocalCluster of ``sweep`` / ``compare --map`` (``lab.sweep._client``, the code path the sweep uses)
listens on 127.0.0.1, which every local user can reach: it speaks only mutual TLS with credentials made
for the run, so a client without them (no TLS, plain TCP to the same port, other credentials, or the
cluster's own certificate trusted but a key of its own) cannot submit work. The rogue clients run in
their own processes, as another user's would. ``--scheduler``: ``tls://`` with ``--security FILE.toml``
(checked before anything starts), ``tcp://`` refused unless ``--insecure``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest

from ipc.errors import UsageError
from lab import scheduler, sweep

ROOT = Path(__file__).resolve().parents[2]
GRID = '[grid]\ndesign = ["mutex-hash", "rcu-list"]\n[fixed]\nvcpus = 2\nduration = 0.01\nclock = "virtual"\nseed = 1\n'

# a client in another process: ``RAN <pid>`` if its function ran on the cluster, else ``REFUSED <why>``
ROGUE = r"""
import os, ssl, sys
from distributed import Client
from distributed.security import Security

addr, mode = sys.argv[1], sys.argv[2]
host, port = addr.split("://")[1].rsplit(":", 1)
try:
    if mode == "none":  # no credentials at all
        sec = None
    elif mode == "plain":  # plain TCP to the same port
        sec, addr = None, f"tcp://{host}:{port}"
    elif mode == "other":  # TLS with credentials of its own
        sec = Security.temporary()
    elif mode == "trusting":  # trusts the cluster's certificate (any TLS client sees it), has its own key
        ca = ssl.get_server_certificate((host, int(port)), timeout=5)
        own = Security.temporary()
        sec = Security(tls_ca_file=ca, tls_client_cert=own.tls_client_cert, tls_client_key=own.tls_client_key,
                       require_encryption=True)
    elif mode == "own":  # the run's credentials (--security FILE.toml): the positive control
        sys.path.insert(0, sys.argv[4])
        from lab.scheduler import load_security
        sec = load_security(sys.argv[3])
    with Client(addr, timeout=5, security=sec, set_as_default=False) as c:
        pid = c.submit(os.getpid, pure=False).result(timeout=5)
except BaseException as e:
    print("REFUSED", type(e).__name__, str(e)[:300].replace("\n", " "), flush=True)
else:
    print("RAN", pid, flush=True)
"""


def _rogues(addr: str, modes: list[str], *extra: str) -> dict[str, str]:
    """Each mode's client in its own process, all at once; their one-line outcome."""
    procs = {m: subprocess.Popen([sys.executable, "-c", ROGUE, addr, m, *extra], cwd=tempfile.gettempdir(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in modes}
    out = {}
    for m, p in procs.items():
        try:
            o, e = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        lines = [ln for ln in o.splitlines() if ln.startswith(("RAN ", "REFUSED "))]
        assert len(lines) == 1, (m, p.returncode, o[-1000:], e[-2000:])  # the client itself worked
        out[m] = lines[0]
    return out


def _security_file(d: Path, sec) -> Path:
    """ca_file, cert, key of ``sec`` (in-memory PEMs) as files in a 0700 directory, and the TOML naming
    them by relative paths (relative to the TOML's directory)."""
    d.mkdir(mode=0o700)
    for name, pem in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert), ("key.pem", sec.tls_client_key)):
        fd = os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
    (d / "security.toml").write_text('ca_file = "ca.pem"\ncert = "cert.pem"\nkey = "key.pem"\n')
    return d / "security.toml"


@pytest.fixture
def sweep_cluster(tmp_path):
    """The sweep's own LocalCluster, started as ``run_points`` starts it (distributed imported first, as
    there: its config must exist before ``dask.config.set`` names its keys)."""
    import dask
    import distributed  # noqa: F401

    scratch = tmp_path / "dask"
    scratch.mkdir()
    with dask.config.set({"temporary-directory": str(scratch), "distributed.scheduler.http.routes": [],
                          "distributed.worker.http.routes": []}):
        client, cluster, _ = sweep._client(None, 1, str(scratch))
    try:
        yield client, cluster
    finally:
        client.close()
        cluster.close()


def test_a_client_without_the_runs_credentials_cannot_submit_work(sweep_cluster, tmp_path):
    client, cluster = sweep_cluster
    addr = cluster.scheduler_address
    assert client.submit(os.getpid, pure=False).result(timeout=30) != os.getpid()  # the run's own client works
    outcome = _rogues(addr, ["none", "plain", "other", "trusting"])
    ran = {m: o for m, o in outcome.items() if not o.startswith("REFUSED")}
    assert not ran, f"a client without the run's credentials ran code on {addr}: {ran}"
    # positive control: the same script with the run's credentials (as a --security file) gets in
    toml = _security_file(tmp_path / "creds", cluster.security)
    (own,) = _rogues(addr, ["own"], str(toml), str(ROOT)).values()
    assert own.startswith("RAN "), own


def test_every_listener_of_the_local_cluster_wants_the_runs_certificate(sweep_cluster):
    """Scheduler, workers and nannies: tls:// only (a worker also runs what it is sent)."""
    import socket
    import ssl

    client, cluster = sweep_cluster
    info = client.scheduler_info()
    addrs = [cluster.scheduler_address, *info["workers"], *(w["nanny"] for w in info["workers"].values())]
    assert len(addrs) == 3 and all(a.startswith("tls://127.0.0.1:") for a in addrs), addrs
    assert cluster.security.require_encryption
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # an attacker's: no certificate to show
    for a in addrs:
        host, port = a[len("tls://"):].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            try:  # accepted, a Dask listener would send its handshake; a timeout fails the test
                with ctx.wrap_socket(raw) as s:
                    s.settimeout(5)
                    s.sendall(b"\0" * 8)
                    got = s.recv(1)
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                got = b""
        assert got == b"", f"{a} answered a client without a certificate: {got!r}"


def test_a_tiny_sweep_runs_end_to_end_on_the_tls_local_cluster(tmp_path, monkeypatch):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    seen = []
    real = sweep._client

    def spy(*a, **kw):
        got = real(*a, **kw)
        seen.append((got[1].scheduler_address, got[1].security.require_encryption))
        return got

    monkeypatch.setattr(sweep, "_client", spy)
    out = tmp_path / "out"
    assert sweep.main(Namespace(grid=str(grid), out=str(out), scheduler=None, workers=1)) == 0
    assert len(seen) == 1 and seen[0][0].startswith("tls://127.0.0.1:") and seen[0][1], seen
    merged = json.loads((out / "sweep.json").read_text())
    assert len(merged) == 2 and all(r["verdict"] == "SUCCESS" for r in merged)


def test_a_tls_scheduler_with_security_file_runs_the_sweep_and_chaos(tmp_path):
    """``--scheduler tls://... --security FILE.toml``: a cluster the test owns (its own credentials);
    the probe with other credentials fails in one line."""
    import dask
    from distributed import LocalCluster
    from distributed.security import Security

    from lab import chaos

    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    sec = Security.temporary()
    toml = _security_file(tmp_path / "creds", sec)
    out = tmp_path / "out"
    with dask.config.set({"temporary-directory": str(tmp_path / "dask")}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", protocol="tls",
                         security=sec, dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         memory_limit=0) as cluster:
        addr = cluster.scheduler_address
        with pytest.raises(UsageError, match=f"^--scheduler: cannot connect to {addr}"):
            scheduler.probe_scheduler(addr, 3, Security.temporary())
        rc = sweep.main(Namespace(grid=str(grid), out=str(out), scheduler=addr, workers=1, security=str(toml)))
        chaos.main(Namespace(runs=1, seed=1, out=str(tmp_path / "chaos"), json=None, scheduler=addr,
                             security=str(toml)))
    assert rc == 0
    (case,) = json.loads((tmp_path / "chaos" / "chaos.json").read_text())["cases"]  # ran on the cluster
    assert case["ok"], case
    status = json.loads((out / "status.json").read_text())
    assert status["scheduler"] == addr and status["results"] == 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0][len("error: "):]


@pytest.mark.parametrize("command", [["sweep", "GRID"], ["compare", "--map"], ["chaos", "--runs", "1"]])
def test_a_tcp_scheduler_is_refused_without_insecure(tmp_path, command):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    argv = [str(grid) if a == "GRID" else a for a in command]
    p = _cli(*argv, "--scheduler", "tcp://127.0.0.1:1", "--out", str(out), cwd=tmp_path)
    assert _one_line(p) == scheduler.INSECURE
    assert not out.exists() or not any(out.iterdir())
    assert sorted(f.name for f in tmp_path.iterdir()) == ["grid.toml"]


def test_a_missing_security_file_is_one_line(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    p = _cli("sweep", str(grid), "--scheduler", "tls://127.0.0.1:1", "--security", str(tmp_path / "nope.toml"),
             "--out", str(out), cwd=tmp_path)
    assert _one_line(p) == f"--security {tmp_path / 'nope.toml'}: not found"
    assert not out.exists()


def _ns(**kw) -> Namespace:
    return Namespace(**{"scheduler": None, "security": None, "insecure": False, **kw})


def test_scheduler_security_rules(tmp_path):
    from distributed.security import Security

    good = _security_file(tmp_path / "creds", Security.temporary())
    assert scheduler.resolve(_ns()) == (None, None)
    assert scheduler.resolve(_ns(scheduler="tcp://h:1", insecure=True)) == ("tcp://h:1", None)
    addr, sec = scheduler.resolve(_ns(scheduler="tls://h:1", security=str(good)))
    assert addr == "tls://h:1" and sec.require_encryption and sec.tls_client_key == str(tmp_path / "creds" / "key.pem")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.pem").write_text("not a certificate\n")
    cases = {
        "missing_key.toml": ('ca_file = "x"\ncert = "y"\n', "ca_file: " + str(bad / "x") + ": not found"),
        "no_key.toml": (f'ca_file = "{good.parent}/ca.pem"\ncert = "{good.parent}/cert.pem"\n', "key: expected the path"),
        "unknown.toml": ('ca = "x"\n', "unknown key 'ca'"),
        "garbage.toml": ('ca_file = "garbage.pem"\ncert = "garbage.pem"\nkey = "garbage.pem"\n', "cannot load the TLS files"),
        "not_toml.toml": ("ca_file = \n", "invalid TOML"),
    }
    for name, (text, needle) in cases.items():
        (bad / name).write_text(text)
        with pytest.raises(UsageError, match="^--security ") as ei:
            scheduler.resolve(_ns(scheduler="tls://h:1", security=str(bad / name)))
        assert needle in str(ei.value) and "\n" not in str(ei.value), (name, str(ei.value))
    for kw, needle in ((dict(scheduler="tcp://h:1"), scheduler.INSECURE),
                       (dict(scheduler="tls://h:1"), "needs --security"),
                       (dict(scheduler="tcp://h:1", security=str(good), insecure=True), "needs a tls:// address"),
                       (dict(security=str(good)), "only with --scheduler"),
                       (dict(insecure=True), "only with --scheduler")):
        with pytest.raises(UsageError) as ei:
            scheduler.resolve(_ns(**kw))
        assert needle in str(ei.value), (kw, str(ei.value))
