"""The control socket: strict request validation, root-only peers, JSON lines, and the
error codes ksctl turns into exit codes. Real sockets in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.nobody
from ksbpf.control import (
    MAX_LINE,
    BadRequest,
    ControlClient,
    ControlServer,
    socket_path,
    validate_request,
)
from ksbpf.errors import BackendError, KsbpfError, PolicyError
from ksbpf.policy import Exemption, PortSpec

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ validation


def test_valid_requests_come_back_normalized() -> None:
    assert validate_request(b'{"op": "status"}') == {"op": "status"}
    assert validate_request('{"op": "reload"}') == {"op": "reload"}
    assert validate_request('{"op": "reload", "config": "/etc/ksbpf/policy.toml"}') == {
        "op": "reload", "config": "/etc/ksbpf/policy.toml"}
    assert validate_request('{"op": "down"}') == {"op": "down"}
    assert validate_request('{"op": "unexempt", "cgroup": "/system.slice/sshd.service/"}') == {
        "op": "unexempt", "cgroup": "system.slice/sshd.service"}
    req = validate_request(json.dumps({"op": "exempt", "exemption": {"cgroup": "a.service", "listen": ["tcp/22"], "from": ["10.0.0.0/8"]}}))
    ex = req["exemption"]
    assert isinstance(ex, Exemption) and ex.cgroup == "a.service" and ex.listen == (PortSpec("tcp", 22, 22),)


@pytest.mark.parametrize("raw, key", [
    (b"not json", ""),
    (b"\xff\xfe", ""),
    (b"[]", ""),
    (b'"status"', ""),
    (b'{}', "op"),
    (b'{"op": 1}', "op"),
    (b'{"op": "shell", "cmd": "id"}', "op"),
    (b'{"op": "status", "verbose": true}', "verbose"),
    # `config` only names the file the caller expects the daemon to enforce; the daemon
    # refuses any but its own and never reads it (tests/kernel/test_daemon.py)
    (b'{"op": "reload", "config": "evil.toml"}', "config"),
    (b'{"op": "reload", "config": 5}', "config"),
    (b'{"op": "reload", "config": "/etc/ksbpf/p\\u0000.toml"}', "config"),
    (b'{"op": "exempt"}', "exemption"),
    (b'{"op": "exempt", "exemption": "a"}', "exemption"),
    (b'{"op": "exempt", "exemption": {"cgroup": "a"}}', "exemption.allow"),
    (b'{"op": "exempt", "exemption": {"cgroup": "../x", "allow": ["udp/1"]}}', "exemption.cgroup"),
    (b'{"op": "exempt", "exemption": {"cgroup": "a b", "allow": ["udp/1"]}}', "exemption.cgroup"),
    (b'{"op": "exempt", "exemption": {"cgroup": "$(id)", "allow": ["udp/1"]}}', "exemption.cgroup"),
    (b'{"op": "exempt", "exemption": {"cgroup": "/", "allow": ["udp/1"]}}', "exemption.cgroup"),
    (b'{"op": "exempt", "exemption": {"cgroup": "a", "allow": ["udp/0"]}}', "exemption.allow[0]"),
    (b'{"op": "exempt", "exemption": {"cgroup": "a", "allow": ["udp/1"], "to": ["10.0.0.1/8"]}}', "exemption.to[0]"),
    (b'{"op": "exempt", "exemption": {"cgroup": "a", "allow": ["udp/1"], "x": 1}}', "exemption.x"),
    (b'{"op": "unexempt"}', "cgroup"),
    (b'{"op": "unexempt", "cgroup": 5}', "cgroup"),
    (b'{"op": "unexempt", "cgroup": ""}', "cgroup"),
    (b'{"op": "unexempt", "cgroup": "a/../../b"}', "cgroup"),
    (b'{"op": "unexempt", "cgroup": "a\\u0000b"}', "cgroup"),
])
def test_malformed_requests_are_refused_naming_the_key(raw: bytes, key: str) -> None:
    with pytest.raises(PolicyError) as exc:
        validate_request(raw)
    assert exc.value.key == key


def test_socket_paths_per_namespace(tmp_path: Path) -> None:
    assert socket_path(None) == Path("/run/ksbpf/control.sock")
    assert socket_path("lab-client") == Path("/run/ksbpf/netns/lab-client/control.sock")
    assert socket_path("x", tmp_path) == tmp_path / "netns" / "x" / "control.sock"
    for bad in ("", "..", "a/b", "."):
        with pytest.raises(PolicyError):
            socket_path(bad)


# ------------------------------------------------------------------ server and client


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        op = req["op"]
        if op == "unexempt" and req["cgroup"] == "missing":
            raise PolicyError("no run-time exemption for cgroup 'missing'", source="ksctl unexempt", key="--cgroup")
        if op == "reload":
            raise BackendError("nftables", "kernel said no")
        if op == "down":
            raise RuntimeError("a bug")
        return {"echo": op}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlServer, Recorder, Path]]:
    rec = Recorder()
    path = socket_path("t", tmp_path)
    server = ControlServer(path, rec, allowed_uid=os.geteuid())
    server.start()
    try:
        yield server, rec, tmp_path
    finally:
        server.close()


def test_round_trip_and_error_codes(served: tuple[ControlServer, Recorder, Path]) -> None:
    server, rec, run_dir = served
    st = os.stat(server.path)
    assert st.st_mode & 0o777 == 0o600
    assert os.stat(server.path.parent).st_mode & 0o777 == 0o700
    client = ControlClient.connect_if_running("t", None, run_dir=run_dir)
    assert client is not None
    with client:
        assert client.request({"op": "status"}) == {"ok": True, "echo": "status"}
        with pytest.raises(PolicyError, match="no run-time exemption"):
            client.request({"op": "unexempt", "cgroup": "missing"})
        with pytest.raises(PolicyError, match="unknown op"):
            client.request({"op": "nope"})
        with pytest.raises(KsbpfError, match="kernel said no") as exc:
            client.request({"op": "reload"})
        assert not isinstance(exc.value, PolicyError)
        with pytest.raises(KsbpfError, match="internal error: a bug"):
            client.request({"op": "down"})
        # The server survived all of it, on the same connection.
        assert client.request({"op": "status"})["echo"] == "status"
    assert [c["op"] for c in rec.calls] == ["status", "unexempt", "reload", "down", "status"]


def test_refused_requests_never_reach_the_handler(served: tuple[ControlServer, Recorder, Path]) -> None:
    server, rec, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        s.sendall(b'{"op": "exempt", "exemption": {"cgroup": "../../etc", "allow": ["udp/1"]}}\n{"op": "status", "x": 1}\n')
        replies = []
        buf = b""
        while buf.count(b"\n") < 2:
            buf += s.recv(65536)
        replies = [json.loads(line) for line in buf.splitlines()]
    assert [r["code"] for r in replies] == ["bad_request", "bad_request"]
    assert rec.calls == []


def test_an_oversized_request_is_refused(served: tuple[ControlServer, Recorder, Path]) -> None:
    server, rec, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        try:
            s.sendall(b"x" * (MAX_LINE + 65536 * 2))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = json.loads(s.recv(65536).splitlines()[0])
    assert reply["code"] == "bad_request" and rec.calls == []


def test_peers_other_than_the_allowed_uid_are_refused(tmp_path: Path) -> None:
    rec = Recorder()
    server = ControlServer(tmp_path / "c.sock", rec, allowed_uid=os.geteuid() + 1)
    server.start()
    try:
        with ControlClient.connect(server.path) as client, pytest.raises(PermissionError, match="root only"):
            client.request({"op": "status"})
    finally:
        server.close()
    assert rec.calls == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as nobody")
def test_a_non_root_peer_is_refused_by_its_credentials(tmp_path: Path) -> None:
    """The socket is 0600, so a non-root process cannot even connect; opened up here on
    purpose, the peer-credential check must still refuse it."""
    import tempfile

    rec = Recorder()
    run = Path(tempfile.mkdtemp(prefix="ksctl-"))  # pytest's tmp_path is not searchable by nobody
    server = ControlServer(run / "c.sock", rec)
    server.start()
    try:
        os.chmod(run, 0o755)
        os.chmod(server.path, 0o666)
        code = (
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10); s.connect(sys.argv[1])\n"
            "try:\n    s.sendall(b'{\"op\": \"down\"}\\n')\n"
            "except BrokenPipeError:\n    pass  # refused at once; the reply is already queued\n"
            "print(s.recv(65536).decode())\n"
        )
        r = subprocess.run([tests.nobody.PYTHON, "-I", "-c", code, str(server.path)], capture_output=True, text=True,
                           user=65534, group=65534, timeout=30, cwd="/")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["code"] == "forbidden"
    finally:
        server.close()
        shutil.rmtree(run, ignore_errors=True)
    assert rec.calls == []


def test_stale_sockets_are_replaced_and_live_ones_are_not(tmp_path: Path) -> None:
    path = tmp_path / "netns" / "x" / "control.sock"
    path.parent.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a daemon killed with -9 leaves this behind
    assert ControlClient.connect_if_running("x", run_dir=tmp_path) is None
    first = ControlServer(path, Recorder(), allowed_uid=os.geteuid())
    first.start()
    try:
        second = ControlServer(path, Recorder(), allowed_uid=os.geteuid())
        with pytest.raises(KsbpfError, match="another ksbpfd"):
            second.bind()
        c = ControlClient.connect_if_running("x", run_dir=tmp_path)
        assert c is not None
        c.close()
    finally:
        first.close()
    assert not path.exists()
    assert ControlClient.connect_if_running("x", run_dir=tmp_path) is None
    assert ControlClient.connect_if_running("never", run_dir=tmp_path) is None


def test_bad_request_class_is_a_policy_error() -> None:
    # ksctl maps PolicyError to exit 2: a refused request must be one.
    assert issubclass(BadRequest, PolicyError)


# ------------------------------------------------------------------ the ksctl client path

# What `ksctl status|exempt|unexempt` must not import when a daemon serves the namespace:
# the kernel libraries (pyroute2 alone takes ~100 ms), the engine, and the policy parser
# (tomllib, dataclasses: the daemon validates the request itself).
NOT_ON_THE_CLIENT_PATH = ("pyroute2", "nftables", "bcc", "ksbpf.linux", "ksbpf.policy", "ksbpf.render", "tomllib")

KSCTL_CHILD = r"""
import json, sys
import ksbpf.control
ksbpf.control.RUN_DIR = sys.argv[1]  # the test's server instead of /run/ksbpf
from ksbpf.cli import main
rc = main(sys.argv[2:])
print("MODULES " + json.dumps(sorted(sys.modules)))
sys.exit(rc)
"""


def _ksctl_child(run_dir: Path, *args: str) -> tuple[int, str, str, set[str]]:
    r = subprocess.run([sys.executable, "-c", KSCTL_CHILD, str(run_dir), "--netns", "t", *args],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    out, _, mods = r.stdout.rpartition("MODULES ")
    return r.returncode, out, r.stderr, set(json.loads(mods)) if mods else set()


@pytest.fixture
def daemon_like(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A control server answering as ksbpfd does, on a real socket."""
    calls: list[dict[str, Any]] = []

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        calls.append(req)
        if req["op"] == "exempt":
            return {"exemption": req["exemption"].as_dict()}
        if req["op"] == "unexempt":
            return {"cgroup": req["cgroup"]}
        return {"layers": {"nftables": {"engaged": True, "detail": "d"}}, "pid": 1, "tunnels": {},
                **({"exemption_count": 3} if req.get("brief") else {"exemptions": [{"cgroup": "a"}] * 3})}

    server = ControlServer(socket_path("t", tmp_path), handler, allowed_uid=os.geteuid())
    server.start()
    try:
        yield tmp_path, calls
    finally:
        server.close()


