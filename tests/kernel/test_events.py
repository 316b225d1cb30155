"""Drop events on the real kernel: the owner recorded at socket creation, the egress
program's and nftables' drops reported through the ring buffer, the in-kernel rate limit
(counts add up to the drop counters), the lost-events counter (moves only when the ring
really overflows), and ksbpfd's side: `ksctl watch --json`, the journal entry, `ksctl status`.

The BPF-level cases use test_bpf's lab (client and far namespaces, BPF only); the daemon
cases test_daemon's world (nftables + routing + BPF, through ksbpfd).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksbpf.events import DropEvent, parse_record
from ksbpf.linux.bpf import kernel as bpf_kernel
from ksbpf.linux.bpf import layout as bpf_layout
from ksbpf.linux.bpf.layer import BpfLayer
from ksbpf.linux.cgroup import cgroup_id
from ksbpf.linux.events import RingBuffer, flush_held
from tests.kernel import test_bpf, test_daemon
from tests.kernel.conftest import sh, unique
from tests.kernel.sender import Probe, send_all
from tests.kernel.test_bpf import Lab, make_policy, new_layer, requires_bpf
from tests.kernel.test_daemon import REPO, DaemonFactory, World, bpf_engaged, wait_for

# The two modules' fixtures, shared.
lab, layers = test_bpf.lab, test_bpf.layers
world, daemon = test_daemon.world, test_daemon.daemon

pytestmark = pytest.mark.kernel

COMM = "leaky-dns"
DROP_5399 = "table inet kst {\n chain o {\n  type filter hook output priority 0; policy accept;\n  udp dport 5399 drop\n }\n}\n"


def leak(netns: str, cgroup: Path, sends: list[tuple[Any, ...]], comm: str = COMM) -> dict[str, int]:
    """(dst, port, n[, device]) each, from one process named `comm` (set before its first
    socket) through the shared sender: {"pid", "ok", "eperm"} (any other error fails)."""
    probes = [Probe(dst, port, n, dev=dev[0] if dev else None, payload="leak") for dst, port, n, *dev in sends]
    r = send_all(netns, probes, cgroup=cgroup, comm=comm)
    assert all(set(x.errors) <= {"EPERM"} for x in r.results), r.results
    return {"pid": r.pid, "eperm": sum(x.eperm for x in r.results), "ok": sum(x.sent for x in r.results)}


def ring_events(layer: BpfLayer) -> list[DropEvent]:
    with RingBuffer(layer.dir / bpf_layout.EVENTS_PIN) as ring:
        return [parse_record(r) for r in ring.read()]


def bpf_drops(layer: BpfLayer, reason: str, cg: int) -> int:
    return sum(p for r, c, p, _ in layer.counters() if r == reason and c == cg)


# =========================================================================== BPF level


@requires_bpf
@pytest.mark.parametrize("mode", ["helper", "sk_storage"])
def test_egress_drop_names_the_socket_owner(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    if mode == "helper" and not bpf_kernel.probe_netns_cookie_helper():
        pytest.skip("cgroup_skb has no bpf_get_netns_cookie here")
    layer = new_layer(lab, layers, mode)
    layer.apply(make_policy(lab))
    t0 = time.time()
    r = leak(lab.client, lab.dirs["w/app"], [("10.77.0.3", 53, 1)])
    assert r["eperm"] == 1
    (e,) = ring_events(layer)
    assert (e.pid, e.comm, e.cgroup_id) == (r["pid"], COMM, cgroup_id(lab.dirs["w/app"]))
    assert (e.family, e.proto, e.daddr, e.dport) == ("ipv4", "udp", "10.77.0.3", 53)
    assert (e.reason, e.layer, e.count) == ("dns", "bpf", 1)
    assert t0 - 1 <= e.time <= time.time() + 1
    # Allowed traffic makes none.
    assert leak(lab.client, lab.dirs["w/app"], [("10.88.0.2", 6100, 3)])["ok"] == 3
    assert ring_events(layer) == []


@requires_bpf
def test_nftables_drop_is_reported_with_its_owner(lab: Lab, layers: list[BpfLayer]) -> None:
    """nftables' output chain drops before cgroup egress: the kfree_skb program reports it."""
    layer = new_layer(lab, layers)
    layer.apply(make_policy(lab))
    if "nftables" not in layer.events_detail():
        pytest.skip(f"nftables drops are not reported here: {layer.events_detail()}")
    sh("nft", "-f", "-", netns=lab.client, input=DROP_5399)
    r = leak(lab.client, lab.dirs["w/app"], [("10.88.0.3", 5399, 2), ("fd88::3", 53, 1)])
    assert r["eperm"] == 3
    events = ring_events(layer)
    nft = [e for e in events if e.layer == "nftables"]
    assert [(e.pid, e.comm, e.daddr, e.dport, e.count) for e in nft] == [
        (r["pid"], COMM, "10.88.0.3", 5399, 1), (r["pid"], COMM, "10.88.0.3", 5399, 1)]
    assert all(e.cgroup_id == cgroup_id(lab.dirs["w/app"]) and e.reason == "no_tunnel" for e in nft)
    # The DNS datagram passed nftables here and was dropped by the egress program.
    assert [(e.layer, e.reason, e.daddr) for e in events if e.layer == "bpf"] == [("bpf", "dns", "fd88::3")]
    # Another namespace's drops are not this instance's.
    other = lab.cgroups("w/elsewhere")
    sh("nft", "-f", "-", netns=lab.far, input=DROP_5399)
    assert leak(lab.far, other, [("10.77.0.1", 5399, 2)])["eperm"] == 2
    assert ring_events(layer) == []


