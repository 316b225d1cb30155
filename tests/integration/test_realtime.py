"""Threads and sockets on a real clock, each waiting out a deadline (a second or two) on
purpose: the metrics listener under idle and trickling clients, the control socket's
session deadline, the watchdog pings during slow work, and watch sessions streaming on
their own threads. The fast tests of the same modules are in tests/unit (test_metrics,
test_control, test_daemon_guards, test_events), whose helpers these share."""

from __future__ import annotations

import http.client
import os
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ksbpf import events as ev
from ksbpf.control import ControlClient, ControlServer
from ksbpf.metrics import Histogram, KsbpfCollector, MetricsServer, Snapshot, nft_drop_samples
from ksbpf.verdict import Reason
from tests.unit.test_control import Recorder
from tests.unit.test_control import served as served  # the fixture, re-exported for pytest
from tests.unit.test_events import event
from tests.unit.test_metrics import FakeNft, parse

# ------------------------------------------------------------------ the metrics listener


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connections_cannot_starve_the_listener_or_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of connections that never send a byte (any local user can open them) take
    no scrape slot and at most MAX_PENDING descriptors of the daemon; a scrape still answers."""
    import socket
    import time

    from ksbpf import metrics

    monkeypatch.setattr(metrics, "MAX_PENDING", 32)
    col = KsbpfCollector(Snapshot, [lambda: nft_drop_samples(FakeNft([(Reason.NO_TUNNEL, 4, 1, 60)]))], Histogram())
    server = MetricsServer(col, "127.0.0.1", 0)
    server.start()
    idle: list[socket.socket] = []
    try:
        before = _open_fds()
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        time.sleep(0.5)  # let the server accept what it will
        # Our 300 client ends are ours; the server's ends are bounded by MAX_PENDING.
        held_by_server = _open_fds() - before - len(idle)
        assert held_by_server <= 32 + metrics.MAX_SCRAPES, held_by_server
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            m, _ = parse(r.read().decode())
        assert m[("ksbpf_dropped_packets_total", (("cgroup", ""), ("family", "ipv4"), ("layer", "nftables"), ("reason", "no_tunnel")))] == 1
        # The oldest idle connections were shed to make room: the server closed them.
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()
        server.close()


def test_a_trickling_client_is_cut_at_the_request_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from ksbpf import metrics

    monkeypatch.setattr(metrics, "REQUEST_DEADLINE", 1.5)
    monkeypatch.setattr(metrics, "MAX_SCRAPES", 1)  # one slot: the slow client holds it
    server = MetricsServer(KsbpfCollector(Snapshot, [], Histogram()), "127.0.0.1", 0)
    server.start()
    try:
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /metrics HTTP/1.0\r\n":  # a byte every 0.3 s: each read is quick
            try:
                slow.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            slow.settimeout(0.3)
            try:
                if slow.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        took = time.monotonic() - t0
        assert closed, "the slow client was never cut off"
        assert took < 6.9, took  # the whole line would take 7 s at this pace
        # Its slot is free again: a normal scrape answers. The worker frees the slot just after
        # the cut, so a scrape right then may find it still taken and be closed: retry (bounded).
        for attempt in range(20):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
                    assert b"ksbpf_build_info" in r.read()
                break
            except (ConnectionResetError, http.client.RemoteDisconnected):
                assert attempt < 19, "the slot never came free"
                time.sleep(0.05)
        slow.close()
    finally:
        server.close()



# ------------------------------------------------------------------ the control socket


def test_a_slow_client_delays_the_next_by_at_most_the_session_deadline(
    served: tuple[ControlServer, Recorder, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sending a byte every 0.4 s never hits a per-read timeout; the whole-session
    deadline ends it, and the next client is served."""
    import threading
    import time

    from ksbpf import control

    monkeypatch.setattr(control, "SESSION_DEADLINE", 1.5)
    server, rec, run_dir = served
    stop = threading.Event()

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(server.path))
            for ch in b'{"op": "status"          ' * 10:
                if stop.is_set():
                    return
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    return
                time.sleep(0.4)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    client = ControlClient.connect_if_running("t", None, run_dir=run_dir)
    assert client is not None
    with client:
        assert client.request({"op": "status"})["echo"] == "status"
    waited = time.monotonic() - t0
    stop.set()
    # Without the session deadline it would wait for the whole trickle (about 100 s).
    assert waited < 10, waited
    assert [c["op"] for c in rec.calls] == ["status"]



# ------------------------------------------------------------------ the watchdog


def test_the_watchdog_is_fed_during_slow_work_and_only_for_its_bound(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WatchdogSec is 30 but a BPF compile may take minutes: while the main loop is in it, a
    helper thread pings, for at most the bound, so a loop stuck there still gets killed.
    Checked on a real NOTIFY_SOCKET."""
    import socket
    import time

    pytest.importorskip("systemd.daemon")
    from ksbpf.service import Notifier

    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    def drain() -> list[str]:
        got = []
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                return got

    try:
        n = Notifier()
        assert n.watchdog_s == pytest.approx(0.2)
        with n.keepalive(bound_s=60):
            time.sleep(0.65)  # "compiling"
        fed = drain()
        assert sum(m == "WATCHDOG=1" for m in fed) >= 4, fed
        time.sleep(0.3)
        assert drain() == [], "pings went on after the work ended"
        with n.keepalive(bound_s=0.35):
            time.sleep(1.0)  # stuck past the bound: the pings must stop
            time.sleep(0.05)
            drain()
            time.sleep(0.4)
            assert drain() == [], "pings went on past the bound"
        with n.keepalive(bound_s=60, starting=True):
            time.sleep(0.35)
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in drain())
    finally:
        sock.close()



# ------------------------------------------------------------------ watch sessions


def test_watch_sessions_stream_on_their_own_threads(tmp_path: object) -> None:
    """A real control socket: a watch session streams what the hub publishes while a status
    request is answered; a watcher that left is unsubscribed; closing the hub ends the rest."""
    import os
    import threading
    import time
    from pathlib import Path

    from ksbpf.control import ControlClient, ControlServer, socket_path

    assert isinstance(tmp_path, Path)
    hub = ev.WatchHub(max_subscribers=2, queue_size=8)
    server = ControlServer(socket_path("t", tmp_path), lambda req: {"op": req["op"]}, allowed_uid=os.geteuid(), hub=hub)
    server.start()
    try:
        got: list[dict[str, object]] = []
        client = ControlClient.connect(server.path, timeout=10)
        stream = client.watch({"op": "watch", "reason": "dns"})
        assert next(stream) == {"ok": True, "watching": {"reason": "dns"}}
        reader = threading.Thread(target=lambda: got.extend(stream))
        reader.start()
        with ControlClient.connect(server.path, timeout=10) as other:
            assert other.request({"op": "status"}) == {"ok": True, "op": "status"}
        hub.publish([event(reason="no_tunnel"), event(dport=853)])
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [ev.DropEvent.from_dict(m["event"]).dport for m in got] == [853]  # type: ignore[arg-type]
        leaver = ControlClient.connect(server.path, timeout=10)
        next(leaver.watch({"op": "watch"}))
        assert len(hub) == 2
        leaver.close()
        deadline = time.monotonic() + 10
        while len(hub) == 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hub) == 1, "a watcher that left is noticed without an event to send"
        hub.close()
        reader.join(timeout=10)
        assert got[-1] == {"end": "ksbpfd is stopping"}
        client.close()
    finally:
        server.close()

