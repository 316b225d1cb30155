"""ksbpfd on the kernel: started for a namespace and cgroup this test makes, with a real
NOTIFY_SOCKET listener, scraped over HTTP, driven through its control socket, and
attacked with drift behind its back.

The client namespace has an uplink veth to a far namespace that counts what leaves
(tests.kernel.uplink) and a veth named like a tunnel to a "vpn" namespace. The WireGuard
lab variants are in test_daemon_lab.py.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tests.nobody
from ksbpf.linux.engine import LinuxEngine, state_dir_for
from tests.kernel.conftest import CgroupFactory, NetnsFactory, sh
from tests.kernel.sender import send as send_probe
from tests.kernel.sender import start_flood
from tests.kernel.uplink import Uplink, add_tunnel, build_uplink, ksctl

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]

UDP4_PACKET_BYTES = 20 + 8 + 32  # what nft counts at the output hook for one datagram


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(netns: str, cgroup: Path | None, dst: str, port: int, n: int, *, dev: str | None = None, mark: int = 0) -> dict[str, Any]:
    """n datagrams of 32 bytes through the shared sender: {"sent": n, "errors": {errno name: n}}."""
    r = send_probe(netns, dst, port, n, cgroup=cgroup, dev=dev, mark=mark)
    return {"sent": r.sent, "errors": r.errors}


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Metrics:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Metrics = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


class NotifyListener:
    """A real NOTIFY_SOCKET: an AF_UNIX datagram socket this test binds. `on_message`
    runs on arrival (e.g. to look at the kernel the moment READY=1 comes in)."""

    def __init__(self, on_message: Callable[[dict[str, str]], None] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="ksn")  # short: sun_path holds 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.on_message = on_message
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            t = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if self.on_message is not None:
                self.on_message(fields)
            with self._lock:
                self.messages.append((t, fields))

    def received(self, key: str, value: str | None = None) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if key in m and (value is None or m[key] == value)]

    def wait(self, key: str, value: str | None = None, *, count: int = 1, timeout: float = 60.0) -> list[tuple[float, dict[str, str]]]:
        return list(wait_for(lambda: len(self.received(key, value)) >= count and self.received(key, value),
                             f"{count} x {key}={value or '*'} on NOTIFY_SOCKET", timeout=timeout))

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()
        with_suppress_unlink(self.path)
        os.rmdir(self.dir)


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class World:
    """A client namespace (uplink + tunnel veth) and cgroups: `bpf` is the attach point,
    `apps` below it is where test processes run, as every process on a host runs below
    the root cgroup."""

    uplink: Uplink
    cgroups: CgroupFactory
    tmp: Path
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.bpf_cg = self.cgroups("bpf")
        self.apps = self.cgroups("bpf/apps")
        self.state = self.tmp / "state"
        self.policy_path = self.tmp / "policy.toml"

    @property
    def client(self) -> str:
        return self.uplink.client

    def policy(self, extra: str = "", **kw: Any) -> str:
        return self.uplink.policy(
            f'[bpf]\ncgroup = "{self.cgroups.rel(self.bpf_cg)}"\n[metrics]\nlisten = "127.0.0.1:{self.port}"\n' + extra, **kw
        )

    def write_policy(self, text: str, mode: int = 0o600) -> Path:
        tmp = self.policy_path.with_suffix(".new")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, self.policy_path)
        return self.policy_path

    def ksctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ksctl(*args, netns=self.client, state_dir=str(self.state))

    def engine(self) -> LinuxEngine:
        return LinuxEngine(netns=self.client, state_dir=state_dir_for(self.client, self.state))

    def nft_rules(self, chain: str = "output") -> list[dict[str, Any]]:
        out = sh("nft", "-j", "-a", "list", "chain", "inet", "ksbpf", chain, netns=self.client, check=False).stdout
        return [o["rule"] for o in json.loads(out or '{"nftables": []}')["nftables"] if "rule" in o]

    def has_table(self) -> bool:
        return sh("nft", "list", "table", "inet", "ksbpf", netns=self.client, check=False).returncode == 0


@dataclass
class Daemon:
    world: World
    proc: subprocess.Popen[str]
    notify: NotifyListener
    log: Path

    @property
    def port(self) -> int:
        return self.world.port

    def scrape(self) -> Metrics:
        return scrape(self.port)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        r = self.world.ksctl("status", "--json")
        assert r.returncode in (0, 1), r.stderr
        return dict(json.loads(r.stdout))

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


class DaemonFactory:
    def __init__(self, world: World) -> None:
        self.world = world
        self.started: list[Daemon] = []
        self.listeners: list[NotifyListener] = []

    def __call__(self, policy: str | None = None, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, on_message: Callable[[dict[str, str]], None] | None = None) -> Daemon:
        w = self.world
        if policy is not None or not w.policy_path.exists():
            w.write_policy(policy if policy is not None else w.policy())
        log = w.tmp / f"ksbpfd-{len(self.started)}.log"
        notify = NotifyListener(on_message)
        self.listeners.append(notify)
        base = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET")}
        full_env = {**base, "NOTIFY_SOCKET": notify.path, "PYTHONPATH": str(REPO), **(env or {})}
        argv = [sys.executable, "-m", "ksbpf.daemon", "--config", str(w.policy_path), "--netns", w.client,
                "--state-dir", str(w.state), "--log-target", "stderr", *args]
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, env=full_env, stdout=f, stderr=subprocess.STDOUT, text=True)
        d = Daemon(w, proc, notify, log)
        self.started.append(d)
        if wait_ready:
            try:
                wait_for(lambda: notify.received("READY", "1") or proc.poll() is not None, "READY=1", timeout=90)
            finally:
                if proc.poll() is not None:
                    raise AssertionError(f"ksbpfd exited {proc.returncode}:\n{d.log_text()[-3000:]}")
        return d

    def cleanup(self) -> None:
        for d in self.started:
            d.stop()  # by its pid, SIGTERM then SIGKILL
        for n in self.listeners:
            n.close()
        try:
            self.world.engine().down()
        except Exception as e:  # cleanup goes on; the namespace goes anyway
            print(f"cleanup: ksbpf down failed: {e}", file=sys.stderr)


@pytest.fixture
def world(make_netns: NetnsFactory, make_cgroup: CgroupFactory, tmp_path: Path) -> World:
    return World(build_uplink(make_netns), make_cgroup, tmp_path)


@pytest.fixture
def daemon(world: World) -> Iterator[DaemonFactory]:
    f = DaemonFactory(world)
    try:
        yield f
    finally:
        f.cleanup()


def bpf_engaged(m: Metrics) -> bool:
    return sample(m, "ksbpf_layer_engaged", layer="bpf") == 1.0


# =========================================================================== start, notify


def test_ready_only_once_enforcing_with_status_and_watchdog_pings(world: World, daemon: DaemonFactory) -> None:
    at_ready: dict[str, Any] = {}

    def look(fields: dict[str, str]) -> None:
        if fields.get("READY") == "1" and not at_ready:
            at_ready["table"] = world.has_table()
            at_ready["rule"] = "lookup 19283" in sh("ip", "rule", netns=world.client).stdout
            try:
                at_ready["metrics"] = "ksbpf_layer_engaged" in str(scrape(world.port))
            except OSError as e:
                at_ready["metrics"] = str(e)

    watchdog_s = 1.0
    d = daemon(None, env={"WATCHDOG_USEC": str(int(watchdog_s * 1e6))}, on_message=look)
    assert at_ready == {"table": True, "rule": True, "metrics": True}
    ready_t, ready = d.notify.received("READY", "1")[0]
    assert "enforcing: nftables+routing" in ready["STATUS"] and "tunnel" in ready["STATUS"]

    # Pings at least twice per WatchdogSec (systemd's advice), measured as a ratio.
    pings = d.notify.wait("WATCHDOG", "1", count=4, timeout=10 * watchdog_s)
    times = [ready_t] + [t for t, _ in pings]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) / watchdog_s < 1.0, gaps
    assert d.proc.poll() is None


def test_no_watchdog_pings_unless_asked(world: World, daemon: DaemonFactory) -> None:
    d = daemon()
    status_before = len(d.notify.received("STATUS"))
    d.signal(signal.SIGHUP)  # something to wait for instead of a fixed sleep
    d.notify.wait("READY", "1", count=2)
    assert len(d.notify.received("STATUS")) > status_before
    assert d.notify.received("WATCHDOG") == []


def test_policy_writable_by_others_is_refused_at_start(world: World, daemon: DaemonFactory) -> None:
    for mode, owner, needle in [(0o664, 0, "writable by group or others"), (0o602, 0, "writable by group or others"),
                                (0o600, 65534, "owned by uid 65534")]:
        path = world.write_policy(world.policy(), mode)
        os.chown(path, owner, 0)
        d = daemon(None, wait_ready=False)
        assert d.proc.wait(timeout=60) == 2
        assert needle in d.log_text() and str(path) in d.log_text()
        assert not d.notify.received("READY")
        assert not world.has_table(), "nothing may be engaged from a refused policy"
        assert "refusing to start" in d.notify.wait("STATUS")[0][1]["STATUS"]


# =========================================================================== metrics


def test_drop_counters_rise_by_exactly_the_blocked_packets(world: World, daemon: DaemonFactory) -> None:
    d = daemon()
    u = world.uplink
    before, far0 = d.scrape(), u.far_count()
    assert sample(before, "ksbpf_layer_engaged", layer="nftables") == 1.0
    assert sample(before, "ksbpf_tunnel_up", interface=u.tun_if) == 1.0

    # Sent out of the uplink on purpose (SO_BINDTODEVICE), from the test cgroup.
    n = 37
    r = send(world.client, world.apps, "192.0.2.1", 9, n, dev=u.up_if)
    assert r == {"sent": 0, "errors": {"EPERM": n}}
    # Another resolver, through the tunnel: DNS only to the configured one.
    n_dns = 11
    r = send(world.client, world.apps, "203.0.113.53", 53, n_dns)
    assert r["errors"] == {"EPERM": n_dns}

    after = d.scrape()
    key = {"layer": "nftables", "reason": "no_tunnel", "family": "ipv4", "cgroup": ""}
    delta = lambda name, **k: sample(after, name, **k) - sample(before, name, **k)  # noqa: E731
    assert delta("ksbpf_dropped_packets_total", **key) == n
    assert delta("ksbpf_dropped_bytes_total", **key) == n * UDP4_PACKET_BYTES
    dns = {**key, "reason": "dns"}
    assert delta("ksbpf_dropped_packets_total", **dns) == n_dns
    assert delta("ksbpf_dropped_bytes_total", **dns) == n_dns * UDP4_PACKET_BYTES
    assert u.far_count() == far0
    assert sample(after, "ksbpf_exemptions") == 0
    assert sample(after, "ksbpf_policy_apply_seconds_count") == 1
    assert sample(after, "ksbpf_build_info", version=__import__("ksbpf").__version__,
                  python=__import__("platform").python_version(), kernel=os.uname().release) == 1


def test_bpf_drops_carry_the_cgroup_path(world: World, daemon: DaemonFactory) -> None:
    """The endpoint's cgroup half is the BPF layer's: marked traffic to the endpoint from a
    cgroup that is not the VPN client's passes nftables and is dropped (and counted per
    cgroup) by BPF. The cgroup label is the slice (here the test's top cgroup) by default,
    the whole path with cgroup_label = "cgroup", and a removed cgroup's drops fold into
    "(gone)" there."""
    vpn = world.cgroups("bpf/vpn-client")

    def policy(extra: str = "") -> str:
        return world.policy(extra).replace(
            "endpoint_mark = 0xca6c", f'endpoint_mark = 0xca6c\nendpoint_cgroups = ["{world.cgroups.rel(vpn)}"]'
        )

    d = daemon(policy())
    before = d.scrape()
    if not bpf_engaged(before):
        pytest.skip("the BPF layer is not engaged here: " + json.dumps(d.status()["layers"]["bpf"]))
    n = 23
    r = send(world.client, world.apps, "192.0.2.1", 51820, n, mark=0xCA6C)
    assert r["errors"] == {"EPERM": n}, r
    apps = world.cgroups.rel(world.apps)
    key = {"layer": "bpf", "reason": "endpoint_unauthorized", "family": ""}
    top = {**key, "cgroup": apps.split("/")[0]}
    packets = lambda m, **k: sample(m, "ksbpf_dropped_packets_total", **k)  # noqa: E731

    def scrape_when(cond: Callable[[Metrics], bool]) -> Callable[[], Metrics | None]:
        def look() -> Metrics | None:
            m = d.scrape()
            return m if cond(m) else None
        return look

    # A new cgroup id is named by the next walk of the tree (at most every 5 s).
    after = wait_for(scrape_when(lambda m: packets(m, **top) - packets(before, **top) == n), "the slice series to count")
    nbytes = sample(after, "ksbpf_dropped_bytes_total", **top) - sample(before, "ksbpf_dropped_bytes_total", **top)
    assert nbytes == n * UDP4_PACKET_BYTES
    assert not any(k[0] == "ksbpf_dropped_packets_total" and ("cgroup", apps) in k[1] for k in after)
    # The VPN client's own cgroup may.
    f0 = world.uplink.far_count()
    assert send(world.client, vpn, "192.0.2.1", 51820, 5, mark=0xCA6C)["sent"] == 5
    assert world.uplink.far_count() - f0 >= 5

    world.write_policy(policy('cgroup_label = "cgroup"\n'))
    d.signal(signal.SIGHUP)
    d.notify.wait("READY", "1", count=2)
    whole = {**key, "cgroup": apps}
    assert packets(d.scrape(), **whole) == packets(after, **top), "every BPF drop so far came from apps"
    short = world.cgroups("bpf/apps/short-lived")
    m = 7
    assert send(world.client, short, "192.0.2.1", 51820, m, mark=0xCA6C)["errors"] == {"EPERM": m}
    short.rmdir()
    gone = {**key, "cgroup": "(gone)"}
    final = wait_for(scrape_when(lambda x: packets(x, **gone) == m), "the removed cgroup to fold")
    assert packets(final, **whole) == packets(after, **top)
    assert not any(("cgroup", world.cgroups.rel(short)) in k[1] for k in final)


# =========================================================================== drift


def _detach_bpf_egress(world: World) -> None:
    path = str(world.bpf_cg)
    progs = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", path], capture_output=True, text=True, check=True).stdout)
    ids = [p["id"] for p in progs if p.get("attach_type") in ("cgroup_inet_egress", "egress")]
    assert ids, progs
    for i in ids:
        subprocess.run(["bpftool", "cgroup", "detach", path, "cgroup_inet_egress", "id", str(i)], check=True)


def _bpf_egress_attached(world: World) -> bool:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(world.bpf_cg)], capture_output=True, text=True).stdout
    return any(p.get("attach_type") in ("cgroup_inet_egress", "egress") for p in json.loads(out.strip() or "[]"))


def _delete_first_output_rule(world: World) -> None:
    handle = world.nft_rules("output")[0]["handle"]
    sh("nft", "delete", "rule", "inet", "ksbpf", "output", "handle", str(handle), netns=world.client)


def _flush_table(world: World) -> None:
    sh("nft", "flush", "table", "inet", "ksbpf", netns=world.client)


def _delete_table(world: World) -> None:
    sh("nft", "delete", "table", "inet", "ksbpf", netns=world.client)


def _delete_ip_rule(world: World) -> None:
    sh("ip", "-4", "rule", "del", "pref", "10100", netns=world.client)  # the catch-all into table 19283


def _delete_blackhole(world: World) -> None:
    sh("ip", "-6", "route", "del", "blackhole", "default", "table", "19283", "metric", "4294967295", netns=world.client)


DRIFTS: dict[str, tuple[str, Callable[[World], None]]] = {
    "table-flushed": ("nftables", _flush_table),
    "table-deleted": ("nftables", _delete_table),
    "rule-removed": ("nftables", _delete_first_output_rule),
    "ip-rule-deleted": ("routing", _delete_ip_rule),
    "blackhole-deleted": ("routing", _delete_blackhole),
    "bpf-detached": ("bpf", _detach_bpf_egress),
}


def _kernel_state(world: World) -> dict[str, Any]:
    return {
        "output_rules": len(world.nft_rules("output")),
        "input_rules": len(world.nft_rules("input")),
        "ip_rules": sorted(line for line in sh("ip", "rule", netns=world.client).stdout.splitlines() if "19283" in line or "0x4b" in line),
        "blackholes": [sh("ip", fam, "route", "show", "table", "19283", "type", "blackhole", netns=world.client).stdout
                       for fam in ("-4", "-6")],
        "bpf": _bpf_egress_attached(world),
    }


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_drift_is_repaired_logged_and_counted(world: World, daemon: DaemonFactory, drift: str) -> None:
    layer, do = DRIFTS[drift]
    d = daemon()
    m0 = d.scrape()
    if layer == "bpf" and not bpf_engaged(m0):
        pytest.skip("the BPF layer is not engaged here")
    if layer == "bpf" and shutil.which("bpftool") is None:
        pytest.skip("bpftool (the detaching hand) is not installed")
    want = _kernel_state(world)
    key = ("ksbpf_drift_repairs_total", (("layer", layer),))
    assert m0[key] == 0

    do(world)
    assert _kernel_state(world) != want, "the drift did not happen"
    wait_for(lambda: d.scrape()[key] >= 1, f"{layer} drift to be repaired")
    wait_for(lambda: _kernel_state(world) == want, "the kernel state to be back")
    assert f"drift repaired in {layer}" in d.log_text()
    # Repaired once, and no other layer was "repaired" along the way.
    d.signal(signal.SIGHUP)  # a full round through the main loop before looking again
    d.notify.wait("READY", "1", count=2)
    m1 = d.scrape()
    assert {k[1][0][1]: v for k, v in m1.items() if k[0] == "ksbpf_drift_repairs_total"} == {
        n: (1.0 if n == layer else 0.0) for n in ("nftables", "routing", "bpf")
    }
    # And it enforces: blocked traffic is still blocked and counted.
    assert send(world.client, world.apps, "192.0.2.1", 9, 3, dev=world.uplink.up_if)["errors"] == {"EPERM": 3}


def test_ksctl_down_is_not_drift(world: World, daemon: DaemonFactory) -> None:
    """Without the daemon's help, `ksctl down` removes the layers and then the applied
    record: the daemon must not fight it (and must say it is idle)."""
    d = daemon()
    r = world.ksctl("down")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "ksctl down" in d.log_text(), "the daemon to notice `ksctl down`")
    wait_for(lambda: sample(d.scrape(), "ksbpf_enforcing") == 0.0, "the daemon to go idle")
    gone = {"output_rules": 0, "input_rules": 0, "ip_rules": [], "blackholes": ["", ""], "bpf": False}
    assert _kernel_state(world) == gone and not world.has_table()
    assert sum(v for k, v in d.scrape().items() if k[0] == "ksbpf_drift_repairs_total") == 0
    d.signal(signal.SIGHUP)  # reload re-engages
    d.notify.wait("READY", "1", count=2)
    assert world.has_table()
    assert sample(d.scrape(), "ksbpf_enforcing") == 1.0


# =========================================================================== links, cgroups


def _route_table(world: World) -> str:
    return sh("ip", "route", "show", "table", "19283", netns=world.client).stdout


def test_recreated_tunnel_is_followed_by_routing_and_bpf(world: World, daemon: DaemonFactory,
                                                         record_property: Callable[[str, object], None]) -> None:
    d = daemon()
    u = world.uplink
    old = int(json.loads(sh("ip", "-j", "link", "show", u.tun_if, netns=u.client).stdout)[0]["ifindex"])
    sh("ip", "link", "del", u.tun_if, netns=u.client)
    wait_for(lambda: f"dev {u.tun_if}" not in _route_table(world), "the route via the old tunnel to go")
    assert send(u.client, world.apps, "203.0.113.9", 9, 3)["sent"] == 0  # blackhole: blocked while gone

    # Watch from outside, every 2 ms: when the new link is up, and when a route uses it.
    seen: dict[str, float] = {}
    stop, looking = threading.Event(), threading.Event()

    def watch() -> None:
        from pyroute2 import IPRoute

        from ksbpf.linux.netns import netns

        with netns(u.client), IPRoute() as ipr:
            while not stop.is_set():
                now = time.monotonic()
                if "up" not in seen:
                    if any(link.get_attr("IFLA_IFNAME") == u.tun_if and link["flags"] & 1 for link in ipr.get_links()):
                        seen["up"] = now
                    else:
                        seen["not_up"] = now
                        looking.set()
                if any(r.get_attr("RTA_OIF") and r["type"] != 6 for r in ipr.get_routes(table=19283)):
                    seen["route"] = now
                    return
                time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        assert looking.wait(10)
        add_tunnel(u)  # new veth, same name, new ifindex
        t.join(timeout=10)
    finally:
        stop.set()
        t.join()
    new = int(json.loads(sh("ip", "-j", "link", "show", u.tun_if, netns=u.client).stdout)[0]["ifindex"])
    assert new != old
    assert "route" in seen and "up" in seen, (seen, _route_table(world))
    # Upper bound: from the last look that found the link not yet up to the first look
    # that found the route (0 ms: the route was there at the first look the link was up).
    outside_ms = (seen["route"] - seen.get("not_up", seen["up"])) * 1000
    status = d.status()
    inside_ms = status["last_tunnel_follow_ms"]
    record_property("tunnel_follow_ms_daemon", inside_ms)
    record_property("tunnel_follow_ms_observed", round(outside_ms, 1))
    print(f"tunnel recreated: followed in {inside_ms} ms by the daemon's clock; from outside, the route was in "
          f"at most {outside_ms:.1f} ms after the last look that found the link not yet up")
    assert inside_ms is not None and inside_ms < 500, "goal 100 ms; checked generously on a shared 2-core VM"
    assert outside_ms < 500, "goal 100 ms, as observed from outside; checked generously"
    if bpf_engaged(d.scrape()):
        wait_for(lambda: f"tunnel ifindexes [{new}]" in d.status()["layers"]["bpf"]["detail"], "the BPF tunnel map")
    t0 = u.tunnel_count()
    assert send(u.client, world.apps, "203.0.113.9", 9, 5)["sent"] == 5
    assert u.tunnel_count() - t0 >= 5
    assert sum(v for k, v in d.scrape().items() if k[0] == "ksbpf_drift_repairs_total") == 0


def test_new_interface_gets_its_egress_chain(world: World, daemon: DaemonFactory, make_netns: NetnsFactory) -> None:
    d = daemon()
    other = make_netns("ko")
    sh("ip", "link", "add", "lan9", "netns", world.client, "type", "veth", "peer", "name", "eth0", "netns", other)
    idx = int(json.loads(sh("ip", "-j", "link", "show", "lan9", netns=world.client).stdout)[0]["ifindex"])

    def chains() -> str:
        return sh("nft", "list", "table", "netdev", "ksbpf", netns=world.client).stdout

    wait_for(lambda: f"chain egress_if{idx}" in chains(), "an egress chain on the new interface")
    assert 'device "lan9"' in chains()
    # The chain is in the kernel before ksbpfd writes its log line: wait for the line too.
    wait_for(lambda: "netdev egress chains follow the interfaces: added lan9" in d.log_text(),
             "the log line naming the new interface")
    sh("ip", "link", "del", "lan9", netns=world.client)
    wait_for(lambda: f"chain egress_if{idx}" not in chains(), "the chain of the removed interface to go")
    assert sum(v for k, v in d.scrape().items() if k[0] == "ksbpf_drift_repairs_total") == 0


def test_restarted_exempt_service_keeps_its_exemption(world: World, daemon: DaemonFactory) -> None:
    svc = world.cgroups("bpf/svc.service")
    rel = world.cgroups.rel(svc)
    d = daemon(world.policy(f'[[exempt]]\ncgroup = "{rel}"\nallow = ["udp/9"]\nto = ["192.0.2.1/32"]\n'))
    if not bpf_engaged(d.scrape()):
        pytest.skip("exempt sockets are marked by the BPF layer, which is not engaged here")
    assert sample(d.scrape(), "ksbpf_exemptions") == 1
    u = world.uplink
    f0 = u.far_count()
    assert send(u.client, svc, "192.0.2.1", 9, 4)["sent"] == 4
    assert u.far_count() - f0 >= 4
    old_id = d.status()["cgroup_ids"][rel]

    svc.rmdir()  # the unit stops: its cgroup goes ...
    svc.mkdir()  # ... and comes back with a new id
    new_id = os.stat(svc).st_ino
    assert new_id != old_id
    wait_for(lambda: d.status()["cgroup_ids"][rel] == new_id, "the exemption to follow the new cgroup id")
    assert "exemption follows its cgroup" in d.log_text()
    f1 = u.far_count()
    assert send(u.client, svc, "192.0.2.1", 9, 4)["sent"] == 4
    assert u.far_count() - f1 >= 4
    assert send(u.client, world.apps, "192.0.2.1", 9, 4, dev=u.up_if)["sent"] == 0  # others still not


# =========================================================================== reload


def test_sighup_with_a_broken_policy_keeps_the_old_one(world: World, daemon: DaemonFactory) -> None:
    t0 = time.time()
    d = daemon()
    ruleset = lambda: sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout  # noqa: E731
    before = ruleset()
    m = d.scrape()
    started_at = sample(m, "ksbpf_config_last_reload_success_timestamp_seconds")
    assert sample(m, "ksbpf_config_last_reload_successful") == 1 and t0 <= started_at <= time.time()
    for n, (text, mode) in enumerate([("[tunnel\n", 0o600), (world.policy("surprise = 1\n"), 0o600),
                                      (world.policy(), 0o666)], start=1):
        world.write_policy(text, mode)
        d.signal(signal.SIGHUP)
        reloading = d.notify.wait("RELOADING", "1", count=n)
        ready = d.notify.wait("READY", "1", count=n + 1)
        assert reloading[-1][0] <= ready[-1][0]
        assert "MONOTONIC_USEC" in reloading[-1][1]
        m = d.scrape()
        assert sample(m, "ksbpf_policy_reloads_total", result="refused") == n
        assert sample(m, "ksbpf_config_last_reload_successful") == 0
        assert sample(m, "ksbpf_config_last_reload_success_timestamp_seconds") == started_at
        assert ruleset() == before
    assert "reload (SIGHUP) refused" in d.log_text()
    assert d.proc.poll() is None
    assert send(world.client, world.apps, "192.0.2.1", 9, 3, dev=world.uplink.up_if)["errors"] == {"EPERM": 3}

    # A good policy is taken, atomically, and says so.
    world.write_policy(world.policy().replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.1", "10.64.0.53"]'))
    t1 = time.time()
    d.signal(signal.SIGHUP)
    d.notify.wait("READY", "1", count=5)
    assert "10.64.0.53" in ruleset()
    m = d.scrape()
    assert sample(m, "ksbpf_policy_reloads_total", result="ok") == 1
    assert sample(m, "ksbpf_config_last_reload_successful") == 1
    assert t1 <= sample(m, "ksbpf_config_last_reload_success_timestamp_seconds") <= time.time()
    assert sample(m, "ksbpf_policy_apply_seconds_count") == 2

    # A new [metrics] listen moves the endpoint.
    old_port, world.port = world.port, free_port()
    world.write_policy(world.policy())
    d.signal(signal.SIGHUP)
    d.notify.wait("READY", "1", count=6)
    assert sample(d.scrape(), "ksbpf_policy_reloads_total", result="ok") == 2
    with pytest.raises(OSError):
        scrape(old_port)


def test_ksctl_reload_asks_the_daemon_and_a_bad_policy_is_exit_2(world: World, daemon: DaemonFactory) -> None:
    r = world.ksctl("reload")
    assert r.returncode == 1 and "no ksbpfd serves this namespace" in r.stderr
    d = daemon()
    world.write_policy(world.policy().replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.1", "10.64.0.54"]'))
    r = world.ksctl("reload")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "ksbpfd reloaded its policy" in r.stdout and "nftables  engaged" in r.stdout
    ruleset = sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout
    assert "10.64.0.54" in ruleset
    world.write_policy(world.policy("surprise = 1\n"))
    r = world.ksctl("reload")
    assert r.returncode == 2 and "surprise" in r.stderr, r.stdout + r.stderr
    assert sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout == ruleset
    assert sample(d.scrape(), "ksbpf_policy_reloads_total", result="refused") == 1

    # `ksctl up` of the daemon's own file is a reload by the daemon; of another file, refused
    # (the daemon would undo it as drift), and nothing changes.
    world.write_policy(world.policy().replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.1", "10.64.0.55"]'))
    r = world.ksctl("up", "--config", str(world.policy_path))
    assert r.returncode in (0, 3) and "by ksbpfd" in r.stdout, r.stdout + r.stderr
    ruleset = sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout
    assert "10.64.0.55" in ruleset
    other = world.tmp / "other.toml"
    other.write_text(world.policy().replace('servers = ["10.64.0.1"]', 'servers = ["10.64.0.99"]'))
    r = world.ksctl("up", "--config", str(other))
    assert r.returncode == 2 and f"ksbpfd enforces {world.policy_path}" in r.stderr, r.stdout + r.stderr
    r = world.ksctl("up", "--config", str(world.policy_path), "--no-bpf")
    assert r.returncode == 2 and "--no-bpf" in r.stderr, r.stdout + r.stderr
    assert sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout == ruleset
    assert sample(d.scrape(), "ksbpf_policy_reloads_total", result="ok") == 2


def test_a_policy_refused_at_start_falls_back_to_the_last_applied_one(world: World, daemon: DaemonFactory) -> None:
    d = daemon()
    before = sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout
    assert d.stop() == 0
    world.write_policy("[tunnel\n")
    d2 = daemon(None)
    status = d2.notify.received("READY", "1")[0][1]["STATUS"]
    assert "refused" in status and "TOML syntax error" in d2.log_text()
    # The file in place is not what enforces: an alert on the reload gauge says so.
    m = d2.scrape()
    assert sample(m, "ksbpf_config_last_reload_successful") == 0
    assert sample(m, "ksbpf_config_last_reload_success_timestamp_seconds") == 0
    assert sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout == before
    assert d2.status()["enforcing"] is True


def test_stop_and_kill_leave_enforcement_in_the_kernel(world: World, daemon: DaemonFactory) -> None:
    u = world.uplink
    d = daemon()
    state = _kernel_state(world)
    flood = start_flood(u.client, [("203.0.113.9", 9, None), ("192.0.2.1", 9, None), ("192.0.2.1", 9, u.up_if)],
                        cgroup=world.apps)
    try:
        f0, t0 = u.far_count(), u.tunnel_count()
        d.proc.kill()  # kill -9, by pid
        d.proc.wait()
        wait_for(lambda: u.tunnel_count() > t0 + 50, "traffic through the tunnel")
        sh("ip", "link", "del", u.tun_if, netns=u.client)  # and then the tunnel goes, with no daemon
        time.sleep(0.5)
        assert u.far_count() == f0, "leaked with the daemon killed"
        assert _kernel_state(world) == state

        # A new daemon adopts what is there.
        d2 = daemon()
        assert d2.status()["pid"] == d2.proc.pid
        assert d2.stop() == 0
        assert _kernel_state(world)["output_rules"] == state["output_rules"]
        assert world.has_table() and _bpf_egress_attached(world) == state["bpf"]
        assert u.far_count() == f0
    finally:
        flood.kill()
        flood.wait()


# =========================================================================== control socket


def test_control_socket_serves_ksctl_and_refuses_bad_requests(world: World, daemon: DaemonFactory) -> None:
    from ksbpf.control import socket_path

    d = daemon()
    path = socket_path(world.client)
    st = os.stat(path)
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == 0
    assert os.stat(path.parent).st_mode & 0o077 == 0

    status = d.status()
    assert status["pid"] == d.proc.pid and status["enforcing"] is True

    svc = world.cgroups("bpf/svc.service")
    rel = world.cgroups.rel(svc)
    r = world.ksctl("exempt", "--cgroup", rel, "--allow", "udp/9", "--to", "192.0.2.1/32")
    assert r.returncode == 0, r.stderr
    assert [e["cgroup"] for e in d.status()["exemptions"]] == [rel]
    assert sample(d.scrape(), "ksbpf_exemptions") == 1
    ruleset = lambda: sh("nft", "-s", "list", "table", "inet", "ksbpf", netns=world.client).stdout  # noqa: E731
    before = ruleset()

    def raw(payload: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(payload)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return dict(json.loads(buf))

    for bad in [b"not json\n", b"[1, 2]\n", b'{"op": "format-disk"}\n', b'{"op": "status", "x": 1}\n',
                b'{"op": "exempt", "exemption": {"cgroup": "../../etc", "allow": ["udp/9"]}}\n',
                b'{"op": "exempt", "exemption": {"cgroup": "a", "allow": ["udp/99999"]}}\n',
                b'{"op": "exempt", "exemption": {"cgroup": "a; rm -rf /", "allow": ["udp/9"]}}\n',
                b'{"op": "unexempt", "cgroup": ""}\n', b'{"op": "unexempt"}\n', b'{"op": "unexempt", "cgroup": "never/exempted"}\n']:
        reply = raw(bad)
        assert reply.get("code") == "bad_request", (bad, reply)
    assert ruleset() == before
    assert [e["cgroup"] for e in d.status()["exemptions"]] == [rel]

    r = world.ksctl("exempt", "--cgroup", rel, "--allow", "udp/99999")
    assert r.returncode == 2 and "99999" in r.stderr
    for args, what in ((["--cgroup", f"{rel}/../../..", "--allow", "udp/9"], "'..'"),
                       (["--cgroup", rel, "--allow", "sctp/9"], "sctp"),
                       (["--cgroup", "/", "--allow", "udp/9"], "root cgroup")):
        r = world.ksctl("exempt", *args)
        assert r.returncode == 2 and what in r.stderr, (args, r.stderr)
    assert ruleset() == before
    r = world.ksctl("unexempt", "--cgroup", "never/exempted")
    assert r.returncode == 2, r.stderr
    r = world.ksctl("unexempt", "--cgroup", rel)
    assert r.returncode == 0, r.stderr
    assert d.status()["exemptions"] == []

    # Not root: the socket itself refuses (0600), and ksctl says so.
    r = subprocess.run([tests.nobody.PYTHON, "-m", "ksbpf.cli", "--netns", world.client, "status"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": tests.nobody.package_copy()}, user=65534, group=65534,
                       cwd="/")
    assert r.returncode != 0 and "permission denied" in r.stderr.lower(), r.stderr

    reply = raw(b'{"op": "reload"}\n')
    assert reply.get("ok") is True and reply["layers"]["nftables"]["engaged"] is True


CLIENT_PATH_FORBIDDEN = ("pyroute2", "nftables", "bcc", "ksbpf.linux", "ksbpf.policy", "ksbpf.render", "tomllib")


def _imported(stderr: str) -> set[str]:
    """Module names from `python -X importtime` output."""
    return {line.split("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:") and line.count("|") >= 2}


def test_ksctl_through_the_daemon_imports_no_kernel_library(world: World, daemon: DaemonFactory) -> None:
    """A ksctl status/exempt/unexempt/reload/up process that talks to ksbpfd loads neither pyroute2,
    nftables nor bcc, nor the engine or the policy parser: the daemon does that work."""
    d = daemon()
    svc = world.cgroups("bpf/svc.service")
    rel = world.cgroups.rel(svc)
    base = [sys.executable, "-X", "importtime", "-m", "ksbpf.cli", "--netns", world.client, "--state-dir", str(world.state)]
    for args in (["exempt", "--cgroup", rel, "--allow", "udp/9", "--to", "192.0.2.1/32"], ["status"], ["unexempt", "--cgroup", rel],
                 ["reload"], ["up", "--config", str(world.policy_path)]):
        r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert r.returncode == 0, (args, r.stderr[-2000:])
        mods = _imported(r.stderr)
        assert "ksbpf.control" in mods
        assert [m for m in mods if m.split(".")[0] in CLIENT_PATH_FORBIDDEN or m.startswith(CLIENT_PATH_FORBIDDEN)] == [], args
    assert d.status()["exemptions"] == []


def _exempt_elements(world: World) -> str:
    return sh("nft", "list", "set", "inet", "ksbpf", "exempt_allow4", netns=world.client).stdout


def test_run_time_exemptions_are_not_drift_and_a_change_right_after_one_is(world: World, daemon: DaemonFactory) -> None:
    """ksbpfd takes the ruleset's new fingerprint after an exemption change off the
    request's path (by the nftables generation it saw it at): its own changes are never
    drift, and another process's change in that window is repaired all the same."""
    d = daemon()
    svc = world.cgroups("bpf/svc.service")
    rel = world.cgroups.rel(svc)
    key = ("ksbpf_drift_repairs_total", (("layer", "nftables"),))
    exempt = ("exempt", "--cgroup", rel, "--allow", "udp/9", "--to", "192.0.2.1/32")
    for _ in range(3):
        assert world.ksctl(*exempt).returncode == 0
        assert world.ksctl("unexempt", "--cgroup", rel).returncode == 0
    assert world.ksctl(*exempt).returncode == 0
    assert "192.0.2.1" in _exempt_elements(world)
    wait_for(lambda: d.status()["nft_fingerprint_pending"] is False, "the deferred nft check")
    time.sleep(0.5)
    assert sum(v for k, v in d.scrape().items() if k[0] == "ksbpf_drift_repairs_total") == 0
    assert "drift repaired" not in d.log_text()

    # Another process empties the set right after an exemption change, before the new
    # fingerprint is taken: that must not become the truth.
    assert world.ksctl("unexempt", "--cgroup", rel).returncode == 0
    assert world.ksctl(*exempt).returncode == 0
    sh("nft", "flush", "set", "inet", "ksbpf", "exempt_allow4", netns=world.client)
    assert "192.0.2.1" not in _exempt_elements(world)
    wait_for(lambda: d.scrape()[key] >= 1, "the flushed exemption set to be repaired")
    wait_for(lambda: "192.0.2.1" in _exempt_elements(world), "the exemption's element to be back")
    wait_for(lambda: d.status()["nft_fingerprint_pending"] is False, "a fingerprint again")
    assert d.scrape()[key] == 1
    assert [e["cgroup"] for e in d.status()["exemptions"]] == [rel]


def _endpoint_elements(world: World) -> str:
    return sh("nft", "list", "set", "inet", "ksbpf", "endpoints4", netns=world.client).stdout


def test_a_reload_of_set_contents_is_by_element_changes_and_not_drift(world: World, daemon: DaemonFactory) -> None:
    """A reload whose policy differs in endpoints only goes in as set element changes,
    its fingerprint taken off the request's path; it is never drift, and another
    process's edit right after such a reload is repaired all the same."""
    d = daemon()
    key = ("ksbpf_drift_repairs_total", (("layer", "nftables"),))
    one = world.policy().replace('endpoints = ["192.0.2.1:51820/udp"]', 'endpoints = ["192.0.2.1:51820/udp", "192.0.2.7:51820/udp"]')
    world.write_policy(one)
    d.signal(signal.SIGHUP)
    d.notify.wait("READY", "1", count=2)
    assert "192.0.2.7" in _endpoint_elements(world)
    assert "reload (SIGHUP): policy" in d.log_text() and "(nftables: changes; bpf: " in d.log_text()
    wait_for(lambda: d.status()["nft_fingerprint_pending"] is False, "the deferred nft check")
    time.sleep(0.5)
    assert d.scrape()[key] == 0 and "drift repaired" not in d.log_text()

    # Another process flushes the endpoint set right after the next such reload.
    world.write_policy(one.replace("192.0.2.7", "192.0.2.8"))
    d.signal(signal.SIGHUP)
    d.notify.wait("READY", "1", count=3)
    sh("nft", "flush", "set", "inet", "ksbpf", "endpoints4", netns=world.client)
    wait_for(lambda: d.scrape()[key] >= 1, "the flushed endpoint set to be repaired")
    wait_for(lambda: "192.0.2.8" in _endpoint_elements(world), "the endpoints to be back")
    elements = _endpoint_elements(world)
    assert "192.0.2.1" in elements and "192.0.2.7" not in elements
    assert d.scrape()[key] == 1


def test_a_run_time_exemption_follows_its_cgroup_when_it_appears(world: World, daemon: DaemonFactory) -> None:
    """Exempted before its cgroup (and that cgroup's parent) exist: the watch is added for
    this exemption alone, and the cgroup is resolved when it appears."""
    d = daemon()
    later = world.bpf_cg / "later.slice" / "x.service"
    rel = world.cgroups.rel(later)
    r = world.ksctl("exempt", "--cgroup", rel, "--allow", "udp/9", "--to", "192.0.2.1/32")
    assert r.returncode == 0, r.stderr
    assert d.status()["cgroup_ids"][rel] is None
    later.mkdir(parents=True)
    wait_for(lambda: d.status()["cgroup_ids"][rel] == os.stat(later).st_ino, "the exemption to find its new cgroup")
    assert "exemption follows its cgroup" in d.log_text()
    if bpf_engaged(d.scrape()):
        u = world.uplink
        f0 = u.far_count()
        assert send(u.client, later, "192.0.2.1", 9, 4)["sent"] == 4
        assert u.far_count() - f0 >= 4
    assert world.ksctl("unexempt", "--cgroup", rel).returncode == 0
    assert rel not in d.status()["cgroup_ids"]


# =========================================================================== boot lockdown


def test_lockdown_holds_until_the_daemon_takes_over_without_a_gap(world: World, daemon: DaemonFactory) -> None:
    """nft/lockdown.nft as units/ksbpf-lockdown.service loads it at boot; then ksbpfd
    starts, enforces its own table and removes the lockdown. A flood that would leave
    through the uplink's default route without either is counted on the far side."""
    u = world.uplink
    for _ in range(2):  # loading it again (a restarted unit) replaces it
        sh("nft", "-f", str(REPO / "nft" / "lockdown.nft"), netns=u.client)
    assert "table inet ksbpf_lockdown" in sh("nft", "list", "tables", netns=u.client).stdout
    assert send(u.client, world.apps, "203.0.113.9", 9, 3)["errors"] == {"EPERM": 3}
    assert send(u.client, world.apps, "10.64.0.1", 9, 3)["errors"] == {"EPERM": 3}
    assert send(u.client, world.apps, "127.0.0.1", 9, 3)["sent"] == 3

    f0 = u.far_count()
    flood = start_flood(u.client, [("203.0.113.9", 9, None)], cgroup=world.apps)
    try:
        d = daemon()
        wait_for(lambda: "ksbpf_lockdown" not in sh("nft", "list", "tables", netns=u.client).stdout, "the lockdown to go")
        assert "lockdown table inet ksbpf_lockdown removed" in d.log_text()
        t0 = u.tunnel_count()
        wait_for(lambda: u.tunnel_count() > t0 + 20, "the flood to go through the tunnel now")
    finally:
        flood.kill()
        flood.wait()
    assert u.far_count() == f0, "something left between the lockdown and the daemon"


def test_without_bpf_the_other_layers_enforce_and_bpf_is_reported_down(world: World, daemon: DaemonFactory) -> None:
    """BPF cannot load (no usable kernel headers): nftables and routing still enforce,
    READY still comes, and the layer is reported as not engaged everywhere."""
    d = daemon(world.policy().replace("[bpf]\n", '[bpf]\nkernel_source = "/nonexistent/kernel-headers"\n'))
    status = d.notify.received("READY", "1")[0][1]["STATUS"]
    assert "enforcing: nftables+routing" in status and "NOT ENGAGED: bpf" in status
    m = d.scrape()
    assert [sample(m, "ksbpf_layer_engaged", layer=n) for n in ("nftables", "routing", "bpf")] == [1, 1, 0]
    st = d.status()
    assert st["layers"]["bpf"]["engaged"] is False and st["layers"]["nftables"]["engaged"] is True
    assert "bpf NOT ENGAGED" in d.log_text()
    r = world.ksctl("status")
    assert r.returncode == 1 and "NOT ENGAGED" in r.stdout
    f0 = world.uplink.far_count()
    assert send(world.client, world.apps, "192.0.2.1", 9, 5, dev=world.uplink.up_if)["errors"] == {"EPERM": 5}
    assert world.uplink.far_count() == f0


# =========================================================================== starvation


def test_idle_metrics_connections_do_not_starve_enforcement(world: World, daemon: DaemonFactory) -> None:
    """Any local user can open connections to the metrics port. With the daemon held to a
    small descriptor limit, 600 idle connections must leave drift repair, the control
    socket and a normal scrape working (before, each held a thread and a descriptor until
    the daemon's netlink sockets failed with EMFILE)."""
    import socket

    d = daemon()
    subprocess.run(["prlimit", f"--pid={d.proc.pid}", "--nofile=400:400"], check=True)
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", d.port), timeout=5))
        time.sleep(1.0)
        held = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        assert held < 400, f"the daemon holds {held} descriptors"
        want = _kernel_state(world)
        _flush_table(world)
        wait_for(lambda: _kernel_state(world) == want, "the flushed table to be repaired under the flood")
        st = d.status()  # the control socket answers
        assert st["layers"]["nftables"]["engaged"] is True
        m = d.scrape()  # and so does a normal scrape
        assert m[("ksbpf_drift_repairs_total", (("layer", "nftables"),))] >= 1
        assert d.proc.poll() is None, d.log_text()[-2000:]
    finally:
        for s in idle:
            s.close()
