"""The daemon's control socket: `ksctl status|exempt|unexempt|reload` talk to a running
ksbpfd through it, so that the daemon stays the only writer while it runs.

Protocol: one JSON object per line each way, on an AF_UNIX stream socket.

    {"op": "status"}                          -> {"ok": true, "layers": {...}, "exemptions": [...], ...}
    {"op": "status", "brief": true}           -> the same without the lists that grow with the
                                                 exemptions (their count instead)
    {"op": "exempt", "exemption": {...}}      -> {"ok": true, "exemption": {...}}  (normalized)
    {"op": "unexempt", "cgroup": "a/b"}       -> {"ok": true, "cgroup": "a/b"}
    {"op": "reload"}                          -> {"ok": true, "layers": {...}}
    {"op": "reload", "config": "/abs/path"}   -> the same, refused unless that is the daemon's
                                                 policy file (`ksctl up --config` with ksbpfd running)
    {"op": "down"}                            -> {"ok": true}   (remove every layer; the daemon idles)
    {"op": "watch", "cgroup": "a", "reason": "dns"}  (both optional)
                                              -> {"ok": true, "watching": {...}}, then a line per drop
                                                 event, {"event": {...}} (with "missed": N when the
                                                 watcher fell behind and N events were not sent), until
                                                 {"end": "..."} when the daemon stops
    anything wrong                            -> {"error": "...", "code": "bad_request"|"forbidden"|"failed"}

Only root may talk to it: the socket is 0600 in a 0700 directory, and the peer's uid
(SO_PEERCRED) must be 0. Requests are validated completely before anything acts on them;
a request that fails validation changes nothing. Nothing from a request reaches a shell.
"""

from __future__ import annotations

# ksctl imports this module for ControlClient on every status/exempt/unexempt: only what
# the client needs is imported here (no logging, threading, pathlib, typing or the policy
# parser); the server's needs are imported where it uses them.
import errno
import json
import os
import socket

from ksbpf.errors import BackendError, KsbpfError, PolicyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import Any

    from ksbpf.events import Subscriber, WatchHub

    Handler = Callable[[dict[str, Any]], dict[str, Any]]

RUN_DIR = "/run/ksbpf"
SOCKET_NAME = "control.sock"
MAX_LINE = 1 << 20  # an exemption with thousands of networks still fits
CLIENT_TIMEOUT = 5.0  # a peer that sends nothing is dropped after this long
# All the time one session may spend waiting for its client's bytes, however they trickle
# in: the socket serves one session at a time, so a slow client delays the next by at most
# this (a per-recv timeout alone let a byte every 4 s hold the socket for minutes).
SESSION_DEADLINE = 5.0
REPLY_TIMEOUT = 120.0  # a reload compiles BPF; the client waits this long for a reply


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("ksbpf.control")


OPS: dict[str, frozenset[str]] = {
    "status": frozenset({"op"}),
    "exempt": frozenset({"op", "exemption"}),
    "unexempt": frozenset({"op", "cgroup"}),
    "reload": frozenset({"op"}),
    "down": frozenset({"op"}),
    "watch": frozenset({"op"}),
}
# Keys a request may leave out.
OPTIONAL: dict[str, frozenset[str]] = {
    "status": frozenset({"brief"}),
    "reload": frozenset({"config"}),
    "watch": frozenset({"cgroup", "reason"}),
}


def socket_file(netns: str | None, run_dir: str | os.PathLike[str] = RUN_DIR) -> str:
    """/run/ksbpf/control.sock for the host, /run/ksbpf/netns/<name>/control.sock per
    network namespace (one daemon per namespace)."""
    base = os.fspath(run_dir)
    if netns is None:
        return os.path.join(base, SOCKET_NAME)
    if not netns or "/" in netns or netns in (".", "..") or "\x00" in netns:
        raise PolicyError(f"invalid network namespace name {netns!r}", source="control", key="--netns")
    return os.path.join(base, "netns", netns, SOCKET_NAME)


def socket_path(netns: str | None, run_dir: str | os.PathLike[str] = RUN_DIR) -> Path:
    """socket_file() as a Path."""
    from pathlib import Path

    return Path(socket_file(netns, run_dir))