def _loaded(mods: set[str], prefix: str) -> bool:
    return any(m == prefix or m.startswith(prefix + ".") for m in mods)


def test_ksctl_with_a_daemon_imports_neither_kernel_libraries_nor_the_parser(
        daemon_like: tuple[Path, list[dict[str, Any]]]) -> None:
    run_dir, calls = daemon_like
    rc, out, err, mods = _ksctl_child(run_dir, "exempt", "--cgroup", "/system.slice/x.service/", "--allow", "tcp/443",
                                      "--allow", "tcp/443", "--to", "10.0.0.0/8")
    assert rc == 0, err
    assert mods and [m for m in NOT_ON_THE_CLIENT_PATH if _loaded(mods, m)] == []
    # The daemon got it raw and validated it; ksctl shows the normalized exemption it answered.
    assert calls[-1]["exemption"].cgroup == "system.slice/x.service"
    assert out.startswith("exempted system.slice/x.service: ")
    assert json.loads(out.split(": ", 1)[1]) == {"cgroup": "system.slice/x.service", "allow": ["tcp/443"], "to": ["10.0.0.0/8"]}

    rc, out, err, mods = _ksctl_child(run_dir, "unexempt", "--cgroup", "system.slice/x.service/")
    assert rc == 0, err
    assert out.strip() == "removed exemption for system.slice/x.service"
    assert [m for m in NOT_ON_THE_CLIENT_PATH if _loaded(mods, m)] == []

    rc, out, err, mods = _ksctl_child(run_dir, "status")
    assert rc == 0, err
    assert calls[-1] == {"op": "status", "brief": True}  # the lists that grow with n stay in the daemon
    assert "exemptions in force: 3" in out
    assert [m for m in NOT_ON_THE_CLIENT_PATH if _loaded(mods, m)] == []
    rc, out, err, _ = _ksctl_child(run_dir, "status", "--json")
    assert rc == 0 and calls[-1] == {"op": "status"} and len(json.loads(out)["exemptions"]) == 3


