"""Drop events on the real kernel: the owner recorded at socket creation, the egress
program's and nftables' drops reported through the ring buffer, the in-kernel rate limit
(counts add up to the drop counters), the lost-events counter (moves only when the ring
really overflows), and ksbpfd's side: `ksctl watch --json`, the journal entry, `ksctl status`.

The BPF-level cases use test_bpf's lab (client and far namespaces, BPF only); the daemon
cases test_daemon's world (nftables + routing + BPF, through ksbpfd).
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ksbpf.events import DropEvent, parse_record
from ksbpf.linux import bpf as kbpf
from ksbpf.linux.bpf import BpfLayer
from ksbpf.linux.cgroup import cgroup_id
from ksbpf.linux.events import RingBuffer
from tests.kernel import test_bpf, test_daemon
from tests.kernel.conftest import run_in, sh, unique
from tests.kernel.test_bpf import Lab, make_policy, new_layer, requires_bpf

# The two modules' fixtures, shared.
lab, layers = test_bpf.lab, test_bpf.layers
world, daemon = test_daemon.world, test_daemon.daemon

pytestmark = pytest.mark.kernel

COMM = "leaky-dns"
# A sender with a known command name (prctl PR_SET_NAME, before the socket is made):
# prints its pid, then sends n datagrams to each destination.
LEAKY = textwrap.dedent(
    """
    import ctypes, json, os, socket, sys
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
    out = {"pid": os.getpid(), "eperm": 0, "ok": 0}
    for dst, port, n in json.loads(sys.argv[2]):
        s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(n):
            try:
                s.sendto(b"leak", (dst, port))
                out["ok"] += 1
            except PermissionError:
                out["eperm"] += 1
        s.close()
    print(json.dumps(out))
    """
)


DROP_5399 = "table inet kst {\n chain o {\n  type filter hook output priority 0; policy accept;\n  udp dport 5399 drop\n }\n}\n"


def leak(netns: str, cgroup: Path, sends: list[tuple[str, int, int]], comm: str = COMM) -> dict[str, int]:
    r = run_in([sys.executable, "-c", LEAKY, comm, json.dumps(sends)], netns=netns, cgroup=cgroup)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def ring_events(layer: BpfLayer) -> list[DropEvent]:
    with RingBuffer(layer.dir / kbpf.EVENTS_PIN) as ring:
        return [parse_record(r) for r in ring.read()]


def bpf_drops(layer: BpfLayer, reason: str, cg: int) -> int:
    return sum(p for r, c, p, _ in layer.counters() if r == reason and c == cg)


# =========================================================================== BPF level


@requires_bpf
@pytest.mark.parametrize("mode", ["helper", "sk_storage"])
def test_egress_drop_names_the_socket_owner(lab: Lab, layers: list[BpfLayer], mode: str) -> None:
    if mode == "helper" and not kbpf.probe_netns_cookie_helper():
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
    assert len(flood) == kbpf.EVENTS_PER_SEC, "one second's allowance, the rest held back"
    time.sleep(1.1)  # a new window: the next drop's event carries what was held back
    assert leak(lab.client, app, [("10.77.0.3", 53, 1)])["eperm"] == 1
    tail = ring_events(layer)
    assert len(tail) == 1 and tail[0].count == n + 1 - len(flood)
    assert sum(e.count for e in flood + tail) == bpf_drops(layer, "dns", cg) - before == n + 1
    assert layer.events_lost() == 0


@requires_bpf
def test_lost_counter_moves_only_when_the_ring_overflows(lab: Lab, layers: list[BpfLayer]) -> None:
    """A one-page ring holds 4096 // 72 = 56 events (64-byte record + 8-byte header). Each
    cgroup may send EVENTS_PER_SEC events a second; nothing reads the ring here."""
    layer = BpfLayer(unique("kst-"), netns=lab.client, events_bytes=4096)
    layers.append(layer)
    layer.apply(make_policy(lab))
    per = kbpf.EVENTS_PER_SEC
    cgs = [lab.cgroups(f"w/f{i}") for i in range(8)]
    fits = 4096 // (kbpf.struct.calcsize(kbpf.EVENT_FMT) + 8)
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