class BadRequest(PolicyError):
    def __init__(self, reason: str, key: str = "") -> None:
        super().__init__(reason, source="control request", key=key)


def validate_request(raw: bytes | str) -> dict[str, Any]:
    """One request line -> a normalized request, or BadRequest naming what is wrong.
    The exemption comes back parsed (an Exemption), the cgroup normalized."""
    from ksbpf.policy import normalize_cgroup, parse_exemption

    try:
        req = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"not JSON: {e}") from None
    except RecursionError:  # "[[[[...": json's recursive decoder gives up, the request is bad
        raise BadRequest("not JSON: nested too deeply") from None
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise BadRequest(f"unknown op {op!r} (one of {', '.join(sorted(OPS))})", "op")
    extra = sorted(set(req) - OPS[op] - OPTIONAL.get(op, frozenset()))
    if extra:
        raise BadRequest(f"unexpected key for {op!r}", extra[0])
    missing = sorted(OPS[op] - set(req))
    if missing:
        raise BadRequest("is required", missing[0])
    out: dict[str, Any] = {"op": op}
    if op == "status" and "brief" in req:
        if not isinstance(req["brief"], bool):
            raise BadRequest("expected true or false", "brief")
        out["brief"] = req["brief"]
    if op == "exempt":
        if not isinstance(req["exemption"], dict):
            raise BadRequest("expected an object", "exemption")
        out["exemption"] = parse_exemption(req["exemption"], "control request", "exemption")
    elif op == "unexempt":
        cgroup = req["cgroup"]
        if not isinstance(cgroup, str):
            raise BadRequest("expected a string", "cgroup")
        try:
            out["cgroup"] = normalize_cgroup(cgroup)
        except ValueError as e:
            raise BadRequest(str(e), "cgroup") from None
        if not out["cgroup"]:
            raise BadRequest("the root cgroup is never exempted", "cgroup")
    elif op == "watch":
        from ksbpf.verdict import DROP_REASONS

        if "cgroup" in req:
            if not isinstance(req["cgroup"], str):
                raise BadRequest("expected a string", "cgroup")
            try:
                out["cgroup"] = normalize_cgroup(req["cgroup"])
            except ValueError as e:
                raise BadRequest(str(e), "cgroup") from None
        if "reason" in req:
            names = [r.value for r in DROP_REASONS]
            if req["reason"] not in names:
                raise BadRequest(f"expected one of {', '.join(names)}", "reason")
            out["reason"] = req["reason"]
    elif op == "reload" and "config" in req:
        config = req["config"]
        if not isinstance(config, str) or not os.path.isabs(config) or "\0" in config:
            raise BadRequest("expected an absolute path", "config")
        out["config"] = config
    return out


def error_reply(e: BaseException) -> dict[str, Any]:
    if isinstance(e, PolicyError):
        return {"error": str(e), "code": "bad_request"}
    return {"error": str(e), "code": "failed"}