@pytest.mark.parametrize("args, what", [
    (["exempt", "--cgroup", "a/../../etc", "--allow", "tcp/443"], "'..'"),
    (["exempt", "--cgroup", "a.service", "--allow", "sctp/443"], "sctp"),
    (["exempt", "--cgroup", "a.service", "--allow", "tcp/99999"], "99999"),
    (["exempt", "--cgroup", "a.service"], "at least one"),
    (["exempt", "--cgroup", "/", "--allow", "tcp/1"], "root cgroup"),
    (["unexempt", "--cgroup", "a/../b"], "'..'"),
])
def test_ksctl_with_a_daemon_refuses_bad_input_with_exit_2_and_nothing_reaches_the_handler(
        daemon_like: tuple[Path, list[dict[str, Any]]], args: list[str], what: str) -> None:
    run_dir, calls = daemon_like
    rc, _out, err, _ = _ksctl_child(run_dir, *args)
    assert rc == 2 and what in err, err
    assert calls == []


def test_status_brief_is_a_boolean() -> None:
    assert validate_request(b'{"op": "status", "brief": true}') == {"op": "status", "brief": True}
    with pytest.raises(PolicyError) as exc:
        validate_request(b'{"op": "status", "brief": 1}')
    assert exc.value.key == "brief"


def test_cli_default_policy_path_is_the_policy_modules() -> None:
    from ksbpf.cli import DEFAULT_POLICY
    from ksbpf.policy import DEFAULT_POLICY_PATH

    assert DEFAULT_POLICY == str(DEFAULT_POLICY_PATH)


def test_deeply_nested_json_is_a_bad_request_not_a_dropped_connection(served: tuple[ControlServer, Recorder, Path]) -> None:
    server, rec, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        s.sendall(b"[" * 100_000 + b"\n" + b'{"op": "status"}\n')
        buf = b""
        while buf.count(b"\n") < 2:
            chunk = s.recv(65536)
            assert chunk, f"connection dropped after {buf!r}"
            buf += chunk
    first, second = (json.loads(line) for line in buf.splitlines())
    assert first["code"] == "bad_request" and "nested" in first["error"]
    assert second["ok"] is True and [c["op"] for c in rec.calls] == ["status"]