@requires_bpf
def test_flood_is_rate_limited_in_the_kernel_and_counts_add_up(lab: Lab, layers: list[BpfLayer]) -> None:
    layer = new_layer(lab, layers)
    layer.apply(make_policy(lab))
    app = lab.dirs["w/app"]
    cg = cgroup_id(app)
    before = bpf_drops(layer, "dns", cg)
    n = 400
    assert leak(lab.client, app, [("10.77.0.3", 53, n)])["eperm"] == n
    flood = ring_events(layer)
    assert len(flood) == bpf_layout.EVENTS_PER_SEC, "one second's allowance, the rest held back"
    assert flush_held(layer.dir) == 0, "the window is still open"
    time.sleep(1.1)
    # The window is over and no drop followed: ksbpfd's flush reports what was held back.
    assert flush_held(layer.dir) == 1
    (tail,) = ring_events(layer)
    assert (tail.count, tail.pid, tail.comm, tail.daddr, tail.dport, tail.reason) == (
        n - len(flood), flood[0].pid, COMM, "10.77.0.3", 53, "dns")
    assert flush_held(layer.dir) == 0, "taken once"
    assert sum(e.count for e in [*flood, tail]) == bpf_drops(layer, "dns", cg) - before == n
    # Or the next drop after the window carries them.
    assert leak(lab.client, app, [("10.77.0.3", 53, n)])["eperm"] == n
    assert len(ring_events(layer)) == bpf_layout.EVENTS_PER_SEC
    time.sleep(1.1)
    assert leak(lab.client, app, [("10.77.0.3", 53, 1)])["eperm"] == 1
    (carried,) = ring_events(layer)
    assert carried.count == n + 1 - bpf_layout.EVENTS_PER_SEC and flush_held(layer.dir) == 0
    assert layer.events_lost() == 0


@requires_bpf
def test_lost_counter_moves_only_when_the_ring_overflows(lab: Lab, layers: list[BpfLayer]) -> None:
    """A one-page ring holds 4096 // 72 = 56 events (64-byte record + 8-byte header). Each
    cgroup may send EVENTS_PER_SEC events a second; nothing reads the ring here."""
    layer = BpfLayer(unique("kst-"), netns=lab.client, events_bytes=4096)
    layers.append(layer)
    layer.apply(make_policy(lab))
    per = bpf_layout.EVENTS_PER_SEC
    cgs = [lab.cgroups(f"w/f{i}") for i in range(8)]
    fits = 4096 // (struct.calcsize(bpf_layout.EVENT_FMT) + 8)
    assert 4 * per <= fits < 8 * per
    for c in cgs[:4]:
        assert leak(lab.client, c, [("10.77.0.3", 53, per + 2)])["eperm"] == per + 2
    assert layer.events_lost() == 0, "the ring had room"
    for c in cgs[4:]:
        assert leak(lab.client, c, [("10.77.0.3", 53, per + 2)])["eperm"] == per + 2
    assert layer.events_lost() == 8 * per - fits
    got = ring_events(layer)
    assert len(got) == fits
    time.sleep(1.1)
    for c in cgs:
        assert leak(lab.client, c, [("10.77.0.3", 53, 1)])["eperm"] == 1
    got += ring_events(layer)
    # Lost events' packets rode on the next event of their cgroup: the counts still add up.
    assert sum(e.count for e in got) == 8 * (per + 3)
    for c in cgs:
        assert sum(e.count for e in got if e.cgroup_id == cgroup_id(c)) == bpf_drops(layer, "dns", cgroup_id(c))


# =========================================================================== through ksbpfd