def peer_uid(conn: socket.socket) -> int:
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Serves `handler` (validated request -> reply dict) on the instance's socket. The
    handler runs on the server thread; the daemon's handler hands the request to its
    main loop and waits for the answer. A watch request is handed to a thread of its own
    fed by `hub` (ksbpf.events.WatchHub, which bounds how many there are), so a watcher
    never holds up other clients."""

    def __init__(self, path: Path, handler: Handler, *, allowed_uid: int = 0, hub: WatchHub | None = None) -> None:
        self.path = path
        self.handler = handler
        self.allowed_uid = allowed_uid
        self.hub = hub
        self._sock: socket.socket | None = None
        self._bound_ino = -1
        self._thread: Any = None  # threading.Thread
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)

    def _own_dir(self) -> bool:
        """A namespace's own directory (root only, removed with the socket), not RUN_DIR."""
        return os.fspath(self.path.parent) != RUN_DIR

    def bind(self) -> None:
        """Bind now: an error (another daemon serving this namespace) stops the start."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self._own_dir():
            os.chmod(self.path.parent, 0o700)  # a namespace's own directory: root only
        if self.path.exists() or self.path.is_symlink():
            if _answers(self.path):
                raise KsbpfError(f"another ksbpfd serves {self.path}")
            self.path.unlink()  # left by a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # 0600 from the first moment: the socket never exists with wider permissions.
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._bound_ino = os.stat(self.path).st_ino
        sock.listen(16)
        self._sock = sock

    def start(self) -> None:
        import threading

        if self._sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=CLIENT_TIMEOUT)
        if self._sock is not None:
            # Unlink only our own socket: a successor may have bound the path meanwhile.
            try:
                if os.stat(self.path).st_ino == self._bound_ino:
                    self.path.unlink()
                    if self._own_dir():
                        self.path.parent.rmdir()  # a namespace's own directory, if empty
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _serve(self) -> None:
        import select

        assert self._sock is not None
        # poll, not select: with the descriptor limit raised, a socket may be numbered past
        # FD_SETSIZE (1024), where select() fails.
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = [fd for fd, _ev in poller.poll()]
            if self._stop_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                _log().warning("control socket: accept failed: %s", e)
                continue
            handed_off = False
            try:
                handed_off = self._session(conn)
            except (OSError, ValueError) as e:
                _log().info("control socket: client dropped: %s", e)
            except Exception:  # the control socket outlives any one bad session
                _log().exception("control socket: session failed")
            finally:
                if not handed_off:
                    conn.close()

    def _session(self, conn: socket.socket) -> bool:
        """True when the connection went to a watch thread (which closes it)."""
        import time

        conn.settimeout(CLIENT_TIMEOUT)
        uid = peer_uid(conn)
        if uid != self.allowed_uid:
            _log().warning("control socket: refused a client with uid %d (root only)", uid)
            _send(conn, {"error": "permission denied: the ksbpf control socket serves root only", "code": "forbidden"})
            return False
        buf = b""
        waited = 0.0  # time spent waiting for this client; the handler's own time is not counted
        while True:
            if waited >= SESSION_DEADLINE:
                _log().info("control socket: client too slow, dropped after %.1f s", waited)
                return False
            conn.settimeout(SESSION_DEADLINE - waited)
            t0 = time.monotonic()
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return False
            finally:
                waited += time.monotonic() - t0
            if not chunk:
                return False
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    conn.settimeout(CLIENT_TIMEOUT)  # sending the reply
                    if self._watch(conn, line):
                        return True
                    _send(conn, self._answer(line))
            if len(buf) > MAX_LINE:
                _send(conn, {"error": f"request longer than {MAX_LINE} bytes", "code": "bad_request"})
                return False

    def _watch(self, conn: socket.socket, line: bytes) -> bool:
        """A valid watch request: subscribe and hand the connection to its own thread."""
        import threading

        from ksbpf.events import Busy, WatchFilter

        if b"watch" not in line:
            return False  # not worth validating twice (an exemption may be large)
        try:
            req = validate_request(line)
        except PolicyError:
            return False  # _answer says what is wrong
        if req["op"] != "watch":
            return False
        if self.hub is None:
            _send(conn, {"error": "this ksbpfd reports no drop events", "code": "failed"})
            return False
        try:
            sub = self.hub.subscribe(WatchFilter(req.get("cgroup"), req.get("reason")))
        except Busy as e:
            _send(conn, {"error": str(e), "code": "failed"})
            return False
        t = threading.Thread(target=_stream_events, args=(conn, sub, self.hub, req), name="control-watch", daemon=True)
        t.start()
        return True

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = validate_request(line)
        except PolicyError as e:
            _log().warning("control socket: bad request: %s", e)
            return error_reply(e)
        try:
            reply = self.handler(req)
        except KsbpfError as e:
            _log().warning("control socket: %s failed: %s", req["op"], e)
            return error_reply(e)
        except Exception as e:  # a bug must not take the control socket down
            _log().exception("control socket: %s failed unexpectedly", req["op"])
            return {"error": f"internal error: {e}", "code": "failed"}
        return {"ok": True, **reply}


def _peer_gone(conn: socket.socket) -> bool:
    import select

    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    if not p.poll(0):
        return False
    # Readable: the peer closed (b""), or sent something a watcher has no use for.
    return not conn.recv(65536)


def _stream_events(conn: socket.socket, sub: Subscriber, hub: WatchHub, req: dict[str, Any]) -> None:
    """One watch session: events as they come; a watcher that stops reading is dropped
    after CLIENT_TIMEOUT of a blocked send (its queue meanwhile drops and counts)."""
    import queue

    reported = 0
    try:
        conn.settimeout(CLIENT_TIMEOUT)
        _send(conn, {"ok": True, "watching": {k: v for k, v in req.items() if k != "op"}})
        while True:
            try:
                e = sub.queue.get(timeout=1.0)
            except queue.Empty:
                if _peer_gone(conn):
                    return
                continue
            if e is None:
                _send(conn, {"end": "ksbpfd is stopping"})
                return
            msg: dict[str, Any] = {"event": e.as_dict()}
            if sub.dropped != reported:
                msg["missed"] = sub.dropped - reported
                reported = sub.dropped
            _send(conn, msg)
    except OSError as e:
        _log().info("control socket: watcher gone: %s", e)
    finally:
        hub.unsubscribe(sub)
        conn.close()


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj, default=str).encode() + b"\n")


def _answers(path: str | os.PathLike[str]) -> bool:
    """Does a live process accept connections on this socket?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(1.0)
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlClient:
    """`ksctl`'s side. request() raises PolicyError for a refused request (ksctl exits
    2), PermissionError for a non-root caller, KsbpfError when the daemon failed."""

    def __init__(self, sock: socket.socket, path: str | os.PathLike[str]) -> None:
        self._sock = sock
        self.path = os.fspath(path)
        self._buf = b""

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = REPLY_TIMEOUT) -> ControlClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
        except BaseException:
            s.close()
            raise
        return cls(s, path)

    @classmethod
    def connect_if_running(cls, netns: str | None, state_dir: str | os.PathLike[str] | None = None,
                           run_dir: str | os.PathLike[str] | None = None) -> ControlClient | None:
        """A client when a daemon serves `netns`; None when none does (no socket, or one
        left by a daemon that died), so ksctl works on the kernel directly. The socket is
        found by namespace alone: there is one daemon per namespace, whatever its state
        directory (`state_dir` is accepted for symmetry with the engine and not used)."""
        path = socket_file(netns, RUN_DIR if run_dir is None else run_dir)
        try:
            return cls.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except PermissionError as e:
            raise PermissionError(errno.EACCES, "the ksbpf control socket is root only", path) from e

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watch(self, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A watch request's reply lines: the first (refused as request() refuses), then one
        per event until the daemon ends the stream ({"end": ...}) or the connection closes."""
        yield self.request(req)
        self._sock.settimeout(None)  # events come when they come
        while True:
            while b"\n" not in self._buf:
                try:
                    chunk = self._sock.recv(65536)
                except OSError as e:
                    raise BackendError("control", f"{self.path}: {e.strerror or e}") from None
                if not chunk:
                    return
                self._buf += chunk
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError as e:
                raise BackendError("control", f"unreadable event: {e}") from None
            if isinstance(msg, dict):
                yield msg
                if "end" in msg:
                    return

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            try:
                self._sock.sendall(json.dumps(req).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # a server that refuses us answers first and closes: read why
            while b"\n" not in self._buf:
                chunk = self._sock.recv(65536)
                if not chunk:
                    raise BackendError("control", f"ksbpfd closed {self.path} without answering")
                self._buf += chunk
        except TimeoutError:
            raise BackendError("control", f"ksbpfd did not answer within {REPLY_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise BackendError("control", f"{self.path}: {e.strerror or e}") from None
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise BackendError("control", f"unreadable reply: {e}") from None
        if not isinstance(reply, dict):
            raise BackendError("control", "unreadable reply: not an object")
        if "error" in reply:
            code = reply.get("code")
            if code == "bad_request":
                raise PolicyError(str(reply["error"]), source="ksbpfd")
            if code == "forbidden":
                raise PermissionError(errno.EACCES, str(reply["error"]), self.path)
            raise KsbpfError(f"ksbpfd: {reply['error']}")
        return reply