class JournalStandIn:
    """journald's native socket, for a daemon run in a mount namespace where this test's
    directory is bind-mounted on /run/systemd/journal: what systemd.journal.JournalHandler
    sends arrives here as the journal would get it (FIELD=value lines, or FIELD, a 64-bit
    length and the bytes for values with a newline)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ksj")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(os.path.join(self.dir, "socket"))
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def parse(data: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        i = 0
        while i < len(data):
            nl = data.index(b"\n", i)
            line = data[i:nl]
            if b"=" in line:
                k, v = line.split(b"=", 1)
                out[k.decode()] = v.decode(errors="replace")
                i = nl + 1
            else:
                n = int.from_bytes(data[nl + 1:nl + 9], "little")
                out[line.decode()] = data[nl + 9:nl + 9 + n].decode(errors="replace")
                i = nl + 9 + n + 1
        return out

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.entries.append(self.parse(data))

    def find(self, **fields: str) -> list[dict[str, str]]:
        with self._lock:
            return [e for e in self.entries if all(e.get(k) == v for k, v in fields.items())]

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()
        os.unlink(os.path.join(self.dir, "socket"))
        os.rmdir(self.dir)


@pytest.fixture
def journal() -> Iterator[JournalStandIn]:
    made = not os.path.exists("/run/systemd/journal")
    if made:
        os.makedirs("/run/systemd/journal")  # an empty mount point; the daemon's namespace covers it
    j = JournalStandIn()
    try:
        yield j
    finally:
        j.close()
        if made:
            os.rmdir("/run/systemd/journal")


def start_journaled(world: World, factory: DaemonFactory, journal: JournalStandIn, *args: str) -> test_daemon.Daemon:
    """ksbpfd logging to the journal stand-in (as DaemonFactory starts it, wrapped in a mount
    namespace), registered with the factory so its cleanup stops it."""
    w = world
    w.write_policy(w.policy())
    log = w.tmp / f"ksbpfd-{len(factory.started)}.log"
    notify = test_daemon.NotifyListener()
    factory.listeners.append(notify)
    base = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET")}
    env = {**base, "NOTIFY_SOCKET": notify.path, "PYTHONPATH": str(REPO)}
    inner = [sys.executable, "-m", "ksbpf.daemon", "--config", str(w.policy_path), "--netns", w.client,
             "--state-dir", str(w.state), "--log-target", "journal", *args]
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /run/systemd/journal && exec "$@"', journal.dir, *inner]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    d = test_daemon.Daemon(w, proc, notify, log)
    factory.started.append(d)
    wait_for(lambda: notify.received("READY", "1") or proc.poll() is not None, "READY=1", timeout=90)
    assert proc.poll() is None, f"ksbpfd exited {proc.returncode}:\n{d.log_text()[-3000:]}"
    return d


class Watch:
    """`ksctl --netns NS watch --json` running, its lines read on a thread."""

    def __init__(self, world: World, *args: str) -> None:
        cmd = [sys.executable, "-m", "ksbpf.cli", "--netns", world.client, "--state-dir", str(world.state), "watch", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()
        assert "watching drop events" in first, first + self.proc.stderr.read()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), line))

    def events(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, json.loads(x)) for t, x in self.lines]

    def end(self, sig: int | None = signal.SIGINT) -> tuple[int, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout=5)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


def test_watch_journal_and_status_name_the_leaking_process(world: World, daemon: DaemonFactory,
                                                           journal: JournalStandIn) -> None:
    d = start_journaled(world, daemon, journal, "--event-interval", "1")
    if not bpf_engaged(d.scrape()):
        pytest.skip("the BPF layer is not engaged here: " + json.dumps(d.status()["layers"]["bpf"]))
    status = d.status()
    if "nftables" not in status["drop_events"]:
        pytest.skip(f"nftables drops are not reported here: {status['drop_events']}")
    u, apps = world.uplink, world.cgroups.rel(world.apps)
    watch = Watch(world, "--json")
    dns_only = Watch(world, "--json", "--reason", "dns", "--cgroup", apps)
    try:
        # A resolver outside the tunnel, sent to out of the uplink on purpose.
        r = leak(world.client, world.apps, [("192.0.2.53", 53, 1, u.up_if)])
        assert r["eperm"] == 1
        # (ksbpfd wakes on the ring buffer's descriptor: the event is there in milliseconds;
        # no time limit is asserted on a shared machine.)
        (_, e), = wait_for(lambda: watch.events(), "the drop event from ksctl watch", timeout=10)
        assert {k: e[k] for k in ("pid", "comm", "cgroup", "family", "proto", "daddr", "dport", "reason", "layer",
                                  "count")} == {
            "pid": r["pid"], "comm": COMM, "cgroup": apps, "family": "ipv4", "proto": "udp", "daddr": "192.0.2.53",
            "dport": 53, "reason": "dns", "layer": "nftables", "count": 1}
        assert e["time"].endswith("Z")
        # The journal's entry carries the same.
        (j,) = wait_for(lambda: journal.find(KSBPF_EVENT="drop", KSBPF_PID=str(r["pid"])), "the journal entry")
        assert {k: j[k] for k in ("KSBPF_COMM", "KSBPF_CGROUP", "KSBPF_DEST", "KSBPF_REASON", "KSBPF_LAYER",
                                  "KSBPF_COUNT")} == {
            "KSBPF_COMM": COMM, "KSBPF_CGROUP": apps, "KSBPF_DEST": "192.0.2.53:53", "KSBPF_REASON": "dns",
            "KSBPF_LAYER": "nftables", "KSBPF_COUNT": "1"}
        assert j["SYSLOG_IDENTIFIER"] == "ksbpfd" and j["PRIORITY"] == "4"
        # Not DNS: not for the filtered watcher.
        assert leak(world.client, world.apps, [("192.0.2.1", 9, 1, u.up_if)])["eperm"] == 1
        try:
            wait_for(lambda: len(watch.events()) >= 2, "the second event", timeout=5)
        except AssertionError:
            print("\n".join(e.get("MESSAGE", "") for e in journal.entries))
            print(sh("nft", "list", "ruleset", netns=world.client).stdout)
            raise
        assert len(watch.events()) == 2, watch.events()
        assert [x["reason"] for _, x in dns_only.events()] == ["dns"]
        # ksctl status shows the last drops with their process.
        human = world.ksctl("status")
        assert f"{COMM}[{r['pid']}]" in human.stdout and "192.0.2.53:53" in human.stdout, human.stdout

        # A flood: a few events (the kernel's rate limit), whose counts add up to the counter.
        key = {"layer": "nftables", "reason": "dns", "family": "ipv4", "cgroup": ""}
        before = test_daemon.sample(d.scrape(), "ksbpf_dropped_packets_total", **key)
        n = 300
        flood = leak(world.client, world.apps, [("192.0.2.53", 53, n, u.up_if)], comm="flood")
        assert flood["eperm"] == n

        def flood_events() -> list[dict[str, Any]]:
            return [x for _, x in watch.events() if x["comm"] == "flood"]

        # What the rate limit held back is reported once its window is over (ksbpfd's flush).
        wait_for(lambda: sum(x["count"] for x in flood_events()) >= n, "the flood's counts", timeout=10)
        delta = test_daemon.sample(d.scrape(), "ksbpf_dropped_packets_total", **key) - before
        assert sum(x["count"] for x in flood_events()) == delta == n
        assert len(flood_events()) <= 2 * 8, "coalesced in the kernel"

        def flood_lines() -> list[dict[str, str]] | None:
            found = journal.find(KSBPF_EVENT="drop", KSBPF_COMM="flood")
            return found if sum(int(e["KSBPF_COUNT"]) for e in found) == n else None

        jl = wait_for(flood_lines, "the flood in the journal")
        assert len(jl) <= 3, "one journal line per process, destination and reason per interval"
        assert sample_lost(d) == 0

        # Ctrl-C ends a watch cleanly.
        rc, err = dns_only.end(signal.SIGINT)
        assert rc == 0 and "Traceback" not in err, err
    finally:
        if dns_only.proc.poll() is None:
            dns_only.end()
    # So does the daemon stopping.
    assert d.stop() == 0
    rc, err = watch.end(sig=None)
    assert rc == 0 and "ksbpfd is stopping" in err, err


def sample_lost(d: test_daemon.Daemon) -> float:
    m = d.scrape()
    assert ("ksbpf_drop_events_lost_total", ()) in m
    return test_daemon.sample(m, "ksbpf_drop_events_lost_total")


def test_watch_sessions_are_bounded_and_never_block_other_clients(world: World, daemon: DaemonFactory) -> None:
    d = daemon()
    if not bpf_engaged(d.scrape()):
        pytest.skip("the BPF layer is not engaged here")
    watches = [Watch(world, "--json") for _ in range(8)]
    try:
        # A control socket held by a watcher would leave this waiting for ksctl's reply timeout.
        assert world.ksctl("status", "--json").returncode == 0, "the control socket still answers"
        ninth = world.ksctl("watch")
        assert ninth.returncode != 0 and "8 watch sessions already" in ninth.stderr
        bad = world.ksctl("watch", "--reason", "nope")
        assert bad.returncode == 2 and "--reason" in bad.stderr
    finally:
        for w in watches:
            w.end()
